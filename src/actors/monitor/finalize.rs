//! A run's end, as its Monitor sees it: the exit recorded FIRST (with the claim, when no
//! gate command runs between them), the gate judged, the auto-commit, the claim.

use std::path::PathBuf;

use serde_json::json;
use tracing::Instrument;

use super::{EndCause, MonitorEvent, MonitorState, run_env, vars};
use crate::actors::advancer::{send_claim, send_claim_with_exit};
use crate::actors::{Ctx, ProbeEvent, read_handoff};
use crate::agent::ExitStatus;
use crate::gate::{self, Judgement};
use crate::model::{Claim, ClaimOutcome, Decider, Verdict};
use crate::store::RunExit;
use crate::workspace;

/// Records a run's exit in a transaction of its own; false (and logged) when it cannot.
async fn record_exit(ctx: &Ctx, exit: &RunExit) -> bool {
    match ctx.store.record_start_and_exit(exit).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, run_id = exit.run.id, "cannot record the exit; the Reaper will finalize the run");
            false
        }
    }
}

/// The verdict of a run that the gate does not judge: one timed out or stopped at
/// shutdown, one that failed before or without an exit status. `None` for an agent that
/// ended on its own with a status, which the gate judges, and for a cancelled run, which
/// gets no verdict (it sends no claim).
fn judged_without_gate(
    cause: EndCause,
    error: Option<String>,
    status: Option<&ExitStatus>,
) -> Option<Judgement> {
    let verdict = match (cause, error) {
        (EndCause::TimedOut, _) => Verdict::TimedOut,
        (EndCause::StoppedAtShutdown, _) => Verdict::Failed {
            reason: "agent stopped at node shutdown (serve --stop-agents)".into(),
        },
        (_, Some(reason)) => Verdict::Failed { reason },
        _ if status.is_none() => Verdict::Failed {
            reason: "the agent ended without an exit status".into(),
        },
        _ => return None,
    };
    Some(verdict.into())
}

/// Records the exit FIRST, then gates, commits and claims.
pub(super) async fn finalize(
    state: &mut MonitorState,
    status: Option<ExitStatus>,
    failure: Option<String>,
) {
    let ctx = state.args.ctx.clone();
    let d = state.args.dispatched.clone();
    let code = status.as_ref().map(|s| s.code).unwrap_or(-1);
    let error = failure
        .clone()
        .or_else(|| status.as_ref().and_then(|s| s.error.clone()));
    let detail = json!({
        "signal": status.as_ref().and_then(|s| s.signal),
        "error": error,
        "timed_out": state.cause == EndCause::TimedOut,
        "cancelled": state.cause == EndCause::Cancelled,
    });
    // 1. The exit, first: from its record on, the grace window protects this run. With
    // no gate command nothing slow comes before the claim (this live Monitor protects
    // the run): the exit is written first in the claim's transaction (ADR 0001).
    let exit_recorded = std::time::Instant::now();
    let exit_at = ctx.now();
    ctx.metrics.run_duration.record(
        (exit_at - d.run.started_at).max(0) as f64 / 1000.0,
        &[crate::telemetry::kv("stage", d.job.stage.clone())],
    );
    let exit = RunExit {
        task_id: d.task.id,
        run: d.run.clone(),
        started: state.started.take(),
        code,
        detail,
        at: exit_at,
    };
    let decided = judged_without_gate(state.cause, error, status.as_ref());
    // The gate judges with the stage and the workspace; a gate command is the slow part.
    let gate_at = match (&decided, &state.stage, &state.workspace) {
        (None, Some(stage), Some(ws)) => Some((stage, ws)),
        _ => None,
    };
    let gate_command = gate_at.is_some_and(|(stage, _)| stage.gate.command.is_some());
    let with_claim = state.cause != EndCause::Cancelled && !gate_command;
    // A cancelled run sends no claim.
    if !with_claim && (!record_exit(&ctx, &exit).await || state.cause == EndCause::Cancelled) {
        return;
    }
    // 2. The gate, read-only.
    let judgement: Judgement = match (decided, gate_at) {
        (Some(judgement), _) => judgement,
        (None, Some((stage, ws))) => {
            let log = PathBuf::from(&d.run.log_path);
            let hidden = ctx.config.hidden_vars();
            let v = vars(&d, ws);
            let env = run_env(&ctx, &d, &v, &state.span);
            let run = gate::GateRun {
                log: &log,
                hidden: &hidden,
                env: &env,
            };
            gate::evaluate(stage, ws, &v, code, &run)
                .instrument(tracing::info_span!("gate"))
                .await
        }
        (None, None) => Verdict::Failed {
            reason: "no workspace".into(),
        }
        .into(),
    };
    // 3. The auto-commit.
    let mut commit_sha = None;
    let mut verdict = judgement.verdict;
    if let (Some(stage), Some(ws)) = (&state.stage, &state.workspace)
        && stage.commit
    {
        let ws = ws.clone();
        let message = workspace::commit_message(&d.job.stage, &d.task.key, d.run.id);
        let branch = ctx.policy.branch(&d.task.key);
        let started = state.start_tip.clone();
        let commit = move || workspace::commit_stage(&ws, &branch, started.as_deref(), &message);
        match tokio::task::spawn_blocking(commit)
            .instrument(tracing::info_span!("auto_commit"))
            .await
        {
            Ok(Ok(sha)) => commit_sha = sha,
            Ok(Err(e)) => {
                verdict = Verdict::Failed {
                    reason: format!("auto-commit failed: {e}"),
                }
            }
            Err(e) => {
                verdict = Verdict::Failed {
                    reason: format!("auto-commit panicked: {e}"),
                }
            }
        }
    }
    // 4. What the next job is told, and what the agent's tool reported it used.
    let log = PathBuf::from(&d.run.log_path);
    let (feedback, usage) =
        read_handoff(&verdict, judgement.verdict_text, d.job.attempt, &log).await;
    // 5. The claim.
    let claim = Claim {
        job_id: d.job.id,
        run_id: d.run.id,
        verdict,
        decided_by: Decider::Monitor,
        commit_sha,
        feedback,
        usage,
    };
    let outcome = if with_claim {
        let outcome = send_claim_with_exit(&state.args.advancer, claim, Some(exit.clone())).await;
        if outcome.is_none() {
            // Undecided: the exit is recorded on its own, for the Reaper's second tier,
            // as of now (the grace window counts from its record).
            let exit = RunExit {
                at: ctx.now(),
                ..exit
            };
            record_exit(&ctx, &exit).await;
        }
        outcome
    } else {
        send_claim(&state.args.advancer, claim).await
    };
    if let Some(ClaimOutcome::Won(_)) = &outcome {
        ctx.metrics
            .advance_latency
            .record(exit_recorded.elapsed().as_secs_f64(), &[]);
        if let Some(u) = usage {
            ctx.metrics.record_usage(&d.job.stage, u);
        }
    }
    state.span.record(
        "outcome",
        match &outcome {
            Some(ClaimOutcome::Won(_)) => "won",
            Some(_) => "lost",
            None => "undecided",
        },
    );
    ctx.report(ProbeEvent::Monitor {
        job_id: d.job.id,
        run_id: d.run.id,
        event: MonitorEvent::Claimed(outcome),
    });
}

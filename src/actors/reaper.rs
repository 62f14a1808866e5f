//! The Reaper: periodic recovery. It finds running jobs whose run is past its window and
//! claims for them, through the Advancer, like a Monitor would.
//!
//! - Tier 1, lost agent: no exit recorded and the agent is gone (pid dead on this host,
//!   or the run's node silent for longer than `reaper.heartbeat_timeout`).
//! - Tier 2, unfinished finalization: exit recorded at least `reaper.finalize_grace` ago
//!   and the job still runs with that run. The gate is evaluated READ-ONLY; a gate
//!   command runs in a finalizer of its own, so that a long test suite never stalls the
//!   pass (one finalizer per run: the run is watched while it lives).
//! - Timeout: an unwatched agent of this host past its stage timeout is killed.
//!
//! - Recovery: a push pinned to a dead host can never be performed; its task goes back to
//!   the earliest stage whose work did not reach the remote.
//!
//! A run watched by a live Monitor of this process is never touched, and a run whose exit
//! was recorded less than `finalize_grace` ago is never reaped: its monitor may still be
//! finalizing.

use std::path::PathBuf;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;
use serde_json::json;
use tracing::Instrument;

use super::advancer::{AdvancerMsg, send_claim};
use super::{Ctx, ProbeEvent, Ticker, read_handoff};
use crate::agent;
use crate::clock::ms;
use crate::gate::{self, Judgement, Vars};
use crate::liveness::{self, HostLiveness, LivenessWindows};
use crate::model::{Claim, ClaimOutcome, Decider, ReapTier, Verdict};
use crate::store::RunningJob;
use crate::workspace;

#[derive(Debug, Clone, Copy)]
pub enum ReaperMsg {
    Tick,
}

pub struct ReaperArgs {
    pub ctx: Ctx,
    pub advancer: ActorRef<AdvancerMsg>,
}

pub struct ReaperState {
    args: ReaperArgs,
    _ticker: Ticker,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReapResult {
    pub n_tier1: usize,
    pub n_tier2: usize,
    pub n_timeout: usize,
    /// Exits read from a shim's status file for runs nobody watched.
    pub n_exit_recorded: usize,
    /// Runs left alone because their exit is still inside the grace window.
    pub n_in_grace: usize,
    /// Runs of another host left alone: it is alive, or restarting within its window.
    pub n_host_alive: usize,
    pub n_won: usize,
    /// Tasks sent back to a stage whose work was lost with a dead host (ADR 0010).
    pub n_recovered: usize,
    /// Tier-2 runs whose gate command runs in a finalizer of its own (ADR 0009).
    pub n_finalizers: usize,
}

impl ReapResult {
    pub fn did_work(&self) -> bool {
        self.n_tier1 + self.n_tier2 + self.n_timeout + self.n_exit_recorded + self.n_recovered > 0
    }
}

pub struct Reaper;

impl Actor for Reaper {
    type Msg = ReaperMsg;
    type State = ReaperState;
    type Arguments = ReaperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ReaperArgs,
    ) -> Result<ReaperState, ActorProcessingErr> {
        let ticker = Ticker::start(&myself, args.ctx.config.reaper.interval, || ReaperMsg::Tick);
        Ok(ReaperState {
            args,
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        _msg: ReaperMsg,
        state: &mut ReaperState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.args.ctx;
        match run_once(ctx, &state.args.advancer).await {
            Ok((result, claims)) => {
                // A pass that did work is a span of its own; each claim it sent is a
                // `reap` span in its task's trace.
                if result.did_work() {
                    tracing::info_span!(
                        parent: None,
                        "reaper.pass",
                        tier1 = result.n_tier1,
                        tier2 = result.n_tier2,
                        timeout = result.n_timeout,
                        exits = result.n_exit_recorded,
                        won = result.n_won,
                    )
                    .in_scope(|| tracing::info!("reaper pass did work"));
                }
                ctx.report(ProbeEvent::Reaper { result, claims });
            }
            // A periodic actor never dies of one failed pass.
            Err(e) => {
                tracing::warn!(actor = "reaper", error = %e, "pass failed; trying again at the next tick")
            }
        }
        Ok(())
    }
}

/// One pass over the running jobs.
pub async fn run_once(
    ctx: &Ctx,
    advancer: &ActorRef<AdvancerMsg>,
) -> Result<(ReapResult, Vec<(Claim, ClaimOutcome)>), crate::store::StoreError> {
    let now = ctx.now();
    let grace = ms(ctx.config.reaper.finalize_grace);
    let windows = LivenessWindows {
        heartbeat_timeout_ms: ms(ctx.config.reaper.heartbeat_timeout),
        adoption_window_ms: ms(ctx.config.node.adoption_window),
    };
    let mut result = ReapResult::default();
    let mut claims = Vec::new();
    let running = ctx
        .store
        .running_jobs_but(|run| ctx.watched.contains(run))
        .await?;
    let hosts = liveness::by_host(&ctx.store.nodes().await?, now, windows);
    for rj in running {
        let Some(run) = rj.run.clone() else { continue };
        if ctx.watched.contains(run.id) {
            continue;
        }
        let host = rj.node_hostname.clone().unwrap_or_default();
        let here = host == ctx.hostname;
        // Another host's runs are its own to finalize or adopt while it lives, and while
        // it restarts within its adoption window: only a dead host's runs are reaped here.
        let state = hosts.get(&host).copied().unwrap_or(HostLiveness::Dead);
        if !here && !state.is_dead() {
            result.n_host_alive += 1;
            continue;
        }
        let decision = match run.exited_at {
            Some(exited_at) if now - exited_at < grace => {
                result.n_in_grace += 1;
                None
            }
            Some(_) if has_gate_command(ctx, &rj) => {
                // A gate command may run for `gate.timeout` (30m by default): it runs in a
                // finalizer of its own, not in this pass, and the run is watched meanwhile.
                result.n_tier2 += 1;
                result.n_finalizers += 1;
                spawn_finalizer(ctx, advancer, rj.clone(), run.clone());
                None
            }
            Some(_) => {
                result.n_tier2 += 1;
                let (judgement, commit) = read_only_gate(ctx, &rj).await;
                Some((ReapTier::Unfinished, judgement, commit))
            }
            None if !here => {
                result.n_tier1 += 1;
                let silent = rj.node_heartbeat_at.map_or(-1, |hb| (now - hb) / 1000);
                let reason = if rj.node_stopped {
                    format!("host {host} stopped and did not come back within node.adoption_window")
                } else {
                    format!(
                        "host {host} is gone: its node {} has not sent a heartbeat for {silent}s",
                        run.node_id
                    )
                };
                Some((ReapTier::LostAgent, Verdict::Lost { reason }.into(), None))
            }
            None => own_host_run(ctx, &rj, &run, now, &mut result).await?,
        };
        let Some((tier, judgement, commit_sha)) = decision else {
            continue;
        };
        if let Some((claim, outcome)) =
            claim_for(ctx, advancer, &rj, &run, tier, judgement, commit_sha).await
        {
            result.n_won += usize::from(matches!(outcome, ClaimOutcome::Won(_)));
            claims.push((claim, outcome));
        }
    }
    result.n_recovered = recover_lost_work(ctx, &hosts).await?;
    Ok((result, claims))
}

/// Sends the Reaper's claim for a run, from within the task's trace, and counts a win.
async fn claim_for(
    ctx: &Ctx,
    advancer: &ActorRef<AdvancerMsg>,
    rj: &RunningJob,
    run: &entity::agent_runs::Model,
    tier: ReapTier,
    judgement: Judgement,
    commit_sha: Option<String>,
) -> Option<(Claim, ClaimOutcome)> {
    let Judgement {
        verdict,
        verdict_text,
    } = judgement;
    let log = PathBuf::from(&run.log_path);
    let (feedback, usage) = read_handoff(&verdict, verdict_text, rj.job.attempt, &log).await;
    let claim = Claim {
        job_id: rj.job.id,
        run_id: run.id,
        verdict,
        decided_by: Decider::Reaper(tier),
        commit_sha,
        feedback,
        usage,
    };
    // The claim is sent from within the task's trace; the Advancer's span follows it.
    let span = crate::task_span!("reap", rj.task, rj.job, run.id);
    span.in_scope(|| tracing::info!(tier = tier.as_str(), "reaping"));
    let outcome = send_claim(advancer, claim.clone()).instrument(span).await?;
    if matches!(outcome, ClaimOutcome::Won(_)) {
        ctx.metrics
            .reaps
            .add(1, &[crate::telemetry::kv("tier", tier.as_str())]);
        if let Some(u) = claim.usage {
            ctx.metrics.record_usage(&rj.job.stage, u);
        }
    }
    Some((claim, outcome))
}

/// True when the run's stage has a gate command: the part of a gate that may take long.
fn has_gate_command(ctx: &Ctx, rj: &RunningJob) -> bool {
    ctx.config
        .stages
        .get(&rj.job.stage)
        .is_some_and(|s| s.gate.command.is_some())
}

/// Finalizes a tier-2 run whose gate runs a command, outside the Reaper's pass: one
/// finalizer per run (the run is watched while it lives, so later passes leave it alone),
/// reported to the probe as a `ReaperFinalizer` event.
fn spawn_finalizer(
    ctx: &Ctx,
    advancer: &ActorRef<AdvancerMsg>,
    rj: RunningJob,
    run: entity::agent_runs::Model,
) {
    ctx.watched.insert(run.id, rj.job.id);
    let (ctx, advancer) = (ctx.clone(), advancer.clone());
    tokio::spawn(async move {
        let (judgement, commit) = read_only_gate(&ctx, &rj).await;
        let tier = ReapTier::Unfinished;
        let sent = claim_for(&ctx, &advancer, &rj, &run, tier, judgement, commit).await;
        ctx.watched.remove(run.id);
        if let Some((claim, outcome)) = sent {
            ctx.report(ProbeEvent::ReaperFinalizer { claim, outcome });
        }
    });
}

/// The tasks whose pushes wait for a dead host: that host's commits exist nowhere else,
/// so each such task goes back to its earliest unpushed stage (`Store::recover`, fenced,
/// once whatever races it). A task whose job still runs is taken at a later pass, once
/// the tier-1 reap above has ended that run.
async fn recover_lost_work(
    ctx: &Ctx,
    hosts: &std::collections::HashMap<String, HostLiveness>,
) -> Result<usize, crate::store::StoreError> {
    let mut n = 0;
    for (task_id, host) in ctx.store.pinned_pushes().await? {
        let dead = host != ctx.hostname
            && hosts
                .get(&host)
                .copied()
                .unwrap_or(HostLiveness::Dead)
                .is_dead();
        if !dead {
            continue;
        }
        if let Some(r) = ctx
            .store
            .recover(task_id, &host, &ctx.policy, ctx.now())
            .await?
        {
            tracing::warn!(
                task_id,
                host = %host,
                stage = %r.lost_stage,
                job_id = r.job_id,
                "work lost with a dead host: the task goes back to its earliest unpushed stage"
            );
            n += 1;
        }
    }
    Ok(n)
}

/// A run of this host with no exit recorded: its agent past the stage timeout is stopped;
/// an agent gone with an exit in its status file gets that exit recorded (tier 2 later);
/// one gone without is lost (tier 1). Runs of another live node of this host are left to it.
async fn own_host_run(
    ctx: &Ctx,
    rj: &RunningJob,
    run: &entity::agent_runs::Model,
    now: i64,
    result: &mut ReapResult,
) -> Result<Option<(ReapTier, Judgement, Option<String>)>, crate::store::StoreError> {
    let mine = run.node_id == ctx.node_id;
    let node_silent = !mine
        && rj
            .node_heartbeat_at
            .is_none_or(|hb| now - hb > ms(ctx.config.reaper.heartbeat_timeout));
    if !mine && !node_silent && !rj.node_stopped {
        return Ok(None);
    }
    let timeout = ctx
        .config
        .stages
        .get(&rj.job.stage)
        .map(|s| ms(s.timeout))
        .unwrap_or(i64::MAX);
    let lost = |reason: String| Some((ReapTier::LostAgent, Verdict::Lost { reason }.into(), None));
    let log = PathBuf::from(&run.log_path);
    if let Some(pid) = agent::live_agent(&log, run.pid) {
        if now - run.started_at <= timeout {
            return Ok(None);
        }
        agent::terminate_group(pid, agent::AGENT_KILL_GRACE_DEFAULT).await;
        result.n_timeout += 1;
        return Ok(Some((ReapTier::Timeout, Verdict::TimedOut.into(), None)));
    }
    let started = run.pid.is_some() || agent::Identity::of_run(&log).is_some();
    if !started {
        // Just dispatched by this node: its Monitor is about to start the agent.
        if mine && now - run.started_at < ms(ctx.config.reaper.heartbeat_timeout) {
            return Ok(None);
        }
        result.n_tier1 += 1;
        return Ok(lost("the agent was never started".into()));
    }
    // The agent is gone. If its shim left an exit status, record it: the run then
    // finalizes as tier 2 once the grace window has passed.
    if let Some(status) = agent::read_exit(&log) {
        let detail =
            json!({"signal": status.signal, "error": status.error, "recorded_by": "reaper"});
        ctx.store
            .record_exit(rj.task.id, run, status.code, detail, now)
            .await?;
        result.n_exit_recorded += 1;
        return Ok(None);
    }
    result.n_tier1 += 1;
    let pid = run.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
    Ok(lost(format!(
        "agent pid {pid} is gone without an exit status"
    )))
}

/// Tier 2's verdict: the gate evaluated read-only on this host's workspace, and the
/// commit the run made before its monitor died, if it did.
async fn read_only_gate(ctx: &Ctx, rj: &RunningJob) -> (Judgement, Option<String>) {
    let Some(run) = &rj.run else {
        return (
            Verdict::Failed {
                reason: "no run".into(),
            }
            .into(),
            None,
        );
    };
    let code = run.exit_code.unwrap_or(-1);
    let Some(stage) = ctx.config.stages.get(&rj.job.stage) else {
        return (
            Verdict::Failed {
                reason: format!("stage {} is not in the config", rj.job.stage),
            }
            .into(),
            None,
        );
    };
    let here = rj.node_hostname.as_deref() == Some(ctx.hostname.as_str());
    let ws = workspace::path_for(&ctx.config.workspace_root, &rj.task.key)
        .ok()
        .filter(|p| p.exists());
    let Some(ws) = ws.filter(|_| here) else {
        return (
            Verdict::Failed {
                reason: "the run's workspace is not on this host; the attempt is retried".into(),
            }
            .into(),
            None,
        );
    };
    let vars = Vars {
        task: rj.task.key.clone(),
        stage: rj.job.stage.clone(),
        run_id: run.id,
        attempt: rj.job.attempt,
        workspace: ws.to_string_lossy().into_owned(),
        prompt: None,
    };
    let log = PathBuf::from(&run.log_path);
    let hidden = ctx.config.hidden_vars();
    let stage_env = ctx.config.stage_env(&rj.job.stage);
    let env = vars.env(stage_env, rj.job.iteration, rj.task.trace_parent.clone());
    let gate_run = gate::GateRun {
        log: &log,
        hidden: &hidden,
        env: &env,
    };
    let verdict = gate::evaluate(stage, &ws, &vars, code, &gate_run).await;
    let commit = workspace::head_commit_of_run(&ws, run.id);
    (verdict, commit)
}

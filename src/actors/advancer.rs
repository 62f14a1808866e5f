//! The Advancer: THE single writer of job transitions after dispatch. It handles claims
//! strictly one at a time and runs only the fenced transaction; slow work (gates, git,
//! HTTP) happens in the sender before the claim is sent.
//!
//! Senders (the Monitor, the Reaper, adoption) go through [`send_claim`].

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort};

use super::dispatcher::DispatcherMsg;
use super::{Ctx, ProbeEvent};
use crate::model::{Claim, ClaimOutcome, Decider, JobStatus};
use crate::store::{Dispatched, RunExit, Taker};

/// How often a claim is tried when the database does not answer.
const ADVANCER_CLAIM_TRIES: u32 = 5;
/// The wait before the second try; it doubles with each try.
const ADVANCER_CLAIM_BACKOFF: Duration = Duration::from_millis(200);

pub enum AdvancerMsg {
    /// Finalize a run, writing its exit first when one is given; the reply is `Won`,
    /// `Lost` or `AlreadyAdvanced`, or the database error that kept the claim from being
    /// decided (the sender may try again).
    Claim(
        Claim,
        Option<Box<RunExit>>,
        RpcReplyPort<Result<ClaimOutcome, String>>,
    ),
}

pub struct AdvancerArgs {
    pub ctx: Ctx,
    /// Told to look for work after a claim queued a next job.
    pub dispatcher: Option<ActorRef<DispatcherMsg>>,
    /// Told to look at the outbox after a claim wrote effects.
    pub effect_worker: Option<ActorRef<super::effect_worker::EffectWorkerMsg>>,
}

pub struct Advancer;

impl Actor for Advancer {
    type Msg = AdvancerMsg;
    type State = AdvancerArgs;
    type Arguments = AdvancerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: AdvancerArgs,
    ) -> Result<AdvancerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: AdvancerMsg,
        state: &mut AdvancerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let AdvancerMsg::Claim(claim, exit, reply) = msg;
        // A Monitor's run was this node's: its place goes to the task's next stage, while
        // the Dispatcher runs (not once the node is stopping) and the node is within
        // `max_concurrent_jobs` (adopted agents may have put it over).
        let hand_off = claim.decided_by == Decider::Monitor
            && state
                .dispatcher
                .as_ref()
                .is_some_and(|d| d.get_status() == ActorStatus::Running)
            && state.ctx.watched.len() <= state.ctx.config.max_concurrent_jobs;
        let (outcome, handed) =
            match advance_once(&state.ctx, &claim, exit.as_deref(), hand_off).await {
                Ok((outcome, handed)) => (Ok(outcome), handed),
                Err(e) => (Err(e), None),
            };
        if let Ok(ClaimOutcome::Won(won)) = &outcome {
            if won.effects > 0
                && let Some(w) = &state.effect_worker
            {
                // A kick carries no span: the woken actor's work is not this claim's.
                let _ = tracing::Span::none()
                    .in_scope(|| w.send_message(super::effect_worker::EffectWorkerMsg::Kick));
            }
            // The run is finalized: its slot is free now, not when its Monitor has
            // stopped, so the next stage can start at once; a job handed to this node
            // takes the slot over before it is freed.
            if let Some(next) = &handed {
                state.ctx.watched.insert(next.run.id, next.job.id);
            }
            state.ctx.watched.remove(claim.run_id);
            if let Some(d) = &state.dispatcher {
                match handed {
                    Some(next) => {
                        let msg = DispatcherMsg::Handed(Box::new(next.clone()));
                        let sent = tracing::Span::none().in_scope(|| d.send_message(msg));
                        if sent.is_err() {
                            // The Dispatcher stopped meanwhile: the job goes back to the queue.
                            super::dispatcher::release(&state.ctx, &next).await;
                        }
                    }
                    None => {
                        let _ =
                            tracing::Span::none().in_scope(|| d.send_message(DispatcherMsg::Kick));
                    }
                }
            }
        }
        state.ctx.report(ProbeEvent::Advancer {
            claim: claim.clone(),
            outcome: outcome.clone(),
        });
        let _ = reply.send(outcome);
        Ok(())
    }
}

/// One claim: the fenced transaction, and a log line saying how it went.
#[tracing::instrument(
    name = "claim",
    skip_all,
    fields(job_id = claim.job_id, run_id = claim.run_id, decided_by = claim.decided_by.as_str(), outcome = tracing::field::Empty)
)]
pub async fn advance_once(
    ctx: &Ctx,
    claim: &Claim,
    exit: Option<&RunExit>,
    hand_off: bool,
) -> Result<(ClaimOutcome, Option<Dispatched>), String> {
    let started = std::time::Instant::now();
    let taker = hand_off.then(|| Taker {
        node_id: &ctx.node_id,
        log_dir: &ctx.config.log_dir,
        policy: Some(&ctx.policy),
    });
    let result = ctx
        .store
        .claim_and_take(claim, exit, &ctx.policy, ctx.now(), taker)
        .await;
    let elapsed_us = started.elapsed().as_micros() as u64;
    match result {
        Ok((outcome, handed)) => {
            let m = &ctx.metrics;
            let by = crate::telemetry::kv("decided_by", claim.decided_by.as_str());
            let label = outcome.label();
            m.claims
                .add(1, &[by.clone(), crate::telemetry::kv("outcome", label)]);
            tracing::Span::current().record("outcome", label);
            match &outcome {
                ClaimOutcome::Won(w) => {
                    if w.job_status == JobStatus::Queued {
                        m.retries.add(1, &[]);
                    } else {
                        m.advances.add(1, &[by]);
                    }
                    tracing::info!(
                        elapsed_us,
                        verdict = %claim.verdict.outcome(),
                        job_status = %w.job_status,
                        next_stage = w.next_job.as_ref().map(|j| j.stage.as_str()),
                        handed_off = handed.is_some(),
                        task_status = w.task_status.map(|s| s.as_str()),
                        "claim won"
                    )
                }
                other => tracing::info!(outcome = ?other, "claim lost"),
            }
            Ok((outcome, handed))
        }
        Err(e) => {
            tracing::warn!(error = %e, "claim not decided");
            Err(e.to_string())
        }
    }
}

/// Sends a claim to the Advancer, trying again a few times when the database did not
/// answer. `None` when it could not be decided: the Reaper finalizes the run later.
pub async fn send_claim(advancer: &ActorRef<AdvancerMsg>, claim: Claim) -> Option<ClaimOutcome> {
    send_claim_with_exit(advancer, claim, None).await
}

/// [`send_claim`], with the run's exit written first in the claim's transaction (or in the
/// loser's). `None` when it could not be decided: the exit may not be recorded then.
pub async fn send_claim_with_exit(
    advancer: &ActorRef<AdvancerMsg>,
    claim: Claim,
    exit: Option<RunExit>,
) -> Option<ClaimOutcome> {
    let exit = exit.map(Box::new);
    let mut backoff = ADVANCER_CLAIM_BACKOFF;
    for attempt in 1..=ADVANCER_CLAIM_TRIES {
        let (c, e) = (claim.clone(), exit.clone());
        match advancer
            .call(|reply| AdvancerMsg::Claim(c, e, reply), None)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(Ok(outcome))) => return Some(outcome),
            Ok(ractor::rpc::CallResult::Success(Err(e))) => {
                tracing::warn!(error = %e, attempt, run_id = claim.run_id, "claim not decided; trying again");
            }
            _ => {
                tracing::warn!(
                    run_id = claim.run_id,
                    "the advancer is gone; the Reaper will finalize the run"
                );
                return None;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    None
}

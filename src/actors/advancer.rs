//! The Advancer: THE single writer of job transitions after dispatch. It handles claims
//! strictly one at a time and runs only the fenced transaction; slow work (gates, git,
//! HTTP) happens in the sender before the claim is sent.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::dispatcher::DispatcherMsg;
use super::{Ctx, ProbeEvent};
use crate::store::{Claim, ClaimOutcome};

pub enum AdvancerMsg {
    /// Finalize a run; the reply is `Won`, `Lost` or `AlreadyAdvanced`, or the database
    /// error that kept the claim from being decided (the sender may try again).
    Claim(Claim, RpcReplyPort<Result<ClaimOutcome, String>>),
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
        let AdvancerMsg::Claim(claim, reply) = msg;
        let outcome = advance_once(&state.ctx, &claim).await;
        if let Ok(ClaimOutcome::Won(won)) = &outcome {
            if won.effects > 0
                && let Some(w) = &state.effect_worker
            {
                // A kick carries no span: the woken actor's work is not this claim's.
                let _ = tracing::Span::none()
                    .in_scope(|| w.send_message(super::effect_worker::EffectWorkerMsg::Kick));
            }
            // The run is finalized: its slot is free now, not when its Monitor has
            // stopped, so the next stage can start at once.
            state.ctx.watched.remove(claim.run_id);
            if let Some(d) = &state.dispatcher {
                let _ = tracing::Span::none().in_scope(|| d.send_message(DispatcherMsg::Kick));
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
pub async fn advance_once(ctx: &Ctx, claim: &Claim) -> Result<ClaimOutcome, String> {
    let started = std::time::Instant::now();
    let result = ctx.store.claim(claim, &ctx.policy, ctx.now()).await;
    let elapsed_us = started.elapsed().as_micros() as u64;
    match result {
        Ok(outcome) => {
            let m = &ctx.metrics;
            let by = crate::telemetry::kv("decided_by", claim.decided_by.as_str());
            let label = match &outcome {
                ClaimOutcome::Won(_) => "won",
                ClaimOutcome::Lost => "lost",
                ClaimOutcome::AlreadyAdvanced => "already_advanced",
            };
            m.claims
                .add(1, &[by.clone(), crate::telemetry::kv("outcome", label)]);
            tracing::Span::current().record("outcome", label);
            if let ClaimOutcome::Won(w) = &outcome {
                if w.job_status == crate::store::status::QUEUED {
                    m.retries.add(1, &[]);
                } else {
                    m.advances.add(1, &[by]);
                }
            }
            match &outcome {
                ClaimOutcome::Won(w) => tracing::info!(
                    elapsed_us,
                    verdict = claim.verdict.outcome(),
                    job_status = %w.job_status,
                    next_stage = w.next_job.as_ref().map(|j| j.stage.as_str()),
                    task_status = w.task_status.as_deref(),
                    "claim won"
                ),
                other => tracing::info!(outcome = ?other, "claim lost"),
            }
            Ok(outcome)
        }
        Err(e) => {
            tracing::warn!(error = %e, "claim not decided");
            Err(e.to_string())
        }
    }
}

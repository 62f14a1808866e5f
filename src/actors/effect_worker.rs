//! The EffectWorker: drains the outbox. Each pass takes, of every task, its first
//! pending effect that is due (effects of one task run in order), performs up to
//! `effects.concurrency` tasks' effects at once (each task's due effects one after
//! another, in the same pass), and records each outcome: done, retried with
//! exponential backoff and jitter (or when the remote asked, on 429), or failed after
//! `effects.max_attempts`. Pending effects survive restarts: they are rows.

use std::collections::HashSet;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::Rng;
use serde::Serialize;
use tracing::Instrument;

use super::{Ctx, ProbeEvent, Ticker, pass_or_default};
use crate::clock::ms;
use crate::effects::EffectError;
use crate::liveness::{self, LivenessWindows};
use crate::store::{EffectOutcome, FinishedEffect};

/// How long a taken effect is left to its worker before another may take it again.
pub const EFFECT_LEASE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectWorkerMsg {
    Tick,
    /// A claim wrote effects: look now.
    Kick,
}

pub struct EffectWorkerArgs {
    pub ctx: Ctx,
}

pub struct EffectWorkerState {
    args: EffectWorkerArgs,
    _ticker: Ticker,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EffectResult {
    pub n_done: usize,
    pub n_retried: usize,
    pub n_failed: usize,
    /// Taken by another worker between the look and the lease.
    pub n_skipped: usize,
    /// Performed, but another worker had taken the effect over: not recorded.
    pub n_superseded: usize,
    /// Tasks that ended with an outcome of this pass (done once delivered, or failed by
    /// a refused delivery), with their status.
    pub ended: Vec<(i64, crate::model::TaskStatus)>,
}

pub struct EffectWorker;

impl Actor for EffectWorker {
    type Msg = EffectWorkerMsg;
    type State = EffectWorkerState;
    type Arguments = EffectWorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: EffectWorkerArgs,
    ) -> Result<EffectWorkerState, ActorProcessingErr> {
        let interval = args.ctx.config.effects.interval;
        let ticker = Ticker::start(&myself, interval, || EffectWorkerMsg::Tick);
        let _ = myself.send_message(EffectWorkerMsg::Kick);
        Ok(EffectWorkerState {
            args,
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: EffectWorkerMsg,
        state: &mut EffectWorkerState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.args.ctx;
        let result = pass_or_default("effect_worker", run_once(ctx).await);
        ctx.report(ProbeEvent::EffectWorker { msg, result });
        Ok(())
    }
}

/// One pass over the outbox; returns when every effect it took has an outcome.
pub async fn run_once(ctx: &Ctx) -> Result<EffectResult, crate::store::StoreError> {
    let mut result = EffectResult::default();
    let lapsed = lapsed_leases(ctx).await?;
    let due = ctx
        .store
        .due_effects(&ctx.hostname, |holder| lapsed.contains(holder), ctx.now())
        .await?;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(ctx.config.effects.concurrency));
    let mut set = tokio::task::JoinSet::new();
    for (effect, task) in due {
        // The slot first, then the lease: a lease never runs out while waiting for a slot.
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        if !ctx
            .store
            .lease_effect(&effect, &ctx.node_id, ms(EFFECT_LEASE), ctx.now())
            .await?
        {
            result.n_skipped += 1;
            continue;
        }
        let ctx = ctx.clone();
        set.spawn(async move {
            let _permit = permit;
            drain_task(&ctx, effect, task).await
        });
    }
    while let Some(joined) = set.join_next().await {
        let Ok(attempts) =
            joined.map_err(|e| tracing::error!(error = %e, "an effect task panicked"))
        else {
            continue;
        };
        for (outcome, task_id, recorded) in attempts {
            match recorded {
                Ok(f) if f.recorded => {
                    match outcome {
                        EffectOutcome::Done { .. } => result.n_done += 1,
                        EffectOutcome::Retry { .. } => result.n_retried += 1,
                        EffectOutcome::Failed { .. } => result.n_failed += 1,
                    }
                    if let Some(status) = f.task_ended {
                        result.ended.push((task_id, status));
                    }
                }
                // Another worker took the effect over since; its attempt is recorded.
                Ok(_) => result.n_superseded += 1,
                // The lease runs out and the effect is taken again; remotes deduplicate.
                Err(e) => tracing::warn!(error = %e, "cannot record an effect's outcome"),
            }
        }
    }
    Ok(result)
}

/// One attempt's outcome, the task's id, and how recording it went.
type Attempt = (
    EffectOutcome,
    i64,
    Result<FinishedEffect, crate::store::StoreError>,
);

/// Performs `effect` (leased), then, while each is done, the task's next effects that are
/// due on this host, in order, in this same pass: a task's push, pull request, comment
/// and state go out together instead of one a tick.
async fn drain_task(
    ctx: &Ctx,
    first: entity::effects::Model,
    task: entity::tasks::Model,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut effect = first;
    loop {
        let span = tracing::info_span!(
            parent: None,
            "effect",
            task = %task.key,
            kind = %effect.kind,
            effect_id = effect.id,
            run_id = effect.run_id,
            attempt = effect.attempts + 1,
        );
        crate::telemetry::join_task_trace(&span, task.trace_parent.as_deref());
        let (outcome, recorded) = perform_one(ctx, &effect, &task).instrument(span).await;
        let done = matches!(outcome, EffectOutcome::Done { .. })
            && recorded.as_ref().is_ok_and(|f| f.recorded);
        attempts.push((outcome, task.id, recorded));
        if !done {
            return attempts;
        }
        let next = ctx
            .store
            .next_effect_of_task(task.id, &ctx.hostname, ctx.now())
            .await;
        let Ok(Some(next)) = next else {
            return attempts;
        };
        let leased = ctx
            .store
            .lease_effect(&next, &ctx.node_id, ms(EFFECT_LEASE), ctx.now())
            .await;
        if !leased.unwrap_or(false) {
            return attempts;
        }
        effect = next;
    }
}

/// Performs one leased effect and records its outcome under the lease.
async fn perform_one(
    ctx: &Ctx,
    effect: &entity::effects::Model,
    task: &entity::tasks::Model,
) -> (
    EffectOutcome,
    Result<FinishedEffect, crate::store::StoreError>,
) {
    let outcome = match ctx.effector.perform(effect, task).await {
        Ok(external_ref) => EffectOutcome::Done { external_ref },
        Err(err) => outcome_of_error(ctx, effect, err),
    };
    match &outcome {
        EffectOutcome::Done { external_ref } => {
            tracing::info!(task = %task.key, kind = %effect.kind, effect_id = effect.id, external_ref = external_ref.as_deref(), "effect done")
        }
        EffectOutcome::Retry { error, at } => {
            tracing::warn!(task = %task.key, kind = %effect.kind, effect_id = effect.id, error = %error, retry_in_ms = at - ctx.now(), "effect will be retried")
        }
        EffectOutcome::Failed { error } => {
            tracing::error!(task = %task.key, kind = %effect.kind, effect_id = effect.id, error = %error, "effect failed")
        }
    }
    ctx.metrics.effects.add(
        1,
        &[
            crate::telemetry::kv("kind", effect.kind.as_str()),
            crate::telemetry::kv("outcome", outcome.label()),
        ],
    );
    let on_failed = ctx.policy.delivery_failed_effects(task);
    let recorded = ctx
        .store
        .finish_effect(effect, &ctx.node_id, outcome.clone(), on_failed, ctx.now())
        .await;
    if let Ok(FinishedEffect {
        task_ended: Some(status),
        ..
    }) = &recorded
    {
        tracing::info!(task = %task.key, status = %status, "task ended with its delivery");
    }
    (outcome, recorded)
}

/// The lease holders whose leases no longer protect anything: nodes of dead hosts, and
/// earlier boots of this host (this node is their successor).
async fn lapsed_leases(ctx: &Ctx) -> Result<HashSet<String>, crate::store::StoreError> {
    let nodes = ctx.store.nodes().await?;
    let windows = LivenessWindows {
        heartbeat_timeout_ms: ms(ctx.config.reaper.heartbeat_timeout),
        // A stopped node performs nothing any more: its leases lapse at once.
        adoption_window_ms: 0,
    };
    let hosts = liveness::by_host(&nodes, ctx.now(), windows);
    Ok(nodes
        .into_iter()
        .filter(|n| n.id != ctx.node_id)
        .filter(|n| {
            // An earlier boot of this host: its process is gone (or reused our pid).
            let earlier_boot = n.hostname == ctx.hostname
                && (n.pid == std::process::id() as i32 || !crate::agent::alive(n.pid));
            earlier_boot
                || n.stopped_at.is_some()
                || hosts.get(&n.hostname).is_none_or(|h| h.is_dead())
        })
        .map(|n| n.id)
        .collect())
}

/// Retry with backoff and jitter (or when the remote asked), or fail after the last attempt.
fn outcome_of_error(ctx: &Ctx, effect: &entity::effects::Model, err: EffectError) -> EffectOutcome {
    let attempt = effect.attempts + 1;
    match err {
        EffectError::Permanent(error) => EffectOutcome::Failed { error },
        EffectError::Transient { message, .. }
            if attempt as u32 >= ctx.config.effects.max_attempts =>
        {
            EffectOutcome::Failed {
                error: format!("{message} (after {attempt} attempts)"),
            }
        }
        EffectError::Transient {
            message,
            retry_after,
        } => {
            let backoff = ctx.config.effects.backoff().after_attempt(attempt as u32);
            // Up to a quarter more, so that many retries do not arrive together.
            let jitter = rand::rng().random_range(0..=ms(backoff) / 4);
            let wait = match retry_after {
                Some(asked) => ms(asked).max(ms(backoff)),
                None => ms(backoff) + jitter,
            };
            EffectOutcome::Retry {
                error: message,
                at: ctx.now() + wait,
            }
        }
    }
}

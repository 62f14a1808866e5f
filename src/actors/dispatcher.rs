//! The Dispatcher: takes due queued jobs while this node has room, and asks the
//! Supervisor to start a Monitor for each.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::supervisor::SupervisorMsg;
use super::{Ctx, ProbeEvent, Ticker, pass_or_default};
use crate::store::Dispatched;

/// How often the Dispatcher looks for due jobs when nothing kicks it.
pub const DISPATCHER_INTERVAL_DEFAULT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DispatcherMsg {
    /// The periodic look.
    Tick,
    /// Look now: a claim queued a job, or a submit arrived.
    Kick,
}

pub struct DispatcherArgs {
    pub ctx: Ctx,
    pub supervisor: ActorRef<SupervisorMsg>,
    pub interval: Duration,
}

pub struct DispatcherState {
    args: DispatcherArgs,
    _ticker: Ticker,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchResult {
    /// (job id, run id) of every job taken.
    pub dispatched: Vec<(i64, i64)>,
}

pub struct Dispatcher;

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherState;
    type Arguments = DispatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DispatcherArgs,
    ) -> Result<DispatcherState, ActorProcessingErr> {
        let ticker = Ticker::start(&myself, args.interval, || DispatcherMsg::Tick);
        let _ = myself.send_message(DispatcherMsg::Kick);
        Ok(DispatcherState {
            args,
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: DispatcherMsg,
        state: &mut DispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.args.ctx;
        let result = pass_or_default("dispatcher", run_once(ctx, &state.args.supervisor).await);
        if msg == DispatcherMsg::Tick {
            record_gauges(ctx).await;
        }
        ctx.report(ProbeEvent::Dispatcher {
            msg,
            dispatched: result.dispatched,
        });
        Ok(())
    }
}

/// One pass: dispatch due jobs until this node runs `max_concurrent_jobs` agents.
pub async fn run_once(
    ctx: &Ctx,
    supervisor: &ActorRef<SupervisorMsg>,
) -> Result<DispatchResult, crate::store::StoreError> {
    let mut result = DispatchResult::default();
    while ctx.watched.len() < ctx.config.max_concurrent_jobs {
        let Some(d) = ctx
            .store
            .dispatch(
                &ctx.node_id,
                &ctx.config.log_dir,
                Some(&ctx.policy),
                ctx.now(),
            )
            .await?
        else {
            break;
        };
        if !start(ctx, supervisor, d.clone()) {
            release(ctx, &d).await;
            break;
        }
        result.dispatched.push((d.job.id, d.run.id));
    }
    Ok(result)
}

/// Reserves the place of a taken job and asks the Supervisor for its Monitor; false when
/// the Supervisor is gone (the caller releases the job).
pub(super) fn start(ctx: &Ctx, supervisor: &ActorRef<SupervisorMsg>, d: Dispatched) -> bool {
    crate::task_span!("dispatch", d.task, d.job, d.run.id)
        .in_scope(|| tracing::info!("dispatched"));
    // Reserve the slot before the Monitor exists, so the count is right at once.
    ctx.watched.insert(d.run.id, d.job.id);
    supervisor
        .send_message(SupervisorMsg::StartMonitor(
            Box::new(d),
            super::monitor::MonitorMode::Fresh,
        ))
        .is_ok()
}

/// The queue gauges: two counts, taken on the periodic tick only (a kick follows every
/// won claim, and must stay cheap).
async fn record_gauges(ctx: &Ctx) {
    if let Ok((queued, running)) = ctx.store.queue_depth().await {
        ctx.metrics.queue_depth.record(queued, &[]);
        ctx.metrics.running_jobs.record(running, &[]);
    }
}

/// Puts a job taken for this node back in the queue when its Monitor cannot start (the
/// node is stopping), and frees its place: its agent never ran, so no attempt is spent.
pub async fn release(ctx: &Ctx, d: &Dispatched) {
    release_because(ctx, d, "the node stopped before the run's agent started").await;
}

/// [`release`], saying why in the `job_queued` event.
pub async fn release_because(ctx: &Ctx, d: &Dispatched, reason: &str) {
    ctx.watched.remove(d.run.id);
    match ctx.store.release_run(d, reason, ctx.now()).await {
        Ok(true) => {
            tracing::info!(task = %d.task.key, stage = %d.job.stage, run_id = d.run.id, "job put back in the queue: {reason}")
        }
        Ok(false) => {}
        // The run is left to the Reaper's rules.
        Err(e) => {
            tracing::warn!(error = %e, run_id = d.run.id, "cannot put the job back in the queue")
        }
    }
}

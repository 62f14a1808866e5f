//! The PlanePoller: deliveries get lost, so every `plane.poll_interval` it lists the
//! project's work items in `plane.trigger_state` and submits those that have no task yet,
//! through the same application-level submit as the webhook (a task that exists is left
//! alone). With several nodes, only the holder of the `plane_poll` lease polls; another
//! node takes over when the holder stops renewing it.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;

use super::{Ctx, ProbeEvent, Ticker, pass_or_default};
use crate::clock::ms;
use crate::model::{Origin, TaskKey};
use crate::store::StoreError;
use crate::tasks::{self, SubmitRequest, TaskError};

/// The lease that one node at a time holds to poll.
pub const PLANE_POLLER_LEASE: &str = "plane_poll";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanePollerMsg {
    Tick,
}

pub struct PlanePollerArgs {
    pub ctx: Ctx,
    pub interval: Duration,
}

pub struct PlanePollerState {
    args: PlanePollerArgs,
    _ticker: Ticker,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PollResult {
    /// False when another node holds the lease: this node did not poll.
    pub polled: bool,
    /// Work items found in the trigger state.
    pub n_listed: usize,
    pub n_submitted: usize,
    /// Items skipped: a key that is not a valid task key, or a submit that failed.
    pub n_skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Plane: {0}")]
    Plane(#[from] crate::effects::EffectError),
}

pub struct PlanePoller;

impl Actor for PlanePoller {
    type Msg = PlanePollerMsg;
    type State = PlanePollerState;
    type Arguments = PlanePollerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PlanePollerArgs,
    ) -> Result<PlanePollerState, ActorProcessingErr> {
        let ticker = Ticker::start(&myself, args.interval, || PlanePollerMsg::Tick);
        let _ = myself.send_message(PlanePollerMsg::Tick);
        Ok(PlanePollerState {
            args,
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        _msg: PlanePollerMsg,
        state: &mut PlanePollerState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.args.ctx;
        let result = pass_or_default("plane_poller", run_once(ctx, state.args.interval).await);
        if result.n_submitted > 0 {
            tracing::info!(
                listed = result.n_listed,
                submitted = result.n_submitted,
                "Plane poll submitted work items whose delivery was lost"
            );
        }
        ctx.report(ProbeEvent::PlanePoller { result });
        Ok(())
    }
}

/// One poll, when this node holds (or takes) the lease.
pub async fn run_once(ctx: &Ctx, interval: Duration) -> Result<PollResult, PollError> {
    let Some(trigger) = ctx
        .config
        .plane
        .as_ref()
        .and_then(|p| p.trigger_state.clone())
    else {
        return Ok(PollResult::default());
    };
    // The lease outlives two passes, so a live holder keeps it and a dead one loses it.
    let ttl = ms(interval) * 2;
    if !ctx
        .store
        .take_lease(PLANE_POLLER_LEASE, &ctx.node_id, ttl, ctx.now())
        .await?
    {
        return Ok(PollResult::default());
    }
    let items = ctx.effector.plane_work_items_in(&trigger).await?;
    let mut result = PollResult {
        polled: true,
        n_listed: items.len(),
        ..Default::default()
    };
    for item in items {
        let Some(n) = item.sequence_id else {
            result.n_skipped += 1;
            continue;
        };
        let key = match TaskKey::parse(ctx.effector.plane_key_of(n).await?) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, plane_issue = %item.id, "work item skipped");
                result.n_skipped += 1;
                continue;
            }
        };
        let request = SubmitRequest {
            title: Some(item.name.clone()),
            description: Some(item.description()),
            plane_issue_id: Some(item.id.clone()),
            pipeline: ctx
                .config
                .pipeline_for_labels(&crate::effects::plane::LabelRef::names(&item.labels)),
            ..SubmitRequest::new(key.clone())
        };
        match tasks::submit(&ctx.store, &ctx.config, request, Origin::Webhook, ctx.now()).await {
            Ok(_) => result.n_submitted += 1,
            Err(TaskError::Store(StoreError::TaskExists(_))) => {}
            Err(e) => {
                tracing::warn!(error = %e, task = %key, "work item not submitted");
                result.n_skipped += 1;
            }
        }
    }
    Ok(result)
}

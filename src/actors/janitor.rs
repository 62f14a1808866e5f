//! The Janitor: every `retention.interval`, one retention pass
//! ([`crate::retention::run_once`]): the worktrees and run logs of tasks that ended long
//! enough ago, the mirror's garbage collection when it is due, and a batch of the
//! database's history (events, runs, settled effects, webhook deliveries). Each node cleans its
//! own disk (a second node is a second host with its own workspaces).

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::{Ctx, ProbeEvent, Ticker, pass_or_default};
use crate::retention::{self, GcReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JanitorMsg {
    Tick,
}

pub struct JanitorArgs {
    pub ctx: Ctx,
}

pub struct JanitorState {
    args: JanitorArgs,
    _ticker: Ticker,
}

pub struct Janitor;

impl Actor for Janitor {
    type Msg = JanitorMsg;
    type State = JanitorState;
    type Arguments = JanitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: JanitorArgs,
    ) -> Result<JanitorState, ActorProcessingErr> {
        let interval = args.ctx.config.retention.interval;
        let ticker = Ticker::start(&myself, interval, || JanitorMsg::Tick);
        Ok(JanitorState {
            args,
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        _msg: JanitorMsg,
        state: &mut JanitorState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.args.ctx;
        let report = pass_or_default("janitor", run_once(ctx).await);
        ctx.report(ProbeEvent::Janitor {
            report: report.clone(),
        });
        Ok(())
    }
}

/// One pass, logged when it removed anything.
pub async fn run_once(ctx: &Ctx) -> Result<GcReport, crate::store::StoreError> {
    let config = &ctx.config;
    let mirror_due = retention::mirror_gc_due(&config.workspace_root, config.retention.mirror_gc);
    let report = retention::run_once(&ctx.store, config, ctx.now(), false, mirror_due).await?;
    if !report.is_empty() {
        tracing::info!(
            worktrees = report.worktrees.len(),
            logs = report.logs.len(),
            mirror_gc = report.mirror.is_some(),
            freed_bytes = report.freed(),
            history_tasks = report.history.tasks,
            events = report.history.events,
            runs = report.history.runs,
            deliveries = report.history.deliveries,
            "retention pass removed what ended tasks left"
        );
    }
    for e in &report.errors {
        tracing::warn!(error = %e, "retention pass could not remove something; next pass tries again");
    }
    Ok(report)
}

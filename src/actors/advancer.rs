//! The Advancer: THE single writer of job transitions after dispatch. It decides claims
//! in the order it receives them, those waiting together in one transaction (group
//! commit), and runs only the fenced transaction; slow work (gates, git, HTTP) happens in
//! the sender before the claim is sent.
//!
//! Senders (the Monitor, the Reaper, adoption) go through [`send_claim`].

use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort};
use tracing::Instrument;
use tracing::instrument::WithSubscriber;

use super::dispatcher::DispatcherMsg;
use super::supervisor::SupervisorMsg;
use super::{Ctx, ProbeEvent};
use crate::model::{Claim, ClaimOutcome, Decider, JobStatus};
use crate::store::{ClaimItem, Dispatched, GroupError, RunExit, Taker};

/// How often a claim is tried when the database does not answer.
const ADVANCER_CLAIM_TRIES: u32 = 5;
/// The wait before the second try; it doubles with each try.
const ADVANCER_CLAIM_BACKOFF: Duration = Duration::from_millis(200);
/// The most claims decided in one transaction.
pub const ADVANCER_BATCH_MAX: usize = 64;

pub enum AdvancerMsg {
    /// Finalize a run, writing its exit first when one is given; the reply is `Won`,
    /// `Lost` or `AlreadyAdvanced`, or the database error that kept the claim from being
    /// decided (the sender may try again).
    Claim(
        Claim,
        Option<Box<RunExit>>,
        RpcReplyPort<Result<ClaimOutcome, String>>,
    ),
    /// Decide the claims received so far; sent by the Advancer to itself behind the
    /// first of them, so that every claim already waiting joins its transaction.
    Decide,
}

pub struct AdvancerArgs {
    pub ctx: Ctx,
    /// Told to look for work after a claim freed a place it did not hand off; while it
    /// runs, a won claim of this node's Monitor may take the task's next job.
    pub dispatcher: Option<ActorRef<DispatcherMsg>>,
    /// Asked for the Monitor of a job a claim took for this node (the hand-off), at once:
    /// not behind a pass of the Dispatcher's.
    pub supervisor: Option<ActorRef<SupervisorMsg>>,
    /// Told to look at the outbox after a claim wrote effects.
    pub effect_worker: Option<ActorRef<super::effect_worker::EffectWorkerMsg>>,
}

pub struct AdvancerState {
    args: AdvancerArgs,
    /// Claims received and not decided yet, in order.
    waiting: Vec<Waiting>,
    /// Where the spans and events of its handling of a message go: the collector of the
    /// thread that spawned it (it may run on a thread of its own, [`spawn_linked`]).
    dispatch: tracing::Dispatch,
}

/// A claim waiting to be decided, with its reply and the span it is decided in (a child
/// of its sender's, in the task's trace).
struct Waiting {
    claim: Claim,
    exit: Option<Box<RunExit>>,
    reply: RpcReplyPort<Result<ClaimOutcome, String>>,
    span: tracing::Span,
}

type Decided = Result<(ClaimOutcome, Option<Dispatched>), String>;

pub struct Advancer;

impl Actor for Advancer {
    type Msg = AdvancerMsg;
    type State = AdvancerState;
    type Arguments = AdvancerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: AdvancerArgs,
    ) -> Result<AdvancerState, ActorProcessingErr> {
        Ok(AdvancerState {
            args,
            waiting: Vec::new(),
            dispatch: tracing::dispatcher::get_default(Clone::clone),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: AdvancerMsg,
        state: &mut AdvancerState,
    ) -> Result<(), ActorProcessingErr> {
        let dispatch = state.dispatch.clone();
        on_message(myself, msg, state)
            .with_subscriber(dispatch)
            .await;
        Ok(())
    }
}

/// [`Advancer`]'s handling of `msg`: a claim waits for the next `Decide`, which decides
/// those waiting.
async fn on_message(myself: ActorRef<AdvancerMsg>, msg: AdvancerMsg, state: &mut AdvancerState) {
    match msg {
        AdvancerMsg::Claim(claim, exit, reply) => {
            let span = tracing::info_span!(
                "claim",
                job_id = claim.job_id,
                run_id = claim.run_id,
                decided_by = claim.decided_by.as_str(),
                outcome = tracing::field::Empty,
                group = tracing::field::Empty,
                together = tracing::field::Empty,
                elapsed_us = tracing::field::Empty,
            );
            state.waiting.push(Waiting {
                claim,
                exit,
                reply,
                span,
            });
            if state.waiting.len() == 1 {
                decide_later(&myself);
            }
        }
        AdvancerMsg::Decide => {
            let n = state.waiting.len().min(ADVANCER_BATCH_MAX);
            let batch: Vec<Waiting> = state.waiting.drain(..n).collect();
            if !state.waiting.is_empty() {
                decide_later(&myself);
            }
            let group = batch.len();
            let started = std::time::Instant::now();
            let (decided, together) = decide(&state.args, &batch).await;
            let elapsed_us = started.elapsed().as_micros() as u64;
            for (w, outcome) in batch.into_iter().zip(decided) {
                let span = w.span.clone();
                span.record("group", group);
                span.record("together", together);
                span.record("elapsed_us", elapsed_us);
                let outcome = after_claim(&state.args, &w, outcome).instrument(span).await;
                state.args.ctx.report(ProbeEvent::Advancer {
                    claim: w.claim,
                    outcome: outcome.clone(),
                    group,
                    together,
                    elapsed_us,
                });
                let _ = w.reply.send(outcome);
            }
        }
    }
}

/// Spawns a node's Advancer, linked to `supervisor`, on the thread of its own that the
/// process's Advancers share ([`own_thread`]).
pub async fn spawn_linked(
    args: AdvancerArgs,
    supervisor: ActorCell,
) -> Result<ActorRef<AdvancerMsg>, ActorProcessingErr> {
    // Its start (`pre_start`) runs in this future: with the spawning thread's collector.
    let spawn = async move {
        let mut args = args;
        // Its PostgreSQL connections are opened, and driven, on its thread.
        args.ctx.store = args.ctx.store.own_pool(ADVANCER_CONNECTIONS).await?;
        let (advancer, _) = Actor::spawn_linked(None, Advancer, args, supervisor).await?;
        Ok::<_, ActorProcessingErr>(advancer)
    };
    own_thread()?.spawn(spawn.with_current_subscriber()).await?
}

/// The connections of an Advancer's own pool on PostgreSQL: its group's transaction, and
/// a job it puts back meanwhile.
const ADVANCER_CONNECTIONS: u32 = 2;

/// The runtime of the Advancers' own thread, started at the first: one thread that runs
/// no other actor. The claims of a node wait for its one Advancer, so an answer it waits
/// for is taken up at once, not behind the tasks the runtime's workers are busy with (a
/// Monitor's spawn, a dispatch): SQLite's connections answer from threads of their own,
/// and on PostgreSQL, where a connection is driven by the runtime that opened it, the
/// Advancer has a pool of its own ([`Store::own_pool`](crate::store::Store::own_pool)),
/// opened here. It is never shut down: a pool's connection may outlive its Advancer a
/// moment (its return to the pool runs here).
fn own_thread() -> std::io::Result<tokio::runtime::Handle> {
    static OWN: std::sync::Mutex<Option<tokio::runtime::Handle>> = std::sync::Mutex::new(None);
    let mut own = OWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = own.as_ref() {
        return Ok(handle.clone());
    }
    // The runtime is made, and runs, on the thread: the thread that starts it is no more
    // than a moment away from its handle.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("baton-advancer".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(runtime) => {
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    let handle = rx
        .recv()
        .map_err(|_| std::io::Error::other("the Advancers' thread ended at its start"))??;
    *own = Some(handle.clone());
    Ok(handle)
}

/// Sends the Advancer its `Decide`, behind the claims already waiting; it carries no
/// span (the decision is each claim's, in its own).
fn decide_later(myself: &ActorRef<AdvancerMsg>) {
    let _ = tracing::Span::none().in_scope(|| myself.send_message(AdvancerMsg::Decide).is_ok());
}

/// Decides `batch` in one transaction; when that fails before its commit, each claim on
/// its own, so that one claim's error is not the others'. True when the batch's own
/// transaction decided it. A failed commit is every claim's error: what it wrote is not
/// known, and a claim decided again could not tell its own writes from another's.
async fn decide(args: &AdvancerArgs, batch: &[Waiting]) -> (Vec<Decided>, bool) {
    let ctx = &args.ctx;
    // A Monitor's run was this node's: its place goes to the task's next stage, while
    // the Dispatcher runs (not once the node is stopping) and the node is within
    // `max_concurrent_jobs` (adopted agents may have put it over).
    let hand_off = args.supervisor.is_some()
        && dispatching(args)
        && ctx.watched.len() <= ctx.config.max_concurrent_jobs;
    let taker = Taker {
        node_id: &ctx.node_id,
        log_dir: &ctx.config.log_dir,
        policy: Some(&ctx.policy),
    };
    let items: Vec<ClaimItem> = batch
        .iter()
        .map(|w| ClaimItem {
            claim: &w.claim,
            exit: w.exit.as_deref(),
            taker: (hand_off && w.claim.decided_by == Decider::Monitor).then_some(taker),
        })
        .collect();
    let now = ctx.now();
    match ctx.store.claim_all(&items, &ctx.policy, now).await {
        Ok(decided) => (decided.into_iter().map(Ok).collect(), true),
        Err(GroupError::Commit { error, handed }) => {
            tracing::warn!(error = %error, claims = items.len(), "claims not decided: their commit failed");
            // Had it been written after all, the jobs handed off would run with no
            // Monitor: they go back to the queue (a release changes nothing otherwise).
            for d in &handed {
                let reason = "the claim that took it for this node did not learn its commit";
                super::dispatcher::release_because(ctx, d, reason).await;
            }
            let e = format!("the claims' commit: {error}");
            (items.iter().map(|_| Err(e.clone())).collect(), true)
        }
        Err(e) if items.len() == 1 => (vec![Err(e.to_string())], true),
        Err(e) => {
            tracing::warn!(error = %e, claims = items.len(), "claims not decided together; deciding each on its own");
            let mut decided = Vec::with_capacity(items.len());
            for item in &items {
                let one = ctx
                    .store
                    .claim_and_take(item.claim, item.exit, &ctx.policy, now, item.taker)
                    .await;
                decided.push(one.map_err(|e| e.to_string()));
            }
            (decided, false)
        }
    }
}

/// What follows a decided claim: its log line and metrics, then for a won one the
/// EffectWorker's kick, the freed place (to the handed job, or the Dispatcher's kick).
async fn after_claim(
    args: &AdvancerArgs,
    w: &Waiting,
    decided: Decided,
) -> Result<ClaimOutcome, String> {
    let ctx = &args.ctx;
    let claim = &w.claim;
    let (outcome, handed) = match decided {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "claim not decided");
            return Err(e);
        }
    };
    let m = &ctx.metrics;
    let by = crate::telemetry::kv("decided_by", claim.decided_by.as_str());
    let label = outcome.label();
    m.claims
        .add(1, &[by.clone(), crate::telemetry::kv("outcome", label)]);
    tracing::Span::current().record("outcome", label);
    let ClaimOutcome::Won(won) = &outcome else {
        tracing::info!(outcome = ?outcome, "claim lost");
        return Ok(outcome);
    };
    if won.job_status == JobStatus::Queued {
        m.retries.add(1, &[]);
    } else {
        m.advances.add(1, &[by]);
    }
    tracing::info!(
        verdict = %claim.verdict.outcome(),
        job_status = %won.job_status,
        next_stage = won.next_job.as_ref().map(|j| j.stage.as_str()),
        handed_off = handed.is_some(),
        task_status = won.task_status.map(|s| s.as_str()),
        "claim won"
    );
    if won.effects > 0
        && let Some(w) = &args.effect_worker
    {
        // A kick carries no span: the woken actor's work is not this claim's.
        let _ = tracing::Span::none()
            .in_scope(|| w.send_message(super::effect_worker::EffectWorkerMsg::Kick));
    }
    // The run is finalized: its slot is free now, not when its Monitor has stopped, so
    // the next stage can start at once; a job handed to this node takes the slot over
    // before it is freed.
    if let Some(next) = &handed {
        ctx.watched.insert(next.run.id, next.job.id);
    }
    ctx.watched.remove(claim.run_id);
    match (handed, &args.supervisor) {
        // Once the node began stopping (since the claim was decided), the job goes back
        // to the queue now, as the stopping Supervisor would put it.
        (Some(next), Some(supervisor)) if dispatching(args) => {
            let started = tracing::Span::none()
                .in_scope(|| super::dispatcher::start(ctx, supervisor, next.clone()));
            if !started {
                super::dispatcher::release(ctx, &next).await;
            }
        }
        (Some(next), _) => super::dispatcher::release(ctx, &next).await,
        (None, _) => {
            if let Some(d) = &args.dispatcher {
                let _ = tracing::Span::none().in_scope(|| d.send_message(DispatcherMsg::Kick));
            }
        }
    }
    Ok(outcome)
}

/// Whether the node's Dispatcher runs: a node that began stopping has stopped it first.
fn dispatching(args: &AdvancerArgs) -> bool {
    args.dispatcher
        .as_ref()
        .is_some_and(|d| d.get_status() == ActorStatus::Running)
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

//! The Supervisor: spawns the Dispatcher, the Advancer, the Reaper, the EffectWorker, the
//! PlanePoller (with Plane), the Janitor and one Monitor per running job (all linked), adopts the runs an earlier boot of this host
//! left behind, and shuts everything down in order. The node's heartbeat is not its
//! business: `service` beats it until the process ends, a shutdown included.
//!
//! It overrides `handle_supervisor_evt`: ractor's default stops a supervisor when any
//! child ends, but a Monitor ending is the normal course of things, and a Monitor that
//! fails is not restarted blindly; its run is left to the Reaper's rules.

use std::collections::HashMap;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use serde_json::json;
use tracing::Instrument;

use super::advancer::{AdvancerArgs, AdvancerMsg, send_claim};
use super::dispatcher::{DISPATCHER_INTERVAL_DEFAULT, Dispatcher, DispatcherArgs, DispatcherMsg};
use super::effect_worker::{EffectWorker, EffectWorkerArgs, EffectWorkerMsg};
use super::janitor::{Janitor, JanitorArgs, JanitorMsg};
use super::monitor::{Monitor, MonitorArgs, MonitorMode, MonitorMsg};
use super::plane_poller::{PlanePoller, PlanePollerArgs, PlanePollerMsg};
use super::reaper::{Reaper, ReaperArgs, ReaperMsg};
use super::{Ctx, ProbeEvent};
use crate::agent;
use crate::model::{Claim, ClaimOutcome, Decider, ReapTier, Verdict};
use crate::store::{Dispatched, KnownLastCommit};

/// How long each core actor gets to stop at shutdown.
const SUPERVISOR_STOP_WAIT: Duration = Duration::from_secs(60);

/// What a Supervisor reports to a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorEvent {
    StartMonitor {
        job_id: i64,
        run_id: i64,
        mode: MonitorMode,
    },
    Shutdown {
        stop_agents: bool,
    },
    MonitorFailed {
        run_id: i64,
    },
}

pub enum SupervisorMsg {
    StartMonitor(Box<Dispatched>, MonitorMode),
    /// Stop dispatching and reaping, then stop the monitors: with `stop_agents` they
    /// terminate their agents within `shutdown.grace` first, else the agents are left
    /// alive for the next start to adopt.
    Shutdown {
        stop_agents: bool,
        reply: RpcReplyPort<()>,
    },
    /// Every `node.heartbeat_interval`: one read tells which of this node's runs no
    /// longer run their job (a cancel, a claim by another), and their Monitors are told.
    /// One query a node, not a timer and a query an agent.
    CheckRuns,
}

pub struct SupervisorArgs {
    pub ctx: Ctx,
    pub dispatcher_interval: Duration,
}

impl SupervisorArgs {
    pub fn new(ctx: Ctx) -> Self {
        SupervisorArgs {
            ctx,
            dispatcher_interval: DISPATCHER_INTERVAL_DEFAULT,
        }
    }
}

pub struct SupervisorState {
    ctx: Ctx,
    dispatcher: Option<ActorRef<DispatcherMsg>>,
    reaper: Option<ActorRef<ReaperMsg>>,
    /// Only with Plane, a trigger state and a poll interval.
    plane_poller: Option<ActorRef<PlanePollerMsg>>,
    janitor: Option<ActorRef<JanitorMsg>>,
    effect_worker: Option<ActorRef<EffectWorkerMsg>>,
    advancer: ActorRef<AdvancerMsg>,
    monitors: HashMap<ActorId, (ActorRef<MonitorMsg>, i64)>,
    _check: super::Ticker,
    shutting_down: bool,
}

pub struct Supervisor;

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let ctx = args.ctx;
        let ctx_interval = ctx.config.node.heartbeat_interval;
        let cell = myself.get_cell();
        let (dispatcher, _) = Actor::spawn_linked(
            None,
            Dispatcher,
            DispatcherArgs {
                ctx: ctx.clone(),
                supervisor: myself.clone(),
                interval: args.dispatcher_interval,
            },
            cell.clone(),
        )
        .await?;
        let (effect_worker, _) = Actor::spawn_linked(
            None,
            EffectWorker,
            EffectWorkerArgs { ctx: ctx.clone() },
            cell.clone(),
        )
        .await?;
        let advancer = super::advancer::spawn_linked(
            AdvancerArgs {
                ctx: ctx.clone(),
                dispatcher: Some(dispatcher.clone()),
                supervisor: Some(myself.clone()),
                effect_worker: Some(effect_worker.clone()),
            },
            cell.clone(),
        )
        .await?;
        let (reaper, _) = Actor::spawn_linked(
            None,
            Reaper,
            ReaperArgs {
                ctx: ctx.clone(),
                advancer: advancer.clone(),
            },
            cell.clone(),
        )
        .await?;
        let poll = ctx
            .config
            .plane
            .as_ref()
            .filter(|p| p.trigger_state.is_some() && !p.poll_interval.is_zero())
            .map(|p| p.poll_interval);
        let plane_poller = match poll {
            Some(interval) => {
                let args = PlanePollerArgs {
                    ctx: ctx.clone(),
                    interval,
                };
                Some(
                    Actor::spawn_linked(None, PlanePoller, args, cell.clone())
                        .await?
                        .0,
                )
            }
            None => None,
        };
        let (janitor, _) = Actor::spawn_linked(
            None,
            Janitor,
            JanitorArgs { ctx: ctx.clone() },
            cell.clone(),
        )
        .await?;
        Ok(SupervisorState {
            janitor: Some(janitor),
            ctx,
            dispatcher: Some(dispatcher),
            reaper: Some(reaper),
            plane_poller,
            effect_worker: Some(effect_worker),
            advancer,
            monitors: HashMap::new(),
            shutting_down: false,
            _check: super::Ticker::start(&myself, ctx_interval, || SupervisorMsg::CheckRuns),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        adopt_orphans(&myself, state).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::StartMonitor(d, mode) => {
                state
                    .ctx
                    .report(ProbeEvent::Supervisor(SupervisorEvent::StartMonitor {
                        job_id: d.job.id,
                        run_id: d.run.id,
                        mode,
                    }));
                if state.shutting_down {
                    // Taken just before the shutdown: a fresh run's agent never started, so
                    // its job goes back to the queue; an adopted one is left to adoption.
                    state.ctx.watched.remove(d.run.id);
                    if mode == MonitorMode::Fresh {
                        super::dispatcher::release(&state.ctx, &d).await;
                    }
                    return Ok(());
                }
                let run_id = d.run.id;
                state.ctx.watched.insert(run_id, d.job.id);
                let spawned = Actor::spawn_linked(
                    None,
                    Monitor,
                    MonitorArgs {
                        ctx: state.ctx.clone(),
                        dispatched: *d,
                        mode,
                        advancer: state.advancer.clone(),
                    },
                    myself.get_cell(),
                )
                // A Monitor's lifetime is its own: it does not belong to the span of whoever
                // asked for it (ractor parents an actor's span to the current one).
                .instrument(tracing::Span::none())
                .await;
                match spawned {
                    Ok((m, _)) => {
                        state.monitors.insert(m.get_id(), (m, run_id));
                    }
                    Err(e) => {
                        state.ctx.watched.remove(run_id);
                        tracing::error!(error = %e, run_id, "cannot start a monitor; the Reaper will finalize the run");
                    }
                }
            }
            SupervisorMsg::CheckRuns => {
                if state.shutting_down || state.monitors.is_empty() {
                    return Ok(());
                }
                let runs: Vec<(i64, i64)> = state.ctx.watched.runs();
                match state.ctx.store.runs_not_current(&runs).await {
                    Ok(gone) => {
                        for (m, run_id) in state.monitors.values() {
                            if gone.contains(run_id) {
                                let _ = m.send_message(MonitorMsg::NotCurrent);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot check the node's runs"),
                }
            }
            SupervisorMsg::Shutdown { stop_agents, reply } => {
                state
                    .ctx
                    .report(ProbeEvent::Supervisor(SupervisorEvent::Shutdown {
                        stop_agents,
                    }));
                state.shutting_down = true;
                if let Some(d) = state.dispatcher.take() {
                    d.unlink(myself.get_cell());
                    let _ = d.stop_and_wait(None, Some(SUPERVISOR_STOP_WAIT)).await;
                }
                if let Some(r) = state.reaper.take() {
                    r.unlink(myself.get_cell());
                    let _ = r.stop_and_wait(None, Some(SUPERVISOR_STOP_WAIT)).await;
                }
                if let Some(p) = state.plane_poller.take() {
                    p.unlink(myself.get_cell());
                    let _ = p.stop_and_wait(None, Some(SUPERVISOR_STOP_WAIT)).await;
                }
                if let Some(j) = state.janitor.take() {
                    j.unlink(myself.get_cell());
                    let _ = j.stop_and_wait(None, Some(SUPERVISOR_STOP_WAIT)).await;
                }
                let monitors: Vec<ActorRef<MonitorMsg>> =
                    state.monitors.values().map(|(m, _)| m.clone()).collect();
                let wait = state.ctx.config.shutdown.grace + Duration::from_secs(30);
                for m in &monitors {
                    let _ = m.send_message(MonitorMsg::Stop { kill: stop_agents });
                }
                for m in monitors {
                    let _ = m.wait(Some(wait)).await;
                }
                if let Some(w) = state.effect_worker.take() {
                    w.unlink(myself.get_cell());
                    let _ = w.stop_and_wait(None, Some(SUPERVISOR_STOP_WAIT)).await;
                }
                let _ = reply.send(());
                // The messages already queued are handled before the Supervisor stops: a
                // Monitor asked for meanwhile (a hand-off) has its job put back above.
                let _ = myself.drain();
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some((_, run_id)) = state.monitors.remove(&cell.get_id()) {
                    state.ctx.watched.remove(run_id);
                } else if !state.shutting_down {
                    tracing::error!(actor = ?cell.get_id(), ?reason, "a core actor stopped; stopping the node");
                    myself.stop(Some("core actor stopped".into()));
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some((_, run_id)) = state.monitors.remove(&cell.get_id()) {
                    // Not restarted blindly: the run is left to the Reaper's rules.
                    state.ctx.watched.remove(run_id);
                    tracing::error!(run_id, error = %err, "monitor failed; its run is left to the Reaper");
                    state
                        .ctx
                        .report(ProbeEvent::Supervisor(SupervisorEvent::MonitorFailed {
                            run_id,
                        }));
                } else if !state.shutting_down {
                    tracing::error!(actor = ?cell.get_id(), error = %err, "a core actor failed; stopping the node");
                    myself.stop(Some("core actor failed".into()));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// At start: agents of this host still running for runs that are no longer their job's
/// current run (cancelled or taken over while this host was down) are stopped, and
/// their exit recorded, so that two agents never work in one workspace.
async fn stop_stale_agents(ctx: &Ctx) {
    let stale = match ctx.store.stale_runs(&ctx.hostname).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for stale agents");
            return;
        }
    };
    for (task_id, run) in stale {
        let log = std::path::Path::new(&run.log_path);
        // Only an agent its recorded identity names is stopped: a bare pid recorded long ago may
        // belong to a stranger by now.
        let identified = agent::Identity::of_run(log).filter(|id| id.alive());
        let stopped = match identified.map(|id| id.pid) {
            Some(pid) => {
                agent::terminate_group(pid, agent::AGENT_KILL_GRACE_DEFAULT).await;
                tracing::warn!(
                    run_id = run.id,
                    pid,
                    "stopped an agent whose run is no longer current"
                );
                true
            }
            None => false,
        };
        let status = agent::read_exit(log);
        let detail = json!({
            "recorded_by": "start", "stopped": stopped,
            "reason": "the run is no longer its job's current run",
            "signal": status.as_ref().and_then(|s| s.signal),
        });
        let code = status.map_or(-1, |s| s.code);
        if let Err(e) = ctx
            .store
            .record_exit(task_id, &run, code, detail, ctx.now())
            .await
        {
            tracing::warn!(error = %e, run_id = run.id, "cannot record a stale run's end");
        }
    }
}

/// Adoption: runs of an earlier boot of this host whose job still runs with them. A live
/// agent (or one that ended and left its exit status) gets a Monitor that watches it to
/// the end; it is never started again. An agent gone without an exit status is lost.
async fn adopt_orphans(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState) {
    let ctx = state.ctx.clone();
    let orphans = match ctx.store.orphaned_runs(&ctx.hostname, &ctx.node_id).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for runs to adopt; the Reaper will handle them");
            return;
        }
    };
    stop_stale_agents(&ctx).await;
    for rj in orphans {
        // Another baton of this host that still runs keeps its own runs. A pid equal to
        // ours is not that baton: it is an earlier boot whose pid this one reuses (pid 1
        // of a container).
        let own_pid = std::process::id() as i32;
        let node_gone =
            rj.node_stopped || rj.node_pid.is_none_or(|p| p == own_pid || !agent::alive(p));
        if !node_gone {
            continue;
        }
        let Some(run) = rj.run else { continue };
        if run.exited_at.is_some() {
            // Its exit is recorded: finalization was under way; tier 2 handles it after grace.
            continue;
        }
        let log = std::path::Path::new(&run.log_path);
        // The recorded exit wins; else the very agent of this run (by its recorded identity,
        // even when the pid was never recorded) must still run. The exit is read after
        // the liveness: a shim that records the exit and ends in between is seen ended
        // with its exit, not gone without one.
        let pid = agent::live_agent(log, run.pid);
        let exit = agent::read_exit(log);
        let pid = pid.or_else(|| exit.as_ref().and(run.pid));
        if exit.is_some() || pid.is_some() {
            let mut run = run;
            run.pid = pid.or(run.pid);
            let d = Dispatched {
                task: rj.task,
                job: rj.job,
                run,
                last_commit: KnownLastCommit::Unknown,
            };
            ctx.watched.insert(d.run.id, d.job.id);
            let _ =
                myself.send_message(SupervisorMsg::StartMonitor(Box::new(d), MonitorMode::Adopt));
        } else {
            let claim = Claim {
                job_id: rj.job.id,
                run_id: run.id,
                verdict: Verdict::Lost {
                    reason: "the agent did not survive the restart and left no exit status".into(),
                },
                decided_by: Decider::Reaper(ReapTier::LostAgent),
                commit_sha: None,
                feedback: None,
                usage: None,
            };
            // Reaped like tier 1 by the Reaper: in the task's trace, and counted.
            let span = crate::task_span!("reap", rj.task, rj.job, run.id);
            let outcome = send_claim(&state.advancer, claim)
                .instrument(span.clone())
                .await;
            if matches!(outcome, Some(ClaimOutcome::Won(_))) {
                let tier = ReapTier::LostAgent.as_str();
                ctx.metrics
                    .reaps
                    .add(1, &[crate::telemetry::kv("tier", tier)]);
            }
            span.in_scope(|| {
                tracing::info!(outcome = ?outcome, detail = %json!({"pid": pid}), "orphaned run was lost")
            });
        }
    }
}

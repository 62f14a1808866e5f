//! The Monitor: one per running job. It prepares the workspace, starts the agent through
//! the shim, enforces the stage timeout (a one-shot timer; the node's heartbeat and its
//! check for cancelled runs are the Supervisor's, one for all its runs), and when the agent ends it
//! records the exit FIRST (with the claim, when no gate command runs between them), then
//! evaluates the gate, auto-commits, and sends the claim to the Advancer. A Monitor that
//! fails is not restarted: its run is left to the Reaper.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use super::advancer::AdvancerMsg;
use super::{Ctx, ProbeEvent};
use crate::agent::{self, AgentSpec, ExitStatus};
use crate::config::StageSettings;
use crate::gate::Vars;
use crate::model::ClaimOutcome;
use crate::prompt::PROMPT_ARG_MAX;
use crate::store::{Dispatched, Started};
use crate::workspace;

/// How long after its start an agent's start is recorded (with its exit instead, when
/// it ends sooner): short stages cost one write less.
pub const RUN_STARTED_RECORD_DELAY: Duration = Duration::from_millis(250);

/// How often an adopted agent (not baton's child) is checked for its end.
pub const MONITOR_ADOPTED_POLL_DEFAULT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// A freshly dispatched run: start the agent.
    Fresh,
    /// A run of an earlier boot of this host: watch the agent that already runs (or
    /// already ended); never start it again.
    Adopt,
}

#[derive(Debug)]
pub enum MonitorMsg {
    /// Prepare and start (or adopt) the agent.
    Start,
    /// The job no longer runs with this run (a cancel, a claim by another): the
    /// Supervisor's check of the node's runs found it.
    NotCurrent,
    /// Record the agent's start, unless its exit came first.
    RecordStart,
    /// The stage timeout passed.
    Timeout,
    /// The agent ended (None: it ended without leaving an exit status).
    Exited(Option<ExitStatus>),
    /// The node shuts down: stop watching; with `kill`, terminate the agent first.
    Stop { kill: bool },
}

/// What a Monitor reports to a probe: each message it handled, and its claim's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    Start,
    NotCurrent,
    RecordStart,
    Timeout,
    /// The agent ended, with its exit code when it left one.
    Exited(Option<i32>),
    Stop {
        kill: bool,
    },
    /// The claim was sent; `None` when it could not be decided.
    Claimed(Option<ClaimOutcome>),
}

impl MonitorMsg {
    fn event(&self) -> MonitorEvent {
        match self {
            MonitorMsg::Start => MonitorEvent::Start,
            MonitorMsg::NotCurrent => MonitorEvent::NotCurrent,
            MonitorMsg::RecordStart => MonitorEvent::RecordStart,
            MonitorMsg::Timeout => MonitorEvent::Timeout,
            MonitorMsg::Exited(s) => MonitorEvent::Exited(s.as_ref().map(|s| s.code)),
            MonitorMsg::Stop { kill } => MonitorEvent::Stop { kill: *kill },
        }
    }
}

/// Why a run is ending, when something other than the agent itself ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndCause {
    /// Nothing so far: the agent's own exit decides.
    Running,
    /// The stage timeout passed and the agent was stopped.
    TimedOut,
    /// The job no longer runs with this run (a cancel, or a claim by another).
    Cancelled,
    /// `serve --stop-agents` stopped the agent at shutdown.
    StoppedAtShutdown,
    /// The node shuts down and leaves the agent running for adoption.
    Detached,
}

pub struct MonitorArgs {
    pub ctx: Ctx,
    pub dispatched: Dispatched,
    pub mode: MonitorMode,
    pub advancer: ActorRef<AdvancerMsg>,
}

pub struct MonitorState {
    args: MonitorArgs,
    stage: Option<StageSettings>,
    workspace: Option<PathBuf>,
    /// The commit the task's branch was at when this run's stage began (a fresh run's).
    start_tip: Option<String>,
    pid: Option<i32>,
    /// The agent's start, until it is recorded.
    started: Option<Started>,
    cause: EndCause,
    timers: Vec<tokio::task::AbortHandle>,
    /// The span of the agent's run, in the task's trace; finalization runs inside it.
    span: tracing::Span,
}

mod finalize;
mod prepare;

use finalize::finalize;

pub struct Monitor;

impl Actor for Monitor {
    type Msg = MonitorMsg;
    type State = MonitorState;
    type Arguments = MonitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: MonitorArgs,
    ) -> Result<MonitorState, ActorProcessingErr> {
        let stage = args
            .ctx
            .config
            .stages
            .get(&args.dispatched.job.stage)
            .cloned();
        let d = &args.dispatched;
        let span = crate::task_span!("agent.run", d.task, d.job, d.run.id);
        let _ = myself.send_message(MonitorMsg::Start);
        Ok(MonitorState {
            args,
            stage,
            workspace: None,
            start_tip: None,
            pid: None,
            started: None,
            cause: EndCause::Running,
            timers: Vec::new(),
            span,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut MonitorState,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.timers.drain(..) {
            t.abort();
        }
        state.args.ctx.watched.remove(state.args.dispatched.run.id);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: MonitorMsg,
        state: &mut MonitorState,
    ) -> Result<(), ActorProcessingErr> {
        let d = &state.args.dispatched;
        state.args.ctx.report(ProbeEvent::Monitor {
            job_id: d.job.id,
            run_id: d.run.id,
            event: msg.event(),
        });
        match msg {
            MonitorMsg::Start => {
                let span = state.span.clone();
                start(&myself, state).instrument(span).await
            }
            MonitorMsg::NotCurrent => {
                if state.cause != EndCause::Cancelled {
                    tracing::info!(task = %d.task.key, run_id = d.run.id, "job no longer runs with this run (cancelled); stopping the agent");
                    state.cause = EndCause::Cancelled;
                    if let Some(pid) = state.pid {
                        tokio::spawn(agent::terminate_group(pid, agent::AGENT_KILL_GRACE_DEFAULT));
                    }
                }
            }
            MonitorMsg::RecordStart => record_start(state).await,
            MonitorMsg::Timeout => {
                if let Some(pid) = state.pid {
                    tracing::warn!(task = %d.task.key, stage = %d.job.stage, run_id = d.run.id, pid, "stage timeout: stopping the agent");
                    state.cause = EndCause::TimedOut;
                    tokio::spawn(agent::terminate_group(pid, agent::AGENT_KILL_GRACE_DEFAULT));
                }
            }
            MonitorMsg::Exited(status) => {
                if state.cause != EndCause::Detached {
                    let span = state.span.clone();
                    finalize(state, status, None).instrument(span).await;
                }
                myself.stop(None);
            }
            MonitorMsg::Stop { kill } => {
                if kill {
                    state.cause = EndCause::StoppedAtShutdown;
                    if let Some(pid) = state.pid {
                        let grace = state.args.ctx.config.shutdown.grace;
                        agent::terminate_group(pid, grace).await;
                    }
                    // The waiter sends Exited; finalize then records the stop.
                } else {
                    state.cause = EndCause::Detached;
                    // The next boot adopts the agent by its recorded pid.
                    record_start(state).await;
                    myself.stop(Some("node shutdown".into()));
                }
            }
        }
        Ok(())
    }
}

/// The run's environment (the stage's `env`, the `BATON_*` variables, `TRACEPARENT`), as
/// its agent and its gate command get it.
fn run_env(
    ctx: &super::Ctx,
    d: &Dispatched,
    v: &Vars,
    span: &tracing::Span,
) -> BTreeMap<String, String> {
    // The agent's spans join the run's span, in the task's trace.
    let trace_parent = crate::telemetry::trace_parent_of(span, d.task.trace_parent.as_deref());
    let stage_env = ctx.config.stage_env(&d.job.stage);
    v.env(stage_env, d.job.iteration, Some(trace_parent))
}

fn vars(d: &Dispatched, workspace: &std::path::Path) -> Vars {
    Vars {
        task: d.task.key.clone(),
        stage: d.job.stage.clone(),
        run_id: d.run.id,
        attempt: d.job.attempt,
        workspace: workspace.to_string_lossy().into_owned(),
        prompt: None,
    }
}

async fn start(myself: &ActorRef<MonitorMsg>, state: &mut MonitorState) {
    let ctx = state.args.ctx.clone();
    let d = state.args.dispatched.clone();
    let Some(stage) = state.stage.clone() else {
        let reason = format!("stage {} is not in the config", d.job.stage);
        fail_start(myself, state, reason).await;
        return;
    };
    let log_path = PathBuf::from(&d.run.log_path);
    // An adopted agent works in its worktree: nothing is fetched or moved under it.
    let ws = match state.args.mode {
        MonitorMode::Fresh => prepare::workspace(&ctx, &d, &log_path)
            .await
            .map(|p| (p.path, Some(p.tip))),
        MonitorMode::Adopt => workspace::path_for(&ctx.config.workspace_root, &d.task.key)
            .map(|p| (p, None))
            .map_err(|e| format!("workspace: {e}")),
    };
    let ws = match ws {
        Ok((ws, tip)) => {
            state.start_tip = tip;
            ws
        }
        Err(reason) => {
            fail_start(myself, state, reason).await;
            return;
        }
    };
    state.workspace = Some(ws.clone());

    match state.args.mode {
        MonitorMode::Fresh => {
            let mut v = vars(&d, &ws);
            let mut env = BTreeMap::new();
            if let Some(template) = &stage.template {
                let (text, path) =
                    match prepare::render_prompt(&ctx, &d, template, &ws, &log_path).await {
                        Ok(p) => p,
                        Err(reason) => {
                            fail_start(myself, state, reason).await;
                            return;
                        }
                    };
                if text.len() > PROMPT_ARG_MAX
                    && stage.command.iter().any(|a| a.contains("{prompt}"))
                {
                    let reason = format!(
                        "the rendered prompt is {} KiB, over the {} KiB one argument may carry; \
                         pass the file instead: use \"$BATON_PROMPT_FILE\" in the command rather than {{prompt}}",
                        text.len() / 1024,
                        PROMPT_ARG_MAX / 1024
                    );
                    fail_start(myself, state, reason).await;
                    return;
                }
                env.insert(
                    "BATON_PROMPT_FILE".into(),
                    path.to_string_lossy().into_owned(),
                );
                v.prompt = Some(text);
            }
            env.extend(run_env(&ctx, &d, &v, &state.span));
            let spec = AgentSpec {
                argv: stage.command.iter().map(|a| v.expand(a)).collect(),
                cwd: ws.clone(),
                log_path: log_path.clone(),
                env,
                env_remove: ctx.config.hidden_vars(),
                shim_exe: ctx.shim_exe.clone(),
            };
            let child = match agent::spawn(&spec) {
                Ok(c) => c,
                Err(e) => {
                    fail_start(myself, state, format!("cannot start the agent shim: {e}")).await;
                    return;
                }
            };
            let pid = child.id().map(|p| p as i32).unwrap_or(0);
            state.pid = Some(pid);
            // The start is recorded a moment later, or with the exit if the agent ends
            // first: the shim's recorded identity names the agent meanwhile.
            state.started = Some(Started {
                pid,
                prompt: v.prompt.clone(),
                at: ctx.now(),
            });
            state.timers.push(
                myself
                    .send_after(RUN_STARTED_RECORD_DELAY, || MonitorMsg::RecordStart)
                    .abort_handle(),
            );
            tracing::info!(task = %d.task.key, stage = %d.job.stage, run_id = d.run.id, pid, "agent started");
            let me = myself.clone();
            let log = log_path.clone();
            let waiter = tokio::spawn(async move {
                let mut child = child;
                let _ = child.wait().await;
                let _ = me.send_message(MonitorMsg::Exited(agent::read_exit(&log)));
            });
            state.timers.push(waiter.abort_handle());
        }
        MonitorMode::Adopt => {
            // A start not recorded yet: the shim's recorded identity names the agent.
            let pid = d
                .run
                .pid
                .or_else(|| agent::Identity::of_run(&log_path).map(|id| id.pid))
                .unwrap_or(0);
            state.pid = Some(pid);
            if d.run.pid.is_none() && pid > 0 {
                // The earlier node died before it recorded the start: this one does.
                state.started = Some(Started {
                    pid,
                    prompt: None,
                    at: d.run.started_at,
                });
                let _ = myself.send_message(MonitorMsg::RecordStart);
            }
            if let Err(e) = ctx
                .store
                .adopt_run(d.task.id, &d.run, &ctx.node_id, ctx.now())
                .await
            {
                tracing::warn!(error = %e, run_id = d.run.id, "cannot record the adoption");
            }
            tracing::info!(task = %d.task.key, stage = %d.job.stage, run_id = d.run.id, pid, "run adopted");
            let me = myself.clone();
            let log = log_path.clone();
            let waiter = tokio::spawn(async move {
                // Not our child: its end is awaited on a pidfd (no wake-up per agent),
                // else polled.
                while agent::live_agent(&log, Some(pid)).is_some() {
                    match agent::exit_watch(pid) {
                        Some(watch) if agent::live_agent(&log, Some(pid)).is_some() => {
                            if watch.readable().await.is_err() {
                                tokio::time::sleep(MONITOR_ADOPTED_POLL_DEFAULT).await;
                            }
                        }
                        _ => tokio::time::sleep(MONITOR_ADOPTED_POLL_DEFAULT).await,
                    }
                }
                let _ = me.send_message(MonitorMsg::Exited(agent::read_exit(&log)));
            });
            state.timers.push(waiter.abort_handle());
        }
    }
    let elapsed = Duration::from_millis((ctx.now() - d.run.started_at).max(0) as u64);
    let left = stage.timeout.saturating_sub(elapsed);
    state.timers.push(
        myself
            .send_after(left, || MonitorMsg::Timeout)
            .abort_handle(),
    );
}

/// Records the agent's start if it is not yet; one that cannot be is kept, to be
/// written with the exit.
async fn record_start(state: &mut MonitorState) {
    let Some(started) = state.started.take() else {
        return;
    };
    let d = &state.args.dispatched;
    if let Err(e) = state
        .args
        .ctx
        .store
        .run_started(&d.run, d.task.id, &started)
        .await
    {
        tracing::warn!(error = %e, run_id = d.run.id, "cannot record the agent's start");
        state.started = Some(started);
    }
}

/// The run cannot start (no stage, no workspace, no agent): finalized as a failed
/// attempt, and the Monitor stops.
async fn fail_start(myself: &ActorRef<MonitorMsg>, state: &mut MonitorState, reason: String) {
    // The reason goes into the run's log too, where `baton status KEY` points.
    prepare::log_line(&state.args.dispatched.run.log_path, &reason);
    finalize(state, None, Some(reason)).await;
    myself.stop(None);
}

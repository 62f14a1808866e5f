//! The actors of a baton node and what they share.
//!
//! ```text
//! Supervisor ─┬─ Dispatcher      claims queued jobs, asks the Supervisor to start a Monitor
//!             ├─ Monitor (1/job) runs one agent, records its exit first (or with the claim), gates, commits, claims
//!             ├─ Reaper          periodic; finds runs past their window and claims for them
//!             ├─ Advancer        the single writer of job transitions: claims in order, in groups
//!             ├─ EffectWorker    drains the outbox: push, PR, Plane comment and state
//!             ├─ PlanePoller     with Plane: submits work items whose delivery was lost
//!             └─ Janitor         periodic; removes what ended tasks left on disk ([retention])
//! ```
//!
//! Every actor takes an optional [`Probe`] (None in production) and reports each message
//! it handled, in order, as a typed [`ProbeEvent`], so that tests can assert message
//! sequences.

pub mod advancer;
pub mod dispatcher;
pub mod effect_worker;
pub mod janitor;
pub mod monitor;
pub mod plane_poller;
pub mod reaper;
pub mod supervisor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::ActorRef;

use crate::clock::Clock;
use crate::config::Config;
use crate::effects::Effector;
use crate::model::{Claim, ClaimOutcome};
use crate::policy::Policy;
use crate::store::Store;

/// A test's window into the actors.
pub type Probe = tokio::sync::mpsc::UnboundedSender<ProbeEvent>;

/// One message an actor handled, as a probe reports it.
#[derive(Debug, Clone)]
pub enum ProbeEvent {
    Supervisor(supervisor::SupervisorEvent),
    Dispatcher {
        msg: dispatcher::DispatcherMsg,
        dispatched: Vec<(i64, i64)>,
    },
    Monitor {
        job_id: i64,
        run_id: i64,
        event: monitor::MonitorEvent,
    },
    Reaper {
        result: reaper::ReapResult,
        claims: Vec<(Claim, ClaimOutcome)>,
    },
    /// A tier-2 claim sent by a finalizer of the Reaper, after the stage's gate command.
    ReaperFinalizer {
        claim: Claim,
        outcome: ClaimOutcome,
    },
    Advancer {
        claim: Claim,
        outcome: Result<ClaimOutcome, String>,
        /// How many claims were decided with it, and whether in one transaction (false:
        /// that failed, and each was decided on its own).
        group: usize,
        together: bool,
        /// How long deciding the group took, in microseconds (the same for each claim
        /// of the group).
        elapsed_us: u64,
    },
    EffectWorker {
        msg: effect_worker::EffectWorkerMsg,
        result: effect_worker::EffectResult,
    },
    PlanePoller {
        result: plane_poller::PollResult,
    },
    Janitor {
        report: crate::retention::GcReport,
    },
}

/// The runs that a live Monitor of this process watches (run id -> job id). The Reaper
/// leaves them alone: their monitor is the one to finalize them, and the grace window
/// covers the monitor that dies while finalizing.
#[derive(Debug, Clone, Default)]
pub struct Watched(Arc<Mutex<HashMap<i64, i64>>>);

impl Watched {
    pub fn insert(&self, run_id: i64, job_id: i64) {
        self.lock().insert(run_id, job_id);
    }
    pub fn remove(&self, run_id: i64) {
        self.lock().remove(&run_id);
    }
    pub fn contains(&self, run_id: i64) -> bool {
        self.lock().contains_key(&run_id)
    }
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    /// Every watched run, as (run id, job id).
    pub fn runs(&self) -> Vec<(i64, i64)> {
        self.lock().iter().map(|(r, j)| (*r, *j)).collect()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
        // A panic elsewhere cannot leave the map half-updated: every operation is one call.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What every actor of a node shares.
#[derive(Clone)]
pub struct Ctx {
    pub config: Arc<Config>,
    pub policy: Arc<Policy>,
    pub store: Store,
    pub clock: Clock,
    pub node_id: String,
    pub hostname: String,
    pub watched: Watched,
    pub probe: Option<Probe>,
    /// The metrics instruments.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// baton's own secrets, read once at start.
    pub secrets: crate::config::Secrets,
    /// The node's one effector (HTTP client and Plane state cache), shared with the API.
    pub effector: Effector,
    /// The binary that provides `baton shim` (this executable in production).
    pub shim_exe: std::path::PathBuf,
}

impl Ctx {
    pub fn report(&self, ev: ProbeEvent) {
        if let Some(p) = &self.probe {
            let _ = p.send(ev);
        }
    }

    pub fn now(&self) -> i64 {
        self.clock.now_ms()
    }
}

/// The timer of a periodic actor: sends `msg` every `interval` until dropped, so the
/// actor's state owns it and no `post_stop` is needed to end it.
pub struct Ticker(tokio::task::JoinHandle<()>);

impl Ticker {
    pub fn start<M: ractor::Message>(
        actor: &ActorRef<M>,
        interval: Duration,
        msg: impl Fn() -> M + Send + 'static,
    ) -> Ticker {
        Ticker(actor.send_interval(interval, msg))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a claim carries besides its verdict, read from the run's log off the runtime's
/// threads: the feedback for the job that runs next, and the usage the agent reported.
pub async fn read_handoff(
    verdict: &crate::model::Verdict,
    verdict_text: Option<String>,
    attempt: i32,
    log: &std::path::Path,
) -> (Option<String>, Option<crate::model::Usage>) {
    let (verdict, log) = (verdict.clone(), log.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let feedback = crate::prompt::feedback(&verdict, verdict_text.as_deref(), attempt, &log);
        (feedback, crate::usage::from_log(&log))
    })
    .await
    .unwrap_or_default()
}

/// The result of one pass of a periodic actor, which never dies of a failed pass: the
/// failure is logged with the actor's name and the pass counts as having done nothing.
pub fn pass_or_default<T: Default, E: std::fmt::Display>(actor: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| {
        tracing::warn!(actor, error = %e, "pass failed; trying again at the next tick");
        T::default()
    })
}

//! `baton serve`: one node. Opens the store (applying migrations), registers the node,
//! starts the actors and runs until the shutdown future resolves.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};

use crate::actors::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use crate::actors::{Ctx, Probe, Watched};
use crate::clock::Clock;
use crate::config::Config;
use crate::effects::Effector;
use crate::store::Store;

/// How a node runs; the defaults are production's.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Terminate agents at shutdown instead of leaving them for adoption.
    pub stop_agents: bool,
    pub probe: Option<Probe>,
    /// Defaults to the system clock.
    pub clock: Option<Clock>,
    /// Defaults to [`crate::actors::dispatcher::DISPATCHER_INTERVAL_DEFAULT`].
    pub dispatcher_interval: Option<Duration>,
    /// The metrics instruments; defaults to the global meter provider's.
    pub metrics: Option<Arc<crate::telemetry::Metrics>>,
    /// The Prometheus registry served at `GET /metrics`.
    pub metrics_registry: Option<prometheus::Registry>,
    /// Secrets to use instead of reading the environment (tests).
    pub secrets: Option<crate::config::Secrets>,
    /// The binary that provides `baton shim`; defaults to this executable.
    pub shim_exe: Option<std::path::PathBuf>,
    /// What to do with in-flight tasks that the config orphans.
    pub orphaned: OrphanPolicy,
}

/// What `serve` does with in-flight tasks whose pipeline or stage the config lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OrphanPolicy {
    /// Refuse to start, naming them.
    #[default]
    Refuse,
    /// Fail them, each with a reason naming the vanished pipeline or stage.
    Fail,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot start the actors: {0}")]
    Spawn(String),
    #[error(
        "the config orphans {} in-flight task(s):\n{}\nrestore the pipeline or stage, or start with `--orphaned fail` to fail them",
        .0.len(),
        .0.iter().map(|o| format!("  - {}: {}", o.key, o.reason)).collect::<Vec<_>>().join("\n")
    )]
    Orphaned(Vec<crate::tasks::Orphan>),
    #[error(
        "http.token_env names ${0}, which is not set (or empty): the API would answer anyone; set it, or remove http.token_env to run without a token"
    )]
    MissingApiToken(String),
    #[error(
        "effects.push is off and other hosts serve this database ({}): a stage's work would exist only on the host that ran it, and the next stage could start on another; turn effects.push on, or serve from one host",
        .0.join(", ")
    )]
    SeveralHostsWithoutPush(Vec<String>),
    #[error(transparent)]
    Task(#[from] crate::tasks::TaskError),
    #[error("cannot create {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The hosts other than `hostname` that are alive or restarting within their window.
async fn other_live_hosts(
    store: &Store,
    config: &Config,
    hostname: &str,
    now: i64,
) -> Result<Vec<String>, ServeError> {
    let windows = crate::liveness::LivenessWindows {
        heartbeat_timeout_ms: crate::clock::ms(config.reaper.heartbeat_timeout),
        adoption_window_ms: crate::clock::ms(config.node.adoption_window),
    };
    let hosts = crate::liveness::by_host(&store.nodes().await?, now, windows);
    let mut others: Vec<String> = hosts
        .into_iter()
        .filter(|(h, l)| h != hostname && !l.is_dead())
        .map(|(h, _)| h)
        .collect();
    others.sort();
    Ok(others)
}

/// A running node.
pub struct Node {
    pub node_id: String,
    pub store: Store,
    /// Where the HTTP listener is bound (`http.listen`; port 0 picks a free one).
    pub http_addr: std::net::SocketAddr,
    http_stop: Option<tokio::sync::oneshot::Sender<()>>,
    http_handle: tokio::task::JoinHandle<()>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    supervisor: ActorRef<SupervisorMsg>,
    handle: tokio::task::JoinHandle<()>,
    stop_agents: bool,
    /// Beats the node's heartbeat until the node is shut down, through the shutdown: a
    /// node that takes its time to stop is not taken for dead.
    heartbeat: tokio::task::JoinHandle<()>,
    clock: Clock,
}

impl Node {
    /// Starts a node: store, node row, actors.
    pub async fn start(config: Config, opts: ServeOptions) -> Result<Node, ServeError> {
        for dir in [&config.workspace_root, &config.log_dir] {
            std::fs::create_dir_all(dir).map_err(|source| ServeError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let clock = opts.clock.clone().unwrap_or_else(Clock::system);
        // Safe by default: a token the config asks for must be there.
        let secrets = opts
            .secrets
            .clone()
            .unwrap_or_else(|| crate::config::Secrets::from_env(&config));
        if let (Some(var), None) = (&config.http.token_env, &secrets.api_token) {
            return Err(ServeError::MissingApiToken(var.clone()));
        }
        crate::workspace::set_network_timeout(config.repo.network_timeout);
        let store = Store::open(&config.database_url).await?;
        let orphans = crate::tasks::orphans(&store, &config).await?;
        if !orphans.is_empty() {
            match opts.orphaned {
                OrphanPolicy::Refuse => return Err(ServeError::Orphaned(orphans)),
                OrphanPolicy::Fail => {
                    for o in &orphans {
                        tracing::warn!(task = %o.key, reason = %o.reason, "failing an orphaned task");
                    }
                    crate::tasks::fail_orphans(&store, &orphans, clock.now_ms()).await?;
                }
            }
        }
        let hostname = config.node.host();
        if !config.effects.push {
            let others = other_live_hosts(&store, &config, &hostname, clock.now_ms()).await?;
            if !others.is_empty() {
                return Err(ServeError::SeveralHostsWithoutPush(others));
            }
        }
        let node_id = store
            .register_node(&hostname, std::process::id() as i32, clock.now_ms())
            .await?;
        tracing::info!(node_id, hostname, "node registered");
        let heartbeat = tokio::spawn(beat(
            store.clone(),
            node_id.clone(),
            clock.clone(),
            config.node.heartbeat_interval,
        ));
        let config = Arc::new(config);
        let ctx_clock = clock.clone();
        // Agents start through `baton-shim` beside this binary (else `baton shim`).
        let shim_exe = match opts.shim_exe.clone() {
            Some(p) => p,
            None => {
                let exe = std::env::current_exe().map_err(|source| ServeError::Io {
                    path: "the baton executable".into(),
                    source,
                })?;
                crate::agent::shim_exe_beside(&exe)
            }
        };
        let ctx = Ctx {
            policy: Arc::new(config.policy()),
            effector: Effector::new(config.clone(), store.clone(), secrets.clone()),
            config,
            store: store.clone(),
            clock,
            node_id: node_id.clone(),
            hostname,
            watched: Watched::default(),
            probe: opts.probe.clone(),
            secrets,
            metrics: opts
                .metrics
                .clone()
                .unwrap_or_else(|| Arc::new(crate::telemetry::Metrics::global())),
            shim_exe,
        };
        let (http_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let http_state = crate::http::HttpState {
            config: ctx.config.clone(),
            store: store.clone(),
            clock: ctx.clock.clone(),
            effector: ctx.effector.clone(),
            secrets: ctx.secrets.clone(),
            hostname: ctx.hostname.clone(),
            registry: opts.metrics_registry.clone(),
            ready: ready.clone(),
        };
        let listen = ctx.config.http.listen.clone();
        let (http_addr, http_handle) = crate::http::serve(http_state, &listen, async {
            let _ = stopped.await;
        })
        .await
        .map_err(|source| ServeError::Io {
            path: format!("the HTTP listener at {listen}"),
            source,
        })?;
        tracing::info!(%http_addr, "HTTP listener bound");
        if !http_addr.ip().is_loopback() && ctx.secrets.api_token.is_none() {
            tracing::warn!(
                %http_addr,
                "THE HTTP API IS REACHABLE FROM OTHER MACHINES WITHOUT A TOKEN: anyone who can reach \
                 it can submit and cancel tasks; set http.token_env or listen on 127.0.0.1"
            );
        }
        let mut args = SupervisorArgs::new(ctx);
        if let Some(i) = opts.dispatcher_interval {
            args.dispatcher_interval = i;
        }
        let (supervisor, handle) = Actor::spawn(None, Supervisor, args)
            .await
            .map_err(|e| ServeError::Spawn(e.to_string()))?;
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Node {
            ready,
            node_id,
            store,
            http_addr,
            http_stop: Some(http_stop),
            http_handle,
            supervisor,
            handle,
            stop_agents: opts.stop_agents,
            heartbeat,
            clock: ctx_clock,
        })
    }

    /// Stops the node in order; agents are left alive unless `stop_agents` was set.
    pub async fn shutdown(mut self) {
        self.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(stop) = self.http_stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.http_handle).await;
        let stop_agents = self.stop_agents;
        let _ = self
            .supervisor
            .call(|reply| SupervisorMsg::Shutdown { stop_agents, reply }, None)
            .await;
        let _ = (&mut self.handle).await;
        // Stopped cleanly: other hosts leave the agents left running to this host's next
        // boot for node.adoption_window.
        self.heartbeat.abort();
        if let Err(e) = self.store.release_leases(&self.node_id).await {
            tracing::warn!(error = %e, "cannot give up the node's leases");
        }
        if let Err(e) = self
            .store
            .stop_node(&self.node_id, self.clock.now_ms())
            .await
        {
            tracing::warn!(error = %e, "cannot record the node's stop");
        }
    }

    /// True while the supervisor runs.
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }
}

/// Runs a node until `shutdown` resolves (or the supervisor stops on its own).
pub async fn run(
    config: Config,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut node = Node::start(config, opts).await?;
    tokio::select! {
        _ = shutdown => {
            tracing::info!("shutting down");
            node.shutdown().await;
            Ok(())
        }
        _ = &mut node.handle => {
            node.heartbeat.abort();
            Err(ServeError::Spawn("the supervisor stopped unexpectedly".into()))
        }
    }
}

/// The node's heartbeat, every `interval`, until aborted.
async fn beat(store: Store, node_id: String, clock: Clock, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = store.heartbeat_node(&node_id, clock.now_ms()).await {
            tracing::warn!(error = %e, "node heartbeat failed");
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

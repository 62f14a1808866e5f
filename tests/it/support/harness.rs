//! The supervision harness: a test node's world (a database, a seeded bare remote,
//! agent scripts, a config with fast timers) and the waits on probe events that tests
//! use instead of sleeps.

use std::path::PathBuf;
use std::time::Duration;

use baton::actors::ProbeEvent;
use baton::clock::Clock;
use baton::config::{Config, EnvOverrides};
use baton::model::{ClaimOutcome, EffectStatus, EventKind, TaskStatus};
use baton::service::{Node, ServeOptions};
use baton::store::Store;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::support::TestDb;

/// How long a test waits for a probe event before it fails (a safety net, not a sleep).
pub const PROBE_WAIT: Duration = Duration::from_secs(90);

/// A test node's world: a database, a seeded bare remote, agents and a config.
pub struct Harness {
    pub db: TestDb,
    pub root: PathBuf,
}

impl Harness {
    pub fn new(db: TestDb) -> Harness {
        let root = db.dir.path().to_path_buf();
        baton::workspace::seed_remote(&root.join("seed"), &root.join("remote.git"))
            .expect("seed remote");
        Harness { db, root }
    }

    /// Writes an agent script and returns its path.
    pub fn agent(&self, name: &str, body: &str) -> String {
        let path = self.root.join(format!("{name}.sh"));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        path.display().to_string()
    }

    /// A config around `pipeline_and_stages` (TOML), with fast timers.
    pub fn config(&self, pipeline_and_stages: &str) -> Config {
        let toml = self.config_toml(pipeline_and_stages);
        std::fs::write(self.root.join("baton.toml"), &toml).unwrap();
        Config::from_toml(&toml, &self.root, &EnvOverrides::default())
            .unwrap_or_else(|p| panic!("{p:?}"))
    }

    /// The config of a simulated host `host`: its own `node.host`, workspace_root and
    /// log_dir below `hosts/<host>/`, the rest shared. Also written as
    /// `hosts/<host>/baton.toml`, for a `baton serve` process of that host.
    pub fn host_config(&self, host: &str, pipeline_and_stages: &str) -> Config {
        let dir = self.root.join("hosts").join(host);
        std::fs::create_dir_all(&dir).unwrap();
        let toml = self
            .config_toml(pipeline_and_stages)
            .replace("[node]\n", &format!("[node]\nhost = \"{host}\"\n"))
            .replace(
                "workspace_root = \"workspaces\"",
                &format!("workspace_root = \"{}\"", dir.join("workspaces").display()),
            )
            .replace(
                "log_dir = \"logs\"",
                &format!("log_dir = \"{}\"", dir.join("logs").display()),
            );
        std::fs::write(dir.join("baton.toml"), &toml).unwrap();
        Config::from_toml(&toml, &self.root, &EnvOverrides::default())
            .unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn config_toml(&self, pipeline_and_stages: &str) -> String {
        format!(
            r#"
database_url = "{db}"
workspace_root = "workspaces"
log_dir = "logs"
[reaper]
interval = "500ms"
finalize_grace = "5m"
heartbeat_timeout = "5s"
[node]
heartbeat_interval = "200ms"
[shutdown]
grace = "2s"
[retry]
max_attempts = 3
backoff_initial = "100ms"
backoff_max = "1s"
[http]
listen = "127.0.0.1:0"
[repo]
url = "{remote}"
{pipeline_and_stages}
"#,
            db = self.db.url,
            remote = self.root.join("remote.git").display(),
        )
    }

    pub async fn start(&self, config: Config) -> (Node, UnboundedReceiver<ProbeEvent>) {
        self.start_with(config, ServeOptions::default()).await
    }

    /// Starts a node with `opts`, adding a probe, a fast dispatcher and the shim.
    pub async fn start_with(
        &self,
        config: Config,
        opts: ServeOptions,
    ) -> (Node, UnboundedReceiver<ProbeEvent>) {
        let (tx, rx) = unbounded_channel();
        let node = Node::start(
            config,
            ServeOptions {
                probe: Some(tx),
                dispatcher_interval: Some(Duration::from_millis(100)),
                shim_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_baton-shim"))),
                ..opts
            },
        )
        .await
        .expect("start node");
        (node, rx)
    }

    /// Submits task `key` at `first_stage`, runs a node with `config` until the task is
    /// done, stops it, and returns the task as the database has it.
    pub async fn run_to_done(
        &self,
        config: Config,
        key: &str,
        first_stage: &str,
    ) -> baton::store::TaskDetail {
        self.submit(key, first_stage).await;
        let (node, mut rx) = self.start(config).await;
        assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
        node.shutdown().await;
        let key = crate::support::key(key);
        self.db.store.task_detail(&key).await.unwrap()
    }

    pub async fn submit(&self, key: &str, first_stage: &str) -> baton::store::Submitted {
        crate::support::submit(&self.db.store, key, first_stage, Clock::system().now_ms()).await
    }
}

/// Waits for the first probe event for which `f` says `Some`.
pub async fn wait_for<T>(
    rx: &mut UnboundedReceiver<ProbeEvent>,
    mut f: impl FnMut(&ProbeEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(PROBE_WAIT, async {
        loop {
            let ev = rx.recv().await.expect("probe closed");
            if let Some(t) = f(&ev) {
                return t;
            }
        }
    })
    .await
    .expect("timed out waiting for a probe event")
}

/// Waits for the next message a Monitor or the Dispatcher handled: something to look
/// again after, when the state waited for is outside baton (a file, a pid).
pub async fn wait_for_activity(rx: &mut UnboundedReceiver<ProbeEvent>) {
    wait_for(rx, |ev| {
        matches!(
            ev,
            ProbeEvent::Monitor { .. } | ProbeEvent::Dispatcher { .. }
        )
        .then_some(())
    })
    .await
}

/// Waits until a task ended: by a claim (the Advancer), or once its delivery was done
/// or refused (the EffectWorker); returns its final status.
pub async fn wait_task_end(rx: &mut UnboundedReceiver<ProbeEvent>) -> TaskStatus {
    wait_for(rx, |ev| match ev {
        ProbeEvent::Advancer {
            outcome: Ok(ClaimOutcome::Won(w)),
            ..
        } => w.task_status,
        ProbeEvent::EffectWorker { result, .. } => result.ended.first().map(|(_, s)| *s),
        _ => None,
    })
    .await
}

/// Waits until the task has no pending effect, looking after every EffectWorker pass.
pub async fn wait_effects_settled(
    rx: &mut UnboundedReceiver<ProbeEvent>,
    store: &Store,
    key: &str,
) {
    loop {
        let pending = store
            .task_detail(&crate::support::key(key))
            .await
            .unwrap()
            .effects
            .iter()
            .any(|e| e.status == EffectStatus::Pending);
        if !pending {
            return;
        }
        wait_for(rx, |ev| {
            matches!(ev, ProbeEvent::EffectWorker { .. }).then_some(())
        })
        .await;
    }
}

pub fn kinds(events: &[entity::events::Model]) -> Vec<EventKind> {
    events.iter().map(|e| e.kind).collect()
}

pub const FOUR_STAGES: &str = r#"
[pipelines.default]
stages = ["analyst", "architect", "developer", "reviewer"]
max_iterations = 3
[stages.analyst]
command = ["sh", "AGENT"]
gate.artifacts = ["docs/{task}/analysis.md"]
[stages.architect]
command = ["sh", "AGENT"]
gate.artifacts = ["docs/{task}/design.md"]
[stages.developer]
command = ["sh", "AGENT"]
gate.command = ["sh", "-n", "src/main.sh"]
[stages.reviewer]
command = ["sh", "AGENT"]
on_reject = "developer"
gate.verdict = { file = "docs/{task}/review.md", approve = "APPROVED", reject = "CHANGES_REQUESTED" }
[effects]
push = true
"#;

pub const FOUR_STAGE_AGENT: &str = r#"
set -e
d="docs/$BATON_TASK"; mkdir -p "$d" src
echo "$BATON_STAGE $BATON_ITERATION $BATON_RUN_ID" >> "$BATON_WORKSPACE/../../agent-starts.txt"
if [ -n "$HOME" ]; then echo "secret leaked" >> "$d/leak.txt"; fi
case "$BATON_STAGE" in
  analyst) echo analysis > "$d/analysis.md" ;;
  architect) echo design > "$d/design.md" ;;
  developer) echo "echo v$BATON_ITERATION" > src/main.sh ;;
  reviewer) if [ "$BATON_ITERATION" = 1 ]; then echo CHANGES_REQUESTED > "$d/review.md"; else echo APPROVED > "$d/review.md"; fi ;;
esac
"#;

/// The commits on the remote's `branch`, newest first: (id, summary).
pub fn remote_commits(remote: &std::path::Path, branch: &str) -> Vec<(String, String)> {
    let repo = git2::Repository::open_bare(remote).unwrap();
    let Ok(tip) = repo.find_reference(&format!("refs/heads/{branch}")) else {
        return Vec::new();
    };
    let mut walk = repo.revwalk().unwrap();
    walk.push(tip.target().unwrap()).unwrap();
    walk.map(|id| {
        let c = repo.find_commit(id.unwrap()).unwrap();
        (
            c.id().to_string(),
            c.summary().ok().flatten().unwrap_or_default().to_string(),
        )
    })
    .collect()
}

/// The commit summaries on the remote's `branch`, newest first.
pub fn remote_log(remote: &std::path::Path, branch: &str) -> Vec<String> {
    remote_commits(remote, branch)
        .into_iter()
        .map(|(_, summary)| summary)
        .collect()
}

/// Waits until the task `key` ended, when another process (a `baton serve`) drives it:
/// nothing there can send a probe event, so the database is looked at every 50 ms.
pub async fn task_end_elsewhere(store: &Store, key: &str) -> entity::tasks::Model {
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    loop {
        let t = store.task_by_key(&crate::support::key(key)).await.unwrap();
        if t.status != TaskStatus::Active {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "{key} never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops a `baton serve` process as systemd would (SIGTERM) and waits for it.
pub fn stop_serve(mut serve: std::process::Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    serve.wait().unwrap()
}

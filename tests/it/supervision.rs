//! The supervision core end to end: real agent processes, real git, the actors, on
//! SQLite and PostgreSQL. Tests wait on probe events, never on sleeps; the time-window
//! tests drive the Reaper's passes by hand on a manual clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton::actors::advancer::{Advancer, AdvancerArgs};
use baton::actors::{Ctx, ProbeEvent, Watched, reaper};
use baton::clock::Clock;
use baton::config::{Config, EnvOverrides};
use baton::service::{Node, ServeOptions};
use baton::store::{Claim, ClaimOutcome, ClaimPolicy, NewTask, Source, Store, Verdict};
use ractor::Actor;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::on_both;
use crate::support::TestDb;

/// How long a test waits for a probe event before it fails (a safety net, not a sleep).
const PROBE_WAIT: Duration = Duration::from_secs(90);

/// A test node's world: a database, a seeded bare remote, agents and a config.
pub struct Harness {
    pub db: TestDb,
    pub root: PathBuf,
}

impl Harness {
    pub fn new(db: TestDb) -> Harness {
        let root = db.dir.path().to_path_buf();
        baton::demo::seed_remote(&root.join("seed"), &root.join("remote.git"))
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
                shim_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_baton"))),
                ..opts
            },
        )
        .await
        .expect("start node");
        (node, rx)
    }

    pub async fn submit(&self, key: &str, first_stage: &str) -> baton::store::Submitted {
        self.db
            .store
            .submit(
                NewTask {
                    key: key.into(),
                    pipeline: "default".into(),
                    title: key.into(),
                    plane_issue_id: None,
                    first_stage: first_stage.into(),
                    trace_parent: None,
                },
                Source::Cli,
                Clock::system().now_ms(),
            )
            .await
            .unwrap()
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

/// Waits until the Advancer ended the task; returns its final status.
pub async fn wait_task_end(rx: &mut UnboundedReceiver<ProbeEvent>) -> String {
    wait_for(rx, |ev| match ev {
        ProbeEvent::Advancer {
            outcome: Ok(ClaimOutcome::Won(w)),
            ..
        } => w.task_status.clone(),
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
            .task_detail(key)
            .await
            .unwrap()
            .effects
            .iter()
            .any(|e| e.status == "pending");
        if !pending {
            return;
        }
        wait_for(rx, |ev| {
            matches!(ev, ProbeEvent::EffectWorker { .. }).then_some(())
        })
        .await;
    }
}

fn kinds(events: &[entity::events::Model]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

const FOUR_STAGES: &str = r#"
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

const FOUR_STAGE_AGENT: &str = r#"
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

async fn four_stage_pipeline_end_to_end(db: TestDb) {
    let h = Harness::new(db);
    let agent = h.agent("agent", FOUR_STAGE_AGENT);
    let mut config = h.config(&FOUR_STAGES.replace("AGENT", &agent));
    // HOME stands in for a secret: it is set in every test environment.
    config.http.token_env = Some("HOME".into());
    let ws_root = config.workspace_root.clone();
    let submitted = h.submit("ORCH-65", "analyst").await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, "done");
    wait_effects_settled(&mut rx, &h.db.store, "ORCH-65").await;
    node.shutdown().await;

    let detail = h.db.store.task_detail("ORCH-65").await.unwrap();
    // Every push was performed: the remote has the branch at the last commit.
    assert!(
        detail.effects.iter().all(|e| e.status == "done"),
        "{:?}",
        detail.effects
    );
    let remote = git2::Repository::open_bare(h.root.join("remote.git")).unwrap();
    let remote_head = remote
        .revparse_single("refs/heads/baton/ORCH-65")
        .unwrap()
        .id()
        .to_string();
    assert_eq!(
        Some(remote_head.as_str()),
        detail.runs.last().unwrap().commit_sha.as_deref()
    );
    let stages: Vec<String> = detail
        .jobs
        .iter()
        .map(|j| format!("{}#{}", j.stage, j.iteration))
        .collect();
    assert_eq!(
        stages,
        [
            "analyst#1",
            "architect#1",
            "developer#1",
            "reviewer#1",
            "developer#2",
            "reviewer#2"
        ]
    );
    assert!(detail.jobs.iter().all(|j| j.status == "done"));
    for j in &detail.jobs {
        assert_eq!(
            h.db.store.advances_of(j.id).await.unwrap().len(),
            1,
            "one advance per job"
        );
    }
    let outcomes: Vec<&str> = detail
        .runs
        .iter()
        .map(|r| r.outcome.as_deref().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["passed", "passed", "passed", "rejected", "passed", "passed"]
    );
    // Every stage committed with the contract's message, on the task's branch.
    let repo = git2::Repository::open(ws_root.join("ORCH-65")).unwrap();
    assert_eq!(repo.head().unwrap().shorthand().unwrap(), "baton/ORCH-65");
    let head = repo.head().unwrap().peel_to_commit().unwrap();
    let last_run = detail.runs.last().unwrap();
    assert_eq!(
        head.message().unwrap(),
        format!(
            "reviewer(ORCH-65): auto-commit from reviewer run_id={}",
            last_run.id
        )
    );
    assert_eq!(
        last_run.commit_sha.as_deref(),
        Some(head.id().to_string().as_str())
    );
    assert_eq!(
        detail.effects.iter().filter(|e| e.kind == "push").count(),
        6
    );
    // Each agent started once per run, and never saw baton's secret.
    let starts = std::fs::read_to_string(h.root.join("agent-starts.txt")).unwrap();
    assert_eq!(starts.lines().count(), 6, "{starts}");
    assert!(
        !ws_root.join("ORCH-65/docs/ORCH-65/leak.txt").exists(),
        "a secret reached an agent"
    );
    let k = kinds(&h.db.store.events(submitted.task.id).await.unwrap());
    assert_eq!(k.iter().filter(|k| *k == "claim_won").count(), 6);
    assert!(k.contains(&"task_done".to_string()));
}
on_both!(
    four_stage_pipeline_end_to_end,
    four_stage_pipeline_end_to_end
);

const DEV_REVIEW: &str = r#"
[pipelines.default]
stages = ["developer", "reviewer"]
max_iterations = 2
[stages.developer]
command = ["sh", "-c", "echo work >> work.txt"]
[stages.reviewer]
command = ["sh", "-c", "echo CHANGES_REQUESTED > review.md"]
on_reject = "developer"
gate.verdict = { file = "review.md", approve = "APPROVED", reject = "CHANGES_REQUESTED" }
"#;

async fn reject_loop_stops_at_max_iterations(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(DEV_REVIEW);
    let s = h.submit("LOOP-1", "developer").await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, "failed");
    node.shutdown().await;
    let jobs = h.db.store.jobs_of(s.task.id).await.unwrap();
    let stages: Vec<String> = jobs
        .iter()
        .map(|j| format!("{}#{}", j.stage, j.iteration))
        .collect();
    assert_eq!(
        stages,
        ["developer#1", "reviewer#1", "developer#2", "reviewer#2"]
    );
    let events = h.db.store.events(s.task.id).await.unwrap();
    let failed = events.iter().find(|e| e.kind == "task_failed").unwrap();
    assert!(
        failed.detail.contains("max_iterations is 2"),
        "{}",
        failed.detail
    );
}
on_both!(
    reject_loop_stops_at_max_iterations,
    reject_loop_stops_at_max_iterations
);

async fn failing_agent_is_retried_with_backoff_then_fails(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "-c", "echo trying; exit 3"]
"#,
    );
    let s = h.submit("RETRY-1", "developer").await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, "failed");
    node.shutdown().await;
    let detail = h.db.store.task_detail("RETRY-1").await.unwrap();
    assert_eq!(detail.jobs.len(), 1);
    assert_eq!(detail.jobs[0].attempt, 3);
    let attempts: Vec<(i32, Option<i32>)> = detail
        .runs
        .iter()
        .map(|r| (r.attempt, r.exit_code))
        .collect();
    assert_eq!(attempts, [(1, Some(3)), (2, Some(3)), (3, Some(3))]);
    let backoffs: Vec<i64> = detail
        .events
        .iter()
        .filter(|e| e.kind == "retry_scheduled")
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.detail).unwrap()["backoff_ms"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(backoffs, [100, 200], "exponential backoff");
    // The next attempt never started before its backoff.
    let at = |kind: &str, n: usize| {
        detail
            .events
            .iter()
            .filter(|e| e.kind == kind)
            .nth(n)
            .unwrap()
            .at
    };
    assert!(at("run_started", 1) >= at("retry_scheduled", 0) + 100);
    assert!(at("run_started", 2) >= at("retry_scheduled", 1) + 200);
    let failed = detail
        .events
        .iter()
        .find(|e| e.kind == "task_failed")
        .unwrap();
    assert!(
        failed.detail.contains("exited with code 3"),
        "{}",
        failed.detail
    );
    assert_eq!(s.task.key, "RETRY-1");
}
on_both!(
    failing_agent_is_retried_with_backoff_then_fails,
    failing_agent_is_retried_with_backoff_then_fails
);

async fn missing_agent_command_fails_the_attempt_clearly(db: TestDb) {
    let h = Harness::new(db);
    let mut config = h.config(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["baton-no-such-agent-xyz", "--flag"]
"#,
    );
    config.retry.max_attempts = 1;
    h.submit("NOCMD-1", "developer").await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, "failed");
    node.shutdown().await;
    let detail = h.db.store.task_detail("NOCMD-1").await.unwrap();
    let run = &detail.runs[0];
    assert_eq!(run.exit_code, Some(baton::agent::EXIT_CANNOT_START));
    let log = std::fs::read_to_string(&run.log_path).unwrap();
    assert!(
        log.contains("cannot start agent command \"baton-no-such-agent-xyz\""),
        "{log}"
    );
    let exited = detail
        .events
        .iter()
        .find(|e| e.kind == "run_exited")
        .unwrap();
    assert!(
        exited.detail.contains("baton-no-such-agent-xyz"),
        "{}",
        exited.detail
    );
    let failed = detail
        .events
        .iter()
        .find(|e| e.kind == "task_failed")
        .unwrap();
    assert!(failed.detail.contains("No such file"), "{}", failed.detail);
}
on_both!(
    missing_agent_command_fails_the_attempt_clearly,
    missing_agent_command_fails_the_attempt_clearly
);

async fn timeout_kills_the_agent(db: TestDb) {
    let h = Harness::new(db);
    let mut config = h.config(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "-c", "echo $$ > agent.pid; sleep 120"]
timeout = "1s"
"#,
    );
    config.retry.max_attempts = 1;
    h.submit("SLOW-1", "developer").await;
    let started = std::time::Instant::now();
    let (node, mut rx) = h.start(config.clone()).await;
    let timeout_seen = wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Monitor { msg, .. } if msg == "timeout" => Some(()),
        _ => None,
    });
    timeout_seen.await;
    assert_eq!(wait_task_end(&mut rx).await, "failed");
    node.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the agent was not killed"
    );
    let detail = h.db.store.task_detail("SLOW-1").await.unwrap();
    assert_eq!(detail.runs[0].outcome.as_deref(), Some("timeout"));
    let pid: i32 = std::fs::read_to_string(config.workspace_root.join("SLOW-1/agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!baton::agent::alive(pid), "the agent still runs");
}
on_both!(timeout_kills_the_agent, timeout_kills_the_agent);

async fn cancel_stops_a_running_agent(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "-c", "sleep 120"]
"#,
    );
    let s = h.submit("CANCEL-1", "developer").await;
    let (node, mut rx) = h.start(config).await;
    let run_id = wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Monitor { msg, run_id, .. } if msg == "start" => Some(*run_id),
        _ => None,
    })
    .await;
    // Wait until the agent runs (its pid is recorded), then cancel as the CLI does.
    let pid = loop {
        if let Some(pid) = h.db.store.run(run_id).await.unwrap().and_then(|r| r.pid) {
            break pid;
        }
        wait_for_activity(&mut rx).await;
    };
    h.db.store
        .cancel("CANCEL-1", Source::Cli, Clock::system().now_ms())
        .await
        .unwrap();
    wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Monitor { msg, run_id: r, .. } if msg.starts_with("exited") && *r == run_id => {
            Some(())
        }
        _ => None,
    })
    .await;
    node.shutdown().await;
    assert!(!baton::agent::alive(pid));
    let k = kinds(&h.db.store.events(s.task.id).await.unwrap());
    assert!(
        k.contains(&"task_cancelled".to_string()) && !k.contains(&"claim_won".to_string()),
        "{k:?}"
    );
}
on_both!(cancel_stops_a_running_agent, cancel_stops_a_running_agent);

// ---- restarts: a real `baton serve` process killed, then a new node ------------------

pub const WAITING_AGENT: &str = r#"
echo started >> "$BATON_WORKSPACE/../../starts.txt"
while [ ! -f "$BATON_WORKSPACE/../../go" ]; do sleep 0.05; done
echo done > result.txt
exit 0
"#;

/// Starts `baton serve` as a process, waits until its agent runs, and kills it with
/// SIGKILL: a crash, with the agent left running in its own session.
async fn crash_serve_with_running_agent(h: &Harness) -> entity::agent_runs::Model {
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "--config",
            h.root.join("baton.toml").to_str().unwrap(),
            "serve",
        ])
        .env("BATON_LOG", "warn")
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .spawn()
        .expect("start baton serve");
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    let run = loop {
        let tasks = h.db.store.task_detail("ADOPT-1").await.unwrap();
        if let Some(r) = tasks.runs.iter().find(|r| r.pid.is_some()) {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "baton serve never started the agent"
        );
        // Waiting on another process: nothing here can send a probe event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    serve.kill().unwrap();
    serve.wait().unwrap();
    run
}

async fn restart_adopts_a_running_agent(db: TestDb) {
    let h = Harness::new(db);
    let agent = h.agent("agent", WAITING_AGENT);
    let config = h.config(&format!(
        "[pipelines.default]\nstages = [\"developer\", \"reviewer\"]\n[stages.developer]\ncommand = [\"sh\", \"{agent}\"]\ngate.artifacts = [\"result.txt\"]\n[stages.reviewer]\ncommand = [\"true\"]\n"
    ));
    let s = h.submit("ADOPT-1", "developer").await;
    let run = crash_serve_with_running_agent(&h).await;
    let pid = run.pid.unwrap();
    assert!(
        baton::agent::alive(pid),
        "the agent must survive the crash of baton"
    );

    let (node, mut rx) = h.start(config).await;
    wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Monitor { msg, run_id, .. } if msg == "start" && *run_id == run.id => Some(()),
        _ => None,
    })
    .await;
    std::fs::write(h.root.join("go"), "").unwrap();
    assert_eq!(wait_task_end(&mut rx).await, "done");
    node.shutdown().await;

    let starts = std::fs::read_to_string(h.root.join("starts.txt")).unwrap();
    assert_eq!(starts.lines().count(), 1, "the agent was started twice");
    let detail = h.db.store.task_detail("ADOPT-1").await.unwrap();
    let dev_runs: Vec<_> = detail
        .runs
        .iter()
        .filter(|r| r.job_id == s.job.id)
        .collect();
    assert_eq!(dev_runs.len(), 1);
    assert_eq!(dev_runs[0].outcome.as_deref(), Some("passed"));
    let k = kinds(&detail.events);
    assert_eq!(k.iter().filter(|k| *k == "run_adopted").count(), 1);
    assert_eq!(k.iter().filter(|k| *k == "claim_won").count(), 2);
    assert_eq!(h.db.store.advances_of(s.job.id).await.unwrap().len(), 1);
}
on_both!(
    restart_adopts_a_running_agent,
    restart_adopts_a_running_agent
);

async fn restart_after_the_agent_exited_while_down_finalizes_once(db: TestDb) {
    let h = Harness::new(db);
    let agent = h.agent("agent", WAITING_AGENT);
    let config = h.config(&format!(
        "[pipelines.default]\nstages = [\"developer\"]\n[stages.developer]\ncommand = [\"sh\", \"{agent}\"]\ngate.artifacts = [\"result.txt\"]\n"
    ));
    let s = h.submit("ADOPT-1", "developer").await;
    let run = crash_serve_with_running_agent(&h).await;
    // The agent ends while no baton runs; its shim writes the exit status.
    std::fs::write(h.root.join("go"), "").unwrap();
    let exit_file = baton::agent::exit_file(Path::new(&run.log_path));
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    while !exit_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the shim never wrote the exit file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, "done");
    node.shutdown().await;
    let detail = h.db.store.task_detail("ADOPT-1").await.unwrap();
    assert_eq!(detail.runs.len(), 1);
    assert_eq!(detail.runs[0].exit_code, Some(0));
    let starts = std::fs::read_to_string(h.root.join("starts.txt")).unwrap();
    assert_eq!(starts.lines().count(), 1);
    let k = kinds(&detail.events);
    assert_eq!(k.iter().filter(|k| *k == "run_exited").count(), 1);
    assert_eq!(k.iter().filter(|k| *k == "claim_won").count(), 1);
    assert_eq!(h.db.store.advances_of(s.job.id).await.unwrap().len(), 1);
}
on_both!(
    restart_after_the_agent_exited_while_down_finalizes_once,
    restart_after_the_agent_exited_while_down_finalizes_once
);

// ---- the claim races and time windows, on a manual clock ---------------------------

/// An Advancer with a probe over `store`, and a job dispatched with its exit recorded.
struct ClaimSetup {
    ctx: Ctx,
    rx: UnboundedReceiver<ProbeEvent>,
    advancer: ractor::ActorRef<baton::actors::advancer::AdvancerMsg>,
    job: entity::jobs::Model,
    run: entity::agent_runs::Model,
}

async fn claim_setup(db: &TestDb, store: Store) -> ClaimSetup {
    let config = Config::from_toml(
        crate::store::PIPELINE_TOML,
        db.dir.path(),
        &EnvOverrides::default(),
    )
    .unwrap();
    let (tx, rx) = unbounded_channel();
    let clock = Clock::manual();
    let ctx = Ctx {
        policy: Arc::new(ClaimPolicy::from_config(&config)),
        config: Arc::new(config),
        store: store.clone(),
        clock: clock.clone(),
        node_id: store
            .register_node(&baton::hostname(), 1, clock.now_ms())
            .await
            .unwrap(),
        hostname: baton::hostname(),
        watched: Watched::default(),
        probe: Some(tx),
        metrics: Arc::new(baton::telemetry::Metrics::global()),
        secrets: Default::default(),
        shim_exe: PathBuf::from(env!("CARGO_BIN_EXE_baton")),
    };
    store
        .submit(
            NewTask {
                key: "RACE-1".into(),
                pipeline: "default".into(),
                title: "race".into(),
                plane_issue_id: None,
                first_stage: "analyst".into(),
                trace_parent: None,
            },
            Source::Cli,
            clock.now_ms(),
        )
        .await
        .unwrap();
    let d = store
        .dispatch(&ctx.node_id, db.dir.path(), None, clock.now_ms())
        .await
        .unwrap()
        .unwrap();
    store
        .record_exit(d.task.id, &d.run, 0, serde_json::json!({}), clock.now_ms())
        .await
        .unwrap();
    let (advancer, _) = Actor::spawn(
        None,
        Advancer,
        AdvancerArgs {
            ctx: ctx.clone(),
            dispatcher: None,
            effect_worker: None,
        },
    )
    .await
    .unwrap();
    ClaimSetup {
        ctx,
        rx,
        advancer,
        job: d.job,
        run: d.run,
    }
}

async fn tier2_waits_for_the_grace_window(db: TestDb) {
    let store = db.store.clone();
    let mut s = claim_setup(&db, store).await;
    let grace = s.ctx.config.reaper.finalize_grace;
    s.ctx.clock.advance(grace - Duration::from_secs(1));
    let (r, claims) = reaper::run_once(&s.ctx, &s.advancer).await.unwrap();
    assert_eq!(
        (r.n_tier2, r.n_in_grace, claims.len()),
        (0, 1, 0),
        "reaped inside the grace window"
    );
    assert_eq!(
        s.ctx.store.job(s.job.id).await.unwrap().unwrap().status,
        "running"
    );

    s.ctx.clock.advance(Duration::from_secs(1));
    let (r, claims) = reaper::run_once(&s.ctx, &s.advancer).await.unwrap();
    assert_eq!((r.n_tier2, r.n_won), (1, 1));
    assert_eq!(claims[0].0.tier.as_deref(), Some("2"));
    // The Advancer handled exactly that claim, from the Reaper, and it won.
    match s.rx.recv().await.unwrap() {
        ProbeEvent::Advancer { claim, outcome } => {
            assert_eq!((claim.decided_by, claim.run_id), (Source::Reaper, s.run.id));
            assert!(matches!(outcome, Ok(ClaimOutcome::Won(_))), "{outcome:?}");
        }
        other => panic!("unexpected probe event {other:?}"),
    }
    let events = s.ctx.store.events(s.job.task_id).await.unwrap();
    let reaped = events.iter().find(|e| e.kind == "reaped").unwrap();
    assert!(
        reaped.detail.contains("\"tier\":\"2\""),
        "{}",
        reaped.detail
    );
    s.advancer.stop(None);
}
on_both!(
    tier2_waits_for_the_grace_window,
    tier2_waits_for_the_grace_window
);

async fn watched_runs_are_never_reaped(db: TestDb) {
    let store = db.store.clone();
    let s = claim_setup(&db, store).await;
    s.ctx.watched.insert(s.run.id, s.job.id);
    s.ctx.clock.advance(s.ctx.config.reaper.finalize_grace * 3);
    let (r, claims) = reaper::run_once(&s.ctx, &s.advancer).await.unwrap();
    assert_eq!((r.n_tier1, r.n_tier2, claims.len()), (0, 0, 0));
    s.advancer.stop(None);
}
on_both!(watched_runs_are_never_reaped, watched_runs_are_never_reaped);

async fn monitor_and_reaper_racing_give_one_advance(db: TestDb) {
    let store = db.store.clone();
    let mut s = claim_setup(&db, store).await;
    s.ctx.clock.advance(s.ctx.config.reaper.finalize_grace);
    let claim = |by: Source, tier: Option<&str>| Claim {
        job_id: s.job.id,
        run_id: s.run.id,
        verdict: Verdict::Passed,
        decided_by: by,
        tier: tier.map(str::to_string),
        commit_sha: None,
    };
    let (a, b) = tokio::join!(
        baton::actors::monitor::send_claim(&s.advancer, claim(Source::Monitor, None)),
        baton::actors::monitor::send_claim(&s.advancer, claim(Source::Reaper, Some("2"))),
    );
    let won = [&a, &b]
        .iter()
        .filter(|o| matches!(o, Some(ClaimOutcome::Won(_))))
        .count();
    assert_eq!(won, 1, "{a:?} {b:?}");
    assert!(
        [&a, &b]
            .iter()
            .any(|o| matches!(o, Some(ClaimOutcome::AlreadyAdvanced))),
        "{a:?} {b:?}"
    );
    assert_eq!(s.ctx.store.advances_of(s.job.id).await.unwrap().len(), 1);
    // The Advancer handled them one at a time: the first won, the second did not.
    let mut seen = Vec::new();
    for _ in 0..2 {
        if let ProbeEvent::Advancer { outcome, .. } = s.rx.recv().await.unwrap() {
            seen.push(matches!(outcome, Ok(ClaimOutcome::Won(_))));
        }
    }
    assert_eq!(seen, [true, false]);
    // A zombie of this run, arriving later, loses as well.
    let late = baton::actors::monitor::send_claim(&s.advancer, claim(Source::Monitor, None)).await;
    assert!(!matches!(late, Some(ClaimOutcome::Won(_))));
    let jobs = s.ctx.store.jobs_of(s.job.task_id).await.unwrap();
    assert_eq!(jobs.len(), 2, "exactly one next job");
    s.advancer.stop(None);
}
on_both!(
    monitor_and_reaper_racing_give_one_advance,
    monitor_and_reaper_racing_give_one_advance
);

async fn lost_agent_is_reaped_as_tier1(db: TestDb) {
    let store = db.store.clone();
    let s = claim_setup(&db, store.clone()).await;
    // A second job whose run belongs to a node that stopped sending heartbeats.
    store
        .submit(
            NewTask {
                key: "LOST-1".into(),
                pipeline: "default".into(),
                title: "lost".into(),
                plane_issue_id: None,
                first_stage: "analyst".into(),
                trace_parent: None,
            },
            Source::Cli,
            s.ctx.now(),
        )
        .await
        .unwrap();
    let dead = store
        .register_node("other-host", 4242, s.ctx.now())
        .await
        .unwrap();
    let d = store
        .dispatch(&dead, db.dir.path(), None, s.ctx.now())
        .await
        .unwrap()
        .unwrap();
    let (r, _) = reaper::run_once(&s.ctx, &s.advancer).await.unwrap();
    assert_eq!(
        r.n_tier1, 0,
        "the other node is still within its heartbeat timeout"
    );
    s.ctx
        .clock
        .advance(s.ctx.config.reaper.heartbeat_timeout + Duration::from_secs(1));
    let (r, claims) = reaper::run_once(&s.ctx, &s.advancer).await.unwrap();
    assert_eq!(r.n_tier1, 1);
    let (claim, outcome) = claims.iter().find(|(c, _)| c.run_id == d.run.id).unwrap();
    assert!(matches!(claim.verdict, Verdict::Lost { .. }));
    assert!(
        matches!(outcome, ClaimOutcome::Won(w) if w.job_status == "queued"),
        "{outcome:?}"
    );
    assert_eq!(
        store
            .run(d.run.id)
            .await
            .unwrap()
            .unwrap()
            .outcome
            .as_deref(),
        Some("lost")
    );
    s.advancer.stop(None);
}
on_both!(lost_agent_is_reaped_as_tier1, lost_agent_is_reaped_as_tier1);

async fn stop_agents_terminates_them_at_shutdown_and_records_it(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["sh", "-c", "echo $$ > agent.pid; sleep 120"]
"#,
    );
    let ws = config.workspace_root.join("STOP-1");
    let s = h.submit("STOP-1", "developer").await;
    let (node, mut rx) = h
        .start_with(
            config,
            ServeOptions {
                stop_agents: true,
                ..Default::default()
            },
        )
        .await;
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(ws.join("agent.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            break pid;
        }
        wait_for_activity(&mut rx).await;
    };
    node.shutdown().await;
    assert!(
        !baton::agent::alive(pid),
        "the agent outlived a --stop-agents shutdown"
    );
    let detail = h.db.store.task_detail("STOP-1").await.unwrap();
    assert_eq!(detail.runs[0].outcome.as_deref(), Some("failed"));
    assert_eq!(
        detail.jobs[0].status, "queued",
        "the interrupted attempt is retried"
    );
    let won = detail
        .events
        .iter()
        .find(|e| e.kind == "claim_won")
        .unwrap();
    assert!(
        won.detail.contains("stopped at node shutdown"),
        "{}",
        won.detail
    );
    assert_eq!(s.task.key, "STOP-1");
}
on_both!(
    stop_agents_terminates_them_at_shutdown_and_records_it,
    stop_agents_terminates_them_at_shutdown_and_records_it
);

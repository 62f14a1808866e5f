//! Several nodes on one database, each a simulated host (its own `node.host`,
//! workspace_root and log_dir): a host that dies with its agents is taken over, a host
//! that restarts is not, a cancel racing a claim leaves nothing running, and a config that
//! lost a stage loses no task silently. On PostgreSQL, how baton scales past one machine
//! (and on SQLite where the scenario is not about several nodes).

use std::time::Duration;

use baton::actors::ProbeEvent;
use baton::actors::monitor::MonitorEvent;
use baton::clock::Clock;
use baton::model::{EffectStatus, EventKind, JobStatus, Origin, RunOutcome, TaskStatus};
use baton::service::{Node, OrphanPolicy, ServeOptions};

use crate::on_both;
use crate::support::harness::*;
use crate::support::{Backend, TestDb};

/// A PostgreSQL database for a test of several nodes; under CI it must be there.
async fn postgres() -> Option<TestDb> {
    TestDb::new(Backend::Postgres).await
}

/// Waits until `check` holds, looking again after each message of the node's actors.
async fn until(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<ProbeEvent>,
    mut check: impl AsyncFnMut() -> bool,
) {
    while !check().await {
        wait_for(rx, |_| Some(())).await;
    }
}

const TWO_STAGES: &str = r#"
[pipelines.default]
stages = ["analyst", "developer"]
[stages.analyst]
command = ["sh", "-c", "echo analysis > analysis.md"]
[stages.developer]
command = ["sh", "AGENT"]
gate.artifacts = ["dev.md"]
[effects]
push = true
"#;

/// On host-a the developer agent works for two minutes (it is killed first); elsewhere
/// it finishes at once.
const HOST_BOUND_AGENT: &str = r#"
echo "$BATON_WORKSPACE $$" >> "$BATON_WORKSPACE/../../../../starts.txt"
case "$BATON_WORKSPACE" in *host-a*) sleep 120 ;; esac
echo developed > dev.md
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_host_with_its_agents_is_taken_over_by_another() {
    let Some(db) = postgres().await else { return };
    let h = Harness::new(db);
    let agent = h.agent("agent", HOST_BOUND_AGENT);
    let stages = TWO_STAGES.replace("AGENT", &agent);
    let _a = h.host_config("host-a", &stages);
    let config_b = h.host_config("host-b", &stages);
    h.submit("MOVE-1", "analyst").await;
    let key = crate::support::key("MOVE-1");

    // Host A, a real `baton serve`, runs the analyst (pushed) and starts the developer.
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["--config"])
        .arg(h.root.join("hosts/host-a/baton.toml"))
        .arg("serve")
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    let run_a = loop {
        let d = h.db.store.task_detail(&key).await.unwrap();
        let pushed = d
            .effects
            .iter()
            .any(|e| e.kind == baton::model::EffectKind::Push && e.status == EffectStatus::Done);
        let developing = d.jobs.iter().find(|j| j.stage == "developer");
        let run =
            developing.and_then(|j| d.runs.iter().find(|r| r.job_id == j.id && r.pid.is_some()));
        if let (true, Some(run)) = (pushed, run) {
            break run.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host-a never got to the developer"
        );
        // Waiting on another process: nothing here can send a probe event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The host dies with its agents.
    serve.kill().unwrap();
    serve.wait().unwrap();
    baton::agent::signal_group(run_a.pid.unwrap(), nix::sys::signal::Signal::SIGKILL);
    let killed_at = Clock::system().now_ms();

    // Host B takes the developer over once host-a's heartbeat is older than the timeout.
    let (node_b, mut rx) = h.start(config_b).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    wait_effects_settled(&mut rx, &h.db.store, "MOVE-1").await;
    node_b.shutdown().await;

    let d = h.db.store.task_detail(&key).await.unwrap();
    let dev = d.jobs.iter().find(|j| j.stage == "developer").unwrap();
    let runs: Vec<_> = d.runs.iter().filter(|r| r.job_id == dev.id).collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0].outcome, Some(RunOutcome::Lost));
    assert_eq!(runs[1].outcome, Some(RunOutcome::Passed));
    // The runs never overlapped: host-a's agent was dead before host-b's started, and
    // host-b waited out the heartbeat timeout.
    assert!(
        runs[1].started_at >= killed_at,
        "host-b started while host-a's agent ran"
    );
    let reaped = d
        .events
        .iter()
        .find(|e| e.kind == EventKind::Reaped)
        .unwrap();
    assert!(reaped.detail.contains("\"1\""), "{}", reaped.detail);
    for j in &d.jobs {
        assert_eq!(h.db.store.advances_of(j.id).await.unwrap().len(), 1);
    }
    // Every stage's commit is on the remote, the developer's on top of the analyst's.
    let log = remote_log(&h.root.join("remote.git"), "baton/MOVE-1");
    assert!(log[0].starts_with("developer(MOVE-1)"), "{log:?}");
    assert!(log[1].starts_with("analyst(MOVE-1)"), "{log:?}");
    assert!(
        d.effects.iter().all(|e| e.status == EffectStatus::Done),
        "{:?}",
        d.effects
    );
}

const WAITING: &str = r#"
echo started >> "$BATON_WORKSPACE/../../../../starts.txt"
while [ ! -f "$BATON_WORKSPACE/../../../../go" ]; do sleep 0.05; done
echo done > result.txt
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_longer_than_the_heartbeat_timeout_is_not_a_death() {
    let Some(db) = postgres().await else { return };
    let h = Harness::new(db);
    let agent = h.agent("agent", WAITING);
    let stages = format!(
        "[pipelines.default]\nstages = [\"developer\"]\n[stages.developer]\ncommand = [\"sh\", \"{agent}\"]\ngate.artifacts = [\"result.txt\"]\ncommit = false\n"
    );
    let config_a = h.host_config("host-a", &stages);
    let config_b = h.host_config("host-b", &stages);
    let s = h.submit("STAY-1", "developer").await;
    let (node_a, mut rx_a) = h.start(config_a.clone()).await;
    wait_for(&mut rx_a, |ev| match ev {
        ProbeEvent::Monitor {
            event: MonitorEvent::Start,
            ..
        } => Some(()),
        _ => None,
    })
    .await;
    let (node_b, mut rx_b) = h.start(config_b).await;
    // Host A stops cleanly, leaving its agent running, and stays down longer than the
    // heartbeat timeout.
    node_a.shutdown().await;
    let stopped = std::time::Instant::now();
    let timeout = config_a.reaper.heartbeat_timeout;
    let mut passes = 0;
    while stopped.elapsed() < timeout + Duration::from_secs(1) || passes < 2 {
        let (result, claims) = wait_for(&mut rx_b, |ev| match ev {
            ProbeEvent::Reaper { result, claims } => Some((result.clone(), claims.clone())),
            _ => None,
        })
        .await;
        assert!(
            claims.is_empty(),
            "host-b reaped a restarting host's run: {claims:?}"
        );
        if stopped.elapsed() > timeout {
            assert_eq!(result.n_host_alive, 1, "{result:?}");
            passes += 1;
        }
    }
    // Host A comes back, adopts its agent, and finishes the stage.
    let (node_a, mut rx_a) = h.start(config_a).await;
    wait_for(&mut rx_a, |ev| match ev {
        ProbeEvent::Monitor {
            event: MonitorEvent::Start,
            ..
        } => Some(()),
        _ => None,
    })
    .await;
    std::fs::write(h.root.join("go"), "").unwrap();
    assert_eq!(wait_task_end(&mut rx_a).await, TaskStatus::Done);
    node_a.shutdown().await;
    node_b.shutdown().await;
    let d =
        h.db.store
            .task_detail(&crate::support::key("STAY-1"))
            .await
            .unwrap();
    assert_eq!(d.runs.len(), 1, "the agent was started again: {:?}", d.runs);
    let starts = std::fs::read_to_string(h.root.join("starts.txt")).unwrap();
    assert_eq!(starts.lines().count(), 1);
    let k = kinds(&d.events);
    assert!(k.contains(&EventKind::RunAdopted), "{k:?}");
    assert!(!k.contains(&EventKind::Reaped), "{k:?}");
    assert_eq!(h.db.store.advances_of(s.job.id).await.unwrap().len(), 1);
}

async fn a_cancel_racing_claims_leaves_nothing_to_run(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        "[pipelines.default]\nstages = [\"s1\", \"s2\", \"s3\"]\n[stages.s1]\ncommand = [\"true\"]\ncommit = false\n[stages.s2]\ncommand = [\"true\"]\ncommit = false\n[stages.s3]\ncommand = [\"true\"]\ncommit = false\n",
    );
    let keys: Vec<String> = (0..24).map(|i| format!("RACE-{i}")).collect();
    for k in &keys {
        h.submit(k, "s1").await;
    }
    let (node, mut rx) = h.start(config).await;
    // Cancels arrive while the tasks advance: before, between and during their stages.
    let mut cancels = tokio::task::JoinSet::new();
    for (i, k) in keys.iter().enumerate() {
        let store = h.db.store.clone();
        let key = crate::support::key(k);
        cancels.spawn(async move {
            for _ in 0..i {
                tokio::task::yield_now().await;
            }
            let _ = baton::tasks::cancel(&store, &key, Origin::Cli, Clock::system().now_ms(), "x")
                .await;
        });
    }
    while cancels.join_next().await.is_some() {}
    let store = h.db.store.clone();
    until(&mut rx, async || {
        store.list_tasks(None).await.unwrap().iter().all(|t| {
            t.task.status != TaskStatus::Active
                && t.jobs.iter().all(|j| j.status != JobStatus::Running)
        })
    })
    .await;
    node.shutdown().await;
    for t in h.db.store.list_tasks(None).await.unwrap() {
        let live: Vec<_> = t
            .jobs
            .iter()
            .filter(|j| matches!(j.status, JobStatus::Queued | JobStatus::Running))
            .collect();
        assert!(
            live.is_empty(),
            "{} is {} with live jobs {live:?}",
            t.task.key,
            t.task.status
        );
        let events = h.db.store.events(t.task.id).await.unwrap();
        if let Some(at) = events
            .iter()
            .position(|e| e.kind == EventKind::TaskCancelled)
        {
            let after: Vec<_> = events[at..].iter().map(|e| e.kind).collect();
            assert!(
                !after.contains(&EventKind::JobQueued) && !after.contains(&EventKind::TaskDone),
                "{} advanced after its cancel: {after:?}",
                t.task.key
            );
            assert_eq!(t.task.status, TaskStatus::Cancelled);
        } else {
            assert_eq!(t.task.status, TaskStatus::Done);
        }
        for j in &t.jobs {
            assert!(h.db.store.advances_of(j.id).await.unwrap().len() <= 1);
        }
    }
}
on_both!(
    a_cancel_racing_claims_leaves_nothing_to_run,
    a_cancel_racing_claims_leaves_nothing_to_run
);

async fn a_config_that_lost_a_stage_fails_its_tasks_only_when_told(db: TestDb) {
    let h = Harness::new(db);
    let old = h.config(
        "[pipelines.default]\nstages = [\"analyst\", \"architect\"]\n[stages.analyst]\ncommand = [\"true\"]\n[stages.architect]\ncommand = [\"true\"]\n",
    );
    drop(old);
    h.submit("DRIFT-1", "architect").await;
    h.submit("KEEP-1", "analyst").await;
    // The architect stage is renamed.
    let new = h.config(
        "[pipelines.default]\nstages = [\"analyst\", \"designer\"]\n[stages.analyst]\ncommand = [\"true\"]\n[stages.designer]\ncommand = [\"true\"]\n",
    );
    // `config check` names what the new config would orphan.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(h.root.join("baton.toml"))
        .args(["config", "check"])
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("DRIFT-1: its stage architect is not in the config"),
        "{text}"
    );
    assert!(!text.contains("KEEP-1"), "{text}");
    // `serve` refuses it, writing nothing.
    let refused = Node::start(new.clone(), ServeOptions::default()).await;
    let Err(e) = refused else {
        panic!("serve started with an orphaning config")
    };
    assert!(e.to_string().contains("DRIFT-1"), "{e}");
    assert!(e.to_string().contains("--orphaned fail"), "{e}");
    // Told to, it fails them with the reason, and runs the rest.
    let (node, mut rx) = h
        .start_with(
            new,
            ServeOptions {
                orphaned: OrphanPolicy::Fail,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    let drift =
        h.db.store
            .task_detail(&crate::support::key("DRIFT-1"))
            .await
            .unwrap();
    assert_eq!(drift.task.status, TaskStatus::Failed);
    let failed = drift
        .events
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed)
        .unwrap();
    assert!(
        failed
            .detail
            .contains("stage architect is not in the config"),
        "{}",
        failed.detail
    );
    let keep =
        h.db.store
            .task_by_key(&crate::support::key("KEEP-1"))
            .await
            .unwrap();
    assert_eq!(keep.status, TaskStatus::Done);
}
on_both!(
    a_config_that_lost_a_stage_fails_its_tasks_only_when_told,
    a_config_that_lost_a_stage_fails_its_tasks_only_when_told
);

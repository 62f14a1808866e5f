//! Stages as teams configure them: a gate that runs a real test suite for as long as its
//! `gate.timeout` (and no longer, its whole process group included), a stage's own
//! environment, a bound on a stage's concurrent agents.

use std::time::Duration;

use baton::model::{EventKind, TaskStatus};

use crate::on_both;
use crate::support::harness::*;
use crate::support::{Backend, TestDb};

/// A gate command longer than half of `finalize_grace` (the old bound) passes: the
/// finalizing Monitor is alive, so nothing reaps its run, whose exit was recorded before
/// the gate command started. One past `gate.timeout` is
/// ended with its whole process group, a grandchild that ignores its parent included.
async fn a_gate_runs_until_its_timeout_and_no_longer(db: TestDb) {
    let h = Harness::new(db);
    let pidfile = h.root.join("grandchild.pid");
    let (started, release) = (h.root.join("gate.started"), h.root.join("gate.release"));
    let mut config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["long"]
[pipelines.hung]
stages = ["hang"]
[stages.long]
command = ["true"]
gate.command = ["sh", "-c", "touch {started}; while [ ! -e {release} ]; do sleep 0.02; done; sleep 1.5; echo suite passed"]
[stages.hang]
command = ["true"]
gate.command = ["sh", "-c", "(trap '' TERM HUP; sleep 60) & echo $! > {pid}; wait"]
gate.timeout = "1s"
"#,
        pid = pidfile.display(),
        started = started.display(),
        release = release.display(),
    ));
    config.reaper.finalize_grace = Duration::from_secs(2);
    config.retry.max_attempts = 1;
    h.submit("LONG-1", "long").await;
    let (node, mut rx) = h.start(config.clone()).await;
    // While a gate command runs, the run's exit is recorded already (ADR 0001).
    tokio::time::timeout(Duration::from_secs(60), async {
        while !started.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gate command starts");
    let d =
        h.db.store
            .task_detail(&crate::support::key("LONG-1"))
            .await
            .unwrap();
    assert_eq!(d.runs[0].exit_code, Some(0), "{:?}", d.runs[0]);
    assert!(d.events.iter().any(|e| e.kind == EventKind::RunExited));
    std::fs::write(&release, "").unwrap();
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    let d =
        h.db.store
            .task_detail(&crate::support::key("LONG-1"))
            .await
            .unwrap();
    let log = std::fs::read_to_string(&d.runs[0].log_path).unwrap();
    assert!(log.contains("suite passed"), "{log}");
    assert!(
        log.contains("==== baton: gate command ended: exit status: 0 after 1s"),
        "{log}"
    );
    assert!(!d.events.iter().any(|e| e.kind == EventKind::Reaped));

    let store = &h.db.store;
    let now = baton::clock::Clock::system().now_ms();
    let new = baton::store::NewTask {
        key: crate::support::key("HANG-1"),
        pipeline: "hung".into(),
        title: "hangs".into(),
        description: None,
        plane_issue_id: None,
        first_stage: "hang".into(),
        trace_parent: baton::telemetry::new_trace_parent(),
    };
    store
        .submit(new, baton::model::EventSource::Cli, now)
        .await
        .unwrap();
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Killed at the timeout; on a busy machine the kernel may take a moment to end it, so
    // "no longer" is checked as dead within 10 s (it sleeps 60 s unless killed).
    // Waiting on another process: nothing here can send a probe event.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while baton::agent::alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !baton::agent::alive(pid),
        "the gate's grandchild {pid} outlived its timeout"
    );
    let d = store
        .task_detail(&crate::support::key("HANG-1"))
        .await
        .unwrap();
    let shown = baton::present::render_detail(&d, 0);
    assert!(shown.contains("gate command ran longer than 1s"), "{shown}");
}
on_both!(
    a_gate_runs_until_its_timeout_and_no_longer,
    a_gate_runs_until_its_timeout_and_no_longer
);

/// `max_concurrent = 1`: two tasks never run the stage at once, and the Dispatcher skips
/// the stage at its bound instead of waiting on it: another task's other stage starts
/// meanwhile.
async fn a_bounded_stage_runs_one_agent_at_a_time_and_others_go_on(db: TestDb) {
    let h = Harness::new(db);
    let root = h.root.display().to_string();
    let config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["first", "slow"]
[stages.first]
command = ["true"]
[stages.slow]
command = ["sh", "-c", "mkdir {root}/slow.lock || echo overlap >> {root}/overlap.txt; sleep 1; rmdir {root}/slow.lock"]
max_concurrent = 1
"#
    ));
    h.submit("SLOW-1", "slow").await;
    h.submit("SLOW-2", "slow").await;
    h.submit("SLOW-3", "first").await;
    let (node, mut rx) = h.start(config).await;
    for _ in 0..3 {
        assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    }
    node.shutdown().await;
    assert!(
        !h.root.join("overlap.txt").exists(),
        "two slow agents ran at once"
    );
    let run_of = async |key: &str, stage: &str| {
        let d =
            h.db.store
                .task_detail(&crate::support::key(key))
                .await
                .unwrap();
        let job = d.jobs.iter().find(|j| j.stage == stage).unwrap().id;
        d.runs.into_iter().find(|r| r.job_id == job).unwrap()
    };
    let (one, two) = (
        run_of("SLOW-1", "slow").await,
        run_of("SLOW-2", "slow").await,
    );
    let (a, b) = if one.started_at <= two.started_at {
        (one, two)
    } else {
        (two, one)
    };
    assert!(b.started_at >= a.exited_at.unwrap(), "{a:?} {b:?}");
    let other = run_of("SLOW-3", "first").await;
    assert!(
        other.started_at < a.exited_at.unwrap(),
        "another stage waited for the bounded one"
    );
}
on_both!(
    a_bounded_stage_runs_one_agent_at_a_time_and_others_go_on,
    a_bounded_stage_runs_one_agent_at_a_time_and_others_go_on
);

/// A stage's `env` reaches its agent and its gate: literals, and values taken from
/// baton's environment by name, which no other stage's agent sees and which appear in
/// neither the logs nor `config check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_env_reaches_its_agent_and_gate_only() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let h = Harness::new(db);
    let root = h.root.display().to_string();
    let one = h.agent(
        "one",
        &format!("echo \"$MODEL|$API_KEY|${{BATON_TEST_STAGE_SRC:-unset}}\" > {root}/one-env.txt"),
    );
    let two = h.agent(
        "two",
        &format!(
            "echo \"${{API_KEY:-unset}}|${{BATON_TEST_STAGE_SRC:-unset}}\" > {root}/two-env.txt"
        ),
    );
    let gate = h.agent("gate", "test ${#API_KEY} = 12 && test \"$MODEL\" = opus");
    h.config(&format!(
        r#"
[pipelines.default]
stages = ["one", "two"]
[stages.one]
command = ["sh", "{one}"]
env = {{ MODEL = "opus", API_KEY = "${{BATON_TEST_STAGE_SRC}}" }}
gate.command = ["sh", "{gate}"]
[stages.two]
command = ["sh", "{two}"]
"#
    ));
    h.submit("ENV-1", "one").await;
    let config = h.root.join("baton.toml");
    let serve = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env("BATON_TEST_STAGE_SRC", "s3cr3t-value")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let key = crate::support::key("ENV-1");
    let task = task_end_elsewhere(&h.db.store, "ENV-1").await;
    stop_serve(serve);
    assert_eq!(task.status, TaskStatus::Done);
    let one = std::fs::read_to_string(h.root.join("one-env.txt")).unwrap();
    assert_eq!(one.trim(), "opus|s3cr3t-value|unset");
    let two = std::fs::read_to_string(h.root.join("two-env.txt")).unwrap();
    assert_eq!(
        two.trim(),
        "unset|unset",
        "another stage saw the first stage's env"
    );
    let d = h.db.store.task_detail(&key).await.unwrap();
    for r in &d.runs {
        let log = std::fs::read_to_string(&r.log_path).unwrap_or_default();
        assert!(!log.contains("s3cr3t-value"), "{log}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(&config)
        .args(["config", "check"])
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env("BATON_TEST_STAGE_SRC", "s3cr3t-value")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("s3cr3t-value"), "{text}");
    assert!(
        text.contains("# stages.one.env.API_KEY: $BATON_TEST_STAGE_SRC is set"),
        "{text}"
    );
}

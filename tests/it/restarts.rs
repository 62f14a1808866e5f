//! Restarts and adoption: a real `baton serve` process killed, then a new node; a
//! shutdown that stops its agents, and one that a hand-off meets.

use std::time::Duration;

use baton::actors::ProbeEvent;
use baton::actors::monitor::{MonitorEvent, MonitorMode};
use baton::actors::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};
use baton::model::{EventKind, JobStatus, RunOutcome, TaskStatus};
use baton::service::ServeOptions;

use crate::on_both;
use crate::support::TestDb;
use crate::support::harness::*;

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
        let tasks =
            h.db.store
                .task_detail(&crate::support::key("ADOPT-1"))
                .await
                .unwrap();
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
        ProbeEvent::Monitor {
            event: MonitorEvent::Start,
            run_id,
            ..
        } if *run_id == run.id => Some(()),
        _ => None,
    })
    .await;
    std::fs::write(h.root.join("go"), "").unwrap();
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;

    let starts = std::fs::read_to_string(h.root.join("starts.txt")).unwrap();
    assert_eq!(starts.lines().count(), 1, "the agent was started twice");
    let detail =
        h.db.store
            .task_detail(&crate::support::key("ADOPT-1"))
            .await
            .unwrap();
    let dev_runs: Vec<_> = detail
        .runs
        .iter()
        .filter(|r| r.job_id == s.job.id)
        .collect();
    assert_eq!(dev_runs.len(), 1);
    assert_eq!(dev_runs[0].outcome, Some(RunOutcome::Passed));
    let k = kinds(&detail.events);
    assert_eq!(k.iter().filter(|k| **k == EventKind::RunAdopted).count(), 1);
    assert_eq!(k.iter().filter(|k| **k == EventKind::ClaimWon).count(), 2);
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
    let log = std::path::Path::new(&run.log_path);
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    while baton::agent::read_exit(log).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the shim never recorded the exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    let detail =
        h.db.store
            .task_detail(&crate::support::key("ADOPT-1"))
            .await
            .unwrap();
    assert_eq!(detail.runs.len(), 1);
    assert_eq!(detail.runs[0].exit_code, Some(0));
    let starts = std::fs::read_to_string(h.root.join("starts.txt")).unwrap();
    assert_eq!(starts.lines().count(), 1);
    let k = kinds(&detail.events);
    assert_eq!(k.iter().filter(|k| **k == EventKind::RunExited).count(), 1);
    assert_eq!(k.iter().filter(|k| **k == EventKind::ClaimWon).count(), 1);
    assert_eq!(h.db.store.advances_of(s.job.id).await.unwrap().len(), 1);
}
on_both!(
    restart_after_the_agent_exited_while_down_finalizes_once,
    restart_after_the_agent_exited_while_down_finalizes_once
);

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
    let detail =
        h.db.store
            .task_detail(&crate::support::key("STOP-1"))
            .await
            .unwrap();
    assert_eq!(detail.runs[0].outcome, Some(RunOutcome::Failed));
    assert_eq!(
        detail.jobs[0].status,
        JobStatus::Queued,
        "the interrupted attempt is retried"
    );
    let won = detail
        .events
        .iter()
        .find(|e| e.kind == EventKind::ClaimWon)
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

/// A Monitor asked for while the Supervisor shuts down (a hand-off decided just before
/// the node began stopping) is not dropped with the Supervisor's mailbox: once the
/// shutdown is done, its job is put back in the queue and its run cancelled.
async fn a_monitor_asked_for_during_shutdown_has_its_job_put_back(db: TestDb) {
    let s = crate::reaper_windows::claim_setup_with(&db, db.store.clone(), None).await;
    // The job a hand-off took for this node, its place reserved as the Advancer does.
    let now = s.ctx.clock.now_ms();
    crate::support::submit(&db.store, "LATE-1", "analyst", now).await;
    let d = db
        .store
        .dispatch(&s.ctx.node_id, db.dir.path(), None, now)
        .await
        .unwrap()
        .expect("the job to hand to the Supervisor");
    s.ctx.watched.insert(d.run.id, d.job.id);
    let args = SupervisorArgs::new(s.ctx.clone());
    let (supervisor, handle) = ractor::Actor::spawn(None, Supervisor, args).await.unwrap();
    // The shutdown first, then the Monitor, which waits in the mailbox behind it.
    let (tx, rx) = ractor::concurrency::oneshot();
    let shutdown = SupervisorMsg::Shutdown {
        stop_agents: false,
        reply: tx.into(),
    };
    supervisor.send_message(shutdown).unwrap();
    let start = SupervisorMsg::StartMonitor(Box::new(d.clone()), MonitorMode::Fresh);
    supervisor.send_message(start).unwrap();
    rx.await.unwrap();
    tokio::time::timeout(PROBE_WAIT, handle)
        .await
        .expect("the Supervisor stops")
        .unwrap();
    crate::handoff::assert_put_back(&db, &d).await;
    assert!(!s.ctx.watched.contains(d.run.id));
}
/// On a runtime of one thread: the Supervisor cannot run, and end its shutdown, between
/// the test's two sends (on two, a busy machine could pause the test between them).
mod a_monitor_asked_for_during_shutdown_has_its_job_put_back {
    use crate::support::{Backend, TestDb};

    #[tokio::test]
    async fn sqlite() {
        if let Some(db) = TestDb::new(Backend::Sqlite).await {
            super::a_monitor_asked_for_during_shutdown_has_its_job_put_back(db).await;
        }
    }

    #[tokio::test]
    async fn postgres() {
        if let Some(db) = TestDb::new(Backend::Postgres).await {
            super::a_monitor_asked_for_during_shutdown_has_its_job_put_back(db).await;
        }
    }
}

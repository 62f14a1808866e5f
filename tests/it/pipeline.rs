//! Pipelines end to end: real agent processes, real git, the actors, on SQLite and
//! PostgreSQL. Tests wait on probe events, never on sleeps.

use std::time::Duration;

use baton::actors::ProbeEvent;
use baton::actors::monitor::MonitorEvent;
use baton::clock::Clock;
use baton::model::{EffectStatus, EventKind, JobStatus, RunOutcome, TaskStatus};

use crate::on_both;
use crate::support::TestDb;
use crate::support::harness::*;

async fn four_stage_pipeline_end_to_end(db: TestDb) {
    let h = Harness::new(db);
    let agent = h.agent("agent", FOUR_STAGE_AGENT);
    let mut config = h.config(&FOUR_STAGES.replace("AGENT", &agent));
    // HOME stands in for a secret: it is set in every test environment.
    config.http.token_env = Some("HOME".into());
    let ws_root = config.workspace_root.clone();
    let submitted = h.submit("ORCH-65", "analyst").await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    wait_effects_settled(&mut rx, &h.db.store, "ORCH-65").await;
    node.shutdown().await;

    let detail =
        h.db.store
            .task_detail(&crate::support::key("ORCH-65"))
            .await
            .unwrap();
    // Every push was performed: the remote has the branch at the last commit.
    assert!(
        detail
            .effects
            .iter()
            .all(|e| e.status == EffectStatus::Done),
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
    assert!(detail.jobs.iter().all(|j| j.status == JobStatus::Done));
    for j in &detail.jobs {
        assert_eq!(
            h.db.store.advances_of(j.id).await.unwrap().len(),
            1,
            "one advance per job"
        );
    }
    let outcomes: Vec<RunOutcome> = detail.runs.iter().map(|r| r.outcome.unwrap()).collect();
    assert_eq!(
        outcomes,
        [
            RunOutcome::Passed,
            RunOutcome::Passed,
            RunOutcome::Passed,
            RunOutcome::Rejected,
            RunOutcome::Passed,
            RunOutcome::Passed,
        ]
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
        detail
            .effects
            .iter()
            .filter(|e| e.kind == baton::model::EffectKind::Push)
            .count(),
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
    assert_eq!(k.iter().filter(|k| **k == EventKind::ClaimWon).count(), 6);
    assert!(k.contains(&EventKind::TaskDone));
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
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
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
    let failed = events
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed)
        .unwrap();
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
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    let detail =
        h.db.store
            .task_detail(&crate::support::key("RETRY-1"))
            .await
            .unwrap();
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
        .filter(|e| e.kind == EventKind::RetryScheduled)
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.detail).unwrap()["backoff_ms"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(backoffs, [100, 200], "exponential backoff");
    // The next attempt never started before its backoff.
    let at = |kind: EventKind, n: usize| {
        detail
            .events
            .iter()
            .filter(|e| e.kind == kind)
            .nth(n)
            .unwrap()
            .at
    };
    assert!(at(EventKind::RunStarted, 1) >= at(EventKind::RetryScheduled, 0) + 100);
    assert!(at(EventKind::RunStarted, 2) >= at(EventKind::RetryScheduled, 1) + 200);
    let failed = detail
        .events
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed)
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
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    let detail =
        h.db.store
            .task_detail(&crate::support::key("NOCMD-1"))
            .await
            .unwrap();
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
        .find(|e| e.kind == EventKind::RunExited)
        .unwrap();
    assert!(
        exited.detail.contains("baton-no-such-agent-xyz"),
        "{}",
        exited.detail
    );
    let failed = detail
        .events
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed)
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
        ProbeEvent::Monitor {
            event: MonitorEvent::Timeout,
            ..
        } => Some(()),
        _ => None,
    });
    timeout_seen.await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the agent was not killed"
    );
    let detail =
        h.db.store
            .task_detail(&crate::support::key("SLOW-1"))
            .await
            .unwrap();
    assert_eq!(detail.runs[0].outcome, Some(RunOutcome::Timeout));
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
        ProbeEvent::Monitor {
            event: MonitorEvent::Start,
            run_id,
            ..
        } => Some(*run_id),
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
        .cancel(
            &crate::support::key("CANCEL-1"),
            baton::model::EventSource::Cli,
            Clock::system().now_ms(),
        )
        .await
        .unwrap();
    wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Monitor {
            event: MonitorEvent::Exited(_),
            run_id: r,
            ..
        } if *r == run_id => Some(()),
        _ => None,
    })
    .await;
    node.shutdown().await;
    assert!(!baton::agent::alive(pid));
    let k = kinds(&h.db.store.events(s.task.id).await.unwrap());
    assert!(
        k.contains(&EventKind::TaskCancelled) && !k.contains(&EventKind::ClaimWon),
        "{k:?}"
    );
}
on_both!(cancel_stops_a_running_agent, cancel_stops_a_running_agent);

async fn a_gate_command_runs_without_secrets_and_its_output_is_kept(db: TestDb) {
    let h = Harness::new(db);
    let seen = h.root.join("gate-env.txt");
    let mut config = h.config(&format!(
        r#"
[pipelines.default]
stages = ["developer"]
[stages.developer]
command = ["true"]
gate.command = ["sh", "-c", "env > {}; echo 'test greet_by_name ... FAILED'; exit 1"]
"#,
        seen.display()
    ));
    // HOME stands in for a secret: it is set in every test environment.
    config.http.token_env = Some("HOME".into());
    h.submit("GATE-1", "developer").await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    let env = std::fs::read_to_string(&seen).unwrap();
    assert!(env.contains("BATON_TASK=GATE-1"), "{env}");
    assert!(
        !env.lines().any(|l| l.starts_with("HOME=")),
        "the gate saw a secret: {env}"
    );
    let d =
        h.db.store
            .task_detail(&crate::support::key("GATE-1"))
            .await
            .unwrap();
    let log = std::fs::read_to_string(&d.runs[0].log_path).unwrap();
    assert!(log.contains("==== baton: gate command"), "{log}");
    assert!(log.contains("test greet_by_name ... FAILED"), "{log}");
    let failed = d
        .events
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed)
        .unwrap();
    assert!(
        failed.detail.contains("gate command exited with code 1")
            && failed.detail.contains("test greet_by_name ... FAILED"),
        "{}",
        failed.detail
    );
}
on_both!(
    a_gate_command_runs_without_secrets_and_its_output_is_kept,
    a_gate_command_runs_without_secrets_and_its_output_is_kept
);

/// A claim that cannot be decided (here every transaction that writes an advance is
/// refused) leaves the exit to its Monitor, which records it on its own; the run is then
/// the Reaper's, once its grace window has passed and the database takes advances again.
async fn an_undecided_claim_leaves_the_exit_recorded_for_the_reaper(db: TestDb) {
    let h = Harness::new(db);
    let mut config = h.config(
        r#"
[pipelines.default]
stages = ["analyst"]
[stages.analyst]
command = ["true"]
"#,
    );
    config.reaper.finalize_grace = Duration::from_secs(1);
    let postgres = h.db.url.starts_with("postgres");
    let (refuse, allow): (&[&str], &str) = if postgres {
        (
            &[
                "CREATE FUNCTION refuse_advance() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'advances refused'; END $$",
                "CREATE TRIGGER refuse_advance BEFORE INSERT ON advances \
                 FOR EACH ROW EXECUTE FUNCTION refuse_advance()",
            ],
            "DROP TRIGGER refuse_advance ON advances",
        )
    } else {
        (
            &["CREATE TRIGGER refuse_advance BEFORE INSERT ON advances \
               BEGIN SELECT RAISE(ABORT, 'advances refused'); END"],
            "DROP TRIGGER refuse_advance",
        )
    };
    for sql in refuse {
        h.db.execute(sql).await;
    }
    h.submit("UNDECIDED-1", "analyst").await;
    let (node, mut rx) = h.start(config).await;
    wait_for(&mut rx, |ev| {
        matches!(
            ev,
            ProbeEvent::Monitor {
                event: MonitorEvent::Claimed(None),
                ..
            }
        )
        .then_some(())
    })
    .await;
    let key = crate::support::key("UNDECIDED-1");
    let d = h.db.store.task_detail(&key).await.unwrap();
    assert_eq!(d.runs.len(), 1);
    assert_eq!(d.runs[0].exit_code, Some(0), "{:?}", d.runs[0]);
    assert!(d.runs[0].exited_at.is_some(), "{:?}", d.runs[0]);
    assert_eq!(d.jobs[0].status, JobStatus::Running);
    let exited = |d: &baton::store::TaskDetail| {
        d.events
            .iter()
            .filter(|e| e.kind == EventKind::RunExited)
            .count()
    };
    assert_eq!(exited(&d), 1);

    h.db.execute(allow).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    let d = h.db.store.task_detail(&key).await.unwrap();
    let advances = h.db.store.advances_of(d.jobs[0].id).await.unwrap();
    assert_eq!(advances.len(), 1);
    assert_eq!(advances[0].decided_by, entity::AdvanceDecider::Reaper);
    assert_eq!(exited(&d), 1, "the exit is recorded once");
    node.shutdown().await;
}
on_both!(
    an_undecided_claim_leaves_the_exit_recorded_for_the_reaper,
    an_undecided_claim_leaves_the_exit_recorded_for_the_reaper
);

/// A stage's work reaches the remote however its agent left it: an agent that committed
/// everything itself has its commits pushed (they are the stage's commit), and one that
/// left the checkout detached has baton's auto-commit moved onto the task's branch.
async fn a_stage_whose_agent_committed_or_left_the_branch_is_pushed(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        r#"
[pipelines.default]
stages = ["one", "two"]
[stages.one]
command = ["sh", "-c", "echo one > one.txt && git add one.txt && git -c user.name=agent -c user.email=agent@localhost commit -qm 'agent one'"]
[stages.two]
command = ["sh", "-c", "git checkout -q --detach && echo two > two.txt"]
"#,
    );
    let d = h.run_to_done(config, "OWN-1", "one").await;
    let remote = remote_commits(&h.root.join("remote.git"), "baton/OWN-1");
    let summaries: Vec<&str> = remote.iter().map(|(_, s)| s.as_str()).collect();
    let two = format!("two(OWN-1): auto-commit from two run_id={}", d.runs[1].id);
    assert_eq!(summaries[..2], [two.as_str(), "agent one"], "{summaries:?}");
    // The agent's own commit is stage one's; stage two's is the branch's tip.
    assert_eq!(d.runs[0].commit_sha.as_deref(), Some(remote[1].0.as_str()));
    assert_eq!(d.runs[1].commit_sha.as_deref(), Some(remote[0].0.as_str()));
}
on_both!(
    a_stage_whose_agent_committed_or_left_the_branch_is_pushed,
    a_stage_whose_agent_committed_or_left_the_branch_is_pushed
);

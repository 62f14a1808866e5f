//! A run's life after dispatch: its exit recorded once, its start with or after it; a
//! task's cancel and retry, and a cancel that finds an agent whose start is not recorded
//! yet.

use baton::model::{ClaimOutcome, Decider, EventKind, EventSource, ReapTier, TaskStatus, Verdict};
use baton::store::Started;

use crate::on_both;
use crate::store::{
    NOW, claim, exits_recorded, kinds, policy, record_exit, run_exit, submit, take,
};
use crate::support::TestDb;

async fn record_exit_counts_once(db: TestDb) {
    let s = submit(&db.store, "E-1").await;
    let d = take(&db, NOW).await;
    assert!(record_exit(&db, s.task.id, &d.run, 0, NOW + 5).await);
    assert!(!record_exit(&db, s.task.id, &d.run, 1, NOW + 9).await);
    let run = db.store.run(d.run.id).await.unwrap().unwrap();
    assert_eq!((run.exit_code, run.exited_at), (Some(0), Some(NOW + 5)));
}
on_both!(record_exit_counts_once, record_exit_counts_once);

/// Records the start of agent `pid` with an exit of `code`; true when the exit was new.
async fn start_and_exit(
    db: &TestDb,
    task_id: i64,
    run: &entity::agent_runs::Model,
    pid: i32,
    code: i32,
    at: i64,
) -> bool {
    let started = Started {
        pid,
        prompt: Some(format!("prompt {pid}")),
        at: NOW + 1,
    };
    let exit = run_exit(task_id, run, Some(started), code, at);
    db.store.record_start_and_exit(&exit).await.unwrap()
}

/// A start not yet recorded is written with the exit; when the exit was recorded already
/// (by another writer), the start still is, and the exit stays the first one.
async fn a_pending_start_is_recorded_with_the_exit_or_after_it(db: TestDb) {
    let s = submit(&db.store, "E-2").await;
    let d = take(&db, NOW).await;
    assert!(start_and_exit(&db, s.task.id, &d.run, 41, 3, NOW + 5).await);
    let run = db.store.run(d.run.id).await.unwrap().unwrap();
    assert_eq!(
        (run.pid, run.prompt.as_deref(), run.exit_code, run.exited_at),
        (Some(41), Some("prompt 41"), Some(3), Some(NOW + 5))
    );

    let t = submit(&db.store, "E-3").await;
    let e = take(&db, NOW).await;
    assert!(record_exit(&db, t.task.id, &e.run, 0, NOW + 5).await);
    assert!(!start_and_exit(&db, t.task.id, &e.run, 42, 9, NOW + 9).await);
    let run = db.store.run(e.run.id).await.unwrap().unwrap();
    assert_eq!(
        (run.pid, run.exit_code, run.exited_at),
        (Some(42), Some(0), Some(NOW + 5))
    );
    let events = db.store.events(t.task.id).await.unwrap();
    let runs: Vec<&str> = kinds(&events)
        .into_iter()
        .filter(|k| k.starts_with("run_"))
        .collect();
    assert_eq!(runs, ["run_exited", "run_started"]);
    // A start recorded already is not written again, nor its event.
    assert!(!start_and_exit(&db, t.task.id, &e.run, 43, 9, NOW + 9).await);
    let run = db.store.run(e.run.id).await.unwrap().unwrap();
    assert_eq!(run.pid, Some(42));
    let events = db.store.events(t.task.id).await.unwrap();
    let starts = kinds(&events).into_iter().filter(|k| *k == "run_started");
    assert_eq!(starts.count(), 1);
}
on_both!(
    a_pending_start_is_recorded_with_the_exit_or_after_it,
    a_pending_start_is_recorded_with_the_exit_or_after_it
);

/// The Monitor's claim that the run of `job` passed, carrying `exit`: it must win.
async fn win_with_exit(
    db: &TestDb,
    job: &entity::jobs::Model,
    run_id: i64,
    exit: &baton::store::RunExit,
    now: i64,
) {
    let won = claim(job, run_id, Verdict::Passed, Decider::Monitor);
    let (outcome, _) = db
        .store
        .claim_and_take(&won, Some(exit), &policy(), now, None)
        .await
        .unwrap();
    assert!(matches!(outcome, ClaimOutcome::Won(_)), "{outcome:?}");
}

/// A claim that carries its run's exit and ends its task writes both, with the start the
/// exit carries (on PostgreSQL the exit, the fence and the task's end are one statement,
/// whose result says what it wrote of each).
async fn a_claim_that_ends_its_task_writes_the_exit_it_carries(db: TestDb) {
    let s = submit(&db.store, "W-9").await;
    for (i, stage) in ["analyst", "developer", "reviewer"].into_iter().enumerate() {
        let at = NOW + 100 * i as i64;
        let d = take(&db, at).await;
        assert_eq!(d.job.stage, stage);
        let start = Started {
            pid: 70 + i as i32,
            prompt: None,
            at: at + 1,
        };
        let exit = run_exit(s.task.id, &d.run, Some(start), 0, at + 5);
        // No commit: no push of its own, so the last claim ends the task.
        let mut won = claim(&d.job, d.run.id, Verdict::Passed, Decider::Monitor);
        won.commit_sha = None;
        let (outcome, _) = db
            .store
            .claim_and_take(&won, Some(&exit), &policy(), at + 6, None)
            .await
            .unwrap();
        let ClaimOutcome::Won(w) = outcome else {
            panic!("the {stage}'s claim lost: {outcome:?}")
        };
        let ended = (stage == "reviewer").then_some(TaskStatus::Done);
        assert_eq!(w.task_status, ended, "{stage}");
        let run = db.store.run(d.run.id).await.unwrap().unwrap();
        assert_eq!(
            (run.pid, run.exit_code, run.exited_at),
            (Some(70 + i as i32), Some(0), Some(at + 5)),
            "{stage}"
        );
    }
    let task = db.store.task(s.task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::Done);
    let events = db.store.events(s.task.id).await.unwrap();
    let kinds = kinds(&events);
    let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
    assert_eq!(
        (
            count("run_started"),
            count("run_exited"),
            count("task_done")
        ),
        (3, 3, 1),
        "{kinds:?}"
    );
    assert!(kinds.last() == Some(&"task_done"), "{kinds:?}");
}
on_both!(
    a_claim_that_ends_its_task_writes_the_exit_it_carries,
    a_claim_that_ends_its_task_writes_the_exit_it_carries
);

/// A Monitor's exit carried by its claim: written first in the claim's transaction when
/// the claim wins, and still written (before the arbiter's `claim_lost`) when it loses.
async fn an_exit_carried_by_a_claim_is_written_first_whether_it_wins_or_loses(db: TestDb) {
    let policy = policy();
    let exit_of = |task_id: i64, run: &entity::agent_runs::Model, pid: i32| {
        let started = Started {
            pid,
            prompt: None,
            at: NOW + 1,
        };
        run_exit(task_id, run, Some(started), 0, NOW + 5)
    };
    let s = submit(&db.store, "X-1").await;
    let d = take(&db, NOW).await;
    let exit = exit_of(s.task.id, &d.run, 51);
    win_with_exit(&db, &d.job, d.run.id, &exit, NOW + 6).await;
    let run = db.store.run(d.run.id).await.unwrap().unwrap();
    assert_eq!(
        (run.pid, run.exit_code, run.exited_at),
        (Some(51), Some(0), Some(NOW + 5))
    );
    let events = db.store.events(s.task.id).await.unwrap();
    let k = kinds(&events);
    assert_eq!(
        &k[k.len() - 5..],
        [
            "run_started",
            "run_exited",
            "claim_won",
            "job_queued",
            "job_advanced"
        ]
    );
    let exited = events
        .iter()
        .find(|e| e.kind == EventKind::RunExited)
        .unwrap();
    assert_eq!(exited.at, NOW + 5);
    assert!(
        exited.detail.contains("\"exit_code\":0"),
        "{}",
        exited.detail
    );

    // The Reaper's claim of a run wins first; the run's Monitor, finalizing meanwhile,
    // then finds it advanced: its exit is recorded all the same, and nothing else of
    // its claim is (invariant 2).
    let t = submit(&db.store, "X-2").await;
    let e = take(&db, NOW).await;
    let reaped = claim(
        &e.job,
        e.run.id,
        Verdict::Passed,
        Decider::Reaper(ReapTier::Unfinished),
    );
    let (outcome, _) = db
        .store
        .claim_and_take(&reaped, None, &policy, NOW + 6, None)
        .await
        .unwrap();
    assert!(matches!(outcome, ClaimOutcome::Won(_)), "{outcome:?}");
    let job_before = db.store.job(e.job.id).await.unwrap().unwrap();
    let jobs_before = db.store.jobs_of(t.task.id).await.unwrap().len();
    let monitor = claim(&e.job, e.run.id, Verdict::Passed, Decider::Monitor);
    let exit = exit_of(t.task.id, &e.run, 52);
    let (outcome, _) = db
        .store
        .claim_and_take(&monitor, Some(&exit), &policy, NOW + 7, None)
        .await
        .unwrap();
    assert_eq!(outcome, ClaimOutcome::AlreadyAdvanced);
    let run = db.store.run(e.run.id).await.unwrap().unwrap();
    assert_eq!(
        (run.pid, run.exit_code, run.exited_at),
        (Some(52), Some(0), Some(NOW + 5))
    );
    assert_eq!(db.store.job(e.job.id).await.unwrap().unwrap(), job_before);
    assert_eq!(
        db.store.jobs_of(t.task.id).await.unwrap().len(),
        jobs_before
    );
    assert_eq!(db.store.advances_of(e.job.id).await.unwrap().len(), 1);
    let events = db.store.events(t.task.id).await.unwrap();
    let k = kinds(&events);
    assert_eq!(
        &k[k.len() - 3..],
        ["run_started", "run_exited", "claim_lost"]
    );
    // A second claim with the same exit, recorded already, writes no second one.
    let (outcome, _) = db
        .store
        .claim_and_take(&monitor, Some(&exit), &policy, NOW + 8, None)
        .await
        .unwrap();
    assert_eq!(outcome, ClaimOutcome::AlreadyAdvanced);
    assert_eq!(exits_recorded(&db, t.task.id).await, 1);
}
on_both!(
    an_exit_carried_by_a_claim_is_written_first_whether_it_wins_or_loses,
    an_exit_carried_by_a_claim_is_written_first_whether_it_wins_or_loses
);

/// A winning claim's exit, when its run's exit or start is recorded already (by the
/// Monitor on its own): only what is missing is written, with its event, once.
async fn a_winning_claim_writes_only_the_missing_part_of_its_exit(db: TestDb) {
    let started = |pid| Started {
        pid,
        prompt: Some(format!("prompt {pid}")),
        at: NOW + 1,
    };
    let runs_of = |events: &[entity::events::Model]| -> Vec<String> {
        let k = kinds(events);
        k.into_iter()
            .filter(|k| k.starts_with("run_"))
            .map(str::to_string)
            .collect()
    };
    // The exit recorded, the start not: the claim writes the start, not its exit.
    let s = submit(&db.store, "W-1").await;
    let d = take(&db, NOW).await;
    assert!(record_exit(&db, s.task.id, &d.run, 0, NOW + 5).await);
    let exit = run_exit(s.task.id, &d.run, Some(started(61)), 9, NOW + 9);
    win_with_exit(&db, &d.job, d.run.id, &exit, NOW + 10).await;
    let run = db.store.run(d.run.id).await.unwrap().unwrap();
    assert_eq!(
        (run.pid, run.prompt.as_deref(), run.exit_code, run.exited_at),
        (Some(61), Some("prompt 61"), Some(0), Some(NOW + 5))
    );
    assert_eq!(run.outcome, Some(baton::model::RunOutcome::Passed));
    let events = db.store.events(s.task.id).await.unwrap();
    assert_eq!(runs_of(&events), ["run_exited", "run_started"]);

    // Both recorded: the claim writes neither.
    let t = submit(&db.store, "W-2").await;
    let e = take(&db, NOW).await;
    assert!(start_and_exit(&db, t.task.id, &e.run, 62, 0, NOW + 5).await);
    let exit = run_exit(t.task.id, &e.run, Some(started(63)), 9, NOW + 9);
    win_with_exit(&db, &e.job, e.run.id, &exit, NOW + 10).await;
    let run = db.store.run(e.run.id).await.unwrap().unwrap();
    assert_eq!(
        (run.pid, run.exit_code, run.exited_at),
        (Some(62), Some(0), Some(NOW + 5))
    );
    let events = db.store.events(t.task.id).await.unwrap();
    assert_eq!(runs_of(&events), ["run_started", "run_exited"]);
}
on_both!(
    a_winning_claim_writes_only_the_missing_part_of_its_exit,
    a_winning_claim_writes_only_the_missing_part_of_its_exit
);

/// A cancel right after an agent's start, before its Monitor recorded the pid (it does a
/// moment later, or never when its node dies first): the shim's status file names the
/// agent, and the agent is stopped.
async fn cancel_stops_an_agent_whose_pid_is_not_recorded_yet(db: TestDb) {
    use baton::tasks::AgentStop;
    let store = &db.store;
    let node = store.register_node("host-a", 4242, NOW).await.unwrap();
    submit(store, "PID-1").await;
    let d = store
        .dispatch(&node, db.dir.path(), None, NOW)
        .await
        .unwrap()
        .expect("a due job");
    assert!(d.run.pid.is_none());
    let log = std::path::PathBuf::from(&d.run.log_path);
    let mut shim = baton::agent::spawn(&baton::agent::AgentSpec {
        argv: vec!["sleep".into(), "120".into()],
        cwd: db.dir.path().to_path_buf(),
        log_path: log.clone(),
        env: Default::default(),
        env_remove: Vec::new(),
        shim_exe: env!("CARGO_BIN_EXE_baton-shim").into(),
    })
    .unwrap();
    let pid = loop {
        if let Some(id) = baton::agent::Identity::of_run(&log) {
            break id.pid;
        }
        // Waiting on another process's file, which no probe can report.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    // Reaped as soon as it ends, as a Monitor's waiter does.
    let shim = tokio::spawn(async move { shim.wait().await });
    let key = crate::support::key("PID-1");
    let cancelled = baton::tasks::cancel(store, &key, baton::model::Origin::Cli, NOW + 1, "host-a")
        .await
        .unwrap();
    assert!(
        matches!(cancelled.runs[..], [(_, AgentStop::Terminated { pid: p })] if p == pid),
        "{:?}",
        cancelled.runs
    );
    shim.await.unwrap().unwrap();
    assert!(!baton::agent::alive(pid), "the agent still runs");
}
on_both!(
    cancel_stops_an_agent_whose_pid_is_not_recorded_yet,
    cancel_stops_an_agent_whose_pid_is_not_recorded_yet
);

async fn cancel_and_retry(db: TestDb) {
    let s = submit(&db.store, "X-1").await;
    let d = take(&db, NOW).await;
    // The node's heartbeat is its live runs' too: one write for all of them.
    db.store.heartbeat_node("n1", NOW + 5).await.unwrap();
    let run = db.store.run(d.run.id).await.unwrap().unwrap();
    assert_eq!(run.heartbeat_at, NOW + 5);
    let watched = [(d.run.id, d.job.id), (d.run.id + 1000, d.job.id)];
    assert_eq!(
        db.store.runs_not_current(&watched).await.unwrap(),
        vec![d.run.id + 1000],
        "a run the job does not run with is not current"
    );
    let runs = db
        .store
        .cancel(&crate::support::key("X-1"), EventSource::Cli, NOW)
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].run.id, d.run.id);
    assert_eq!(
        db.store.task(s.task.id).await.unwrap().status,
        TaskStatus::Cancelled
    );
    assert_eq!(
        db.store.runs_not_current(&watched[..1]).await.unwrap(),
        vec![d.run.id],
        "the monitor learns of the cancel"
    );
    // The cancelled run's claim loses.
    let out = db
        .store
        .claim(
            &claim(&d.job, d.run.id, Verdict::Passed, Decider::Monitor),
            &policy(),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(out, ClaimOutcome::Lost);
    assert!(
        db.store
            .cancel(&crate::support::key("X-1"), EventSource::Cli, NOW)
            .await
            .is_err(),
        "cancelling twice is an error"
    );
    let baton::store::Retried::Job(job) = db
        .store
        .retry(&crate::support::key("X-1"), EventSource::Cli, NOW)
        .await
        .unwrap()
    else {
        panic!("a task that stopped at its first stage retries that stage")
    };
    assert_eq!(
        (job.stage.as_str(), job.iteration, job.attempt),
        ("analyst", 2, 1)
    );
    assert_eq!(
        db.store.task(s.task.id).await.unwrap().status,
        TaskStatus::Active
    );
    assert!(
        db.store
            .retry(&crate::support::key("X-1"), EventSource::Cli, NOW)
            .await
            .is_err(),
        "an active task cannot be retried"
    );
    assert!(matches!(
        db.store
            .cancel(&crate::support::key("NOPE"), EventSource::Cli, NOW)
            .await,
        Err(baton::store::StoreError::NoSuchTask(_))
    ));
}
on_both!(cancel_and_retry, cancel_and_retry);

/// On PostgreSQL, the node's heartbeat skips a run whose row a transaction holds (a group
/// of claims finalizing it) instead of waiting for it: waiting could close a cycle with
/// a group that holds several of the node's runs and takes more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_skips_a_run_a_claim_holds_on_postgres() {
    use sea_orm::{ConnectionTrait, Database, Statement, TransactionTrait};
    let Some(db) = TestDb::new(crate::support::Backend::Postgres).await else {
        return;
    };
    submit(&db.store, "HB-1").await;
    submit(&db.store, "HB-2").await;
    let (held, free) = (take(&db, NOW).await, take(&db, NOW).await);
    let c = Database::connect(db.url.as_str()).await.unwrap();
    let txn = c.begin().await.unwrap();
    let lock = format!(
        "SELECT id FROM agent_runs WHERE id = {} FOR UPDATE",
        held.run.id
    );
    txn.execute_raw(Statement::from_string(txn.get_database_backend(), lock))
        .await
        .unwrap();
    // A heartbeat that waited for the row would wait until the end of the transaction.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        db.store.heartbeat_node("n1", NOW + 50),
    )
    .await
    .expect("the heartbeat waited for a held run")
    .unwrap();
    txn.rollback().await.unwrap();
    c.close().await.unwrap();
    let beat = |run| db.store.run(run);
    let free_run = beat(free.run.id).await.unwrap().unwrap();
    let held_run = beat(held.run.id).await.unwrap().unwrap();
    assert_eq!(free_run.heartbeat_at, NOW + 50);
    assert_eq!(held_run.heartbeat_at, held.run.heartbeat_at);
}

//! The store's atomic operations and invariants 1, 2 and 4 of the product contract.

use std::path::Path;

use baton::config::{Config, EnvOverrides};
use baton::model::{
    Claim, ClaimOutcome, Decider, EventKind, EventSource, JobStatus, ReapTier, TaskStatus, Verdict,
};
use baton::policy::Policy;
use baton::store::{NewTask, Store};
use entity::jobs;

use crate::on_both;
use crate::support::TestDb;

pub const PIPELINE_TOML: &str = r#"
[repo]
url = "/nonexistent/repo.git"
[retry]
max_attempts = 2
backoff_initial = "10s"
backoff_max = "1m"
[pipelines.default]
stages = ["analyst", "developer", "reviewer"]
max_iterations = 2
[stages.analyst]
command = ["true"]
[stages.developer]
command = ["true"]
[stages.reviewer]
command = ["true"]
on_reject = "developer"
gate.verdict = { file = "review.md", approve = "APPROVED", reject = "CHANGES_REQUESTED" }
[effects]
push = true
"#;

pub fn policy() -> Policy {
    let config =
        Config::from_toml(PIPELINE_TOML, Path::new("/tmp"), &EnvOverrides::default()).unwrap();
    config.policy()
}

pub const NOW: i64 = 1_800_000_000_000;

pub async fn submit(store: &Store, key: &str) -> baton::store::Submitted {
    crate::support::submit(store, key, "analyst", NOW).await
}

pub fn claim(job: &jobs::Model, run_id: i64, verdict: Verdict, by: Decider) -> Claim {
    Claim {
        job_id: job.id,
        run_id,
        verdict,
        decided_by: by,
        commit_sha: Some("abc123".into()),
        feedback: None,
        usage: None,
    }
}

/// The exit of `run` with `code`, seen at `at`, with its pending start when `started`.
pub fn run_exit(
    task_id: i64,
    run: &entity::agent_runs::Model,
    started: Option<baton::store::Started>,
    code: i32,
    at: i64,
) -> baton::store::RunExit {
    baton::store::RunExit {
        task_id,
        run: run.clone(),
        started,
        code,
        detail: serde_json::json!({}),
        at,
    }
}

/// The run a job names that does not exist: its claim is fenced, then fails.
pub const MISSING_RUN: i64 = 999_999;

/// Makes job `job_id` name [`MISSING_RUN`] as its current run.
pub async fn name_a_missing_run(db: &TestDb, job_id: i64) {
    let sql = format!("UPDATE jobs SET current_run_id = {MISSING_RUN} WHERE id = {job_id}");
    db.execute(&sql).await;
}

/// Dispatches the next due job on node `n1`; there must be one.
pub async fn take(db: &TestDb, now: i64) -> baton::store::Dispatched {
    next_due(db, now).await.expect("a due job")
}

/// Dispatches the next due job on node `n1`, if there is one.
pub async fn next_due(db: &TestDb, now: i64) -> Option<baton::store::Dispatched> {
    db.store
        .dispatch("n1", db.dir.path(), None, now)
        .await
        .unwrap()
}

/// The Monitor's claim that the run of `d` failed its gate, at `NOW`.
async fn fail_by_gate(db: &TestDb, d: &baton::store::Dispatched) -> ClaimOutcome {
    let failed = Verdict::Failed {
        reason: "gate".into(),
    };
    let failure = claim(&d.job, d.run.id, failed, Decider::Monitor);
    db.store.claim(&failure, &policy(), NOW).await.unwrap()
}

pub fn kinds(events: &[entity::events::Model]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

/// Records the exit of `run` of task `task_id` with `code` at `at`, as its Monitor does;
/// true when no exit was recorded before.
pub async fn record_exit(
    db: &TestDb,
    task_id: i64,
    run: &entity::agent_runs::Model,
    code: i32,
    at: i64,
) -> bool {
    db.store
        .record_exit(task_id, run, code, serde_json::json!({}), at)
        .await
        .unwrap()
}

/// How many exits the events of task `task_id` record.
pub async fn exits_recorded(db: &TestDb, task_id: i64) -> usize {
    let events = db.store.events(task_id).await.unwrap();
    kinds(&events)
        .into_iter()
        .filter(|k| *k == "run_exited")
        .count()
}

async fn submit_writes_task_job_and_events(db: TestDb) {
    let s = submit(&db.store, "ORCH-1").await;
    assert_eq!(s.task.status, TaskStatus::Active);
    assert_eq!(
        (s.job.stage.as_str(), s.job.status.as_str(), s.job.attempt),
        ("analyst", "queued", 1)
    );
    let events = db.store.events(s.task.id).await.unwrap();
    assert_eq!(kinds(&events), ["task_submitted", "job_queued"]);
    let again = db
        .store
        .submit(
            NewTask {
                key: crate::support::key("ORCH-1"),
                pipeline: "default".into(),
                title: String::new(),
                description: None,
                plane_issue_id: None,
                first_stage: "analyst".into(),
                trace_parent: baton::telemetry::new_trace_parent(),
            },
            EventSource::Cli,
            NOW,
        )
        .await;
    assert!(matches!(again, Err(baton::store::StoreError::TaskExists(k)) if k == "ORCH-1"));
    assert_eq!(db.store.list_tasks(None).await.unwrap().len(), 1);
}
on_both!(
    submit_writes_task_job_and_events,
    submit_writes_task_job_and_events
);

async fn dispatch_takes_due_jobs_once(db: TestDb) {
    assert!(next_due(&db, NOW).await.is_none());
    let a = submit(&db.store, "A-1").await;
    let b = submit(&db.store, "B-1").await;
    let first = take(&db, NOW).await;
    assert_eq!(first.job.id, a.job.id);
    assert_eq!(first.job.status, JobStatus::Running);
    assert_eq!(first.job.current_run_id, Some(first.run.id));
    assert_eq!(first.run.node_id, "n1");
    assert!(first.run.log_path.contains("A-1"));
    let second = db
        .store
        .dispatch("n2", db.dir.path(), None, NOW)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.job.id, b.job.id);
    assert!(next_due(&db, NOW).await.is_none());
}
on_both!(dispatch_takes_due_jobs_once, dispatch_takes_due_jobs_once);

async fn concurrent_dispatchers_take_distinct_jobs(db: TestDb) {
    for i in 0..6 {
        submit(&db.store, &format!("T-{i}")).await;
    }
    let mut handles = Vec::new();
    for n in 0..4 {
        let store = db.other_store().await;
        let dir = db.dir.path().to_path_buf();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = store
                .dispatch(&format!("n{n}"), &dir, None, NOW)
                .await
                .unwrap()
            {
                got.push(d.job.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, 6, "every job dispatched exactly once: {all:?}");
    assert_eq!(all.len(), 6);
}
on_both!(
    concurrent_dispatchers_take_distinct_jobs,
    concurrent_dispatchers_take_distinct_jobs
);

async fn not_before_delays_dispatch(db: TestDb) {
    let s = submit(&db.store, "R-1").await;
    let d = take(&db, NOW).await;
    let won = fail_by_gate(&db, &d).await;
    let ClaimOutcome::Won(w) = won else {
        panic!("{won:?}")
    };
    assert_eq!(w.job_status, JobStatus::Queued);
    let job = db.store.job(s.job.id).await.unwrap().unwrap();
    assert_eq!(
        (job.attempt, job.not_before, job.current_run_id),
        (2, NOW + 10_000, None)
    );
    assert!(next_due(&db, NOW + 9_999).await.is_none());
    let again = take(&db, NOW + 10_000).await;
    assert_eq!((again.job.id, again.run.attempt), (s.job.id, 2));
    // The second failure exhausts max_attempts = 2: the job and the task fail.
    let lost = db
        .store
        .claim(
            &claim(
                &again.job,
                again.run.id,
                Verdict::TimedOut,
                Decider::Reaper(ReapTier::Unfinished),
            ),
            &policy(),
            NOW + 20_000,
        )
        .await
        .unwrap();
    let ClaimOutcome::Won(w) = lost else { panic!() };
    assert_eq!(
        (w.job_status, w.task_status),
        (JobStatus::Failed, Some(TaskStatus::Failed))
    );
    assert_eq!(
        db.store.task(s.task.id).await.unwrap().status,
        TaskStatus::Failed
    );
    assert_eq!(db.store.advances_of(s.job.id).await.unwrap().len(), 1);
    let k = kinds(&db.store.events(s.task.id).await.unwrap()).join(",");
    assert!(
        k.contains("retry_scheduled") && k.ends_with("task_failed"),
        "{k}"
    );
}
on_both!(not_before_delays_dispatch, not_before_delays_dispatch);

/// Dispatch takes the first due job of the oldest active task, reading past a job that
/// is not due yet and one of a task no longer active, and takes each in its turn.
async fn dispatch_takes_the_oldest_tasks_due_job(db: TestDb) {
    let waiting = submit(&db.store, "W-1").await;
    let ended = submit(&db.store, "E-1").await;
    let due = submit(&db.store, "D-1").await;
    let later = submit(&db.store, "L-1").await;
    let d = take(&db, NOW).await;
    assert_eq!(d.job.id, waiting.job.id);
    let outcome = fail_by_gate(&db, &d).await;
    assert!(matches!(outcome, ClaimOutcome::Won(_)), "{outcome:?}");
    // A task no longer active whose job is still queued, written by hand: dispatch reads
    // past it.
    let sql = format!(
        "UPDATE tasks SET status = 'cancelled' WHERE id = {}",
        ended.task.id
    );
    db.execute(&sql).await;
    let order = [NOW, NOW + 10_000, NOW + 10_000];
    let mut taken = Vec::new();
    for now in order {
        taken.push(take(&db, now).await.job.id);
    }
    assert_eq!(taken, [due.job.id, waiting.job.id, later.job.id]);
    assert!(next_due(&db, NOW + 10_000).await.is_none());
    let job = db.store.job(ended.job.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
}
on_both!(
    dispatch_takes_the_oldest_tasks_due_job,
    dispatch_takes_the_oldest_tasks_due_job
);

async fn passing_claims_walk_the_pipeline_with_one_reject_loop(db: TestDb) {
    let s = submit(&db.store, "P-1").await;
    let mut stages = Vec::new();
    let verdicts = [
        Verdict::Passed,   // analyst
        Verdict::Passed,   // developer 1
        Verdict::Rejected, // reviewer 1 -> developer 2
        Verdict::Passed,   // developer 2
        Verdict::Passed,   // reviewer 2 -> done
    ];
    for v in verdicts {
        let d = take(&db, NOW).await;
        stages.push(format!("{}#{}", d.job.stage, d.job.iteration));
        let out = db
            .store
            .claim(
                &claim(&d.job, d.run.id, v, Decider::Monitor),
                &policy(),
                NOW,
            )
            .await
            .unwrap();
        assert!(matches!(out, ClaimOutcome::Won(_)), "{out:?}");
        assert_eq!(db.store.advances_of(d.job.id).await.unwrap().len(), 1);
        let effects = db.store.effects_of_run(d.run.id).await.unwrap();
        assert_eq!(effects.len(), 1, "a push per committed stage");
        assert_eq!(effects[0].kind, baton::model::EffectKind::Push);
    }
    assert_eq!(
        stages,
        [
            "analyst#1",
            "developer#1",
            "reviewer#1",
            "developer#2",
            "reviewer#2"
        ]
    );
    // The pipeline ended, but its pushes are still to be made: the task waits for them.
    assert_eq!(
        db.store.task(s.task.id).await.unwrap().status,
        TaskStatus::Active
    );
    assert!(next_due(&db, NOW).await.is_none());
    let pending: Vec<_> = db
        .store
        .task_detail(&crate::support::key("P-1"))
        .await
        .unwrap()
        .effects;
    let mut ended = Vec::new();
    for e in pending {
        assert!(db.store.lease_effect(&e, "n1", 60_000, NOW).await.unwrap());
        let done = baton::store::EffectOutcome::Done { external_ref: None };
        let f = db
            .store
            .finish_effect(&e, "n1", done, Vec::new(), NOW)
            .await
            .unwrap();
        ended.push(f.task_ended);
    }
    assert_eq!(
        ended.pop(),
        Some(Some(TaskStatus::Done)),
        "done with its last push"
    );
    assert!(ended.iter().all(Option::is_none), "{ended:?}");
    assert_eq!(
        db.store.task(s.task.id).await.unwrap().status,
        TaskStatus::Done
    );
}
on_both!(
    passing_claims_walk_the_pipeline_with_one_reject_loop,
    passing_claims_walk_the_pipeline_with_one_reject_loop
);

async fn reject_loop_is_bounded_by_max_iterations(db: TestDb) {
    let s = submit(&db.store, "L-1").await;
    let mut last = None;
    for v in [
        Verdict::Passed,
        Verdict::Passed,
        Verdict::Rejected,
        Verdict::Passed,
        Verdict::Rejected,
    ] {
        let d = take(&db, NOW).await;
        last = Some(
            db.store
                .claim(
                    &claim(&d.job, d.run.id, v, Decider::Monitor),
                    &policy(),
                    NOW,
                )
                .await
                .unwrap(),
        );
    }
    let Some(ClaimOutcome::Won(w)) = last else {
        panic!("{last:?}")
    };
    assert_eq!(
        w.task_status,
        Some(TaskStatus::Failed),
        "developer would run a 3rd time; max_iterations = 2"
    );
    assert!(w.next_job.is_none());
    let events = db.store.events(s.task.id).await.unwrap();
    let failed = events
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed)
        .unwrap();
    assert!(
        failed.detail.contains("max_iterations"),
        "{}",
        failed.detail
    );
}
on_both!(
    reject_loop_is_bounded_by_max_iterations,
    reject_loop_is_bounded_by_max_iterations
);

/// Everything a claimant could have written, to compare before and after a lost claim.
async fn snapshot(store: &Store, task_id: i64) -> String {
    let d = store.list_tasks(None).await.unwrap();
    let t = store.task(task_id).await.unwrap();
    let detail = store
        .task_detail(&crate::support::key(&t.key))
        .await
        .unwrap();
    let mut advances = Vec::new();
    for j in &detail.jobs {
        advances.extend(store.advances_of(j.id).await.unwrap());
    }
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        d, detail.jobs, detail.runs, detail.effects, advances
    )
}

async fn stale_run_claim_loses_and_writes_nothing(db: TestDb) {
    let s = submit(&db.store, "Z-1").await;
    let first = take(&db, NOW).await;
    // The first attempt is finalized as failed; the job is retried with a new run.
    db.store
        .claim(
            &claim(
                &first.job,
                first.run.id,
                Verdict::Failed { reason: "x".into() },
                Decider::Monitor,
            ),
            &policy(),
            NOW,
        )
        .await
        .unwrap();
    let second = take(&db, NOW + 60_000).await;
    assert_ne!(first.run.id, second.run.id);
    let before = snapshot(&db.store, s.task.id).await;
    // A zombie of the first attempt claims with its old run id: it must lose.
    let zombie = db
        .store
        .claim(
            &claim(&second.job, first.run.id, Verdict::Passed, Decider::Monitor),
            &policy(),
            NOW + 61_000,
        )
        .await
        .unwrap();
    assert!(
        matches!(zombie, ClaimOutcome::AlreadyAdvanced | ClaimOutcome::Lost),
        "{zombie:?}"
    );
    // A claim naming a run that never was current loses too.
    let bogus = db
        .store
        .claim(
            &claim(
                &second.job,
                second.run.id + 1000,
                Verdict::Passed,
                Decider::Reaper(ReapTier::Unfinished),
            ),
            &policy(),
            NOW + 61_000,
        )
        .await
        .unwrap();
    assert_eq!(bogus, ClaimOutcome::Lost);
    assert_eq!(
        before,
        snapshot(&db.store, s.task.id).await,
        "a lost claim wrote something"
    );
    let events = db.store.events(s.task.id).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::ClaimLost)
            .count(),
        2
    );
    assert_eq!(events.last().unwrap().kind, EventKind::ClaimLost);
    // The current run still wins.
    let ok = db
        .store
        .claim(
            &claim(
                &second.job,
                second.run.id,
                Verdict::Passed,
                Decider::Monitor,
            ),
            &policy(),
            NOW + 62_000,
        )
        .await
        .unwrap();
    assert!(matches!(ok, ClaimOutcome::Won(_)));
}
on_both!(
    stale_run_claim_loses_and_writes_nothing,
    stale_run_claim_loses_and_writes_nothing
);

async fn eight_concurrent_claims_give_one_winner(db: TestDb) {
    let s = submit(&db.store, "C-8").await;
    let d = take(&db, NOW).await;
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(db.other_store().await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let mut handles = Vec::new();
    for (i, store) in stores.into_iter().enumerate() {
        let c = claim(
            &d.job,
            d.run.id,
            Verdict::Passed,
            if i % 2 == 0 {
                Decider::Monitor
            } else {
                Decider::Reaper(ReapTier::Unfinished)
            },
        );
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            store.claim(&c, &policy(), NOW).await.unwrap()
        }));
    }
    let mut won = 0;
    for h in handles {
        if let ClaimOutcome::Won(_) = h.await.unwrap() {
            won += 1;
        }
    }
    assert_eq!(won, 1, "exactly one claim wins");
    assert_eq!(db.store.advances_of(d.job.id).await.unwrap().len(), 1);
    let jobs = db.store.jobs_of(s.task.id).await.unwrap();
    assert_eq!(jobs.len(), 2, "exactly one next job: {jobs:?}");
    let events = db.store.events(s.task.id).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::ClaimWon)
            .count(),
        1
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::ClaimLost)
            .count(),
        7
    );
    assert_eq!(db.store.effects_of_run(d.run.id).await.unwrap().len(), 1);
}
on_both!(
    eight_concurrent_claims_give_one_winner,
    eight_concurrent_claims_give_one_winner
);

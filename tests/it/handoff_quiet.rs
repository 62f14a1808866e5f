//! The hand-off of a claim with nothing for the outbox, which PostgreSQL writes in one
//! statement with the claim's fence and the exit it carries (ADR 0001): what it writes,
//! and when the next job is left to dispatch all the same.

use baton::model::{ClaimOutcome, JobStatus, RunOutcome};
use baton::policy::Policy;
use baton::store::{Dispatched, Started, Taker};

use crate::handoff::{NOW, passed, push_waiting_on_another_host, take};
use crate::on_both;
use crate::store::{PIPELINE_TOML, exits_recorded, kinds, next_due, run_exit};
use crate::support::TestDb;

/// The pipeline of `store`'s tests without its push: a stage's claim writes no effect.
fn quiet_policy() -> Policy {
    let toml = PIPELINE_TOML.replace("push = true", "push = false");
    baton::config::Config::from_toml(
        &toml,
        std::path::Path::new("/tmp"),
        &baton::config::EnvOverrides::default(),
    )
    .unwrap()
    .policy()
}

/// Claims `d` as passed, with `exit`, handing off to node `n1`: the next job and the
/// job handed off, if any.
async fn claim_quietly(
    db: &TestDb,
    d: &Dispatched,
    exit: Option<&baton::store::RunExit>,
) -> (entity::jobs::Model, Option<Dispatched>) {
    let policy = quiet_policy();
    let taker = Taker {
        node_id: "n1",
        log_dir: db.dir.path(),
        policy: Some(&policy),
    };
    let (outcome, handed) = db
        .store
        .claim_and_take(&passed(d), exit, &policy, NOW + 1, Some(taker))
        .await
        .unwrap();
    let ClaimOutcome::Won(won) = outcome else {
        panic!("the claim must win: {outcome:?}");
    };
    assert_eq!(won.effects, 0);
    (won.next_job.expect("a next stage"), handed)
}

async fn the_fence_the_exit_and_the_next_job_are_written_together(db: TestDb) {
    crate::support::submit(&db.store, "Q-1", "analyst", NOW).await;
    let d = take(&db).await;
    let started = Started {
        pid: 71,
        prompt: None,
        at: NOW + 1,
    };
    let exit = run_exit(d.task.id, &d.run, Some(started), 0, NOW + 1);
    let (next, handed) = claim_quietly(&db, &d, Some(&exit)).await;
    let handed = handed.expect("the next stage is handed off");
    // Written as returned: the claimed run with its exit and outcome, the next job
    // running with its new run, whose log's name holds its id.
    let run = db.store.run(d.run.id).await.unwrap().unwrap();
    assert_eq!(
        (run.pid, run.exit_code, run.exited_at, run.outcome),
        (Some(71), Some(0), Some(NOW + 1), Some(RunOutcome::Passed))
    );
    assert_eq!(db.store.job(next.id).await.unwrap().unwrap(), handed.job);
    assert_eq!(
        (handed.job.status, handed.job.current_run_id),
        (JobStatus::Running, Some(handed.run.id))
    );
    assert_eq!(
        db.store.run(handed.run.id).await.unwrap().unwrap(),
        handed.run
    );
    let log = format!("Q-1/{}-developer-1.log", handed.run.id);
    assert!(
        handed.run.log_path.ends_with(&log),
        "{}",
        handed.run.log_path
    );
    let events = db.store.events(d.task.id).await.unwrap();
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

    // The next stage's exit recorded already (by its Monitor, on its own): the claim
    // writes no second one.
    let recorded = run_exit(d.task.id, &handed.run, None, 3, NOW + 2);
    assert!(db.store.record_start_and_exit(&recorded).await.unwrap());
    let again = run_exit(d.task.id, &handed.run, None, 0, NOW + 3);
    let (_, later) = claim_quietly(&db, &handed, Some(&again)).await;
    assert!(later.is_some());
    let run = db.store.run(handed.run.id).await.unwrap().unwrap();
    assert_eq!((run.exit_code, run.exited_at), (Some(3), Some(NOW + 2)));
    assert_eq!(exits_recorded(&db, d.task.id).await, 2);
}
on_both!(
    the_fence_the_exit_and_the_next_job_are_written_together,
    the_fence_the_exit_and_the_next_job_are_written_together
);

/// Left to dispatch: after an older task's waiting job, and while the task's push waits
/// for another host.
async fn a_quiet_hand_off_still_comes_after_older_tasks_and_pushes(db: TestDb) {
    crate::support::submit(&db.store, "Q-2", "analyst", NOW).await;
    crate::support::submit(&db.store, "Q-3", "analyst", NOW).await;
    let (older, newer) = (take(&db).await, take(&db).await);
    let (older_next, _) = claim_quietly(&db, &older, None).await;
    // The older task's next job, taken by its hand-off, is queued again to wait.
    db.execute(&format!(
        "UPDATE jobs SET status = 'queued', current_run_id = NULL WHERE id = {}",
        older_next.id
    ))
    .await;
    let (newer_next, handed) = claim_quietly(&db, &newer, None).await;
    assert!(handed.is_none(), "{handed:?}");
    let job = db.store.job(newer_next.id).await.unwrap().unwrap();
    assert_eq!((job.status, job.current_run_id), (JobStatus::Queued, None));
    assert_eq!(take(&db).await.job.id, older_next.id);
    assert_eq!(take(&db).await.job.id, newer_next.id);

    crate::support::submit(&db.store, "Q-4", "analyst", NOW).await;
    let d = take(&db).await;
    push_waiting_on_another_host(&db, &d).await;
    let (_, handed) = claim_quietly(&db, &d, None).await;
    assert!(handed.is_none(), "{handed:?}");
    assert!(next_due(&db, NOW + 2).await.is_none());
}
on_both!(
    a_quiet_hand_off_still_comes_after_older_tasks_and_pushes,
    a_quiet_hand_off_still_comes_after_older_tasks_and_pushes
);

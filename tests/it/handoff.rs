//! The hand-off: a won claim takes its task's next job for the claiming node, in the
//! claim's own transaction, when dispatch would take that job first; otherwise the job
//! stays queued for dispatch. A taken job whose Monitor cannot start is put back. Claims
//! decided together, in one transaction.

use std::path::Path;

use baton::actors::advancer::send_claim;
use baton::actors::dispatcher::DispatcherMsg;
use baton::actors::supervisor::SupervisorMsg;
use baton::config::{Config, EnvOverrides};
use baton::model::{Claim, ClaimOutcome, Decider, JobStatus, ReapTier, RunOutcome, Verdict};
use baton::policy::Policy;
use baton::store::{ClaimItem, Dispatched, GroupError, KnownLastCommit, Taker};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::on_both;
use crate::reaper_windows::claim_setup_with;
use crate::store::{
    MISSING_RUN, PIPELINE_TOML, claim, name_a_missing_run, next_due, policy, record_exit, run_exit,
};
use crate::support::TestDb;

pub const NOW: i64 = 1_800_000_000_000;

/// `d`'s run passed, as its Monitor claims it.
pub fn passed(d: &Dispatched) -> Claim {
    claim(&d.job, d.run.id, Verdict::Passed, Decider::Monitor)
}

/// Dispatches the next due job on node `n1` (jobs the claims queued are due by then).
pub async fn take(db: &TestDb) -> Dispatched {
    crate::store::take(db, NOW + 5).await
}

/// Claims `d` as passed, handing off to node `n1`; returns the claim's next job and the
/// job handed off, if any.
async fn claim_handing_off(
    db: &TestDb,
    policy: &Policy,
    d: &Dispatched,
) -> (entity::jobs::Model, Option<Dispatched>) {
    let taker = Taker {
        node_id: "n1",
        log_dir: db.dir.path(),
        policy: Some(policy),
    };
    let (outcome, handed) = db
        .store
        .claim_and_take(&passed(d), None, policy, NOW + 1, Some(taker))
        .await
        .unwrap();
    let ClaimOutcome::Won(won) = outcome else {
        panic!("the claim must win: {outcome:?}");
    };
    (won.next_job.expect("a next stage"), handed)
}

async fn the_next_job_is_taken_for_the_claiming_node(db: TestDb) {
    let policy = policy();
    crate::support::submit(&db.store, "H-1", "analyst", NOW).await;
    let d = take(&db).await;
    let (next, handed) = claim_handing_off(&db, &policy, &d).await;
    let handed = handed.expect("the next stage is handed off");
    assert_eq!(handed.job.id, next.id);
    assert_eq!(handed.job.stage, "developer");
    assert_eq!(handed.run.node_id, "n1");
    assert!(
        handed
            .run
            .log_path
            .ends_with(&format!("H-1/{}-developer-1.log", handed.run.id)),
        "{}",
        handed.run.log_path
    );
    // Written, not only returned: the job runs with that run, and nothing is left queued.
    // The claim's next job is the row as written, taken, as its hand-off's is.
    let job = db.store.job(next.id).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.current_run_id),
        (JobStatus::Running, Some(handed.run.id))
    );
    assert_eq!((&next, &handed.job), (&job, &job));
    let run = db.store.run(handed.run.id).await.unwrap().unwrap();
    assert_eq!(run, handed.run);
    assert!(next_due(&db, NOW + 2).await.is_none());
}
on_both!(
    the_next_job_is_taken_for_the_claiming_node,
    the_next_job_is_taken_for_the_claiming_node
);

/// A run's id is drawn by the statement that takes its job, by dispatch and by the
/// hand-off alike; it is never one given before, even once the newest run is gone (its
/// log and pid files bear its id).
async fn a_run_id_is_never_given_twice(db: TestDb) {
    let policy = policy();
    for key in ["ID-1", "ID-2"] {
        crate::support::submit(&db.store, key, "analyst", NOW).await;
    }
    let (first, second) = (take(&db).await, take(&db).await);
    assert!(second.run.id > first.run.id);
    let forget = |id: i64| format!("DELETE FROM agent_runs WHERE id = {id}");
    db.execute(&forget(second.run.id)).await;
    let (_, handed) = claim_handing_off(&db, &policy, &first).await;
    let handed = handed.expect("the next stage is handed off");
    assert!(handed.run.id > second.run.id, "{} reused", handed.run.id);
    assert_eq!(handed.job.current_run_id, Some(handed.run.id));

    db.execute(&forget(handed.run.id)).await;
    crate::support::submit(&db.store, "ID-3", "analyst", NOW).await;
    let third = take(&db).await;
    assert!(third.run.id > handed.run.id, "{} reused", third.run.id);
    assert_eq!(third.job.current_run_id, Some(third.run.id));
    let run = db.store.run(third.run.id).await.unwrap().unwrap();
    assert!(
        run.log_path
            .ends_with(&format!("ID-3/{}-analyst-1.log", run.id))
    );
}
on_both!(a_run_id_is_never_given_twice, a_run_id_is_never_given_twice);

/// Claims `c` with node `node_id` taking the next job; returns the job handed off.
async fn hand(db: &TestDb, policy: &Policy, c: Claim, node_id: &str, now: i64) -> Dispatched {
    let taker = Taker {
        node_id,
        log_dir: db.dir.path(),
        policy: Some(policy),
    };
    let (outcome, next) = db
        .store
        .claim_and_take(&c, None, policy, now, Some(taker))
        .await
        .unwrap();
    assert!(matches!(outcome, ClaimOutcome::Won(_)), "{outcome:?}");
    next.expect("the next stage is handed off")
}

/// A job handed off after a stage that its own Monitor decided, on the node that takes
/// it, carries the task's last commit as the claim knew it: the stage's commit, or the
/// branch here when it made none. One handed off after the Reaper's claim, after a run
/// of another node, or taken by dispatch, does not.
async fn a_hand_off_after_the_monitors_own_claim_knows_the_last_commit(db: TestDb) {
    let policy = policy();
    crate::support::submit(&db.store, "F-1", "analyst", NOW).await;
    let d = take(&db).await;
    assert_eq!(
        d.last_commit,
        KnownLastCommit::Unknown,
        "dispatch cannot know it"
    );
    let (_, handed) = claim_handing_off(&db, &policy, &d).await;
    let handed = handed.expect("the next stage is handed off");
    // The analyst's stage committed (as `passed` says): its commit is the task's last.
    let sha = passed(&d).commit_sha.expect("a commit");
    assert_eq!(handed.last_commit, KnownLastCommit::Commit(sha));
    // The developer's stage committed nothing: the branch here holds the last commit.
    let mut uncommitted = passed(&handed);
    uncommitted.commit_sha = None;
    let review = hand(&db, &policy, uncommitted, "n1", NOW + 2).await;
    assert_eq!(review.job.stage, "reviewer");
    assert_eq!(review.last_commit, KnownLastCommit::OnBranch);
    // A rejection, decided by the Reaper: the Reaper's run may have ended anywhere.
    let reaper = Decider::Reaper(ReapTier::Unfinished);
    let by_reaper = claim(&review.job, review.run.id, Verdict::Rejected, reaper);
    let back = hand(&db, &policy, by_reaper, "n1", NOW + 3).await;
    assert_eq!(back.job.stage, "developer");
    assert_eq!(back.last_commit, KnownLastCommit::Unknown);
    // The Monitor's claim of a run of another node (n1's run, taken by n2).
    let again = hand(&db, &policy, passed(&back), "n2", NOW + 4).await;
    assert_eq!(again.last_commit, KnownLastCommit::Unknown);
}
on_both!(
    a_hand_off_after_the_monitors_own_claim_knows_the_last_commit,
    a_hand_off_after_the_monitors_own_claim_knows_the_last_commit
);

async fn an_older_tasks_waiting_job_goes_first(db: TestDb) {
    let policy = policy();
    crate::support::submit(&db.store, "H-1", "analyst", NOW).await;
    crate::support::submit(&db.store, "H-2", "analyst", NOW).await;
    let older = take(&db).await;
    let newer = take(&db).await;
    // The older task's next stage is queued by a claim that hands nothing off.
    let ClaimOutcome::Won(w) = db
        .store
        .claim(&passed(&older), &policy, NOW + 1)
        .await
        .unwrap()
    else {
        panic!("the claim must win");
    };
    let older_next = w.next_job.unwrap();
    let (newer_next, handed) = claim_handing_off(&db, &policy, &newer).await;
    assert!(handed.is_none(), "{handed:?}");
    let job = db.store.job(newer_next.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    // Dispatch takes the older task's job, then the newer one's.
    assert_eq!(take(&db).await.job.id, older_next.id);
    assert_eq!(take(&db).await.job.id, newer_next.id);
}
on_both!(
    an_older_tasks_waiting_job_goes_first,
    an_older_tasks_waiting_job_goes_first
);

/// Makes the task of `d` have a push pending on another host, `host-b`.
pub async fn push_waiting_on_another_host(db: &TestDb, d: &Dispatched) {
    db.execute(&format!(
        "INSERT INTO effects (task_id, run_id, kind, idempotency_key, status, attempts, \
         next_attempt_at, payload, created_at, updated_at, host) VALUES ({}, {}, 'push', \
         'push-{}', 'pending', 0, 0, '{{}}', 0, 0, 'host-b')",
        d.task.id, d.run.id, d.task.key
    ))
    .await;
}

/// A task whose push waits for another host (its last commit is only there) is not
/// handed off: its next stage waits for the push, or runs there (ADR 0010).
async fn a_task_whose_push_waits_elsewhere_is_not_handed_off(db: TestDb) {
    let policy = policy();
    crate::support::submit(&db.store, "H-1", "analyst", NOW).await;
    let d = take(&db).await;
    push_waiting_on_another_host(&db, &d).await;
    let (next, handed) = claim_handing_off(&db, &policy, &d).await;
    assert!(handed.is_none(), "{handed:?}");
    let job = db.store.job(next.id).await.unwrap().unwrap();
    assert_eq!((job.status, job.current_run_id), (JobStatus::Queued, None));
    assert!(next_due(&db, NOW + 2).await.is_none());
}
on_both!(
    a_task_whose_push_waits_elsewhere_is_not_handed_off,
    a_task_whose_push_waits_elsewhere_is_not_handed_off
);

async fn a_bounded_stage_is_left_to_dispatch(db: TestDb) {
    let toml = PIPELINE_TOML.replace(
        "[stages.developer]\n",
        "[stages.developer]\nmax_concurrent = 1\n",
    );
    let policy = Config::from_toml(&toml, Path::new("/tmp"), &EnvOverrides::default())
        .unwrap()
        .policy();
    assert_eq!(policy.stage_limits.get("developer"), Some(&1));
    crate::support::submit(&db.store, "H-1", "analyst", NOW).await;
    let d = take(&db).await;
    let (next, handed) = claim_handing_off(&db, &policy, &d).await;
    assert!(handed.is_none(), "{handed:?}");
    assert_eq!(take(&db).await.job.id, next.id);
}
on_both!(
    a_bounded_stage_is_left_to_dispatch,
    a_bounded_stage_is_left_to_dispatch
);

/// Stands in for an actor of the node: forwards what it is told.
struct Forward<M>(std::marker::PhantomData<fn() -> M>);

impl<M: ractor::Message> Actor for Forward<M> {
    type Msg = M;
    type State = UnboundedSender<M>;
    type Arguments = UnboundedSender<M>;

    async fn pre_start(
        &self,
        _: ActorRef<M>,
        tx: UnboundedSender<M>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _: ActorRef<M>,
        msg: M,
        tx: &mut UnboundedSender<M>,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send(msg);
        Ok(())
    }
}

/// A stand-in of an actor of the node, with what it is told.
async fn forward<M: ractor::Message>() -> (
    ActorRef<M>,
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<M>,
) {
    let (tx, rx) = unbounded_channel();
    let (actor, handle) = Actor::spawn(None, Forward(Default::default()), tx)
        .await
        .unwrap();
    (actor, handle, rx)
}

/// The setup's dispatched job, its run watched by the node as its Monitor's would be.
async fn watched_first(db: &TestDb, s: &crate::reaper_windows::ClaimSetup) -> Dispatched {
    s.ctx.watched.insert(s.run.id, s.job.id);
    Dispatched {
        task: db.store.task(s.job.task_id).await.unwrap(),
        job: s.job.clone(),
        run: s.run.clone(),
        last_commit: Default::default(),
    }
}

/// A Monitor's claim through the Advancer hands the next job to the Supervisor for its
/// Monitor, at once and with its place reserved, while the Dispatcher runs (which is not
/// told); once the Dispatcher has stopped (the node is shutting down), the next job
/// stays queued.
async fn the_advancer_hands_off_only_while_the_dispatcher_runs(db: TestDb) {
    let (stub, handle, mut kicked) = forward().await;
    let (supervisor, _, mut told) = forward().await;
    let node = (stub.clone(), supervisor);
    let s = claim_setup_with(&db, db.store.clone(), Some(node)).await;
    let first = watched_first(&db, &s).await;
    let Some(ClaimOutcome::Won(w)) = send_claim(&s.advancer, passed(&first)).await else {
        panic!("the claim must win");
    };
    let next = w.next_job.unwrap();
    let Some(SupervisorMsg::StartMonitor(d, _)) = told.recv().await else {
        panic!("the Supervisor must be asked for the next job's Monitor");
    };
    assert_eq!(d.job.id, next.id);
    assert_eq!(s.ctx.watched.runs(), [(d.run.id, next.id)]);
    let job = db.store.job(next.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Running);

    // The stand-in forwards in order: a kick sent with the hand-off comes before this.
    stub.send_message(DispatcherMsg::Tick).unwrap();
    assert_eq!(
        kicked.recv().await,
        Some(DispatcherMsg::Tick),
        "a hand-off kicks no Dispatcher"
    );

    // The node stops: the next claim hands nothing off.
    stub.stop(None);
    handle.await.unwrap();
    record_exit(&db, d.task.id, &d.run, 0, s.ctx.now()).await;
    let Some(ClaimOutcome::Won(w)) = send_claim(&s.advancer, passed(&d)).await else {
        panic!("the claim must win");
    };
    let last = w.next_job.unwrap();
    let job = db.store.job(last.id).await.unwrap().unwrap();
    assert_eq!((job.status, job.current_run_id), (JobStatus::Queued, None));
    assert!(s.ctx.watched.is_empty());
}
on_both!(
    the_advancer_hands_off_only_while_the_dispatcher_runs,
    the_advancer_hands_off_only_while_the_dispatcher_runs
);

/// A job handed off whose Monitor the Supervisor can no longer start (it stopped, the
/// Dispatcher not yet) is put back in the queue at once, its run cancelled and its place
/// freed, rather than left running with no Monitor.
async fn a_hand_off_the_supervisor_cannot_start_is_put_back(db: TestDb) {
    let (stub, _, _kicked) = forward().await;
    let (supervisor, handle, _told) = forward().await;
    supervisor.stop(None);
    handle.await.unwrap();
    let s = claim_setup_with(&db, db.store.clone(), Some((stub, supervisor))).await;
    let first = watched_first(&db, &s).await;
    let Some(ClaimOutcome::Won(w)) = send_claim(&s.advancer, passed(&first)).await else {
        panic!("the claim must win");
    };
    let next = db.store.job(w.next_job.unwrap().id).await.unwrap().unwrap();
    assert_eq!(
        (next.status, next.current_run_id),
        (JobStatus::Queued, None)
    );
    // The hand-off took it with a run, which its release cancelled.
    let events = db.store.events(next.task_id).await.unwrap();
    let released = events
        .iter()
        .find(|e| {
            e.kind.as_str() == "job_queued" && e.job_id == Some(next.id) && e.run_id.is_some()
        })
        .unwrap_or_else(|| panic!("no release of the handed job: {events:?}"));
    let run = db
        .store
        .run(released.run_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.outcome, Some(RunOutcome::Cancelled));
    assert!(s.ctx.watched.is_empty());
}
on_both!(
    a_hand_off_the_supervisor_cannot_start_is_put_back,
    a_hand_off_the_supervisor_cannot_start_is_put_back
);

/// `d`'s job is queued again with its attempt, and its run cancelled.
pub async fn assert_put_back(db: &TestDb, d: &Dispatched) {
    let job = db.store.job(d.job.id).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.current_run_id, job.attempt),
        (JobStatus::Queued, None, d.job.attempt)
    );
    let run = db.store.run(d.run.id).await.unwrap().unwrap();
    assert_eq!(run.outcome, Some(RunOutcome::Cancelled));
}

/// A taken job released (its Monitor could not start) is queued again with the same
/// attempt, its run cancelled, once: a second release, or one naming another run, does
/// nothing.
async fn a_released_job_is_queued_again_with_its_attempt(db: TestDb) {
    crate::support::submit(&db.store, "H-1", "analyst", NOW).await;
    let d = take(&db).await;
    let reason = "the node stopped";
    assert!(db.store.release_run(&d, reason, NOW + 6).await.unwrap());
    assert!(!db.store.release_run(&d, reason, NOW + 7).await.unwrap());
    assert_put_back(&db, &d).await;
    let events = db.store.events(d.task.id).await.unwrap();
    let released: Vec<_> = events
        .iter()
        .filter(|e| e.kind.as_str() == "job_queued" && e.run_id == Some(d.run.id))
        .collect();
    assert_eq!(released.len(), 1, "{events:?}");
    assert!(
        released[0].detail.contains(reason),
        "{}",
        released[0].detail
    );
    // Dispatch takes it again, as a new run of the same attempt.
    let again = take(&db).await;
    assert_eq!((again.job.id, again.job.attempt), (d.job.id, d.job.attempt));
    assert_ne!(again.run.id, d.run.id);
}
on_both!(
    a_released_job_is_queued_again_with_its_attempt,
    a_released_job_is_queued_again_with_its_attempt
);

/// Claims decided together (the Advancer's group commit), in order, in one transaction:
/// a later claim sees what an earlier one wrote (a second claim of the same run finds it
/// advanced already), and each won claim hands off the job dispatch would take first.
async fn claims_decided_together_see_each_other(db: TestDb) {
    let policy = policy();
    crate::support::submit(&db.store, "G-1", "analyst", NOW).await;
    crate::support::submit(&db.store, "G-2", "analyst", NOW).await;
    let (d1, d2) = (take(&db).await, take(&db).await);
    let taker = Taker {
        node_id: "n1",
        log_dir: db.dir.path(),
        policy: Some(&policy),
    };
    let (c1, c2) = (passed(&d1), passed(&d2));
    let reaped = claim(
        &d1.job,
        d1.run.id,
        Verdict::Passed,
        Decider::Reaper(ReapTier::Unfinished),
    );
    let items = [
        ClaimItem {
            claim: &c1,
            exit: None,
            taker: Some(taker),
        },
        ClaimItem {
            claim: &reaped,
            exit: None,
            taker: None,
        },
        ClaimItem {
            claim: &c2,
            exit: None,
            taker: Some(taker),
        },
    ];
    let decided = db.store.claim_all(&items, &policy, NOW + 1).await.unwrap();
    let handed: Vec<Option<String>> = decided
        .iter()
        .map(|(_, h)| h.as_ref().map(|d| d.task.key.clone()))
        .collect();
    assert_eq!(
        handed,
        [Some("G-1".to_string()), None, Some("G-2".to_string())]
    );
    assert!(matches!(decided[0].0, ClaimOutcome::Won(_)));
    assert_eq!(decided[1].0, ClaimOutcome::AlreadyAdvanced);
    assert!(matches!(decided[2].0, ClaimOutcome::Won(_)));
    assert_eq!(db.store.advances_of(d1.job.id).await.unwrap().len(), 1);
    assert_eq!(db.store.advances_of(d2.job.id).await.unwrap().len(), 1);
    // The group's events, written after its last claim, keep the claims' order.
    let (e1, e2) = (
        db.store.events(d1.task.id).await.unwrap(),
        db.store.events(d2.task.id).await.unwrap(),
    );
    let tail = |evs: &[entity::events::Model], n| -> Vec<String> {
        evs[evs.len() - n..]
            .iter()
            .map(|e| e.kind.to_string())
            .collect()
    };
    let won = ["claim_won", "job_queued", "job_advanced"];
    assert_eq!(tail(&e1, 4), [&won[..], &["claim_lost"]].concat());
    assert_eq!(tail(&e2, 3), won);
    assert!(e1.last().unwrap().id < e2[e2.len() - 3].id);
}
on_both!(
    claims_decided_together_see_each_other,
    claims_decided_together_see_each_other
);

/// A claim of a group that fails leaves nothing written, for none of them (the Advancer
/// then decides each on its own).
async fn a_failed_claim_of_a_group_writes_nothing_of_the_others(db: TestDb) {
    let policy = policy();
    crate::support::submit(&db.store, "F-1", "analyst", NOW).await;
    crate::support::submit(&db.store, "F-2", "analyst", NOW).await;
    let (d1, d2) = (take(&db).await, take(&db).await);
    name_a_missing_run(&db, d2.job.id).await;
    let (c1, c2) = (
        passed(&d1),
        claim(&d2.job, MISSING_RUN, Verdict::Passed, Decider::Monitor),
    );
    let exit = run_exit(d1.task.id, &d1.run, None, 0, NOW + 1);
    let items = [
        ClaimItem {
            claim: &c1,
            exit: Some(&exit),
            taker: None,
        },
        ClaimItem {
            claim: &c2,
            exit: None,
            taker: None,
        },
    ];
    assert!(matches!(
        db.store.claim_all(&items, &policy, NOW + 1).await,
        Err(GroupError::NothingWritten(_))
    ));
    let run = db.store.run(d1.run.id).await.unwrap().unwrap();
    assert_eq!((run.exit_code, run.exited_at), (None, None));
    let job = db.store.job(d1.job.id).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.current_run_id),
        (JobStatus::Running, Some(d1.run.id))
    );
    assert!(db.store.advances_of(d1.job.id).await.unwrap().is_empty());
    // On its own, the first claim wins, with its exit.
    let (won, _) = db
        .store
        .claim_and_take(&c1, Some(&exit), &policy, NOW + 2, None)
        .await
        .unwrap();
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let run = db.store.run(d1.run.id).await.unwrap().unwrap();
    assert_eq!(run.exit_code, Some(0));
}
on_both!(
    a_failed_claim_of_a_group_writes_nothing_of_the_others,
    a_failed_claim_of_a_group_writes_nothing_of_the_others
);

/// On PostgreSQL, a group whose commit fails (here a deferred trigger refuses it) says so,
/// with the jobs its claims handed off: nothing was written, so putting them back (which
/// the Advancer does, in case the commit was written after all) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_commit_fails_names_its_hand_offs_on_postgres() {
    let Some(db) = TestDb::new(crate::support::Backend::Postgres).await else {
        return;
    };
    let policy = policy();
    crate::support::submit(&db.store, "C-1", "analyst", NOW).await;
    let d = take(&db).await;
    for sql in [
        "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'commit refused'; END $$",
        "CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON advances \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit()",
    ] {
        db.execute(sql).await;
    }
    let taker = Taker {
        node_id: "n1",
        log_dir: db.dir.path(),
        policy: Some(&policy),
    };
    let c1 = passed(&d);
    let items = [ClaimItem {
        claim: &c1,
        exit: None,
        taker: Some(taker),
    }];
    let Err(GroupError::Commit { handed, .. }) = db.store.claim_all(&items, &policy, NOW + 1).await
    else {
        panic!("the commit must fail");
    };
    assert_eq!(handed.len(), 1);
    assert_eq!(handed[0].job.stage, "developer");
    let job = db.store.job(d.job.id).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.current_run_id),
        (JobStatus::Running, Some(d.run.id))
    );
    assert!(db.store.advances_of(d.job.id).await.unwrap().is_empty());
    assert!(
        !db.store
            .release_run(&handed[0], "test", NOW + 2)
            .await
            .unwrap()
    );
}

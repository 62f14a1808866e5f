//! Lock order on PostgreSQL: writers that meet on the same rows take them in one order
//! (a task's row before its jobs' and effects', tasks in the order of their ids), so
//! that they wait for each other instead of deadlocking (ADR 0001, ADR 0008).

use baton::model::{ClaimOutcome, Decider, EffectKind, EffectStatus, ReapTier, Verdict};
use baton::store::{ClaimItem, Dispatched, EffectOutcome};

use crate::handoff::{NOW, passed, take};
use crate::store::{claim, policy};
use crate::support::TestDb;

/// On PostgreSQL, groups of claims (of two nodes, say) over the same tasks, named in opposite
/// orders, do not deadlock: each group takes its tasks' rows first, in the order of their
/// ids. Here a third transaction holds the second task while one group (second task's
/// claim, then the first's) waits for it, and the other group (first, then second) starts
/// behind; taken in the claims' order, the two would wait for each other once the third
/// lets go, and PostgreSQL would fail one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_over_the_same_tasks_do_not_deadlock_on_postgres() {
    let Some(db) = TestDb::new(crate::support::Backend::Postgres).await else {
        return;
    };
    let policy = policy();
    crate::support::submit(&db.store, "D-1", "analyst", NOW).await;
    crate::support::submit(&db.store, "D-2", "analyst", NOW).await;
    let (d1, d2) = (take(&db).await, take(&db).await);
    let held = db.hold_task(d2.task.id).await;
    let item = |claim| ClaimItem {
        claim,
        exit: None,
        taker: None,
    };
    let reaper = Decider::Reaper(ReapTier::Unfinished);
    let (c1, c2) = (passed(&d1), passed(&d2));
    let (r1, r2) = (
        claim(&d1.job, d1.run.id, Verdict::Passed, reaper),
        claim(&d2.job, d2.run.id, Verdict::Passed, reaper),
    );
    let (first, second) = ([item(&c2), item(&c1)], [item(&r1), item(&r2)]);
    let (first, second, ()) = tokio::join!(
        db.store.claim_all(&first, &policy, NOW + 1),
        async {
            db.lock_waiters(1).await;
            db.store.claim_all(&second, &policy, NOW + 1).await
        },
        async {
            db.lock_waiters(2).await;
            held.commit().await.unwrap();
        },
    );
    let outcomes = |d: Vec<(ClaimOutcome, Option<Dispatched>)>| -> Vec<String> {
        d.into_iter().map(|(o, _)| o.label().to_string()).collect()
    };
    assert_eq!(outcomes(first.unwrap()), ["won", "won"]);
    assert_eq!(
        outcomes(second.unwrap()),
        ["already_advanced", "already_advanced"]
    );
}

/// On PostgreSQL, the end of a push (a delivery) takes its task's row before its
/// effect's, as a claim does (which inserts its effects, waiting on one held under the
/// same key, after its task's row): while the task is held, the finishing worker waits
/// holding nothing of the effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_ends_after_its_tasks_row_on_postgres() {
    let Some(db) = TestDb::new(crate::support::Backend::Postgres).await else {
        return;
    };
    let node = db.store.register_node("host-a", 1, NOW).await.unwrap();
    crate::support::submit(&db.store, "L-1", "analyst", NOW).await;
    let d = db
        .store
        .dispatch(&node, db.dir.path(), None, NOW)
        .await
        .unwrap()
        .unwrap();
    let mut passed = passed(&d);
    passed.commit_sha = Some("c1".into());
    let won = db.store.claim(&passed, &policy(), NOW).await.unwrap();
    assert!(matches!(won, ClaimOutcome::Won(_)), "{won:?}");
    let key = crate::support::key(&d.task.key);
    let detail = db.store.task_detail(&key).await.unwrap();
    let push = detail
        .effects
        .into_iter()
        .find(|e| e.kind == EffectKind::Push && e.status == EffectStatus::Pending)
        .expect("a pending push");
    assert!(
        db.store
            .lease_effect(&push, &node, 60_000, NOW)
            .await
            .unwrap()
    );
    let held = db.hold_task(d.task.id).await;
    let done = EffectOutcome::Done { external_ref: None };
    let (finished, ()) = tokio::join!(
        db.store.finish_effect(&push, &node, done, Vec::new(), NOW),
        async {
            db.lock_waiters(1).await;
            // The worker waits for the task's row and holds nothing of the effect's.
            let sql = format!(
                "SELECT id FROM effects WHERE id = {} FOR UPDATE NOWAIT",
                push.id
            );
            let free = db.try_execute(&sql).await;
            held.commit().await.unwrap();
            assert!(free.is_ok(), "the effect's row is held: {free:?}");
        },
    );
    assert!(finished.unwrap().recorded);
}

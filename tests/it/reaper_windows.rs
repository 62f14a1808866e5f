//! The claim races and the Reaper's time windows, on a manual clock: the Reaper's passes
//! are driven by hand, and the Advancer's probe shows what it decided.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton::actors::advancer::{Advancer, AdvancerArgs, send_claim};
use baton::actors::{Ctx, ProbeEvent, Watched, reaper};
use baton::clock::Clock;
use baton::config::{Config, EnvOverrides};
use baton::model::{
    Claim, ClaimOutcome, Decider, EventKind, JobStatus, ReapTier, RunOutcome, Verdict,
};
use baton::store::Store;
use ractor::Actor;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::on_both;
use crate::support::TestDb;

/// An Advancer with a probe over `store`, and a job dispatched with its exit recorded.
pub struct ClaimSetup {
    pub ctx: Ctx,
    pub rx: UnboundedReceiver<ProbeEvent>,
    pub advancer: ractor::ActorRef<baton::actors::advancer::AdvancerMsg>,
    pub job: entity::jobs::Model,
    pub run: entity::agent_runs::Model,
}

async fn claim_setup(db: &TestDb, store: Store) -> ClaimSetup {
    claim_setup_with(db, store, None).await
}

/// The stand-ins of a node's Dispatcher and Supervisor, for an Advancer's hand-offs.
pub type NodeStandIns = (
    ractor::ActorRef<baton::actors::dispatcher::DispatcherMsg>,
    ractor::ActorRef<baton::actors::supervisor::SupervisorMsg>,
);

/// [`claim_setup`], with the Advancer handing off to `node`'s stand-ins.
pub async fn claim_setup_with(db: &TestDb, store: Store, node: Option<NodeStandIns>) -> ClaimSetup {
    let config = Config::from_toml(
        crate::store::PIPELINE_TOML,
        db.dir.path(),
        &EnvOverrides::default(),
    )
    .unwrap();
    let (tx, rx) = unbounded_channel();
    let clock = Clock::manual();
    let ctx = Ctx {
        policy: Arc::new(config.policy()),
        effector: baton::effects::Effector::new(
            Arc::new(config.clone()),
            store.clone(),
            Default::default(),
        ),
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
    crate::support::submit(&store, "RACE-1", "analyst", clock.now_ms()).await;
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
            dispatcher: node.as_ref().map(|n| n.0.clone()),
            supervisor: node.map(|n| n.1),
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
        JobStatus::Running
    );

    s.ctx.clock.advance(Duration::from_secs(1));
    let (r, claims) = reaper::run_once(&s.ctx, &s.advancer).await.unwrap();
    assert_eq!((r.n_tier2, r.n_won), (1, 1));
    assert_eq!(
        claims[0].0.decided_by,
        Decider::Reaper(ReapTier::Unfinished)
    );
    // The Advancer handled exactly that claim, from the Reaper, and it won.
    match s.rx.recv().await.unwrap() {
        ProbeEvent::Advancer { claim, outcome, .. } => {
            assert_eq!(
                (claim.decided_by, claim.run_id),
                (Decider::Reaper(ReapTier::Unfinished), s.run.id)
            );
            assert!(matches!(outcome, Ok(ClaimOutcome::Won(_))), "{outcome:?}");
        }
        other => panic!("unexpected probe event {other:?}"),
    }
    let events = s.ctx.store.events(s.job.task_id).await.unwrap();
    let reaped = events.iter().find(|e| e.kind == EventKind::Reaped).unwrap();
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
    let claim = |by: Decider| Claim {
        job_id: s.job.id,
        run_id: s.run.id,
        verdict: Verdict::Passed,
        decided_by: by,
        commit_sha: None,
        feedback: None,
        usage: None,
    };
    let (a, b) = tokio::join!(
        send_claim(&s.advancer, claim(Decider::Monitor)),
        send_claim(&s.advancer, claim(Decider::Reaper(ReapTier::Unfinished))),
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
    // The Advancer decided them in order: the first won, the second did not.
    let mut seen = Vec::new();
    for _ in 0..2 {
        if let ProbeEvent::Advancer { outcome, .. } = s.rx.recv().await.unwrap() {
            seen.push(matches!(outcome, Ok(ClaimOutcome::Won(_))));
        }
    }
    assert_eq!(seen, [true, false]);
    // A zombie of this run, arriving later, loses as well.
    let late = send_claim(&s.advancer, claim(Decider::Monitor)).await;
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
    crate::support::submit(&store, "LOST-1", "analyst", s.ctx.now()).await;
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
        matches!(outcome, ClaimOutcome::Won(w) if w.job_status == JobStatus::Queued),
        "{outcome:?}"
    );
    assert_eq!(
        store.run(d.run.id).await.unwrap().unwrap().outcome,
        Some(RunOutcome::Lost)
    );
    s.advancer.stop(None);
}
on_both!(lost_agent_is_reaped_as_tier1, lost_agent_is_reaped_as_tier1);

/// Claims waiting for the Advancer together are decided in one transaction, in order: the
/// first of a run's claims wins and the later ones find it advanced. When the group's
/// transaction fails (here a claim whose run is missing), each claim is decided on its
/// own, and the others still win. The claims are queued before the Advancer runs: the
/// test's runtime has one thread.
async fn claims_waiting_together_are_decided_in_one_transaction(db: TestDb) {
    use baton::actors::advancer::AdvancerMsg;
    let mut s = claim_setup(&db, db.store.clone()).await;
    let claim = |job: &entity::jobs::Model, run_id: i64, by: Decider| Claim {
        job_id: job.id,
        run_id,
        verdict: Verdict::Passed,
        decided_by: by,
        commit_sha: None,
        feedback: None,
        usage: None,
    };
    let queue = |claims: Vec<Claim>| {
        claims
            .into_iter()
            .map(|c| {
                let (tx, rx) = ractor::concurrency::oneshot();
                s.advancer
                    .send_message(AdvancerMsg::Claim(c, None, tx.into()))
                    .unwrap();
                rx
            })
            .collect::<Vec<_>>()
    };
    let reaper = Decider::Reaper(ReapTier::Unfinished);
    let replies = queue(vec![
        claim(&s.job, s.run.id, Decider::Monitor),
        claim(&s.job, s.run.id, reaper),
        claim(&s.job, s.run.id, Decider::Monitor),
    ]);
    let mut outcomes = Vec::new();
    for r in replies {
        outcomes.push(r.await.unwrap().unwrap());
    }
    assert!(matches!(outcomes[0], ClaimOutcome::Won(_)), "{outcomes:?}");
    assert_eq!(
        outcomes[1..],
        [ClaimOutcome::AlreadyAdvanced, ClaimOutcome::AlreadyAdvanced]
    );
    let mut groups = Vec::new();
    for _ in 0..3 {
        if let ProbeEvent::Advancer {
            group, together, ..
        } = s.rx.recv().await.unwrap()
        {
            groups.push((group, together));
        }
    }
    assert_eq!(groups, [(3, true), (3, true), (3, true)]);

    // Two more tasks; the second's job names a run that does not exist.
    let store = &s.ctx.store;
    let mut taken = Vec::new();
    for key in ["GROUP-1", "GROUP-2"] {
        crate::support::submit(store, key, "analyst", s.ctx.now()).await;
        let d = store
            .dispatch(&s.ctx.node_id, db.dir.path(), None, s.ctx.now())
            .await
            .unwrap()
            .unwrap();
        taken.push(d);
    }
    crate::store::name_a_missing_run(&db, taken[1].job.id).await;
    let replies = queue(vec![
        claim(&taken[0].job, taken[0].run.id, Decider::Monitor),
        claim(&taken[1].job, crate::store::MISSING_RUN, Decider::Monitor),
    ]);
    let first = replies.into_iter().next().unwrap().await.unwrap();
    assert!(matches!(first, Ok(ClaimOutcome::Won(_))), "{first:?}");
    let mut seen = Vec::new();
    for _ in 0..2 {
        if let ProbeEvent::Advancer {
            outcome,
            group,
            together,
            ..
        } = s.rx.recv().await.unwrap()
        {
            seen.push((outcome.is_ok(), group, together));
        }
    }
    assert_eq!(seen, [(true, 2, false), (false, 2, false)]);
    s.advancer.stop(None);
}

#[tokio::test]
async fn claims_waiting_together_are_decided_in_one_transaction_sqlite() {
    if let Some(db) = TestDb::new(crate::support::Backend::Sqlite).await {
        claims_waiting_together_are_decided_in_one_transaction(db).await;
    }
}

#[tokio::test]
async fn claims_waiting_together_are_decided_in_one_transaction_postgres() {
    if let Some(db) = TestDb::new(crate::support::Backend::Postgres).await {
        claims_waiting_together_are_decided_in_one_transaction(db).await;
    }
}

//! Durable work (ADR 0010): a stage's work is done only when it is on the remote, and
//! nothing builds on work that is not. The store's rules on both databases; hosts that
//! die before their push, and one that comes back, on PostgreSQL with two nodes.

use std::time::Duration;

use baton::clock::Clock;
use baton::config::{Config, EnvOverrides, Secrets};
use baton::model::{
    Claim, ClaimOutcome, Decider, EffectKind, EffectStatus, EventKind, EventSource, JobStatus,
    TaskStatus, Verdict,
};
use baton::service::ServeOptions;
use baton::store::{EffectOutcome, Retried};

use crate::on_both;
use crate::support::git_http::GitHttp;
use crate::support::harness::*;
use crate::support::{Backend, TestDb};

const NOW: i64 = 1_800_000_000_000;
const TOKEN: &str = "durable-token";

/// Two hosts on one database, each with one node, and the store's operations as a node
/// of either does them.
struct TwoHosts {
    db: TestDb,
    policy: baton::policy::Policy,
    a: String,
    b: String,
}

impl TwoHosts {
    async fn new(db: TestDb) -> TwoHosts {
        let a = db.store.register_node("host-a", 1, NOW).await.unwrap();
        let b = db.store.register_node("host-b", 2, NOW).await.unwrap();
        let policy = crate::store::policy();
        TwoHosts { db, policy, a, b }
    }

    async fn take(&self, node: &str) -> Option<baton::store::Dispatched> {
        let dir = self.db.dir.path();
        self.db.store.dispatch(node, dir, None, NOW).await.unwrap()
    }

    /// The run of `d` passed with `commit`.
    async fn pass(&self, d: &baton::store::Dispatched, commit: &str) -> ClaimOutcome {
        self.pass_with(d, Some(commit)).await
    }

    /// The run of `d` passed, with `commit` or none (no push of its own).
    async fn pass_with(&self, d: &baton::store::Dispatched, commit: Option<&str>) -> ClaimOutcome {
        let claim = Claim {
            job_id: d.job.id,
            run_id: d.run.id,
            verdict: Verdict::Passed,
            decided_by: Decider::Monitor,
            commit_sha: commit.map(str::to_string),
            feedback: None,
            usage: None,
        };
        self.db
            .store
            .claim(&claim, &self.policy, NOW)
            .await
            .unwrap()
    }

    /// The task's pending push.
    async fn pending_push(&self, key: &str) -> entity::effects::Model {
        let d = self.db.store.task_detail(&crate::support::key(key)).await;
        d.unwrap()
            .effects
            .into_iter()
            .find(|e| e.kind == EffectKind::Push && e.status == EffectStatus::Pending)
            .expect("a pending push")
    }

    /// `node` performs the task's pending push.
    async fn push(&self, key: &str, node: &str) -> baton::store::FinishedEffect {
        let e = self.pending_push(key).await;
        assert!(
            self.db
                .store
                .lease_effect(&e, node, 60_000, NOW)
                .await
                .unwrap()
        );
        let done = EffectOutcome::Done { external_ref: None };
        let store = &self.db.store;
        store
            .finish_effect(&e, node, done, Vec::new(), NOW)
            .await
            .unwrap()
    }
}

/// The store's rules: the next stage waits on another host for the push of the previous
/// one, and a task is done only once its last push is.
async fn the_next_stage_waits_for_the_push_and_done_waits_for_delivery(db: TestDb) {
    let t = TwoHosts::new(db).await;
    let s = crate::support::submit(&t.db.store, "DW-1", "analyst", NOW).await;
    let d = t.take(&t.b).await.unwrap();
    assert!(matches!(t.pass(&d, "c1").await, ClaimOutcome::Won(_)));
    let push = t.pending_push("DW-1").await;
    assert_eq!(push.host.as_deref(), Some("host-b"));

    // Host A does not start the developer on a checkout without the analyst's commit.
    assert!(t.take(&t.a).await.is_none());
    // Once the push is done, it may.
    let f = t.push("DW-1", &t.b).await;
    assert!(f.recorded && f.task_ended.is_none(), "{f:?}");
    let d = t.take(&t.a).await.expect("the developer");
    assert_eq!(d.job.stage, "developer");

    // The developer passes, and the reviewer: the pipeline ended, but the task is done
    // only once the last push is.
    let ClaimOutcome::Won(w) = t.pass(&d, "c2").await else {
        panic!("the developer's claim lost")
    };
    let review = w.next_job.unwrap();
    assert_eq!(
        t.push("DW-1", &t.a).await.task_ended,
        None,
        "the reviewer has not run"
    );
    let d = t.take(&t.a).await.unwrap();
    assert_eq!(d.job.id, review.id);
    let ClaimOutcome::Won(w) = t.pass(&d, "c3").await else {
        panic!("the reviewer's claim lost")
    };
    assert_eq!(w.task_status, None, "done before its push");
    let task = t.db.store.task(s.task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::Active);
    assert_eq!(
        t.push("DW-1", &t.a).await.task_ended,
        Some(TaskStatus::Done)
    );
    let events = t.db.store.events(s.task.id).await.unwrap();
    let kinds = kinds(&events);
    let awaiting = kinds.iter().position(|k| *k == EventKind::AwaitingDelivery);
    let done_at = kinds.iter().position(|k| *k == EventKind::TaskDone);
    assert!(awaiting.unwrap() < done_at.unwrap(), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == EventKind::TaskDone).count(),
        1
    );
}
on_both!(
    the_next_stage_waits_for_the_push_and_done_waits_for_delivery,
    the_next_stage_waits_for_the_push_and_done_waits_for_delivery
);

/// A last stage with no commit of its own ends its task only once an earlier stage's push
/// is done: its claim leaves the task active while that push is pending.
async fn a_last_stage_without_a_commit_waits_for_an_earlier_push(db: TestDb) {
    let t = TwoHosts::new(db).await;
    let s = crate::support::submit(&t.db.store, "DW-2", "analyst", NOW).await;
    let d = t.take(&t.b).await.unwrap();
    assert!(matches!(t.pass(&d, "c1").await, ClaimOutcome::Won(_)));
    // Host B holds the analyst's commit: its next stages run there before the push.
    for stage in ["developer", "reviewer"] {
        let d = t.take(&t.b).await.expect(stage);
        assert_eq!(d.job.stage, stage);
        let ClaimOutcome::Won(w) = t.pass_with(&d, None).await else {
            panic!("the {stage}'s claim lost")
        };
        assert_eq!(w.task_status, None, "ended before the analyst's push");
    }
    let task = t.db.store.task(s.task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::Active);
    let kinds = kinds(&t.db.store.events(s.task.id).await.unwrap());
    assert!(kinds.contains(&EventKind::AwaitingDelivery), "{kinds:?}");
    assert!(!kinds.contains(&EventKind::TaskDone), "{kinds:?}");
    assert_eq!(
        t.push("DW-2", &t.b).await.task_ended,
        Some(TaskStatus::Done)
    );
}
on_both!(
    a_last_stage_without_a_commit_waits_for_an_earlier_push,
    a_last_stage_without_a_commit_waits_for_an_earlier_push
);

/// The work of a dead host is redone once, from the last commit on the remote, whoever
/// races to recover it.
async fn work_lost_with_its_host_is_redone_once(db: TestDb) {
    let t = TwoHosts::new(db).await;
    let s = crate::support::submit(&t.db.store, "DW-2", "analyst", NOW).await;
    let store = &t.db.store;
    // The analyst on A, pushed; the developer on B, not pushed; the reviewer queued.
    let d = t.take(&t.a).await.unwrap();
    t.pass(&d, "c1").await;
    t.push("DW-2", &t.a).await;
    let d = t.take(&t.b).await.unwrap();
    let dev_job = d.job.clone();
    t.pass(&d, "c2").await;
    assert_eq!(
        store.last_commit(s.task.id).await.unwrap().as_deref(),
        Some("c2")
    );

    // Host B dies: two nodes recover at once; one decision is applied.
    let (r1, r2) = tokio::join!(
        store.recover(s.task.id, "host-b", &t.policy, NOW),
        store.recover(s.task.id, "host-b", &t.policy, NOW),
    );
    let recovered: Vec<_> = [r1.unwrap(), r2.unwrap()].into_iter().flatten().collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    let r = &recovered[0];
    assert_eq!(r.lost_stage, "developer");
    assert_eq!(r.cancelled_jobs.len(), 1, "the queued reviewer");
    let jobs = store.jobs_of(s.task.id).await.unwrap();
    let redo = jobs.iter().find(|j| Some(j.id) == r.job_id).unwrap();
    let shape = (
        redo.stage.as_str(),
        redo.iteration,
        redo.recovery,
        redo.status,
    );
    assert_eq!(shape, ("developer", 2, true, JobStatus::Queued));
    let reviewer = jobs.iter().find(|j| j.stage == "reviewer").unwrap();
    assert_eq!(reviewer.status, JobStatus::Cancelled);
    assert!(
        jobs.iter()
            .any(|j| j.id == dev_job.id && j.status == JobStatus::Done)
    );
    // The redo starts from the analyst's commit, the last one on the remote.
    assert_eq!(
        store.last_commit(s.task.id).await.unwrap().as_deref(),
        Some("c1")
    );
    let d = store
        .task_detail(&crate::support::key("DW-2"))
        .await
        .unwrap();
    let closed: Vec<_> = d
        .effects
        .iter()
        .filter(|e| e.status == EffectStatus::Cancelled)
        .collect();
    assert_eq!(closed.len(), 1);
    assert!(closed[0].last_error.as_deref().unwrap().contains("host-b"));
    let events: Vec<_> = d
        .events
        .iter()
        .filter(|e| e.kind == EventKind::TaskRecovered)
        .collect();
    assert_eq!(events.len(), 1);
    assert!(
        events[0].detail.contains("\"decided_by\":\"recovery\""),
        "{}",
        events[0].detail
    );
    // Nothing waits for host B any more: a later pass does nothing.
    let again = store.recover(s.task.id, "host-b", &t.policy, NOW).await;
    assert!(again.unwrap().is_none());
    // The redo is dispatched on A.
    assert_eq!(t.take(&t.a).await.unwrap().job.id, redo.id);
}
on_both!(
    work_lost_with_its_host_is_redone_once,
    work_lost_with_its_host_is_redone_once
);

/// The harness's remote served over https behind a token, with its `[repo]` pointing
/// there; `host`'s config file says so too (for a `baton serve` of that host).
fn private_host(h: &Harness, host: &str, stages: &str, url: &str) -> Config {
    h.host_config(host, stages);
    let path = h.root.join("hosts").join(host).join("baton.toml");
    let local = format!("url = \"{}\"", h.root.join("remote.git").display());
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &local,
        &format!("url = \"{url}\"\ntoken_env = \"BATON_TEST_REPO_TOKEN\""),
    );
    std::fs::write(&path, &text).unwrap();
    Config::from_toml(&text, &h.root, &EnvOverrides::default()).unwrap_or_else(|p| panic!("{p:?}"))
}

fn secrets() -> ServeOptions {
    ServeOptions {
        secrets: Some(Secrets {
            repo_token: Some(TOKEN.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const STAGES: &str = r#"
[pipelines.default]
stages = ["analyst", "developer"]
[stages.analyst]
command = ["sh", "AGENT"]
gate.artifacts = ["analysis.md"]
[stages.developer]
command = ["sh", "AGENT"]
gate.artifacts = ["dev.md"]
[effects]
push = true
backoff_initial = "200ms"
backoff_max = "1s"
max_attempts = 100
"#;

/// On host-b the analyst leaves the remote's switch (`SWITCH`) on as it ends; the
/// developer notes whether it found the analyst's work, and on host-b works for two
/// minutes (it dies with its host first).
const AGENT: &str = r#"
case "$BATON_STAGE" in
  analyst)
    echo "analysis by $BATON_WORKSPACE" > analysis.md
    case "$BATON_WORKSPACE" in *host-b*) touch "ROOT/SWITCH" ;; esac ;;
  developer)
    if [ -f analysis.md ]; then echo "developer found the analysis" >> ROOT/starts.txt
    else echo "developer MISSING the analysis" >> ROOT/starts.txt; fi
    case "$BATON_WORKSPACE" in *host-b*) [ SWITCH = outage ] && sleep 120 ;; esac
    echo developed > dev.md ;;
esac
"#;

/// Host B runs the analyst (and perhaps the developer) and dies before its push reaches
/// the remote: while the push is in flight (`hold`), or between attempts of a remote
/// that refuses it for a while (`outage`). Host A redoes the lost work from the remote:
/// every stage's commit ends on the remote, none built on a checkout that lacked one.
async fn a_host_that_dies_before_its_push_loses_nothing(switch: &str) {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let h = Harness::new(db);
    let server = GitHttp::start(&h.root, TOKEN).await;
    let agent = h.agent(
        "agent",
        &AGENT
            .replace("ROOT", &h.root.display().to_string())
            .replace("SWITCH", switch),
    );
    let stages = STAGES.replace("AGENT", &agent);
    let url = server.url("remote.git");
    let config_a = private_host(&h, "host-a", &stages, &url);
    private_host(&h, "host-b", &stages, &url);
    let s = h.submit("DIE-1", "analyst").await;
    let key = crate::support::key("DIE-1");

    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(h.root.join("hosts/host-b/baton.toml"))
        .arg("serve")
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .env("BATON_TEST_REPO_TOKEN", TOKEN)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Waiting on another process: nothing here can send a probe event.
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    loop {
        let d = h.db.store.task_detail(&key).await.unwrap();
        let push = d.effects.iter().find(|e| e.kind == EffectKind::Push);
        let dev = d.jobs.iter().find(|j| j.stage == "developer");
        let ready = match switch {
            // The analyst's push is in flight and the developer ended: its push waits.
            "hold" => {
                push.is_some_and(|p| p.attempts >= 1)
                    && d.events
                        .iter()
                        .any(|e| e.kind == EventKind::AwaitingDelivery)
            }
            // The analyst's push failed once; the developer's agent runs.
            _ => {
                push.is_some_and(|p| p.last_error.is_some())
                    && dev
                        .is_some_and(|j| d.runs.iter().any(|r| r.job_id == j.id && r.pid.is_some()))
            }
        };
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host-b never got there: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Host B dies with its agents; the remote is healthy again.
    serve.kill().unwrap();
    serve.wait().unwrap();
    let d = h.db.store.task_detail(&key).await.unwrap();
    for r in d
        .runs
        .iter()
        .filter(|r| r.pid.is_some() && r.exit_code.is_none())
    {
        baton::agent::signal_group(r.pid.unwrap(), nix::sys::signal::Signal::SIGKILL);
    }
    let lost: Vec<String> = d.runs.iter().filter_map(|r| r.commit_sha.clone()).collect();
    assert!(!lost.is_empty());
    let _ = std::fs::remove_file(h.root.join(switch));

    let (node_a, mut rx) = h.start_with(config_a, secrets()).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    wait_effects_settled(&mut rx, &h.db.store, "DIE-1").await;
    node_a.shutdown().await;

    let d = h.db.store.task_detail(&key).await.unwrap();
    assert_eq!(d.task.status, TaskStatus::Done);
    // Every stage's commit is on the remote: the analyst's and developer's, redone by A.
    let on_remote = remote_commits(&h.root.join("remote.git"), "baton/DIE-1");
    let summaries: Vec<&str> = on_remote.iter().map(|(_, s)| s.as_str()).collect();
    assert!(
        summaries[0].starts_with("developer(DIE-1)"),
        "{summaries:?}"
    );
    assert!(summaries[1].starts_with("analyst(DIE-1)"), "{summaries:?}");
    for sha in &lost {
        assert!(
            !on_remote.iter().any(|(id, _)| id == sha),
            "host-b's unpushed commit {sha} cannot be on the remote"
        );
    }
    // One recovery, back to the analyst, which did not count as an iteration.
    let recoveries: Vec<_> = d
        .events
        .iter()
        .filter(|e| e.kind == EventKind::TaskRecovered)
        .collect();
    assert_eq!(recoveries.len(), 1, "{:?}", kinds(&d.events));
    assert!(
        recoveries[0].detail.contains("\"lost_stage\":\"analyst\""),
        "{}",
        recoveries[0].detail
    );
    let redo = d.jobs.iter().find(|j| j.recovery).expect("a recovery job");
    assert_eq!(redo.stage, "analyst");
    assert!(
        d.effects
            .iter()
            .filter(|e| e.kind == EffectKind::Push)
            .all(|e| { matches!(e.status, EffectStatus::Done | EffectStatus::Cancelled) })
    );
    // No developer ever ran on a checkout without the analysis.
    let starts = std::fs::read_to_string(h.root.join("starts.txt")).unwrap();
    assert!(!starts.contains("MISSING"), "{starts}");
    assert_eq!(s.task.key, "DIE-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_dies_while_pushing_loses_nothing() {
    a_host_that_dies_before_its_push_loses_nothing("hold").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_dies_during_an_outage_of_the_remote_loses_nothing() {
    a_host_that_dies_before_its_push_loses_nothing("outage").await;
}

/// A host that stops while its push waits (the remote refused it for a while) and comes
/// back within its adoption window performs the push itself: meanwhile no other host
/// starts the next stage without the commit, and nothing is recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_pinned_to_a_host_that_comes_back_is_performed_by_it() {
    let Some(db) = TestDb::new(Backend::Postgres).await else {
        return;
    };
    let h = Harness::new(db);
    let server = GitHttp::start(&h.root, TOKEN).await;
    // On host-b the analyst turns the outage on, and the developer's first attempt fails.
    let agent = h.agent(
        "agent",
        &format!(
            r#"
case "$BATON_STAGE $BATON_WORKSPACE $BATON_ATTEMPT" in
  analyst*host-b*) echo analysis > analysis.md; touch "{root}/outage" ;;
  analyst*) echo analysis > analysis.md ;;
  developer*host-b*" 1") exit 1 ;;
  developer*)
    [ -f analysis.md ] || echo "developer MISSING the analysis" >> {root}/starts.txt
    echo developed > dev.md ;;
esac
"#,
            root = h.root.display()
        ),
    );
    let stages = STAGES.replace("AGENT", &agent);
    let url = server.url("remote.git");
    let mut config_a = private_host(&h, "host-a", &stages, &url);
    let mut config_b = private_host(&h, "host-b", &stages, &url);
    // The developer's retry waits long enough for host B to be gone by then.
    for c in [&mut config_a, &mut config_b] {
        c.retry.backoff_initial = Duration::from_secs(3);
        c.retry.backoff_max = Duration::from_secs(3);
    }
    h.submit("BACK-1", "analyst").await;
    let key = crate::support::key("BACK-1");

    let (node_b, mut rx_b) = h.start_with(config_b.clone(), secrets()).await;
    // The developer's first attempt failed on host B: it is queued for a retry.
    wait_for(&mut rx_b, |ev| match ev {
        baton::actors::ProbeEvent::Advancer {
            outcome: Ok(ClaimOutcome::Won(w)),
            ..
        } => (w.job_status == JobStatus::Queued).then_some(()),
        _ => None,
    })
    .await;
    node_b.shutdown().await;

    // Host A sees the retry come due, but the analyst's commit is only on host B.
    let (node_a, mut rx_a) = h.start_with(config_a, secrets()).await;
    for _ in 0..10 {
        wait_for(&mut rx_a, |ev| {
            matches!(ev, baton::actors::ProbeEvent::Reaper { .. }).then_some(())
        })
        .await;
    }
    let d = h.db.store.task_detail(&key).await.unwrap();
    let dev = d.jobs.iter().find(|j| j.stage == "developer").unwrap();
    assert!(
        dev.not_before <= Clock::system().now_ms(),
        "the retry is due"
    );
    assert_eq!(dev.status, JobStatus::Queued);
    assert!(
        !d.events.iter().any(|e| e.kind == EventKind::TaskRecovered),
        "host-b is not dead"
    );
    let push = d
        .effects
        .iter()
        .find(|e| e.kind == EffectKind::Push)
        .unwrap();
    assert_eq!(
        (push.status, push.host.as_deref()),
        (EffectStatus::Pending, Some("host-b"))
    );
    assert!(
        !d.runs.iter().any(|r| r.node_id == node_a.node_id),
        "host-a started a stage without the analyst's commit"
    );
    let now = Clock::system().now_ms();
    let shown = baton::present::render_detail(&d, now);
    assert!(shown.contains("waits for host host-b"), "{shown}");
    let doc = baton::present::detail_json(&d, now);
    let waiting = &doc["effects"][0]["waiting"];
    assert_eq!(waiting["on"], "host", "{doc}");
    // The dashboard's overview says the same.
    let overview: serde_json::Value =
        reqwest::get(format!("http://{}/api/v1/overview", node_a.http_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let listed = &overview["waiting_effects"][0];
    assert_eq!(
        (&listed["task"], &listed["waiting"]["on"]),
        (&"BACK-1".into(), &"host".into())
    );

    // The remote is back, and so is host B: it pushes; the developer follows.
    std::fs::remove_file(h.root.join("outage")).unwrap();
    let (node_b, mut rx_b) = h.start_with(config_b, secrets()).await;
    let status = tokio::select! {
        s = wait_task_end(&mut rx_b) => s,
        s = wait_task_end(&mut rx_a) => s,
    };
    assert_eq!(status, TaskStatus::Done);
    node_b.shutdown().await;
    node_a.shutdown().await;
    let d = h.db.store.task_detail(&key).await.unwrap();
    assert!(!d.events.iter().any(|e| e.kind == EventKind::TaskRecovered));
    let on_remote = remote_commits(&h.root.join("remote.git"), "baton/BACK-1");
    for r in d.runs.iter().filter(|r| r.commit_sha.is_some()) {
        let sha = r.commit_sha.as_deref().unwrap();
        assert!(
            on_remote.iter().any(|(id, _)| id == sha),
            "{sha} is not on the remote"
        );
    }
    let starts = std::fs::read_to_string(h.root.join("starts.txt")).unwrap_or_default();
    assert!(!starts.contains("MISSING"), "{starts}");
}

/// The last push is refused for good (the remote's pre-receive hook declines it): the
/// task fails with the reason, never `done`; once the hook is gone, `baton retry`
/// delivers it and the task is done.
async fn a_push_refused_for_good_fails_the_task_until_retried(db: TestDb) {
    let h = Harness::new(db);
    let server = GitHttp::start(&h.root, TOKEN).await;
    let hook = h.root.join("remote.git/hooks/pre-receive");
    std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
    std::fs::write(
        &hook,
        "#!/bin/sh\necho 'branch protection: no pushes today' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = h.config(
        r#"
[pipelines.default]
stages = ["one"]
[stages.one]
command = ["sh", "-c", "echo one > one.txt"]
[effects]
push = true
"#,
    );
    config.repo.url = server.url("remote.git");
    h.submit("REF-1", "one").await;
    let (node, mut rx) = h.start_with(config, secrets()).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    let key = crate::support::key("REF-1");
    let d = h.db.store.task_detail(&key).await.unwrap();
    assert!(!d.events.iter().any(|e| e.kind == EventKind::TaskDone));
    let shown = baton::present::render_detail(&d, 0);
    assert!(
        shown.contains("failed: the work did not reach the remote"),
        "{shown}"
    );
    assert!(shown.contains("pre-receive hook declined"), "{shown}");

    // The cause is fixed: a retry delivers the work, and only then is the task done.
    std::fs::remove_file(&hook).unwrap();
    let r = baton::tasks::retry(
        &h.db.store,
        &key,
        baton::model::Origin::Cli,
        Clock::system().now_ms(),
    )
    .await
    .unwrap();
    assert_eq!(
        r,
        Retried::Delivery {
            effects: 1,
            status: TaskStatus::Active
        }
    );
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    let on_remote = remote_commits(&h.root.join("remote.git"), "baton/REF-1");
    assert!(on_remote[0].1.starts_with("one(REF-1)"), "{on_remote:?}");
    let _ = EventSource::Cli;
}
on_both!(
    a_push_refused_for_good_fails_the_task_until_retried,
    a_push_refused_for_good_fails_the_task_until_retried
);

/// Without pushing, a stage's work stays on its host: a second host refuses to serve.
async fn without_pushing_a_second_host_refuses_to_serve(db: TestDb) {
    let h = Harness::new(db);
    let stages = "[pipelines.default]\nstages = [\"one\"]\n[stages.one]\ncommand = [\"true\"]\n[effects]\npush = false\n";
    let config_a = h.host_config("host-a", stages);
    let config_b = h.host_config("host-b", stages);
    let (node_a, _rx) = h.start(config_a).await;
    let refused = baton::service::Node::start(config_b, ServeOptions::default()).await;
    let Err(e) = refused else {
        panic!("a second host served without pushing")
    };
    assert!(
        e.to_string()
            .contains("effects.push is off and other hosts serve this database (host-a)"),
        "{e}"
    );
    // Another boot of the same host is no second host.
    let again = h.start(h.host_config("host-a", stages)).await;
    again.0.shutdown().await;
    node_a.shutdown().await;
}
on_both!(
    without_pushing_a_second_host_refuses_to_serve,
    without_pushing_a_second_host_refuses_to_serve
);

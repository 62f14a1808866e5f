//! The outbox performed exactly once: pushes to a real bare remote, and pull requests and
//! Plane calls against local HTTP servers that check every path, header and body the
//! way GitHub, Gitea and Plane would, and answer 201/404/409/422/429/500 on cue.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton::actors::effect_worker::{self, EFFECT_LEASE};
use baton::actors::{Ctx, Watched};
use baton::clock::Clock;
use baton::config::{Config, EnvOverrides, Secrets};
use baton::effects::Effector;
use baton::model::{
    Claim, ClaimOutcome, Decider, EffectKind, EffectStatus, EventKind, EventSource, TaskStatus,
    Verdict,
};
use baton::store::NewTask;
use serde_json::json;
use wiremock::matchers::{body_partial_json, header, header_exists, method, path, query_param};
use wiremock::{Mock, MockBuilder, MockServer, Request, ResponseTemplate};

use crate::on_both;
use crate::support::TestDb;

const BRANCH: &str = "baton/T-1";
const ISSUE: &str = "5b7e0c1e-issue";
const COMMENTS: &str =
    "/api/v1/workspaces/team/projects/proj-uuid/work-items/5b7e0c1e-issue/comments/";

struct Fx {
    db: TestDb,
    ctx: Ctx,
    server: MockServer,
    task_id: i64,
    run_id: i64,
    sha: String,
}

impl Fx {
    fn effector(&self) -> Effector {
        Effector::new(self.ctx.config.clone(), self.ctx.store.clone(), secrets())
    }

    /// Runs passes of the EffectWorker until the task has no pending effect, moving the
    /// clock past every backoff in between.
    async fn drain(&self) {
        for _ in 0..40 {
            if self.pending().await == 0 {
                return;
            }
            effect_worker::run_once(&self.ctx).await.unwrap();
            self.ctx
                .clock
                .advance(self.ctx.config.effects.backoff_max + Duration::from_secs(1));
        }
        panic!("effects still pending after 40 passes");
    }

    async fn pending(&self) -> usize {
        self.effects()
            .await
            .iter()
            .filter(|e| e.status == EffectStatus::Pending)
            .count()
    }

    async fn effects(&self) -> Vec<entity::effects::Model> {
        let key = self.ctx.store.task(self.task_id).await.unwrap().key;
        self.ctx
            .store
            .task_detail(&crate::support::key(&key))
            .await
            .unwrap()
            .effects
    }

    async fn effect(&self, kind: EffectKind) -> entity::effects::Model {
        self.effects()
            .await
            .into_iter()
            .find(|e| e.kind == kind)
            .unwrap()
    }
}

fn secrets() -> Secrets {
    Secrets {
        forge_token: Some("tok-123".into()),
        plane_api_key: Some("plane-key".into()),
        webhook_secret: Some("whsec".into()),
        api_token: None,
        repo_token: None,
    }
}

fn config_toml(root: &std::path::Path, uri: &str, forge_kind: &str) -> String {
    format!(
        r#"
[repo]
url = "{remote}"
[retry]
max_attempts = 1
[pipelines.default]
stages = ["developer", "reviewer"]
[stages.developer]
command = ["true"]
[stages.reviewer]
command = ["true"]
[effects]
push = true
pull_request_after = "developer"
plane_comment = true
max_attempts = 4
backoff_initial = "2s"
backoff_max = "10s"
[forge]
kind = "{forge_kind}"
api_url = "{uri}"
repo = "team/app"
token_env = "BATON_TEST_FORGE_TOKEN"
[plane]
api_url = "{uri}"
workspace = "team"
project_id = "proj-uuid"
api_key_env = "BATON_TEST_PLANE_KEY"
webhook_secret_env = "BATON_TEST_WEBHOOK_SECRET"
trigger_state = "Ready for agents"
cancel_states = ["Wont do"]
states = {{ on_done = "Done", on_failed = "Blocked" }}
[http]
listen = "127.0.0.1:0"
"#,
        remote = root.join("remote.git").display(),
    )
}

/// A task whose developer stage passed with a real commit: its claim wrote the push,
/// pull request and Plane comment effects.
async fn setup(db: TestDb, forge_kind: &str) -> Fx {
    let server = MockServer::start().await;
    let root = db.dir.path().to_path_buf();
    baton::workspace::seed_remote(&root.join("seed"), &root.join("remote.git")).unwrap();
    let config = Config::from_toml(
        &config_toml(&root, &server.uri(), forge_kind),
        &root,
        &EnvOverrides::default(),
    )
    .unwrap_or_else(|p| panic!("{p:?}"));
    let clock = Clock::manual();
    let store = db.store.clone();
    let node_id = store
        .register_node(&baton::hostname(), 1, clock.now_ms())
        .await
        .unwrap();
    let ctx = Ctx {
        policy: Arc::new(config.policy()),
        effector: Effector::new(Arc::new(config.clone()), store.clone(), secrets()),
        config: Arc::new(config),
        store: store.clone(),
        clock: clock.clone(),
        node_id,
        hostname: baton::hostname(),
        watched: Watched::default(),
        probe: None,
        metrics: Arc::new(baton::telemetry::Metrics::global()),
        secrets: secrets(),
        shim_exe: PathBuf::from(env!("CARGO_BIN_EXE_baton")),
    };
    let s = store
        .submit(
            NewTask {
                key: crate::support::key("T-1"),
                pipeline: "default".into(),
                title: "A thing".into(),
                description: None,
                plane_issue_id: Some(ISSUE.into()),
                first_stage: "developer".into(),
                trace_parent: baton::telemetry::new_trace_parent(),
            },
            EventSource::Cli,
            clock.now_ms(),
        )
        .await
        .unwrap();
    let d = store
        .dispatch(&ctx.node_id, &root, None, clock.now_ms())
        .await
        .unwrap()
        .unwrap();
    let ws = baton::workspace::path_for(&ctx.config.workspace_root, "T-1").unwrap();
    let access = baton::workspace::RepoAccess {
        url: ctx.config.repo.url.clone(),
        ..Default::default()
    };
    let root = &ctx.config.workspace_root;
    baton::workspace::prepare(
        root,
        &ws,
        &access,
        "T-1",
        BRANCH,
        "main",
        baton::workspace::LastCommit::Recorded(None, std::time::Instant::now()),
    )
    .unwrap();
    std::fs::write(ws.join("feature.txt"), "work\n").unwrap();
    let sha = baton::workspace::commit_all(&ws, "developer(T-1): auto-commit")
        .unwrap()
        .unwrap();
    let out = store
        .claim(
            &Claim {
                job_id: d.job.id,
                run_id: d.run.id,
                verdict: Verdict::Passed,
                decided_by: Decider::Monitor,
                commit_sha: Some(sha.clone()),
                feedback: None,
                usage: None,
            },
            &ctx.policy,
            clock.now_ms(),
        )
        .await
        .unwrap();
    assert!(
        matches!(out, ClaimOutcome::Won(ref w) if w.effects == 3),
        "{out:?}"
    );
    Fx {
        db,
        ctx,
        server,
        task_id: s.task.id,
        run_id: d.run.id,
        sha,
    }
}

fn github_list() -> MockBuilder {
    Mock::given(method("GET"))
        .and(path("/repos/team/app/pulls"))
        .and(query_param("head", "team:baton/T-1"))
        .and(query_param("state", "open"))
        .and(header("authorization", "Bearer tok-123"))
        .and(header("accept", "application/vnd.github+json"))
        .and(header("x-github-api-version", "2022-11-28"))
        .and(header_exists("user-agent"))
}

fn github_create() -> MockBuilder {
    Mock::given(method("POST"))
        .and(path("/repos/team/app/pulls"))
        .and(header("authorization", "Bearer tok-123"))
        .and(header("accept", "application/vnd.github+json"))
        .and(header("x-github-api-version", "2022-11-28"))
        .and(header_exists("user-agent"))
        .and(body_partial_json(
            json!({"head": BRANCH, "base": "main", "title": "T-1: A thing"}),
        ))
}

fn plane_comment(run_id: i64) -> MockBuilder {
    Mock::given(method("POST"))
        .and(path(COMMENTS))
        .and(header("x-api-key", "plane-key"))
        .and(body_partial_json(json!({
            "external_source": "baton",
            "external_id": format!("plane_comment:{run_id}"),
        })))
}

const PR_URL: &str = "https://github.com/team/app/pull/7";

async fn github_effects_run_in_order_and_once(db: TestDb) {
    let fx = setup(db, "github").await;
    github_list()
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .expect(1)
        .mount(&fx.server)
        .await;
    github_create()
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"number": 7, "html_url": PR_URL})),
        )
        .expect(1)
        .mount(&fx.server)
        .await;
    plane_comment(fx.run_id)
        .and(|r: &Request| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let html = v["comment_html"].as_str().unwrap_or_default();
            html.contains("developer") && html.contains("passed") && html.contains(PR_URL)
        })
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "comment-1"})))
        .expect(1)
        .mount(&fx.server)
        .await;
    fx.drain().await;

    let effects = fx.effects().await;
    let done: Vec<(&str, &str, Option<&str>)> = effects
        .iter()
        .map(|e| {
            (
                e.kind.as_str(),
                e.status.as_str(),
                e.external_ref.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        done,
        [
            ("push", "done", Some(fx.sha.as_str())),
            ("pull_request", "done", Some(PR_URL)),
            ("plane_comment", "done", Some("comment-1")),
        ]
    );
    // The push reached the remote.
    let remote = git2::Repository::open_bare(fx.db.dir.path().join("remote.git")).unwrap();
    assert_eq!(
        remote
            .revparse_single("refs/heads/baton/T-1")
            .unwrap()
            .id()
            .to_string(),
        fx.sha
    );
    // effect_done events in the order push, pull request, comment.
    let events = fx.ctx.store.events(fx.task_id).await.unwrap();
    let kinds: Vec<String> = events
        .iter()
        .filter(|e| e.kind == EventKind::EffectDone)
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.detail).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["push", "pull_request", "plane_comment"]);
}
on_both!(
    github_effects_run_in_order_and_once,
    github_effects_run_in_order_and_once
);

async fn github_422_already_exists_counts_as_done(db: TestDb) {
    let fx = setup(db, "github").await;
    github_list()
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .up_to_n_times(1)
        .expect(1)
        .mount(&fx.server)
        .await;
    github_create()
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "message": "Validation Failed",
            "errors": [{"resource": "PullRequest", "code": "custom", "message": "A pull request already exists for team:baton/T-1."}],
        })))
        .expect(1)
        .mount(&fx.server)
        .await;
    github_list()
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!([{"number": 7, "html_url": PR_URL}])),
        )
        .mount(&fx.server)
        .await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "c"})))
        .mount(&fx.server)
        .await;
    fx.drain().await;
    let pr = fx.effect(EffectKind::PullRequest).await;
    assert_eq!(
        (pr.status.as_str(), pr.external_ref.as_deref()),
        ("done", Some(PR_URL))
    );
}
on_both!(
    github_422_already_exists_counts_as_done,
    github_422_already_exists_counts_as_done
);

async fn gitea_409_counts_as_done(db: TestDb) {
    let fx = setup(db, "gitea").await;
    let lookup = || {
        Mock::given(method("GET"))
            .and(path("/api/v1/repos/team/app/pulls/main/baton/T-1"))
            .and(header("authorization", "token tok-123"))
    };
    lookup()
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "not found"})))
        .up_to_n_times(1)
        .expect(1)
        .mount(&fx.server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/v1/repos/team/app/pulls"))
        .and(header("authorization", "token tok-123"))
        .and(body_partial_json(json!({"head": BRANCH, "base": "main"})))
        .respond_with(
            ResponseTemplate::new(409)
                .set_body_json(json!({"message": "pull request already exists"})),
        )
        .expect(1)
        .mount(&fx.server)
        .await;
    let url = "https://gitea.example/team/app/pulls/3";
    lookup()
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"state": "open", "html_url": url})),
        )
        .mount(&fx.server)
        .await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "c"})))
        .mount(&fx.server)
        .await;
    fx.drain().await;
    assert_eq!(
        fx.effect(EffectKind::PullRequest)
            .await
            .external_ref
            .as_deref(),
        Some(url)
    );
}
on_both!(gitea_409_counts_as_done, gitea_409_counts_as_done);

/// GitHub's lookup answers nothing until the PR exists, then the PR.
async fn mount_github_pr(fx: &Fx) {
    github_list()
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
        .up_to_n_times(1)
        .mount(&fx.server)
        .await;
    github_list()
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([{"html_url": PR_URL}])))
        .mount(&fx.server)
        .await;
    github_create()
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"html_url": PR_URL})))
        .expect(1)
        .mount(&fx.server)
        .await;
}

async fn plane_500s_are_retried_then_delivered(db: TestDb) {
    let fx = setup(db, "github").await;
    mount_github_pr(&fx).await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(500).set_body_string("boom"))
        .up_to_n_times(2)
        .expect(2)
        .mount(&fx.server)
        .await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "c-9"})))
        .expect(1)
        .mount(&fx.server)
        .await;
    fx.drain().await;
    let c = fx.effect(EffectKind::PlaneComment).await;
    assert_eq!(
        (c.status.as_str(), c.attempts, c.last_error.as_deref()),
        ("done", 3, None)
    );
    let events = fx.ctx.store.events(fx.task_id).await.unwrap();
    assert!(!events.iter().any(|e| e.kind == EventKind::EffectFailed));
}
on_both!(
    plane_500s_are_retried_then_delivered,
    plane_500s_are_retried_then_delivered
);

async fn a_429_waits_as_long_as_retry_after_says(db: TestDb) {
    let fx = setup(db, "github").await;
    mount_github_pr(&fx).await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "120"))
        .up_to_n_times(1)
        .expect(1)
        .mount(&fx.server)
        .await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "c"})))
        .expect(1)
        .mount(&fx.server)
        .await;
    // push, then the PR, then the comment meets the 429.
    for _ in 0..3 {
        effect_worker::run_once(&fx.ctx).await.unwrap();
    }
    let c = fx.effect(EffectKind::PlaneComment).await;
    assert_eq!(c.status, EffectStatus::Pending);
    assert!(
        c.last_error.as_deref().unwrap_or_default().contains("429"),
        "{c:?}"
    );
    assert!(
        c.next_attempt_at >= fx.ctx.now() + 120_000,
        "Retry-After was not honoured"
    );
    fx.ctx.clock.advance(Duration::from_secs(60));
    let r = effect_worker::run_once(&fx.ctx).await.unwrap();
    assert_eq!(r.n_done + r.n_retried, 0, "retried before Retry-After");
    fx.ctx.clock.advance(Duration::from_secs(61));
    let r = effect_worker::run_once(&fx.ctx).await.unwrap();
    assert_eq!(r.n_done, 1);
}
on_both!(
    a_429_waits_as_long_as_retry_after_says,
    a_429_waits_as_long_as_retry_after_says
);

async fn an_effect_fails_after_max_attempts(db: TestDb) {
    let fx = setup(db, "github").await;
    mount_github_pr(&fx).await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(503).set_body_string("down"))
        .up_to_n_times(4)
        .expect(4)
        .mount(&fx.server)
        .await;
    fx.drain().await;
    let c = fx.effect(EffectKind::PlaneComment).await;
    assert_eq!((c.status.as_str(), c.attempts), ("failed", 4));
    assert!(c.last_error.as_deref().unwrap().contains("503"), "{c:?}");
    let events = fx.ctx.store.events(fx.task_id).await.unwrap();
    let failed = events
        .iter()
        .find(|e| e.kind == EventKind::EffectFailed)
        .unwrap();
    assert!(failed.detail.contains("plane_comment"), "{}", failed.detail);
    // `baton status` shows it.
    let shown = baton::present::render_detail(
        &fx.ctx
            .store
            .task_detail(&crate::support::key("T-1"))
            .await
            .unwrap(),
        fx.ctx.now(),
    );
    assert!(
        shown.contains("plane_comment") && shown.contains("failed") && shown.contains("503"),
        "{shown}"
    );
    // Once Plane is back, the operator retries the task's failed effects.
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "c-1"})))
        .expect(1)
        .mount(&fx.server)
        .await;
    let which = baton::tasks::EffectsToRetry::OfTask(crate::support::key("T-1"));
    let retried = baton::tasks::retry_effects(
        &fx.ctx.store,
        which,
        baton::model::Origin::Cli,
        fx.ctx.now(),
    )
    .await
    .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].id, c.id);
    fx.drain().await;
    let c = fx.effect(EffectKind::PlaneComment).await;
    assert_eq!((c.status, c.attempts), (EffectStatus::Done, 1));
    let events = fx.ctx.store.events(fx.task_id).await.unwrap();
    assert!(events.iter().any(|e| e.kind == EventKind::EffectRetried));
    // Only a failed effect can be retried.
    let again = baton::tasks::retry_effects(
        &fx.ctx.store,
        baton::tasks::EffectsToRetry::One(c.id),
        baton::model::Origin::Cli,
        fx.ctx.now(),
    )
    .await;
    assert!(again.is_err(), "{again:?}");
}
on_both!(
    an_effect_fails_after_max_attempts,
    an_effect_fails_after_max_attempts
);

async fn crash_between_push_and_comment_duplicates_nothing(db: TestDb) {
    let fx = setup(db, "github").await;
    mount_github_pr(&fx).await;
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "c"})))
        .up_to_n_times(1)
        .expect(1)
        .mount(&fx.server)
        .await;
    // A second delivery of the same comment is what Plane answers 409 to.
    plane_comment(fx.run_id)
        .respond_with(ResponseTemplate::new(409))
        .expect(0)
        .mount(&fx.server)
        .await;
    // First life: the push is performed and recorded, then baton dies.
    let first = fx.effector();
    let push = fx.effect(EffectKind::Push).await;
    let node = fx.ctx.node_id.clone();
    assert!(
        fx.ctx
            .store
            .lease_effect(&push, &node, 120_000, fx.ctx.now())
            .await
            .unwrap()
    );
    let task = fx.ctx.store.task(fx.task_id).await.unwrap();
    let pushed = first.perform(&push, &task).await.unwrap();
    let done = baton::store::EffectOutcome::Done {
        external_ref: pushed,
    };
    let f = fx
        .ctx
        .store
        .finish_effect(&push, &node, done, Vec::new(), fx.ctx.now())
        .await;
    assert!(f.unwrap().recorded);
    drop(first);
    // Second life: it opens the PR at GitHub but dies before recording it.
    let second = fx.effector();
    let pr = fx.effect(EffectKind::PullRequest).await;
    assert!(
        fx.ctx
            .store
            .lease_effect(&pr, &fx.ctx.node_id, 120_000, fx.ctx.now())
            .await
            .unwrap()
    );
    let task = fx.ctx.store.task(fx.task_id).await.unwrap();
    second.perform(&pr, &task).await.unwrap();
    drop(second);
    // Third life, after the lease ran out: the PR is found, not opened again; the
    // comment is posted once.
    fx.ctx.clock.advance(EFFECT_LEASE + Duration::from_secs(1));
    // One pass performs every due effect of the task, in order: the pull request, then
    // the comment.
    let r = effect_worker::run_once(&fx.ctx).await.unwrap();
    assert_eq!((r.n_done, r.n_retried, r.n_failed), (2, 0, 0), "{r:?}");
    let effects = fx.effects().await;
    assert!(
        effects.iter().all(|e| e.status == EffectStatus::Done),
        "{effects:?}"
    );
    assert_eq!(
        fx.effect(EffectKind::PullRequest)
            .await
            .external_ref
            .as_deref(),
        Some(PR_URL)
    );
}
on_both!(
    crash_between_push_and_comment_duplicates_nothing,
    crash_between_push_and_comment_duplicates_nothing
);

async fn a_lease_of_an_earlier_boot_is_taken_at_once_and_fences_its_holder(db: TestDb) {
    // No forge or Plane answer is mounted: only the push is performed here.
    let fx = setup(db, "github").await;
    // An earlier boot of this host took the push and died with it.
    let old = fx
        .ctx
        .store
        .register_node(&fx.ctx.hostname, i32::MAX, fx.ctx.now())
        .await
        .unwrap();
    let push = fx.effect(EffectKind::Push).await;
    assert!(
        fx.ctx
            .store
            .lease_effect(&push, &old, 120_000, fx.ctx.now())
            .await
            .unwrap()
    );
    // A live node of another host holds the pull request's lease.
    let pr = fx.effect(EffectKind::PullRequest).await;
    let other = fx
        .ctx
        .store
        .register_node("another-host", 1, fx.ctx.now())
        .await
        .unwrap();
    assert!(
        fx.ctx
            .store
            .lease_effect(&pr, &other, 120_000, fx.ctx.now())
            .await
            .unwrap()
    );
    // The push is taken at once, not after the two minutes of its lease; the pull
    // request after it is left to its live holder.
    let r = effect_worker::run_once(&fx.ctx).await.unwrap();
    assert_eq!((r.n_done, r.n_failed), (1, 0), "{r:?}");
    assert_eq!(fx.effect(EffectKind::Push).await.status, EffectStatus::Done);
    // The old holder's late word changes nothing.
    let recorded = fx
        .ctx
        .store
        .finish_effect(
            &push,
            &old,
            baton::store::EffectOutcome::Failed {
                error: "late".into(),
            },
            Vec::new(),
            fx.ctx.now(),
        )
        .await
        .unwrap();
    assert!(!recorded.recorded);
    assert_eq!(recorded.task_ended, None);
    let push = fx.effect(EffectKind::Push).await;
    assert_eq!((push.status, push.last_error), (EffectStatus::Done, None));
    // A live node's lease is respected until it runs out.
    let r = effect_worker::run_once(&fx.ctx).await.unwrap();
    assert_eq!(r.n_done, 0, "took a live node's lease: {r:?}");
}
on_both!(
    a_lease_of_an_earlier_boot_is_taken_at_once_and_fences_its_holder,
    a_lease_of_an_earlier_boot_is_taken_at_once_and_fences_its_holder
);

async fn plane_state_is_set_by_name_when_the_task_ends(db: TestDb) {
    let fx = setup(db, "github").await;
    mount_github_pr(&fx).await;
    Mock::given(method("POST"))
        .and(path(COMMENTS))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": "c"})))
        .mount(&fx.server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/workspaces/team/projects/proj-uuid/states/"))
        .and(header("x-api-key", "plane-key"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"results": [
            {"id": "st-1", "name": "In Progress"}, {"id": "st-2", "name": "Done"}
        ]})))
        .expect(1)
        .mount(&fx.server)
        .await;
    Mock::given(method("PATCH"))
        .and(path(
            "/api/v1/workspaces/team/projects/proj-uuid/work-items/5b7e0c1e-issue/",
        ))
        .and(header("x-api-key", "plane-key"))
        .and(body_partial_json(json!({"state": "st-2"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": ISSUE})))
        .expect(1)
        .mount(&fx.server)
        .await;
    // The reviewer passes: the task is done.
    let d = fx
        .ctx
        .store
        .dispatch(&fx.ctx.node_id, fx.db.dir.path(), None, fx.ctx.now())
        .await
        .unwrap()
        .unwrap();
    let out = fx
        .ctx
        .store
        .claim(
            &Claim {
                job_id: d.job.id,
                run_id: d.run.id,
                verdict: Verdict::Passed,
                decided_by: Decider::Monitor,
                commit_sha: None,
                feedback: None,
                usage: None,
            },
            &fx.ctx.policy,
            fx.ctx.now(),
        )
        .await
        .unwrap();
    // The earlier stages' push and pull request are still to come: not done before them.
    assert!(
        matches!(out, ClaimOutcome::Won(ref w) if w.task_status.is_none()),
        "{out:?}"
    );
    let task = fx.ctx.store.task(d.task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::Active);
    fx.drain().await;
    let task = fx.ctx.store.task(d.task.id).await.unwrap();
    assert_eq!(task.status, TaskStatus::Done, "delivered, then done");
    let state = fx.effect(EffectKind::PlaneState).await;
    assert_eq!(
        (state.status.as_str(), state.external_ref.as_deref()),
        ("done", Some("Done"))
    );
}
on_both!(
    plane_state_is_set_by_name_when_the_task_ends,
    plane_state_is_set_by_name_when_the_task_ends
);

async fn a_non_fast_forward_push_is_an_error_naming_the_branch(db: TestDb) {
    let fx = setup(db, "github").await;
    // Someone else pushed a different commit to the task's branch.
    let other = fx.db.dir.path().join("other");
    let repo = git2::Repository::clone(&fx.ctx.config.repo.url, &other).unwrap();
    std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
    let theirs = baton::workspace::commit_all(&other, "their work")
        .unwrap()
        .unwrap();
    let mut origin = repo.find_remote("origin").unwrap();
    origin
        .push(&["refs/heads/main:refs/heads/baton/T-1"], None)
        .unwrap();
    effect_worker::run_once(&fx.ctx).await.unwrap();
    let push = fx.effect(EffectKind::Push).await;
    assert_eq!(push.status, EffectStatus::Failed);
    let err = push.last_error.unwrap();
    assert!(
        err.contains("baton/T-1") && (err.contains("fast-forward") || err.contains("fastforward")),
        "{err}"
    );
    // The remote still has their commit.
    let remote = git2::Repository::open_bare(fx.db.dir.path().join("remote.git")).unwrap();
    assert_eq!(
        remote
            .revparse_single("refs/heads/baton/T-1")
            .unwrap()
            .id()
            .to_string(),
        theirs
    );
}
on_both!(
    a_non_fast_forward_push_is_an_error_naming_the_branch,
    a_non_fast_forward_push_is_an_error_naming_the_branch
);

/// `baton config check` asks Plane for its states and names every unknown one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_names_unknown_plane_states() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/workspaces/team/projects/proj-uuid/states/"))
        .and(header("x-api-key", "plane-key"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"results": [
            {"id": "1", "name": "Ready for agents"}, {"id": "2", "name": "Done"}
        ]})))
        .expect(2)
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.toml");
    std::fs::write(&path, config_toml(dir.path(), &server.uri(), "github")).unwrap();
    let run = |key: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_baton"));
        cmd.args(["--config", path.to_str().unwrap(), "config", "check"])
            .env_remove("BATON_DATABASE_URL")
            .env_remove("DATABASE_URL")
            .env_remove("BATON_TEST_PLANE_KEY");
        if let Some(k) = key {
            cmd.env("BATON_TEST_PLANE_KEY", k);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = run(Some("plane-key"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("plane.states.on_failed: Plane has no state named \"Blocked\""),
        "{text}"
    );
    assert!(!text.contains("on_done:"), "{text}");
    assert!(
        text.contains("plane.cancel_states: Plane has no state named \"Wont do\""),
        "{text}"
    );
    // Without the key, the check is skipped with a clear word, and passes.
    let (ok, text) = run(None);
    assert!(ok, "{text}");
    assert!(text.contains("$BATON_TEST_PLANE_KEY is not set"), "{text}");
    // Fixing the names makes it pass.
    let fixed = config_toml(dir.path(), &server.uri(), "github")
        .replace("on_failed = \"Blocked\"", "on_failed = \"Done\"")
        .replace(
            "cancel_states = [\"Wont do\"]",
            "cancel_states = [\"Done\"]",
        );
    std::fs::write(&path, fixed).unwrap();
    let (ok, text) = run(Some("plane-key"));
    assert!(ok, "{text}");
    assert!(text.contains("all 2 exist"), "{text}");
}

//! Plane webhooks at `POST /webhooks/plane`, against a real listener.

use std::sync::Arc;

use baton::clock::Clock;
use baton::config::{Config, EnvOverrides, Secrets};
use baton::http::HttpState;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::on_both;
use crate::support::TestDb;

struct Hook {
    db: TestDb,
    base: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(db: TestDb) -> Hook {
    start_with_plane(db, "http://127.0.0.1:9").await
}

async fn start_with_plane(db: TestDb, plane_url: &str) -> Hook {
    let toml = r#"
[repo]
url = "/nonexistent.git"
[pipelines.default]
stages = ["analyst", "developer"]
[stages.analyst]
command = ["true"]
[stages.developer]
command = ["true"]
[pipelines.bug]
stages = ["developer"]
plane_labels = ["bug"]
priority = 10
[pipelines.docs]
stages = ["analyst"]
plane_labels = ["bug", "docs"]
priority = 1
[plane]
api_url = "PLANE_URL"
workspace = "team"
project_id = "proj-uuid"
api_key_env = "BATON_TEST_PLANE_KEY"
webhook_secret_env = "BATON_TEST_WEBHOOK_SECRET"
trigger_state = "Ready for agents"
"#;
    let toml = toml.replace("PLANE_URL", plane_url);
    let config =
        Arc::new(Config::from_toml(&toml, db.dir.path(), &EnvOverrides::default()).unwrap());
    let secrets = Secrets {
        webhook_secret: Some("whsec".into()),
        plane_api_key: Some("plane-key".into()),
        ..Default::default()
    };
    let state = HttpState::standalone(config, db.store.clone(), secrets, Clock::system());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, _) = baton::http::serve(state, "127.0.0.1:0", async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    Hook {
        db,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        _stop: stop,
    }
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec").unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn update(state: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event": "issue",
        "action": "updated",
        "webhook_id": "wh-1",
        "workspace_id": "ws-1",
        "data": {
            "id": "issue-uuid-65",
            "name": "Add a thing",
            "sequence_id": 65,
            "project_detail": {"identifier": "PROJ"},
            "state": {"id": "st-ready", "name": state},
        },
        "activity": {"field": "state", "actor": {"id": "u-1"}},
    }))
    .unwrap()
}

impl Hook {
    async fn post(
        &self,
        body: Vec<u8>,
        signature: Option<String>,
        delivery: &str,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .post(format!("{}/webhooks/plane", self.base))
            .header("Content-Type", "application/json")
            .header("X-Plane-Delivery", delivery)
            .header("X-Plane-Event", "issue");
        if let Some(sig) = signature {
            req = req.header("X-Plane-Signature", sig);
        }
        let resp = req.body(body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or_default())
    }
}

async fn a_replayed_delivery_submits_one_task(db: TestDb) {
    let hook = start(db).await;
    let body = update("Ready for agents");
    let (status, v) = hook.post(body.clone(), Some(sign(&body)), "d-1").await;
    assert_eq!(
        (status, v["status"].as_str()),
        (202, Some("submitted")),
        "{v}"
    );
    for _ in 0..3 {
        let (status, v) = hook.post(body.clone(), Some(sign(&body)), "d-1").await;
        assert_eq!(
            (status, v["status"].as_str()),
            (202, Some("duplicate")),
            "{v}"
        );
    }
    // Plane sending the same change again under a new delivery id changes nothing either.
    let (status, v) = hook.post(body.clone(), Some(sign(&body)), "d-2").await;
    assert_eq!((status, v["status"].as_str()), (202, Some("exists")), "{v}");
    let tasks = hook.db.store.list_tasks(None).await.unwrap();
    assert_eq!(tasks.len(), 1);
    let t = &tasks[0].task;
    assert_eq!(
        (
            t.key.as_str(),
            t.plane_issue_id.as_deref(),
            t.title.as_str()
        ),
        ("PROJ-65", Some("issue-uuid-65"), "Add a thing")
    );
    assert_eq!(tasks[0].jobs[0].stage, "analyst");
    let events = hook.db.store.events(t.id).await.unwrap();
    assert_eq!(events[0].source, baton::model::EventSource::Webhook);
}
on_both!(
    a_replayed_delivery_submits_one_task,
    a_replayed_delivery_submits_one_task
);

async fn bad_deliveries_get_clear_answers_and_submit_nothing(db: TestDb) {
    let hook = start(db).await;
    let body = update("Ready for agents");
    let (s, v) = hook.post(body.clone(), None, "d-1").await;
    assert_eq!(s, 401, "{v}");
    let (s, v) = hook
        .post(body.clone(), Some(sign(b"other body")), "d-2")
        .await;
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("X-Plane-Signature")
    );
    let (s, _) = hook
        .post(body.clone(), Some("zz-not-hex".into()), "d-3")
        .await;
    assert_eq!(s, 401);
    let junk = b"{not json".to_vec();
    let (s, v) = hook.post(junk.clone(), Some(sign(&junk)), "d-4").await;
    assert_eq!(s, 400, "{v}");
    let deep = "[".repeat(100_000).into_bytes();
    let (s, _) = hook.post(deep.clone(), Some(sign(&deep)), "d-5").await;
    assert_eq!(s, 400);
    let binary: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    let (s, _) = hook.post(binary.clone(), Some(sign(&binary)), "d-6").await;
    assert_eq!(s, 400);
    let huge = vec![b' '; 2 * 1024 * 1024];
    // The listener answers 413 without reading the body and closes; the client may see
    // the reset before the answer, so a transport error is tried again. A client of its
    // own: the closed connection must not be reused by the requests that follow.
    let mut answer = None;
    for _ in 0..5 {
        let req = reqwest::Client::new()
            .post(format!("{}/webhooks/plane", hook.base))
            .header("X-Plane-Delivery", "d-7")
            .header("X-Plane-Signature", sign(&huge))
            .body(huge.clone());
        if let Ok(resp) = req.send().await {
            let status = resp.status().as_u16();
            answer = Some((
                status,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            ));
            break;
        }
    }
    let (s, v) = answer.expect("an answer to the oversized body");
    assert_eq!((s, v["error"]["status"].as_u64()), (413, Some(413)), "{v}");
    let other_state = update("Backlog");
    let (s, v) = hook
        .post(other_state.clone(), Some(sign(&other_state)), "d-8")
        .await;
    assert_eq!((s, v["status"].as_str()), (202, Some("ignored")));
    let bad_key = serde_json::to_vec(&json!({
        "event": "issue", "action": "updated",
        "data": {"id": "x", "sequence_id": 1, "project_detail": {"identifier": "../etc"}, "state": {"name": "Ready for agents"}},
    }))
    .unwrap();
    let (s, _) = hook
        .post(bad_key.clone(), Some(sign(&bad_key)), "d-9")
        .await;
    assert_eq!(s, 400);
    assert!(hook.db.store.list_tasks(None).await.unwrap().is_empty());
    // The listener is still there.
    let health = hook
        .http
        .get(format!("{}/healthz", hook.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
}
on_both!(
    bad_deliveries_get_clear_answers_and_submit_nothing,
    bad_deliveries_get_clear_answers_and_submit_nothing
);

/// A work item as Plane's webhook delivers it: the project by its id only, the state as
/// an object with its group, labels as objects, the description as HTML and as text.
fn plane_work_item(sequence_id: i64, state: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event": "issue",
        "action": "updated",
        "webhook_id": "8b1a6c1e-0f5e-4a57-9f0e-2d9b1f1c0a01",
        "workspace_id": "0c8f2a4e-5d2b-4a57-8e8e-7b1f3c9d2e11",
        "data": {
            "id": format!("3f9c2f0e-77aa-4c1e-9d5b-0000000000{sequence_id:02}"),
            "name": "Add a greeting",
            "description_html": "<p>Say hello.</p>",
            "description_stripped": "Say hello.",
            "priority": "medium",
            "sequence_id": sequence_id,
            "sort_order": 65535.0,
            "project": "proj-uuid",
            "workspace": "0c8f2a4e-5d2b-4a57-8e8e-7b1f3c9d2e11",
            "parent": null,
            "state": {"id": "st-ready", "name": state, "color": "#3A3A3A", "group": "unstarted"},
            "labels": [{"id": "lb-1", "name": "bug", "color": "#ff0000"}],
            "assignees": [],
            "created_at": "2026-11-24T08:00:00.000000Z",
            "updated_at": "2026-11-24T08:05:00.000000Z",
        },
        "activity": {"field": "state_id", "new_value": state, "old_value": "Backlog", "actor": {"id": "u-1", "display_name": "ana"}},
    }))
    .unwrap()
}

async fn a_delivery_naming_the_project_by_id_gets_its_identifier_from_plane_once(db: TestDb) {
    use wiremock::matchers::{header, method, path};
    let plane = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("GET"))
        .and(path("/api/v1/workspaces/team/projects/proj-uuid/"))
        .and(header("X-API-Key", "plane-key"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(
            json!({"id": "proj-uuid", "identifier": "PROJ", "name": "App", "network": 2}),
        ))
        .expect(1)
        .mount(&plane)
        .await;
    let hook = start_with_plane(db, &plane.uri()).await;
    for (n, delivery) in [(65, "d-1"), (66, "d-2")] {
        let body = plane_work_item(n, "Ready for agents");
        let (status, v) = hook.post(body.clone(), Some(sign(&body)), delivery).await;
        assert_eq!(
            (status, v["status"].as_str()),
            (202, Some("submitted")),
            "{v}"
        );
        assert_eq!(v["task"], format!("PROJ-{n}"));
    }
    let tasks = hook.db.store.list_tasks(None).await.unwrap();
    let keys: Vec<&str> = tasks.iter().map(|t| t.task.key.as_str()).collect();
    assert_eq!(keys, ["PROJ-66", "PROJ-65"]);
    assert_eq!(tasks[1].task.title, "Add a greeting");
    assert_eq!(tasks[1].task.description.as_deref(), Some("Say hello."));
    assert_eq!(
        tasks[1].task.plane_issue_id.as_deref(),
        Some("3f9c2f0e-77aa-4c1e-9d5b-000000000065")
    );
    // An item of another project is left alone, and Plane is not asked again.
    let other = plane_work_item(67, "Ready for agents");
    let other = String::from_utf8(other)
        .unwrap()
        .replace("proj-uuid", "other-uuid");
    let (status, v) = hook
        .post(
            other.clone().into_bytes(),
            Some(sign(other.as_bytes())),
            "d-3",
        )
        .await;
    assert_eq!(
        (status, v["status"].as_str()),
        (202, Some("ignored")),
        "{v}"
    );
    plane.verify().await;
}
on_both!(
    a_delivery_naming_the_project_by_id_gets_its_identifier_from_plane_once,
    a_delivery_naming_the_project_by_id_gets_its_identifier_from_plane_once
);

async fn a_delivery_is_answered_503_and_forgotten_while_plane_cannot_name_the_project(db: TestDb) {
    use wiremock::matchers::{method, path};
    let plane = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("GET"))
        .and(path("/api/v1/workspaces/team/projects/proj-uuid/"))
        .respond_with(wiremock::ResponseTemplate::new(502))
        .up_to_n_times(1)
        .mount(&plane)
        .await;
    wiremock::Mock::given(method("GET"))
        .and(path("/api/v1/workspaces/team/projects/proj-uuid/"))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_body_json(json!({"identifier": "PROJ"})),
        )
        .mount(&plane)
        .await;
    let hook = start_with_plane(db, &plane.uri()).await;
    let body = plane_work_item(65, "Ready for agents");
    let (status, v) = hook.post(body.clone(), Some(sign(&body)), "d-1").await;
    assert_eq!(status, 503, "{v}");
    assert!(hook.db.store.list_tasks(None).await.unwrap().is_empty());
    // Plane redelivers under the same id: it is handled, not taken for a duplicate.
    let (status, v) = hook.post(body.clone(), Some(sign(&body)), "d-1").await;
    assert_eq!(
        (status, v["status"].as_str()),
        (202, Some("submitted")),
        "{v}"
    );
    assert_eq!(v["task"], "PROJ-65");
}
on_both!(
    a_delivery_is_answered_503_and_forgotten_while_plane_cannot_name_the_project,
    a_delivery_is_answered_503_and_forgotten_while_plane_cannot_name_the_project
);

/// A work item's labels, as Plane's deliveries give them (`{id, name, color}` objects),
/// choose its pipeline: of the pipelines naming one of them, the highest priority wins;
/// none matching, `default`.
async fn a_labelled_work_item_runs_the_pipeline_of_its_label(db: TestDb) {
    let hook = start(db).await;
    let labelled = |seq: i64, labels: serde_json::Value| {
        serde_json::to_vec(&json!({
            "event": "issue",
            "action": "updated",
            "webhook_id": "wh-1",
            "workspace_id": "ws-1",
            "data": {
                "id": format!("issue-{seq}"),
                "name": "Labelled",
                "sequence_id": seq,
                "project_detail": {"identifier": "PROJ"},
                "state": {"id": "st-ready", "name": "Ready for agents"},
                "labels": labels,
            },
            "activity": {"field": "state", "actor": {"id": "u-1"}},
        }))
        .unwrap()
    };
    let cases = [
        (
            1,
            json!([{"id": "l-1", "name": "Bug", "color": "#ff4444"}]),
            "bug",
        ),
        (
            2,
            json!([{"id": "l-2", "name": "docs", "color": "#00ff00"}]),
            "docs",
        ),
        (
            3,
            json!([{"id": "l-3", "name": "frontend", "color": "#0000ff"}]),
            "default",
        ),
        (4, json!([]), "default"),
    ];
    for (seq, labels, pipeline) in cases {
        let body = labelled(seq, labels);
        let (status, doc) = hook
            .post(body.clone(), Some(sign(&body)), &format!("d-{seq}"))
            .await;
        assert_eq!(
            (status, doc["status"].as_str()),
            (202, Some("submitted")),
            "{doc}"
        );
        let task = hook
            .db
            .store
            .task_by_key(&crate::support::key(&format!("PROJ-{seq}")))
            .await
            .unwrap();
        assert_eq!(task.pipeline, pipeline, "labels of PROJ-{seq}");
    }
}
on_both!(
    a_labelled_work_item_runs_the_pipeline_of_its_label,
    a_labelled_work_item_runs_the_pipeline_of_its_label
);

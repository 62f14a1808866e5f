//! Plane webhooks at `POST /webhooks/plane`, against a real listener.

use std::sync::Arc;

use baton::clock::Clock;
use baton::config::{Config, EnvOverrides, Secrets};
use baton::effects::Effector;
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
    let toml = r#"
[repo]
url = "/nonexistent.git"
[pipelines.default]
stages = ["analyst", "developer"]
[stages.analyst]
command = ["true"]
[stages.developer]
command = ["true"]
[plane]
api_url = "http://127.0.0.1:9"
workspace = "team"
project_id = "proj-uuid"
api_key_env = "BATON_TEST_PLANE_KEY"
webhook_secret_env = "BATON_TEST_WEBHOOK_SECRET"
trigger_state = "Ready for agents"
"#;
    let config =
        Arc::new(Config::from_toml(toml, db.dir.path(), &EnvOverrides::default()).unwrap());
    let secrets = Secrets {
        webhook_secret: Some("whsec".into()),
        ..Default::default()
    };
    let state = HttpState {
        effector: Effector::new(config.clone(), db.store.clone(), secrets.clone()),
        config,
        store: db.store.clone(),
        clock: Clock::system(),
        secrets,
        hostname: baton::hostname(),
        registry: None,
        ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
    };
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
    let (s, _) = hook.post(huge.clone(), Some(sign(&huge)), "d-7").await;
    assert_eq!(s, 413);
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

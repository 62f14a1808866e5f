//! The HTTP API of a running node: answers, errors, auth, the run log, metrics.

use std::sync::Arc;

use baton::actors::ProbeEvent;
use baton::actors::monitor::MonitorEvent;
use baton::config::Secrets;
use baton::service::ServeOptions;
use opentelemetry::metrics::MeterProvider;
use serde_json::{Value, json};

use crate::on_both;
use crate::support::TestDb;
use crate::support::harness::{Harness, wait_for, wait_for_activity, wait_task_end};

const TOKEN: &str = "api-token-1";

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, Some(TOKEN), None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(
            "POST",
            path,
            Some(TOKEN),
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await
    }
}

fn assert_error(answer: &(u16, Value), status: u16, needle: &str) {
    assert_eq!(answer.0, status, "{:?}", answer.1);
    assert_eq!(answer.1["error"]["status"], status, "{:?}", answer.1);
    let message = answer.1["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{message:?} should mention {needle:?}"
    );
}

async fn the_api_answers_and_refuses_as_documented(db: TestDb) {
    let h = Harness::new(db);
    let agent = h.agent(
        "agent",
        r#"echo "agent of $BATON_TASK started"
while [ ! -f "$BATON_WORKSPACE/../../go" ]; do sleep 0.05; done
echo "agent of $BATON_TASK finished""#,
    );
    let config = h.config(&format!(
        "[pipelines.default]\nstages = [\"developer\"]\n[stages.developer]\ncommand = [\"sh\", \"{agent}\"]\n"
    ));
    let registry = prometheus::Registry::new();
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(
            opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
                .unwrap(),
        )
        .build();
    let (node, mut rx) = h
        .start_with(
            config,
            ServeOptions {
                secrets: Some(Secrets {
                    api_token: Some(TOKEN.into()),
                    ..Default::default()
                }),
                metrics: Some(Arc::new(baton::telemetry::Metrics::new(
                    &provider.meter("baton"),
                ))),
                metrics_registry: Some(registry),
                // Agents still waiting at the end are stopped with the node.
                stop_agents: true,
                ..Default::default()
            },
        )
        .await;
    let api = Api {
        base: format!("http://{}", node.http_addr),
        http: reqwest::Client::new(),
    };

    // Health needs no token; everything else does.
    let health = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_error(
        &api.call("GET", "/api/v1/tasks", None, None).await,
        401,
        "bearer",
    );
    assert_error(
        &api.call("GET", "/api/v1/tasks", Some("wrong"), None).await,
        401,
        "bearer",
    );
    assert_error(
        &api.call("GET", "/api/v1/overview", None, None).await,
        401,
        "bearer",
    );
    // The scheme is case-insensitive, as HTTP says.
    let lower = api
        .http
        .get(format!("{}/api/v1/tasks", api.base))
        .header("authorization", format!("bearer  {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status().as_u16(), 200);
    // Bad paths and queries get the envelope too.
    assert_error(&api.get("/api/v1/runs/abc/log").await, 400, "");
    assert_error(&api.get("/api/v1/runs/1/log?bytes=lots").await, 400, "");
    let big = api
        .call(
            "POST",
            "/api/v1/tasks",
            Some(TOKEN),
            Some(vec![b' '; 100 * 1024]),
        )
        .await;
    assert_error(&big, 413, "");
    assert_eq!(api.get("/readyz").await.0, 200);

    // Submitting.
    let (s, v) = api
        .post(
            "/api/v1/tasks",
            json!({"key": "API-1", "title": "Via the API"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["task"]["key"], "API-1");
    assert_error(
        &api.post("/api/v1/tasks", json!({"key": "API-1"})).await,
        409,
        "already exists",
    );
    assert_error(
        &api.post("/api/v1/tasks", json!({"key": "../etc"})).await,
        400,
        "invalid task key",
    );
    assert_error(
        &api.post("/api/v1/tasks", json!({"key": "A-2", "pipeline": "nope"}))
            .await,
        400,
        "unknown pipeline",
    );
    assert_error(
        &api.post("/api/v1/tasks", json!({"key": "A-3", "colour": "red"}))
            .await,
        400,
        "unknown field",
    );
    let junk = api
        .call(
            "POST",
            "/api/v1/tasks",
            Some(TOKEN),
            Some(b"{nope".to_vec()),
        )
        .await;
    assert_error(&junk, 400, "not a task");

    // Reading.
    let (s, v) = api.get("/api/v1/tasks").await;
    assert_eq!(s, 200);
    assert_eq!(v["tasks"][0]["task"]["key"], "API-1");
    let (s, v) = api.get("/api/v1/tasks?status=done").await;
    assert_eq!((s, v["tasks"].as_array().unwrap().len()), (200, 0));
    let (s, v) = api.get("/api/v1/tasks/API-1").await;
    assert_eq!(s, 200);
    assert_eq!(v["events"][0]["kind"], "task_submitted");
    assert_eq!(v["events"][0]["source"], "api");
    assert_error(
        &api.get("/api/v1/tasks/NOPE-1").await,
        404,
        "no task NOPE-1",
    );
    assert_error(
        &api.call("DELETE", "/api/v1/tasks", Some(TOKEN), None).await,
        405,
        "not allowed",
    );
    assert_error(&api.get("/api/v1/nothing").await, 404, "no such route");

    // The run's log: the tail, then followed to the end.
    let run_id = wait_for(&mut rx, |ev| match ev {
        ProbeEvent::Monitor {
            event: MonitorEvent::Start,
            run_id,
            ..
        } => Some(*run_id),
        _ => None,
    })
    .await;
    let log_path = loop {
        let run = node.store.run(run_id).await.unwrap().unwrap();
        if run.pid.is_some()
            && std::fs::read_to_string(&run.log_path)
                .unwrap_or_default()
                .contains("started")
        {
            break run.log_path;
        }
        wait_for_activity(&mut rx).await;
    };
    let (s, tail) = api.get(&format!("/api/v1/runs/{run_id}/log")).await;
    assert_eq!(s, 200);
    assert!(
        tail.as_str().unwrap().contains("agent of API-1 started"),
        "{tail}"
    );
    let follow = api
        .http
        .get(format!("{}/api/v1/runs/{run_id}/log?follow=true", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    std::fs::write(h.root.join("go"), "").unwrap();
    let followed = follow.text().await.unwrap();
    assert!(
        followed.contains("started") && followed.contains("agent of API-1 finished"),
        "{followed}"
    );
    assert!(std::path::Path::new(&log_path).exists());
    assert_error(
        &api.get("/api/v1/runs/999999/log").await,
        404,
        "no run 999999",
    );
    assert_eq!(wait_task_end(&mut rx).await, baton::model::TaskStatus::Done);

    // Cancel and retry answer 409 where the task's state does not allow them.
    assert_error(
        &api.post("/api/v1/tasks/API-1/cancel", json!({})).await,
        409,
        "only an active task",
    );
    assert_error(
        &api.post("/api/v1/tasks/API-1/retry", json!({})).await,
        409,
        "only a failed or cancelled",
    );
    assert_error(
        &api.post("/api/v1/tasks/NOPE-2/cancel", json!({})).await,
        404,
        "no task",
    );
    // Effects are retried by their id.
    assert_error(
        &api.post("/api/v1/effects/999999/retry", json!({})).await,
        404,
        "no effect 999999",
    );
    // A task whose agent waits: cancel, then retry it.
    std::fs::remove_file(h.root.join("go")).unwrap();
    let (s, _) = api.post("/api/v1/tasks", json!({"key": "API-2"})).await;
    assert_eq!(s, 201);
    let (s, v) = api.post("/api/v1/tasks/API-2/cancel", json!({})).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    let (s, v) = api.post("/api/v1/tasks/API-2/retry", json!({})).await;
    assert_eq!(
        (s, v["job"]["stage"].as_str()),
        (200, Some("developer")),
        "{v}"
    );

    // Metrics in the Prometheus text format.
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("baton_claims_total") && text.contains("outcome=\"won\""),
        "{text}"
    );
    assert!(text.contains("baton_run_duration"), "{text}");
    assert!(
        text.contains("baton_queue_depth") && text.contains("baton_jobs_running"),
        "{text}"
    );

    // The dashboard page is static and public; its data needs the token.
    let (s, page) = api.call("GET", "/", None, None).await;
    assert_eq!(s, 200);
    assert!(page.as_str().unwrap().contains("/api/v1/overview"));
    let (s, o) = api.get("/api/v1/overview").await;
    assert_eq!(s, 200);
    assert!(
        o["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "API-1" && t["status"] == "done"),
        "{o}"
    );
    node.shutdown().await;
}
on_both!(
    the_api_answers_and_refuses_as_documented,
    the_api_answers_and_refuses_as_documented
);

/// Safe by default: a config that asks for an API token whose variable is unset does not
/// start a node that would answer anyone.
async fn serve_refuses_to_start_without_the_token_it_asks_for(db: TestDb) {
    let h = Harness::new(db);
    let mut config =
        h.config("[pipelines.default]\nstages = [\"one\"]\n[stages.one]\ncommand = [\"true\"]\n");
    config.http.token_env = Some("BATON_TEST_UNSET_API_TOKEN".into());
    let started = baton::service::Node::start(
        config,
        ServeOptions {
            secrets: Some(Secrets::default()),
            ..Default::default()
        },
    )
    .await;
    let Err(e) = started else {
        panic!("a node started without its API token")
    };
    assert!(
        e.to_string()
            .contains("$BATON_TEST_UNSET_API_TOKEN, which is not set"),
        "{e}"
    );
    assert!(
        h.db.store.nodes().await.unwrap().is_empty(),
        "the refused node registered"
    );
}
on_both!(
    serve_refuses_to_start_without_the_token_it_asks_for,
    serve_refuses_to_start_without_the_token_it_asks_for
);

/// `GET /api/v1/tasks` pages by cursor, newest first, filters by status, pipeline, stage
/// and key prefix, and answers 400 to what it does not know.
async fn the_task_list_pages_and_filters(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        "[pipelines.default]\nstages = [\"one\", \"two\"]\n[stages.one]\ncommand = [\"true\"]\n[stages.two]\ncommand = [\"true\"]\n",
    );
    for i in 0..7 {
        h.submit(&format!("PAGE-{i}"), if i % 2 == 0 { "one" } else { "two" })
            .await;
    }
    h.submit("OTHER_1", "one").await;
    // Served without running anything: no dispatcher may move the jobs.
    let state = baton::http::HttpState::standalone(
        Arc::new(config),
        h.db.store.clone(),
        Secrets::default(),
        baton::clock::Clock::system(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, _) = baton::http::serve(state, "127.0.0.1:0", async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let api = Api {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
    };
    let keys = |v: &Value| -> Vec<String> {
        v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task"]["key"].as_str().unwrap().to_string())
            .collect()
    };
    let mut seen = Vec::new();
    let mut path = "/api/v1/tasks?limit=3&key=PAGE-".to_string();
    loop {
        let (status, page) = api.call("GET", &path, None, None).await;
        assert_eq!(status, 200, "{page}");
        assert!(keys(&page).len() <= 3);
        seen.extend(keys(&page));
        match page["next"].as_i64() {
            Some(next) => path = format!("/api/v1/tasks?limit=3&key=PAGE-&after={next}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..7).rev().map(|i| format!("PAGE-{i}")).collect();
    assert_eq!(seen, expected, "every task once, newest first");
    let (_, at_two) = api.call("GET", "/api/v1/tasks?stage=two", None, None).await;
    assert_eq!(keys(&at_two), ["PAGE-5", "PAGE-3", "PAGE-1"]);
    let (_, all) = api
        .call(
            "GET",
            "/api/v1/tasks?status=active&pipeline=default",
            None,
            None,
        )
        .await;
    assert_eq!(keys(&all).len(), 8);
    let (_, underscore) = api
        .call("GET", "/api/v1/tasks?key=OTHER_", None, None)
        .await;
    assert_eq!(keys(&underscore), ["OTHER_1"]);
    for (bad, needle) in [
        ("/api/v1/tasks?limit=0", "limit"),
        ("/api/v1/tasks?limit=501", "limit"),
        ("/api/v1/tasks?status=finished", "status"),
        ("/api/v1/tasks?pipeline=nope", "unknown pipeline"),
        ("/api/v1/tasks?stage=nope", "unknown stage"),
        ("/api/v1/tasks?colour=blue", "colour"),
    ] {
        assert_error(&api.call("GET", bad, None, None).await, 400, needle);
    }
    let (_, overview) = api.call("GET", "/api/v1/overview", None, None).await;
    assert_eq!(overview["counts"]["active"], 8, "{overview}");
    drop(stop);
}
on_both!(
    the_task_list_pages_and_filters,
    the_task_list_pages_and_filters
);

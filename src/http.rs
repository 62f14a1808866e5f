//! The HTTP listener of a node (axum): health, the API, metrics, the dashboard and
//! Plane's webhooks.
//!
//! | route | does |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process serves |
//! | `GET /readyz` | 200 when the database answers and the actors run, else 503 |
//! | `GET /api/v1/tasks` | tasks with their jobs |
//! | `GET /api/v1/tasks/{key}` | one task: jobs, runs, events, effects |
//! | `POST /api/v1/tasks` | submit `{"key", "pipeline"?, "title"?, "plane_issue_id"?}` |
//! | `POST /api/v1/tasks/{key}/cancel`, `/retry` | as the CLI commands |
//! | `GET /api/v1/runs/{id}/log` | the tail of a run's log; `?follow=true` streams it |
//! | `GET /api/v1/overview` | what the dashboard shows |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /` | the dashboard |
//!
//! When `http.token_env` names a set variable, everything but `/healthz`, the static
//! dashboard page (whose own requests carry the token, given as `#token=...`) and the
//! webhook (authenticated by its signature) needs `Authorization: Bearer <token>`.
//! Errors use one JSON envelope: `{"error": {"status": 404, "message": "..."}}`.
//!
//! `POST /webhooks/plane` accepts Plane's deliveries: `X-Plane-Signature` must be the hex
//! HMAC-SHA256 of the raw body under the webhook secret (compared in constant time),
//! deliveries are de-duplicated on `X-Plane-Delivery`, and a work item whose state
//! became `plane.trigger_state` is submitted as a task keyed by its identifier
//! (`PROJ-65`), once. Bodies over [`WEBHOOK_BODY_LIMIT`] get 413; malformed JSON 400;
//! anything else 202.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::extract::{Path, Query, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::clock::Clock;
use crate::config::{Config, Secrets, validate_name};
use crate::effects::Effector;
use crate::store::{NewTask, Source, Store, StoreError};

/// Webhook bodies larger than this are refused with 413.
pub const WEBHOOK_BODY_LIMIT: usize = 1024 * 1024;

#[derive(Clone)]
pub struct HttpState {
    pub config: Arc<Config>,
    pub store: Store,
    pub clock: Clock,
    pub effector: Effector,
    pub secrets: Secrets,
    /// The registry behind `GET /metrics` (none: an empty answer).
    pub registry: Option<prometheus::Registry>,
    /// True while the node's actors run.
    pub ready: Arc<AtomicBool>,
}

/// How much of a log `GET /api/v1/runs/{id}/log` returns by default.
pub const LOG_TAIL_DEFAULT: u64 = 64 * 1024;
/// API request bodies larger than this are refused with 413.
pub const API_BODY_LIMIT: usize = 64 * 1024;

pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/tasks", get(list_tasks).post(submit_task))
        .route("/api/v1/tasks/{key}", get(task_detail))
        .route("/api/v1/tasks/{key}/cancel", post(cancel_task))
        .route("/api/v1/tasks/{key}/retry", post(retry_task))
        .route("/api/v1/runs/{id}/log", get(run_log))
        .layer(DefaultBodyLimit::max(API_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // The page is static; its requests carry the token (given as #token=...).
        .route("/", get(dashboard))
        .route(
            "/webhooks/plane",
            post(plane_webhook).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .merge(api)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route; see GET /api/v1/tasks",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .with_state(state)
}

/// Bearer-token check for everything but health and the webhook.
async fn require_token(State(st): State<HttpState>, req: Request, next: Next) -> Response {
    if let Some(token) = st.secrets.api_token.as_deref() {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Constant-time: compare MACs of both under a per-process key.
        let ok = {
            let mut a = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("any key length");
            a.update(b"baton-api");
            let mut b = Hmac::<Sha256>::new_from_slice(given.as_bytes()).expect("any key length");
            b.update(b"baton-api");
            b.verify_slice(&a.finalize().into_bytes()).is_ok()
        };
        if !ok {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer ...)",
            );
        }
    }
    next.run(req).await
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::NoSuchTask(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        StoreError::TaskExists(_) | StoreError::WrongState { .. } => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        other => error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

/// A task key from a path or body: `Some` error answer when it is not a valid key.
fn bad_key(key: &str) -> Option<Response> {
    validate_name(key)
        .err()
        .map(|m| error(StatusCode::BAD_REQUEST, format!("invalid task key: {m}")))
}

async fn readyz(State(st): State<HttpState>) -> Response {
    if !st.ready.load(Ordering::SeqCst) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's actors are not running",
        );
    }
    match st.store.ping().await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database does not answer: {e}"),
        ),
    }
}

async fn metrics(State(st): State<HttpState>) -> Response {
    use prometheus::Encoder;
    let families = st.registry.as_ref().map(|r| r.gather()).unwrap_or_default();
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}"),
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

async fn dashboard() -> Response {
    (
        [("content-type", "text/html; charset=utf-8")],
        include_str!("http/dashboard.html"),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct ListQuery {
    status: Option<String>,
}

/// A rejected extractor (bad path, query or body) as the JSON envelope.
fn rejected(r: impl IntoResponse + std::fmt::Display) -> Response {
    let message = r.to_string();
    let status = r.into_response().status();
    error(status, message)
}

async fn list_tasks(
    State(st): State<HttpState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(r) => return rejected(r),
    };
    match st.store.list_tasks(None).await {
        Ok(tasks) => {
            let tasks: Vec<_> = tasks
                .into_iter()
                .filter(|t| q.status.as_deref().is_none_or(|s| t.task.status == s))
                .collect();
            axum::Json(json!({"tasks": tasks})).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn task_detail(State(st): State<HttpState>, Path(key): Path<String>) -> Response {
    if let Some(r) = bad_key(&key) {
        return r;
    }
    match st.store.task_detail(&key).await {
        Ok(d) => axum::Json(crate::cli::detail_json(&d)).into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    key: String,
    pipeline: Option<String>,
    title: Option<String>,
    plane_issue_id: Option<String>,
}

async fn submit_task(
    State(st): State<HttpState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return rejected(r),
    };
    let body: SubmitBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not a task: {e}"),
            );
        }
    };
    if let Some(r) = bad_key(&body.key) {
        return r;
    }
    let pipeline = body.pipeline.unwrap_or_else(|| "default".into());
    let first_stage = match st.config.pipeline(&pipeline) {
        Ok(p) => p.stages.first().cloned().unwrap_or_default(),
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let new = NewTask {
        title: body.title.unwrap_or_else(|| body.key.clone()),
        key: body.key,
        pipeline,
        plane_issue_id: body.plane_issue_id,
        first_stage,
        trace_parent: None,
    };
    match st.store.submit(new, Source::Api, st.clock.now_ms()).await {
        Ok(s) => (
            StatusCode::CREATED,
            axum::Json(json!({"task": s.task, "job": s.job})),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

async fn cancel_task(State(st): State<HttpState>, Path(key): Path<String>) -> Response {
    if let Some(r) = bad_key(&key) {
        return r;
    }
    match st.store.cancel(&key, Source::Api, st.clock.now_ms()).await {
        Ok(runs) => {
            // Agents of this host are stopped now; others by their Monitor's next heartbeat.
            let host = crate::hostname();
            for r in &runs {
                if let (Some(pid), Some(h)) = (r.run.pid, r.hostname.as_deref())
                    && h == host
                {
                    tokio::spawn(crate::agent::terminate_group(
                        pid,
                        crate::agent::AGENT_KILL_GRACE_DEFAULT,
                    ));
                }
            }
            axum::Json(json!({"task": key, "status": "cancelled", "runs": runs.iter().map(|r| r.run.id).collect::<Vec<_>>()}))
                .into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn retry_task(State(st): State<HttpState>, Path(key): Path<String>) -> Response {
    if let Some(r) = bad_key(&key) {
        return r;
    }
    match st.store.retry(&key, Source::Api, st.clock.now_ms()).await {
        Ok(job) => axum::Json(json!({"task": key, "job": job})).into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(serde::Deserialize)]
struct LogQuery {
    follow: Option<bool>,
    bytes: Option<u64>,
}

async fn run_log(
    State(st): State<HttpState>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let (Path(id), Query(q)) = match (id, q) {
        (Ok(id), Ok(q)) => (id, q),
        (Err(r), _) => return rejected(r),
        (_, Err(r)) => return rejected(r),
    };
    let run = match st.store.run(id).await {
        Ok(Some(r)) => r,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no run {id}")),
        Err(e) => return store_error(e),
    };
    let path = std::path::PathBuf::from(&run.log_path);
    let tail = q.bytes.unwrap_or(LOG_TAIL_DEFAULT).min(16 * 1024 * 1024);
    let len = tokio::fs::metadata(&path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let start = len.saturating_sub(tail);
    let head = read_from(&path, start).await;
    if !q.follow.unwrap_or(false) {
        return ([("content-type", "text/plain; charset=utf-8")], head).into_response();
    }
    // Follow: the tail, then what the agent appends, until its exit is recorded.
    let store = st.store.clone();
    let stream = futures_util::stream::unfold(
        (Some(head), start, false, path, store, id),
        |(first, mut offset, done, path, store, id)| async move {
            if let Some(chunk) = first {
                offset += chunk.len() as u64;
                return Some((
                    Ok::<_, std::io::Error>(chunk),
                    (None, offset, false, path, store, id),
                ));
            }
            if done {
                return None;
            }
            loop {
                let chunk = read_from(&path, offset).await;
                if !chunk.is_empty() {
                    offset += chunk.len() as u64;
                    return Some((Ok(chunk), (None, offset, false, path, store, id)));
                }
                let exited = store
                    .run(id)
                    .await
                    .ok()
                    .flatten()
                    .is_none_or(|r| r.exited_at.is_some());
                if exited {
                    let rest = read_from(&path, offset).await;
                    return Some((Ok(rest), (None, offset, true, path, store, id)));
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        },
    );
    (
        [("content-type", "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(4 * 1024 * 1024).read_to_end(&mut buf).await;
    buf
}

/// Tasks by status with their pipeline's stages and states, running agents with their
/// age, recent reaps and failed effects: the dashboard's one request.
async fn overview(State(st): State<HttpState>) -> Response {
    let now = st.clock.now_ms();
    let (tasks, running, reaps, failed) = match tokio::try_join!(
        st.store.list_tasks(None),
        st.store.running_jobs(),
        st.store.recent_events(&["reaped"], 20),
        st.store.failed_effects(20),
    ) {
        Ok(v) => v,
        Err(e) => return store_error(e),
    };
    let tasks: Vec<Value> = tasks
        .iter()
        .take(200)
        .map(|t| {
            let stages = st.config.pipelines.get(&t.task.pipeline).map(|p| p.stages.clone()).unwrap_or_default();
            let stage_states: Vec<Value> = stages
                .iter()
                .map(|s| {
                    let last = t.jobs.iter().filter(|j| &j.stage == s).max_by_key(|j| j.id);
                    json!({"stage": s, "state": last.map(|j| j.status.as_str()).unwrap_or("pending"), "iteration": last.map(|j| j.iteration)})
                })
                .collect();
            json!({"key": t.task.key, "title": t.task.title, "status": t.task.status, "pipeline": t.task.pipeline, "stages": stage_states, "updated_at": t.task.updated_at})
        })
        .collect();
    let running: Vec<Value> = running
        .iter()
        .filter_map(|r| {
            let run = r.run.as_ref()?;
            Some(json!({"task": r.task.key, "stage": r.job.stage, "run_id": run.id, "pid": run.pid, "node": run.node_id, "age_ms": now - run.started_at, "exited": run.exited_at.is_some()}))
        })
        .collect();
    axum::Json(json!({
        "now": now,
        "tasks": tasks,
        "running": running,
        "reaps": reaps.iter().map(|e| json!({"at": e.at, "task_id": e.task_id, "run_id": e.run_id, "detail": serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null)})).collect::<Vec<_>>(),
        "failed_effects": failed.iter().map(|e| json!({"id": e.id, "task_id": e.task_id, "kind": e.kind, "attempts": e.attempts, "last_error": e.last_error})).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// Binds `listen` and serves until `shutdown` resolves; returns the bound address.
pub async fn serve(
    state: HttpState,
    listen: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(state);
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the HTTP listener stopped");
        }
    });
    Ok((addr, handle))
}

/// A JSON error envelope: `{"error": {"status": 401, "message": "..."}}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        axum::Json(json!({"error": {"status": status.as_u16(), "message": message}})),
    )
        .into_response()
}

fn accepted(detail: Value) -> Response {
    (StatusCode::ACCEPTED, axum::Json(detail)).into_response()
}

/// Checks `signature` (hex) against the HMAC-SHA256 of `body` under `secret`, in
/// constant time.
pub fn signature_valid(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Ok(expected) = hex::decode(signature.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

async fn plane_webhook(State(st): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if st.config.plane.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "Plane webhooks are not configured ([plane])",
        );
    }
    let Some(secret) = st.secrets.webhook_secret.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "Plane webhooks are not configured: plane.webhook_secret_env names no set variable",
        );
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Some(signature) = header("x-plane-signature") else {
        return error(StatusCode::UNAUTHORIZED, "missing X-Plane-Signature");
    };
    if !signature_valid(secret.as_bytes(), &body, &signature) {
        return error(
            StatusCode::UNAUTHORIZED,
            "X-Plane-Signature does not match the body",
        );
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the body is JSON but not an object",
            );
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let Some(delivery) = header("x-plane-delivery").filter(|d| !d.is_empty() && d.len() <= 200)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing or oversized X-Plane-Delivery",
        );
    };
    let now = st.clock.now_ms();
    match st
        .store
        .record_delivery(&delivery, Source::Webhook, now)
        .await
    {
        Ok(true) => {}
        Ok(false) => return accepted(json!({"status": "duplicate", "delivery": delivery})),
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot record the delivery: {e}"),
            );
        }
    }
    let outcome = handle_plane_event(&st, &payload, now).await;
    match outcome {
        Ok(detail) => accepted(detail),
        Err((status, message)) => {
            // Not handled: Plane's redelivery must not be taken for a duplicate.
            if status.is_server_error() {
                let _ = st.store.forget_delivery(&delivery).await;
            }
            error(status, message)
        }
    }
}

/// What a delivery means; `Ok` is always answered 202.
async fn handle_plane_event(
    st: &HttpState,
    payload: &Value,
    now: i64,
) -> Result<Value, (StatusCode, String)> {
    let ignored = |why: &str| Ok(json!({"status": "ignored", "reason": why}));
    let Some(plane) = st.config.plane.as_ref() else {
        return ignored("no [plane]");
    };
    let Some(trigger) = plane.trigger_state.as_deref() else {
        return ignored("plane.trigger_state is not set");
    };
    let event = payload["event"].as_str().unwrap_or_default();
    let action = payload["action"].as_str().unwrap_or_default();
    if !matches!(event, "issue" | "work_item")
        || !matches!(action, "updated" | "update" | "created" | "create")
    {
        return ignored("not a work item update");
    }
    let data = &payload["data"];
    if let Some(project) = data["project"].as_str()
        && project != plane.project_id
    {
        return ignored("the work item belongs to another project than plane.project_id");
    }
    let state = match state_name(st, data).await {
        Some(s) => s,
        None => return ignored("the work item's state is not in the delivery"),
    };
    if !state.eq_ignore_ascii_case(trigger) {
        return ignored("the work item is not in plane.trigger_state");
    }
    let Some(key) = identifier(data) else {
        return ignored("the work item has no identifier (project identifier and sequence id)");
    };
    if let Err(msg) = validate_name(&key) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("work item identifier {msg}"),
        ));
    }
    let Some(issue_id) = data["id"].as_str().filter(|s| !s.is_empty()) else {
        return ignored("the work item has no id");
    };
    let pipeline = "default";
    let first_stage = match st.config.pipeline(pipeline) {
        Ok(p) => p.stages.first().cloned().unwrap_or_default(),
        Err(e) => return Err((StatusCode::SERVICE_UNAVAILABLE, e)),
    };
    let title: String = data["name"]
        .as_str()
        .unwrap_or(&key)
        .chars()
        .take(500)
        .collect();
    let submitted = st
        .store
        .submit(
            NewTask {
                key: key.clone(),
                pipeline: pipeline.into(),
                title,
                plane_issue_id: Some(issue_id.to_string()),
                first_stage,
                trace_parent: None,
            },
            Source::Webhook,
            now,
        )
        .await;
    match submitted {
        Ok(s) => {
            tracing::info!(task = %key, plane_issue = issue_id, "task submitted by a Plane webhook");
            Ok(json!({"status": "submitted", "task": s.task.key}))
        }
        Err(StoreError::TaskExists(_)) => Ok(json!({"status": "exists", "task": key})),
        Err(e) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot submit {key}: {e}"),
        )),
    }
}

/// The state's name: given inline (`state.name`, `state_detail.name`), or by id through
/// the project's states.
async fn state_name(st: &HttpState, data: &Value) -> Option<String> {
    if let Some(n) = data["state"]["name"]
        .as_str()
        .or(data["state_detail"]["name"].as_str())
    {
        return Some(n.to_string());
    }
    let id = data["state"].as_str()?;
    st.effector.plane_state_name(id).await.ok()
}

/// `PROJ-65`: the project's identifier and the item's sequence id, or a ready identifier.
fn identifier(data: &Value) -> Option<String> {
    let project = data["project_detail"]["identifier"]
        .as_str()
        .or(data["project_identifier"].as_str());
    if let (Some(p), Some(n)) = (project, data["sequence_id"].as_i64()) {
        return Some(format!("{p}-{n}"));
    }
    data["identifier"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked() {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(b"{}");
        let good = hex::encode(mac.finalize().into_bytes());
        assert!(signature_valid(b"s3cret", b"{}", &good));
        assert!(!signature_valid(b"other", b"{}", &good));
        assert!(!signature_valid(b"s3cret", b"{ }", &good));
        assert!(!signature_valid(b"s3cret", b"{}", "not hex"));
        assert!(!signature_valid(b"s3cret", b"{}", ""));
    }

    #[test]
    fn identifiers_are_built_from_project_and_sequence() {
        let d = json!({"project_detail": {"identifier": "PROJ"}, "sequence_id": 65});
        assert_eq!(identifier(&d).as_deref(), Some("PROJ-65"));
        assert_eq!(
            identifier(&json!({"identifier": "X-1"})).as_deref(),
            Some("X-1")
        );
        assert_eq!(identifier(&json!({"sequence_id": "65"})), None);
    }
}

//! The HTTP listener of a node (axum): health, and Plane's webhooks.
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
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

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
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/webhooks/plane",
            post(plane_webhook).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .with_state(state)
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
        Err((status, message)) => error(status, message),
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

//! The HTTP listener of a node (axum): the router, its state, authentication and the one
//! error type of every handler. The API's handlers are in `http/api.rs`, Plane's webhook
//! in `http/webhook.rs`; the routes are listed in `docs/operations.md`.
//!
//! When `http.token_env` names a set variable, everything but `/healthz`, the static
//! dashboard page (whose own requests carry the token, given as `#token=...`) and the
//! webhook (authenticated by its signature) needs `Authorization: Bearer <token>`.
//! Errors use one JSON envelope: `{"error": {"status": 404, "message": "..."}}`.

mod api;
mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::clock::Clock;
use crate::config::{Config, Secrets};
use crate::effects::Effector;
use crate::model::TaskKey;
use crate::store::{Store, StoreError};
use crate::tasks::TaskError;

pub use webhook::{WEBHOOK_BODY_LIMIT, signature_valid};

/// How much of a log `GET /api/v1/runs/{id}/log` returns by default.
pub const LOG_TAIL_DEFAULT: u64 = 64 * 1024;
/// API request bodies larger than this are refused with 413.
pub const API_BODY_LIMIT: usize = 64 * 1024;

#[derive(Clone)]
pub struct HttpState {
    pub config: Arc<Config>,
    pub store: Store,
    pub clock: Clock,
    /// The node's one effector, whose Plane state cache the webhook shares.
    pub effector: Effector,
    pub secrets: Secrets,
    /// This node's host name: a cancel stops the agents that run here.
    pub hostname: String,
    /// The registry behind `GET /metrics` (none: an empty answer).
    pub registry: Option<prometheus::Registry>,
    /// True while the node's actors run.
    pub ready: Arc<AtomicBool>,
}

impl HttpState {
    /// The state of a listener that serves the API without a node's actors (tools and
    /// tests): its own effector, this machine's host name, no metrics registry, ready.
    pub fn standalone(config: Arc<Config>, store: Store, secrets: Secrets, clock: Clock) -> Self {
        HttpState {
            effector: Effector::new(config.clone(), store.clone(), secrets.clone()),
            config,
            store,
            clock,
            secrets,
            hostname: crate::hostname(),
            registry: None,
            ready: Arc::new(AtomicBool::new(true)),
        }
    }
}

pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/api/v1/overview", get(api::overview))
        .route("/api/v1/tasks", get(api::list_tasks).post(api::submit_task))
        .route("/api/v1/tasks/{key}", get(api::task_detail))
        .route("/api/v1/tasks/{key}/cancel", post(api::cancel_task))
        .route("/api/v1/tasks/{key}/retry", post(api::retry_task))
        .route("/api/v1/runs/{id}/log", get(api::run_log))
        .route("/api/v1/effects/{id}/retry", post(api::retry_effect))
        .layer(DefaultBodyLimit::max(API_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // The page is static; its requests carry the token (given as #token=...).
        .route("/", get(api::dashboard))
        .route(
            "/webhooks/plane",
            post(webhook::plane).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .merge(api)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; see GET /api/v1/tasks",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
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

/// The token of an `Authorization: Bearer <token>` value; the scheme in any case.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Bearer-token check for everything but health and the webhook.
async fn require_token(State(st): State<HttpState>, req: Request, next: Next) -> Response {
    if let Some(token) = st.secrets.api_token.as_deref() {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or_default();
        // Constant-time: compare MACs of both under a fixed key.
        let mac = |k: &str| {
            let mut m = Hmac::<Sha256>::new_from_slice(k.as_bytes()).expect("any key length");
            m.update(b"baton-api");
            m
        };
        if mac(given)
            .verify_slice(&mac(token).finalize().into_bytes())
            .is_err()
        {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API token: send it as a bearer token (\"Authorization: Bearer <token>\", the value of the variable http.token_env names); in the dashboard, open /#token=<token>",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Every error answer: `{"error": {"status": 404, "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// A rejected extractor (bad path, query or body), keeping its status and message.
    pub fn rejected(r: impl IntoResponse + std::fmt::Display) -> Self {
        let message = r.to_string();
        ApiError::new(r.into_response().status(), message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"status": self.status.as_u16(), "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::NoSuchTask(_) | StoreError::NoSuchEffect(_) => StatusCode::NOT_FOUND,
            StoreError::TaskExists(_)
            | StoreError::WrongState { .. }
            | StoreError::EffectNotFailed { .. } => StatusCode::CONFLICT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<TaskError> for ApiError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Store(e) => e.into(),
            other => ApiError::bad_request(other.to_string()),
        }
    }
}

/// A task key taken from the path, checked once: `400` with the reason when invalid.
pub struct KeyPath(pub TaskKey);

impl<S: Send + Sync> FromRequestParts<S> for KeyPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(ApiError::rejected)?;
        TaskKey::parse(raw)
            .map(KeyPath)
            .map_err(ApiError::bad_request)
    }
}

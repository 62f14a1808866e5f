//! Performing the outbox: push, pull request, Plane comment and Plane state, each
//! idempotent at the remote so that a retry after a crash never duplicates anything.
//!
//! The [`EffectWorker`](crate::actors::effect_worker) leases an effect, calls
//! [`Effector::perform`], and records the outcome. This module only talks to the outside
//! world; it never writes to the database.

pub mod forge;
pub mod plane;
pub mod push;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use entity::{effects, tasks};

use crate::config::Config;
use crate::model::EffectPayload;
use crate::store::Store;

/// HTTP requests to the forge and Plane give up after this long.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an attempt did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EffectError {
    /// Worth another attempt (network, 5xx, 429), after `retry_after` when the remote said.
    #[error("{message}")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Another attempt would fail the same way (bad request, refused credentials, a
    /// rejected push): the effect fails now, with this message.
    #[error("{0}")]
    Permanent(String),
}

impl EffectError {
    pub fn transient(message: impl Into<String>) -> Self {
        EffectError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Performs effects. Cheap to clone; holds the HTTP client and Plane's state cache.
#[derive(Clone)]
pub struct Effector {
    pub config: Arc<Config>,
    pub store: Store,
    secrets: crate::config::Secrets,
    http: reqwest::Client,
    plane_states: Arc<tokio::sync::Mutex<Option<Vec<plane::PlaneState>>>>,
    /// The project's identifier, asked of Plane once.
    plane_identifier: Arc<tokio::sync::Mutex<Option<String>>>,
    /// Every Plane request of the node takes from this budget first.
    plane_budget: Arc<RequestBudget>,
}

/// A token bucket: `per_minute` requests a minute on average, with a small burst.
#[derive(Debug)]
pub struct RequestBudget {
    per_minute: f64,
    burst: f64,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RequestBudget {
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        let burst = per_minute.min(10.0);
        RequestBudget {
            per_minute,
            burst,
            state: tokio::sync::Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    /// Waits until a request may be made, and takes it.
    pub async fn take(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = tokio::time::Instant::now();
                let refill = now.duration_since(s.1).as_secs_f64() * self.per_minute / 60.0;
                *s = ((s.0 + refill).min(self.burst), now);
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.0) * 60.0 / self.per_minute)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl Effector {
    pub fn new(config: Arc<Config>, store: Store, secrets: crate::config::Secrets) -> Self {
        let budget = config.plane.as_ref().map_or(60, |p| p.requests_per_minute);
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Effector {
            config,
            store,
            secrets,
            http,
            plane_states: Arc::default(),
            plane_identifier: Arc::default(),
            plane_budget: Arc::new(RequestBudget::new(budget)),
        }
    }

    /// Performs one effect; `Ok` carries its external reference (a commit, a URL, an id).
    pub async fn perform(
        &self,
        e: &effects::Model,
        task: &tasks::Model,
    ) -> Result<Option<String>, EffectError> {
        let payload = EffectPayload::from_row(e.kind, &e.payload)
            .map_err(|err| EffectError::Permanent(format!("effect payload is malformed: {err}")))?;
        match payload {
            EffectPayload::Push(p) => {
                let ws = crate::workspace::path_for(&self.config.workspace_root, &task.key)
                    .map_err(|err| EffectError::Permanent(err.to_string()))?;
                let access = self.config.repo_access(&self.secrets);
                tokio::task::spawn_blocking(move || push::push_branch(&ws, &access, &p.branch))
                    .await
                    .map_err(|err| EffectError::transient(format!("push panicked: {err}")))?
                    .map(Some)
            }
            EffectPayload::PullRequest(p) => {
                let forge = self
                    .config
                    .forge
                    .as_ref()
                    .ok_or_else(|| EffectError::Permanent("no [forge] is configured".into()))?;
                let pr = forge::PullRequest {
                    branch: p.branch,
                    base: p.base,
                    title: p.title,
                    body: format!(
                        "Opened by baton for {} after stage {}.",
                        task.key,
                        self.config
                            .effects
                            .pull_request_after
                            .as_deref()
                            .unwrap_or("?")
                    ),
                };
                let token = self.secrets.forge_token.as_deref().ok_or_else(|| {
                    EffectError::Permanent(format!(
                        "${} (forge.token_env) is not set",
                        forge.token_env
                    ))
                })?;
                forge::open_pull_request(&self.http, forge, token, &pr)
                    .await
                    .map(Some)
            }
            EffectPayload::PlaneComment(p) => {
                let plane = self.plane()?;
                self.plane_budget.take().await;
                let pr = self.store.pull_request_url(task.id).await.ok().flatten();
                let html = plane::comment_html(&p, pr.as_deref());
                plane::post_comment(
                    &self.http,
                    plane,
                    self.plane_key()?,
                    &p.issue,
                    &html,
                    &e.idempotency_key,
                )
                .await
                .map(Some)
            }
            EffectPayload::PlaneState(p) => {
                let plane = self.plane()?;
                let id = self.plane_state_id(&p.state).await?;
                self.plane_budget.take().await;
                plane::set_state(&self.http, plane, self.plane_key()?, &p.issue, &id).await?;
                Ok(Some(p.state))
            }
        }
    }

    fn plane_key(&self) -> Result<&str, EffectError> {
        let var = self
            .config
            .plane
            .as_ref()
            .map(|p| p.api_key_env.as_str())
            .unwrap_or("?");
        self.secrets
            .plane_api_key
            .as_deref()
            .ok_or_else(|| EffectError::Permanent(format!("${var} (plane.api_key_env) is not set")))
    }

    fn plane(&self) -> Result<&crate::config::PlaneSettings, EffectError> {
        self.config
            .plane
            .as_ref()
            .ok_or_else(|| EffectError::Permanent("no [plane] is configured".into()))
    }

    /// The project's states, fetched once and again when `wanted` is not among them
    /// (a state added or renamed since).
    async fn plane_states(
        &self,
        wanted: impl Fn(&plane::PlaneState) -> bool,
    ) -> Result<Vec<plane::PlaneState>, EffectError> {
        let plane = self.plane()?;
        let mut cache = self.plane_states.lock().await;
        if cache.as_ref().is_none_or(|c| !c.iter().any(&wanted)) {
            self.plane_budget.take().await;
            *cache = Some(plane::list_states(&self.http, plane, self.plane_key()?).await?);
        }
        Ok(cache.clone().unwrap_or_default())
    }

    /// A state's id by its name.
    pub async fn plane_state_id(&self, name: &str) -> Result<String, EffectError> {
        let states = self
            .plane_states(|s| s.name.eq_ignore_ascii_case(name))
            .await?;
        states
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
            .map(|s| s.id.clone())
            .ok_or_else(|| {
                EffectError::Permanent(format!(
                    "Plane project has no state named {name:?}; it has: {}",
                    states
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// A state's name by its id (webhooks may name the state by id only).
    pub async fn plane_state_name(&self, id: &str) -> Result<String, EffectError> {
        self.plane_states(|s| s.id == id)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.name)
            .ok_or_else(|| EffectError::Permanent(format!("Plane has no state with id {id}")))
    }

    /// The project's identifier (`PROJ`), fetched once and cached.
    pub async fn plane_project_identifier(&self) -> Result<String, EffectError> {
        let mut cached = self.plane_identifier.lock().await;
        if let Some(id) = cached.as_ref() {
            return Ok(id.clone());
        }
        self.plane_budget.take().await;
        let id = plane::project_identifier(&self.http, self.plane()?, self.plane_key()?).await?;
        *cached = Some(id.clone());
        Ok(id)
    }

    /// The task key of the project's work item `sequence_id`: `PROJ-65`.
    pub async fn plane_key_of(&self, sequence_id: i64) -> Result<String, EffectError> {
        Ok(format!(
            "{}-{sequence_id}",
            self.plane_project_identifier().await?
        ))
    }

    /// A work item's description, as text.
    pub async fn plane_work_item_description(&self, issue: &str) -> Result<String, EffectError> {
        self.plane_budget.take().await;
        let item = plane::work_item(&self.http, self.plane()?, self.plane_key()?, issue).await?;
        Ok(item.description())
    }

    /// The project's work items in the state named `state`.
    pub async fn plane_work_items_in(
        &self,
        state: &str,
    ) -> Result<Vec<plane::WorkItem>, EffectError> {
        let wanted = self.plane_state_id(state).await?;
        let (plane, key) = (self.plane()?, self.plane_key()?);
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..plane::pages_max() {
            self.plane_budget.take().await;
            let (items, next) =
                plane::work_items_page(&self.http, plane, key, cursor.as_deref()).await?;
            out.extend(
                items
                    .into_iter()
                    .filter(|i| i.state.as_deref() == Some(wanted.as_str())),
            );
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        Ok(out)
    }

    /// A state's group (`cancelled`, ...) by its id or name.
    pub async fn plane_state_group(&self, id_or_name: &str) -> Result<String, EffectError> {
        let is =
            |s: &plane::PlaneState| s.id == id_or_name || s.name.eq_ignore_ascii_case(id_or_name);
        self.plane_states(is)
            .await?
            .into_iter()
            .find(is)
            .map(|s| s.group)
            .ok_or_else(|| EffectError::Permanent(format!("Plane has no state {id_or_name:?}")))
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

/// Turns a non-success HTTP answer into an [`EffectError`]: 429 and 5xx are transient
/// (honouring `Retry-After` and `X-RateLimit-Reset`), other answers permanent.
pub async fn http_error(what: &str, resp: reqwest::Response) -> EffectError {
    let status = resp.status();
    let retry_after = retry_after(resp.headers());
    let resp_remaining_zero = resp
        .headers()
        .get("x-ratelimit-remaining")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "0");
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    let message = format!("{what}: HTTP {status}: {body}");
    // GitHub answers an exhausted rate limit with 403 and X-RateLimit-Remaining: 0.
    let rate_limited_403 = status.as_u16() == 403 && resp_remaining_zero;
    if status.as_u16() == 429
        || status.is_server_error()
        || status.as_u16() == 408
        || rate_limited_403
    {
        EffectError::Transient {
            message,
            retry_after,
        }
    } else {
        EffectError::Permanent(message)
    }
}

/// A network-level failure: always worth another attempt.
pub fn network_error(what: &str, err: reqwest::Error) -> EffectError {
    EffectError::transient(format!("{what}: {err}"))
}

/// When the remote asked to be called again: `Retry-After` (seconds or an HTTP date), or
/// `X-RateLimit-Reset` (Unix seconds).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(at.duration_since(SystemTime::now()).unwrap_or_default());
        }
    }
    if let Some(reset) = text("x-ratelimit-reset").and_then(|v| v.parse::<u64>().ok()) {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(reset);
        return Some(at.duration_since(SystemTime::now()).unwrap_or_default());
    }
    None
}

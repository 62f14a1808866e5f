//! `POST /webhooks/plane`: Plane's deliveries. `X-Plane-Signature` must be the hex
//! HMAC-SHA256 of the raw body under the webhook secret (compared in constant time),
//! deliveries are de-duplicated on `X-Plane-Delivery`, and a work item whose state
//! became `plane.trigger_state` is submitted as a task keyed by its identifier
//! (`PROJ-65`: the project's identifier, asked of Plane once since deliveries carry only
//! the project's id, and the item's sequence id), once, through the application layer. Bodies over [`WEBHOOK_BODY_LIMIT`]
//! get 413; malformed JSON 400; anything else 202.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::{ApiError, HttpState};
use crate::model::{EventSource, Origin, TaskKey};
use crate::store::StoreError;
use crate::tasks::{self, SubmitRequest, TaskError};

/// Webhook bodies larger than this are refused with 413.
pub const WEBHOOK_BODY_LIMIT: usize = 1024 * 1024;
/// Delivery ids longer than this are refused.
const DELIVERY_ID_LEN_MAX: usize = 200;

/// A delivery, with the fields baton reads.
#[derive(Debug, Deserialize)]
struct Delivery {
    #[serde(default)]
    event: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    data: Option<WorkItem>,
}

/// The work item of a delivery.
#[derive(Debug, Default, Deserialize)]
struct WorkItem {
    id: Option<String>,
    name: Option<String>,
    /// The project's id.
    project: Option<String>,
    sequence_id: Option<i64>,
    state: Option<StateRef>,
    state_detail: Option<NamedState>,
    project_detail: Option<ProjectDetail>,
    project_identifier: Option<String>,
    /// A ready identifier such as `PROJ-65`.
    identifier: Option<String>,
    description_stripped: Option<String>,
    description_html: Option<String>,
    /// `{id, name, color}` objects in Plane's deliveries.
    #[serde(default)]
    labels: Vec<crate::effects::plane::LabelRef>,
}

/// A state given by id or inline.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StateRef {
    Id(String),
    Inline(NamedState),
}

#[derive(Debug, Deserialize)]
struct NamedState {
    name: Option<String>,
    /// `backlog`, `unstarted`, `started`, `completed`, `cancelled` or `triage`.
    group: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ProjectDetail {
    identifier: Option<String>,
}

impl WorkItem {
    /// `PROJ-65`: the project's identifier and the item's sequence id, or a ready one.
    fn identifier(&self) -> Option<String> {
        let project = self
            .project_detail
            .as_ref()
            .and_then(|p| p.identifier.as_deref())
            .or(self.project_identifier.as_deref());
        if let (Some(p), Some(n)) = (project, self.sequence_id) {
            return Some(format!("{p}-{n}"));
        }
        self.identifier.clone()
    }

    /// The description as text: Plane's stripped text, else its HTML made text.
    /// Cut to the bound a description may have, as every description from Plane is.
    fn description(&self) -> Option<String> {
        crate::prompt::description_text(
            self.description_stripped.as_deref(),
            self.description_html.as_deref(),
        )
    }

    /// The state's group, when the delivery carries it (inline, or in `state_detail`).
    fn state_group(&self) -> Option<&str> {
        match &self.state {
            Some(StateRef::Inline(s)) => s.group.as_deref(),
            _ => None,
        }
        .or(self.state_detail.as_ref().and_then(|s| s.group.as_deref()))
    }

    /// The state's name when the delivery carries it inline; otherwise its id.
    fn state(&self) -> (Option<&str>, Option<&str>) {
        let inline = match &self.state {
            Some(StateRef::Inline(s)) => s.name.as_deref(),
            _ => None,
        }
        .or(self.state_detail.as_ref().and_then(|s| s.name.as_deref()));
        let id = match &self.state {
            Some(StateRef::Id(id)) => Some(id.as_str()),
            _ => None,
        };
        (inline, id)
    }
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

/// A delivery's body, read into the fields baton uses; a clear 400 for anything else.
fn parse_delivery(body: &[u8]) -> Result<Delivery, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => serde_json::from_value(v)
            .map_err(|e| ApiError::bad_request(format!("the body is not a Plane delivery: {e}"))),
        Ok(_) => Err(ApiError::bad_request("the body is JSON but not an object")),
        Err(e) => Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    }
}

fn accepted(detail: Value) -> Response {
    (StatusCode::ACCEPTED, axum::Json(detail)).into_response()
}

pub(super) async fn plane(
    State(st): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(ApiError::rejected)?;
    let not_configured = |why: &str| ApiError::new(StatusCode::NOT_FOUND, why);
    if st.config.plane.is_none() {
        return Err(not_configured(
            "Plane webhooks are not configured ([plane])",
        ));
    }
    let Some(secret) = st.secrets.webhook_secret.clone() else {
        return Err(not_configured(
            "Plane webhooks are not configured: plane.webhook_secret_env names no set variable",
        ));
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signature = header("x-plane-signature")
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing X-Plane-Signature"))?;
    if !signature_valid(secret.as_bytes(), &body, signature) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "X-Plane-Signature does not match the body",
        ));
    }
    let delivery = parse_delivery(&body)?;
    let id = header("x-plane-delivery")
        .filter(|d| !d.is_empty() && d.len() <= DELIVERY_ID_LEN_MAX)
        .ok_or_else(|| ApiError::bad_request("missing or oversized X-Plane-Delivery"))?
        .to_string();
    let now = st.clock.now_ms();
    let fresh = st
        .store
        .record_delivery(&id, EventSource::Webhook, now)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot record the delivery: {e}"),
            )
        })?;
    if !fresh {
        return Ok(accepted(json!({"status": "duplicate", "delivery": id})));
    }
    match handle(&st, &delivery, now).await {
        Ok(detail) => Ok(accepted(detail)),
        Err(e) => {
            // Not handled: Plane's redelivery must not be taken for a duplicate.
            if e.status.is_server_error() {
                let _ = st.store.forget_delivery(&id).await;
            }
            Err(e)
        }
    }
}

/// What a delivery means; `Ok` is always answered 202.
async fn handle(st: &HttpState, delivery: &Delivery, now: i64) -> Result<Value, ApiError> {
    let ignored = |why: &str| Ok(json!({"status": "ignored", "reason": why}));
    let Some(plane) = st.config.plane.as_ref() else {
        return ignored("no [plane]");
    };
    if !matches!(delivery.event.as_str(), "issue" | "work_item")
        || !matches!(
            delivery.action.as_str(),
            "updated" | "update" | "created" | "create"
        )
    {
        return ignored("not a work item update");
    }
    let Some(item) = &delivery.data else {
        return ignored("the delivery carries no work item");
    };
    if item
        .project
        .as_deref()
        .is_some_and(|p| p != plane.project_id)
    {
        return ignored("the work item belongs to another project than plane.project_id");
    }
    let Some(state) = state_of(st, item).await? else {
        return ignored("the work item's state is not in the delivery");
    };
    let cancelling = state.group.as_deref() == Some("cancelled")
        || plane
            .cancel_states
            .iter()
            .any(|c| c.eq_ignore_ascii_case(&state.name));
    let triggering = plane
        .trigger_state
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case(&state.name));
    if !cancelling && !triggering {
        return ignored("the work item is neither in plane.trigger_state nor cancelled");
    }
    let Some(key) = key_of(st, item).await? else {
        return ignored("the work item has no sequence id");
    };
    if cancelling {
        return cancel(st, &key, now).await;
    }
    let Some(issue_id) = item.id.clone().filter(|s| !s.is_empty()) else {
        return ignored("the work item has no id");
    };
    let labels = crate::effects::plane::LabelRef::names(&item.labels);
    let request = SubmitRequest {
        title: item.name.clone(),
        description: item.description(),
        plane_issue_id: Some(issue_id.clone()),
        pipeline: st.config.pipeline_for_labels(&labels),
        ..SubmitRequest::new(key.clone())
    };
    match tasks::submit(&st.store, &st.config, request, Origin::Webhook, now).await {
        Ok(s) => {
            tracing::info!(task = %key, plane_issue = issue_id, "task submitted by a Plane webhook");
            Ok(json!({"status": "submitted", "task": s.task.key}))
        }
        Err(TaskError::Store(StoreError::TaskExists(_))) => {
            Ok(json!({"status": "exists", "task": key}))
        }
        Err(e @ TaskError::DescriptionTooLong { .. }) => {
            Err(ApiError::bad_request(format!("cannot submit {key}: {e}")))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot submit {key}: {e}"),
        )),
    }
}

/// A work item moved to a cancelled state: its task is cancelled, and its agents
/// stopped, through the same path as `baton cancel`.
async fn cancel(st: &HttpState, key: &TaskKey, now: i64) -> Result<Value, ApiError> {
    match tasks::cancel(&st.store, key, Origin::Webhook, now, &st.hostname).await {
        Ok(c) => {
            tracing::info!(task = %key, runs = c.runs.len(), "task cancelled by a Plane webhook");
            Ok(json!({"status": "cancelled", "task": key}))
        }
        Err(TaskError::Store(StoreError::NoSuchTask(_) | StoreError::WrongState { .. })) => Ok(
            json!({"status": "ignored", "reason": "no active task for the work item", "task": key}),
        ),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot cancel {key}: {e}"),
        )),
    }
}

/// A state's name and, when known, its group.
struct StateSeen {
    name: String,
    group: Option<String>,
}

/// The work item's state: given inline (Plane's deliveries carry it with its group), or
/// by id through the project's states.
async fn state_of(st: &HttpState, item: &WorkItem) -> Result<Option<StateSeen>, ApiError> {
    // A state named by id only is looked up; while Plane cannot answer, the delivery is
    // answered 503 and forgotten, so that its redelivery is handled (a cancel included).
    let unavailable = |e: crate::effects::EffectError| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot look the work item's state up in Plane: {e}"),
        )
    };
    Ok(match item.state() {
        (Some(name), _) => Some(StateSeen {
            name: name.to_string(),
            group: item.state_group().map(str::to_string),
        }),
        (None, Some(id)) => Some(StateSeen {
            name: st
                .effector
                .plane_state_name(id)
                .await
                .map_err(unavailable)?,
            group: match item.state_group() {
                Some(g) => Some(g.to_string()),
                None => Some(
                    st.effector
                        .plane_state_group(id)
                        .await
                        .map_err(unavailable)?,
                ),
            },
        }),
        (None, None) => None,
    })
}

/// The task key of a work item. Plane names the project by its id only; its identifier is
/// asked of Plane once.
async fn key_of(st: &HttpState, item: &WorkItem) -> Result<Option<TaskKey>, ApiError> {
    let identifier = match (item.identifier(), item.sequence_id) {
        (Some(identifier), _) => identifier,
        (None, Some(n)) => st.effector.plane_key_of(n).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot learn the project's identifier from Plane: {e}"),
            )
        })?,
        (None, None) => return Ok(None),
    };
    TaskKey::parse(identifier)
        .map(Some)
        .map_err(|msg| ApiError::bad_request(format!("work item identifier: {msg}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// No body panics the parser: it is read, or refused with a 400.
        #[test]
        fn no_body_panics_the_parser(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Err(e) = parse_delivery(&body) {
                proptest::prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
            }
        }

        /// Deliveries of any shape, with text of any script where Plane sends text.
        #[test]
        fn no_delivery_panics_its_reading(
            name in "\\PC{0,80}",
            identifier in "\\PC{0,80}",
            seq in proptest::option::of(proptest::num::i64::ANY),
            html in "\\PC{0,200}",
            label in "\\PC{0,40}",
        ) {
            let body = json!({
                "event": "issue", "action": "updated",
                "data": {
                    "id": name, "name": name, "sequence_id": seq,
                    "identifier": identifier, "project_identifier": identifier,
                    "project_detail": {"identifier": identifier},
                    "state": {"id": name, "name": name, "group": label},
                    "description_html": html,
                    "labels": [{"id": label, "name": label, "color": "#000"}, label],
                },
            });
            let delivery = parse_delivery(body.to_string().as_bytes()).unwrap();
            let item = delivery.data.unwrap();
            let _ = item.description();
            let _ = crate::effects::plane::LabelRef::names(&item.labels);
        }
    }

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
        let item: WorkItem = serde_json::from_value(
            json!({"project_detail": {"identifier": "PROJ"}, "sequence_id": 65}),
        )
        .unwrap();
        assert_eq!(item.identifier().as_deref(), Some("PROJ-65"));
        let item: WorkItem = serde_json::from_value(json!({"identifier": "APP-3"})).unwrap();
        assert_eq!(item.identifier().as_deref(), Some("APP-3"));
        let item: WorkItem = serde_json::from_value(json!({"sequence_id": 3})).unwrap();
        assert_eq!(item.identifier(), None);
    }

    #[test]
    fn states_are_read_inline_or_by_id() {
        let item: WorkItem =
            serde_json::from_value(json!({"state": {"id": "s1", "name": "Ready"}})).unwrap();
        assert_eq!(item.state(), (Some("Ready"), None));
        let item: WorkItem = serde_json::from_value(json!({"state": "s1"})).unwrap();
        assert_eq!(item.state(), (None, Some("s1")));
        let item: WorkItem =
            serde_json::from_value(json!({"state": "s1", "state_detail": {"name": "Backlog"}}))
                .unwrap();
        assert_eq!(item.state(), (Some("Backlog"), Some("s1")));
    }
}

//! Plane's REST API (v1, work items) with the `X-API-Key` header: a comment per stage
//! outcome, recognised by its `external_id` so that a repeated delivery answers 409, and
//! state changes by state name.

use serde::Deserialize;
use serde_json::json;

use super::{EffectError, http_error, network_error};
use crate::config::PlaneSettings;
use crate::model::PlaneCommentPayload;

#[derive(Debug, Clone, Deserialize)]
pub struct PlaneState {
    pub id: String,
    pub name: String,
    /// `backlog`, `unstarted`, `started`, `completed`, `cancelled` or `triage`.
    #[serde(default)]
    pub group: String,
}

/// A work item, with the fields baton reads.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkItem {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Listed with `expand=labels`: label objects (a read without it gives their ids).
    #[serde(default)]
    pub labels: Vec<LabelRef>,
    pub sequence_id: Option<i64>,
    /// The state's id (the API's lists and reads give the id, not the object).
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub description_stripped: Option<String>,
    #[serde(default)]
    pub description_html: Option<String>,
}

/// A work item's label as Plane gives it: an object (webhooks give `id`, `name`,
/// `color`; the API with `expand=labels` every field) or, unexpanded, its id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LabelRef {
    Object { name: Option<String> },
    Id(String),
}

impl LabelRef {
    /// The names of `labels` that have one.
    pub fn names(labels: &[LabelRef]) -> Vec<String> {
        labels
            .iter()
            .filter_map(|l| match l {
                LabelRef::Object { name } => name.clone(),
                LabelRef::Id(_) => None,
            })
            .collect()
    }
}

impl WorkItem {
    /// The description as text: Plane's stripped text, else the HTML made text.
    pub fn description(&self) -> String {
        crate::prompt::description_text(
            self.description_stripped.as_deref(),
            self.description_html.as_deref(),
        )
        .unwrap_or_default()
    }
}

/// A page of a list: Plane pages with a cursor.
#[derive(Debug, Deserialize)]
struct Page<T> {
    results: Vec<T>,
    #[serde(default)]
    next_cursor: Option<String>,
    #[serde(default)]
    next_page_results: bool,
}

/// Work items listed per page.
const PAGE_SIZE: usize = 100;
/// Pages read at most in one listing (10,000 work items).
const PAGES_MAX: usize = 100;

fn project_url(plane: &PlaneSettings) -> String {
    format!(
        "{}/api/v1/workspaces/{}/projects/{}",
        plane.api_url.trim_end_matches('/'),
        plane.workspace,
        plane.project_id
    )
}

/// Posts a comment; a 409 (the `external_id` is known) means an earlier attempt posted it.
pub async fn post_comment(
    http: &reqwest::Client,
    plane: &PlaneSettings,
    key: &str,
    issue: &str,
    html: &str,
    external_id: &str,
) -> Result<String, EffectError> {
    let resp = http
        .post(format!(
            "{}/work-items/{issue}/comments/",
            project_url(plane)
        ))
        .header("X-API-Key", key)
        .json(
            &json!({"comment_html": html, "external_source": "baton", "external_id": external_id}),
        )
        .send()
        .await
        .map_err(|e| network_error("post the Plane comment", e))?;
    match resp.status().as_u16() {
        200 | 201 => {
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            Ok(v["id"].as_str().unwrap_or(external_id).to_string())
        }
        409 => Ok(external_id.to_string()),
        _ => Err(http_error("post the Plane comment", resp).await),
    }
}

/// The project's states.
pub async fn list_states(
    http: &reqwest::Client,
    plane: &PlaneSettings,
    key: &str,
) -> Result<Vec<PlaneState>, EffectError> {
    let resp = http
        .get(format!("{}/states/", project_url(plane)))
        .header("X-API-Key", key)
        .send()
        .await
        .map_err(|e| network_error("list the Plane states", e))?;
    if !resp.status().is_success() {
        return Err(http_error("list the Plane states", resp).await);
    }
    let v: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| EffectError::transient(format!("Plane states are not JSON: {e}")))?;
    // Plane pages its lists as {"results": [...]}; accept a bare list as well.
    let list = v.get("results").cloned().unwrap_or(v);
    serde_json::from_value(list)
        .map_err(|e| EffectError::Permanent(format!("Plane states have an unknown shape: {e}")))
}

/// The project's identifier (the `PROJ` of `PROJ-65`), which Plane's deliveries do not
/// carry: they name the project by its id only.
pub async fn project_identifier(
    http: &reqwest::Client,
    plane: &PlaneSettings,
    key: &str,
) -> Result<String, EffectError> {
    let resp = http
        .get(format!("{}/", project_url(plane)))
        .header("X-API-Key", key)
        .send()
        .await
        .map_err(|e| network_error("get the Plane project", e))?;
    if !resp.status().is_success() {
        return Err(http_error("get the Plane project", resp).await);
    }
    #[derive(Deserialize)]
    struct Project {
        identifier: String,
    }
    let p: Project = resp
        .json()
        .await
        .map_err(|e| EffectError::Permanent(format!("the Plane project has no identifier: {e}")))?;
    Ok(p.identifier)
}

/// One work item.
pub async fn work_item(
    http: &reqwest::Client,
    plane: &PlaneSettings,
    key: &str,
    issue: &str,
) -> Result<WorkItem, EffectError> {
    let resp = http
        .get(format!("{}/work-items/{issue}/", project_url(plane)))
        .header("X-API-Key", key)
        .send()
        .await
        .map_err(|e| network_error("get the Plane work item", e))?;
    if !resp.status().is_success() {
        return Err(http_error("get the Plane work item", resp).await);
    }
    resp.json().await.map_err(|e| {
        EffectError::Permanent(format!("the Plane work item has an unknown shape: {e}"))
    })
}

/// One page of the project's work items, from `cursor`; the next cursor when there is
/// a next page.
pub async fn work_items_page(
    http: &reqwest::Client,
    plane: &PlaneSettings,
    key: &str,
    cursor: Option<&str>,
) -> Result<(Vec<WorkItem>, Option<String>), EffectError> {
    let mut req = http
        .get(format!("{}/work-items/", project_url(plane)))
        .header("X-API-Key", key)
        .query(&[("per_page", PAGE_SIZE.to_string())])
        .query(&[("expand", "labels")]);
    if let Some(c) = cursor {
        req = req.query(&[("cursor", c)]);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| network_error("list the Plane work items", e))?;
    if !resp.status().is_success() {
        return Err(http_error("list the Plane work items", resp).await);
    }
    let page: Page<WorkItem> = resp.json().await.map_err(|e| {
        EffectError::Permanent(format!("the Plane work items have an unknown shape: {e}"))
    })?;
    let next = page.next_cursor.filter(|_| page.next_page_results);
    Ok((page.results, next))
}

/// How many pages a listing reads at most.
pub const fn pages_max() -> usize {
    PAGES_MAX
}

/// Moves a work item to the state `state_id`.
pub async fn set_state(
    http: &reqwest::Client,
    plane: &PlaneSettings,
    key: &str,
    issue: &str,
    state_id: &str,
) -> Result<(), EffectError> {
    let resp = http
        .patch(format!("{}/work-items/{issue}/", project_url(plane)))
        .header("X-API-Key", key)
        .json(&json!({"state": state_id}))
        .send()
        .await
        .map_err(|e| network_error("set the Plane state", e))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(http_error("set the Plane state", resp).await)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The comment of one stage outcome: stage, verdict, run, attempt, commit, PR link.
pub fn comment_html(c: &PlaneCommentPayload, pr_url: Option<&str>) -> String {
    let mut html = format!(
        "<p><strong>baton</strong>: stage <code>{}</code> of {} <strong>{}</strong> (run {}, attempt {})</p>",
        escape(&c.stage),
        escape(&c.task),
        c.verdict,
        c.run_id,
        c.attempt
    );
    if let Some(commit) = &c.commit {
        html.push_str(&format!("<p>commit <code>{}</code></p>", escape(commit)));
    }
    if let Some(next) = &c.next_stage {
        html.push_str(&format!("<p>next: <code>{}</code></p>", escape(next)));
    }
    if let Some(url) = pr_url {
        let url = escape(url);
        html.push_str(&format!("<p>pull request: <a href=\"{url}\">{url}</a></p>"));
    }
    html
}

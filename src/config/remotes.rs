//! The settings of the remote services baton reports to: the forge (pull requests) and
//! Plane (comments, states, deliveries, the poll).

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForgeSettings {
    /// `github` or `gitea` (Gitea and Forgejo).
    pub kind: String,
    pub api_url: String,
    /// `owner/name`.
    pub repo: String,
    /// The environment variable that holds the token.
    pub token_env: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaneSettings {
    pub api_url: String,
    pub workspace: String,
    pub project_id: String,
    pub api_key_env: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_state: Option<String>,
    #[serde(default)]
    pub states: PlaneStates,
    /// Work items moved to one of these states (or to any state of Plane's `cancelled`
    /// group) cancel their task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancel_states: Vec<String>,
    /// How often the work items in `trigger_state` are listed, to submit those whose
    /// delivery was lost; zero turns the poll off.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Plane's web address, for links to work items (default: derived from `api_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
    /// The node's budget of Plane requests, below Plane's 60 a minute.
    #[serde(default = "default_plane_requests_per_minute")]
    pub requests_per_minute: u32,
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_plane_requests_per_minute() -> u32 {
    50
}

impl PlaneSettings {
    /// The web address of a work item.
    pub fn work_item_url(&self, issue_id: &str) -> String {
        let web = match &self.web_url {
            Some(w) => w.trim_end_matches('/').to_string(),
            // Plane Cloud serves its API and its app on two hosts; a self-hosted Plane
            // serves both on one.
            None => self
                .api_url
                .trim_end_matches('/')
                .replace("://api.plane.so", "://app.plane.so"),
        };
        format!(
            "{web}/{}/projects/{}/issues/{issue_id}",
            self.workspace, self.project_id
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaneStates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_done: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_failed: Option<String>,
}

//! Pull requests on GitHub and on Gitea or Forgejo, opened at most once: the PR is looked
//! up first, and "already exists" answers (GitHub 422, Gitea 409) count as success.

use serde_json::json;

use super::{EffectError, http_error, network_error};
use crate::config::ForgeSettings;

#[derive(Debug, Clone)]
pub struct PullRequest {
    pub branch: String,
    pub base: String,
    pub title: String,
    pub body: String,
}

fn owner(forge: &ForgeSettings) -> &str {
    forge.repo.split('/').next().unwrap_or_default()
}

/// Opens the pull request of `pr.branch` unless it is open already; returns its URL.
pub async fn open_pull_request(
    http: &reqwest::Client,
    forge: &ForgeSettings,
    token: &str,
    pr: &PullRequest,
) -> Result<String, EffectError> {
    match forge.kind.as_str() {
        "github" => github(http, forge, token, pr).await,
        _ => gitea(http, forge, token, pr).await,
    }
}

fn github_request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
) -> reqwest::RequestBuilder {
    http.request(method, url)
        .bearer_auth(token)
        .header("Accept", "application/vnd.github+json")
        .header("X-GitHub-Api-Version", "2022-11-28")
}

async fn github_find(
    http: &reqwest::Client,
    forge: &ForgeSettings,
    token: &str,
    branch: &str,
) -> Result<Option<String>, EffectError> {
    let api = forge.api_url.trim_end_matches('/');
    let url = format!("{api}/repos/{}/pulls", forge.repo);
    let resp = github_request(http, reqwest::Method::GET, url, token)
        .query(&[
            ("head", format!("{}:{branch}", owner(forge))),
            ("state", "open".into()),
        ])
        .send()
        .await
        .map_err(|e| network_error("look up the pull request", e))?;
    if !resp.status().is_success() {
        return Err(http_error("look up the pull request", resp).await);
    }
    let list: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| EffectError::transient(format!("pull request list is not JSON: {e}")))?;
    Ok(list
        .as_array()
        .and_then(|a| a.first())
        .and_then(|p| p["html_url"].as_str())
        .map(str::to_string))
}

async fn github(
    http: &reqwest::Client,
    forge: &ForgeSettings,
    token: &str,
    pr: &PullRequest,
) -> Result<String, EffectError> {
    if let Some(url) = github_find(http, forge, token, &pr.branch).await? {
        return Ok(url);
    }
    let api = forge.api_url.trim_end_matches('/');
    let resp = github_request(
        http,
        reqwest::Method::POST,
        format!("{api}/repos/{}/pulls", forge.repo),
        token,
    )
    .json(&json!({"title": pr.title, "head": pr.branch, "base": pr.base, "body": pr.body}))
    .send()
    .await
    .map_err(|e| network_error("open the pull request", e))?;
    let status = resp.status().as_u16();
    if status == 201 || status == 200 {
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| EffectError::transient(format!("pull request answer is not JSON: {e}")))?;
        return v["html_url"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| EffectError::Permanent("pull request answer has no html_url".into()));
    }
    if status == 422 {
        // "A pull request already exists for owner:branch": someone (an earlier attempt of
        // ours) opened it between the lookup and the create.
        let text = resp.text().await.unwrap_or_default();
        if text.contains("already exists") {
            return github_find(http, forge, token, &pr.branch)
                .await?
                .ok_or_else(|| {
                    EffectError::transient(
                        "GitHub says the pull request exists but does not list it yet",
                    )
                });
        }
        return Err(EffectError::Permanent(format!(
            "open the pull request: HTTP 422: {text}"
        )));
    }
    Err(http_error("open the pull request", resp).await)
}

async fn gitea_find(
    http: &reqwest::Client,
    forge: &ForgeSettings,
    token: &str,
    pr: &PullRequest,
) -> Result<Option<String>, EffectError> {
    let api = forge.api_url.trim_end_matches('/');
    let url = format!(
        "{api}/api/v1/repos/{}/pulls/{}/{}",
        forge.repo, pr.base, pr.branch
    );
    let resp = http
        .get(url)
        .header("Authorization", format!("token {token}"))
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| network_error("look up the pull request", e))?;
    match resp.status().as_u16() {
        404 => Ok(None),
        200 => {
            let v: serde_json::Value = resp.json().await.map_err(|e| {
                EffectError::transient(format!("pull request answer is not JSON: {e}"))
            })?;
            let open = v["state"].as_str().is_none_or(|s| s == "open");
            Ok(open
                .then(|| v["html_url"].as_str().map(str::to_string))
                .flatten())
        }
        _ => Err(http_error("look up the pull request", resp).await),
    }
}

async fn gitea(
    http: &reqwest::Client,
    forge: &ForgeSettings,
    token: &str,
    pr: &PullRequest,
) -> Result<String, EffectError> {
    if let Some(url) = gitea_find(http, forge, token, pr).await? {
        return Ok(url);
    }
    let api = forge.api_url.trim_end_matches('/');
    let resp = http
        .post(format!("{api}/api/v1/repos/{}/pulls", forge.repo))
        .header("Authorization", format!("token {token}"))
        .header("Accept", "application/json")
        .json(&json!({"title": pr.title, "head": pr.branch, "base": pr.base, "body": pr.body}))
        .send()
        .await
        .map_err(|e| network_error("open the pull request", e))?;
    match resp.status().as_u16() {
        200 | 201 => {
            let v: serde_json::Value = resp.json().await.map_err(|e| {
                EffectError::transient(format!("pull request answer is not JSON: {e}"))
            })?;
            v["html_url"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| EffectError::Permanent("pull request answer has no html_url".into()))
        }
        409 => gitea_find(http, forge, token, pr).await?.ok_or_else(|| {
            EffectError::transient("Gitea says the pull request exists but does not show it yet")
        }),
        _ => Err(http_error("open the pull request", resp).await),
    }
}

//! The API's handlers: thin edges over the application layer (`tasks`), the store's
//! reads and `present`. Each returns `Result<_, ApiError>`, so `?` answers with the JSON
//! error envelope.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, HttpState, KeyPath, LOG_TAIL_DEFAULT};
use crate::model::{EventKind, Origin, TaskKey, TaskStatus, Usage};
use crate::present;
use crate::store::Retried;
use crate::tasks::{self, EffectsToRetry, SubmitRequest};

type ApiResult = Result<Response, ApiError>;

pub(super) async fn readyz(State(st): State<HttpState>) -> ApiResult {
    if !st.ready.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's actors are not running",
        ));
    }
    st.store.ping().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database does not answer: {e}"),
        )
    })?;
    Ok((StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response())
}

pub(super) async fn metrics(State(st): State<HttpState>) -> ApiResult {
    use prometheus::Encoder;
    let families = st.registry.as_ref().map(|r| r.gather()).unwrap_or_default();
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&families, &mut out)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode metrics: {e}"),
            )
        })?;
    Ok(([("content-type", "text/plain; version=0.0.4")], out).into_response())
}

pub(super) async fn dashboard() -> Response {
    (
        [("content-type", "text/html; charset=utf-8")],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// The page size of `GET /api/v1/tasks` when none is asked for, and the largest one.
pub const TASK_PAGE_DEFAULT: u64 = 50;
pub const TASK_PAGE_MAX: u64 = 500;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    status: Option<TaskStatus>,
    pipeline: Option<String>,
    stage: Option<String>,
    /// Keys that start with this.
    key: Option<String>,
    limit: Option<u64>,
    /// The `next` cursor of the previous page.
    after: Option<i64>,
}

/// A page of tasks, newest first, filtered; `next` is the cursor of the following page.
pub(super) async fn list_tasks(
    State(st): State<HttpState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(ApiError::rejected)?;
    let limit = q.limit.unwrap_or(TASK_PAGE_DEFAULT);
    if !(1..=TASK_PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is not between 1 and {TASK_PAGE_MAX}"
        )));
    }
    if let Some(p) = q.pipeline.as_deref()
        && !st.config.pipelines.contains_key(p)
    {
        let known: Vec<&String> = st.config.pipelines.keys().collect();
        return Err(ApiError::bad_request(format!(
            "unknown pipeline {p:?}; the config defines: {known:?}"
        )));
    }
    if let Some(s) = q.stage.as_deref()
        && !st.config.stages.contains_key(s)
    {
        return Err(ApiError::bad_request(format!("unknown stage {s:?}")));
    }
    let filter = crate::store::TaskFilter {
        status: q.status,
        pipeline: q.pipeline,
        stage: q.stage,
        key_prefix: q.key,
    };
    let (tasks, next) = st.store.task_page(&filter, limit, q.after).await?;
    Ok(axum::Json(json!({"tasks": tasks, "next": next})).into_response())
}

pub(super) async fn task_detail(State(st): State<HttpState>, KeyPath(key): KeyPath) -> ApiResult {
    let detail = st.store.task_detail(&key).await?;
    let mut doc = present::detail_json(&detail, st.clock.now_ms());
    // Where the task's work shows outside baton: its pull request, its Plane work item.
    let pull_request = detail
        .effects
        .iter()
        .find(|e| e.kind == crate::model::EffectKind::PullRequest)
        .and_then(|e| e.external_ref.clone());
    let plane = match (&st.config.plane, &detail.task.plane_issue_id) {
        (Some(p), Some(issue)) => Some(p.work_item_url(issue)),
        _ => None,
    };
    doc["links"] = json!({"pull_request": pull_request, "plane": plane});
    Ok(axum::Json(doc).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    key: TaskKey,
    pipeline: Option<String>,
    title: Option<String>,
    description: Option<String>,
    plane_issue_id: Option<String>,
}

pub(super) async fn submit_task(
    State(st): State<HttpState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let body = body.map_err(ApiError::rejected)?;
    let body: SubmitBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a task: {e}")))?;
    let request = SubmitRequest {
        key: body.key,
        pipeline: body.pipeline,
        title: body.title,
        description: body.description,
        plane_issue_id: body.plane_issue_id,
    };
    let now = st.clock.now_ms();
    let s = tasks::submit(&st.store, &st.config, request, Origin::Api, now).await?;
    let doc = json!({"task": s.task, "job": s.job});
    Ok((StatusCode::CREATED, axum::Json(doc)).into_response())
}

pub(super) async fn cancel_task(State(st): State<HttpState>, KeyPath(key): KeyPath) -> ApiResult {
    let now = st.clock.now_ms();
    let cancelled = tasks::cancel(&st.store, &key, Origin::Api, now, &st.hostname).await?;
    let runs: Vec<i64> = cancelled.runs.iter().map(|(id, _)| *id).collect();
    let doc = json!({"task": key, "status": "cancelled", "runs": runs});
    Ok(axum::Json(doc).into_response())
}

pub(super) async fn retry_task(State(st): State<HttpState>, KeyPath(key): KeyPath) -> ApiResult {
    let doc = match tasks::retry(&st.store, &key, Origin::Api, st.clock.now_ms()).await? {
        Retried::Job(job) => json!({"task": key, "job": job}),
        Retried::Delivery { effects, status } => {
            json!({"task": key, "delivery": {"effects_retried": effects, "status": status}})
        }
    };
    Ok(axum::Json(doc).into_response())
}

pub(super) async fn retry_effect(
    State(st): State<HttpState>,
    id: Result<Path<i64>, PathRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(ApiError::rejected)?;
    let now = st.clock.now_ms();
    let retried =
        tasks::retry_effects(&st.store, EffectsToRetry::One(id), Origin::Api, now).await?;
    Ok(axum::Json(json!({"effects": retried})).into_response())
}

#[derive(serde::Deserialize)]
pub(super) struct LogQuery {
    follow: Option<bool>,
    bytes: Option<u64>,
}

pub(super) async fn run_log(
    State(st): State<HttpState>,
    id: Result<Path<i64>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(ApiError::rejected)?;
    let Query(q) = q.map_err(ApiError::rejected)?;
    let run = st
        .store
        .run(id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")))?;
    let path = std::path::PathBuf::from(&run.log_path);
    let tail = q.bytes.unwrap_or(LOG_TAIL_DEFAULT).min(16 * 1024 * 1024);
    let len = tokio::fs::metadata(&path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let start = len.saturating_sub(tail);
    let head = read_from(&path, start).await;
    let text = [("content-type", "text/plain; charset=utf-8")];
    if !q.follow.unwrap_or(false) {
        return Ok((text, head).into_response());
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
    Ok((text, axum::body::Body::from_stream(stream)).into_response())
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

/// The overview's active tasks, at most, and the recent ones it shows beside them.
const OVERVIEW_ACTIVE_MAX: u64 = 500;
const OVERVIEW_RECENT: u64 = 50;

/// Tasks by status with their pipeline's stages and states, running agents with their
/// age, recent reaps and failed effects: the dashboard's one request.
pub(super) async fn overview(State(st): State<HttpState>) -> ApiResult {
    let now = st.clock.now_ms();
    let active = crate::store::TaskFilter {
        status: Some(TaskStatus::Active),
        ..Default::default()
    };
    let all = crate::store::TaskFilter::default();
    let (active, recent, counts, running, reaps, failed, pending) = tokio::try_join!(
        st.store.task_page(&active, OVERVIEW_ACTIVE_MAX, None),
        st.store.task_page(&all, OVERVIEW_RECENT, None),
        st.store.task_counts(),
        st.store.running_jobs(),
        st.store.recent_events(&[EventKind::Reaped], 20),
        st.store.failed_effects(20),
        st.store.pending_effects(50),
    )?;
    let all_pending: Vec<_> = pending.iter().map(|(e, _)| e.clone()).collect();
    let waiting: Vec<Value> = pending
        .iter()
        .filter_map(|(e, key)| {
            let w = present::effect_wait(e, &all_pending, now)?;
            Some(json!({"id": e.id, "task": key, "kind": e.kind, "waiting": w}))
        })
        .collect();
    // The active tasks, then the most recent others: a page, however long the history.
    let mut tasks = active.0;
    tasks.extend(
        recent
            .0
            .into_iter()
            .filter(|t| t.task.status != TaskStatus::Active),
    );
    let job_ids: Vec<i64> = tasks
        .iter()
        .flat_map(|t| t.jobs.iter().map(|j| j.id))
        .collect();
    let usage = st.store.usage_by_job(&job_ids).await?;
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|t| {
            let total = t
                .jobs
                .iter()
                .filter_map(|j| usage.get(&j.id).copied())
                .fold(Usage::default(), Usage::plus);
            let stages = st
                .config
                .pipelines
                .get(&t.task.pipeline)
                .map(|p| p.stages.clone())
                .unwrap_or_default();
            let stage_states: Vec<Value> = stages
                .iter()
                .map(|s| {
                    let last = t.jobs.iter().filter(|j| &j.stage == s).max_by_key(|j| j.id);
                    json!({
                        "stage": s,
                        "state": last.map(|j| j.status.as_str()).unwrap_or("pending"),
                        "iteration": last.map(|j| j.iteration),
                    })
                })
                .collect();
            json!({
                "key": t.task.key, "title": t.task.title, "status": t.task.status,
                "pipeline": t.task.pipeline, "stages": stage_states, "updated_at": t.task.updated_at,
                "usage": total, "usage_text": present::fmt_usage(total),
            })
        })
        .collect();
    let running: Vec<Value> = running
        .iter()
        .filter_map(|r| {
            let run = r.run.as_ref()?;
            Some(json!({
                "task": r.task.key, "stage": r.job.stage, "run_id": run.id, "pid": run.pid,
                "node": run.node_id, "age_ms": now - run.started_at, "exited": run.exited_at.is_some(),
            }))
        })
        .collect();
    let reaps: Vec<Value> = reaps
        .iter()
        .map(|e| {
            let detail = serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null);
            json!({"at": e.at, "task_id": e.task_id, "run_id": e.run_id, "detail": detail})
        })
        .collect();
    let keys = st
        .store
        .tasks_by_ids(failed.iter().map(|e| e.task_id))
        .await?;
    let failed: Vec<Value> = failed
        .iter()
        .map(|e| {
            json!({
                "id": e.id, "task_id": e.task_id, "kind": e.kind,
                "task": keys.get(&e.task_id).map(|t| t.key.clone()),
                "attempts": e.attempts, "last_error": e.last_error,
            })
        })
        .collect();
    let doc = json!({
        "now": now, "counts": counts, "tasks": tasks, "running": running, "reaps": reaps, "failed_effects": failed,
        "waiting_effects": waiting,
    });
    Ok(axum::Json(doc).into_response())
}

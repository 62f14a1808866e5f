//! The application layer: submit, cancel and retry, the one way every entry point (the
//! CLI, the HTTP API, the Plane webhook) acts on tasks. Edges parse their input into
//! these requests and present the results; none writes tasks any other way. After
//! dispatch, only the claim transaction and the outbox change a task's status.

use crate::config::Config;
use crate::model::{EventSource, JobStatus, Origin, TaskKey};
use crate::store::{EffectSelector, Store, StoreError, Submitted};

/// Titles longer than this are cut (a tracker's title can be a whole paragraph).
pub const TITLE_LEN_MAX: usize = 500;
/// The pipeline of a task that names none.
pub const PIPELINE_DEFAULT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(
        "the description is {kib} KiB; at most {max} KiB are taken (put the rest in a file of the repository and point to it)",
        max = crate::prompt::DESCRIPTION_MAX / 1024
    )]
    DescriptionTooLong { kib: usize },
    #[error("unknown pipeline {name:?}; the config defines: {known}")]
    UnknownPipeline { name: String, known: String },
    #[error("pipeline {0:?} has no stages")]
    EmptyPipeline(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A task to submit, as an entry point received it.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    pub key: TaskKey,
    /// `None` or empty: [`PIPELINE_DEFAULT`].
    pub pipeline: Option<String>,
    /// `None` or empty: the key.
    pub title: Option<String>,
    /// What the task is about; with a Plane work item and none given, the work item's
    /// is read before the first stage.
    pub description: Option<String>,
    pub plane_issue_id: Option<String>,
}

impl SubmitRequest {
    pub fn new(key: TaskKey) -> Self {
        SubmitRequest {
            key,
            pipeline: None,
            title: None,
            description: None,
            plane_issue_id: None,
        }
    }
}

/// Writes a task and its first job, in its own new trace.
pub async fn submit(
    store: &Store,
    config: &Config,
    req: SubmitRequest,
    origin: Origin,
    now: i64,
) -> Result<Submitted, TaskError> {
    let non_empty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let pipeline = non_empty(req.pipeline).unwrap_or_else(|| PIPELINE_DEFAULT.to_string());
    let Some(settings) = config.pipelines.get(&pipeline) else {
        let known: Vec<&str> = config.pipelines.keys().map(String::as_str).collect();
        return Err(TaskError::UnknownPipeline {
            name: pipeline,
            known: known.join(", "),
        });
    };
    let Some(first_stage) = settings.stages.first().cloned() else {
        return Err(TaskError::EmptyPipeline(pipeline));
    };
    let description = non_empty(req.description);
    if let Some(d) = &description
        && d.len() > crate::prompt::DESCRIPTION_MAX
    {
        return Err(TaskError::DescriptionTooLong {
            kib: d.len().div_ceil(1024),
        });
    }
    let title = non_empty(req.title)
        .unwrap_or_else(|| req.key.to_string())
        .chars()
        .take(TITLE_LEN_MAX)
        .collect();
    let new = crate::store::NewTask {
        key: req.key,
        pipeline,
        title,
        description,
        plane_issue_id: non_empty(req.plane_issue_id),
        first_stage,
        trace_parent: crate::telemetry::new_trace_parent(),
    };
    Ok(store.submit(new, origin.into(), now).await?)
}

/// What a cancel did to the task's agents.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "agent", rename_all = "snake_case")]
pub enum AgentStop {
    /// The agent ran on this host and was terminated (TERM, then KILL after a grace).
    Terminated { pid: i32 },
    /// The agent ran on this host and had already ended.
    AlreadyGone { pid: i32 },
    /// The agent runs on another host; its Monitor stops it at its next heartbeat.
    OtherHost { pid: i32, host: Option<String> },
    /// The run had not started its agent yet.
    NotStarted,
}

/// A cancelled task and what happened to each of its live runs.
#[derive(Debug, Clone)]
pub struct Cancelled {
    pub key: TaskKey,
    pub runs: Vec<(i64, AgentStop)>,
}

/// Cancels an active task and stops the agents of its runs that live on `hostname`.
pub async fn cancel(
    store: &Store,
    key: &TaskKey,
    origin: Origin,
    now: i64,
    hostname: &str,
) -> Result<Cancelled, TaskError> {
    let runs = store.cancel(key, origin.into(), now).await?;
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        let stop = match (r.run.pid, r.hostname) {
            // The pid is recorded a moment after the start (or never, when baton died
            // first): the shim's recorded identity names the agent meanwhile.
            (pid, Some(h)) if h == hostname => {
                // Only the run's very agent is stopped, never a process that reuses its pid.
                let log = std::path::Path::new(&r.run.log_path);
                match (crate::agent::live_agent(log, pid), pid) {
                    (Some(live), _) => {
                        let grace = crate::agent::AGENT_KILL_GRACE_DEFAULT;
                        crate::agent::terminate_group(live, grace).await;
                        AgentStop::Terminated { pid: live }
                    }
                    (None, Some(pid)) => AgentStop::AlreadyGone { pid },
                    (None, None) => AgentStop::NotStarted,
                }
            }
            (Some(pid), host) => AgentStop::OtherHost { pid, host },
            (None, _) => AgentStop::NotStarted,
        };
        out.push((r.run.id, stop));
    }
    Ok(Cancelled {
        key: key.clone(),
        runs: out,
    })
}

/// An in-flight task that a config would leave without a way on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub key: String,
    pub reason: String,
}

/// The active tasks whose pipeline, or the stage of a queued or running job, `config`
/// does not have (a pipeline or a stage removed or renamed while they were in flight).
pub async fn orphans(store: &Store, config: &Config) -> Result<Vec<Orphan>, TaskError> {
    let mut out = Vec::new();
    for t in store.active_tasks().await? {
        let Some(pipeline) = config.pipelines.get(&t.task.pipeline) else {
            out.push(Orphan {
                key: t.task.key.clone(),
                reason: format!("its pipeline {} is not in the config", t.task.pipeline),
            });
            continue;
        };
        let live = t
            .jobs
            .iter()
            .filter(|j| matches!(j.status, JobStatus::Queued | JobStatus::Running));
        for j in live {
            let reason = if !config.stages.contains_key(&j.stage) {
                format!("its stage {} is not in the config", j.stage)
            } else if !pipeline.stages.contains(&j.stage) {
                format!(
                    "its stage {} is not in pipeline {}",
                    j.stage, t.task.pipeline
                )
            } else {
                continue;
            };
            out.push(Orphan {
                key: t.task.key.clone(),
                reason,
            });
            break;
        }
    }
    Ok(out)
}

/// Fails the orphans of a config, each with its reason: never done, never silent.
pub async fn fail_orphans(store: &Store, orphans: &[Orphan], now: i64) -> Result<(), TaskError> {
    for o in orphans {
        let key = TaskKey::parse(o.key.as_str())
            .map_err(|e| TaskError::Store(StoreError::NoSuchTask(format!("{} ({e})", o.key))))?;
        let reason = format!("orphaned by a config change: {}", o.reason);
        store
            .fail_task(&key, &reason, EventSource::Cli, now)
            .await?;
    }
    Ok(())
}

/// Which failed effects an operator retries.
#[derive(Debug, Clone)]
pub enum EffectsToRetry {
    One(i64),
    OfTask(TaskKey),
}

/// Makes failed effects pending again (an operator fixed the cause: a token, a branch
/// protection); the EffectWorker performs them anew. Returns them.
pub async fn retry_effects(
    store: &Store,
    which: EffectsToRetry,
    origin: Origin,
    now: i64,
) -> Result<Vec<entity::effects::Model>, TaskError> {
    let selector = match which {
        EffectsToRetry::One(id) => EffectSelector::One(id),
        EffectsToRetry::OfTask(key) => EffectSelector::OfTask(store.task_by_key(&key).await?.id),
    };
    Ok(store.retry_effects(selector, origin.into(), now).await?)
}

/// Re-queues a failed or cancelled task at the stage where it stopped (or delivers its
/// work again, when only its delivery failed).
pub async fn retry(
    store: &Store,
    key: &TaskKey,
    origin: Origin,
    now: i64,
) -> Result<crate::store::Retried, TaskError> {
    Ok(store.retry(key, origin.into(), now).await?)
}

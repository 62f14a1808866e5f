//! What a Monitor does before its agent starts: the task's worktree (fetched, moved to
//! the work of earlier stages, set up by the repository's hooks), its description and
//! the stage's rendered prompt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::super::Ctx;
use crate::prompt::{PromptTask, PromptVars};
use crate::store::{Dispatched, KnownLastCommit};
use crate::workspace;

/// Appends a line of baton's own to a run's log.
pub(super) fn log_line(log: &str, text: &str) {
    use std::io::Write;
    let log = Path::new(log);
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "baton: {text}");
    }
}

/// The task's worktree, ready for this run: fetched, on the task's branch at the work of
/// its earlier stages (the remote's, or the task's last recorded commit), set up by
/// `repo.setup` when new and by `repo.before_stage`.
pub(super) async fn workspace(
    ctx: &Ctx,
    d: &Dispatched,
    log: &Path,
) -> Result<workspace::Prepared, String> {
    // A stage handed off after one of this host's own needs no read of the task's last
    // commit: the claim knew it, or the branch here holds it (unless the branch is gone
    // from this host).
    let here = match &d.last_commit {
        KnownLastCommit::Commit(sha) => {
            Some(prepare_branch(ctx, d, Start::HereAt(sha.clone())).await?)
        }
        KnownLastCommit::OnBranch => match prepare_branch(ctx, d, Start::OnBranch).await? {
            Err(workspace::WorkspaceError::BranchNotHere(_)) => None,
            done => Some(done),
        },
        KnownLastCommit::Unknown => None,
    };
    let prepared = match here {
        Some(done) => done,
        None => {
            let recorded = ctx
                .store
                .last_commit(d.task.id)
                .await
                .map_err(|e| format!("cannot read the task's last commit: {e}"))?;
            let queued = queued_at(&d.job, ctx.now());
            prepare_branch(ctx, d, Start::Recorded(recorded, queued)).await?
        }
    }
    .map_err(|e| format!("workspace: {e}"))?;
    if let Some(tip) = &prepared.fast_forwarded {
        log_line(
            &log.to_string_lossy(),
            &format!("the task's branch moved to {tip}, the work of its earlier stages"),
        );
    }
    let repo = &ctx.config.repo;
    let hooks = [
        ("setup", &repo.setup, prepared.created),
        ("before_stage", &repo.before_stage, true),
    ];
    let env = hook_env(d, &prepared.path);
    let hidden = ctx.config.hidden_vars();
    let timeout = ctx
        .config
        .stages
        .get(&d.job.stage)
        .map_or(repo.network_timeout, |s| s.timeout);
    for (name, argv, due) in hooks {
        if due && !argv.is_empty() {
            let name = format!("hook {name}");
            workspace::run_hook(&name, argv, &prepared.path, log, &env, &hidden, timeout).await?;
        }
    }
    Ok(prepared)
}

/// The task's last commit a preparation moves the branch to: [`workspace::LastCommit`],
/// owned, for the blocking thread.
enum Start {
    /// The task's recorded last commit, for a job queued at the instant.
    Recorded(Option<String>, Instant),
    OnBranch,
    HereAt(String),
}

impl Start {
    fn last(&self) -> workspace::LastCommit<'_> {
        match self {
            Start::Recorded(commit, queued) => {
                workspace::LastCommit::Recorded(commit.as_deref(), *queued)
            }
            Start::OnBranch => workspace::LastCommit::OnBranch,
            Start::HereAt(sha) => workspace::LastCommit::HereAt(sha),
        }
    }
}

/// When `job` was queued, or due again for a retry, as an instant of this process, `now`
/// being the time in milliseconds: now, when that was before the process could tell
/// (its clock's start) or is later than `now` (a clock ahead of this host's).
fn queued_at(job: &entity::jobs::Model, now: i64) -> Instant {
    let queued = job.created_at.max(job.not_before);
    let ago = Duration::from_millis(now.saturating_sub(queued).max(0) as u64);
    let now = Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

/// [`workspace::prepare`] for `d`'s task, on a blocking thread, from `start`.
async fn prepare_branch(
    ctx: &Ctx,
    d: &Dispatched,
    start: Start,
) -> Result<Result<workspace::Prepared, workspace::WorkspaceError>, String> {
    let config = ctx.config.clone();
    let access = config.repo_access(&ctx.secrets);
    let branch = ctx.policy.branch(&d.task.key);
    let key = d.task.key.clone();
    tokio::task::spawn_blocking(move || {
        let path = workspace::path_for(&config.workspace_root, &key)?;
        workspace::prepare(
            &config.workspace_root,
            &path,
            &access,
            &key,
            &branch,
            &config.repo.base_branch,
            start.last(),
        )
    })
    .await
    .map_err(|e| format!("workspace preparation panicked: {e}"))
}

/// The environment of a hook: the run's, as its agent gets it.
fn hook_env(d: &Dispatched, ws: &Path) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("BATON_TASK".to_string(), d.task.key.clone()),
        ("BATON_STAGE".to_string(), d.job.stage.clone()),
        ("BATON_RUN_ID".to_string(), d.run.id.to_string()),
        ("BATON_ATTEMPT".to_string(), d.job.attempt.to_string()),
        ("BATON_ITERATION".to_string(), d.job.iteration.to_string()),
        (
            "BATON_WORKSPACE".to_string(),
            ws.to_string_lossy().into_owned(),
        ),
    ])
}

/// The task's description; when it has none but a Plane work item, the work item's, asked
/// of Plane and kept on the task. A Plane that does not answer leaves it empty.
pub(super) async fn description(ctx: &Ctx, task: &entity::tasks::Model) -> String {
    if let Some(text) = &task.description {
        return text.clone();
    }
    let (Some(issue), Some(_)) = (&task.plane_issue_id, &ctx.config.plane) else {
        return String::new();
    };
    match ctx.effector.plane_work_item_description(issue).await {
        Ok(text) => {
            if let Err(e) = ctx.store.set_description(task.id, &text, ctx.now()).await {
                tracing::warn!(error = %e, task = %task.key, "cannot keep the work item's description");
            }
            text
        }
        Err(e) => {
            tracing::warn!(error = %e, task = %task.key, "cannot read the work item's description from Plane");
            String::new()
        }
    }
}

/// Renders the stage's prompt for this run and writes it beside the run's log.
pub(super) async fn render_prompt(
    ctx: &Ctx,
    d: &Dispatched,
    template: &str,
    ws: &std::path::Path,
    log: &std::path::Path,
) -> Result<(String, PathBuf), String> {
    let plane = ctx.config.plane.as_ref();
    let vars = PromptVars {
        task: PromptTask {
            key: d.task.key.clone(),
            title: d.task.title.clone(),
            description: description(ctx, &d.task).await,
            url: match (plane, &d.task.plane_issue_id) {
                (Some(p), Some(issue)) => p.work_item_url(issue),
                _ => String::new(),
            },
        },
        stage: d.job.stage.clone(),
        iteration: d.job.iteration,
        attempt: d.job.attempt,
        run_id: d.run.id,
        branch: ctx.policy.branch(&d.task.key),
        workspace: ws.to_string_lossy().into_owned(),
        feedback: d.job.feedback.clone().unwrap_or_default(),
    };
    let text = crate::prompt::render(template, &vars)
        .map_err(|e| format!("stage {}'s prompt: {e}", d.job.stage))?;
    let path = crate::prompt::write_beside(log, &text)
        .map_err(|e| format!("cannot write the prompt beside {}: {e}", log.display()))?;
    Ok((text, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::JobStatus;

    /// A job queued at `created_at`, due at `not_before`.
    fn job(created_at: i64, not_before: i64) -> entity::jobs::Model {
        entity::jobs::Model {
            id: 1,
            task_id: 1,
            stage: "dev".into(),
            iteration: 1,
            status: JobStatus::Running,
            attempt: 1,
            current_run_id: Some(1),
            not_before,
            feedback: None,
            recovery: false,
            created_at,
            updated_at: created_at,
        }
    }

    /// `queued_at` of `job` at time `now`, checked to be `ago` before the instant of the
    /// call.
    fn ago(job: &entity::jobs::Model, now: i64, ago: Duration) {
        let before = Instant::now();
        let at = queued_at(job, now);
        let after = Instant::now();
        assert!(at >= before - ago && at <= after - ago, "not {ago:?} ago");
    }

    #[test]
    fn a_job_is_queued_when_it_was_created_or_when_its_retry_became_due() {
        let now = 1_000_000;
        ago(&job(now - 500, now - 500), now, Duration::from_millis(500));
        // A retry: due again after its backoff, long after the job was created.
        ago(
            &job(now - 60_000, now - 200),
            now,
            Duration::from_millis(200),
        );
        // Written by a clock ahead of this host's: now.
        ago(&job(now + 5_000, now + 5_000), now, Duration::ZERO);
    }
}

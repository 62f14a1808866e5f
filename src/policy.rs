//! The transition policy: given a job, the verdict on its run and the pipeline, which
//! transition the claim makes and which effects it writes to the outbox. A pure function
//! of its inputs, with no database and no clock of its own; the store applies the
//! decision, fenced, in one transaction (`store/claim.rs`).

use std::collections::HashMap;

use entity::{effects, jobs, tasks};

use crate::model::{
    Backoff, EffectKind, EffectPayload, EffectStatus, JobStatus, PlaneCommentPayload,
    PlaneStatePayload, PullRequestPayload, PushPayload, TaskStatus, Verdict,
};

/// A pipeline as the policy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineDef {
    pub stages: Vec<String>,
    /// Bound on how often a reject loop may enter one stage.
    pub max_iterations: i32,
}

/// The Plane states a task's work item moves to, by name (`None`: not moved).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaneStateNames {
    pub on_start: Option<String>,
    pub on_done: Option<String>,
    pub on_failed: Option<String>,
}

/// What the claim needs of the configuration to choose a transition. Built once per
/// node from the config (`Config::policy`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub pipelines: HashMap<String, PipelineDef>,
    /// Stage -> the stage its rejection loops back to.
    pub on_reject: HashMap<String, String>,
    /// Attempts of one job, the first included.
    pub max_attempts: u32,
    pub retry_backoff: Backoff,
    pub push: bool,
    pub pull_request_after: Option<String>,
    /// Comment on the work item after every stage (only with Plane configured).
    pub plane_comment: bool,
    /// Empty without Plane.
    pub plane_states: PlaneStateNames,
    pub branch_prefix: String,
    pub base_branch: String,
    /// Stage -> how many of its agents may run at once across the database
    /// (`stages.X.max_concurrent`); dispatch skips a stage at its bound.
    pub stage_limits: HashMap<String, u32>,
}

/// Everything one decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct ClaimInput<'a> {
    pub task: &'a tasks::Model,
    pub job: &'a jobs::Model,
    pub run_id: i64,
    pub verdict: &'a Verdict,
    pub commit_sha: Option<&'a str>,
    /// What the sender read for the next job: the verdict's text on a rejection, the
    /// failure and the end of the log on a failed attempt.
    pub feedback: Option<&'a str>,
    /// How far each stage of the task has got.
    pub iterations: &'a Iterations,
    pub now: i64,
}

/// How often each stage of a task has been entered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Iterations {
    /// The highest iteration of each stage so far (the next job's number follows it).
    pub highest: HashMap<String, i32>,
    /// Of those, the jobs that redid a stage whose work was lost with its host: they do
    /// not count against `max_iterations`.
    pub recoveries: HashMap<String, i32>,
}

impl Iterations {
    /// From `(stage, highest iteration)` pairs, without recoveries.
    pub fn of(highest: &[(&str, i32)]) -> Iterations {
        Iterations {
            highest: highest.iter().map(|(s, i)| (s.to_string(), *i)).collect(),
            recoveries: HashMap::new(),
        }
    }

    /// Of a task's jobs.
    pub fn of_jobs<'a>(jobs: impl IntoIterator<Item = &'a jobs::Model>) -> Iterations {
        let mut out = Iterations::default();
        for job in jobs {
            out.add(job);
        }
        out
    }

    /// Counts one job.
    pub fn add(&mut self, job: &jobs::Model) {
        let e = self.highest.entry(job.stage.clone()).or_insert(0);
        *e = (*e).max(job.iteration);
        if job.recovery {
            *self.recoveries.entry(job.stage.clone()).or_insert(0) += 1;
        }
    }

    /// The iteration number of the stage's next job.
    pub fn next(&self, stage: &str) -> i32 {
        self.highest.get(stage).copied().unwrap_or(0) + 1
    }

    /// How many of the stage's iterations up to `iteration` count against its bound.
    pub fn counted(&self, stage: &str, iteration: i32) -> i32 {
        iteration - self.recoveries.get(stage).copied().unwrap_or(0)
    }
}

/// What happens to the claimed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobChange {
    Done,
    Failed,
    /// Back to `queued` as attempt `attempt`, not before `not_before`.
    Retry {
        attempt: i32,
        not_before: i64,
    },
}

impl JobChange {
    pub fn status(self) -> JobStatus {
        match self {
            JobChange::Done => JobStatus::Done,
            JobChange::Failed => JobStatus::Failed,
            JobChange::Retry { .. } => JobStatus::Queued,
        }
    }
}

/// The job a transition queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextJob {
    pub stage: String,
    pub iteration: i32,
}

/// The end of the task, when the transition ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnd {
    pub status: TaskStatus,
    /// Empty when the task is done.
    pub reason: String,
}

/// An effect to write to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEffect {
    /// Unique; the remote recognises a repeated delivery by it.
    pub idempotency_key: String,
    pub payload: EffectPayload,
    /// Only the host that ran the stage can perform it (a push needs the workspace).
    pub on_run_host: bool,
}

/// The whole decision of one claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub job: JobChange,
    pub next: Option<NextJob>,
    /// What the job that runs next starts with: the queued job after a rejection, the
    /// claimed job itself on a retry; `None` after a pass.
    pub feedback: Option<String>,
    pub task_end: Option<TaskEnd>,
    pub effects: Vec<PlannedEffect>,
}

impl Policy {
    /// The git branch of a task.
    pub fn branch(&self, task_key: &str) -> String {
        format!("{}{task_key}", self.branch_prefix)
    }

    /// The effect written when a task's job starts: its work item moves to
    /// `plane.states.on_start`.
    pub fn start_effect(&self, task: &tasks::Model) -> Option<PlannedEffect> {
        let (state, issue) = (
            self.plane_states.on_start.as_ref()?,
            task.plane_issue_id.as_ref()?,
        );
        Some(PlannedEffect {
            idempotency_key: format!("plane_state:{}:on_start", task.key),
            payload: EffectPayload::PlaneState(PlaneStatePayload {
                issue: issue.clone(),
                state: state.clone(),
            }),
            on_run_host: false,
        })
    }

    /// Decides the transition of a claim that wins.
    pub fn decide(&self, input: ClaimInput<'_>) -> Transition {
        let (job, next, task_end) = self.choose(&input);
        let effects = self.effects(&input, next.as_ref(), task_end.as_ref());
        let feedback = match (input.verdict, job) {
            (Verdict::Rejected, _) if next.is_some() => input.feedback.map(str::to_string),
            // A retry keeps what the job started with (a reviewer's words) after the
            // failure it is told about.
            (_, JobChange::Retry { .. }) => match (input.feedback, &input.job.feedback) {
                (Some(failure), Some(before)) => Some(crate::prompt::bounded(
                    &format!("{failure}\nBefore that:\n{before}"),
                    crate::prompt::FEEDBACK_MAX,
                )),
                (Some(failure), None) => Some(failure.to_string()),
                (None, before) => before.clone(),
            },
            _ => None,
        };
        Transition {
            job,
            next,
            feedback,
            task_end,
            effects,
        }
    }

    fn choose(&self, input: &ClaimInput<'_>) -> (JobChange, Option<NextJob>, Option<TaskEnd>) {
        let job = input.job;
        let next_iteration = |stage: &str| input.iterations.next(stage);
        let failed = |reason: String| {
            (
                JobChange::Failed,
                None,
                Some(TaskEnd {
                    status: TaskStatus::Failed,
                    reason,
                }),
            )
        };
        let done = (
            JobChange::Done,
            None,
            Some(TaskEnd {
                status: TaskStatus::Done,
                reason: String::new(),
            }),
        );
        match input.verdict {
            Verdict::Passed => {
                // A config that lost the pipeline or the stage never ends a task `done`:
                // what comes next is unknown, so the task fails, saying why.
                let Some(pipeline) = self.pipelines.get(&input.task.pipeline) else {
                    return failed(format!(
                        "pipeline {} is not in the config any more",
                        input.task.pipeline
                    ));
                };
                let stages = &pipeline.stages;
                match stages.iter().position(|s| *s == job.stage) {
                    Some(i) if i + 1 < stages.len() => {
                        let stage = stages[i + 1].clone();
                        let iteration = next_iteration(&stage);
                        (JobChange::Done, Some(NextJob { stage, iteration }), None)
                    }
                    Some(_) => done,
                    None => failed(format!(
                        "stage {} is not in pipeline {} any more",
                        job.stage, input.task.pipeline
                    )),
                }
            }
            Verdict::Rejected => {
                let max_iterations = self
                    .pipelines
                    .get(&input.task.pipeline)
                    .map_or(1, |p| p.max_iterations);
                match self.on_reject.get(&job.stage) {
                    None => failed(format!("stage {} rejected and has no on_reject", job.stage)),
                    Some(stage) => {
                        let iteration = next_iteration(stage);
                        let counted = input.iterations.counted(stage, iteration);
                        if counted > max_iterations {
                            failed(format!(
                                "stage {stage} would run a {counted}th time; max_iterations is {max_iterations}"
                            ))
                        } else {
                            let next = NextJob {
                                stage: stage.clone(),
                                iteration,
                            };
                            (JobChange::Done, Some(next), None)
                        }
                    }
                }
            }
            Verdict::Failed { .. } | Verdict::Lost { .. } | Verdict::TimedOut => {
                let attempt = job.attempt.max(1) as u32;
                if attempt < self.max_attempts {
                    let wait = self.retry_backoff.after_attempt(attempt);
                    let retry = JobChange::Retry {
                        attempt: job.attempt + 1,
                        not_before: input.now + crate::clock::ms(wait),
                    };
                    (retry, None, None)
                } else {
                    let why = match input.verdict {
                        Verdict::Failed { reason } | Verdict::Lost { reason } => {
                            format!("failed: {reason}")
                        }
                        _ => "timed out".to_string(),
                    };
                    failed(format!(
                        "attempt {} of {} {why}",
                        job.attempt, self.max_attempts
                    ))
                }
            }
        }
    }

    /// The outbox rows of a decision, in the order they are to be performed.
    fn effects(
        &self,
        input: &ClaimInput<'_>,
        next: Option<&NextJob>,
        task_end: Option<&TaskEnd>,
    ) -> Vec<PlannedEffect> {
        let (task, job, run_id) = (input.task, input.job, input.run_id);
        let branch = self.branch(&task.key);
        let mut out = Vec::new();
        if self.push
            && let Some(sha) = input.commit_sha
        {
            out.push(PlannedEffect {
                idempotency_key: format!("push:{run_id}"),
                payload: EffectPayload::Push(PushPayload {
                    branch: branch.clone(),
                    commit: sha.to_string(),
                }),
                on_run_host: true,
            });
        }
        if *input.verdict == Verdict::Passed
            && self.pull_request_after.as_deref() == Some(job.stage.as_str())
        {
            out.push(PlannedEffect {
                idempotency_key: format!("pull_request:{}", task.key),
                payload: EffectPayload::PullRequest(PullRequestPayload {
                    branch,
                    base: self.base_branch.clone(),
                    title: format!("{}: {}", task.key, task.title),
                }),
                on_run_host: false,
            });
        }
        let Some(issue) = &task.plane_issue_id else {
            return out;
        };
        if self.plane_comment {
            out.push(PlannedEffect {
                idempotency_key: format!("plane_comment:{run_id}"),
                payload: EffectPayload::PlaneComment(PlaneCommentPayload {
                    issue: issue.clone(),
                    task: task.key.clone(),
                    stage: job.stage.clone(),
                    verdict: input.verdict.outcome(),
                    run_id,
                    attempt: job.attempt,
                    commit: input.commit_sha.map(str::to_string),
                    next_stage: next.map(|n| n.stage.clone()),
                }),
                on_run_host: false,
            });
        }
        let state = match task_end.map(|e| e.status) {
            Some(TaskStatus::Done) => self.plane_states.on_done.clone(),
            Some(_) => self.plane_states.on_failed.clone(),
            None => None,
        };
        if let Some(state) = state {
            out.push(PlannedEffect {
                idempotency_key: format!("plane_state:{run_id}:{state}"),
                payload: EffectPayload::PlaneState(PlaneStatePayload {
                    issue: issue.clone(),
                    state,
                }),
                on_run_host: false,
            });
        }
        out
    }
}

/// What recovery looks at: a task whose runs' pushes wait for `dead_host`, which died.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryInput<'a> {
    pub task: &'a tasks::Model,
    /// Every job of the task.
    pub jobs: &'a [jobs::Model],
    /// Every push effect of the task with the job of its run.
    pub pushes: &'a [(effects::Model, i64)],
    pub dead_host: &'a str,
    pub iterations: &'a Iterations,
}

/// The decision of a recovery: which pushes are closed, which queued jobs cancelled,
/// and which stage is done again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The pending pushes closed (`cancelled`): the dead host's, and every later one of
    /// the task (their commits build on the lost ones).
    pub close_effects: Vec<i64>,
    /// Queued jobs of the task that would build on the lost work.
    pub cancel_jobs: Vec<i64>,
    /// The stage done again, as a recovery job; `None` when the task is not active.
    pub redo: Option<NextJob>,
    /// What the redone stage starts with: what the lost job started with.
    pub feedback: Option<String>,
    /// The stage whose work was lost first.
    pub lost_stage: String,
    pub reason: String,
}

impl Policy {
    /// Decides what becomes of a task whose pushes wait for a host that died: the work
    /// of its earliest unpushed stage and of every stage after it exists nowhere else,
    /// so the task goes back to that stage. `None` when nothing waits for the dead host,
    /// or while a job of the task still runs (the Reaper ends that run first).
    pub fn recover(&self, input: RecoveryInput<'_>) -> Option<Recovery> {
        let pending =
            |e: &effects::Model| e.kind == EffectKind::Push && e.status == EffectStatus::Pending;
        let (first, first_job) = input
            .pushes
            .iter()
            .filter(|(e, _)| pending(e) && e.host.as_deref() == Some(input.dead_host))
            .min_by_key(|(e, _)| e.id)?;
        if input.jobs.iter().any(|j| j.status == JobStatus::Running) {
            return None;
        }
        let lost = input.jobs.iter().find(|j| j.id == *first_job)?;
        let close_effects = input
            .pushes
            .iter()
            .filter(|(e, _)| {
                pending(e) && (e.host.as_deref() == Some(input.dead_host) || e.id >= first.id)
            })
            .map(|(e, _)| e.id)
            .collect();
        let active = input.task.status == TaskStatus::Active;
        let cancel_jobs = input
            .jobs
            .iter()
            .filter(|j| active && j.status == JobStatus::Queued)
            .map(|j| j.id)
            .collect();
        let redo = active.then(|| NextJob {
            stage: lost.stage.clone(),
            iteration: input.iterations.next(&lost.stage),
        });
        Some(Recovery {
            close_effects,
            cancel_jobs,
            redo,
            feedback: lost.feedback.clone(),
            lost_stage: lost.stage.clone(),
            reason: format!(
                "host {} died before pushing the work of stage {} (commit {}); it exists nowhere else",
                input.dead_host,
                lost.stage,
                EffectPayload::from_row(first.kind, &first.payload)
                    .ok()
                    .and_then(|p| match p {
                        EffectPayload::Push(p) => Some(p.commit),
                        _ => None,
                    })
                    .unwrap_or_else(|| "unknown".to_string()),
            ),
        })
    }

    /// The effects written when a task's delivery (a push or its pull request) failed
    /// for good and the task failed with it: its work item moves to `on_failed`.
    pub fn delivery_failed_effects(&self, task: &tasks::Model) -> Vec<PlannedEffect> {
        let (Some(state), Some(issue)) = (&self.plane_states.on_failed, &task.plane_issue_id)
        else {
            return Vec::new();
        };
        vec![PlannedEffect {
            idempotency_key: format!(
                "plane_state:{}:delivery_failed:{}",
                task.key, task.updated_at
            ),
            payload: EffectPayload::PlaneState(PlaneStatePayload {
                issue: issue.clone(),
                state: state.clone(),
            }),
            on_run_host: false,
        }]
    }
}

#[cfg(test)]
mod tests;

//! The transition policy: given a job, the verdict on its run and the pipeline, which
//! transition the claim makes and which effects it writes to the outbox. A pure function
//! of its inputs, with no database and no clock of its own; the store applies the
//! decision, fenced, in one transaction (`store/claim.rs`).

use std::collections::HashMap;

use entity::{jobs, tasks};

use crate::model::{
    Backoff, EffectPayload, JobStatus, PlaneCommentPayload, PlaneStatePayload, PullRequestPayload,
    PushPayload, TaskStatus, Verdict,
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
    /// The highest iteration each stage of the task has reached so far.
    pub iterations: &'a HashMap<String, i32>,
    pub now: i64,
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
        let next_iteration = |stage: &str| input.iterations.get(stage).copied().unwrap_or(0) + 1;
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
                        if iteration > max_iterations {
                            failed(format!(
                                "stage {stage} would run a {iteration}th time; max_iterations is {max_iterations}"
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{EffectKind, RunOutcome};

    fn policy() -> Policy {
        Policy {
            pipelines: HashMap::from([(
                "default".to_string(),
                PipelineDef {
                    stages: vec!["analyst".into(), "developer".into(), "reviewer".into()],
                    max_iterations: 2,
                },
            )]),
            on_reject: HashMap::from([("reviewer".to_string(), "developer".to_string())]),
            max_attempts: 3,
            retry_backoff: Backoff {
                initial: Duration::from_secs(10),
                max: Duration::from_secs(300),
            },
            push: true,
            pull_request_after: Some("developer".into()),
            plane_comment: true,
            plane_states: PlaneStateNames {
                on_start: Some("In Progress".into()),
                on_done: Some("Done".into()),
                on_failed: Some("Blocked".into()),
            },
            branch_prefix: "baton/".into(),
            base_branch: "main".into(),
        }
    }

    fn task(plane: bool) -> tasks::Model {
        tasks::Model {
            id: 1,
            key: "APP-1".into(),
            pipeline: "default".into(),
            title: "Fix it".into(),
            description: None,
            plane_issue_id: plane.then(|| "issue-uuid".to_string()),
            status: TaskStatus::Active,
            trace_parent: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn job(stage: &str, attempt: i32) -> jobs::Model {
        jobs::Model {
            id: 7,
            task_id: 1,
            stage: stage.into(),
            iteration: 1,
            status: JobStatus::Running,
            attempt,
            current_run_id: Some(70),
            not_before: 0,
            feedback: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn decide(
        p: &Policy,
        t: &tasks::Model,
        j: &jobs::Model,
        v: Verdict,
        its: &[(&str, i32)],
    ) -> Transition {
        let iterations: HashMap<String, i32> =
            its.iter().map(|(s, i)| (s.to_string(), *i)).collect();
        p.decide(ClaimInput {
            task: t,
            job: j,
            run_id: 70,
            verdict: &v,
            commit_sha: Some("abc123"),
            feedback: Some("the reviewer's words"),
            iterations: &iterations,
            now: 1_000,
        })
    }

    fn kinds(t: &Transition) -> Vec<EffectKind> {
        t.effects.iter().map(|e| e.payload.kind()).collect()
    }

    #[test]
    fn a_pass_queues_the_next_stage() {
        let p = policy();
        let t = decide(
            &p,
            &task(false),
            &job("analyst", 1),
            Verdict::Passed,
            &[("analyst", 1)],
        );
        assert_eq!(t.job, JobChange::Done);
        assert_eq!(
            t.next,
            Some(NextJob {
                stage: "developer".into(),
                iteration: 1
            })
        );
        assert_eq!(t.task_end, None);
        assert_eq!(kinds(&t), [EffectKind::Push]);
        assert!(t.effects[0].on_run_host);
        assert_eq!(t.feedback, None, "a pass hands no feedback on");
    }

    #[test]
    fn a_pass_of_the_pull_request_stage_opens_it_and_comments() {
        let p = policy();
        let t = decide(&p, &task(true), &job("developer", 1), Verdict::Passed, &[]);
        assert_eq!(
            kinds(&t),
            [
                EffectKind::Push,
                EffectKind::PullRequest,
                EffectKind::PlaneComment
            ]
        );
        let EffectPayload::PlaneComment(c) = &t.effects[2].payload else {
            panic!("not a comment")
        };
        assert_eq!(c.next_stage.as_deref(), Some("reviewer"));
        assert_eq!(c.verdict, RunOutcome::Passed);
        assert_eq!(t.effects[1].idempotency_key, "pull_request:APP-1");
    }

    #[test]
    fn the_last_stage_ends_the_task_done() {
        let p = policy();
        let t = decide(&p, &task(true), &job("reviewer", 1), Verdict::Passed, &[]);
        assert_eq!(t.job, JobChange::Done);
        assert_eq!(t.next, None);
        assert_eq!(
            t.task_end.as_ref().map(|e| e.status),
            Some(TaskStatus::Done)
        );
        assert_eq!(
            kinds(&t),
            [
                EffectKind::Push,
                EffectKind::PlaneComment,
                EffectKind::PlaneState
            ]
        );
        let EffectPayload::PlaneState(s) = &t.effects[2].payload else {
            panic!("not a state")
        };
        assert_eq!(s.state, "Done");
    }

    #[test]
    fn a_pass_never_ends_a_task_done_when_the_config_lost_its_place() {
        let mut p = policy();
        let t = decide(&p, &task(false), &job("architect", 1), Verdict::Passed, &[]);
        assert_eq!(t.job, JobChange::Failed);
        let end = t.task_end.unwrap();
        assert_eq!(end.status, TaskStatus::Failed);
        assert!(
            end.reason
                .contains("stage architect is not in pipeline default"),
            "{}",
            end.reason
        );
        p.pipelines.clear();
        let t = decide(&p, &task(false), &job("reviewer", 1), Verdict::Passed, &[]);
        assert_eq!(t.task_end.unwrap().status, TaskStatus::Failed);
    }

    #[test]
    fn a_reject_loops_back_within_max_iterations() {
        let p = policy();
        let t = decide(
            &p,
            &task(false),
            &job("reviewer", 1),
            Verdict::Rejected,
            &[("developer", 1)],
        );
        assert_eq!(t.job, JobChange::Done);
        assert_eq!(
            t.next,
            Some(NextJob {
                stage: "developer".into(),
                iteration: 2
            })
        );
        // No pull request on a rejection, whatever the stage.
        assert_eq!(kinds(&t), [EffectKind::Push]);
        // The developer's next iteration starts with what the reviewer wrote.
        assert_eq!(t.feedback.as_deref(), Some("the reviewer's words"));
    }

    #[test]
    fn a_reject_past_max_iterations_fails_the_task() {
        let p = policy();
        let t = decide(
            &p,
            &task(true),
            &job("reviewer", 1),
            Verdict::Rejected,
            &[("developer", 2)],
        );
        assert_eq!(t.job, JobChange::Failed);
        assert_eq!(t.next, None);
        let end = t.task_end.unwrap();
        assert_eq!(end.status, TaskStatus::Failed);
        assert!(end.reason.contains("max_iterations is 2"), "{}", end.reason);
        assert!(
            t.effects.iter().any(
                |e| matches!(&e.payload, EffectPayload::PlaneState(s) if s.state == "Blocked")
            )
        );
    }

    #[test]
    fn a_reject_without_on_reject_fails_the_task() {
        let p = policy();
        let t = decide(
            &p,
            &task(false),
            &job("developer", 1),
            Verdict::Rejected,
            &[],
        );
        assert_eq!(t.job, JobChange::Failed);
        assert!(t.task_end.unwrap().reason.contains("has no on_reject"));
    }

    #[test]
    fn a_failure_with_attempts_left_is_retried_after_backoff() {
        let p = policy();
        for (attempt, wait_ms) in [(1, 10_000), (2, 20_000)] {
            let v = Verdict::Failed {
                reason: "gate".into(),
            };
            let t = decide(&p, &task(true), &job("developer", attempt), v, &[]);
            assert_eq!(
                t.job,
                JobChange::Retry {
                    attempt: attempt + 1,
                    not_before: 1_000 + wait_ms
                }
            );
            assert_eq!(t.next, None);
            assert_eq!(t.task_end, None);
            assert_eq!(t.feedback.as_deref(), Some("the reviewer's words"));
            assert_eq!(kinds(&t), [EffectKind::Push, EffectKind::PlaneComment]);
        }
    }

    #[test]
    fn a_retry_keeps_the_feedback_its_job_started_with() {
        let p = policy();
        let mut j = job("developer", 1);
        j.feedback = Some("CHANGES_REQUESTED: add tests".into());
        let v = Verdict::Failed {
            reason: "gate".into(),
        };
        let t = decide(&p, &task(false), &j, v, &[]);
        assert_eq!(
            t.feedback.as_deref(),
            Some("the reviewer's words\nBefore that:\nCHANGES_REQUESTED: add tests")
        );
    }

    #[test]
    fn exhausted_attempts_fail_the_task_with_the_reason() {
        let p = policy();
        for (v, why) in [
            (
                Verdict::Lost {
                    reason: "pid gone".into(),
                },
                "failed: pid gone",
            ),
            (Verdict::TimedOut, "timed out"),
        ] {
            let t = decide(&p, &task(false), &job("developer", 3), v, &[]);
            assert_eq!(t.job, JobChange::Failed);
            let end = t.task_end.unwrap();
            assert_eq!(end.status, TaskStatus::Failed);
            assert_eq!(end.reason, format!("attempt 3 of 3 {why}"));
            assert_eq!(t.feedback, None, "no job runs next");
        }
    }

    #[test]
    fn no_push_without_a_commit_or_with_pushing_off() {
        let mut p = policy();
        let (t, j) = (task(false), job("analyst", 1));
        let none = HashMap::new();
        let input = ClaimInput {
            task: &t,
            job: &j,
            run_id: 70,
            verdict: &Verdict::Passed,
            commit_sha: None,
            feedback: None,
            iterations: &none,
            now: 0,
        };
        assert!(p.decide(input).effects.is_empty());
        p.push = false;
        assert!(decide(&p, &t, &j, Verdict::Passed, &[]).effects.is_empty());
    }

    #[test]
    fn the_start_effect_needs_a_work_item_and_a_state() {
        let mut p = policy();
        assert_eq!(p.start_effect(&task(false)), None);
        let e = p.start_effect(&task(true)).unwrap();
        assert_eq!(e.idempotency_key, "plane_state:APP-1:on_start");
        p.plane_states.on_start = None;
        assert_eq!(p.start_effect(&task(true)), None);
    }
}

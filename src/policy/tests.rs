//! The transition policy, decision by decision.

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
        stage_limits: HashMap::new(),
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
        history_pruned_at: None,
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
        recovery: false,
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
    let iterations = Iterations::of(its);
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
        t.effects
            .iter()
            .any(|e| matches!(&e.payload, EffectPayload::PlaneState(s) if s.state == "Blocked"))
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
    let none = Iterations::default();
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

#[test]
fn a_recovery_job_does_not_count_against_max_iterations() {
    let p = policy();
    // developer ran twice, once of them to redo work lost with its host.
    let mut its = Iterations::of(&[("developer", 2)]);
    its.recoveries.insert("developer".into(), 1);
    let input = ClaimInput {
        task: &task(false),
        job: &job("reviewer", 1),
        run_id: 70,
        verdict: &Verdict::Rejected,
        commit_sha: None,
        feedback: None,
        iterations: &its,
        now: 0,
    };
    let t = p.decide(input);
    assert_eq!(
        t.next,
        Some(NextJob {
            stage: "developer".into(),
            iteration: 3
        })
    );
    // Without the recovery the same loop is past the bound.
    let t = decide(
        &p,
        &task(false),
        &job("reviewer", 1),
        Verdict::Rejected,
        &[("developer", 2)],
    );
    assert_eq!(t.job, JobChange::Failed);
}

fn push(id: i64, host: &str, status: EffectStatus, job_id: i64) -> (effects::Model, i64) {
    let payload = EffectPayload::Push(PushPayload {
        branch: "baton/APP-1".into(),
        commit: format!("c{id}"),
    });
    let e = effects::Model {
        id,
        task_id: 1,
        run_id: id * 10,
        kind: EffectKind::Push,
        idempotency_key: format!("push:{}", id * 10),
        status,
        attempts: 0,
        next_attempt_at: 0,
        last_error: None,
        external_ref: None,
        payload: payload.to_json(),
        created_at: 0,
        updated_at: 0,
        host: Some(host.into()),
        leased_by: None,
    };
    (e, job_id)
}

fn job_at(id: i64, stage: &str, status: JobStatus) -> jobs::Model {
    jobs::Model {
        id,
        stage: stage.into(),
        status,
        feedback: Some(format!("feedback of {stage}")),
        ..job(stage, 1)
    }
}

#[test]
fn recovery_goes_back_to_the_earliest_stage_whose_push_waits_for_the_dead_host() {
    let p = policy();
    let jobs = [
        job_at(1, "analyst", JobStatus::Done),
        job_at(2, "developer", JobStatus::Done),
        job_at(3, "reviewer", JobStatus::Queued),
    ];
    let pushes = [
        push(11, "host-a", EffectStatus::Done, 1),
        push(12, "host-b", EffectStatus::Pending, 2),
    ];
    let its = Iterations::of(&[("analyst", 1), ("developer", 1), ("reviewer", 1)]);
    let input = RecoveryInput {
        task: &task(false),
        jobs: &jobs,
        pushes: &pushes,
        dead_host: "host-b",
        iterations: &its,
    };
    let r = p.recover(input).unwrap();
    assert_eq!(r.close_effects, [12]);
    assert_eq!(r.cancel_jobs, [3]);
    assert_eq!(
        r.redo,
        Some(NextJob {
            stage: "developer".into(),
            iteration: 2
        })
    );
    assert_eq!(r.feedback.as_deref(), Some("feedback of developer"));
    assert!(
        r.reason.contains("host-b") && r.reason.contains("c12"),
        "{}",
        r.reason
    );

    // Nothing waits for a host that is not the dead one.
    assert_eq!(
        p.recover(RecoveryInput {
            dead_host: "host-a",
            ..input
        }),
        None
    );
    // A job that still runs is ended by the Reaper first.
    let running = [
        job_at(1, "analyst", JobStatus::Done),
        job_at(2, "developer", JobStatus::Running),
    ];
    assert_eq!(
        p.recover(RecoveryInput {
            jobs: &running,
            ..input
        }),
        None
    );
}

#[test]
fn recovery_of_a_task_that_ended_only_closes_its_pushes() {
    let p = policy();
    let jobs = [
        job_at(1, "analyst", JobStatus::Done),
        job_at(2, "developer", JobStatus::Failed),
    ];
    // A later push of another host builds on the lost commit: closed as well.
    let pushes = [
        push(12, "host-b", EffectStatus::Pending, 1),
        push(13, "host-a", EffectStatus::Pending, 2),
    ];
    let mut t = task(false);
    t.status = TaskStatus::Cancelled;
    let its = Iterations::default();
    let r = p
        .recover(RecoveryInput {
            task: &t,
            jobs: &jobs,
            pushes: &pushes,
            dead_host: "host-b",
            iterations: &its,
        })
        .unwrap();
    assert_eq!(r.close_effects, [12, 13]);
    assert!(r.cancel_jobs.is_empty());
    assert_eq!(r.redo, None);
    assert_eq!(r.lost_stage, "analyst");
}

//! Durable work ([ADR 0010](../../docs/adr/0010-durable-work.md)): a task is done only
//! once its pushes and pull request are; a push refused for good fails it; and the work
//! of a host that died before pushing it is redone from the last stage on the remote.

use entity::{advances, agent_runs, effects, jobs, tasks};
use sea_orm::sea_query::{
    Cond, Expr, ExprTrait, Func, Query, SelectStatement, SubQueryStatement, UpdateStatement,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
};
use serde_json::json;

use super::outbox::insert_effect;
use super::tasks::{insert_job, iterations, lock_task, set_task_status};
use super::{NewEvent, Store, StoreResult, append};
use crate::model::{
    AdvanceDecider, EffectKind, EffectStatus, EventKind, EventSource, JobStatus, RunOutcome,
    TaskStatus,
};
use crate::policy::{PlannedEffect, Policy, RecoveryInput};

/// What a recovery did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Recovered {
    pub task_id: i64,
    pub lost_stage: String,
    /// The recovery job queued, when the task was active.
    pub job_id: Option<i64>,
    pub closed_effects: Vec<i64>,
    pub cancelled_jobs: Vec<i64>,
}

/// True when the task has a push or pull request not yet done.
pub(super) async fn delivery_pending<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
) -> StoreResult<bool> {
    Ok(effects::Entity::find()
        .filter(pending_delivery(task_id))
        .one(db)
        .await?
        .is_some())
}

/// The effects of a task's delivery not yet done: its pushes and pull request pending.
fn pending_delivery(task_id: i64) -> Cond {
    Cond::all()
        .add(effects::Column::TaskId.eq(task_id))
        .add(effects::Column::Kind.is_in([EffectKind::Push, EffectKind::PullRequest]))
        .add(effects::Column::Status.eq(EffectStatus::Pending))
}

/// A claim's end of its task: the task's status set to `status`, unless it is `Done` and
/// a push or pull request of the task is still pending (its delivery ends it, ADR 0010).
/// The update changes the task's row, or nothing when the delivery waits.
pub(super) fn end_task(task_id: i64, status: TaskStatus, now: i64) -> UpdateStatement {
    let mut end = Query::update();
    end.table(tasks::Entity)
        .value(tasks::Column::Status, status)
        .value(tasks::Column::UpdatedAt, now)
        .and_where(tasks::Column::Id.eq(task_id));
    if status == TaskStatus::Done {
        let pending = Query::select()
            .expr(Expr::val(1))
            .from(effects::Entity)
            .cond_where(pending_delivery(task_id))
            .to_owned();
        end.and_where(Expr::exists(pending).not());
    }
    end
}

/// After a push or pull request was done: the task is done when it is active, its
/// pipeline ended (its last job passed and advanced to nothing) and nothing of its
/// delivery is pending any more. `task`: its row, which the caller read locked. Returns
/// the status it took.
pub(super) async fn complete_delivery(
    txn: &DatabaseTransaction,
    task: &tasks::Model,
    now: i64,
) -> StoreResult<Option<TaskStatus>> {
    let task_id = task.id;
    if task.status != TaskStatus::Active || delivery_pending(txn, task_id).await? {
        return Ok(None);
    }
    let Some(last) = pipeline_end(txn, task_id).await? else {
        return Ok(None);
    };
    set_task_status(txn, task_id, TaskStatus::Done, now).await?;
    let detail = json!({"stage": last.stage, "reason": "", "delivered": true});
    let ev = NewEvent::of(
        task_id,
        Some(&last),
        EventKind::TaskDone,
        EventSource::Monitor,
    );
    append(txn, ev.detail(detail), now).await?;
    Ok(Some(TaskStatus::Done))
}

/// The task's last job when it passed the pipeline's last stage: done, advanced to no
/// job, and nothing queued or running after it.
pub(super) async fn pipeline_end<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
) -> StoreResult<Option<jobs::Model>> {
    let Some(last) = jobs::Entity::find()
        .filter(jobs::Column::TaskId.eq(task_id))
        .order_by_desc(jobs::Column::Id)
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    if last.status != JobStatus::Done {
        return Ok(None);
    }
    let ended = advances::Entity::find_by_id(last.id)
        .one(db)
        .await?
        .is_some_and(|a| a.to_job_id.is_none());
    Ok(ended.then_some(last))
}

/// After a push or pull request failed for good: an active task fails with the reason
/// (its queued and running jobs fail, their runs too), its pending Plane state changes
/// are closed and `then` (the work item's move to `on_failed`) is written instead.
/// `task`: the effect's task, its row read locked by the caller.
pub(super) async fn fail_delivery(
    txn: &DatabaseTransaction,
    (task, e): (&tasks::Model, &effects::Model),
    error: &str,
    then: Vec<PlannedEffect>,
    now: i64,
) -> StoreResult<Option<TaskStatus>> {
    if task.status != TaskStatus::Active {
        return Ok(None);
    }
    let live = jobs::Entity::find()
        .filter(jobs::Column::TaskId.eq(task.id))
        .filter(jobs::Column::Status.is_in([JobStatus::Queued, JobStatus::Running]))
        .all(txn)
        .await?;
    jobs::Entity::update_many()
        .col_expr(jobs::Column::Status, Expr::value(JobStatus::Failed))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(jobs::Column::Id.is_in(live.iter().map(|j| j.id)))
        .exec(txn)
        .await?;
    agent_runs::Entity::update_many()
        .col_expr(agent_runs::Column::Outcome, Expr::value(RunOutcome::Failed))
        .filter(agent_runs::Column::Id.is_in(live.iter().filter_map(|j| j.current_run_id)))
        .filter(agent_runs::Column::Outcome.is_null())
        .exec(txn)
        .await?;
    effects::Entity::update_many()
        .col_expr(
            effects::Column::Status,
            Expr::value(EffectStatus::Cancelled),
        )
        .col_expr(
            effects::Column::LastError,
            Expr::value(format!("not performed: the task failed ({error})")),
        )
        .col_expr(effects::Column::UpdatedAt, Expr::value(now))
        .filter(effects::Column::TaskId.eq(task.id))
        .filter(effects::Column::Kind.eq(EffectKind::PlaneState))
        .filter(effects::Column::Status.eq(EffectStatus::Pending))
        .exec(txn)
        .await?;
    set_task_status(txn, task.id, TaskStatus::Failed, now).await?;
    let reason = format!(
        "the work did not reach the remote: {} failed: {error}",
        e.kind
    );
    let ev = NewEvent::of(task.id, None, EventKind::TaskFailed, EventSource::Monitor)
        .run(e.run_id)
        .detail(json!({"reason": reason, "effect": e.id, "jobs": live.iter().map(|j| j.id).collect::<Vec<_>>()}));
    append(txn, ev, now).await?;
    for effect in then {
        insert_effect(txn, task.id, e.run_id, effect, None, now).await?;
    }
    Ok(Some(TaskStatus::Failed))
}

impl Store {
    /// The hosts that pending pushes wait for, with their tasks: `(task id, host)`.
    pub async fn pinned_pushes(&self) -> StoreResult<Vec<(i64, String)>> {
        let mut out: Vec<(i64, String)> = effects::Entity::find()
            .filter(effects::Column::Kind.eq(EffectKind::Push))
            .filter(effects::Column::Status.eq(EffectStatus::Pending))
            .filter(effects::Column::Host.is_not_null())
            .all(&self.db)
            .await?
            .into_iter()
            .filter_map(|e| Some((e.task_id, e.host?)))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Recovers a task whose pushes wait for `dead_host`, which died: the policy's
    /// [`Policy::recover`] decides, and this applies it in one transaction fenced by the
    /// pushes it closes (still pending, or nothing is written). `None` when there was
    /// nothing to do, or another node did it first.
    pub async fn recover(
        &self,
        task_id: i64,
        dead_host: &str,
        policy: &Policy,
        now: i64,
    ) -> StoreResult<Option<Recovered>> {
        let (write, txn) = self.write_txn().await?;
        let Some(task) = lock_task(&txn, task_id, self.is_postgres()).await? else {
            return Ok(None);
        };
        let jobs = jobs::Entity::find()
            .filter(jobs::Column::TaskId.eq(task.id))
            .order_by_asc(jobs::Column::Id)
            .all(&txn)
            .await?;
        let pushes = pushes_with_jobs(&txn, task.id).await?;
        let its = iterations(&txn, task.id).await?;
        let input = RecoveryInput {
            task: &task,
            jobs: &jobs,
            pushes: &pushes,
            dead_host,
            iterations: &its,
        };
        let Some(decision) = policy.recover(input) else {
            txn.rollback().await?;
            return Ok(None);
        };
        let closed = effects::Entity::update_many()
            .col_expr(
                effects::Column::Status,
                Expr::value(EffectStatus::Cancelled),
            )
            .col_expr(
                effects::Column::LastError,
                Expr::value(decision.reason.clone()),
            )
            .col_expr(
                effects::Column::LeasedBy,
                Expr::value(Option::<String>::None),
            )
            .col_expr(effects::Column::UpdatedAt, Expr::value(now))
            .filter(effects::Column::Id.is_in(decision.close_effects.clone()))
            .filter(effects::Column::Status.eq(EffectStatus::Pending))
            .exec(&txn)
            .await?
            .rows_affected;
        if closed != decision.close_effects.len() as u64 {
            // Another node's recovery, or a push's outcome, came first.
            txn.rollback().await?;
            return Ok(None);
        }
        let cancelled = jobs::Entity::update_many()
            .col_expr(jobs::Column::Status, Expr::value(JobStatus::Cancelled))
            .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
            .filter(jobs::Column::Id.is_in(decision.cancel_jobs.clone()))
            .filter(jobs::Column::Status.eq(JobStatus::Queued))
            .exec(&txn)
            .await?
            .rows_affected;
        if cancelled != decision.cancel_jobs.len() as u64 {
            txn.rollback().await?;
            return Ok(None);
        }
        let mut job_id = None;
        if let Some(redo) = &decision.redo {
            let job = insert_job(
                &txn,
                task.id,
                &redo.stage,
                redo.iteration,
                decision.feedback.as_deref(),
                now,
            )
            .await?;
            jobs::Entity::update_many()
                .col_expr(jobs::Column::Recovery, Expr::value(true))
                .filter(jobs::Column::Id.eq(job.id))
                .exec(&txn)
                .await?;
            let detail =
                json!({"stage": redo.stage, "iteration": redo.iteration, "recovery": true});
            let ev = NewEvent::of(
                task.id,
                Some(&job),
                EventKind::JobQueued,
                EventSource::Reaper,
            );
            append(&txn, ev.detail(detail), now).await?;
            job_id = Some(job.id);
        }
        let detail = json!({
            "decided_by": AdvanceDecider::Recovery, "host": dead_host,
            "lost_stage": decision.lost_stage, "reason": decision.reason,
            "closed_effects": decision.close_effects, "cancelled_jobs": decision.cancel_jobs,
            "job": job_id,
        });
        let ev = NewEvent::of(task.id, None, EventKind::TaskRecovered, EventSource::Reaper);
        append(&txn, ev.detail(detail), now).await?;
        txn.commit().await?;
        drop(write);
        Ok(Some(Recovered {
            task_id: task.id,
            lost_stage: decision.lost_stage,
            job_id,
            closed_effects: decision.close_effects,
            cancelled_jobs: decision.cancel_jobs,
        }))
    }
}

/// Every push of a task with the job of its run, in order.
pub(super) async fn pushes_with_jobs<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
) -> StoreResult<Vec<(effects::Model, i64)>> {
    let pushes = effects::Entity::find()
        .filter(effects::Column::TaskId.eq(task_id))
        .filter(effects::Column::Kind.eq(EffectKind::Push))
        .order_by_asc(effects::Column::Id)
        .all(db)
        .await?;
    let runs: std::collections::HashMap<i64, i64> = agent_runs::Entity::find()
        .filter(agent_runs::Column::Id.is_in(pushes.iter().map(|e| e.run_id)))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.id, r.job_id))
        .collect();
    Ok(pushes
        .into_iter()
        .filter_map(|e| runs.get(&e.run_id).copied().map(|j| (e, j)))
        .collect())
}

/// The runs whose commits were lost with their host (their push was closed unperformed,
/// and no later push of the task was done): the next stage never starts from them. A
/// subquery of their ids, so that a reader asks for what it needs in one statement.
pub(super) fn lost_runs(task_id: i64) -> SelectStatement {
    let pushes = |status: EffectStatus| {
        Cond::all()
            .add(effects::Column::TaskId.eq(task_id))
            .add(effects::Column::Kind.eq(EffectKind::Push))
            .add(effects::Column::Status.eq(status))
    };
    let last_done = Query::select()
        .expr(Expr::col(effects::Column::Id).max())
        .from(effects::Entity)
        .cond_where(pushes(EffectStatus::Done))
        .to_owned();
    Query::select()
        .column(effects::Column::RunId)
        .from(effects::Entity)
        .cond_where(pushes(EffectStatus::Cancelled))
        .and_where(Expr::col(effects::Column::Id).gt(Func::coalesce([
            Expr::SubQuery(
                None,
                Box::new(SubQueryStatement::SelectStatement(last_done)),
            ),
            Expr::val(0),
        ])))
        .to_owned()
}

/// The job of the earliest run whose work was lost, for a retry to start there.
pub(super) async fn earliest_lost_job<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
) -> StoreResult<Option<jobs::Model>> {
    let Some(run) = agent_runs::Entity::find()
        .filter(agent_runs::Column::Id.in_subquery(lost_runs(task_id)))
        .order_by_asc(agent_runs::Column::Id)
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    Ok(jobs::Entity::find_by_id(run.job_id).one(db).await?)
}

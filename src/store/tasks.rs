//! Tasks: submit, cancel, retry, and the reads of a task with its jobs, runs, effects and
//! events.

use std::collections::{BTreeMap, HashMap};

use entity::{agent_runs, effects, events, jobs, nodes, tasks};
use sea_orm::QuerySelect;
use sea_orm::sea_query::{Expr, LockType};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Select,
    Set,
};
use serde::Serialize;
use serde_json::json;

use super::{NewEvent, Store, StoreError, StoreResult, append, must};
use crate::model::{
    EffectKind, EffectStatus, EventKind, EventSource, JobStatus, RunOutcome, TaskKey, TaskStatus,
};
use crate::policy::Iterations;

/// A task to write, with everything already checked by the application layer.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub key: TaskKey,
    pub pipeline: String,
    pub title: String,
    pub description: Option<String>,
    pub plane_issue_id: Option<String>,
    pub first_stage: String,
    /// W3C trace context of the task's root span; every span of its work joins it.
    pub trace_parent: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Submitted {
    pub task: tasks::Model,
    pub job: jobs::Model,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    pub task: tasks::Model,
    pub jobs: Vec<jobs::Model>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskDetail {
    pub task: tasks::Model,
    pub jobs: Vec<jobs::Model>,
    pub runs: Vec<agent_runs::Model>,
    pub effects: Vec<effects::Model>,
    pub events: Vec<events::Model>,
}

/// A run stopped by a cancel, so that the caller can kill its agent where it can.
#[derive(Debug, Clone)]
pub struct CancelledRun {
    pub run: agent_runs::Model,
    pub hostname: Option<String>,
}

pub(super) const LIVE: [JobStatus; 2] = [JobStatus::Queued, JobStatus::Running];

impl Store {
    /// Writes a task, its first job and their events in one transaction.
    pub async fn submit(
        &self,
        new: NewTask,
        source: EventSource,
        now: i64,
    ) -> StoreResult<Submitted> {
        let (_write, txn) = self.write_txn().await?;
        let inserted = tasks::Entity::insert(tasks::ActiveModel {
            key: Set(new.key.to_string()),
            pipeline: Set(new.pipeline.clone()),
            title: Set(new.title.clone()),
            description: Set(new.description.clone()),
            plane_issue_id: Set(new.plane_issue_id.clone()),
            status: Set(TaskStatus::Active),
            trace_parent: Set(Some(new.trace_parent.clone())),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        })
        .on_conflict_do_nothing_on([tasks::Column::Key])
        .exec(&txn)
        .await?;
        let task_id = match inserted {
            sea_orm::TryInsertResult::Inserted(r) => r.last_insert_id,
            _ => return Err(StoreError::TaskExists(new.key.to_string())),
        };
        let task = must(tasks::Entity::find_by_id(task_id).one(&txn).await?, || {
            format!("task {task_id}")
        })?;
        let job = insert_job(&txn, task_id, &new.first_stage, 1, None, now).await?;
        append(
            &txn,
            NewEvent::of(task.id, None, EventKind::TaskSubmitted, source).detail(
                json!({"pipeline": new.pipeline, "title": new.title, "plane_issue_id": new.plane_issue_id}),
            ),
            now,
        )
        .await?;
        append(
            &txn,
            NewEvent::of(task.id, Some(&job), EventKind::JobQueued, source)
                .detail(json!({"stage": job.stage, "iteration": 1})),
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(Submitted { task, job })
    }

    pub async fn task_by_key(&self, key: &TaskKey) -> StoreResult<tasks::Model> {
        find_task(&self.db, key).await
    }

    pub async fn task(&self, id: i64) -> StoreResult<tasks::Model> {
        must(tasks::Entity::find_by_id(id).one(&self.db).await?, || {
            format!("task {id}")
        })
    }

    /// Every task with its jobs, newest first; `key` narrows to one.
    pub async fn list_tasks(&self, key: Option<&TaskKey>) -> StoreResult<Vec<TaskSummary>> {
        let mut q = tasks::Entity::find().order_by_desc(tasks::Column::Id);
        if let Some(key) = key {
            q = q.filter(tasks::Column::Key.eq(key.as_str()));
        }
        let tasks = q.all(&self.db).await?;
        if let Some(key) = key
            && tasks.is_empty()
        {
            return Err(StoreError::NoSuchTask(key.to_string()));
        }
        self.with_jobs(tasks).await
    }

    /// The active tasks with their jobs.
    pub async fn active_tasks(&self) -> StoreResult<Vec<TaskSummary>> {
        let tasks = tasks::Entity::find()
            .filter(tasks::Column::Status.eq(TaskStatus::Active))
            .order_by_asc(tasks::Column::Id)
            .all(&self.db)
            .await?;
        self.with_jobs(tasks).await
    }

    /// Tasks with their jobs, loaded in a fixed number of queries.
    pub(super) async fn with_jobs(
        &self,
        tasks: Vec<tasks::Model>,
    ) -> StoreResult<Vec<TaskSummary>> {
        let ids: Vec<i64> = tasks.iter().map(|t| t.id).collect();
        let mut by_task: BTreeMap<i64, Vec<jobs::Model>> = BTreeMap::new();
        for chunk in ids.chunks(500) {
            for job in jobs::Entity::find()
                .filter(jobs::Column::TaskId.is_in(chunk.to_vec()))
                .order_by_asc(jobs::Column::Id)
                .all(&self.db)
                .await?
            {
                by_task.entry(job.task_id).or_default().push(job);
            }
        }
        Ok(tasks
            .into_iter()
            .map(|task| TaskSummary {
                jobs: by_task.remove(&task.id).unwrap_or_default(),
                task,
            })
            .collect())
    }

    /// Fails an active task for a reason outside any run (its stage vanished from the
    /// config): its queued and running jobs fail, its live runs get the outcome `failed`.
    pub async fn fail_task(
        &self,
        key: &TaskKey,
        reason: &str,
        source: EventSource,
        now: i64,
    ) -> StoreResult<()> {
        let (_write, txn) = self.write_txn().await?;
        let end = Ending {
            job: JobStatus::Failed,
            run: RunOutcome::Failed,
            task: TaskStatus::Failed,
            what: "only an active task can be failed",
        };
        let (task, live) = end_task(&txn, key, end, self.is_postgres(), now).await?;
        let stage = live.last().map(|j| j.stage.clone());
        append(
            &txn,
            NewEvent::of(task.id, None, EventKind::TaskFailed, source)
                .detail(json!({"stage": stage, "reason": reason})),
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A task with everything that belongs to it, in order.
    pub async fn task_detail(&self, key: &TaskKey) -> StoreResult<TaskDetail> {
        let task = self.task_by_key(key).await?;
        let jobs = self.jobs_of(task.id).await?;
        let job_ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        let runs = agent_runs::Entity::find()
            .filter(agent_runs::Column::JobId.is_in(job_ids))
            .order_by_asc(agent_runs::Column::Id)
            .all(&self.db)
            .await?;
        let effects = effects::Entity::find()
            .filter(effects::Column::TaskId.eq(task.id))
            .order_by_asc(effects::Column::Id)
            .all(&self.db)
            .await?;
        let events = self.events(task.id).await?;
        Ok(TaskDetail {
            task,
            jobs,
            runs,
            effects,
            events,
        })
    }

    pub async fn events(&self, task_id: i64) -> StoreResult<Vec<events::Model>> {
        Ok(events::Entity::find()
            .filter(events::Column::TaskId.eq(task_id))
            .order_by_asc(events::Column::Id)
            .all(&self.db)
            .await?)
    }

    pub async fn jobs_of(&self, task_id: i64) -> StoreResult<Vec<jobs::Model>> {
        Ok(jobs::Entity::find()
            .filter(jobs::Column::TaskId.eq(task_id))
            .order_by_asc(jobs::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// Tasks by id, in one query (for the edges).
    pub async fn tasks_by_ids(
        &self,
        ids: impl IntoIterator<Item = i64>,
    ) -> StoreResult<HashMap<i64, tasks::Model>> {
        self.tasks_by_id(ids).await
    }

    /// Tasks by id, in one query.
    pub(super) async fn tasks_by_id(
        &self,
        ids: impl IntoIterator<Item = i64>,
    ) -> StoreResult<HashMap<i64, tasks::Model>> {
        let ids: Vec<i64> = ids.into_iter().collect();
        Ok(tasks::Entity::find()
            .filter(tasks::Column::Id.is_in(ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|t| (t.id, t))
            .collect())
    }

    /// Tasks by key, in one query; keys without a task are left out.
    pub async fn tasks_by_keys(
        &self,
        keys: impl IntoIterator<Item = String>,
    ) -> StoreResult<HashMap<String, tasks::Model>> {
        let keys: Vec<String> = keys.into_iter().collect();
        let mut out = HashMap::new();
        // Bounded batches: SQLite takes at most 32766 bound values in one statement.
        for chunk in keys.chunks(500) {
            for t in tasks::Entity::find()
                .filter(tasks::Column::Key.is_in(chunk.to_vec()))
                .all(&self.db)
                .await?
            {
                out.insert(t.key.clone(), t);
            }
        }
        Ok(out)
    }

    /// Keeps a task's description (read from its Plane work item before its first stage).
    pub async fn set_description(&self, task_id: i64, text: &str, now: i64) -> StoreResult<()> {
        let (_write, db) = self.lock_writes().await;
        tasks::Entity::update_many()
            .col_expr(tasks::Column::Description, Expr::value(text))
            .col_expr(tasks::Column::UpdatedAt, Expr::value(now))
            .filter(tasks::Column::Id.eq(task_id))
            .exec(db)
            .await?;
        Ok(())
    }

    /// Cancels an active task: its queued and running jobs become `cancelled`, its live
    /// runs get the outcome `cancelled`. Returns those runs so that their agents can be
    /// killed; a Monitor also sees the cancel at its next heartbeat.
    pub async fn cancel(
        &self,
        key: &TaskKey,
        source: EventSource,
        now: i64,
    ) -> StoreResult<Vec<CancelledRun>> {
        let (_write, txn) = self.write_txn().await?;
        let end = Ending {
            job: JobStatus::Cancelled,
            run: RunOutcome::Cancelled,
            task: TaskStatus::Cancelled,
            what: "only an active task can be cancelled",
        };
        let (task, live) = end_task(&txn, key, end, self.is_postgres(), now).await?;
        let run_ids: Vec<i64> = live.iter().filter_map(|j| j.current_run_id).collect();
        append(
            &txn,
            NewEvent::of(task.id, None, EventKind::TaskCancelled, source)
                .detail(json!({"runs": run_ids})),
            now,
        )
        .await?;
        let runs = agent_runs::Entity::find()
            .filter(agent_runs::Column::Id.is_in(run_ids))
            .all(&txn)
            .await?;
        let hosts: HashMap<String, String> = nodes::Entity::find()
            .filter(nodes::Column::Id.is_in(runs.iter().map(|r| r.node_id.clone())))
            .all(&txn)
            .await?
            .into_iter()
            .map(|n| (n.id, n.hostname))
            .collect();
        txn.commit().await?;
        Ok(runs
            .into_iter()
            .map(|run| CancelledRun {
                hostname: hosts.get(&run.node_id).cloned(),
                run,
            })
            .collect())
    }

    /// Re-queues a failed or cancelled task at the stage where it stopped, as a new job
    /// (next iteration of that stage) with a fresh attempt budget; at the earliest stage
    /// whose work was lost with its host, when one was. A task whose pipeline ended and
    /// whose delivery failed is delivered again instead: its failed pushes and pull
    /// request are made pending, and it is done once they are (ADR 0010).
    pub async fn retry(
        &self,
        key: &TaskKey,
        source: EventSource,
        now: i64,
    ) -> StoreResult<Retried> {
        let (_write, txn) = self.write_txn().await?;
        let task = lock_task_by_key(&txn, key, self.is_postgres()).await?;
        if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
            return Err(StoreError::WrongState {
                key: key.to_string(),
                status: task.status.to_string(),
                what: "only a failed or cancelled task can be retried".to_string(),
            });
        }
        if let Some(last) = super::delivery::pipeline_end(&txn, task.id).await? {
            let again = super::outbox::pending_again(now)
                .filter(effects::Column::TaskId.eq(task.id))
                .filter(effects::Column::Kind.is_in([EffectKind::Push, EffectKind::PullRequest]))
                .filter(effects::Column::Status.eq(EffectStatus::Failed))
                .exec(&txn)
                .await?
                .rows_affected;
            set_task_status(&txn, task.id, TaskStatus::Active, now).await?;
            let detail = json!({"stage": last.stage, "retry": true, "effects_retried": again});
            let ev = NewEvent::of(task.id, Some(&last), EventKind::AwaitingDelivery, source);
            append(&txn, ev.detail(detail), now).await?;
            let active = tasks::Model {
                status: TaskStatus::Active,
                ..task.clone()
            };
            let status = super::delivery::complete_delivery(&txn, &active, now)
                .await?
                .unwrap_or(TaskStatus::Active);
            txn.commit().await?;
            return Ok(Retried::Delivery {
                effects: again,
                status,
            });
        }
        let last = jobs::Entity::find()
            .filter(jobs::Column::TaskId.eq(task.id))
            .order_by_desc(jobs::Column::Id)
            .one(&txn)
            .await?;
        let last = must(last, || format!("jobs of task {key}"))?;
        let stage = match super::delivery::earliest_lost_job(&txn, task.id).await? {
            Some(lost) => lost.stage,
            None => last.stage.clone(),
        };
        let iteration = iterations(&txn, task.id).await?.next(&stage);
        let job = insert_job(&txn, task.id, &stage, iteration, None, now).await?;
        set_task_status(&txn, task.id, TaskStatus::Active, now).await?;
        append(
            &txn,
            NewEvent::of(task.id, Some(&job), EventKind::JobQueued, source)
                .detail(json!({"stage": job.stage, "iteration": iteration, "retry_of": last.id})),
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(Retried::Job(job))
    }
}

/// What a retry did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "retried", rename_all = "snake_case")]
pub enum Retried {
    /// A new job where the task stopped.
    Job(jobs::Model),
    /// The pipeline had ended: its delivery is tried again (`effects` made pending); the
    /// task's status now (`done` when nothing was left to deliver).
    Delivery { effects: u64, status: TaskStatus },
}

/// How an active task ends outside any claim.
struct Ending {
    job: JobStatus,
    run: RunOutcome,
    task: TaskStatus,
    /// Why another status refuses it.
    what: &'static str,
}

/// Ends an active task (its row taken first): its queued and running jobs and their
/// current runs get the ending's statuses. Returns the task and those jobs as they were.
async fn end_task<C: ConnectionTrait>(
    txn: &C,
    key: &TaskKey,
    end: Ending,
    postgres: bool,
    now: i64,
) -> StoreResult<(tasks::Model, Vec<jobs::Model>)> {
    let task = lock_task_by_key(txn, key, postgres).await?;
    if task.status != TaskStatus::Active {
        return Err(StoreError::WrongState {
            key: key.to_string(),
            status: task.status.to_string(),
            what: end.what.to_string(),
        });
    }
    let live = jobs::Entity::find()
        .filter(jobs::Column::TaskId.eq(task.id))
        .filter(jobs::Column::Status.is_in(LIVE))
        .all(txn)
        .await?;
    let run_ids: Vec<i64> = live.iter().filter_map(|j| j.current_run_id).collect();
    jobs::Entity::update_many()
        .col_expr(jobs::Column::Status, Expr::value(end.job))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
        .filter(jobs::Column::TaskId.eq(task.id))
        .filter(jobs::Column::Status.is_in(LIVE))
        .exec(txn)
        .await?;
    agent_runs::Entity::update_many()
        .col_expr(agent_runs::Column::Outcome, Expr::value(end.run))
        .filter(agent_runs::Column::Id.is_in(run_ids))
        .filter(agent_runs::Column::Outcome.is_null())
        .exec(txn)
        .await?;
    set_task_status(txn, task.id, end.task, now).await?;
    Ok((task, live))
}

async fn find_task<C: ConnectionTrait>(db: &C, key: &TaskKey) -> StoreResult<tasks::Model> {
    tasks::Entity::find()
        .filter(tasks::Column::Key.eq(key.as_str()))
        .one(db)
        .await?
        .ok_or_else(|| StoreError::NoSuchTask(key.to_string()))
}

/// Reads a task inside a write transaction, taking its row (PostgreSQL's `FOR UPDATE`):
/// cancel, retry, claim and dispatch serialize on the task row, always before any job row.
async fn lock_task_by_key<C: ConnectionTrait>(
    db: &C,
    key: &TaskKey,
    postgres: bool,
) -> StoreResult<tasks::Model> {
    for_update(
        tasks::Entity::find().filter(tasks::Column::Key.eq(key.as_str())),
        postgres,
    )
    .one(db)
    .await?
    .ok_or_else(|| StoreError::NoSuchTask(key.to_string()))
}

/// [`lock_task_by_key`] by id; `None` when the task is gone.
pub(super) async fn lock_task<C: ConnectionTrait>(
    db: &C,
    id: i64,
    postgres: bool,
) -> StoreResult<Option<tasks::Model>> {
    Ok(for_update(tasks::Entity::find_by_id(id), postgres)
        .one(db)
        .await?)
}

/// `q` taking the rows it reads on PostgreSQL (`FOR UPDATE`); SQLite's write
/// transaction already excludes every other writer.
pub(super) fn for_update<E: EntityTrait>(q: Select<E>, postgres: bool) -> Select<E> {
    if postgres {
        q.lock(LockType::Update)
    } else {
        q
    }
}

pub(super) async fn insert_job<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
    stage: &str,
    iteration: i32,
    feedback: Option<&str>,
    now: i64,
) -> StoreResult<jobs::Model> {
    Ok(new_job(task_id, stage, iteration, feedback, now)
        .insert(db)
        .await?)
}

/// A new job's attempt.
pub(super) const FIRST_ATTEMPT: i32 = 1;

/// The row of a new queued job of a task.
pub(super) fn new_job(
    task_id: i64,
    stage: &str,
    iteration: i32,
    feedback: Option<&str>,
    now: i64,
) -> jobs::ActiveModel {
    jobs::ActiveModel {
        task_id: Set(task_id),
        stage: Set(stage.to_string()),
        iteration: Set(iteration),
        status: Set(JobStatus::Queued),
        attempt: Set(FIRST_ATTEMPT),
        current_run_id: Set(None),
        not_before: Set(now),
        feedback: Set(feedback.map(str::to_string)),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
}

/// How often each stage of a task has been entered (recovery jobs apart).
pub(super) async fn iterations<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
) -> StoreResult<Iterations> {
    let jobs = jobs::Entity::find()
        .filter(jobs::Column::TaskId.eq(task_id))
        .all(db)
        .await?;
    Ok(Iterations::of_jobs(&jobs))
}

pub(super) async fn set_task_status<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
    status: TaskStatus,
    now: i64,
) -> StoreResult<()> {
    tasks::Entity::update_many()
        .col_expr(tasks::Column::Status, Expr::value(status))
        .col_expr(tasks::Column::UpdatedAt, Expr::value(now))
        .filter(tasks::Column::Id.eq(task_id))
        .exec(db)
        .await?;
    Ok(())
}

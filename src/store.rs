//! All database access of baton. No SQL lives anywhere else.
//!
//! Every operation that changes more than one row runs in one transaction. On SQLite,
//! write transactions start with `BEGIN IMMEDIATE`, so that two writers queue on the
//! busy timeout instead of failing when a read lock would have to be upgraded; on
//! PostgreSQL the dispatcher takes its job with `FOR UPDATE SKIP LOCKED`.
//!
//! The heart of the module is [`Store::claim`], the fenced claim: the job's row is
//! updated only `WHERE status = 'running' AND current_run_id = <run>`, and the winner
//! writes in the same transaction everything the decision implies (the job's terminal or
//! retry state, the next job or the task's end, the `advances` row, the effects, the
//! events). A loser gets [`ClaimOutcome::Lost`] and writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use entity::{advances, agent_runs, effects, events, jobs, nodes, tasks, webhook_deliveries};
use migration::MigratorTrait;
use sea_orm::sea_query::{Expr, LockBehavior, LockType};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DatabaseTransaction, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use serde::Serialize;
use serde_json::json;

use crate::clock::ms;
use crate::config::{Config, PlaneStates, RetrySettings, redact_url};

/// How long an SQLite writer waits for another before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a caller waits for a pooled connection before the operation fails.
pub const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

pub mod status {
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const DONE: &str = "done";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    pub const ACTIVE: &str = "active";
    pub const PENDING: &str = "pending";
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open database {url}: {source}; check database_url (or BATON_DATABASE_URL) and that the server is up"
    )]
    Connect { url: String, source: DbErr },
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("task {0} already exists")]
    TaskExists(String),
    #[error("no task {0}; `baton status` lists the tasks there are")]
    NoSuchTask(String),
    #[error("task {key} is {status}: {what}")]
    WrongState {
        key: String,
        status: String,
        what: String,
    },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Who sends a claim, and who writes an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Monitor,
    Reaper,
    Dispatcher,
    Cli,
    Api,
    Webhook,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Monitor => "monitor",
            Source::Reaper => "reaper",
            Source::Dispatcher => "dispatcher",
            Source::Cli => "cli",
            Source::Api => "api",
            Source::Webhook => "webhook",
        }
    }
}

/// What the sender of a claim decided, read-only, before claiming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The gate passed: advance to the next stage, or end the task.
    Passed,
    /// The gate's verdict file said reject: loop back to the stage's `on_reject`.
    Rejected,
    /// The gate failed: retry with backoff, or fail the job and the task.
    Failed { reason: String },
    /// The agent is gone without an exit status (Reaper tier 1).
    Lost { reason: String },
    /// The agent ran past its stage timeout and was killed.
    TimedOut,
}

impl Verdict {
    /// The run's `outcome` column.
    pub fn outcome(&self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Rejected => "rejected",
            Verdict::Failed { .. } => "failed",
            Verdict::Lost { .. } => "lost",
            Verdict::TimedOut => "timeout",
        }
    }
}

/// A request to finalize one run of one job.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub job_id: i64,
    /// The fence: the claim wins only if this is the job's `current_run_id`.
    pub run_id: i64,
    pub verdict: Verdict,
    pub decided_by: Source,
    /// The Reaper's tier (1, 2, or `timeout`), recorded in the `reaped` event.
    pub tier: Option<String>,
    pub commit_sha: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ClaimOutcome {
    Won(ClaimWon),
    /// Another claim finalized the job, or the run is not the job's current run.
    Lost,
    /// This very run's claim was already applied.
    AlreadyAdvanced,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimWon {
    /// The job's new status: `done`, `failed`, or `queued` for a retry.
    pub job_status: String,
    pub next_job: Option<jobs::Model>,
    /// Set when the task ended with this claim.
    pub task_status: Option<String>,
    pub effects: usize,
}

/// What the claim transaction needs of the configuration to choose the transition.
#[derive(Debug, Clone)]
pub struct ClaimPolicy {
    pub pipelines: HashMap<String, (Vec<String>, i32)>,
    pub on_reject: HashMap<String, String>,
    pub retry: RetrySettings,
    pub push: bool,
    pub pull_request_after: Option<String>,
    pub plane_comment: bool,
    /// `Some` when Plane is configured.
    pub plane_states: Option<PlaneStates>,
    pub branch_prefix: String,
    pub base_branch: String,
}

impl ClaimPolicy {
    pub fn from_config(config: &Config) -> Self {
        ClaimPolicy {
            pipelines: config
                .pipelines
                .iter()
                .map(|(k, p)| (k.clone(), (p.stages.clone(), p.max_iterations)))
                .collect(),
            on_reject: config
                .stages
                .iter()
                .filter_map(|(k, s)| s.on_reject.clone().map(|t| (k.clone(), t)))
                .collect(),
            retry: config.retry.clone(),
            push: config.effects.push,
            pull_request_after: config.effects.pull_request_after.clone(),
            plane_comment: config.effects.plane_comment && config.plane.is_some(),
            plane_states: config.plane.as_ref().map(|p| p.states.clone()),
            branch_prefix: config.repo.branch_prefix.clone(),
            base_branch: config.repo.base_branch.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewTask {
    pub key: String,
    pub pipeline: String,
    pub title: String,
    pub plane_issue_id: Option<String>,
    pub first_stage: String,
    pub trace_parent: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Submitted {
    pub task: tasks::Model,
    pub job: jobs::Model,
}

/// A job taken by a dispatcher, with the run created for it in the same transaction.
#[derive(Debug, Clone)]
pub struct Dispatched {
    pub task: tasks::Model,
    pub job: jobs::Model,
    pub run: agent_runs::Model,
}

/// A running job as the Reaper sees it.
#[derive(Debug, Clone)]
pub struct RunningJob {
    pub task: tasks::Model,
    pub job: jobs::Model,
    pub run: Option<agent_runs::Model>,
    /// The heartbeat of the run's node, `None` when the node row is missing.
    pub node_heartbeat_at: Option<i64>,
    pub node_hostname: Option<String>,
    /// The process id of the run's node, to tell whether that baton still lives.
    pub node_pid: Option<i32>,
    /// The node stopped cleanly.
    pub node_stopped: bool,
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

/// How one attempt of an effect ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EffectOutcome {
    Done { external_ref: Option<String> },
    Retry { error: String, at: i64 },
    Failed { error: String },
}

/// A run stopped by a cancel, so that the caller can kill its agent where it can.
#[derive(Debug, Clone)]
pub struct CancelledRun {
    pub run: agent_runs::Model,
    pub hostname: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub task_id: i64,
    pub job_id: Option<i64>,
    pub run_id: Option<i64>,
    pub kind: &'static str,
    pub source: Source,
    pub detail: serde_json::Value,
}

#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// SQLite only: writers of this process take turns here rather than in SQLite's
    /// busy handler, which sleeps in steps of milliseconds while it waits.
    write_lock: Option<Arc<tokio::sync::Mutex<()>>>,
}

/// Held while a write transaction of this process is open (SQLite).
type WriteGuard = Option<tokio::sync::OwnedMutexGuard<()>>;

impl Store {
    /// Opens the database (SQLite in WAL mode with a busy timeout) without migrating.
    pub async fn connect(url: &str) -> StoreResult<Store> {
        Store::connect_with(url, POOL_ACQUIRE_TIMEOUT).await
    }

    /// Like [`Store::connect`], with the time a caller waits for a pooled connection.
    /// Tests on a loaded machine pass a long one.
    pub async fn connect_with(url: &str, acquire_timeout: Duration) -> StoreResult<Store> {
        let mut opts = ConnectOptions::new(url.to_string());
        opts.sqlx_logging(false)
            .max_connections(if url.starts_with("sqlite:") { 4 } else { 10 })
            .connect_timeout(acquire_timeout)
            .acquire_timeout(acquire_timeout)
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true)
            });
        let db = Database::connect(opts)
            .await
            .map_err(|source| StoreError::Connect {
                url: redact_url(url),
                source,
            })?;
        let write_lock = url
            .starts_with("sqlite:")
            .then(|| Arc::new(tokio::sync::Mutex::new(())));
        Ok(Store { db, write_lock })
    }

    /// Opens the database and applies every pending migration.
    pub async fn open(url: &str) -> StoreResult<Store> {
        let store = Store::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    pub async fn migrate(&self) -> StoreResult<Vec<String>> {
        let pending: Vec<String> = migration::Migrator::get_pending_migrations(&self.db)
            .await?
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        migration::Migrator::up(&self.db, None).await?;
        Ok(pending)
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    pub async fn ping(&self) -> StoreResult<()> {
        self.db.ping().await?;
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.db.close().await;
    }

    async fn lock_writes(&self) -> WriteGuard {
        match &self.write_lock {
            Some(l) => Some(l.clone().lock_owned().await),
            None => None,
        }
    }

    async fn write_txn(&self) -> StoreResult<(WriteGuard, DatabaseTransaction)> {
        let guard = self.lock_writes().await;
        let txn = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok((guard, txn))
    }

    // ---- tasks --------------------------------------------------------------------

    /// Writes a task, its first job and their events in one transaction.
    pub async fn submit(&self, new: NewTask, source: Source, now: i64) -> StoreResult<Submitted> {
        let (_write, txn) = self.write_txn().await?;
        let inserted = tasks::Entity::insert(tasks::ActiveModel {
            key: Set(new.key.clone()),
            pipeline: Set(new.pipeline.clone()),
            title: Set(new.title.clone()),
            plane_issue_id: Set(new.plane_issue_id.clone()),
            status: Set(status::ACTIVE.to_string()),
            // Every task gets its own trace; all spans of its work join it.
            trace_parent: Set(Some(
                new.trace_parent
                    .clone()
                    .unwrap_or_else(crate::telemetry::new_trace_parent),
            )),
            created_at: Set(now),
            updated_at: Set(now),
            ..Default::default()
        })
        .on_conflict_do_nothing_on([tasks::Column::Key])
        .exec(&txn)
        .await?;
        let task_id = match inserted {
            sea_orm::TryInsertResult::Inserted(r) => r.last_insert_id,
            _ => return Err(StoreError::TaskExists(new.key)),
        };
        let task = tasks::Entity::find_by_id(task_id)
            .one(&txn)
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("task {task_id}")))?;
        let job = insert_job(&txn, task_id, &new.first_stage, 1, now).await?;
        append(
            &txn,
            event(&task, None, "task_submitted", source)
                .detail(json!({"pipeline": new.pipeline, "title": new.title, "plane_issue_id": new.plane_issue_id})),
            now,
        )
        .await?;
        append(
            &txn,
            event(&task, Some(&job), "job_queued", source)
                .detail(json!({"stage": job.stage, "iteration": 1})),
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(Submitted { task, job })
    }

    pub async fn task_by_key(&self, key: &str) -> StoreResult<tasks::Model> {
        tasks::Entity::find()
            .filter(tasks::Column::Key.eq(key))
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NoSuchTask(key.to_string()))
    }

    pub async fn task(&self, id: i64) -> StoreResult<tasks::Model> {
        tasks::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::Db(DbErr::RecordNotFound(format!("task {id}"))))
    }

    /// Every task with its jobs, newest first; `key` narrows to one.
    pub async fn list_tasks(&self, key: Option<&str>) -> StoreResult<Vec<TaskSummary>> {
        let mut q = tasks::Entity::find().order_by_desc(tasks::Column::Id);
        if let Some(key) = key {
            q = q.filter(tasks::Column::Key.eq(key));
        }
        let tasks = q.all(&self.db).await?;
        if let Some(key) = key
            && tasks.is_empty()
        {
            return Err(StoreError::NoSuchTask(key.to_string()));
        }
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

    /// A task with everything that belongs to it, in order.
    pub async fn task_detail(&self, key: &str) -> StoreResult<TaskDetail> {
        let task = self.task_by_key(key).await?;
        let jobs = jobs::Entity::find()
            .filter(jobs::Column::TaskId.eq(task.id))
            .order_by_asc(jobs::Column::Id)
            .all(&self.db)
            .await?;
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

    /// Cancels an active task: its queued and running jobs become `cancelled`, its live
    /// runs get the outcome `cancelled`. Returns those runs so that their agents can be
    /// killed; a Monitor also sees the cancel at its next heartbeat.
    pub async fn cancel(
        &self,
        key: &str,
        source: Source,
        now: i64,
    ) -> StoreResult<Vec<CancelledRun>> {
        let (_write, txn) = self.write_txn().await?;
        let task = tasks::Entity::find()
            .filter(tasks::Column::Key.eq(key))
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::NoSuchTask(key.to_string()))?;
        if task.status != status::ACTIVE {
            return Err(StoreError::WrongState {
                key: key.to_string(),
                status: task.status,
                what: "only an active task can be cancelled".to_string(),
            });
        }
        let live = jobs::Entity::find()
            .filter(jobs::Column::TaskId.eq(task.id))
            .filter(jobs::Column::Status.is_in([status::QUEUED, status::RUNNING]))
            .all(&txn)
            .await?;
        let run_ids: Vec<i64> = live.iter().filter_map(|j| j.current_run_id).collect();
        jobs::Entity::update_many()
            .col_expr(jobs::Column::Status, Expr::value(status::CANCELLED))
            .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
            .filter(jobs::Column::TaskId.eq(task.id))
            .filter(jobs::Column::Status.is_in([status::QUEUED, status::RUNNING]))
            .exec(&txn)
            .await?;
        agent_runs::Entity::update_many()
            .col_expr(agent_runs::Column::Outcome, Expr::value("cancelled"))
            .filter(agent_runs::Column::Id.is_in(run_ids.clone()))
            .filter(agent_runs::Column::Outcome.is_null())
            .exec(&txn)
            .await?;
        set_task_status(&txn, task.id, status::CANCELLED, now).await?;
        append(
            &txn,
            event(&task, None, "task_cancelled", source).detail(json!({"runs": run_ids})),
            now,
        )
        .await?;
        let runs = agent_runs::Entity::find()
            .filter(agent_runs::Column::Id.is_in(run_ids))
            .all(&txn)
            .await?;
        let mut out = Vec::new();
        for run in runs {
            let hostname = nodes::Entity::find_by_id(run.node_id.clone())
                .one(&txn)
                .await?
                .map(|n| n.hostname);
            out.push(CancelledRun { run, hostname });
        }
        txn.commit().await?;
        Ok(out)
    }

    /// Re-queues a failed or cancelled task at the stage where it stopped, as a new job
    /// (next iteration of that stage) with a fresh attempt budget.
    pub async fn retry(&self, key: &str, source: Source, now: i64) -> StoreResult<jobs::Model> {
        let (_write, txn) = self.write_txn().await?;
        let task = tasks::Entity::find()
            .filter(tasks::Column::Key.eq(key))
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::NoSuchTask(key.to_string()))?;
        if task.status != status::FAILED && task.status != status::CANCELLED {
            return Err(StoreError::WrongState {
                key: key.to_string(),
                status: task.status,
                what: "only a failed or cancelled task can be retried".to_string(),
            });
        }
        let last = jobs::Entity::find()
            .filter(jobs::Column::TaskId.eq(task.id))
            .order_by_desc(jobs::Column::Id)
            .one(&txn)
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("jobs of task {key}")))?;
        let iteration = next_iteration(&txn, task.id, &last.stage).await?;
        let job = insert_job(&txn, task.id, &last.stage, iteration, now).await?;
        set_task_status(&txn, task.id, status::ACTIVE, now).await?;
        append(
            &txn,
            event(&task, Some(&job), "job_queued", source)
                .detail(json!({"stage": job.stage, "iteration": iteration, "retry_of": last.id})),
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(job)
    }

    // ---- dispatch and runs ---------------------------------------------------------

    /// Takes the first due queued job, marks it running and creates its run (which
    /// becomes `current_run_id`), all in one transaction. Jobs of older tasks go first,
    /// so that a task's next stage starts before new tasks are begun.
    ///
    /// `plane_on_start` is the Plane state a task's work item moves to when its first job
    /// starts; the effect is written in the same transaction.
    pub async fn dispatch(
        &self,
        node_id: &str,
        log_dir: &std::path::Path,
        plane_on_start: Option<&str>,
        now: i64,
    ) -> StoreResult<Option<Dispatched>> {
        let pg = self.backend() == DbBackend::Postgres;
        for _ in 0..8 {
            let (_write, txn) = self.write_txn().await?;
            let mut q = jobs::Entity::find()
                .filter(jobs::Column::Status.eq(status::QUEUED))
                .filter(jobs::Column::NotBefore.lte(now))
                .order_by_asc(jobs::Column::TaskId)
                .order_by_asc(jobs::Column::Id)
                .limit(1);
            if pg {
                q = q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
            }
            let Some(job) = q.one(&txn).await? else {
                return Ok(None);
            };
            let taken = jobs::Entity::update_many()
                .col_expr(jobs::Column::Status, Expr::value(status::RUNNING))
                .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
                .filter(jobs::Column::Id.eq(job.id))
                .filter(jobs::Column::Status.eq(status::QUEUED))
                .exec(&txn)
                .await?
                .rows_affected;
            if taken == 0 {
                continue;
            }
            let task = tasks::Entity::find_by_id(job.task_id)
                .one(&txn)
                .await?
                .ok_or_else(|| DbErr::RecordNotFound(format!("task {}", job.task_id)))?;
            let run = agent_runs::ActiveModel {
                job_id: Set(job.id),
                attempt: Set(job.attempt),
                node_id: Set(node_id.to_string()),
                pid: Set(None),
                started_at: Set(now),
                heartbeat_at: Set(now),
                log_path: Set(String::new()),
                ..Default::default()
            }
            .insert(&txn)
            .await?;
            let log_path = log_dir
                .join(&task.key)
                .join(format!("{}-{}-{}.log", run.id, job.stage, job.attempt))
                .to_string_lossy()
                .into_owned();
            let run = agent_runs::ActiveModel {
                id: Set(run.id),
                log_path: Set(log_path),
                ..Default::default()
            }
            .update(&txn)
            .await?;
            jobs::Entity::update_many()
                .col_expr(jobs::Column::CurrentRunId, Expr::value(run.id))
                .filter(jobs::Column::Id.eq(job.id))
                .exec(&txn)
                .await?;
            let job = jobs::Entity::find_by_id(job.id)
                .one(&txn)
                .await?
                .ok_or_else(|| DbErr::RecordNotFound(format!("job {}", job.id)))?;
            if let (Some(state), Some(issue)) = (plane_on_start, &task.plane_issue_id) {
                insert_effect(
                    &txn,
                    task.id,
                    run.id,
                    "plane_state",
                    format!("plane_state:{}:on_start", task.key),
                    json!({"issue": issue, "state": state}),
                    None,
                    now,
                )
                .await?;
            }
            txn.commit().await?;
            return Ok(Some(Dispatched { task, job, run }));
        }
        Ok(None)
    }

    /// Records the agent's pid once it is started, with the `run_started` event.
    pub async fn run_started(
        &self,
        run: &agent_runs::Model,
        task_id: i64,
        pid: i32,
        now: i64,
    ) -> StoreResult<()> {
        let detail = json!({"pid": pid, "attempt": run.attempt, "log": run.log_path});
        self.update_run(
            task_id,
            run,
            (agent_runs::Column::Pid, pid.into()),
            "run_started",
            detail,
            now,
        )
        .await
    }

    /// Sets one column of a run and its heartbeat, with an event, in one transaction.
    async fn update_run(
        &self,
        task_id: i64,
        run: &agent_runs::Model,
        (column, value): (agent_runs::Column, sea_orm::Value),
        kind: &'static str,
        detail: serde_json::Value,
        now: i64,
    ) -> StoreResult<()> {
        let (_write, txn) = self.write_txn().await?;
        agent_runs::Entity::update_many()
            .col_expr(column, Expr::value(value))
            .col_expr(agent_runs::Column::HeartbeatAt, Expr::value(now))
            .filter(agent_runs::Column::Id.eq(run.id))
            .exec(&txn)
            .await?;
        append(
            &txn,
            NewEvent {
                task_id,
                job_id: Some(run.job_id),
                run_id: Some(run.id),
                kind,
                source: Source::Monitor,
                detail,
            },
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// Heartbeats a run and tells whether its job still runs with it as current run
    /// (false after a cancel or a claim by someone else).
    pub async fn heartbeat_run(&self, job_id: i64, run_id: i64, now: i64) -> StoreResult<bool> {
        let write = self.lock_writes().await;
        agent_runs::Entity::update_many()
            .col_expr(agent_runs::Column::HeartbeatAt, Expr::value(now))
            .filter(agent_runs::Column::Id.eq(run_id))
            .exec(&self.db)
            .await?;
        drop(write);
        let job = jobs::Entity::find_by_id(job_id).one(&self.db).await?;
        Ok(job.is_some_and(|j| j.status == status::RUNNING && j.current_run_id == Some(run_id)))
    }

    /// Records the agent's exit, FIRST, before any finalization. Only the first record
    /// counts; returns whether this call recorded it.
    pub async fn record_exit(
        &self,
        task_id: i64,
        run: &agent_runs::Model,
        exit_code: i32,
        detail: serde_json::Value,
        now: i64,
    ) -> StoreResult<bool> {
        let (_write, txn) = self.write_txn().await?;
        let n = agent_runs::Entity::update_many()
            .col_expr(agent_runs::Column::ExitCode, Expr::value(exit_code))
            .col_expr(agent_runs::Column::ExitedAt, Expr::value(now))
            .filter(agent_runs::Column::Id.eq(run.id))
            .filter(agent_runs::Column::ExitedAt.is_null())
            .exec(&txn)
            .await?
            .rows_affected;
        if n == 1 {
            let mut detail = detail;
            detail["exit_code"] = json!(exit_code);
            append(
                &txn,
                NewEvent {
                    task_id,
                    job_id: Some(run.job_id),
                    run_id: Some(run.id),
                    kind: "run_exited",
                    source: Source::Monitor,
                    detail,
                },
                now,
            )
            .await?;
        }
        txn.commit().await?;
        Ok(n == 1)
    }

    pub async fn run(&self, run_id: i64) -> StoreResult<Option<agent_runs::Model>> {
        Ok(agent_runs::Entity::find_by_id(run_id).one(&self.db).await?)
    }

    pub async fn job(&self, job_id: i64) -> StoreResult<Option<jobs::Model>> {
        Ok(jobs::Entity::find_by_id(job_id).one(&self.db).await?)
    }

    /// The commit of the latest passed run of a task, which the next stage builds on.
    pub async fn last_commit(&self, task_id: i64) -> StoreResult<Option<String>> {
        let job_ids: Vec<i64> = jobs::Entity::find()
            .filter(jobs::Column::TaskId.eq(task_id))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|j| j.id)
            .collect();
        Ok(agent_runs::Entity::find()
            .filter(agent_runs::Column::JobId.is_in(job_ids))
            .filter(agent_runs::Column::CommitSha.is_not_null())
            .order_by_desc(agent_runs::Column::Id)
            .one(&self.db)
            .await?
            .and_then(|r| r.commit_sha))
    }

    /// Every running job with its current run and the run's node, for the Reaper.
    pub async fn running_jobs(&self) -> StoreResult<Vec<RunningJob>> {
        let jobs = jobs::Entity::find()
            .filter(jobs::Column::Status.eq(status::RUNNING))
            .order_by_asc(jobs::Column::Id)
            .all(&self.db)
            .await?;
        // Three queries whatever the number of running jobs, not three per job.
        let tasks = self.tasks_by_id(jobs.iter().map(|j| j.task_id)).await?;
        let runs: HashMap<i64, agent_runs::Model> = agent_runs::Entity::find()
            .filter(agent_runs::Column::Id.is_in(jobs.iter().filter_map(|j| j.current_run_id)))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let nodes: HashMap<String, nodes::Model> = nodes::Entity::find()
            .filter(nodes::Column::Id.is_in(runs.values().map(|r| r.node_id.clone())))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let Some(task) = tasks.get(&job.task_id).cloned() else {
                continue;
            };
            let run = job.current_run_id.and_then(|id| runs.get(&id).cloned());
            let node = run.as_ref().and_then(|r| nodes.get(&r.node_id));
            out.push(RunningJob {
                task,
                job,
                node_heartbeat_at: node.map(|n| n.heartbeat_at),
                node_pid: node.map(|n| n.pid),
                node_stopped: node.is_some_and(|n| n.stopped_at.is_some()),
                node_hostname: node.map(|n| n.hostname.clone()),
                run,
            });
        }
        Ok(out)
    }

    /// Tasks by id, in one query.
    async fn tasks_by_id(
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

    /// Counts of queued and running jobs.
    pub async fn queue_depth(&self) -> StoreResult<(u64, u64)> {
        use sea_orm::PaginatorTrait;
        let queued = jobs::Entity::find()
            .filter(jobs::Column::Status.eq(status::QUEUED))
            .count(&self.db)
            .await?;
        let running = jobs::Entity::find()
            .filter(jobs::Column::Status.eq(status::RUNNING))
            .count(&self.db)
            .await?;
        Ok((queued, running))
    }

    // ---- the fenced claim ----------------------------------------------------------

    /// The fenced claim. The job's row changes only if it is `running` with `run_id` as
    /// its current run; the winner writes everything the verdict implies in the same
    /// transaction. A loser writes nothing of its own; only the arbiter's `claim_lost`
    /// event records that it lost.
    pub async fn claim(
        &self,
        claim: &Claim,
        policy: &ClaimPolicy,
        now: i64,
    ) -> StoreResult<ClaimOutcome> {
        let (write, txn) = self.write_txn().await?;
        let job = if self.backend() == DbBackend::Postgres {
            jobs::Entity::find_by_id(claim.job_id)
                .lock(LockType::Update)
                .one(&txn)
                .await?
        } else {
            jobs::Entity::find_by_id(claim.job_id).one(&txn).await?
        };
        let fenced = job
            .as_ref()
            .is_some_and(|j| j.status == status::RUNNING && j.current_run_id == Some(claim.run_id));
        let Some(job) = job.filter(|_| fenced) else {
            txn.rollback().await?;
            drop(write);
            return self.record_loss(claim, now).await;
        };
        let task = tasks::Entity::find_by_id(job.task_id)
            .one(&txn)
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("task {}", job.task_id)))?;
        let run = agent_runs::Entity::find_by_id(claim.run_id)
            .one(&txn)
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("run {}", claim.run_id)))?;
        let (stages, max_iterations) = policy
            .pipelines
            .get(&task.pipeline)
            .cloned()
            .unwrap_or_else(|| (vec![job.stage.clone()], 1));

        // Choose the transition.
        let mut job_status = status::DONE;
        let mut next: Option<(String, i32)> = None;
        let mut task_end: Option<&str> = None;
        let mut retry_at: Option<i64> = None;
        let mut end_reason = String::new();
        match &claim.verdict {
            Verdict::Passed => match stages.iter().position(|s| *s == job.stage) {
                Some(i) if i + 1 < stages.len() => {
                    let stage = stages[i + 1].clone();
                    let it = next_iteration(&txn, task.id, &stage).await?;
                    next = Some((stage, it));
                }
                _ => task_end = Some(status::DONE),
            },
            Verdict::Rejected => {
                let target = policy.on_reject.get(&job.stage).cloned();
                match target {
                    Some(stage) => {
                        let it = next_iteration(&txn, task.id, &stage).await?;
                        if it > max_iterations {
                            job_status = status::FAILED;
                            task_end = Some(status::FAILED);
                            end_reason = format!(
                                "stage {stage} would run a {it}th time; max_iterations is {max_iterations}"
                            );
                        } else {
                            next = Some((stage, it));
                        }
                    }
                    None => {
                        job_status = status::FAILED;
                        task_end = Some(status::FAILED);
                        end_reason = format!("stage {} rejected and has no on_reject", job.stage);
                    }
                }
            }
            Verdict::Failed { .. } | Verdict::Lost { .. } | Verdict::TimedOut => {
                if (job.attempt as u32) < policy.retry.max_attempts {
                    job_status = status::QUEUED;
                    retry_at = Some(now + ms(policy.retry.backoff(job.attempt + 1)));
                } else {
                    job_status = status::FAILED;
                    task_end = Some(status::FAILED);
                    let why = match &claim.verdict {
                        Verdict::Failed { reason } | Verdict::Lost { reason } => {
                            format!("failed: {reason}")
                        }
                        _ => "timed out".to_string(),
                    };
                    end_reason = format!(
                        "attempt {} of {} {why}",
                        job.attempt, policy.retry.max_attempts
                    );
                }
            }
        }

        // The fenced write: it must change exactly the row read above.
        let mut upd = jobs::Entity::update_many()
            .col_expr(jobs::Column::Status, Expr::value(job_status))
            .col_expr(jobs::Column::UpdatedAt, Expr::value(now));
        if let Some(at) = retry_at {
            upd = upd
                .col_expr(jobs::Column::Attempt, Expr::value(job.attempt + 1))
                .col_expr(jobs::Column::NotBefore, Expr::value(at))
                .col_expr(jobs::Column::CurrentRunId, Expr::value(Option::<i64>::None));
        }
        let changed = upd
            .filter(jobs::Column::Id.eq(job.id))
            .filter(jobs::Column::Status.eq(status::RUNNING))
            .filter(jobs::Column::CurrentRunId.eq(claim.run_id))
            .exec(&txn)
            .await?
            .rows_affected;
        if changed != 1 {
            txn.rollback().await?;
            drop(write);
            return self.record_loss(claim, now).await;
        }
        agent_runs::Entity::update_many()
            .col_expr(
                agent_runs::Column::Outcome,
                Expr::value(claim.verdict.outcome()),
            )
            .col_expr(
                agent_runs::Column::CommitSha,
                Expr::value(claim.commit_sha.clone()),
            )
            .filter(agent_runs::Column::Id.eq(run.id))
            .exec(&txn)
            .await?;

        let ev =
            |kind: &'static str| event(&task, Some(&job), kind, claim.decided_by).run(claim.run_id);
        append(
            &txn,
            ev("claim_won").detail(json!({
                "verdict": claim.verdict, "decided_by": claim.decided_by,
                "attempt": job.attempt, "commit": claim.commit_sha, "tier": claim.tier,
            })),
            now,
        )
        .await?;
        if claim.decided_by == Source::Reaper {
            append(&txn, ev("reaped").detail(json!({"tier": claim.tier})), now).await?;
        }

        let mut next_job = None;
        if let Some((stage, iteration)) = &next {
            let nj = insert_job(&txn, task.id, stage, *iteration, now).await?;
            append(
                &txn,
                event(&task, Some(&nj), "job_queued", claim.decided_by)
                    .detail(json!({"stage": stage, "iteration": iteration, "after": job.stage})),
                now,
            )
            .await?;
            next_job = Some(nj);
        }
        if retry_at.is_none() {
            advances::Entity::insert(advances::ActiveModel {
                from_job_id: Set(job.id),
                to_job_id: Set(next_job.as_ref().map(|j| j.id)),
                run_id: Set(claim.run_id),
                decided_by: Set(claim.decided_by.as_str().to_string()),
                created_at: Set(now),
            })
            .exec_without_returning(&txn)
            .await?;
            append(
                &txn,
                ev("job_advanced").detail(json!({
                    "from_stage": job.stage, "job_status": job_status,
                    "to_job": next_job.as_ref().map(|j| j.id),
                    "to_stage": next_job.as_ref().map(|j| j.stage.clone()),
                })),
                now,
            )
            .await?;
        } else {
            append(
                &txn,
                ev("retry_scheduled").detail(json!({
                    "next_attempt": job.attempt + 1, "not_before": retry_at,
                    "backoff_ms": retry_at.map(|at| at - now),
                })),
                now,
            )
            .await?;
        }
        if let Some(end) = task_end {
            set_task_status(&txn, task.id, end, now).await?;
            let kind = if end == status::DONE {
                "task_done"
            } else {
                "task_failed"
            };
            append(
                &txn,
                ev(kind).detail(json!({"stage": job.stage, "reason": end_reason})),
                now,
            )
            .await?;
        }

        // The outbox: every external effect of this decision, in the same transaction.
        let mut outbox: Vec<(&str, String, serde_json::Value)> = Vec::new();
        let branch = format!("{}{}", policy.branch_prefix, task.key);
        if policy.push
            && let Some(sha) = &claim.commit_sha
        {
            outbox.push((
                "push",
                format!("push:{}", run.id),
                json!({"branch": branch, "commit": sha}),
            ));
        }
        if claim.verdict == Verdict::Passed
            && policy.pull_request_after.as_deref() == Some(job.stage.as_str())
        {
            outbox.push((
                "pull_request",
                format!("pull_request:{}", task.key),
                json!({"branch": branch, "base": policy.base_branch, "title": format!("{}: {}", task.key, task.title)}),
            ));
        }
        if let Some(issue) = &task.plane_issue_id {
            if policy.plane_comment {
                outbox.push((
                    "plane_comment",
                    format!("plane_comment:{}", run.id),
                    json!({
                        "issue": issue, "task": task.key, "stage": job.stage,
                        "verdict": claim.verdict.outcome(), "run_id": run.id,
                        "attempt": job.attempt, "commit": claim.commit_sha,
                        "next_stage": next.as_ref().map(|n| n.0.clone()),
                    }),
                ));
            }
            let state = match task_end {
                Some(s) if s == status::DONE => {
                    policy.plane_states.as_ref().and_then(|p| p.on_done.clone())
                }
                Some(_) => policy
                    .plane_states
                    .as_ref()
                    .and_then(|p| p.on_failed.clone()),
                None => None,
            };
            if let Some(state) = state {
                outbox.push((
                    "plane_state",
                    format!("plane_state:{}:{}", run.id, state),
                    json!({"issue": issue, "state": state}),
                ));
            }
        }
        let n_effects = outbox.len();
        let run_host = nodes::Entity::find_by_id(run.node_id.clone())
            .one(&txn)
            .await?
            .map(|n| n.hostname);
        for (kind, key, payload) in outbox {
            // A push needs the workspace, which is on the host that ran the stage.
            let host = if kind == "push" {
                run_host.clone()
            } else {
                None
            };
            insert_effect(&txn, task.id, run.id, kind, key, payload, host, now).await?;
        }
        txn.commit().await?;
        Ok(ClaimOutcome::Won(ClaimWon {
            job_status: job_status.to_string(),
            next_job,
            task_status: task_end.map(str::to_string),
            effects: n_effects,
        }))
    }

    /// Records a lost claim (the arbiter's own event) and tells the claimant which kind.
    async fn record_loss(&self, claim: &Claim, now: i64) -> StoreResult<ClaimOutcome> {
        let run = agent_runs::Entity::find_by_id(claim.run_id)
            .one(&self.db)
            .await?;
        // The outcome is written only by the winning claim (or by a cancel), so a set
        // outcome means this run's claim was applied already.
        let already = run
            .as_ref()
            .and_then(|r| r.outcome.as_deref())
            .is_some_and(|o| o != "cancelled");
        let job = jobs::Entity::find_by_id(claim.job_id).one(&self.db).await?;
        if let Some(job) = &job {
            let (_write, txn) = self.write_txn().await?;
            append(
                &txn,
                NewEvent {
                    task_id: job.task_id,
                    job_id: Some(job.id),
                    run_id: Some(claim.run_id),
                    kind: "claim_lost",
                    source: claim.decided_by,
                    detail: json!({
                        "verdict": claim.verdict, "decided_by": claim.decided_by, "tier": claim.tier,
                        "job_status": job.status, "current_run_id": job.current_run_id,
                        "already_advanced": already,
                    }),
                },
                now,
            )
            .await?;
            txn.commit().await?;
        }
        Ok(if already {
            ClaimOutcome::AlreadyAdvanced
        } else {
            ClaimOutcome::Lost
        })
    }

    // ---- the effects outbox ---------------------------------------------------------

    /// The effects this node may perform now: of each task, only its first pending
    /// effect (effects of one task run in order), when it is due and is either for any
    /// node or for this one.
    pub async fn due_effects(
        &self,
        hostname: &str,
        now: i64,
    ) -> StoreResult<Vec<(effects::Model, tasks::Model)>> {
        let pending = effects::Entity::find()
            .filter(effects::Column::Status.eq(status::PENDING))
            .order_by_asc(effects::Column::TaskId)
            .order_by_asc(effects::Column::Id)
            .all(&self.db)
            .await?;
        let mut seen = std::collections::HashSet::new();
        let due: Vec<effects::Model> = pending
            .into_iter()
            .filter(|e| seen.insert(e.task_id))
            .filter(|e| e.next_attempt_at <= now && e.host.as_deref().is_none_or(|h| h == hostname))
            .collect();
        let tasks = self.tasks_by_id(due.iter().map(|e| e.task_id)).await?;
        Ok(due
            .into_iter()
            .filter_map(|e| tasks.get(&e.task_id).cloned().map(|t| (e, t)))
            .collect())
    }

    /// Takes an effect for `lease_ms`: another worker (this node after a crash, or
    /// another node) takes it again only after the lease. False when someone else has.
    pub async fn lease_effect(
        &self,
        e: &effects::Model,
        lease_ms: i64,
        now: i64,
    ) -> StoreResult<bool> {
        let _write = self.lock_writes().await;
        let n = effects::Entity::update_many()
            .col_expr(effects::Column::NextAttemptAt, Expr::value(now + lease_ms))
            .col_expr(effects::Column::Attempts, Expr::value(e.attempts + 1))
            .col_expr(effects::Column::UpdatedAt, Expr::value(now))
            .filter(effects::Column::Id.eq(e.id))
            .filter(effects::Column::Status.eq(status::PENDING))
            .filter(effects::Column::Attempts.eq(e.attempts))
            .filter(effects::Column::NextAttemptAt.eq(e.next_attempt_at))
            .exec(&self.db)
            .await?
            .rows_affected;
        Ok(n == 1)
    }

    /// Records the outcome of one attempt of an effect (after [`Store::lease_effect`]):
    /// done, retried at `retry_at`, or failed for good; with its event.
    pub async fn finish_effect(
        &self,
        e: &effects::Model,
        outcome: EffectOutcome,
        source: Source,
        now: i64,
    ) -> StoreResult<()> {
        let (write, txn) = self.write_txn().await?;
        let mut upd =
            effects::Entity::update_many().col_expr(effects::Column::UpdatedAt, Expr::value(now));
        let mut event = None;
        match &outcome {
            EffectOutcome::Done { external_ref } => {
                upd = upd
                    .col_expr(effects::Column::Status, Expr::value(status::DONE))
                    .col_expr(
                        effects::Column::ExternalRef,
                        Expr::value(external_ref.clone()),
                    )
                    .col_expr(
                        effects::Column::LastError,
                        Expr::value(Option::<String>::None),
                    );
                event = Some((
                    "effect_done",
                    json!({"kind": e.kind, "key": e.idempotency_key, "attempt": e.attempts + 1, "external_ref": external_ref}),
                ));
            }
            EffectOutcome::Retry { error, at } => {
                upd = upd
                    .col_expr(effects::Column::NextAttemptAt, Expr::value(*at))
                    .col_expr(effects::Column::LastError, Expr::value(error.clone()));
            }
            EffectOutcome::Failed { error } => {
                upd = upd
                    .col_expr(effects::Column::Status, Expr::value(status::FAILED))
                    .col_expr(effects::Column::LastError, Expr::value(error.clone()));
                event = Some((
                    "effect_failed",
                    json!({"kind": e.kind, "key": e.idempotency_key, "attempts": e.attempts + 1, "error": error}),
                ));
            }
        }
        let changed = upd
            .filter(effects::Column::Id.eq(e.id))
            .filter(effects::Column::Status.eq(status::PENDING))
            .exec(&txn)
            .await?
            .rows_affected;
        // Another worker that took the effect after our lease ran out recorded it.
        if let Some((kind, detail)) = event.filter(|_| changed == 1) {
            append(
                &txn,
                NewEvent {
                    task_id: e.task_id,
                    job_id: None,
                    run_id: Some(e.run_id),
                    kind,
                    source,
                    detail,
                },
                now,
            )
            .await?;
        }
        txn.commit().await?;
        drop(write);
        Ok(())
    }

    /// The URL of the task's pull request, once its effect is done.
    pub async fn pull_request_url(&self, task_id: i64) -> StoreResult<Option<String>> {
        Ok(effects::Entity::find()
            .filter(effects::Column::TaskId.eq(task_id))
            .filter(effects::Column::Kind.eq("pull_request"))
            .filter(effects::Column::Status.eq(status::DONE))
            .one(&self.db)
            .await?
            .and_then(|e| e.external_ref))
    }

    pub async fn effect(&self, id: i64) -> StoreResult<Option<effects::Model>> {
        Ok(effects::Entity::find_by_id(id).one(&self.db).await?)
    }

    /// Forgets a delivery whose handling failed, so that the sender's redelivery counts.
    pub async fn forget_delivery(&self, id: &str) -> StoreResult<()> {
        let _write = self.lock_writes().await;
        webhook_deliveries::Entity::delete_by_id(id.to_string())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Remembers a webhook delivery; false when it was seen before.
    pub async fn record_delivery(&self, id: &str, source: Source, now: i64) -> StoreResult<bool> {
        let _write = self.lock_writes().await;
        let r = webhook_deliveries::Entity::insert(webhook_deliveries::ActiveModel {
            id: Set(id.to_string()),
            source: Set(source.as_str().to_string()),
            received_at: Set(now),
        })
        .on_conflict_do_nothing_on([webhook_deliveries::Column::Id])
        .exec(&self.db)
        .await?;
        Ok(matches!(r, sea_orm::TryInsertResult::Inserted(_)))
    }

    /// The newest events of these kinds, across tasks, newest first.
    pub async fn recent_events(
        &self,
        kinds: &[&str],
        limit: u64,
    ) -> StoreResult<Vec<events::Model>> {
        Ok(events::Entity::find()
            .filter(events::Column::Kind.is_in(kinds.iter().copied()))
            .order_by_desc(events::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Effects that failed for good, newest first.
    pub async fn failed_effects(&self, limit: u64) -> StoreResult<Vec<effects::Model>> {
        Ok(effects::Entity::find()
            .filter(effects::Column::Status.eq(status::FAILED))
            .order_by_desc(effects::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    // ---- events and nodes ----------------------------------------------------------

    pub async fn append_event(&self, ev: NewEvent, now: i64) -> StoreResult<()> {
        let _write = self.lock_writes().await;
        append(&self.db, ev, now).await
    }

    /// Registers a fresh node (one per boot) and returns its id.
    pub async fn register_node(&self, hostname: &str, pid: i32, now: i64) -> StoreResult<String> {
        let _write = self.lock_writes().await;
        let id = format!("{hostname}-{pid}-{now:x}");
        nodes::ActiveModel {
            id: Set(id.clone()),
            hostname: Set(hostname.to_string()),
            pid: Set(pid),
            started_at: Set(now),
            heartbeat_at: Set(now),
            stopped_at: Set(None),
        }
        .insert(&self.db)
        .await?;
        Ok(id)
    }

    pub async fn heartbeat_node(&self, node_id: &str, now: i64) -> StoreResult<()> {
        let _write = self.lock_writes().await;
        nodes::Entity::update_many()
            .col_expr(nodes::Column::HeartbeatAt, Expr::value(now))
            .filter(nodes::Column::Id.eq(node_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    pub async fn stop_node(&self, node_id: &str, now: i64) -> StoreResult<()> {
        let _write = self.lock_writes().await;
        nodes::Entity::update_many()
            .col_expr(nodes::Column::StoppedAt, Expr::value(now))
            .filter(nodes::Column::Id.eq(node_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// The runs of earlier boots of `hostname` whose job still runs with them: the
    /// candidates for adoption after a restart.
    pub async fn orphaned_runs(
        &self,
        hostname: &str,
        own_node: &str,
    ) -> StoreResult<Vec<RunningJob>> {
        Ok(self
            .running_jobs()
            .await?
            .into_iter()
            .filter(|r| {
                r.node_hostname.as_deref() == Some(hostname)
                    && r.run.as_ref().is_some_and(|run| run.node_id != own_node)
            })
            .collect())
    }

    /// Moves a run to this node after adoption, so that its heartbeat is ours.
    pub async fn adopt_run(
        &self,
        task_id: i64,
        run: &agent_runs::Model,
        node_id: &str,
        now: i64,
    ) -> StoreResult<()> {
        let detail = json!({"pid": run.pid, "from_node": run.node_id, "to_node": node_id});
        self.update_run(
            task_id,
            run,
            (agent_runs::Column::NodeId, node_id.into()),
            "run_adopted",
            detail,
            now,
        )
        .await
    }

    /// Raw counts used by the invariant tests and `status`.
    pub async fn advances_of(&self, job_id: i64) -> StoreResult<Vec<advances::Model>> {
        Ok(advances::Entity::find()
            .filter(advances::Column::FromJobId.eq(job_id))
            .all(&self.db)
            .await?)
    }

    pub async fn effects_of_run(&self, run_id: i64) -> StoreResult<Vec<effects::Model>> {
        Ok(effects::Entity::find()
            .filter(effects::Column::RunId.eq(run_id))
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
}

#[allow(clippy::too_many_arguments)]
async fn insert_effect<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
    run_id: i64,
    kind: &str,
    key: String,
    payload: serde_json::Value,
    host: Option<String>,
    now: i64,
) -> StoreResult<()> {
    effects::Entity::insert(effects::ActiveModel {
        task_id: Set(task_id),
        run_id: Set(run_id),
        kind: Set(kind.to_string()),
        idempotency_key: Set(key),
        status: Set(status::PENDING.to_string()),
        attempts: Set(0),
        next_attempt_at: Set(now),
        last_error: Set(None),
        external_ref: Set(None),
        payload: Set(payload.to_string()),
        created_at: Set(now),
        updated_at: Set(now),
        host: Set(host),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([effects::Column::IdempotencyKey])
    .exec(db)
    .await?;
    Ok(())
}

async fn insert_job<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
    stage: &str,
    iteration: i32,
    now: i64,
) -> StoreResult<jobs::Model> {
    Ok(jobs::ActiveModel {
        task_id: Set(task_id),
        stage: Set(stage.to_string()),
        iteration: Set(iteration),
        status: Set(status::QUEUED.to_string()),
        attempt: Set(1),
        current_run_id: Set(None),
        not_before: Set(now),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(db)
    .await?)
}

async fn next_iteration<C: ConnectionTrait>(db: &C, task_id: i64, stage: &str) -> StoreResult<i32> {
    let last = jobs::Entity::find()
        .filter(jobs::Column::TaskId.eq(task_id))
        .filter(jobs::Column::Stage.eq(stage))
        .order_by_desc(jobs::Column::Iteration)
        .one(db)
        .await?;
    Ok(last.map_or(1, |j| j.iteration + 1))
}

async fn set_task_status<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
    status: &str,
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

fn event(
    task: &tasks::Model,
    job: Option<&jobs::Model>,
    kind: &'static str,
    source: Source,
) -> NewEvent {
    NewEvent {
        task_id: task.id,
        job_id: job.map(|j| j.id),
        run_id: None,
        kind,
        source,
        detail: json!({}),
    }
}

impl NewEvent {
    fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    fn run(mut self, run_id: i64) -> Self {
        self.run_id = Some(run_id);
        self
    }
}

async fn append<C: ConnectionTrait>(db: &C, ev: NewEvent, now: i64) -> StoreResult<()> {
    events::Entity::insert(events::ActiveModel {
        task_id: Set(ev.task_id),
        job_id: Set(ev.job_id),
        run_id: Set(ev.run_id),
        kind: Set(ev.kind.to_string()),
        source: Set(ev.source.as_str().to_string()),
        detail: Set(ev.detail.to_string()),
        at: Set(now),
        ..Default::default()
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

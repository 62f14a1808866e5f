//! Dispatch: a due queued job taken for a node, with its run, in one transaction; the
//! taking of a job, which the hand-off shares (the `handoff` module, ADR 0001); and the
//! release of a taken job whose Monitor cannot start.

use std::collections::HashMap;
use std::path::Path;

use entity::{agent_runs, effects, jobs, nodes, tasks};
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, Query, SelectStatement};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, Set,
};

use serde_json::json;

use super::outbox::insert_effect;
use super::tasks::lock_task;
use super::{NewEvent, Store, StoreResult, append, must};
use crate::model::{
    EffectKind, EffectStatus, EventKind, EventSource, JobStatus, RunOutcome, TaskStatus,
};
use crate::policy::Policy;

/// A job taken by a dispatcher, with the run created for it in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub task: tasks::Model,
    pub job: jobs::Model,
    pub run: agent_runs::Model,
    /// What the claim that handed the job off knew of the task's last commit.
    pub last_commit: KnownLastCommit,
}

/// The task's last commit as the claim that handed a job off knew it, so that the job's
/// Monitor need not read it (ADR 0007).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum KnownLastCommit {
    /// Not known: the job was taken by dispatch (a task's first stage, a retry, a job
    /// queued by the Reaper's claim), or handed off after a run of another node. Its
    /// Monitor reads the record.
    #[default]
    Unknown,
    /// The stage before ran on this node, in this host's worktree, and this is its
    /// commit (baton's auto-commit, or the agent's own): the task's last.
    Commit(String),
    /// The stage before ran on this node, in this host's worktree, and committed nothing:
    /// the task's branch here holds the last commit.
    OnBranch,
}

/// Who takes a job: the node whose agent will run it, the folder of its runs' logs, and
/// the policy whose start effect and stage bounds apply (none in some tests).
#[derive(Debug, Clone, Copy)]
pub struct Taker<'a> {
    pub node_id: &'a str,
    pub log_dir: &'a Path,
    pub policy: Option<&'a Policy>,
}

impl Store {
    /// Takes the first due queued job, marks it running and creates its run (which
    /// becomes `current_run_id`), all in one transaction. Jobs of older tasks go first,
    /// so that a task's next stage starts before new tasks are begun.
    ///
    /// The policy's start effect (the work item moving to Plane's `on_start` state) is
    /// written in the same transaction; without a policy there is none.
    pub async fn dispatch(
        &self,
        node_id: &str,
        log_dir: &Path,
        policy: Option<&Policy>,
        now: i64,
    ) -> StoreResult<Option<Dispatched>> {
        let taker = Taker {
            node_id,
            log_dir,
            policy,
        };
        let mut skip: Vec<i64> = Vec::new();
        let limits = policy.map(|p| &p.stage_limits).filter(|l| !l.is_empty());
        // Stages at their bound (`max_concurrent`) are skipped, not waited for.
        let mut full: Vec<String> = match limits {
            Some(limits) => {
                let running = self.running_by_stage(limits.keys(), &self.db).await?;
                limits
                    .iter()
                    .filter(|(stage, n)| running.get(*stage).copied().unwrap_or(0) >= **n as u64)
                    .map(|(stage, _)| stage.clone())
                    .collect()
            }
            None => Vec::new(),
        };
        let hostname = self.node_host(node_id).await?;
        for _ in 0..8 {
            let (_write, txn) = self.write_txn().await?;
            let Some(candidate) = candidate(&txn, hostname.as_deref(), &full, &skip, now).await?
            else {
                return Ok(None);
            };
            // The task's row first (as cancel and claim take it), then the job's; either
            // held by another transaction is skipped, not waited for.
            let mut task_q = tasks::Entity::find_by_id(candidate.task_id);
            if self.is_postgres() {
                task_q = task_q.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
            }
            let task = task_q
                .one(&txn)
                .await?
                .filter(|t| t.status == TaskStatus::Active);
            // On PostgreSQL the job is read again under its row lock; SQLite's write
            // transaction already excludes every other writer, so the candidate stands.
            let job = if self.is_postgres() {
                jobs::Entity::find_by_id(candidate.id)
                    .filter(jobs::Column::Status.eq(JobStatus::Queued))
                    .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                    .one(&txn)
                    .await?
            } else {
                Some(candidate.clone())
            };
            let (job, task) = match (job, task) {
                (Some(job), Some(task)) => (job, task),
                _ => {
                    txn.rollback().await?;
                    skip.push(candidate.id);
                    continue;
                }
            };
            if let Some(limit) = limits.and_then(|l| l.get(&job.stage)) {
                // Counted again under a lock of the stage, so that two dispatchers never
                // both take its last place.
                if self.is_postgres() {
                    stage_lock(&txn, &job.stage).await?;
                }
                let running = self.running_by_stage([&job.stage], &txn).await?;
                if running.get(&job.stage).copied().unwrap_or(0) >= u64::from(*limit) {
                    txn.rollback().await?;
                    full.push(job.stage.clone());
                    continue;
                }
            }
            match take(&txn, &taker, task, job, now).await? {
                Some(d) => {
                    txn.commit().await?;
                    return Ok(Some(d));
                }
                None => {
                    txn.rollback().await?;
                    skip.push(candidate.id);
                }
            }
        }
        Ok(None)
    }

    /// Puts back a job taken for this node whose Monitor cannot start (the node is
    /// stopping): queued again with the same attempt, its run's outcome `cancelled` (its
    /// agent never started), with a `job_queued` event saying why. Fenced like a claim:
    /// nothing changes unless the job still runs with that run. True when it was put back.
    pub async fn release_run(&self, d: &Dispatched, reason: &str, now: i64) -> StoreResult<bool> {
        let (_write, txn) = self.write_txn().await?;
        lock_task(&txn, d.task.id, self.is_postgres()).await?;
        let released = jobs::Entity::update_many()
            .col_expr(jobs::Column::Status, Expr::value(JobStatus::Queued))
            .col_expr(jobs::Column::CurrentRunId, Expr::value(Option::<i64>::None))
            .col_expr(jobs::Column::UpdatedAt, Expr::value(now))
            .filter(jobs::Column::Id.eq(d.job.id))
            .filter(jobs::Column::Status.eq(JobStatus::Running))
            .filter(jobs::Column::CurrentRunId.eq(d.run.id))
            .exec(&txn)
            .await?
            .rows_affected
            == 1;
        if released {
            agent_runs::Entity::update_many()
                .col_expr(
                    agent_runs::Column::Outcome,
                    Expr::value(RunOutcome::Cancelled),
                )
                .filter(agent_runs::Column::Id.eq(d.run.id))
                .exec(&txn)
                .await?;
            let detail = json!({
                "stage": d.job.stage, "attempt": d.job.attempt,
                "released_run": d.run.id, "reason": reason,
            });
            let ev = NewEvent::of(
                d.task.id,
                Some(&d.job),
                EventKind::JobQueued,
                EventSource::Dispatcher,
            );
            append(&txn, ev.run(d.run.id).detail(detail), now).await?;
        }
        txn.commit().await?;
        Ok(released)
    }

    /// The hostname of node `node_id`, read once per process; `None` while it has no row.
    pub(super) async fn node_host(&self, node_id: &str) -> StoreResult<Option<String>> {
        if let Some(h) = self
            .node_hosts
            .lock()
            .ok()
            .and_then(|m| m.get(node_id).cloned())
        {
            return Ok(Some(h));
        }
        let host = nodes::Entity::find_by_id(node_id.to_string())
            .one(&self.db)
            .await?
            .map(|n| n.hostname);
        if let (Some(h), Ok(mut m)) = (&host, self.node_hosts.lock()) {
            m.insert(node_id.to_string(), h.clone());
        }
        Ok(host)
    }

    /// How many jobs of each of `stages` are running, across the database.
    async fn running_by_stage<'a, C: ConnectionTrait>(
        &self,
        stages: impl IntoIterator<Item = &'a String>,
        db: &C,
    ) -> StoreResult<HashMap<String, u64>> {
        let stages: Vec<String> = stages.into_iter().cloned().collect();
        let mut out = HashMap::new();
        for job in jobs::Entity::find()
            .filter(jobs::Column::Status.eq(JobStatus::Running))
            .filter(jobs::Column::Stage.is_in(stages))
            .all(db)
            .await?
        {
            *out.entry(job.stage).or_insert(0) += 1;
        }
        Ok(out)
    }
}

/// The first dispatchable job for a node on `hostname`: queued, due, of an active task
/// whose push does not wait for another host, of a stage not in `full`, not in `skip`;
/// jobs of older tasks first.
async fn candidate<C: ConnectionTrait>(
    db: &C,
    hostname: Option<&str>,
    full: &[String],
    skip: &[i64],
    now: i64,
) -> StoreResult<Option<jobs::Model>> {
    Ok(candidates(hostname, full, skip, now).one(db).await?)
}

/// The query of [`candidate`], every qualifying job in the order dispatch takes them.
pub(super) fn candidates(
    hostname: Option<&str>,
    full: &[String],
    skip: &[i64],
    now: i64,
) -> sea_orm::Select<jobs::Entity> {
    // Each job read is checked against its own task (a primary-key read), so that the
    // read of the queued jobs in task order stops at the first that qualifies.
    let active = Query::select()
        .expr(Expr::val(1))
        .from(tasks::Entity)
        .and_where(
            Expr::col((tasks::Entity, tasks::Column::Id))
                .equals((jobs::Entity, jobs::Column::TaskId)),
        )
        .and_where(tasks::Column::Status.eq(TaskStatus::Active))
        .to_owned();
    jobs::Entity::find()
        .filter(jobs::Column::Status.eq(JobStatus::Queued))
        .filter(jobs::Column::NotBefore.lte(now))
        .filter(Expr::exists(active))
        .filter(jobs::Column::TaskId.not_in_subquery(elsewhere(hostname)))
        .filter(jobs::Column::Stage.is_not_in(full.to_vec()))
        .filter(jobs::Column::Id.is_not_in(skip.to_vec()))
        .order_by_asc(jobs::Column::TaskId)
        .order_by_asc(jobs::Column::Id)
}

/// The tasks whose push waits for a host other than `hostname`: a task's last commit is
/// only there, so its next stage runs there or after the push (ADR 0010).
pub(super) fn elsewhere(hostname: Option<&str>) -> SelectStatement {
    Query::select()
        .column(effects::Column::TaskId)
        .from(effects::Entity)
        .and_where(effects::Column::Kind.eq(EffectKind::Push))
        .and_where(effects::Column::Status.eq(EffectStatus::Pending))
        .and_where(match hostname {
            Some(h) => effects::Column::Host.ne(h),
            None => effects::Column::Host.is_not_null(),
        })
        .to_owned()
}

/// Takes queued `job` of `task` for `taker` (dispatch has just locked it): the job running
/// with its new run (which becomes `current_run_id`), the policy's start effect. `None`
/// when it was no longer queued, and nothing was written.
///
/// Two statements: the job's update draws the run's id ([`next_run_id`]), and the run is
/// inserted with that id and its log's path.
pub(super) async fn take(
    txn: &DatabaseTransaction,
    taker: &Taker<'_>,
    task: tasks::Model,
    job: jobs::Model,
    now: i64,
) -> StoreResult<Option<Dispatched>> {
    let backend = txn.get_database_backend();
    let mut update = Query::update();
    update
        .table(jobs::Entity)
        .value(jobs::Column::Status, JobStatus::Running)
        .value(jobs::Column::UpdatedAt, now)
        .value(jobs::Column::CurrentRunId, next_run_id(backend))
        .and_where(jobs::Column::Id.eq(job.id))
        .and_where(jobs::Column::Status.eq(JobStatus::Queued))
        .returning_all();
    let stmt = backend.build(&update);
    let Some(job) = jobs::Entity::find().from_raw_sql(stmt).one(txn).await? else {
        return Ok(None);
    };
    let run = insert_run(txn, taker, &task, &job, now).await?;
    Ok(Some(taken(txn, taker, task, job, run, now).await?))
}

/// The id of a new run, drawn by the statement that takes its job: from PostgreSQL's
/// sequence of the runs' ids; on SQLite, which has none, the next id the runs' table
/// (`AUTOINCREMENT`) would give, past both its highest id and the highest it ever gave.
/// No other run can be given that id before the run's insert: SQLite's write transaction
/// excludes every other writer.
pub(super) fn next_run_id(backend: DbBackend) -> Expr {
    Expr::cust(match backend {
        DbBackend::Postgres => "nextval(pg_get_serial_sequence('agent_runs', 'id'))",
        _ => {
            "(SELECT MAX(COALESCE(MAX(\"id\"), 0), COALESCE((SELECT \"seq\" FROM \"sqlite_sequence\" \
             WHERE \"name\" = 'agent_runs'), 0)) + 1 FROM \"agent_runs\")"
        }
    })
}

/// Inserts the run of `job`, just taken for `taker` with the run's id drawn
/// ([`next_run_id`]).
async fn insert_run(
    txn: &DatabaseTransaction,
    taker: &Taker<'_>,
    task: &tasks::Model,
    job: &jobs::Model,
    now: i64,
) -> StoreResult<agent_runs::Model> {
    let id = must(job.current_run_id, || format!("the run of job {}", job.id))?;
    let mut run = new_run(taker, job.id, job.attempt, now);
    run.id = Set(id);
    run.log_path = Set(log_path(taker, task, job, id));
    Ok(run.insert(txn).await?)
}

/// A job just taken with its run, and the policy's start effect written: what its Monitor
/// starts from.
pub(super) async fn taken(
    txn: &DatabaseTransaction,
    taker: &Taker<'_>,
    task: tasks::Model,
    job: jobs::Model,
    run: agent_runs::Model,
    now: i64,
) -> StoreResult<Dispatched> {
    if let Some(effect) = taker.policy.and_then(|p| p.start_effect(&task)) {
        insert_effect(txn, task.id, run.id, effect, None, now).await?;
    }
    Ok(Dispatched {
        task,
        job,
        run,
        last_commit: KnownLastCommit::Unknown,
    })
}

/// The path of the log of run `id` of `job`: its name holds the run's id.
fn log_path(taker: &Taker<'_>, task: &tasks::Model, job: &jobs::Model, id: i64) -> String {
    let (before, after) = log_path_around(taker, task, &job.stage, job.attempt);
    format!("{before}{id}{after}")
}

/// What comes before and after the run's id in the path of the log of a run of `task`'s
/// job of `stage` and `attempt`.
pub(super) fn log_path_around(
    taker: &Taker<'_>,
    task: &tasks::Model,
    stage: &str,
    attempt: i32,
) -> (String, String) {
    let dir = taker.log_dir.join(&task.key).join("");
    (
        dir.to_string_lossy().into_owned(),
        format!("-{stage}-{attempt}.log"),
    )
}

/// The row of a new run of job `job_id` (its attempt `attempt`) for `taker`, without its
/// id and its log's path, which holds the id.
pub(super) fn new_run(
    taker: &Taker<'_>,
    job_id: i64,
    attempt: i32,
    now: i64,
) -> agent_runs::ActiveModel {
    agent_runs::ActiveModel {
        job_id: Set(job_id),
        attempt: Set(attempt),
        node_id: Set(taker.node_id.to_string()),
        pid: Set(None),
        started_at: Set(now),
        heartbeat_at: Set(now),
        log_path: Set(String::new()),
        ..Default::default()
    }
}

/// PostgreSQL's transaction-scoped advisory lock of a stage: dispatchers of several nodes
/// take a bounded stage's places one at a time.
async fn stage_lock(txn: &DatabaseTransaction, stage: &str) -> StoreResult<()> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("baton.stage:{stage}").as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest[..8]);
    let stmt = sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock($1)",
        [i64::from_be_bytes(key).into()],
    );
    txn.query_one_raw(stmt).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sea_orm::{QueryTrait, Statement};

    use super::*;

    /// Dispatch's query reads the queued jobs through the index by status and task, in
    /// the order it wants them, so that it stops at the first that qualifies: no sort of
    /// every queued job, no list of every active task.
    #[tokio::test]
    async fn dispatch_reads_the_queued_jobs_in_order_without_sorting_them() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("plan.db").display());
        Store::open(&url).await.unwrap().close().await;
        // Connections opened after the migrations: a connection's schema is read when it
        // opens, and EXPLAIN plans with it as it is.
        let store = Store::connect(&url).await.unwrap();
        let query = candidates(Some("host"), &["analyst".to_string()], &[7], 0)
            .limit(1)
            .build(DbBackend::Sqlite);
        let explain = Statement::from_sql_and_values(
            DbBackend::Sqlite,
            format!("EXPLAIN QUERY PLAN {}", query.sql),
            query.values.map(|v| v.0).unwrap_or_default(),
        );
        let plan: Vec<String> = store
            .db
            .query_all_raw(explain)
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String>("", "detail").unwrap())
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("SEARCH jobs USING INDEX jobs_status_task (status=?)"),
            "{plan}"
        );
        // Each job's own task, by its key (not a list of every active task).
        let task = plan.lines().find(|l| l.starts_with("SEARCH tasks"));
        assert!(task.is_some_and(|l| l.contains("id=?")), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }
}

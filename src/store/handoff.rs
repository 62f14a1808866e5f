//! The hand-off (ADR 0001): a won claim that queues its task's next job takes it, in the
//! claim's transaction, for the node of the run it finalized, when dispatch would take
//! it first (it is due, its stage has no bound, and no job of an older task waits), so
//! that the node's freed place goes to the task's next stage without a dispatch of its
//! own. On PostgreSQL the job is inserted already taken, with its run, in one statement
//! ([`queue_taken`]), which for a claim with nothing for the outbox also holds the
//! claim's fence, its run's outcome and exit ([`fence_and_queue`]).

use entity::{agent_runs, jobs, tasks};
use sea_orm::sea_query::{
    Alias, CommonTableExpression, Expr, ExprTrait, InsertStatement, Query, SelectStatement,
    WithClause,
};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    FromQueryResult, IdenStatic, Iterable, QueryFilter, QuerySelect, QueryTrait,
};

use super::batch::{Batch, returned};
use super::dispatch::{candidates, elsewhere, log_path_around, new_run, next_run_id, taken};
use super::fence::{
    EXIT_WRITTEN, START_WRITTEN, exit_events, fence_batch, fence_parts, fenced, fenced_run,
};
use super::tasks::{FIRST_ATTEMPT, insert_job, new_job};
use super::{Dispatched, NewEvent, RunExit, Store, StoreResult, Taker, must};
use crate::model::{Claim, JobStatus};
use crate::policy::JobChange;

/// Who takes the next job a claim queues, and the host it runs on.
pub(super) struct HandOff<'a> {
    pub taker: Taker<'a>,
    hostname: Option<String>,
}

impl Store {
    /// The hand-off of a next job of `stage` to `taker`; `None` when the stage is bounded
    /// (`max_concurrent`): dispatch takes a bounded stage's places one at a time.
    pub(super) async fn hand_off_to<'a>(
        &self,
        taker: Taker<'a>,
        stage: &str,
    ) -> StoreResult<Option<HandOff<'a>>> {
        if taker
            .policy
            .is_some_and(|p| p.stage_limits.contains_key(stage))
        {
            return Ok(None);
        }
        let hostname = self.node_host(taker.node_id).await?;
        Ok(Some(HandOff { taker, hostname }))
    }
}

/// The next job of `task` a won claim queues; with `hand`, taken for its taker when it
/// comes first.
pub(super) async fn queue_next(
    txn: &DatabaseTransaction,
    task: &tasks::Model,
    (stage, iteration): (&str, i32),
    feedback: Option<&str>,
    hand: Option<&HandOff<'_>>,
    now: i64,
) -> StoreResult<(jobs::Model, Option<Dispatched>)> {
    let Some(hand) = hand else {
        let job = insert_job(txn, task.id, stage, iteration, feedback, now).await?;
        return Ok((job, None));
    };
    if txn.get_database_backend() == DbBackend::Postgres {
        return queue_taken(txn, task, (stage, iteration), feedback, hand, now).await;
    }
    // SQLite: the job's insert and its run's, in one batch.
    let mut batch = Batch::default();
    let at = (stage, iteration);
    let (insert_job, insert_run) = taken_inserts(task, at, feedback, hand, DbBackend::Sqlite, now)?;
    batch.push(&insert_job).push(&insert_run);
    let rows = batch.run(txn).await?;
    taken_rows(txn, &rows, task, hand, now).await
}

/// PostgreSQL: the next job inserted running, with its run's id drawn from the runs'
/// sequence, and its run inserted, when it comes first; else inserted queued. One
/// statement: the job's insert ([`taken_job`]) and the run's in a `WITH`, then both rows
/// read.
async fn queue_taken(
    txn: &DatabaseTransaction,
    task: &tasks::Model,
    at: (&str, i32),
    feedback: Option<&str>,
    hand: &HandOff<'_>,
    now: i64,
) -> StoreResult<(jobs::Model, Option<Dispatched>)> {
    let ctes = taken_parts(task, at, feedback, hand, now)?;
    let row = query_with(txn, taken_columns(Query::select()), ctes).await?;
    let row = must(row, || format!("the next job of task {}", task.id))?;
    read_taken(txn, &row, task, hand, now).await
}

/// A won claim's fence, its run's outcome (with the exit it carries) and its task's next
/// job, taken for `hand`'s taker when it comes first ([`queue_taken`]), in one call: one
/// statement on PostgreSQL, one [`Batch`] on SQLite. The run, the exit's events, the job
/// and what was taken.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fence_and_queue(
    txn: &DatabaseTransaction,
    (job, claim): (&jobs::Model, &Claim),
    change: (JobChange, Option<&str>),
    exit: Option<&RunExit>,
    task: &tasks::Model,
    (at, feedback): ((&str, i32), Option<&str>),
    hand: &HandOff<'_>,
    now: i64,
) -> StoreResult<FencedAndQueued> {
    if txn.get_database_backend() == DbBackend::Sqlite {
        // One batch: the fence's, then the job's insert and its run's.
        let mut batch = fence_batch(job, claim, change, exit, None, now);
        let (insert_job, insert_run) =
            taken_inserts(task, at, feedback, hand, DbBackend::Sqlite, now)?;
        batch.push(&insert_job).push(&insert_run);
        let rows = batch.run(txn).await?;
        let (run, exited, _) = fenced(&rows, claim, exit)?;
        let (next, handed) = taken_rows(txn, &rows, task, hand, now).await?;
        return Ok((run, exited, next, handed));
    }
    let (mut ctes, outcome) = fence_parts(job, claim, change, exit, now);
    let o = Alias::new("o");
    ctes.push(cte(outcome, &o));
    ctes.extend(taken_parts(task, at, feedback, hand, now)?);
    let mut select = Query::select();
    select.exprs(prefixed::<agent_runs::Entity>(&o, OUTCOME));
    if exit.is_some() {
        select.exprs(prefixed_names(&o, OUTCOME, [EXIT_WRITTEN, START_WRITTEN]));
    }
    select.from(o);
    let row = query_with(txn, taken_columns(select), ctes).await?;
    let row = must(row, || fenced_run(claim))?;
    let run = agent_runs::Model::from_query_result(&row, OUTCOME)?;
    let exited = exit_events(&row, OUTCOME, exit)?;
    let (next, handed) = read_taken(txn, &row, task, hand, now).await?;
    Ok((run, exited, next, handed))
}

/// What [`fence_and_queue`] wrote: the claim's run, its exit's events, the next job and,
/// when it was taken, its dispatch.
pub(super) type FencedAndQueued = (
    agent_runs::Model,
    Vec<(NewEvent, i64)>,
    jobs::Model,
    Option<Dispatched>,
);

/// Runs `select` with `ctes` as its `WITH`.
async fn query_with(
    txn: &DatabaseTransaction,
    select: SelectStatement,
    ctes: Vec<CommonTableExpression>,
) -> StoreResult<Option<sea_orm::QueryResult>> {
    let mut with = WithClause::new();
    for c in ctes {
        with.cte(c);
    }
    let stmt = select.with(with);
    Ok(txn.query_one_raw(DbBackend::Postgres.build(&stmt)).await?)
}

/// `select`, reading also the rows [`taken_parts`] inserted: the job's and the run's, if
/// any.
fn taken_columns(mut select: SelectStatement) -> SelectStatement {
    let (j, r) = (Alias::new(J), Alias::new(R));
    select
        .exprs(prefixed::<jobs::Entity>(&j, JOB))
        .exprs(prefixed::<agent_runs::Entity>(&r, RUN))
        .from(j)
        .left_join(r, Expr::val(true))
        .to_owned()
}

/// The next job and, when it was taken, its dispatch (with the start effect written),
/// from a row of [`taken_columns`].
async fn read_taken(
    txn: &DatabaseTransaction,
    row: &sea_orm::QueryResult,
    task: &tasks::Model,
    hand: &HandOff<'_>,
    now: i64,
) -> StoreResult<(jobs::Model, Option<Dispatched>)> {
    let job = jobs::Model::from_query_result(row, JOB)?;
    if row
        .try_get::<Option<i64>>(RUN, agent_runs::Column::Id.as_str())?
        .is_none()
    {
        return Ok((job, None));
    }
    let run = agent_runs::Model::from_query_result(row, RUN)?;
    let d = taken(txn, &hand.taker, task.clone(), job.clone(), run, now).await?;
    Ok((job, Some(d)))
}

/// The queries of the `WITH` of [`queue_taken`]: the job's insert (`j`, [`taken_job`])
/// and its run's (`r`), which inserts nothing when the job was not taken.
fn taken_parts(
    task: &tasks::Model,
    at: (&str, i32),
    feedback: Option<&str>,
    hand: &HandOff<'_>,
    now: i64,
) -> StoreResult<Vec<CommonTableExpression>> {
    let (insert_job, insert_run) =
        taken_inserts(task, at, feedback, hand, DbBackend::Postgres, now)?;
    Ok(vec![
        cte(insert_job, &Alias::new(J)),
        cte(insert_run, &Alias::new(R)),
    ])
}

/// The next job's insert ([`taken_job`]) and its run's, which reads the job as `j`: on
/// PostgreSQL the job's insert's result, in a `WITH`; on SQLite, where the two follow
/// each other in a [`Batch`], the row it inserted (`last_insert_rowid()`).
fn taken_inserts(
    task: &tasks::Model,
    (stage, iteration): (&str, i32),
    feedback: Option<&str>,
    hand: &HandOff<'_>,
    backend: DbBackend,
    now: i64,
) -> StoreResult<(InsertStatement, InsertStatement)> {
    let insert_job = taken_job(task, (stage, iteration), feedback, hand, backend, now)?;

    // The run's row as dispatch writes it, but for what only the job's insert knows.
    let j = Alias::new(J);
    let (log_before, log_after) = log_path_around(&hand.taker, task, stage, FIRST_ATTEMPT);
    // Each backend's placeholders: PostgreSQL's numbered, SQLite's in order.
    let log_path = match backend {
        DbBackend::Postgres => "$1 || $2::text || $3",
        _ => "? || ? || ?",
    };
    let mut run = values_of(&new_run(&hand.taker, 0, 0, now));
    for (col, value) in &mut run {
        let from_job = |c: jobs::Column| Expr::col((j.clone(), c));
        *value = match *col {
            c if c == agent_runs::Column::JobId.as_str() => from_job(jobs::Column::Id),
            c if c == agent_runs::Column::Attempt.as_str() => from_job(jobs::Column::Attempt),
            c if c == agent_runs::Column::LogPath.as_str() => Expr::cust_with_exprs(
                log_path,
                [
                    Expr::val(log_before.clone()),
                    from_job(jobs::Column::CurrentRunId),
                    Expr::val(log_after.clone()),
                ],
            ),
            _ => continue,
        };
    }
    run.push((
        agent_runs::Column::Id.as_str(),
        Expr::col((j.clone(), jobs::Column::CurrentRunId)),
    ));
    let mut from_job = Query::select();
    match backend {
        DbBackend::Postgres => from_job.from(j.clone()),
        _ => from_job.from_as(jobs::Entity, j.clone()).and_where(
            Expr::col((j.clone(), jobs::Column::Id)).eq(Expr::cust("last_insert_rowid()")),
        ),
    };
    from_job.and_where(Expr::col((j.clone(), jobs::Column::CurrentRunId)).is_not_null());
    let insert_run = insert_select(agent_runs::Entity, run, from_job)?;
    Ok((insert_job, insert_run))
}

/// SQLite: the next job and, when it was taken, its dispatch (with the start effect
/// written), from the rows of a batch that ends with [`taken_inserts`]' statements: the
/// job's is the row with a stage, its run's the row of the job's current run.
async fn taken_rows(
    txn: &DatabaseTransaction,
    rows: &[sea_orm::QueryResult],
    task: &tasks::Model,
    hand: &HandOff<'_>,
    now: i64,
) -> StoreResult<(jobs::Model, Option<Dispatched>)> {
    let job = rows
        .iter()
        .find(|r| returned(r, jobs::Column::Stage.as_str()));
    let job = must(job, || format!("the next job of task {}", task.id))?;
    let job = jobs::Model::from_query_result(job, "")?;
    let Some(run_id) = job.current_run_id else {
        return Ok((job, None));
    };
    let run = rows.iter().find(|r| {
        returned(r, agent_runs::Column::LogPath.as_str())
            && r.try_get::<i64>("", agent_runs::Column::Id.as_str()).ok() == Some(run_id)
    });
    let run = must(run, || format!("run {run_id} of job {}", job.id))?;
    let run = agent_runs::Model::from_query_result(run, "")?;
    let d = taken(txn, &hand.taker, task.clone(), job.clone(), run, now).await?;
    Ok((job, Some(d)))
}

/// The next job's insert, returning it: running, with its run's id drawn
/// ([`next_run_id`]), when it comes first; else queued.
///
/// The job comes first when no job that dispatch would take belongs to an older task or
/// its own (a new job's id is the highest, so it sorts after every job of its task), and
/// its task's push waits for no other host; it is due (queued now) and its task active
/// (the claim that queues it read it so). That is what dispatch's order would decide.
fn taken_job(
    task: &tasks::Model,
    (stage, iteration): (&str, i32),
    feedback: Option<&str>,
    hand: &HandOff<'_>,
    backend: DbBackend,
    now: i64,
) -> StoreResult<InsertStatement> {
    let hostname = hand.hostname.as_deref();
    let before = candidates(hostname, &[], &[], now)
        .select_only()
        .expr(Expr::val(1))
        .filter(jobs::Column::TaskId.lte(task.id))
        .into_query();
    let waits = elsewhere(hostname)
        .and_where(entity::effects::Column::TaskId.eq(task.id))
        .to_owned();
    let (flag, first) = (Alias::new("f"), Alias::new("first"));
    let is_first = || Expr::col((flag.clone(), first.clone()));
    let job = new_job(task.id, stage, iteration, feedback, now);
    let mut values = values_of(&job);
    for (col, value) in &mut values {
        *value = match *col {
            c if c == jobs::Column::Status.as_str() => {
                Expr::case(is_first(), Expr::val(JobStatus::Running))
                    .finally(Expr::val(JobStatus::Queued))
                    .into()
            }
            c if c == jobs::Column::CurrentRunId.as_str() => {
                Expr::case(is_first(), next_run_id(backend))
                    .finally(Expr::cust("NULL"))
                    .into()
            }
            _ => continue,
        };
    }
    let flag_of = Query::select()
        .expr_as(
            Expr::exists(before).not().and(Expr::exists(waits).not()),
            first.clone(),
        )
        .to_owned();
    let mut from_flag = Query::select();
    from_flag.from_subquery(flag_of, flag.clone());
    insert_select(jobs::Entity, values, from_flag)
}

/// The `WITH` names of the next job's insert and its run's.
const J: &str = "j";
const R: &str = "r";
/// The prefixes of the columns of the claimed run, the next job and its run in
/// [`taken_columns`]'s result.
const OUTCOME: &str = "o_";
const JOB: &str = "j_";
const RUN: &str = "r_";

/// `INSERT INTO table (columns) SELECT values FROM ... RETURNING *`: `source` gives the
/// select's `FROM` and `WHERE`.
fn insert_select(
    table: impl sea_orm::sea_query::IntoTableRef,
    values: Vec<(&'static str, Expr)>,
    mut source: SelectStatement,
) -> StoreResult<InsertStatement> {
    let columns: Vec<Alias> = values.iter().map(|(c, _)| Alias::new(*c)).collect();
    source.exprs(values.into_iter().map(|(_, v)| v));
    let mut insert = Query::insert();
    insert
        .into_table(table)
        .columns(columns)
        .select_from(source)
        .map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?
        .returning_all();
    Ok(insert)
}

/// The columns an active model sets, with their values, in the entity's column order.
fn values_of<A: ActiveModelTrait>(model: &A) -> Vec<(&'static str, Expr)> {
    <A::Entity as EntityTrait>::Column::iter()
        .filter_map(|c| {
            let value = model.get(c).into_value()?;
            Some((c.as_str(), Expr::val(value)))
        })
        .collect()
}

/// Every column of `E` read from `table`, named `{prefix}{column}`.
fn prefixed<E: EntityTrait>(table: &Alias, prefix: &str) -> Vec<Expr> {
    prefixed_names(table, prefix, E::Column::iter().map(|c| c.as_str()))
}

/// The columns `names` of `table`, each named `{prefix}{name}`.
fn prefixed_names<'a>(
    table: &Alias,
    prefix: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<Expr> {
    names
        .into_iter()
        .map(|name| {
            Expr::cust_with_expr(
                format!("$1 AS \"{prefix}{name}\""),
                Expr::col((table.clone(), Alias::new(name))),
            )
        })
        .collect()
}

fn cte(
    query: impl Into<sea_orm::sea_query::SubQueryStatement>,
    name: &Alias,
) -> CommonTableExpression {
    CommonTableExpression::new()
        .query(query)
        .table_name(name.clone())
        .to_owned()
}

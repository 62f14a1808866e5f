//! The fenced write of a claim: the job's row changes only if it is `running` with the
//! claim's run as its current run, and then the run's outcome is written; a claim that
//! carries its run's exit writes it with them.

use entity::{agent_runs, jobs, tasks};
use sea_orm::sea_query::{
    Alias, Asterisk, CommonTableExpression, Expr, ExprTrait, Query, ReturningClause,
    UpdateStatement, WithClause,
};
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, IdenStatic};

use super::batch::{Batch, returned, returning_mark};
use super::{NewEvent, RunExit, StoreResult, must};
use crate::model::{Claim, JobStatus};
use crate::policy::JobChange;

/// A fenced claim's run, the events of the exit it carried, and whether the task's end it
/// was given changed the task's row.
pub(super) type Fenced = (agent_runs::Model, Vec<(NewEvent, i64)>, bool);

/// The fenced write: it must change exactly the job's row read before, and then writes
/// the run's outcome, returning the run (its node names the host of its effects). `exit`,
/// the run's exit the claim carries, is written first (only the first exit counts), with
/// its events returned for the caller to append before its own. `end`, the task's end
/// ([`end_task`](super::delivery::end_task)) when the claim ends it, is written after
/// them; it may change nothing (a delivery waits).
///
/// The fence cannot change nothing: the caller read the job's row in this transaction,
/// running the claim's run, after any earlier claim of the group that wrote it (locked on
/// PostgreSQL; on SQLite the transaction is the only writer). So a fence that changed
/// nothing, like a run that is gone, is an error, which rolls the claims' transaction
/// back. All is written in one call to the database: on PostgreSQL one statement, the
/// job's update and the task's in a `WITH` that the run's update requires, the exit
/// riding on the run's update ([`with_exit`]); on SQLite one [`Batch`].
pub(super) async fn fence(
    txn: &DatabaseTransaction,
    job: &jobs::Model,
    claim: &Claim,
    change: (JobChange, Option<&str>),
    exit: Option<&RunExit>,
    end: Option<UpdateStatement>,
    now: i64,
) -> StoreResult<Fenced> {
    let backend = txn.get_database_backend();
    if backend == DbBackend::Postgres {
        let (mut ctes, mut outcome) = fence_parts(job, claim, change, exit, now);
        let ended = end.map(|end| {
            let (cte, ended) = with_end(end);
            ctes.push(cte);
            ended
        });
        let mut with = WithClause::new();
        for cte in ctes {
            with.cte(cte);
        }
        let ends = ended.is_some();
        if let Some(ended) = ended {
            let mut returning = outcome_columns(exit.is_some());
            returning.push(ended);
            outcome.returning(ReturningClause::Exprs(returning));
        }
        outcome.with_cte(with);
        let row = txn.query_one_raw(backend.build(&outcome)).await?;
        let row = must(row, || fenced_run(claim))?;
        let run = <agent_runs::Model as sea_orm::FromQueryResult>::from_query_result(&row, "")?;
        let task_ended = ends && row.try_get::<bool>("", TASK_ENDED)?;
        return Ok((run, exit_events(&row, "", exit)?, task_ended));
    }
    let rows = fence_batch(job, claim, change, exit, end, now)
        .run(txn)
        .await?;
    fenced(&rows, claim, exit)
}

/// SQLite: [`fence`]'s parts as a [`Batch`]: the exit's statements
/// ([`RunExit::push_write`]), the fence and the task's end (each marking whether it
/// wrote, [`returning_mark`]), and between them the run's outcome, returning the run.
pub(super) fn fence_batch(
    job: &jobs::Model,
    claim: &Claim,
    change: (JobChange, Option<&str>),
    exit: Option<&RunExit>,
    end: Option<UpdateStatement>,
    now: i64,
) -> Batch {
    let (mut fence, outcome) = statements(job, claim, change, now);
    fence.returning(returning_mark(FENCED));
    let mut batch = Batch::default();
    if let Some(exit) = exit {
        exit.push_write(&mut batch);
    }
    batch.push(&fence).push(&outcome);
    if let Some(mut end) = end {
        end.returning(returning_mark(TASK_ENDED));
        batch.push(&end);
    }
    batch
}

/// What a fence that returned no run lacked: the claimed run, or the fence itself.
pub(super) fn fenced_run(claim: &Claim) -> String {
    format!("run {} (its job's fence, or its row)", claim.run_id)
}

/// SQLite: what the rows of a [`fence_batch`] (and of what followed it) say was written.
pub(super) fn fenced(
    rows: &[sea_orm::QueryResult],
    claim: &Claim,
    exit: Option<&RunExit>,
) -> StoreResult<Fenced> {
    let fenced = rows.iter().any(|r| returned(r, FENCED));
    // The run's outcome: the row of a run (a next job's run may follow) with its id.
    let id = agent_runs::Column::Id.as_str();
    let run = rows
        .iter()
        .find(|r| {
            returned(r, agent_runs::Column::JobId.as_str())
                && r.try_get::<i64>("", id).ok() == Some(claim.run_id)
        })
        .filter(|_| fenced);
    let run = must(run, || fenced_run(claim))?;
    let run = <agent_runs::Model as sea_orm::FromQueryResult>::from_query_result(run, "")?;
    // The run's row was read before its exit's statements (the same run's: the caller
    // gives the exit with the fence only when it is the claimed run's).
    let evs = match rows.iter().find(|r| returned(r, EXIT_WRITTEN)) {
        Some(was) => exit_events(was, "", exit)?,
        None => Vec::new(),
    };
    let ended = rows.iter().any(|r| returned(r, TASK_ENDED));
    Ok((run, evs, ended))
}

/// PostgreSQL: the task's end in the fence's `WITH`, changing the task only with the
/// fence, and the expression of the run's update's result that says whether it did.
fn with_end(mut end: UpdateStatement) -> (CommonTableExpression, Expr) {
    let ended = Alias::new("ended");
    end.and_where(has_rows(FENCED))
        .returning_col(tasks::Column::Id);
    let cte = CommonTableExpression::new()
        .query(end)
        .table_name(ended.clone())
        .to_owned();
    let did = has_rows(ended);
    (
        cte,
        Expr::cust_with_expr(format!("$1 AS \"{TASK_ENDED}\""), did),
    )
}

/// `EXISTS (SELECT 1 FROM table)`: in a statement's `WITH`, whether a part of it wrote.
fn has_rows(table: impl sea_orm::sea_query::IntoIden) -> Expr {
    Expr::exists(Query::select().expr(Expr::val(1)).from(table).to_owned())
}

/// The `WITH` name of a PostgreSQL fence's update of the job; on SQLite its mark.
const FENCED: &str = "fenced";

/// What the run's update of a PostgreSQL fence returns: the run and, with an exit
/// ([`with_exit`]), whether it wrote the exit and the start.
fn outcome_columns(exit: bool) -> Vec<Expr> {
    let mut columns = vec![Expr::col((agent_runs::Entity, Asterisk))];
    if exit {
        let was = |c| Expr::col((Alias::new(WAS), Alias::new(c)));
        columns.extend([EXIT_WRITTEN, START_WRITTEN].map(was));
    }
    columns
}

/// The column of a PostgreSQL fence's result that says whether it ended the task; on
/// SQLite the task's end's mark.
const TASK_ENDED: &str = "task_ended";

/// The fence (the job's update) and the run's outcome (its update, returning the run).
fn statements(
    job: &jobs::Model,
    claim: &Claim,
    (change, feedback): (JobChange, Option<&str>),
    now: i64,
) -> (UpdateStatement, UpdateStatement) {
    let mut fence = Query::update();
    fence
        .table(jobs::Entity)
        .value(jobs::Column::Status, change.status())
        .value(jobs::Column::UpdatedAt, now);
    if let JobChange::Retry {
        attempt,
        not_before,
    } = change
    {
        fence
            .value(jobs::Column::Attempt, attempt)
            .value(jobs::Column::NotBefore, not_before)
            .value(jobs::Column::CurrentRunId, Option::<i64>::None)
            .value(jobs::Column::Feedback, feedback.map(str::to_string));
    }
    fence
        .and_where(jobs::Column::Id.eq(job.id))
        .and_where(jobs::Column::Status.eq(JobStatus::Running))
        .and_where(jobs::Column::CurrentRunId.eq(claim.run_id));
    let usage = claim.usage.unwrap_or_default();
    let mut outcome = Query::update();
    outcome
        .table(agent_runs::Entity)
        .value(agent_runs::Column::Outcome, claim.verdict.outcome())
        .value(agent_runs::Column::CommitSha, claim.commit_sha.clone())
        .value(agent_runs::Column::TokensIn, usage.tokens_in)
        .value(agent_runs::Column::TokensOut, usage.tokens_out)
        .value(agent_runs::Column::CostMicrousd, usage.cost_microusd)
        .value(agent_runs::Column::Turns, usage.turns)
        .and_where(agent_runs::Column::Id.eq(claim.run_id))
        .returning_all();
    (fence, outcome)
}

/// PostgreSQL: [`fence`]'s one statement in parts, for a statement that does more: the
/// queries of its `WITH` (the fence, and the run's row as it was when there is an exit)
/// and the run's update, which requires the fence and returns the run (and, with an
/// exit, the columns [`exit_events`] reads).
pub(super) fn fence_parts(
    job: &jobs::Model,
    claim: &Claim,
    change: (JobChange, Option<&str>),
    exit: Option<&RunExit>,
    now: i64,
) -> (Vec<CommonTableExpression>, UpdateStatement) {
    let (mut fence, mut outcome) = statements(job, claim, change, now);
    fence.returning_col(jobs::Column::Id);
    let mut ctes = vec![
        CommonTableExpression::new()
            .query(fence)
            .table_name(Alias::new(FENCED))
            .to_owned(),
    ];
    if let Some(exit) = exit {
        ctes.push(with_exit(&mut outcome, exit));
    }
    outcome.and_where(has_rows(FENCED));
    (ctes, outcome)
}

/// The events of the exit `exit` a fence wrote, from the columns named
/// `{prefix}exit_written` and `{prefix}start_written` of PostgreSQL's result, or of
/// SQLite's read before the write ([`run_as_it_was`]).
pub(super) fn exit_events(
    row: &sea_orm::QueryResult,
    prefix: &str,
    exit: Option<&RunExit>,
) -> StoreResult<Vec<(NewEvent, i64)>> {
    Ok(match exit {
        Some(exit) => exit.events(
            row.try_get(prefix, EXIT_WRITTEN)?,
            row.try_get(prefix, START_WRITTEN)?,
        ),
        None => Vec::new(),
    })
}

/// The columns of [`run_as_it_was`] (and of [`with_exit`]'s result) that say whether the
/// exit's write wrote the exit, and the agent's start.
pub(super) const EXIT_WRITTEN: &str = "exit_written";
pub(super) const START_WRITTEN: &str = "start_written";

/// The `WITH` name of the run's row as it was, before [`with_exit`]'s update.
const WAS: &str = "was";

/// The read of run `run_id` before an exit's write ([`with_exit`] on PostgreSQL,
/// [`RunExit::push_write`] on SQLite): whether it will write the exit (none recorded)
/// and the agent's start (no exit, or no pid, recorded), as the columns
/// [`EXIT_WRITTEN`] and [`START_WRITTEN`].
pub(super) fn run_as_it_was(run_id: i64) -> sea_orm::sea_query::SelectStatement {
    use agent_runs::Column as C;
    Query::select()
        .column(C::Id)
        .expr_as(Expr::col(C::ExitedAt).is_null(), Alias::new(EXIT_WRITTEN))
        .expr_as(
            Expr::col(C::ExitedAt)
                .is_null()
                .or(Expr::col(C::Pid).is_null()),
            Alias::new(START_WRITTEN),
        )
        .from(agent_runs::Entity)
        .and_where(Expr::col(C::Id).eq(run_id))
        .to_owned()
}

/// PostgreSQL: the run's update of a fenced claim also writes the exit the claim carries
/// unless one is recorded, and the agent's start with it, or alone unless one is recorded
/// (as [`RunExit::write`] does in two statements), and returns whether it wrote each.
/// `UPDATE ... RETURNING` gives only the new row, so a `WITH` reads the run's row locked
/// first, and the update joins it (`FROM`): a lock taken in a `WITH` the update only
/// returned would be taken after the update, and find nothing.
fn with_exit(
    outcome: &mut sea_orm::sea_query::UpdateStatement,
    exit: &RunExit,
) -> CommonTableExpression {
    use agent_runs::Column as C;
    let was = Alias::new(WAS);
    let (open, unstarted) = (Alias::new(EXIT_WRITTEN), Alias::new(START_WRITTEN));
    let before = run_as_it_was(exit.run.id)
        .lock(sea_orm::sea_query::LockType::Update)
        .to_owned();
    let unless = |cond: &Alias, value: Expr, col: C| -> Expr {
        Expr::case(Expr::col((was.clone(), cond.clone())), value)
            .finally(Expr::col((agent_runs::Entity, col)))
            .into()
    };
    outcome
        .value(
            C::ExitCode,
            unless(&open, Expr::val(exit.code), C::ExitCode),
        )
        .value(C::ExitedAt, unless(&open, Expr::val(exit.at), C::ExitedAt));
    if let Some(started) = &exit.started {
        let prompt = Expr::val(started.prompt.clone());
        outcome
            .value(C::Pid, unless(&unstarted, Expr::val(started.pid), C::Pid))
            .value(C::Prompt, unless(&unstarted, prompt, C::Prompt));
    }
    outcome
        .from(was.clone())
        .and_where(Expr::col((was.clone(), C::Id)).equals((agent_runs::Entity, C::Id)));
    outcome.returning(ReturningClause::Exprs(outcome_columns(true)));
    CommonTableExpression::new()
        .query(before)
        .table_name(was)
        .to_owned()
}

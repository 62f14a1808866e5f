//! The life of a run after dispatch: started, heartbeaten, exited, adopted; and the
//! Reaper's view of the running jobs.

use std::collections::HashMap;

use entity::{agent_runs, jobs, nodes, tasks};
use sea_orm::sea_query::{Condition, Expr, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait,
};
use serde_json::json;

use super::batch::Batch;
use super::fence::run_as_it_was;
use super::{NewEvent, Store, StoreResult, append, append_all};
use crate::model::{EventKind, EventSource, JobStatus, Usage};

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

impl Store {
    /// Records the agent's pid (and the prompt it was given) once it is started, with the
    /// `run_started` event. A Monitor defers this (the shim's recorded identity names the agent
    /// meanwhile) and, for an agent that ends first, writes it with the exit.
    pub async fn run_started(
        &self,
        run: &agent_runs::Model,
        task_id: i64,
        started: &Started,
    ) -> StoreResult<()> {
        let (_write, txn) = self.write_txn().await?;
        if let Some(ev) = write_started(&txn, run, task_id, started).await? {
            append(&txn, ev, started.at).await?;
        }
        txn.commit().await?;
        Ok(())
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
            EventKind::RunAdopted,
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
        kind: EventKind,
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
        append(&txn, run_event(task_id, run, kind).detail(detail), now).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Of `runs` (run id, job id), those whose job no longer runs with them as its current
    /// run (after a cancel or a claim by someone else). Reads only, a few hundred jobs a
    /// query: the runs' heartbeat is written with their node's (`heartbeat_node`).
    pub async fn runs_not_current(&self, runs: &[(i64, i64)]) -> StoreResult<Vec<i64>> {
        let mut gone = Vec::new();
        for chunk in runs.chunks(500) {
            let ids: Vec<i64> = chunk.iter().map(|(_, job)| *job).collect();
            let current: HashMap<i64, Option<i64>> = jobs::Entity::find()
                .filter(jobs::Column::Id.is_in(ids))
                .filter(jobs::Column::Status.eq(JobStatus::Running))
                .all(&self.db)
                .await?
                .into_iter()
                .map(|j| (j.id, j.current_run_id))
                .collect();
            gone.extend(
                chunk
                    .iter()
                    .filter(|(run, job)| current.get(job) != Some(&Some(*run)))
                    .map(|(run, _)| *run),
            );
        }
        Ok(gone)
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
        let exit = RunExit {
            task_id,
            run: run.clone(),
            started: None,
            code: exit_code,
            detail,
            at: now,
        };
        self.record_start_and_exit(&exit).await
    }

    /// [`Store::record_exit`], with the agent's start first in the same transaction when
    /// it was not recorded yet: one write for an agent that ended before its start was.
    pub async fn record_start_and_exit(&self, exit: &RunExit) -> StoreResult<bool> {
        let (_write, txn) = self.write_txn().await?;
        let (recorded, evs) = exit.write(&txn).await?;
        append_all(&txn, evs).await?;
        txn.commit().await?;
        Ok(recorded)
    }

    pub async fn run(&self, run_id: i64) -> StoreResult<Option<agent_runs::Model>> {
        Ok(agent_runs::Entity::find_by_id(run_id).one(&self.db).await?)
    }

    pub async fn job(&self, job_id: i64) -> StoreResult<Option<jobs::Model>> {
        Ok(jobs::Entity::find_by_id(job_id).one(&self.db).await?)
    }

    /// The commit of the latest run of a task that made one, which the next stage builds
    /// on; a commit lost with its host (its push closed unperformed) is not one.
    pub async fn last_commit(&self, task_id: i64) -> StoreResult<Option<String>> {
        let job_ids = Query::select()
            .column(jobs::Column::Id)
            .from(jobs::Entity)
            .and_where(jobs::Column::TaskId.eq(task_id))
            .to_owned();
        Ok(agent_runs::Entity::find()
            .filter(agent_runs::Column::JobId.in_subquery(job_ids))
            .filter(agent_runs::Column::CommitSha.is_not_null())
            .filter(agent_runs::Column::Id.not_in_subquery(super::delivery::lost_runs(task_id)))
            .order_by_desc(agent_runs::Column::Id)
            .select_only()
            .column(agent_runs::Column::CommitSha)
            .into_tuple::<Option<String>>()
            .one(&self.db)
            .await?
            .flatten())
    }

    /// Every running job with its current run and the run's node.
    pub async fn running_jobs(&self) -> StoreResult<Vec<RunningJob>> {
        self.running_jobs_but(|_| false).await
    }

    /// The running jobs except those whose current run `skip` names (the Reaper skips
    /// the runs this process watches), each with its task, current run and the run's
    /// node: those are read only for the jobs kept, so a pass over a node with thousands
    /// of watched agents reads little more than their jobs.
    pub async fn running_jobs_but(
        &self,
        skip: impl Fn(i64) -> bool,
    ) -> StoreResult<Vec<RunningJob>> {
        let mut jobs = jobs::Entity::find()
            .filter(jobs::Column::Status.eq(JobStatus::Running))
            .order_by_asc(jobs::Column::Id)
            .all(&self.db)
            .await?;
        jobs.retain(|j| !j.current_run_id.is_some_and(&skip));
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

    /// The usage recorded on the runs of these jobs, summed per job; jobs whose runs
    /// recorded none are absent.
    pub async fn usage_by_job(&self, job_ids: &[i64]) -> StoreResult<HashMap<i64, Usage>> {
        let mut out: HashMap<i64, Usage> = HashMap::new();
        for chunk in job_ids.chunks(500) {
            let runs = agent_runs::Entity::find()
                .filter(agent_runs::Column::JobId.is_in(chunk.to_vec()))
                .filter(
                    Condition::any()
                        .add(agent_runs::Column::TokensIn.is_not_null())
                        .add(agent_runs::Column::CostMicrousd.is_not_null())
                        .add(agent_runs::Column::Turns.is_not_null()),
                )
                .all(&self.db)
                .await?;
            for r in runs {
                let sum = out.entry(r.job_id).or_default();
                *sum = sum.plus(Usage::of_run(&r));
            }
        }
        Ok(out)
    }

    /// Runs of `hostname` with no exit recorded that are not their job's current run (or
    /// whose job no longer runs): their agents, if alive, work for nothing. With the task
    /// id of each.
    pub async fn stale_runs(&self, hostname: &str) -> StoreResult<Vec<(i64, agent_runs::Model)>> {
        let node_ids: Vec<String> = nodes::Entity::find()
            .filter(nodes::Column::Hostname.eq(hostname))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|n| n.id)
            .collect();
        let runs = agent_runs::Entity::find()
            .filter(agent_runs::Column::NodeId.is_in(node_ids))
            .filter(agent_runs::Column::ExitedAt.is_null())
            .all(&self.db)
            .await?;
        let jobs: HashMap<i64, jobs::Model> = jobs::Entity::find()
            .filter(jobs::Column::Id.is_in(runs.iter().map(|r| r.job_id)))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|j| (j.id, j))
            .collect();
        Ok(runs
            .into_iter()
            .filter_map(|r| {
                let job = jobs.get(&r.job_id)?;
                let current = job.status == JobStatus::Running && job.current_run_id == Some(r.id);
                (!current).then_some((job.task_id, r))
            })
            .collect())
    }

    /// How many runs have a started agent (their pid recorded) and no exit yet.
    pub async fn live_runs(&self) -> StoreResult<u64> {
        Ok(agent_runs::Entity::find()
            .filter(agent_runs::Column::Pid.is_not_null())
            .filter(agent_runs::Column::ExitedAt.is_null())
            .count(&self.db)
            .await?)
    }

    /// Counts of queued and running jobs.
    pub async fn queue_depth(&self) -> StoreResult<(u64, u64)> {
        let count = |status: JobStatus| {
            jobs::Entity::find()
                .filter(jobs::Column::Status.eq(status))
                .count(&self.db)
        };
        Ok((
            count(JobStatus::Queued).await?,
            count(JobStatus::Running).await?,
        ))
    }
}

/// An agent's start, as its Monitor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub pid: i32,
    /// The rendered prompt the agent was given.
    pub prompt: Option<String>,
    /// When the agent was started.
    pub at: i64,
}

/// A run's end as its Monitor saw it: the exit, and the agent's start when that was not
/// recorded yet. Written on its own ([`Store::record_start_and_exit`]) or first in the
/// run's claim (ADR 0001).
#[derive(Debug, Clone, PartialEq)]
pub struct RunExit {
    pub task_id: i64,
    pub run: agent_runs::Model,
    pub started: Option<Started>,
    pub code: i32,
    /// The `run_exited` event's detail; `exit_code` is added to it.
    pub detail: serde_json::Value,
    /// When the exit was seen.
    pub at: i64,
}

impl RunExit {
    /// Writes the exit (only the first one counts) and the pending start in `txn`: true
    /// when this wrote the exit, and their events, for the caller to append with its own.
    pub(super) async fn write(
        &self,
        txn: &sea_orm::DatabaseTransaction,
    ) -> StoreResult<(bool, Vec<(NewEvent, i64)>)> {
        let run = &self.run;
        let wrote = txn.execute(&self.exit_update()).await?.rows_affected() == 1;
        let started = match &self.started {
            Some(_) if wrote => true,
            Some(started) => write_started(txn, run, self.task_id, started)
                .await?
                .is_some(),
            None => false,
        };
        Ok((wrote, self.events(wrote, started)))
    }

    /// SQLite: [`RunExit::write`]'s statements for a batch, after a read of what they
    /// will write (the columns `exit_written` and `start_written`, as PostgreSQL's fence
    /// returns them, see `fence::exit_events`): the exit with the pending start, then the
    /// start alone, which writes nothing when the exit's statement wrote it.
    pub(super) fn push_write(&self, batch: &mut Batch) {
        batch
            .push(&run_as_it_was(self.run.id))
            .push(&self.exit_update());
        if let Some(started) = &self.started {
            batch.push(&start_update(&self.run, started));
        }
    }

    /// The exit's update (only the first one counts), with the pending start.
    fn exit_update(&self) -> sea_orm::sea_query::UpdateStatement {
        let mut update = agent_runs::Entity::update_many()
            .col_expr(agent_runs::Column::ExitCode, Expr::value(self.code))
            .col_expr(agent_runs::Column::ExitedAt, Expr::value(self.at));
        if let Some(started) = &self.started {
            // The start rides on the exit's statement, and on its own when the exit was
            // recorded already.
            update = with_start(update, started);
        }
        update
            .filter(agent_runs::Column::Id.eq(self.run.id))
            .filter(agent_runs::Column::ExitedAt.is_null())
            .into_query()
    }

    /// The events of what was written of this: the agent's start, when `started` (and
    /// the start is known), then the exit, when `exited`.
    pub(super) fn events(&self, exited: bool, started: bool) -> Vec<(NewEvent, i64)> {
        let run = &self.run;
        let mut evs = Vec::new();
        if let Some(s) = self.started.as_ref().filter(|_| started) {
            evs.push((started_event(run, self.task_id, s), s.at));
        }
        if exited {
            let mut detail = self.detail.clone();
            detail["exit_code"] = json!(self.code);
            let ev = run_event(self.task_id, run, EventKind::RunExited).detail(detail);
            evs.push((ev, self.at));
        }
        evs
    }
}

/// Writes a run's pid and prompt unless a start is recorded already; returns its
/// `run_started` event for the caller to append, `None` when it wrote nothing.
async fn write_started(
    txn: &sea_orm::DatabaseTransaction,
    run: &agent_runs::Model,
    task_id: i64,
    started: &Started,
) -> StoreResult<Option<NewEvent>> {
    let n = txn
        .execute(&start_update(run, started))
        .await?
        .rows_affected();
    Ok((n == 1).then(|| started_event(run, task_id, started)))
}

/// The start's update of a run, unless one is recorded.
fn start_update(run: &agent_runs::Model, started: &Started) -> sea_orm::sea_query::UpdateStatement {
    with_start(agent_runs::Entity::update_many(), started)
        .filter(agent_runs::Column::Id.eq(run.id))
        .filter(agent_runs::Column::Pid.is_null())
        .into_query()
}

/// An update of a run that also sets what its start recorded: the pid and the prompt.
fn with_start(
    update: sea_orm::UpdateMany<agent_runs::Entity>,
    started: &Started,
) -> sea_orm::UpdateMany<agent_runs::Entity> {
    update
        .col_expr(agent_runs::Column::Pid, Expr::value(started.pid))
        .col_expr(
            agent_runs::Column::Prompt,
            Expr::value(started.prompt.clone()),
        )
}

/// A run's `run_started` event.
fn started_event(run: &agent_runs::Model, task_id: i64, started: &Started) -> NewEvent {
    let detail = json!({"pid": started.pid, "attempt": run.attempt, "log": run.log_path});
    run_event(task_id, run, EventKind::RunStarted).detail(detail)
}

/// An event of a run, written by its Monitor.
fn run_event(task_id: i64, run: &agent_runs::Model, kind: EventKind) -> NewEvent {
    NewEvent {
        task_id,
        job_id: Some(run.job_id),
        run_id: Some(run.id),
        kind,
        source: EventSource::Monitor,
        detail: json!({}),
    }
}

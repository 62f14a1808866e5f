//! The fenced claim: the job's row changes only if it is `running` with the claim's run
//! as its current run, and the winner writes everything the policy's decision implies
//! in the same transaction (the job's terminal or retry state, the next job or the
//! task's end, the `advances` row, the outbox, the events). A loser writes nothing of
//! its own but the run's exit its claim carried; only the arbiter's `claim_lost` event
//! records that it lost. The Advancer's claims waiting together share one transaction.

use std::collections::HashMap;

use entity::{advances, agent_runs, jobs, nodes, tasks};
use sea_orm::sea_query::{
    Alias, CommonTableExpression, LockType, Query, UpdateStatement, WithClause,
};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, JoinType,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait, Set,
};
use serde_json::json;

use super::batch::Batch;
use super::delivery::end_task;
use super::fence::fence;
use super::handoff::{HandOff, fence_and_queue, queue_next};
use super::outbox::insert_effect;
use super::{
    Dispatched, KnownLastCommit, NewEvent, RunExit, Store, StoreError, StoreResult, Taker,
    insert_events, must,
};
use crate::model::{
    Claim, ClaimOutcome, ClaimWon, Decider, EventKind, JobStatus, RunOutcome, TaskStatus,
};
use crate::policy::{ClaimInput, Iterations, JobChange, Policy, Transition};

impl Store {
    /// The fenced claim; see the module's documentation.
    pub async fn claim(
        &self,
        claim: &Claim,
        policy: &Policy,
        now: i64,
    ) -> StoreResult<ClaimOutcome> {
        Ok(self.claim_and_take(claim, None, policy, now, None).await?.0)
    }

    /// [`Store::claim`]; a won claim that queued a next job also takes it for `taker`,
    /// in the same transaction, when dispatch would take it first (the hand-off, see
    /// the `handoff` module). `exit`, the run's exit when its Monitor did not record it
    /// on its own, is written whether the claim wins or loses, with the fence or before
    /// the loss.
    pub async fn claim_and_take(
        &self,
        claim: &Claim,
        exit: Option<&RunExit>,
        policy: &Policy,
        now: i64,
        taker: Option<Taker<'_>>,
    ) -> StoreResult<(ClaimOutcome, Option<Dispatched>)> {
        let item = ClaimItem { claim, exit, taker };
        let decided = match self.claim_all(&[item], policy, now).await {
            Ok(decided) => decided,
            Err(GroupError::NothingWritten(e) | GroupError::Commit { error: e, .. }) => {
                return Err(e);
            }
        };
        must(decided.into_iter().next(), || {
            format!("the decision of the claim of run {}", claim.run_id)
        })
    }

    /// Several claims, each decided as [`Store::claim_and_take`] decides it, in order, in
    /// one transaction: one commit for all (group commit). A later claim sees what an
    /// earlier one wrote of tasks, jobs, runs and effects; the events and `advances` rows,
    /// which no claim reads, are written after the last ([`Deferred`]). An error before
    /// the commit leaves nothing written, for none of them; one of the commit itself
    /// leaves unknown what was.
    pub async fn claim_all(
        &self,
        items: &[ClaimItem<'_>],
        policy: &Policy,
        now: i64,
    ) -> Result<Vec<(ClaimOutcome, Option<Dispatched>)>, GroupError> {
        let (_write, txn) = self.write_txn().await.map_err(GroupError::NothingWritten)?;
        let postgres = self.is_postgres();
        let job_ids: Vec<i64> = items.iter().map(|i| i.claim.job_id).collect();
        let mut read = TasksRead::of_jobs(&txn, &job_ids, postgres)
            .await
            .map_err(GroupError::NothingWritten)?;
        let mut decided = Vec::with_capacity(items.len());
        let mut deferred = Deferred::default();
        for item in items {
            // A task an earlier claim of the group decided is read again, as it now is.
            let found = match read.take(item.claim.job_id) {
                Some(found) => Some(found),
                None => TasksRead::of_jobs(&txn, &[item.claim.job_id], postgres)
                    .await
                    .map_err(GroupError::NothingWritten)?
                    .take(item.claim.job_id),
            };
            // On an error the transaction is dropped, which rolls it back.
            let one = self
                .claim_in(&txn, item, found, &mut deferred, policy, now)
                .await;
            decided.push(one.map_err(GroupError::NothingWritten)?);
        }
        deferred
            .write(&txn)
            .await
            .map_err(GroupError::NothingWritten)?;
        if let Err(e) = txn.commit().await {
            let handed = decided.into_iter().filter_map(|(_, h)| h).collect();
            return Err(GroupError::Commit {
                error: e.into(),
                handed,
            });
        }
        Ok(decided)
    }

    /// One claim, in `txn`. `found`: the claimed job's task and all its jobs (the claimed
    /// one, and the others whose iterations the policy counts), read and locked by
    /// [`TasksRead::of_jobs`]; `None` when they are gone. Its events go to `deferred`.
    async fn claim_in(
        &self,
        txn: &DatabaseTransaction,
        item: &ClaimItem<'_>,
        found: Option<(tasks::Model, Vec<jobs::Model>)>,
        deferred: &mut Deferred,
        policy: &Policy,
        now: i64,
    ) -> StoreResult<(ClaimOutcome, Option<Dispatched>)> {
        let claim = item.claim;
        let (task, siblings) = found.map_or((None, Vec::new()), |(t, j)| (Some(t), j));
        let job = siblings.iter().find(|j| j.id == claim.job_id).cloned();
        let fenced = job.as_ref().is_some_and(|j| {
            j.status == JobStatus::Running && j.current_run_id == Some(claim.run_id)
        }) && task
            .as_ref()
            .is_some_and(|t| t.status == TaskStatus::Active);
        // The exit before anything of the claim's, after the task's and jobs' rows (which
        // claims and cancels take first): it is written whether the claim wins or loses;
        // with the fence when the claim can win and it is the claimed run's (always, but
        // for a caller's mistake), else on its own.
        let with_fence = item.exit.filter(|e| fenced && e.run.id == claim.run_id);
        if let Some(exit) = item.exit.filter(|_| with_fence.is_none()) {
            deferred.events.extend(exit.write(txn).await?.1);
        }
        let (Some(job), Some(task)) = (job.filter(|_| fenced), task) else {
            return Ok((record_loss(txn, claim, deferred, now).await?, None));
        };
        let iterations = Iterations::of_jobs(&siblings);
        let decision = policy.decide(ClaimInput {
            task: &task,
            job: &job,
            run_id: claim.run_id,
            verdict: &claim.verdict,
            commit_sha: claim.commit_sha.as_deref(),
            feedback: claim.feedback.as_deref(),
            iterations: &iterations,
            now,
        });
        let retry_feedback = match decision.job {
            JobChange::Retry { .. } => decision.feedback.as_deref(),
            _ => None,
        };
        let hand = match (item.taker, &decision.next) {
            (Some(taker), Some(next)) => self.hand_off_to(taker, &next.stage).await?,
            _ => None,
        };
        let change = (decision.job, retry_feedback);
        // A hand-off with nothing for the outbox is one call to the database: the fence,
        // the run's outcome with the exit, the next job taken with its run.
        let one_call = decision.effects.is_empty();
        let queued = match (&hand, &decision.next) {
            (Some(hand), Some(next)) if one_call => {
                let at = (next.stage.as_str(), next.iteration);
                let next = (at, decision.feedback.as_deref());
                let (j, t) = ((&job, claim), &task);
                Some(fence_and_queue(txn, j, change, with_fence, t, next, hand, now).await?)
            }
            _ => None,
        };
        let (run, next) = match queued {
            Some((run, exited, next_job, handed)) => {
                deferred.events.extend(exited);
                (run, Next::Queued(Box::new((next_job, handed))))
            }
            None => {
                // The exit is written with the fence, first; the task's end after it.
                let end = ending(task.id, &decision, now);
                let (run, exited, ended) =
                    fence(txn, &job, claim, change, with_fence, end, now).await?;
                deferred.events.extend(exited);
                (run, Next::Queue(hand, ended))
            }
        };
        let decided = (&task, &job, &run);
        let (won, handed) = apply(txn, claim, decided, decision, next, deferred, now).await?;
        let handed = handed.map(|d| Dispatched {
            last_commit: item
                .taker
                .map(|taker| known_last_commit(claim, &run, &taker))
                .unwrap_or_default(),
            ..d
        });
        Ok((ClaimOutcome::Won(won), handed))
    }
}

/// What a claim that queued its task's next job knows of the task's last commit. A stage
/// that queues a next one passed or was rejected; when its own Monitor, on the node that
/// takes the next job, decided it, its agent ran in this host's worktree of the task,
/// prepared on the task's branch at the last commit, and its commit (baton's or its
/// agent's own, on the branch; a failed auto-commit fails the stage) is the task's newest.
fn known_last_commit(claim: &Claim, run: &agent_runs::Model, taker: &Taker) -> KnownLastCommit {
    if claim.decided_by != Decider::Monitor || run.node_id != taker.node_id {
        return KnownLastCommit::Unknown;
    }
    match &claim.commit_sha {
        Some(sha) => KnownLastCommit::Commit(sha.clone()),
        None => KnownLastCommit::OnBranch,
    }
}

/// Why [`Store::claim_all`] decided nothing.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// A claim, or the transaction's start, failed: nothing of the group was written.
    #[error("{0}")]
    NothingWritten(StoreError),
    /// The commit failed: whether the group was written is not known. `handed`: the
    /// jobs its claims took for their node, if it was (a release of them is fenced).
    #[error("the claims' commit: {error}")]
    Commit {
        error: StoreError,
        handed: Vec<Dispatched>,
    },
}

/// One claim for [`Store::claim_all`]: the claim, the run's exit when the claim carries
/// it, and who takes the job it queues (the hand-off).
pub struct ClaimItem<'a> {
    pub claim: &'a Claim,
    pub exit: Option<&'a RunExit>,
    pub taker: Option<Taker<'a>>,
}

/// What a group's claims write that none of them reads: their events and `advances`
/// rows, written in order after the last claim: one statement on PostgreSQL, one batch
/// on SQLite.
#[derive(Default)]
struct Deferred {
    events: Vec<(NewEvent, i64)>,
    advances: Vec<advances::ActiveModel>,
}

impl Deferred {
    /// In one call: on PostgreSQL one statement writes both (the `advances` rows' insert
    /// in a `WITH`), on SQLite one [`Batch`].
    async fn write(self, txn: &DatabaseTransaction) -> StoreResult<()> {
        let advances = (!self.advances.is_empty())
            .then(|| advances::Entity::insert_many(self.advances).into_query());
        let events = insert_events(self.events);
        match (events, advances) {
            (Some(mut events), Some(advances))
                if txn.get_database_backend() == DbBackend::Postgres =>
            {
                let cte = CommonTableExpression::new()
                    .query(advances)
                    .table_name(Alias::new("advanced"))
                    .to_owned();
                events.with_cte(WithClause::new().cte(cte).to_owned());
                txn.execute(&events).await?;
            }
            (events, advances) if txn.get_database_backend() == DbBackend::Sqlite => {
                let mut batch = Batch::default();
                for insert in events.iter().chain(&advances) {
                    batch.push(insert);
                }
                batch.run(txn).await?;
            }
            (events, advances) => {
                for insert in events.into_iter().chain(advances) {
                    txn.execute(&insert).await?;
                }
            }
        }
        Ok(())
    }
}

/// Records a lost claim (the arbiter's own event, after those of the exit the claim
/// carried) and tells the claimant which kind.
async fn record_loss(
    txn: &DatabaseTransaction,
    claim: &Claim,
    deferred: &mut Deferred,
    now: i64,
) -> StoreResult<ClaimOutcome> {
    let run = agent_runs::Entity::find_by_id(claim.run_id)
        .one(txn)
        .await?;
    // The outcome is written only by the winning claim (or by a cancel), so a set
    // outcome means this run's claim was applied already.
    let already = run
        .as_ref()
        .and_then(|r| r.outcome)
        .is_some_and(|o| o != RunOutcome::Cancelled);
    let job = jobs::Entity::find_by_id(claim.job_id).one(txn).await?;
    if let Some(job) = &job {
        let detail = json!({
            "verdict": claim.verdict, "decided_by": claim.decided_by,
            "tier": claim.decided_by.tier(),
            "job_status": job.status, "current_run_id": job.current_run_id,
            "already_advanced": already,
        });
        let ev = NewEvent::of(
            job.task_id,
            Some(job),
            EventKind::ClaimLost,
            claim.decided_by.source(),
        );
        let ev = ev.run(claim.run_id).detail(detail);
        deferred.events.push((ev, now));
    }
    Ok(if already {
        ClaimOutcome::AlreadyAdvanced
    } else {
        ClaimOutcome::Lost
    })
}

/// The tasks of a group's claimed jobs, each with all its jobs, read in one statement.
///
/// On PostgreSQL the rows are locked as they are read, in the order of the tasks' ids and
/// each task's row before its jobs' (`FOR UPDATE` locks a row's tables in the order of
/// the `FROM` clause, after the sort): a cancel (which takes the task's row) and a claim
/// never interleave, and the groups of several nodes lock tasks in one order, so never
/// wait for each other in a cycle (ADR 0001). SQLite's write transaction already
/// excludes every other writer.
///
/// The statement's snapshot is taken when it starts, before it waits for any lock, so a
/// job committed since (by the transaction it waited for, or any other) is not among the
/// jobs read; the rows it locks are read as they now are. That misses nothing a claim
/// needs: the claimed run was committed before the group began, with its job running; a
/// task has one live job at a time, so a job inserted into it since ended the claimed
/// one (a claim does both), and the claim, finding its job changed, loses; and `recover`
/// refuses a task with a running job, while `retry` takes only failed or cancelled
/// tasks, whose jobs have ended. Were a job missed all the same, the next job's insert
/// would collide with it on its stage and iteration (a unique index) and the group
/// would roll back.
struct TasksRead {
    /// Task id: the task and its jobs, taken out as each claim uses them.
    tasks: HashMap<i64, (tasks::Model, Vec<jobs::Model>)>,
    /// Job id: its task's id.
    task_of: HashMap<i64, i64>,
}

impl TasksRead {
    async fn of_jobs(
        txn: &DatabaseTransaction,
        job_ids: &[i64],
        postgres: bool,
    ) -> StoreResult<Self> {
        let of_jobs = Query::select()
            .column(jobs::Column::TaskId)
            .from(jobs::Entity)
            .and_where(jobs::Column::Id.is_in(job_ids.iter().copied()))
            .to_owned();
        let mut q = tasks::Entity::find()
            .join_rev(
                JoinType::InnerJoin,
                jobs::Entity::belongs_to(tasks::Entity)
                    .from(jobs::Column::TaskId)
                    .to(tasks::Column::Id)
                    .into(),
            )
            .select_also(jobs::Entity)
            .filter(tasks::Column::Id.in_subquery(of_jobs))
            .order_by_asc(tasks::Column::Id)
            .order_by_asc(jobs::Column::Id);
        if postgres {
            q = q.lock(LockType::Update);
        }
        let mut read = TasksRead {
            tasks: HashMap::new(),
            task_of: HashMap::new(),
        };
        for (task, job) in q.all(txn).await? {
            let Some(job) = job else { continue };
            read.task_of.insert(job.id, task.id);
            read.tasks
                .entry(task.id)
                .or_insert_with(|| (task, Vec::new()))
                .1
                .push(job);
        }
        Ok(read)
    }

    /// The task of job `job_id` with its jobs, the first time it is asked for; `None`
    /// after (an earlier claim of the group decided it) and when the job was not read.
    fn take(&mut self, job_id: i64) -> Option<(tasks::Model, Vec<jobs::Model>)> {
        self.tasks.remove(self.task_of.get(&job_id)?)
    }
}

/// A won claim's next job: to be queued (and taken for the hand-off's taker when it comes
/// first), or queued already, with the fence. With none to queue: whether the fence ended
/// the task it was given ([`ending`]).
enum Next<'a> {
    Queue(Option<HandOff<'a>>, bool),
    Queued(Box<(jobs::Model, Option<Dispatched>)>),
}

/// The task's end a won claim writes with its fence: none when the decision does not end
/// the task, and none when it is done and the claim's own push or pull request delivers
/// it (ADR 0010); else [`end_task`], which may change nothing (an earlier stage's
/// delivery waits).
fn ending(task_id: i64, decision: &Transition, now: i64) -> Option<UpdateStatement> {
    let end = decision.task_end.as_ref()?;
    let delivers = decision
        .effects
        .iter()
        .any(|e| e.payload.kind().is_delivery());
    (end.status != TaskStatus::Done || !delivers).then(|| end_task(task_id, end.status, now))
}

/// The winner's writes after the fence: the outbox and the next job (taken for `hand`'s
/// taker when it comes first: the hand-off); the task's end, the fence wrote. Its events
/// (after those of the claim's exit) and its `advances` row go to `deferred`.
async fn apply(
    txn: &DatabaseTransaction,
    claim: &Claim,
    (task, job, run): (&tasks::Model, &jobs::Model, &agent_runs::Model),
    decision: Transition,
    queued: Next<'_>,
    deferred: &mut Deferred,
    now: i64,
) -> StoreResult<(ClaimWon, Option<Dispatched>)> {
    let source = claim.decided_by.source();
    let tier = claim.decided_by.tier();
    let ev = |kind| NewEvent::of(task.id, Some(job), kind, source).run(claim.run_id);
    let detail = json!({
        "verdict": claim.verdict, "decided_by": claim.decided_by,
        "attempt": job.attempt, "commit": claim.commit_sha, "tier": tier,
    });
    // The decision's events, in order, written in one statement at the end.
    let mut evs = vec![ev(EventKind::ClaimWon).detail(detail)];
    if tier.is_some() {
        evs.push(ev(EventKind::Reaped).detail(json!({"tier": tier})));
    }

    // The outbox: every external effect of this decision, in the same transaction; before
    // the next job, whose hand-off looks for a push that waits for another host.
    let n_effects = decision.effects.len();
    let run_host = if decision.effects.iter().any(|e| e.on_run_host) {
        nodes::Entity::find_by_id(run.node_id.clone())
            .one(txn)
            .await?
            .map(|n| n.hostname)
    } else {
        None
    };
    for effect in decision.effects {
        let host = effect.on_run_host.then(|| run_host.clone()).flatten();
        insert_effect(txn, task.id, run.id, effect, host, now).await?;
    }

    let ended = matches!(queued, Next::Queue(_, true));
    let (mut next_job, mut handed) = (None, None);
    if let Some(next) = &decision.next {
        let (nj, d) = match queued {
            Next::Queued(queued) => *queued,
            Next::Queue(hand, _) => {
                let feedback = decision.feedback.as_deref();
                let at = (next.stage.as_str(), next.iteration);
                queue_next(txn, task, at, feedback, hand.as_ref(), now).await?
            }
        };
        let detail = json!({"stage": next.stage, "iteration": next.iteration, "after": job.stage});
        let queued = NewEvent::of(task.id, Some(&nj), EventKind::JobQueued, source);
        evs.push(queued.detail(detail));
        (next_job, handed) = (Some(nj), d);
    }
    let job_status = decision.job.status();
    match decision.job {
        JobChange::Retry {
            attempt,
            not_before,
        } => {
            let detail = json!({
                "next_attempt": attempt, "not_before": not_before,
                "backoff_ms": not_before - now,
            });
            evs.push(ev(EventKind::RetryScheduled).detail(detail));
        }
        JobChange::Done | JobChange::Failed => {
            deferred.advances.push(advances::ActiveModel {
                from_job_id: Set(job.id),
                to_job_id: Set(next_job.as_ref().map(|j| j.id)),
                run_id: Set(claim.run_id),
                decided_by: Set(claim.decided_by.advance_decider()),
                created_at: Set(now),
            });
            let detail = json!({
                "from_stage": job.stage, "job_status": job_status,
                "to_job": next_job.as_ref().map(|j| j.id),
                "to_stage": next_job.as_ref().map(|j| j.stage.clone()),
            });
            evs.push(ev(EventKind::JobAdvanced).detail(detail));
        }
    }
    // A task is done only once its work is on the remote: with a push or pull request
    // still to come, it stays active until the EffectWorker performs them (ADR 0010).
    let mut task_status = decision.task_end.as_ref().map(|e| e.status);
    if let Some(end) = &decision.task_end {
        // The fence wrote the end ([`ending`]): unless a delivery waits.
        if !ended {
            task_status = None;
            let detail = json!({"stage": job.stage});
            evs.push(ev(EventKind::AwaitingDelivery).detail(detail));
        } else {
            let kind = match end.status {
                TaskStatus::Done => EventKind::TaskDone,
                _ => EventKind::TaskFailed,
            };
            let detail = json!({"stage": job.stage, "reason": end.reason});
            evs.push(ev(kind).detail(detail));
        }
    }
    deferred.events.extend(evs.into_iter().map(|e| (e, now)));
    let won = ClaimWon {
        job_status,
        next_job,
        task_status,
        effects: n_effects,
    };
    Ok((won, handed))
}

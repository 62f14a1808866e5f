//! The fenced claim: the job's row changes only if it is `running` with the claim's run
//! as its current run, and the winner writes everything the policy's decision implies
//! in the same transaction (the job's terminal or retry state, the next job or the
//! task's end, the `advances` row, the outbox, the events). A loser writes nothing of
//! its own but the run's exit its claim carried; only the arbiter's `claim_lost` event
//! records that it lost. The Advancer's claims waiting together share one transaction.

use entity::{advances, agent_runs, jobs, nodes, tasks};
use sea_orm::sea_query::{Expr, LockType, Query};
use sea_orm::{
    ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use serde_json::json;

use super::delivery::delivery_pending;
use super::outbox::insert_effect;
use super::tasks::{for_update, insert_job, set_task_status};
use super::{
    Dispatched, KnownLastCommit, NewEvent, RunExit, Store, StoreError, StoreResult, Taker,
    append_all, must,
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
    /// [`Store::hand_off`]). `exit`, the run's exit when its Monitor did not record it on
    /// its own, is written first, whether the claim wins or loses.
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
    /// earlier one wrote. An error before the commit leaves nothing written, for none of
    /// them; one of the commit itself leaves unknown what was.
    pub async fn claim_all(
        &self,
        items: &[ClaimItem<'_>],
        policy: &Policy,
        now: i64,
    ) -> Result<Vec<(ClaimOutcome, Option<Dispatched>)>, GroupError> {
        let (_write, txn) = self.write_txn().await.map_err(GroupError::NothingWritten)?;
        if self.is_postgres() && items.len() > 1 {
            lock_tasks_in_order(&txn, items)
                .await
                .map_err(GroupError::NothingWritten)?;
        }
        let mut decided = Vec::with_capacity(items.len());
        for item in items {
            // On an error the transaction is dropped, which rolls it back.
            let one = self.claim_in(&txn, item, policy, now).await;
            decided.push(one.map_err(GroupError::NothingWritten)?);
        }
        if let Err(e) = txn.commit().await {
            let handed = decided.into_iter().filter_map(|(_, h)| h).collect();
            return Err(GroupError::Commit {
                error: e.into(),
                handed,
            });
        }
        Ok(decided)
    }

    /// One claim, in `txn`.
    async fn claim_in(
        &self,
        txn: &DatabaseTransaction,
        item: &ClaimItem<'_>,
        policy: &Policy,
        now: i64,
    ) -> StoreResult<(ClaimOutcome, Option<Dispatched>)> {
        let claim = item.claim;
        // The task's row first, then its jobs' (the claimed one, and the others whose
        // iterations the policy counts): a cancel (which takes the task row) and this
        // claim never interleave, and within one task the order never deadlocks (a
        // group of claims has taken its tasks' rows already, in the order of their ids;
        // ADR 0001).
        // Two reads, locking on PostgreSQL; SQLite's write transaction already excludes
        // every other writer.
        let postgres = self.is_postgres();
        let task = task_of_job(txn, claim.job_id, postgres).await?;
        let siblings = match &task {
            Some(t) => jobs_of_task(txn, t.id, postgres).await?,
            None => Vec::new(),
        };
        // The exit before anything of the claim's, after the task's and jobs' rows (which
        // claims and cancels take first); it is written whether the claim wins or loses.
        let written = match item.exit {
            Some(exit) => exit.write(txn).await?.1,
            None => Vec::new(),
        };
        let job = siblings.iter().find(|j| j.id == claim.job_id).cloned();
        let fenced = job.as_ref().is_some_and(|j| {
            j.status == JobStatus::Running && j.current_run_id == Some(claim.run_id)
        }) && task
            .as_ref()
            .is_some_and(|t| t.status == TaskStatus::Active);
        let (Some(job), Some(task)) = (job.filter(|_| fenced), task) else {
            return Ok((record_loss(txn, claim, written, now).await?, None));
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
        // A fence that changes nothing wrote nothing: the loss is recorded in `txn`.
        if !fence(txn, &job, claim.run_id, decision.job, retry_feedback, now).await? {
            return Ok((record_loss(txn, claim, written, now).await?, None));
        }
        let (won, run) = apply(txn, claim, &task, &job, decision, written, now).await?;
        let handed = match (&item.taker, &won.next_job) {
            (Some(taker), Some(next)) => {
                self.hand_off(txn, taker, &task, next, now)
                    .await?
                    .map(|d| Dispatched {
                        last_commit: known_last_commit(claim, &run, taker),
                        ..d
                    })
            }
            _ => None,
        };
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

/// Records a lost claim (the arbiter's own event, after `written`, the events of the
/// exit the claim carried) and tells the claimant which kind.
async fn record_loss(
    txn: &DatabaseTransaction,
    claim: &Claim,
    mut written: Vec<(NewEvent, i64)>,
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
        written.push((ev.run(claim.run_id).detail(detail), now));
    }
    append_all(txn, written).await?;
    Ok(if already {
        ClaimOutcome::AlreadyAdvanced
    } else {
        ClaimOutcome::Lost
    })
}

/// The task of job `job_id`, its row locked on PostgreSQL; `None` when either is gone.
async fn task_of_job(
    txn: &DatabaseTransaction,
    job_id: i64,
    postgres: bool,
) -> StoreResult<Option<tasks::Model>> {
    let of_job = Query::select()
        .column(jobs::Column::TaskId)
        .from(jobs::Entity)
        .and_where(jobs::Column::Id.eq(job_id))
        .to_owned();
    let q = tasks::Entity::find().filter(tasks::Column::Id.in_subquery(of_job));
    Ok(for_update(q, postgres).one(txn).await?)
}

/// The rows of the tasks of a group's claims, locked on PostgreSQL before any claim's in
/// the order of their ids: the groups of several nodes lock tasks in one order and never
/// wait for each other in a cycle (ADR 0001).
async fn lock_tasks_in_order(
    txn: &DatabaseTransaction,
    items: &[ClaimItem<'_>],
) -> StoreResult<()> {
    let of_jobs = Query::select()
        .column(jobs::Column::TaskId)
        .from(jobs::Entity)
        .and_where(jobs::Column::Id.is_in(items.iter().map(|i| i.claim.job_id)))
        .to_owned();
    tasks::Entity::find()
        .select_only()
        .column(tasks::Column::Id)
        .filter(tasks::Column::Id.in_subquery(of_jobs))
        .order_by_asc(tasks::Column::Id)
        .lock(LockType::Update)
        .into_tuple::<i64>()
        .all(txn)
        .await?;
    Ok(())
}

/// Every job of task `task_id`, their rows locked on PostgreSQL.
async fn jobs_of_task(
    txn: &DatabaseTransaction,
    task_id: i64,
    postgres: bool,
) -> StoreResult<Vec<jobs::Model>> {
    let q = jobs::Entity::find().filter(jobs::Column::TaskId.eq(task_id));
    Ok(for_update(q, postgres).all(txn).await?)
}

/// The fenced write: it must change exactly the row read before. False when it did not.
async fn fence(
    txn: &DatabaseTransaction,
    job: &jobs::Model,
    run_id: i64,
    change: JobChange,
    feedback: Option<&str>,
    now: i64,
) -> StoreResult<bool> {
    let mut upd = jobs::Entity::update_many()
        .col_expr(jobs::Column::Status, Expr::value(change.status()))
        .col_expr(jobs::Column::UpdatedAt, Expr::value(now));
    if let JobChange::Retry {
        attempt,
        not_before,
    } = change
    {
        upd = upd
            .col_expr(jobs::Column::Attempt, Expr::value(attempt))
            .col_expr(jobs::Column::NotBefore, Expr::value(not_before))
            .col_expr(jobs::Column::CurrentRunId, Expr::value(Option::<i64>::None))
            .col_expr(
                jobs::Column::Feedback,
                Expr::value(feedback.map(str::to_string)),
            );
    }
    let changed = upd
        .filter(jobs::Column::Id.eq(job.id))
        .filter(jobs::Column::Status.eq(JobStatus::Running))
        .filter(jobs::Column::CurrentRunId.eq(run_id))
        .exec(txn)
        .await?
        .rows_affected;
    Ok(changed == 1)
}

/// The winner's writes after the fence: the run's outcome, the events (after `written`,
/// those of the claim's exit), the next job or the task's end, the `advances` row and the
/// outbox.
async fn apply(
    txn: &DatabaseTransaction,
    claim: &Claim,
    task: &tasks::Model,
    job: &jobs::Model,
    decision: Transition,
    written: Vec<(NewEvent, i64)>,
    now: i64,
) -> StoreResult<(ClaimWon, agent_runs::Model)> {
    let usage = claim.usage.unwrap_or_default();
    // The run's outcome, returning the run (its node names the host of its effects).
    let run = agent_runs::Entity::update_many()
        .col_expr(
            agent_runs::Column::Outcome,
            Expr::value(claim.verdict.outcome()),
        )
        .col_expr(
            agent_runs::Column::CommitSha,
            Expr::value(claim.commit_sha.clone()),
        )
        .col_expr(agent_runs::Column::TokensIn, Expr::value(usage.tokens_in))
        .col_expr(agent_runs::Column::TokensOut, Expr::value(usage.tokens_out))
        .col_expr(
            agent_runs::Column::CostMicrousd,
            Expr::value(usage.cost_microusd),
        )
        .col_expr(agent_runs::Column::Turns, Expr::value(usage.turns))
        .filter(agent_runs::Column::Id.eq(claim.run_id))
        .exec_with_returning(txn)
        .await?
        .pop();
    let run = must(run, || format!("run {}", claim.run_id))?;
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

    let mut next_job = None;
    if let Some(next) = &decision.next {
        let feedback = decision.feedback.as_deref();
        let nj = insert_job(txn, task.id, &next.stage, next.iteration, feedback, now).await?;
        let detail = json!({"stage": next.stage, "iteration": next.iteration, "after": job.stage});
        let queued = NewEvent::of(task.id, Some(&nj), EventKind::JobQueued, source);
        evs.push(queued.detail(detail));
        next_job = Some(nj);
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
            advances::Entity::insert(advances::ActiveModel {
                from_job_id: Set(job.id),
                to_job_id: Set(next_job.as_ref().map(|j| j.id)),
                run_id: Set(claim.run_id),
                decided_by: Set(claim.decided_by.advance_decider()),
                created_at: Set(now),
            })
            .exec_without_returning(txn)
            .await?;
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
        let delivering = end.status == TaskStatus::Done
            && (decision
                .effects
                .iter()
                .any(|e| e.payload.kind().is_delivery())
                || delivery_pending(txn, task.id).await?);
        if delivering {
            task_status = None;
            let detail = json!({"stage": job.stage});
            evs.push(ev(EventKind::AwaitingDelivery).detail(detail));
        } else {
            set_task_status(txn, task.id, end.status, now).await?;
            let kind = match end.status {
                TaskStatus::Done => EventKind::TaskDone,
                _ => EventKind::TaskFailed,
            };
            let detail = json!({"stage": job.stage, "reason": end.reason});
            evs.push(ev(kind).detail(detail));
        }
    }

    // The outbox: every external effect of this decision, in the same transaction.
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
    let evs = written.into_iter().chain(evs.into_iter().map(|e| (e, now)));
    append_all(txn, evs.collect()).await?;
    let won = ClaimWon {
        job_status,
        next_job,
        task_status,
        effects: n_effects,
    };
    Ok((won, run))
}

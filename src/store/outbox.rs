//! The effects outbox (written by the claim, drained by the EffectWorker), webhook
//! deliveries, and the cross-task reads of the dashboard.

use std::collections::HashSet;

use entity::{advances, effects, events, tasks, webhook_deliveries};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};
use serde_json::json;

use super::delivery::{complete_delivery, fail_delivery};
use super::tasks::lock_task;
use super::{NewEvent, Store, StoreError, StoreResult, append};
use crate::model::{EffectKind, EffectStatus, EventKind, EventSource};
use crate::policy::PlannedEffect;

/// Which failed effects to retry.
#[derive(Debug, Clone, Copy)]
pub enum EffectSelector {
    One(i64),
    /// Every failed effect of the task with this id.
    OfTask(i64),
}

/// How one attempt of an effect ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EffectOutcome {
    Done { external_ref: Option<String> },
    Retry { error: String, at: i64 },
    Failed { error: String },
}

impl EffectOutcome {
    /// `done`, `retry` or `failed`, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            EffectOutcome::Done { .. } => "done",
            EffectOutcome::Retry { .. } => "retry",
            EffectOutcome::Failed { .. } => "failed",
        }
    }
}

/// What recording an effect's outcome did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FinishedEffect {
    /// False when another worker had taken the effect over: nothing was written.
    pub recorded: bool,
    /// The task ended with it: done once delivered, or failed by a refused delivery.
    pub task_ended: Option<crate::model::TaskStatus>,
}

impl Store {
    /// The effects this node may perform now: of each task, only its first pending
    /// effect (effects of one task run in order), when it is for any host or for this
    /// one, and is due or its lease's holder is gone (`lease_lapsed` says which holders
    /// are: a dead node, or an earlier boot of this host).
    pub async fn due_effects(
        &self,
        hostname: &str,
        lease_lapsed: impl Fn(&str) -> bool,
        now: i64,
    ) -> StoreResult<Vec<(effects::Model, tasks::Model)>> {
        let pending = effects::Entity::find()
            .filter(effects::Column::Status.eq(EffectStatus::Pending))
            .order_by_asc(effects::Column::TaskId)
            .order_by_asc(effects::Column::Id)
            .all(&self.db)
            .await?;
        let mut seen = HashSet::new();
        let due: Vec<effects::Model> = pending
            .into_iter()
            .filter(|e| seen.insert(e.task_id))
            .filter(|e| {
                let due =
                    e.next_attempt_at <= now || e.leased_by.as_deref().is_some_and(&lease_lapsed);
                due && e.host.as_deref().is_none_or(|h| h == hostname)
            })
            .collect();
        let tasks = self.tasks_by_id(due.iter().map(|e| e.task_id)).await?;
        Ok(due
            .into_iter()
            .filter_map(|e| tasks.get(&e.task_id).cloned().map(|t| (e, t)))
            .collect())
    }

    /// The task's first pending effect, when it is due and this host may perform it: what
    /// a worker that just finished the one before it takes next.
    pub async fn next_effect_of_task(
        &self,
        task_id: i64,
        hostname: &str,
        now: i64,
    ) -> StoreResult<Option<effects::Model>> {
        let first = effects::Entity::find()
            .filter(effects::Column::TaskId.eq(task_id))
            .filter(effects::Column::Status.eq(EffectStatus::Pending))
            .order_by_asc(effects::Column::Id)
            .one(&self.db)
            .await?;
        Ok(first.filter(|e| {
            e.next_attempt_at <= now && e.host.as_deref().is_none_or(|h| h == hostname)
        }))
    }

    /// Takes an effect for `lease_ms`: another worker (this node after a crash, or
    /// another node) takes it again only after the lease. False when someone else has.
    pub async fn lease_effect(
        &self,
        e: &effects::Model,
        node_id: &str,
        lease_ms: i64,
        now: i64,
    ) -> StoreResult<bool> {
        let (_write, db) = self.lock_writes().await;
        let n = effects::Entity::update_many()
            .col_expr(effects::Column::NextAttemptAt, Expr::value(now + lease_ms))
            .col_expr(effects::Column::LeasedBy, Expr::value(node_id))
            .col_expr(effects::Column::Attempts, Expr::value(e.attempts + 1))
            .col_expr(effects::Column::UpdatedAt, Expr::value(now))
            .filter(effects::Column::Id.eq(e.id))
            .filter(effects::Column::Status.eq(EffectStatus::Pending))
            .filter(effects::Column::Attempts.eq(e.attempts))
            .filter(effects::Column::NextAttemptAt.eq(e.next_attempt_at))
            .exec(db)
            .await?
            .rows_affected;
        Ok(n == 1)
    }

    /// Records the outcome of one attempt of an effect (after [`Store::lease_effect`] of
    /// `e` by `node_id`): done, retried at `retry_at`, or failed for good; with its event.
    /// Fenced by the lease: when another worker took the effect over since (a newer
    /// attempt), nothing is written. A push or pull request done may end the task
    /// `done`; one failed for good fails it, and `on_failed` is written (ADR 0010).
    pub async fn finish_effect(
        &self,
        e: &effects::Model,
        node_id: &str,
        outcome: EffectOutcome,
        on_failed: Vec<PlannedEffect>,
        now: i64,
    ) -> StoreResult<FinishedEffect> {
        let source = EventSource::Monitor;
        let (write, txn) = self.write_txn().await?;
        // A delivery's end reads its task's row locked, before the effect's, as a claim
        // takes them (it inserts its effects, waiting on one this holds under the same
        // key, after its task's row).
        let task = match e.kind.is_delivery() {
            true => lock_task(&txn, e.task_id, self.is_postgres()).await?,
            false => None,
        };
        // The attempt is over: no lease covers the effect any more, so a retry waits for
        // its backoff whatever becomes of this node.
        let mut upd = effects::Entity::update_many()
            .col_expr(effects::Column::UpdatedAt, Expr::value(now))
            .col_expr(
                effects::Column::LeasedBy,
                Expr::value(Option::<String>::None),
            );
        let mut event = None;
        match &outcome {
            EffectOutcome::Done { external_ref } => {
                upd = upd
                    .col_expr(effects::Column::Status, Expr::value(EffectStatus::Done))
                    .col_expr(
                        effects::Column::ExternalRef,
                        Expr::value(external_ref.clone()),
                    )
                    .col_expr(
                        effects::Column::LastError,
                        Expr::value(Option::<String>::None),
                    );
                event = Some((
                    EventKind::EffectDone,
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
                    .col_expr(effects::Column::Status, Expr::value(EffectStatus::Failed))
                    .col_expr(effects::Column::LastError, Expr::value(error.clone()));
                event = Some((
                    EventKind::EffectFailed,
                    json!({"kind": e.kind, "key": e.idempotency_key, "attempts": e.attempts + 1, "error": error}),
                ));
            }
        }
        let changed = upd
            .filter(effects::Column::Id.eq(e.id))
            .filter(effects::Column::Status.eq(EffectStatus::Pending))
            .filter(effects::Column::Attempts.eq(e.attempts + 1))
            .filter(effects::Column::LeasedBy.eq(node_id))
            .exec(&txn)
            .await?
            .rows_affected;
        if let Some((kind, detail)) = event.filter(|_| changed == 1) {
            let ev = NewEvent {
                task_id: e.task_id,
                job_id: None,
                run_id: Some(e.run_id),
                kind,
                source,
                detail,
            };
            append(&txn, ev, now).await?;
        }
        let task_ended = match (&outcome, &task) {
            (_, None) => None,
            _ if changed != 1 => None,
            (EffectOutcome::Done { .. }, Some(task)) => complete_delivery(&txn, task, now).await?,
            (EffectOutcome::Failed { error }, Some(task)) => {
                fail_delivery(&txn, (task, e), error, on_failed, now).await?
            }
            (EffectOutcome::Retry { .. }, Some(_)) => None,
        };
        txn.commit().await?;
        drop(write);
        Ok(FinishedEffect {
            recorded: changed == 1,
            task_ended,
        })
    }

    /// Makes failed effects pending again, as new (attempts from zero, due now): the one
    /// with `id`, or every failed effect of a task. Returns them; an event each.
    pub async fn retry_effects(
        &self,
        which: EffectSelector,
        source: EventSource,
        now: i64,
    ) -> StoreResult<Vec<effects::Model>> {
        let (_write, txn) = self.write_txn().await?;
        let failed = match which {
            EffectSelector::One(id) => {
                let e = effects::Entity::find_by_id(id)
                    .one(&txn)
                    .await?
                    .ok_or(StoreError::NoSuchEffect(id))?;
                if e.status != EffectStatus::Failed {
                    return Err(StoreError::EffectNotFailed {
                        id,
                        status: e.status,
                    });
                }
                vec![e]
            }
            EffectSelector::OfTask(task_id) => {
                effects::Entity::find()
                    .filter(effects::Column::TaskId.eq(task_id))
                    .filter(effects::Column::Status.eq(EffectStatus::Failed))
                    .order_by_asc(effects::Column::Id)
                    .all(&txn)
                    .await?
            }
        };
        for e in &failed {
            pending_again(now)
                .filter(effects::Column::Id.eq(e.id))
                .exec(&txn)
                .await?;
            let ev = NewEvent {
                task_id: e.task_id,
                job_id: None,
                run_id: Some(e.run_id),
                kind: EventKind::EffectRetried,
                source,
                detail: json!({"effect": e.id, "kind": e.kind, "key": e.idempotency_key, "last_error": e.last_error}),
            };
            append(&txn, ev, now).await?;
        }
        let ids: Vec<i64> = failed.iter().map(|e| e.id).collect();
        let retried = effects::Entity::find()
            .filter(effects::Column::Id.is_in(ids))
            .order_by_asc(effects::Column::Id)
            .all(&txn)
            .await?;
        txn.commit().await?;
        Ok(retried)
    }

    /// The URL of the task's pull request, once its effect is done.
    pub async fn pull_request_url(&self, task_id: i64) -> StoreResult<Option<String>> {
        Ok(effects::Entity::find()
            .filter(effects::Column::TaskId.eq(task_id))
            .filter(effects::Column::Kind.eq(EffectKind::PullRequest))
            .filter(effects::Column::Status.eq(EffectStatus::Done))
            .one(&self.db)
            .await?
            .and_then(|e| e.external_ref))
    }

    pub async fn effect(&self, id: i64) -> StoreResult<Option<effects::Model>> {
        Ok(effects::Entity::find_by_id(id).one(&self.db).await?)
    }

    pub async fn effects_of_run(&self, run_id: i64) -> StoreResult<Vec<effects::Model>> {
        Ok(effects::Entity::find()
            .filter(effects::Column::RunId.eq(run_id))
            .all(&self.db)
            .await?)
    }

    /// Pending effects, oldest first, with their task's key.
    pub async fn pending_effects(&self, limit: u64) -> StoreResult<Vec<(effects::Model, String)>> {
        let pending = effects::Entity::find()
            .filter(effects::Column::Status.eq(EffectStatus::Pending))
            .order_by_asc(effects::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?;
        let tasks = self.tasks_by_id(pending.iter().map(|e| e.task_id)).await?;
        Ok(pending
            .into_iter()
            .map(|e| {
                let key = tasks
                    .get(&e.task_id)
                    .map(|t| t.key.clone())
                    .unwrap_or_default();
                (e, key)
            })
            .collect())
    }

    /// Effects that failed for good, newest first.
    pub async fn failed_effects(&self, limit: u64) -> StoreResult<Vec<effects::Model>> {
        Ok(effects::Entity::find()
            .filter(effects::Column::Status.eq(EffectStatus::Failed))
            .order_by_desc(effects::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// The `advances` rows of a job (at most one, by the table's key).
    pub async fn advances_of(&self, job_id: i64) -> StoreResult<Vec<advances::Model>> {
        Ok(advances::Entity::find()
            .filter(advances::Column::FromJobId.eq(job_id))
            .all(&self.db)
            .await?)
    }

    /// The newest events of these kinds, across tasks, newest first.
    pub async fn recent_events(
        &self,
        kinds: &[EventKind],
        limit: u64,
    ) -> StoreResult<Vec<events::Model>> {
        Ok(events::Entity::find()
            .filter(events::Column::Kind.is_in(kinds.iter().copied()))
            .order_by_desc(events::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Remembers a webhook delivery; false when it was seen before.
    pub async fn record_delivery(
        &self,
        id: &str,
        source: EventSource,
        now: i64,
    ) -> StoreResult<bool> {
        let (_write, db) = self.lock_writes().await;
        let r = webhook_deliveries::Entity::insert(webhook_deliveries::ActiveModel {
            id: Set(id.to_string()),
            source: Set(source),
            received_at: Set(now),
        })
        .on_conflict_do_nothing_on([webhook_deliveries::Column::Id])
        .exec(db)
        .await?;
        Ok(matches!(r, sea_orm::TryInsertResult::Inserted(_)))
    }

    /// Forgets a delivery whose handling failed, so that the sender's redelivery counts.
    pub async fn forget_delivery(&self, id: &str) -> StoreResult<()> {
        let (_write, db) = self.lock_writes().await;
        webhook_deliveries::Entity::delete_by_id(id.to_string())
            .exec(db)
            .await?;
        Ok(())
    }
}

/// An update that makes effects pending again as new: no attempt yet, due at `now`, no
/// lease. The caller says which.
pub(super) fn pending_again(now: i64) -> sea_orm::UpdateMany<effects::Entity> {
    effects::Entity::update_many()
        .col_expr(effects::Column::Status, Expr::value(EffectStatus::Pending))
        .col_expr(effects::Column::Attempts, Expr::value(0))
        .col_expr(effects::Column::NextAttemptAt, Expr::value(now))
        .col_expr(
            effects::Column::LeasedBy,
            Expr::value(Option::<String>::None),
        )
        .col_expr(effects::Column::UpdatedAt, Expr::value(now))
}

/// Writes one effect to the outbox within the caller's transaction; a second write of the
/// same idempotency key is a no-op.
pub(super) async fn insert_effect<C: ConnectionTrait>(
    db: &C,
    task_id: i64,
    run_id: i64,
    effect: PlannedEffect,
    host: Option<String>,
    now: i64,
) -> StoreResult<()> {
    let key = effect.idempotency_key.clone();
    let payload = effect.payload.to_json();
    let inserted = effects::Entity::insert(effects::ActiveModel {
        task_id: Set(task_id),
        run_id: Set(run_id),
        kind: Set(effect.payload.kind()),
        idempotency_key: Set(effect.idempotency_key),
        status: Set(EffectStatus::Pending),
        attempts: Set(0),
        next_attempt_at: Set(now),
        last_error: Set(None),
        external_ref: Set(None),
        payload: Set(payload.clone()),
        created_at: Set(now),
        updated_at: Set(now),
        host: Set(host.clone()),
        ..Default::default()
    })
    .on_conflict_do_nothing_on([effects::Column::IdempotencyKey])
    .exec(db)
    .await?;
    if matches!(inserted, sea_orm::TryInsertResult::Inserted(_)) {
        return Ok(());
    }
    // The same effect again (a pull request keyed by its task, a later pass of the
    // stage): one that failed for good is made pending again; one done or under way
    // is left as it is.
    pending_again(now)
        .col_expr(effects::Column::RunId, Expr::value(run_id))
        .col_expr(effects::Column::Payload, Expr::value(payload))
        .col_expr(effects::Column::Host, Expr::value(host))
        .filter(effects::Column::IdempotencyKey.eq(key))
        .filter(effects::Column::Status.eq(EffectStatus::Failed))
        .exec(db)
        .await?;
    Ok(())
}

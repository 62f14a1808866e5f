//! Retention of history in the database: the events, runs and settled effects of tasks
//! that ended long ago, and webhook deliveries past their dedupe window. Small batches in
//! short transactions, so a pass never holds a long lock.

use entity::{agent_runs, effects, events, jobs, tasks, webhook_deliveries};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Serialize;

use super::{Store, StoreResult};
use crate::model::{EffectStatus, TaskStatus};

/// What one pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HistoryPruned {
    pub tasks: u64,
    pub events: u64,
    pub runs: u64,
    pub effects: u64,
    pub deliveries: u64,
}

/// Deliveries removed by one statement.
const DELIVERY_BATCH: u64 = 1000;

impl Store {
    /// How many ended tasks still have history that `prune_history` would remove.
    pub async fn prunable_tasks(&self, ended_before: i64) -> StoreResult<u64> {
        use sea_orm::PaginatorTrait;
        Ok(tasks::Entity::find()
            .filter(tasks::Column::Status.ne(TaskStatus::Active))
            .filter(tasks::Column::UpdatedAt.lte(ended_before))
            .filter(tasks::Column::HistoryPrunedAt.is_null())
            .count(&self.db)
            .await?)
    }

    /// Removes the history of up to `max_tasks` tasks that ended at or before
    /// `ended_before` (one short transaction each; the task and its jobs stay, marked
    /// `history_pruned_at`), and up to `max_tasks` x 10 webhook deliveries received before
    /// `deliveries_before`. A later pass goes on where this one stopped.
    pub async fn prune_history(
        &self,
        ended_before: i64,
        deliveries_before: i64,
        max_tasks: u64,
        now: i64,
    ) -> StoreResult<HistoryPruned> {
        let mut out = HistoryPruned::default();
        let ended: Vec<i64> = tasks::Entity::find()
            .select_only()
            .column(tasks::Column::Id)
            .filter(tasks::Column::Status.ne(TaskStatus::Active))
            .filter(tasks::Column::UpdatedAt.lte(ended_before))
            .filter(tasks::Column::HistoryPrunedAt.is_null())
            .order_by_asc(tasks::Column::Id)
            .limit(max_tasks)
            .into_tuple()
            .all(&self.db)
            .await?;
        for task_id in ended {
            let (_write, txn) = self.write_txn().await?;
            // Still ended (a retry may have come meanwhile): the mark is the fence.
            let marked = tasks::Entity::update_many()
                .col_expr(tasks::Column::HistoryPrunedAt, Expr::value(now))
                .filter(tasks::Column::Id.eq(task_id))
                .filter(tasks::Column::Status.ne(TaskStatus::Active))
                .filter(tasks::Column::HistoryPrunedAt.is_null())
                .exec(&txn)
                .await?
                .rows_affected;
            if marked == 0 {
                txn.rollback().await?;
                continue;
            }
            let job_ids = Query::select()
                .column(jobs::Column::Id)
                .from(jobs::Entity)
                .and_where(jobs::Column::TaskId.eq(task_id))
                .to_owned();
            out.runs += agent_runs::Entity::delete_many()
                .filter(agent_runs::Column::JobId.in_subquery(job_ids))
                .exec(&txn)
                .await?
                .rows_affected;
            out.events += events::Entity::delete_many()
                .filter(events::Column::TaskId.eq(task_id))
                .exec(&txn)
                .await?
                .rows_affected;
            out.effects += effects::Entity::delete_many()
                .filter(effects::Column::TaskId.eq(task_id))
                .filter(effects::Column::Status.ne(EffectStatus::Pending))
                .exec(&txn)
                .await?
                .rows_affected;
            txn.commit().await?;
            out.tasks += 1;
        }
        for _ in 0..max_tasks.div_ceil(100).max(1) * 10 {
            let (_write, db) = self.lock_writes().await;
            let old = Query::select()
                .column(webhook_deliveries::Column::Id)
                .from(webhook_deliveries::Entity)
                .and_where(webhook_deliveries::Column::ReceivedAt.lt(deliveries_before))
                .limit(DELIVERY_BATCH)
                .to_owned();
            let n = webhook_deliveries::Entity::delete_many()
                .filter(webhook_deliveries::Column::Id.in_subquery(old))
                .exec(db)
                .await?
                .rows_affected;
            out.deliveries += n;
            if n < DELIVERY_BATCH {
                break;
            }
        }
        Ok(out)
    }
}

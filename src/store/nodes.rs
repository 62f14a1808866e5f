//! The node rows: one per boot of `baton serve`, with its heartbeat.

use entity::{leases, nodes};
use sea_orm::sea_query::{Condition, Expr};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use super::{Store, StoreResult};

impl Store {
    /// Registers a fresh node (one per boot) and returns its id.
    pub async fn register_node(&self, hostname: &str, pid: i32, now: i64) -> StoreResult<String> {
        let (_write, db) = self.lock_writes().await;
        let id = format!("{hostname}-{pid}-{now:x}");
        nodes::ActiveModel {
            id: Set(id.clone()),
            hostname: Set(hostname.to_string()),
            pid: Set(pid),
            started_at: Set(now),
            heartbeat_at: Set(now),
            stopped_at: Set(None),
        }
        .insert(db)
        .await?;
        Ok(id)
    }

    /// Every node row (one per boot); what host liveness is computed from.
    pub async fn nodes(&self) -> StoreResult<Vec<nodes::Model>> {
        Ok(nodes::Entity::find().all(&self.db).await?)
    }

    /// Heartbeats a node and, in one statement more, every run of it whose exit is not
    /// recorded yet (on PostgreSQL, except those a transaction holds): one write per node
    /// per interval, however many agents it runs.
    pub async fn heartbeat_node(&self, node_id: &str, now: i64) -> StoreResult<()> {
        self.set_node_time(node_id, nodes::Column::HeartbeatAt, now)
            .await?;
        use entity::agent_runs::{Column, Entity};
        use sea_orm::sea_query::{Expr, LockBehavior, LockType, Query};
        let (_write, db) = self.lock_writes().await;
        // A run whose row a claim holds is being finalized: it is skipped, not waited
        // for. Waiting could deadlock with a group of claims, which holds several runs'
        // rows of this node while it takes more (ADR 0001).
        let mut running = Query::select()
            .column(Column::Id)
            .from(Entity)
            .and_where(Column::NodeId.eq(node_id))
            .and_where(Column::ExitedAt.is_null())
            .to_owned();
        if self.is_postgres() {
            running.lock_with_behavior(LockType::NoKeyUpdate, LockBehavior::SkipLocked);
        }
        Entity::update_many()
            .col_expr(Column::HeartbeatAt, Expr::value(now))
            .filter(Column::Id.in_subquery(running))
            .exec(db)
            .await?;
        Ok(())
    }

    /// Marks a node as stopped cleanly.
    pub async fn stop_node(&self, node_id: &str, now: i64) -> StoreResult<()> {
        self.set_node_time(node_id, nodes::Column::StoppedAt, now)
            .await
    }

    /// Takes (or renews) the lease `name` for `holder` until `now + ttl_ms`: true when
    /// `holder` has it, false while another holder's lease runs. One node at a time
    /// performs a duty guarded by a lease; another takes over when it lapses.
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
        now: i64,
    ) -> StoreResult<bool> {
        let (_write, txn) = self.write_txn().await?;
        let inserted = leases::Entity::insert(leases::ActiveModel {
            name: Set(name.to_string()),
            holder: Set(holder.to_string()),
            expires_at: Set(now + ttl_ms),
        })
        .on_conflict_do_nothing_on([leases::Column::Name])
        .exec(&txn)
        .await?;
        let held = match inserted {
            sea_orm::TryInsertResult::Inserted(_) => true,
            _ => {
                leases::Entity::update_many()
                    .col_expr(leases::Column::Holder, Expr::value(holder))
                    .col_expr(leases::Column::ExpiresAt, Expr::value(now + ttl_ms))
                    .filter(leases::Column::Name.eq(name))
                    .filter(
                        Condition::any()
                            .add(leases::Column::Holder.eq(holder))
                            .add(leases::Column::ExpiresAt.lte(now)),
                    )
                    .exec(&txn)
                    .await?
                    .rows_affected
                    == 1
            }
        };
        txn.commit().await?;
        Ok(held)
    }

    /// Gives up every lease `holder` holds (at a clean stop), so another node takes its
    /// duties over at once.
    pub async fn release_leases(&self, holder: &str) -> StoreResult<()> {
        let (_write, db) = self.lock_writes().await;
        leases::Entity::delete_many()
            .filter(leases::Column::Holder.eq(holder))
            .exec(db)
            .await?;
        Ok(())
    }

    async fn set_node_time(
        &self,
        node_id: &str,
        column: nodes::Column,
        now: i64,
    ) -> StoreResult<()> {
        let (_write, db) = self.lock_writes().await;
        nodes::Entity::update_many()
            .col_expr(column, Expr::value(now))
            .filter(nodes::Column::Id.eq(node_id))
            .exec(db)
            .await?;
        Ok(())
    }
}

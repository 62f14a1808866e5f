//! The node rows: one per boot of `baton serve`, with its heartbeat.

use entity::nodes;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use super::{Store, StoreResult};

impl Store {
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
        self.set_node_time(node_id, nodes::Column::HeartbeatAt, now)
            .await
    }

    /// Marks a node as stopped cleanly.
    pub async fn stop_node(&self, node_id: &str, now: i64) -> StoreResult<()> {
        self.set_node_time(node_id, nodes::Column::StoppedAt, now)
            .await
    }

    async fn set_node_time(
        &self,
        node_id: &str,
        column: nodes::Column,
        now: i64,
    ) -> StoreResult<()> {
        let _write = self.lock_writes().await;
        nodes::Entity::update_many()
            .col_expr(column, Expr::value(now))
            .filter(nodes::Column::Id.eq(node_id))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

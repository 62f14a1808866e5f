//! Retention of history: `tasks.history_pruned_at` marks a task whose events, runs and
//! settled effects were removed, and the indexes that keep the retention pass and the
//! polled reads (a page of tasks of one status, events of one kind) from scanning what
//! grows with history.

use sea_orm_migration::prelude::*;

use crate::m20261124_000001_initial::index;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("tasks"))
                    .add_column(
                        ColumnDef::new(Alias::new("history_pruned_at"))
                            .big_integer()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        for idx in [
            // The retention pass: ended tasks by when they ended.
            index("tasks", "tasks_status_updated", &["status", "updated_at"]),
            // A page of the tasks of one status, newest first.
            index("tasks", "tasks_status_id", &["status", "id"]),
            // Webhook deliveries past their dedupe window.
            index(
                "webhook_deliveries",
                "webhook_deliveries_received",
                &["received_at"],
            ),
            // The dashboard's recent reaps: events of one kind, newest first.
            index("events", "events_kind", &["kind", "id"]),
        ] {
            manager.create_index(idx).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (table, name) in [
            ("tasks", "tasks_status_updated"),
            ("tasks", "tasks_status_id"),
            ("webhook_deliveries", "webhook_deliveries_received"),
            ("events", "events_kind"),
        ] {
            manager
                .drop_index(Index::drop().name(name).table(Alias::new(table)).to_owned())
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("tasks"))
                    .drop_column(Alias::new("history_pruned_at"))
                    .to_owned(),
            )
            .await
    }
}

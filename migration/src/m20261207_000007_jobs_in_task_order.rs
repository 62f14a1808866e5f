//! Queued jobs in the order dispatch takes them. Dispatch takes the first due job of the
//! oldest task (`ORDER BY task_id, id LIMIT 1`): with the jobs of one status indexed by
//! task, it reads them in that order and stops at the first that qualifies, where the
//! index by due time made it read and sort every queued job first (and PostgreSQL, with
//! no statistics yet, join each with every active task). The Reaper's read of the
//! running jobs uses the status alone, which both indexes lead with.

use sea_orm_migration::prelude::*;

use crate::m20261124_000001_initial::index;

#[derive(DeriveMigrationName)]
pub struct Migration;

const OLD: &str = "jobs_status_not_before";
const NEW: &str = "jobs_status_task";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(index("jobs", NEW, &["status", "task_id", "id"]))
            .await?;
        manager
            .drop_index(Index::drop().name(OLD).table(Alias::new("jobs")).to_owned())
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(index("jobs", OLD, &["status", "not_before", "id"]))
            .await?;
        manager
            .drop_index(Index::drop().name(NEW).table(Alias::new("jobs")).to_owned())
            .await
    }
}

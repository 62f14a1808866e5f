//! Durable work: a job queued to redo a stage whose work was lost with its host
//! (`jobs.recovery`, which does not count against `max_iterations`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("jobs"))
                    .add_column(
                        ColumnDef::new(Alias::new("recovery"))
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("jobs"))
                    .drop_column(Alias::new("recovery"))
                    .to_owned(),
            )
            .await
    }
}

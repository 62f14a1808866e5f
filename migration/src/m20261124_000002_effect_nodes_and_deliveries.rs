//! Effects that only one host can perform (a push needs the workspace, which lives on
//! the host that ran the stage) name that host; webhook deliveries are remembered so that a replayed delivery is ignored.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("effects"))
                    .add_column(ColumnDef::new(Alias::new("host")).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Alias::new("webhook_deliveries"))
                    .col(
                        ColumnDef::new(Alias::new("id"))
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Alias::new("source")).text().not_null())
                    .col(
                        ColumnDef::new(Alias::new("received_at"))
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(Alias::new("webhook_deliveries"))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("effects"))
                    .drop_column(Alias::new("host"))
                    .to_owned(),
            )
            .await
    }
}

//! An effect's lease names its holder (a node id), so that a lease of a dead node or of an
//! earlier boot of this host is taken over at once, and only the holder records an
//! attempt's outcome.

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
                    .add_column(ColumnDef::new(Alias::new("leased_by")).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Alias::new("effects"))
                    .drop_column(Alias::new("leased_by"))
                    .to_owned(),
            )
            .await
    }
}

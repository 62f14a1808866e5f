//! What agents see and what they cost: a task's description, the feedback a job starts
//! with (a reviewer's verdict, a failed attempt's reason), each run's rendered prompt and
//! usage (tokens, cost, turns), and leases that let one node at a time do a periodic duty
//! (polling Plane).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (table, column, type): each added alone, as SQLite alters one column at a time.
const COLUMNS: &[(&str, &str, Kind)] = &[
    ("tasks", "description", Kind::Text),
    ("jobs", "feedback", Kind::Text),
    ("agent_runs", "prompt", Kind::Text),
    ("agent_runs", "tokens_in", Kind::BigInt),
    ("agent_runs", "tokens_out", Kind::BigInt),
    ("agent_runs", "cost_microusd", Kind::BigInt),
    ("agent_runs", "turns", Kind::Int),
];

#[derive(Clone, Copy)]
enum Kind {
    Text,
    BigInt,
    Int,
}

fn column(name: &'static str, kind: Kind) -> ColumnDef {
    let mut c = ColumnDef::new(Alias::new(name));
    match kind {
        Kind::Text => c.text(),
        Kind::BigInt => c.big_integer(),
        Kind::Int => c.integer(),
    };
    c.null().to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (table, name, kind) in COLUMNS {
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(*table))
                        .add_column(column(name, *kind))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(Alias::new("leases"))
                    .col(
                        ColumnDef::new(Alias::new("name"))
                            .text()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Alias::new("holder")).text().not_null())
                    .col(
                        ColumnDef::new(Alias::new("expires_at"))
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Alias::new("leases")).to_owned())
            .await?;
        for (table, name, _) in COLUMNS.iter().rev() {
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new(*table))
                        .drop_column(Alias::new(*name))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

//! The initial schema: every table of the product contract, with the indexes the
//! dispatcher, reaper and effect worker need so that their cost follows the number of
//! live rows, not the size of the history.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn id(name: &'static str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .big_integer()
        .not_null()
        .auto_increment()
        .primary_key()
        .to_owned()
}

fn big(name: &'static str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .big_integer()
        .not_null()
        .to_owned()
}

fn big_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .big_integer()
        .null()
        .to_owned()
}

fn int(name: &'static str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .integer()
        .not_null()
        .to_owned()
}

fn int_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(Alias::new(name)).integer().null().to_owned()
}

fn text(name: &'static str) -> ColumnDef {
    ColumnDef::new(Alias::new(name))
        .text()
        .not_null()
        .to_owned()
}

fn text_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(Alias::new(name)).text().null().to_owned()
}

/// An index `name` on `table`'s `cols`, in order; later migrations use it too.
pub(crate) fn index(
    table: &'static str,
    name: &'static str,
    cols: &[&'static str],
) -> IndexCreateStatement {
    let mut stmt = Index::create();
    stmt.name(name).table(Alias::new(table));
    for col in cols {
        stmt.col(Alias::new(*col));
    }
    stmt.to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let tables = [
            Table::create()
                .table(Alias::new("tasks"))
                .col(id("id"))
                .col(text("key").unique_key().to_owned())
                .col(text("pipeline"))
                .col(text("title"))
                .col(text_null("plane_issue_id"))
                .col(text("status"))
                .col(text_null("trace_parent"))
                .col(big("created_at"))
                .col(big("updated_at"))
                .to_owned(),
            Table::create()
                .table(Alias::new("jobs"))
                .col(id("id"))
                .col(big("task_id"))
                .col(text("stage"))
                .col(int("iteration"))
                .col(text("status"))
                .col(int("attempt"))
                .col(big_null("current_run_id"))
                .col(big("not_before"))
                .col(big("created_at"))
                .col(big("updated_at"))
                .foreign_key(
                    ForeignKey::create()
                        .from(Alias::new("jobs"), Alias::new("task_id"))
                        .to(Alias::new("tasks"), Alias::new("id")),
                )
                .to_owned(),
            Table::create()
                .table(Alias::new("agent_runs"))
                .col(id("id"))
                .col(big("job_id"))
                .col(int("attempt"))
                .col(text("node_id"))
                .col(int_null("pid"))
                .col(big("started_at"))
                .col(big("heartbeat_at"))
                .col(int_null("exit_code"))
                .col(big_null("exited_at"))
                .col(text_null("outcome"))
                .col(text("log_path"))
                .col(text_null("commit_sha"))
                .foreign_key(
                    ForeignKey::create()
                        .from(Alias::new("agent_runs"), Alias::new("job_id"))
                        .to(Alias::new("jobs"), Alias::new("id")),
                )
                .to_owned(),
            Table::create()
                .table(Alias::new("advances"))
                .col(
                    ColumnDef::new(Alias::new("from_job_id"))
                        .big_integer()
                        .not_null()
                        .primary_key(),
                )
                .col(big_null("to_job_id"))
                .col(big("run_id"))
                .col(text("decided_by"))
                .col(big("created_at"))
                .to_owned(),
            Table::create()
                .table(Alias::new("effects"))
                .col(id("id"))
                .col(big("task_id"))
                .col(big("run_id"))
                .col(text("kind"))
                .col(text("idempotency_key").unique_key().to_owned())
                .col(text("status"))
                .col(int("attempts"))
                .col(big("next_attempt_at"))
                .col(text_null("last_error"))
                .col(text_null("external_ref"))
                .col(text("payload"))
                .col(big("created_at"))
                .col(big("updated_at"))
                .to_owned(),
            Table::create()
                .table(Alias::new("events"))
                .col(id("id"))
                .col(big("task_id"))
                .col(big_null("job_id"))
                .col(big_null("run_id"))
                .col(text("kind"))
                .col(text("source"))
                .col(text("detail"))
                .col(big("at"))
                .to_owned(),
            Table::create()
                .table(Alias::new("nodes"))
                .col(text("id").primary_key().to_owned())
                .col(text("hostname"))
                .col(int("pid"))
                .col(big("started_at"))
                .col(big("heartbeat_at"))
                .col(big_null("stopped_at"))
                .to_owned(),
        ];
        for table in tables {
            manager.create_table(table).await?;
        }
        let indexes = [
            // One job per stage and iteration of a task.
            index(
                "jobs",
                "jobs_task_stage_iteration",
                &["task_id", "stage", "iteration"],
            )
            .unique()
            .to_owned(),
            // Dispatcher: due queued jobs in order; Reaper: running jobs.
            index(
                "jobs",
                "jobs_status_not_before",
                &["status", "not_before", "id"],
            ),
            index("agent_runs", "agent_runs_job", &["job_id"]),
            // Effect worker: pending effects that are due, and the effects of one task in order.
            index(
                "effects",
                "effects_status_next",
                &["status", "next_attempt_at"],
            ),
            index("effects", "effects_task", &["task_id", "id"]),
            index("events", "events_task", &["task_id", "id"]),
        ];
        for idx in indexes {
            manager.create_index(idx).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            "events",
            "effects",
            "advances",
            "agent_runs",
            "jobs",
            "tasks",
            "nodes",
        ] {
            manager
                .drop_table(Table::drop().table(Alias::new(table)).to_owned())
                .await?;
        }
        Ok(())
    }
}

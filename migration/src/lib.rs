//! Schema migrations of baton, applied by `baton migrate` and at the start of `baton serve`.

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_initial;
mod m20261124_000002_effect_nodes_and_deliveries;
mod m20261124_000003_prompts_feedback_usage;
mod m20261124_000004_effect_lease_holder;
mod m20261203_000005_durable_work;
mod m20261203_000006_history_retention;
mod m20261207_000007_jobs_in_task_order;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_initial::Migration),
            Box::new(m20261124_000002_effect_nodes_and_deliveries::Migration),
            Box::new(m20261124_000003_prompts_feedback_usage::Migration),
            Box::new(m20261124_000004_effect_lease_holder::Migration),
            Box::new(m20261203_000005_durable_work::Migration),
            Box::new(m20261203_000006_history_retention::Migration),
            Box::new(m20261207_000007_jobs_in_task_order::Migration),
        ]
    }
}

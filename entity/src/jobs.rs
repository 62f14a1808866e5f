use sea_orm::entity::prelude::*;
use serde::Serialize;

/// One stage of one task at one iteration; retried attempts reuse the row.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "jobs")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub task_id: i64,
    pub stage: String,
    /// How many times this stage has been entered for the task (1 for the first).
    pub iteration: i32,
    pub status: crate::JobStatus,
    pub attempt: i32,
    /// The fence: only a claim naming this run can finalize the job.
    pub current_run_id: Option<i64>,
    /// A queued job is not dispatched before this instant (retry backoff).
    pub not_before: i64,
    /// What this job starts with: the verdict of the stage that rejected back to it, or
    /// the reason the previous attempt failed with the end of its log.
    pub feedback: Option<String>,
    /// Queued to redo a stage whose work was lost with its host: it does not count
    /// against the pipeline's `max_iterations`.
    pub recovery: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

use sea_orm::entity::prelude::*;
use serde::Serialize;

/// One attempt of a job: one agent process.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "agent_runs")]
pub struct Model {
    /// The run id, the fencing token of the job's claim.
    #[sea_orm(primary_key)]
    pub id: i64,
    pub job_id: i64,
    pub attempt: i32,
    pub node_id: String,
    pub pid: Option<i32>,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub exit_code: Option<i32>,
    /// When the exit was recorded; the finalization grace window starts here.
    pub exited_at: Option<i64>,
    /// Set by the winning claim, or by a cancel.
    pub outcome: Option<crate::RunOutcome>,
    pub log_path: String,
    pub commit_sha: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

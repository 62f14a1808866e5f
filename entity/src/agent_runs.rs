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
    /// The prompt rendered for the agent, when its stage has one.
    pub prompt: Option<String>,
    /// Usage the agent's tool reported in its log (Claude Code, Codex), when it did.
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    /// Cost in millionths of a US dollar (an integer, so sums are exact).
    pub cost_microusd: Option<i64>,
    pub turns: Option<i32>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

use sea_orm::entity::prelude::*;
use serde::Serialize;

/// The record of a job's one and only terminal transition.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "advances")]
pub struct Model {
    /// Primary key, so a second advance of the same job cannot be written.
    #[sea_orm(primary_key, auto_increment = false)]
    pub from_job_id: i64,
    /// The next job; `None` when the pipeline ended (task done or failed).
    pub to_job_id: Option<i64>,
    pub run_id: i64,
    pub decided_by: crate::AdvanceDecider,
    pub created_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

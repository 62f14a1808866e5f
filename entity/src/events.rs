use sea_orm::entity::prelude::*;
use serde::Serialize;

/// Append-only history of a task.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub task_id: i64,
    pub job_id: Option<i64>,
    pub run_id: Option<i64>,
    pub kind: crate::EventKind,
    pub source: crate::EventSource,
    /// JSON text.
    pub detail: String,
    pub at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

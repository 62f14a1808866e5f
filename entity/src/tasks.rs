use sea_orm::entity::prelude::*;
use serde::Serialize;

/// A ticket driven through a pipeline, e.g. `ORCH-65`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "tasks")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub key: String,
    pub pipeline: String,
    pub title: String,
    /// What the task is about (the work item's text), at most 64 KiB; shown to agents.
    pub description: Option<String>,
    pub plane_issue_id: Option<String>,
    pub status: crate::TaskStatus,
    /// W3C trace context of the task's root span; every span of the task joins it.
    pub trace_parent: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// When the retention pass removed the task's events, runs and settled effects (it
    /// had ended longer ago than `retention.history`); the task and its jobs stay.
    pub history_pruned_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

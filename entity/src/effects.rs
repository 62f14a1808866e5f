use sea_orm::entity::prelude::*;
use serde::Serialize;

/// An external side effect of a won claim, written in the claim's transaction (the outbox).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "effects")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub task_id: i64,
    pub run_id: i64,
    pub kind: crate::EffectKind,
    /// Unique; also sent to the remote so that a repeated delivery is recognised there.
    #[sea_orm(unique)]
    pub idempotency_key: String,
    pub status: crate::EffectStatus,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub external_ref: Option<String>,
    /// What to do, as JSON text: the fields of the kind's payload (see baton's
    /// `model::EffectPayload`).
    pub payload: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// The host that must perform it (a push needs the workspace, which is on the host
    /// that ran the stage; any later boot of baton there can); `None`: any host.
    pub host: Option<String>,
    /// The node whose lease covers the attempt under way (until `next_attempt_at`).
    pub leased_by: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

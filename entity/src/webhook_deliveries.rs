use sea_orm::entity::prelude::*;
use serde::Serialize;

/// A webhook delivery already handled, so that a replay is ignored.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "webhook_deliveries")]
pub struct Model {
    /// The delivery id the sender gave (`X-Plane-Delivery`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub source: crate::EventSource,
    pub received_at: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

use sea_orm::entity::prelude::*;
use serde::Serialize;

/// One boot of one `baton serve` process.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
#[sea_orm(table_name = "nodes")]
pub struct Model {
    /// Fresh per boot.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub hostname: String,
    pub pid: i32,
    pub started_at: i64,
    pub heartbeat_at: i64,
    /// Set on a clean shutdown.
    pub stopped_at: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

//! SQLite: several statements in one call to a connection's thread. Each statement sent
//! on its own is a hand-off to the thread that SQLite's connection runs on and back; a
//! batch runs them one after the other there, as one string, each binding its own share
//! of the values (SQLite's `?` placeholders are taken in order across the statements),
//! and returns the rows of all, in order. PostgreSQL does the same in one statement, with
//! the parts in a `WITH`.

use sea_orm::sea_query::{Expr, ReturningClause, Values};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, QueryResult, Statement, StatementBuilder,
};

use super::StoreResult;

/// The statements of one batch, in order.
#[derive(Default)]
pub(super) struct Batch {
    sql: String,
    values: Vec<sea_orm::Value>,
}

impl Batch {
    /// Appends `stmt`, built for SQLite.
    pub fn push(&mut self, stmt: &impl StatementBuilder) -> &mut Self {
        let Statement { sql, values, .. } = DbBackend::Sqlite.build(stmt);
        if !self.sql.is_empty() {
            self.sql.push_str(";\n");
        }
        self.sql.push_str(&sql);
        if let Some(Values(values)) = values {
            self.values.extend(values);
        }
        self
    }

    /// Runs the statements, in `txn`, in one call; the rows they returned, in order.
    pub async fn run(self, txn: &DatabaseTransaction) -> StoreResult<Vec<QueryResult>> {
        if self.sql.is_empty() {
            return Ok(Vec::new());
        }
        let stmt = Statement::from_sql_and_values(DbBackend::Sqlite, self.sql, self.values);
        Ok(txn.query_all_raw(stmt).await?)
    }
}

/// A `RETURNING` of one row, `1 AS {name}`, for each row a statement changes: how a
/// statement of a batch tells that it wrote, in the batch's rows ([`returned`]).
pub(super) fn returning_mark(name: &str) -> ReturningClause {
    ReturningClause::Exprs(vec![Expr::cust(format!("1 AS \"{name}\""))])
}

/// Whether `row` came from the statement that returns the column `name` (a
/// [`returning_mark`], or a column only that statement returns).
pub(super) fn returned(row: &QueryResult, name: &str) -> bool {
    row.column_names().iter().any(|c| c == name)
}

#[cfg(test)]
mod tests {
    use sea_orm::sea_query::{Alias, ColumnDef, Expr, ExprTrait, Query, Table};
    use sea_orm::{ConnectionTrait, Database, TransactionTrait};

    use super::*;

    /// Each statement of a batch binds its own values, in order, and the batch returns
    /// the rows of all, in order, a write's mark only when it wrote.
    #[tokio::test]
    async fn a_batch_binds_each_statements_values_and_returns_their_rows_in_order() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        let (t, k, v) = (Alias::new("t"), Alias::new("k"), Alias::new("v"));
        let table = Table::create()
            .table(t.clone())
            .col(ColumnDef::new(k.clone()).integer().primary_key())
            .col(ColumnDef::new(v.clone()).text())
            .to_owned();
        db.execute(&table).await.unwrap();
        let insert = |key: i64, value: &str| {
            Query::insert()
                .into_table(t.clone())
                .columns([k.clone(), v.clone()])
                .values_panic([key.into(), value.into()])
                .returning_all()
                .to_owned()
        };
        let update = |key: i64, value: &str| {
            Query::update()
                .table(t.clone())
                .value(v.clone(), value)
                .and_where(Expr::col(k.clone()).eq(key))
                .returning(returning_mark("wrote"))
                .to_owned()
        };
        let txn = db.begin().await.unwrap();
        let mut batch = Batch::default();
        batch
            .push(&insert(1, "one"))
            .push(&update(3, "none"))
            .push(&insert(2, "two"))
            .push(&update(1, "uno"));
        let rows = batch.run(&txn).await.unwrap();
        txn.commit().await.unwrap();
        let read: Vec<(bool, Option<String>)> = rows
            .iter()
            .map(|r| (returned(r, "wrote"), r.try_get::<String>("", "v").ok()))
            .collect();
        assert_eq!(
            read,
            [
                (false, Some("one".to_string())),
                (false, Some("two".to_string())),
                (true, None),
            ]
        );
        let now = Query::select()
            .column(v.clone())
            .from(t.clone())
            .order_by(k.clone(), sea_orm::sea_query::Order::Asc)
            .to_owned();
        let now: Vec<String> = db
            .query_all(&now)
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String>("", "v").unwrap())
            .collect();
        assert_eq!(now, ["uno", "two"]);
    }
}

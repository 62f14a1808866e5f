//! Test databases: a fresh SQLite file or a fresh PostgreSQL database per test, dropped
//! at the end. PostgreSQL is found at `BATON_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432`). When it cannot be reached the PostgreSQL half
//! of a test is skipped with a message saying why, except under CI (`CI=true`), where
//! it fails.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use baton::store::Store;

pub mod git_http;
pub mod harness;
use sea_orm::{ConnectionTrait, Database, Statement};

pub const PG_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    pub store: Store,
    pub dir: tempfile::TempDir,
    pg_name: Option<(String, String)>,
}

impl TestDb {
    /// Runs `sql` on the database through a connection of its own, as a hand outside
    /// baton would.
    pub async fn execute(&self, sql: &str) {
        self.try_execute(sql).await.unwrap();
    }

    /// [`TestDb::execute`], its error returned.
    pub async fn try_execute(&self, sql: &str) -> Result<(), sea_orm::DbErr> {
        use sea_orm::{ConnectionTrait, Database, Statement};
        let c = Database::connect(self.url.as_str()).await?;
        let done = c
            .execute_raw(Statement::from_string(c.get_database_backend(), sql))
            .await;
        c.close().await?;
        done.map(|_| ())
    }

    /// A fresh, migrated database, or `None` when PostgreSQL is unavailable outside CI.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => {
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("baton.db").display()
                );
                let store = open(&url).await;
                Some(TestDb {
                    url,
                    store,
                    dir,
                    pg_name: None,
                })
            }
            Backend::Postgres => {
                let base = pg_base();
                let admin = match Database::connect(format!("{base}/postgres")).await {
                    Ok(db) => db,
                    Err(e) => {
                        if std::env::var("CI").is_ok_and(|v| v == "true") {
                            panic!(
                                "PostgreSQL is required under CI but {base} cannot be reached: {e}"
                            );
                        }
                        eprintln!(
                            "SKIPPED the PostgreSQL half: {base} cannot be reached ({e}); set BATON_TEST_PG_URL"
                        );
                        return None;
                    }
                };
                static N: AtomicU32 = AtomicU32::new(0);
                let name = format!(
                    "baton_test_{}_{}_{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .subsec_nanos()
                );
                admin
                    .execute_raw(Statement::from_string(
                        admin.get_database_backend(),
                        format!("CREATE DATABASE {name}"),
                    ))
                    .await
                    .expect("create test database");
                let _ = admin.close().await;
                let url = format!("{base}/{name}");
                let store = open(&url).await;
                Some(TestDb {
                    url,
                    store,
                    dir,
                    pg_name: Some((base, name)),
                })
            }
        }
    }

    /// A second, independent connection pool to the same database.
    pub async fn other_store(&self) -> Store {
        Store::connect(&self.url).await.expect("second connection")
    }

    /// On PostgreSQL, a transaction of its own that holds task `task_id`'s row until it
    /// ends.
    pub async fn hold_task(&self, task_id: i64) -> sea_orm::DatabaseTransaction {
        use sea_orm::{ConnectionTrait, Database, DbBackend, Statement, TransactionTrait};
        let c = Database::connect(self.url.as_str()).await.unwrap();
        let held = c.begin().await.unwrap();
        let sql = "SELECT id FROM tasks WHERE id = $1 FOR UPDATE";
        let stmt = Statement::from_sql_and_values(DbBackend::Postgres, sql, [task_id.into()]);
        held.execute_raw(stmt).await.unwrap();
        held
    }

    /// On PostgreSQL, returns once `n` sessions of this database wait for a lock.
    pub async fn lock_waiters(&self, n: i64) {
        use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
        let c = Database::connect(self.url.as_str()).await.unwrap();
        let sql = "SELECT count(*) AS n FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
        let stmt = Statement::from_string(DbBackend::Postgres, sql);
        let wait = async {
            loop {
                let row = c.query_one_raw(stmt.clone()).await.unwrap().unwrap();
                if row.try_get::<i64>("", "n").unwrap() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("sessions waiting for a lock");
    }
}

/// Opens and migrates a test database; its pool waits long on a loaded machine.
async fn open(url: &str) -> Store {
    let store = Store::connect_with(url, Duration::from_secs(120))
        .await
        .expect("open test database");
    store.migrate().await.expect("migrate test database");
    store
}

pub fn pg_base() -> String {
    std::env::var("BATON_TEST_PG_URL")
        .unwrap_or_else(|_| PG_URL_DEFAULT.to_string())
        .trim_end_matches('/')
        .to_string()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, name)) = self.pg_name.take() else {
            return;
        };
        // Dropping needs async work; do it on a runtime of its own so that Drop works
        // from any test, whatever runtime it runs on.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(admin) = Database::connect(format!("{base}/postgres")).await {
                    let _ = admin
                        .execute_raw(Statement::from_string(
                            admin.get_database_backend(),
                            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                        ))
                        .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

/// Runs a test body once on SQLite and once on PostgreSQL, as two `#[tokio::test]`s.
#[macro_export]
macro_rules! on_both {
    ($(#[$attr:meta])* $name:ident, $body:path) => {
        mod $name {
            use super::*;
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(db) = $crate::support::TestDb::new($crate::support::Backend::Sqlite).await {
                    $body(db).await;
                }
            }
            $(#[$attr])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) = $crate::support::TestDb::new($crate::support::Backend::Postgres).await {
                    $body(db).await;
                }
            }
        }
    };
}

/// A task key, checked as every edge checks it.
pub fn key(s: &str) -> baton::model::TaskKey {
    baton::model::TaskKey::parse(s).expect("a valid task key")
}

/// Writes a task of the `default` pipeline (its first stage `first_stage`), titled by its
/// key, as the CLI would.
pub async fn submit(
    store: &Store,
    key: &str,
    first_stage: &str,
    now: i64,
) -> baton::store::Submitted {
    let new = baton::store::NewTask {
        key: self::key(key),
        pipeline: "default".into(),
        title: key.into(),
        description: None,
        plane_issue_id: None,
        first_stage: first_stage.into(),
        trace_parent: baton::telemetry::new_trace_parent(),
    };
    store
        .submit(new, baton::model::EventSource::Cli, now)
        .await
        .expect("submit")
}

//! All database access of baton. No SQL lives anywhere else, and this module imports
//! nothing above the domain model: it knows no config, telemetry, actors or edges.
//!
//! Every operation that changes more than one row runs in one transaction. On SQLite,
//! write transactions start with `BEGIN IMMEDIATE`, so that two writers queue on the
//! busy timeout instead of failing when a read lock would have to be upgraded; on
//! PostgreSQL the dispatcher takes its job with `FOR UPDATE SKIP LOCKED`.
//!
//! The operations are split by topic, each an `impl Store` block of its own:
//!
//! - [`tasks`]: submit, cancel, retry and the reads of tasks, jobs and events.
//! - [`runs`]: dispatch, the life of a run (started, heartbeat, exit, adoption) and the
//!   Reaper's view of running jobs.
//! - [`claim`]: the fenced claim, which applies a [`crate::policy::Transition`].
//! - [`outbox`]: effects and webhook deliveries.
//! - [`pages`]: the polled reads: a page of tasks by cursor, counts by status.
//! - [`delivery`]: durable work: a task done only once delivered, a refused delivery,
//!   the recovery of work lost with its host.
//! - [`nodes`]: the node rows.
//! - [`retention`]: history removed after `retention.history`, in small batches.

mod batch;
mod claim;
mod delivery;
mod dispatch;
mod fence;
mod handoff;
mod nodes;
mod outbox;
mod pages;
mod retention;
mod runs;
mod seed;
mod tasks;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use entity::{events, jobs};
use migration::MigratorTrait;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, EntityTrait, QueryTrait, Set, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};

use crate::model::{EventKind, EventSource};

pub use claim::{ClaimItem, GroupError};
pub use delivery::Recovered;
pub use dispatch::{Dispatched, KnownLastCommit, Taker};
pub use outbox::{EffectOutcome, EffectSelector, FinishedEffect};
pub use pages::TaskFilter;
pub use retention::HistoryPruned;
pub use runs::{RunExit, RunningJob, Started};
pub use tasks::{CancelledRun, NewTask, Retried, Submitted, TaskDetail, TaskSummary};

/// How long an SQLite writer waits for another before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// A pooled connection unused this long is pinged before it is handed out again.
const STALE_CONNECTION: Duration = Duration::from_secs(30);
/// How long a caller waits for a pooled connection before the operation fails.
pub const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command (not the service) waits for the database to answer at all.
pub const COMMAND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The direct connection that finds why a pool could not connect.
const CONNECT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open database {url}: {reason}; check database_url (or BATON_DATABASE_URL) and that the server is up"
    )]
    Connect { url: String, reason: String },
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error(
        "the database's schema is older than this baton ({} migration(s) pending: {}); run `baton migrate`, or start `baton serve`, which migrates",
        .0.len(), .0.join(", ")
    )]
    SchemaOlder(Vec<String>),
    #[error(
        "the database's schema is newer than this baton ({0}); use the baton version that the running nodes use"
    )]
    SchemaNewer(String),
    #[error("task {0} already exists")]
    TaskExists(String),
    #[error("no task {0}; `baton status` lists the tasks there are")]
    NoSuchTask(String),
    #[error("no effect {0}; `baton status KEY` lists a task's effects")]
    NoSuchEffect(i64),
    #[error("effect {id} is {status}: only a failed effect can be retried")]
    EffectNotFailed {
        id: i64,
        status: crate::model::EffectStatus,
    },
    #[error("task {key} is {status}: {what}")]
    WrongState {
        key: String,
        status: String,
        what: String,
    },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Replaces the passwords of a database URL with `***`: the userinfo's
/// (`postgres://user:secret@host/db`) and a `password=` query parameter's
/// (`...?password=secret`, any case).
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    let Some(query) = query else {
        return base;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// Why a database could not be opened, in one sentence. A pool that timed out hides the
/// cause (sqlx retries until it gives up), so one direct connection is tried for it.
async fn connect_failure(url: &str, e: DbErr) -> String {
    let pooled = match &e {
        DbErr::Conn(inner) => inner.to_string(),
        other => other.to_string(),
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return pooled;
    }
    use sea_orm::sqlx::Connection;
    let direct = tokio::time::timeout(
        CONNECT_PROBE_TIMEOUT,
        sea_orm::sqlx::postgres::PgConnection::connect(url),
    )
    .await;
    match direct {
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {}s", CONNECT_PROBE_TIMEOUT.as_secs()),
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            pooled
        }
    }
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub task_id: i64,
    pub job_id: Option<i64>,
    pub run_id: Option<i64>,
    pub kind: EventKind,
    pub source: EventSource,
    pub detail: serde_json::Value,
}

impl NewEvent {
    /// An event of a task (and of one of its jobs), with an empty detail.
    pub fn of(
        task_id: i64,
        job: Option<&jobs::Model>,
        kind: EventKind,
        source: EventSource,
    ) -> Self {
        NewEvent {
            task_id,
            job_id: job.map(|j| j.id),
            run_id: None,
            kind,
            source,
            detail: serde_json::json!({}),
        }
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }

    pub fn run(mut self, run_id: i64) -> Self {
        self.run_id = Some(run_id);
        self
    }
}

/// How a pool opens and keeps its connections.
#[derive(Clone, Copy)]
enum Keep {
    /// One connection opened now (the URL is checked), the others when needed; a
    /// connection unused for a while, or old, is closed (sqlx's defaults).
    Pooled,
    /// As `Pooled`, the first one opened when first used too.
    Lazy,
    /// Opened now and kept for the process's life, with its page cache (SQLite's
    /// [`Writer`]).
    Always,
}

/// A pool of at most `max` connections to `url`, opened and kept as `keep` says.
async fn connect_pool(
    url: &str,
    acquire_timeout: Duration,
    max: u32,
    keep: Keep,
) -> StoreResult<DatabaseConnection> {
    let mut opts = ConnectOptions::new(url.to_string());
    if let Keep::Always = keep {
        opts.idle_timeout(None).max_lifetime(None);
    }
    let lazy = matches!(keep, Keep::Lazy);
    opts.sqlx_logging(false)
        .max_connections(max)
        .connect_lazy(lazy)
        .connect_timeout(acquire_timeout)
        // A pooled connection is checked before it is handed out only after a while
        // unused (a server restart or a firewall drops those): a check on every
        // checkout was a round trip per statement, to the server or to SQLite's thread.
        .test_before_acquire_if_idle_for(STALE_CONNECTION)
        .acquire_timeout(acquire_timeout)
        .map_sqlx_sqlite_opts(|o| {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true)
        })
        .map_sqlx_sqlite_pool_opts(|o| {
            o.after_connect(|conn, _| Box::pin(async move { stable_plans(conn).await }))
        });
    match Database::connect(opts).await {
        Ok(db) => Ok(db),
        Err(e) => Err(StoreError::Connect {
            url: redact_url(url),
            reason: connect_failure(url, e).await,
        }),
    }
}

/// What opened a store's pool: its URL (shown without its password) and the time a
/// caller waits for a connection.
#[derive(Clone)]
struct Opened {
    url: String,
    acquire_timeout: Duration,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("url", &redact_url(&self.url))
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// SQLite only: where this process writes ([`Writer`]).
    writer: Option<Arc<Writer>>,
    /// The hostname of each node id this process dispatched for: a node's row never
    /// changes its hostname, so dispatch reads it once rather than per job.
    node_hosts: Arc<std::sync::Mutex<HashMap<String, String>>>,
    /// What opened the pool, for [`Store::own_pool`].
    opened: Arc<Opened>,
}

/// SQLite: the one connection this process writes through, and the lock its writers take
/// turns at (rather than in SQLite's busy handler, which sleeps in steps of milliseconds
/// while it waits). One connection for every write keeps its page cache: SQLite drops a
/// connection's whole cache when it finds that another connection wrote since it last
/// read, and the pool's connections took turns at the writes, each reading its pages
/// again from the file (docs/benchmarks-changes.md). Its connection is kept open for the
/// process's life. Reads use the pool.
#[derive(Debug)]
struct Writer {
    lock: tokio::sync::Mutex<()>,
    db: DatabaseConnection,
}

/// Turns on SQLite's query planner stability guarantee for a new connection. Without it,
/// a statement whose `LIMIT` is a bound value (every `.one()`) is planned again each
/// time it is bound, so the statement cache saved nothing: a quarter of the database
/// thread's time went to parsing the same statements again.
async fn stable_plans(
    conn: &mut sea_orm::sqlx::SqliteConnection,
) -> Result<(), sea_orm::sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: `db` is this connection's open handle, held locked (no other thread uses
    // it) for the call; the option takes an int and an optional int out-pointer.
    let rc = unsafe {
        libsqlite3_sys::sqlite3_db_config(
            db,
            libsqlite3_sys::SQLITE_DBCONFIG_ENABLE_QPSG,
            1 as std::ffi::c_int,
            std::ptr::null_mut::<std::ffi::c_int>(),
        )
    };
    if rc != libsqlite3_sys::SQLITE_OK {
        tracing::warn!(rc, "SQLite refused the query planner stability guarantee");
    }
    Ok(())
}

/// Held while a write transaction of this process is open (SQLite).
type WriteGuard<'a> = Option<tokio::sync::MutexGuard<'a, ()>>;

impl Store {
    /// Opens the database (SQLite in WAL mode with a busy timeout) without migrating.
    pub async fn connect(url: &str) -> StoreResult<Store> {
        Store::connect_with(url, POOL_ACQUIRE_TIMEOUT).await
    }

    /// Like [`Store::connect`], with the time a caller waits for a pooled connection.
    /// Tests on a loaded machine pass a long one.
    pub async fn connect_with(url: &str, acquire_timeout: Duration) -> StoreResult<Store> {
        let sqlite = url.starts_with("sqlite:");
        let db = connect_pool(
            url,
            acquire_timeout,
            if sqlite { 4 } else { 10 },
            Keep::Pooled,
        )
        .await?;
        let writer = match sqlite {
            true => Some(Arc::new(Writer {
                lock: tokio::sync::Mutex::new(()),
                db: connect_pool(url, acquire_timeout, 1, Keep::Always).await?,
            })),
            false => None,
        };
        Ok(Store {
            db,
            writer,
            node_hosts: Arc::default(),
            opened: Arc::new(Opened {
                url: url.to_string(),
                acquire_timeout,
            }),
        })
    }

    /// This store with a PostgreSQL pool of its own, of `max` connections opened when
    /// first used, by the runtime that uses them first (a PostgreSQL connection is driven
    /// by the runtime that opened it): for an actor on a thread of its own. On SQLite, this
    /// store (its connections answer from threads of their own, and its writers share one
    /// lock).
    pub async fn own_pool(&self, max: u32) -> StoreResult<Store> {
        if !self.is_postgres() {
            return Ok(self.clone());
        }
        let Opened {
            url,
            acquire_timeout,
        } = &*self.opened;
        Ok(Store {
            db: connect_pool(url, *acquire_timeout, max, Keep::Lazy).await?,
            ..self.clone()
        })
    }

    /// Opens the database and applies every pending migration.
    pub async fn open(url: &str) -> StoreResult<Store> {
        let store = Store::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens the database for a command that must not change its schema: the schema must
    /// be exactly this version's (only `baton migrate` and `baton serve` change it, so a
    /// newer command never upgrades it under older running nodes).
    pub async fn open_current(url: &str) -> StoreResult<Store> {
        let store = Store::connect_with(url, COMMAND_CONNECT_TIMEOUT).await?;
        store.check_schema().await?;
        Ok(store)
    }

    /// Fails unless every migration of this version, and no other, is applied.
    pub async fn check_schema(&self) -> StoreResult<()> {
        let pending = migration::Migrator::get_pending_migrations_read_only(&self.db)
            .await
            .map_err(|e| match e {
                // An applied migration this version has no file for: a newer schema.
                DbErr::Custom(msg) if msg.contains("missing") => StoreError::SchemaNewer(msg),
                other => StoreError::Db(other),
            })?;
        if pending.is_empty() {
            return Ok(());
        }
        Err(StoreError::SchemaOlder(
            pending.iter().map(|m| m.name().to_string()).collect(),
        ))
    }

    pub async fn migrate(&self) -> StoreResult<Vec<String>> {
        let (_write, db) = self.lock_writes().await;
        let pending: Vec<String> = migration::Migrator::get_pending_migrations(db)
            .await?
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        migration::Migrator::up(db, None).await?;
        Ok(pending)
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    fn is_postgres(&self) -> bool {
        self.backend() == DbBackend::Postgres
    }

    pub async fn ping(&self) -> StoreResult<()> {
        self.db.ping().await?;
        Ok(())
    }

    pub async fn close(self) {
        if let Some(writer) = &self.writer {
            let _ = writer.db.close_by_ref().await;
        }
        let _ = self.db.close().await;
    }

    /// The connection to write through, with this process's turn to write on SQLite
    /// ([`Writer`]); PostgreSQL's writers take no turns and write through the pool.
    async fn lock_writes(&self) -> (WriteGuard<'_>, &DatabaseConnection) {
        match &self.writer {
            Some(w) => (Some(w.lock.lock().await), &w.db),
            None => (None, &self.db),
        }
    }

    async fn write_txn(&self) -> StoreResult<(WriteGuard<'_>, DatabaseTransaction)> {
        let (guard, db) = self.lock_writes().await;
        let txn = db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok((guard, txn))
    }

    /// Appends one event outside any other write.
    pub async fn append_event(&self, ev: NewEvent, now: i64) -> StoreResult<()> {
        let (_write, db) = self.lock_writes().await;
        append(db, ev, now).await
    }
}

/// Appends an event within the caller's transaction.
async fn append<C: ConnectionTrait>(db: &C, ev: NewEvent, now: i64) -> StoreResult<()> {
    append_all(db, vec![(ev, now)]).await
}

/// Appends events (each with its time), in order, in one statement within the caller's
/// transaction.
async fn append_all<C: ConnectionTrait>(db: &C, evs: Vec<(NewEvent, i64)>) -> StoreResult<()> {
    if let Some(insert) = insert_events(evs) {
        db.execute(&insert).await?;
    }
    Ok(())
}

/// The statement that inserts `evs`, in order; `None` when there are none.
fn insert_events(evs: Vec<(NewEvent, i64)>) -> Option<sea_orm::sea_query::InsertStatement> {
    if evs.is_empty() {
        return None;
    }
    let rows = evs.into_iter().map(|(ev, at)| events::ActiveModel {
        task_id: Set(ev.task_id),
        job_id: Set(ev.job_id),
        run_id: Set(ev.run_id),
        kind: Set(ev.kind),
        source: Set(ev.source),
        detail: Set(ev.detail.to_string()),
        at: Set(at),
        ..Default::default()
    });
    Some(events::Entity::insert_many(rows).into_query())
}

/// A row that must exist, read within a transaction.
fn must<T>(row: Option<T>, what: impl FnOnce() -> String) -> StoreResult<T> {
    row.ok_or_else(|| StoreError::Db(DbErr::RecordNotFound(what())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::ActiveModelTrait;

    /// On SQLite a write holds the one writer connection and its turn; reads go to the
    /// pool meanwhile: answered at once, without what the open transaction wrote.
    #[tokio::test]
    async fn sqlite_reads_do_not_wait_for_a_write_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("w.db").display());
        let store = Store::open(&url).await.unwrap();
        let (guard, txn) = store.write_txn().await.unwrap();
        assert!(guard.is_some(), "SQLite's writers take turns");
        entity::nodes::ActiveModel {
            id: Set("n1".into()),
            hostname: Set("h".into()),
            pid: Set(1),
            started_at: Set(0),
            heartbeat_at: Set(0),
            stopped_at: Set(None),
        }
        .insert(&txn)
        .await
        .unwrap();
        let read = tokio::time::timeout(Duration::from_secs(20), store.nodes()).await;
        assert!(matches!(read, Ok(Ok(ref n)) if n.is_empty()), "{read:?}");
        txn.commit().await.unwrap();
        drop(guard);
        assert_eq!(store.nodes().await.unwrap()[0].id, "n1");
    }
}

//! Time as baton's database sees it: integer milliseconds since the Unix epoch.
//!
//! Production uses the system clock. Tests of time windows (the finalization grace, node
//! heartbeats) use [`Clock::manual`] and move it with [`Clock::advance`]. tokio's paused
//! clock cannot serve here: while a query is in flight (SQLite answers from a worker
//! thread, PostgreSQL over a socket) the runtime looks idle, and a paused clock then
//! jumps to the next timer, so the time a query sees would depend on the pool's timers.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Clock {
    kind: ClockKind,
}

#[derive(Debug, Clone)]
enum ClockKind {
    System,
    Manual(Arc<AtomicI64>),
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Clock {
    pub fn system() -> Self {
        Clock {
            kind: ClockKind::System,
        }
    }

    /// A clock that starts at the current wall-clock time and moves only when told.
    pub fn manual() -> Self {
        Clock {
            kind: ClockKind::Manual(Arc::new(AtomicI64::new(system_ms()))),
        }
    }

    /// Moves a manual clock forward (and every clone of it); no-op on the system clock.
    pub fn advance(&self, d: Duration) {
        if let ClockKind::Manual(now) = &self.kind {
            now.fetch_add(ms(d), Ordering::SeqCst);
        }
    }

    pub fn now_ms(&self) -> i64 {
        match &self.kind {
            ClockKind::System => system_ms(),
            ClockKind::Manual(now) => now.load(Ordering::SeqCst),
        }
    }
}

/// A duration in the database's unit.
pub fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

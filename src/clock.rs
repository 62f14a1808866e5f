//! Time as baton's database sees it: integer milliseconds since the Unix epoch.
//!
//! Production uses the system clock. Tests use [`Clock::tokio`], which starts at the
//! wall-clock time of its creation and then follows tokio's clock, so that
//! `#[tokio::test(start_paused = true)]` and `tokio::time::advance` move the timestamps
//! that the grace window and the heartbeats are compared against.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Clock {
    kind: ClockKind,
}

#[derive(Debug, Clone)]
enum ClockKind {
    System,
    Tokio {
        base_ms: i64,
        start: tokio::time::Instant,
    },
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

    /// A clock that follows tokio's (possibly paused) clock.
    pub fn tokio() -> Self {
        Clock {
            kind: ClockKind::Tokio {
                base_ms: system_ms(),
                start: tokio::time::Instant::now(),
            },
        }
    }

    pub fn now_ms(&self) -> i64 {
        match &self.kind {
            ClockKind::System => system_ms(),
            ClockKind::Tokio { base_ms, start } => base_ms + start.elapsed().as_millis() as i64,
        }
    }
}

/// A duration in the database's unit.
pub fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

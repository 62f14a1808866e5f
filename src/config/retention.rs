//! `[retention]`: how long what grows with history is kept: on disk (task worktrees, run
//! logs, the mirror's garbage) and in the database (events, runs, webhook deliveries). Nothing of an active task is
//! ever removed, whatever these say.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Retention periods longer than this are taken for a typo (`3000d`) rather than intent.
pub const RETENTION_MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RetentionSettings {
    /// The worktree of a task that ended (done, failed, cancelled) longer ago than this
    /// is removed; its commits stay in the mirror and on the remote.
    #[serde(with = "humantime_serde")]
    pub worktrees: Duration,
    /// The run logs (and prompts) of a task that ended longer ago than this are removed.
    #[serde(with = "humantime_serde")]
    pub logs: Duration,
    /// The mirror is garbage-collected (`git gc --auto`) at most this often.
    #[serde(with = "humantime_serde")]
    pub mirror_gc: Duration,
    /// How often the service's retention pass runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The events, runs and settled effects of a task that ended longer ago than this are
    /// removed from the database (the task and its jobs stay).
    #[serde(with = "humantime_serde")]
    pub history: Duration,
    /// Webhook deliveries are remembered this long, to recognise a redelivery.
    #[serde(with = "humantime_serde")]
    pub deliveries: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            worktrees: Duration::from_secs(7 * 24 * 3600),
            logs: Duration::from_secs(30 * 24 * 3600),
            mirror_gc: Duration::from_secs(24 * 3600),
            interval: Duration::from_secs(3600),
            history: Duration::from_secs(90 * 24 * 3600),
            deliveries: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl RetentionSettings {
    /// Every period with its key, for validation.
    pub(super) fn periods(&self) -> [(&'static str, Duration); 6] {
        [
            ("retention.worktrees", self.worktrees),
            ("retention.logs", self.logs),
            ("retention.mirror_gc", self.mirror_gc),
            ("retention.interval", self.interval),
            ("retention.history", self.history),
            ("retention.deliveries", self.deliveries),
        ]
    }
}

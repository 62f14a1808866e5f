//! Retention of what grows on disk with history (`[retention]`, `baton gc`): the
//! worktrees and run logs of tasks that ended long enough ago, and the mirror's garbage.
//! The folders on disk are the work list, so a pass costs what is there to remove, not
//! the size of the history; each folder's task is looked up in one query per 500.
//!
//! Nothing of an active task is touched: a worktree is removed under the mirror's lock
//! after its task's status is read again, so a task retried meanwhile keeps it (or, when
//! its next stage starts after the removal, gets it back from the mirror).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::clock::ms;
use crate::config::Config;
use crate::model::{TaskKey, TaskStatus};
use crate::store::{HistoryPruned, Store, StoreError};
use crate::workspace::{self, MIRROR_DIR, MirrorGc};

/// Tasks whose history one pass removes, at most (`baton gc` runs passes until done).
pub const HISTORY_BATCH: u64 = 200;

/// The file whose age says when the mirror was last garbage-collected.
const MIRROR_GC_STAMP: &str = ".mirror.gc-stamp";

/// One folder removed (or, in a dry run, that would be).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    pub task: String,
    pub path: PathBuf,
    pub bytes: u64,
}

/// What one retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub worktrees: Vec<Removed>,
    pub logs: Vec<Removed>,
    /// The mirror's size before and after its garbage collection, when it ran.
    pub mirror: Option<(u64, u64)>,
    /// What was removed from the database (in a dry run: the tasks whose history would be).
    pub history: HistoryPruned,
    /// What could not be removed, and why; the next pass tries again.
    pub errors: Vec<String>,
}

impl GcReport {
    /// The bytes freed (or that a dry run would free).
    pub fn freed(&self) -> u64 {
        let files: u64 = self
            .worktrees
            .iter()
            .chain(&self.logs)
            .map(|r| r.bytes)
            .sum();
        files + self.mirror.map_or(0, |(b, a)| b.saturating_sub(a))
    }

    pub fn is_empty(&self) -> bool {
        self.worktrees.is_empty()
            && self.logs.is_empty()
            && self.mirror.is_none()
            && self.history == HistoryPruned::default()
    }

    /// The report as `baton gc` prints it.
    pub fn render(&self) -> String {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        let mut out = String::new();
        for (what, list) in [("worktree", &self.worktrees), ("logs", &self.logs)] {
            for r in list {
                out.push_str(&format!(
                    "{verb} {what} of {} ({}): {}\n",
                    r.task,
                    human_bytes(r.bytes),
                    r.path.display()
                ));
            }
        }
        if let Some((before, after)) = self.mirror {
            out.push_str(&format!(
                "garbage-collected the mirror: {} -> {}\n",
                human_bytes(before),
                human_bytes(after)
            ));
        }
        let h = &self.history;
        if h.tasks > 0 || h.deliveries > 0 {
            out.push_str(&format!(
                "{verb} the history of {} ended task(s): {} event(s), {} run(s), {} effect(s); {} webhook deliveries\n",
                h.tasks, h.events, h.runs, h.effects, h.deliveries
            ));
        }
        for e in &self.errors {
            out.push_str(&format!("could not clean up: {e}\n"));
        }
        out.push_str(&format!(
            "{} worktree(s), {} log folder(s); {} {}\n",
            self.worktrees.len(),
            self.logs.len(),
            human_bytes(self.freed()),
            if self.dry_run {
                "would be freed"
            } else {
                "freed"
            }
        ));
        out
    }
}

/// `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Whether the mirror's garbage collection is due: its stamp is older than `every`.
pub fn mirror_gc_due(workspace_root: &Path, every: Duration) -> bool {
    let stamp = workspace_root.join(MIRROR_GC_STAMP);
    match std::fs::metadata(&stamp).and_then(|m| m.modified()) {
        Ok(at) => at.elapsed().is_ok_and(|age| age >= every),
        Err(_) => workspace_root.join(MIRROR_DIR).exists(),
    }
}

/// The task folders directly under `dir` (names that are task keys), with their paths.
fn task_folders(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            TaskKey::parse(name.clone()).ok()?;
            Some((name, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// One pass: removes the worktrees and logs of tasks that ended longer ago than their
/// retention, and garbage-collects the mirror when `mirror_gc` says so. A dry run only
/// reports. An error with one folder is reported and the pass goes on.
pub async fn run_once(
    store: &Store,
    config: &Config,
    now: i64,
    dry_run: bool,
    mirror_gc: bool,
) -> Result<GcReport, StoreError> {
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let retention = &config.retention;
    let root = config.workspace_root.clone();
    let worktrees = task_folders(&root);
    let logs = task_folders(&config.log_dir);
    let keys = worktrees.iter().chain(&logs).map(|(k, _)| k.clone());
    let tasks = store.tasks_by_keys(keys).await?;
    let ended_before = |key: &str, keep: Duration| {
        tasks
            .get(key)
            .is_some_and(|t| t.status != TaskStatus::Active && t.updated_at <= now - ms(keep))
    };

    for (key, path) in worktrees {
        if !ended_before(&key, retention.worktrees) {
            continue;
        }
        if dry_run {
            let bytes = workspace::disk_usage(&path);
            report.worktrees.push(Removed {
                task: key,
                path,
                bytes,
            });
            continue;
        }
        let branch = format!("{}{key}", config.repo.branch_prefix);
        let (store, handle) = (store.clone(), tokio::runtime::Handle::current());
        let (root, task_key, p) = (root.clone(), key.clone(), path.clone());
        let removed = tokio::task::spawn_blocking(move || {
            workspace::remove_worktree(&root, &p, &task_key, &branch, || {
                // Read again under the mirror's lock: a retried task keeps its worktree.
                let Ok(key) = TaskKey::parse(task_key.clone()) else {
                    return false;
                };
                handle
                    .block_on(store.task_by_key(&key))
                    .is_ok_and(|t| t.status != TaskStatus::Active)
            })
        })
        .await;
        match removed {
            Ok(Ok(Some(r))) => report.worktrees.push(Removed {
                task: key,
                path,
                bytes: r.freed,
            }),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => report.errors.push(format!("worktree of {key}: {e}")),
            Err(e) => report.errors.push(format!("worktree of {key}: {e}")),
        }
    }

    for (key, path) in logs {
        if !ended_before(&key, retention.logs) {
            continue;
        }
        let bytes = workspace::disk_usage(&path);
        if !dry_run && let Err(e) = std::fs::remove_dir_all(&path) {
            report.errors.push(format!("logs of {key}: {e}"));
            continue;
        }
        report.logs.push(Removed {
            task: key,
            path,
            bytes,
        });
    }

    let ended_before = now - ms(retention.history);
    if dry_run {
        report.history.tasks = store.prunable_tasks(ended_before).await?;
    } else {
        let deliveries_before = now - ms(retention.deliveries);
        report.history = store
            .prune_history(ended_before, deliveries_before, HISTORY_BATCH, now)
            .await?;
    }

    if mirror_gc && !dry_run {
        let r = root.clone();
        match tokio::task::spawn_blocking(move || workspace::gc_mirror(&r)).await {
            Ok(Ok(Some(MirrorGc { before, after }))) => {
                report.mirror = Some((before, after));
                let _ = std::fs::write(root.join(MIRROR_GC_STAMP), b"");
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => report.errors.push(format!("mirror: {e}")),
            Err(e) => report.errors.push(format!("mirror: {e}")),
        }
    }
    Ok(report)
}

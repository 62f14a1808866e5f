//! Removing what a finished task left on disk: its worktree (under the mirror's lock, so
//! no `prepare` of the same task can interleave), and garbage-collecting the mirror.

use std::path::Path;

use git2::{BranchType, Repository, WorktreePruneOptions};

use super::mirror::{MIRROR_DIR, lock_mirror};
use super::{WorkspaceError, git};

/// The bytes a file or folder takes (its files' lengths; links are not followed).
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| disk_usage(&e.path()))
                .sum::<u64>()
        })
        .unwrap_or(0)
}

/// What removing a worktree did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorktreeRemoval {
    pub freed: u64,
    /// The task's branch was deleted from the mirror (its tip is on the remote).
    pub branch_deleted: bool,
}

/// Removes the worktree of `task_key` at `path` and prunes it from the mirror, under
/// the mirror's lock; `still_finished` is asked again under the lock, so a task retried
/// meanwhile keeps its worktree (`None` is returned). The task's branch is deleted from
/// the mirror only when the remote has its tip: a commit that exists only here is kept.
pub fn remove_worktree(
    root: &Path,
    path: &Path,
    task_key: &str,
    branch: &str,
    still_finished: impl FnOnce() -> bool,
) -> Result<Option<WorktreeRemoval>, WorkspaceError> {
    let _lock = lock_mirror(root)?;
    if !still_finished() {
        return Ok(None);
    }
    let freed = disk_usage(path);
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|source| WorkspaceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let Ok(mirror) = Repository::open_bare(root.join(MIRROR_DIR)) else {
        return Ok(Some(WorktreeRemoval {
            freed,
            branch_deleted: false,
        }));
    };
    if let Ok(wt) = mirror.find_worktree(task_key) {
        let mut opts = WorktreePruneOptions::new();
        opts.valid(true).locked(true).working_tree(true);
        wt.prune(Some(&mut opts))
            .map_err(git(format!("prune the worktree {task_key}")))?;
    }
    let mut branch_deleted = false;
    if let Ok(mut local) = mirror.find_branch(branch, BranchType::Local) {
        let tip = local.get().target();
        let remote = mirror
            .find_branch(&format!("origin/{branch}"), BranchType::Remote)
            .ok()
            .and_then(|b| b.get().target());
        let on_remote = match (tip, remote) {
            (Some(t), Some(r)) => {
                t == r
                    || mirror
                        .graph_descendant_of(r, t)
                        .map_err(git("compare commits"))?
            }
            _ => false,
        };
        if on_remote {
            local
                .delete()
                .map_err(git(format!("delete branch {branch}")))?;
            branch_deleted = true;
        }
    }
    Ok(Some(WorktreeRemoval {
        freed,
        branch_deleted,
    }))
}

/// What a garbage collection of the mirror did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorGc {
    pub before: u64,
    pub after: u64,
}

/// Garbage-collects the mirror with `git gc --auto` (libgit2 has no gc), under the
/// mirror's lock. `None` when there is no mirror yet.
pub fn gc_mirror(root: &Path) -> Result<Option<MirrorGc>, WorkspaceError> {
    let path = root.join(MIRROR_DIR);
    if !path.exists() {
        return Ok(None);
    }
    let _lock = lock_mirror(root)?;
    let before = disk_usage(&path);
    // Worktrees removed by hand leave their admin folders behind; prune them first.
    if let Ok(mirror) = Repository::open_bare(&path)
        && let Ok(names) = mirror.worktrees()
    {
        for name in names.iter().flatten().flatten() {
            if let Ok(wt) = mirror.find_worktree(name)
                && wt.validate().is_err()
            {
                let _ = wt.prune(None);
            }
        }
    }
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&path)
        .args(["gc", "--auto", "--quiet"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| WorkspaceError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), format!("cannot run git gc: {source}")),
        })?;
    if !out.status.success() {
        return Err(WorkspaceError::Missing(format!(
            "git gc of {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(Some(MirrorGc {
        before,
        after: disk_usage(&path),
    }))
}

//! One bare mirror of the repository per host (`workspace_root/.mirror.git`), fetched
//! before every stage (after this host's own stage, a fetch up to a second old serves;
//! for a job taken from the queue, one as recent that began after it was queued), and
//! each task's checkout a git worktree of it on the task's branch. The mirror is guarded
//! by baton's own file lock (`.mirror.lock`), which also serializes fetches into it;
//! git's own lock files record no owner, so a task's are cleared only while the task has
//! no live run (the caller's promise).
//!
//! Fetches are shared: a preparation is served by any fetch into the mirror that began
//! after its job was queued and up to `OWN_STAGE_FETCH_AGE` before it
//! (`LastCommit::Recorded`; up to that age before it, after this host's own stage), so
//! stages that start together, or waited in the queue together, cost one fetch, not one
//! each.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use git2::{BranchType, FetchOptions, Oid, Repository, WorktreePruneOptions};
use nix::fcntl::{Flock, FlockArg};

use super::{LastCommit, OWN_STAGE_FETCH_AGE, RepoAccess, WorkspaceError, git};

/// The remote-tracking refs of the mirror.
const ORIGIN: &str = "origin";
/// The mirror's folder under `workspace_root`.
pub const MIRROR_DIR: &str = ".mirror.git";
/// The mirror's file lock under `workspace_root`.
pub const MIRROR_LOCK: &str = ".mirror.lock";

/// A prepared checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub path: PathBuf,
    /// The worktree was created now (its setup hook is due).
    pub created: bool,
    /// The branch moved to the remote's (a stage ran on another host) or to the task's
    /// last recorded commit.
    pub fast_forwarded: Option<String>,
    /// The commit the task's branch is at: where the stage starts (before the `setup` and
    /// `before_stage` hooks, whose commits count as the stage's).
    pub tip: String,
}

/// The mirror's file lock, held while this value lives.
pub(super) struct MirrorLock(#[allow(dead_code)] Flock<File>);

pub(super) fn lock_mirror(root: &Path) -> Result<MirrorLock, WorkspaceError> {
    let path = root.join(MIRROR_LOCK);
    let io = |source| WorkspaceError::Io {
        path: path.clone(),
        source,
    };
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let lock = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io(std::io::Error::from(errno)))?;
    Ok(MirrorLock(lock))
}

/// The mirrors this process opened, by folder, each taken out by the preparation that
/// holds the mirror's lock: opening one reads its configuration (and the user's and the
/// system's), which every stage paid.
static OPENED: LazyLock<Mutex<HashMap<PathBuf, Repository>>> = LazyLock::new(Default::default);

/// The mirror as this process last left it, while its folder still holds what git
/// opens a repository by (`HEAD`, `objects`, `refs`, as libgit2 checks); else opened
/// (or made). Called under the mirror's lock; [`keep_mirror`] puts it back.
fn take_mirror(root: &Path, access: &RepoAccess) -> Result<Repository, WorkspaceError> {
    let path = root.join(MIRROR_DIR);
    let kept = OPENED.lock().ok().and_then(|mut m| m.remove(&path));
    let whole = || {
        path.join("HEAD").is_file() && path.join("objects").is_dir() && path.join("refs").is_dir()
    };
    match kept {
        Some(repo) if whole() => Ok(repo),
        _ => open_mirror(root, access),
    }
}

/// Keeps an opened mirror for the next preparation of this process.
fn keep_mirror(root: &Path, repo: Repository) {
    if let Ok(mut m) = OPENED.lock() {
        m.insert(root.join(MIRROR_DIR), repo);
    }
}

/// Opens the mirror, or makes it anew when it is missing or broken (a clone cut short).
fn open_mirror(root: &Path, access: &RepoAccess) -> Result<Repository, WorkspaceError> {
    let path = root.join(MIRROR_DIR);
    if let Ok(repo) = Repository::open_bare(&path)
        && repo.find_remote(ORIGIN).is_ok()
    {
        return Ok(repo);
    }
    if path.exists() {
        tracing::warn!(mirror = %path.display(), "the mirror is broken; making it anew");
        std::fs::remove_dir_all(&path).map_err(|source| WorkspaceError::Io {
            path: path.clone(),
            source,
        })?;
    }
    // A clone, not an empty repository and a fetch: on a remote that is a local path,
    // libgit2 then copies the object files instead of building a pack of the whole
    // history (seconds instead of minutes on a large repository).
    let next = std::cell::Cell::new(0);
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(access.callbacks(&next));
    let cloned = git2::build::RepoBuilder::new()
        .bare(true)
        .fetch_options(opts)
        .remote_create(|repo, name, url| {
            repo.remote_with_fetch(name, url, &format!("+refs/heads/*:refs/remotes/{ORIGIN}/*"))
        })
        .clone(&access.url, &path);
    match cloned {
        Ok(repo) => Ok(repo),
        Err(e) => {
            // Nothing half-made is left to be taken for a mirror.
            let _ = std::fs::remove_dir_all(&path);
            Err(WorkspaceError::Git {
                context: format!("clone {} into the mirror", access.url),
                source: e,
            })
        }
    }
}

/// Fetches every branch of the remote into the mirror's `origin/*`; with `prune`, a
/// branch gone from the remote leaves `origin/*` too.
fn fetch(repo: &Repository, access: &RepoAccess, prune: bool) -> Result<(), WorkspaceError> {
    let mut remote = repo
        .find_remote(ORIGIN)
        .map_err(git("find the mirror's remote"))?;
    let next = std::cell::Cell::new(0);
    let mut opts = FetchOptions::new();
    opts.remote_callbacks(access.callbacks(&next));
    // Pruning lists every reference of the mirror (a branch per task it ever ran), so it
    // is not done on every fetch.
    opts.prune(if prune {
        git2::FetchPrune::On
    } else {
        git2::FetchPrune::Off
    });
    // Nothing reads FETCH_HEAD: not writing it saves two files per fetch.
    opts.update_fetchhead(false);
    remote
        .fetch::<&str>(&[], Some(&mut opts), None)
        .map_err(git(format!("fetch {}", access.url)))
}

/// How often a fetch also prunes the branches the remote no longer has.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// The last fetches into a mirror of this process that succeeded.
#[derive(Debug, Clone, Copy)]
struct Fetched {
    /// When the last one began.
    began: Instant,
    /// When the last one that pruned began.
    pruned: Instant,
}

static FETCHED: LazyLock<Mutex<HashMap<PathBuf, Fetched>>> = LazyLock::new(Default::default);

/// Fetches into the mirror unless a fetch that began at or after `due` already did: that
/// one saw everything the remote had at `due`. Prunes on the first fetch of this process
/// and then every [`PRUNE_EVERY`]. Called under the mirror's lock.
fn fetch_since(repo: &Repository, access: &RepoAccess, due: Instant) -> Result<(), WorkspaceError> {
    let key = repo.path().to_path_buf();
    let last = FETCHED.lock().ok().and_then(|m| m.get(&key).copied());
    if last.is_some_and(|f| f.began >= due) {
        return Ok(());
    }
    let began = Instant::now();
    let prune = last.is_none_or(|f| began.duration_since(f.pruned) >= PRUNE_EVERY);
    fetch(repo, access, prune)?;
    let pruned = match last {
        Some(f) if !prune => f.pruned,
        _ => began,
    };
    if let Ok(mut m) = FETCHED.lock() {
        m.insert(key, Fetched { began, pruned });
    }
    Ok(())
}

/// The earliest a fetch may have begun and serve a preparation from `start` begun at
/// `due`: up to [`OWN_STAGE_FETCH_AGE`] before after this host's own stage; for a job
/// queued, after it was queued and no more than that age before (no later than `due`).
fn served_since(start: LastCommit<'_>, due: Instant) -> Instant {
    let own = due.checked_sub(OWN_STAGE_FETCH_AGE).unwrap_or(due);
    match start {
        LastCommit::OnBranch | LastCommit::HereAt(_) => own,
        LastCommit::Recorded(_, queued) => queued.clamp(own, due),
    }
}

/// Removes a lock file git left behind, when there is one.
fn clear_lock(path: &Path) {
    if path.exists() {
        tracing::warn!(lock = %path.display(), "removing a lock file left behind");
        let _ = std::fs::remove_file(path);
    }
}

/// Prepares the checkout of `task_key` at `path` on `branch`, after a fetch (one that
/// began after the job was queued, [`LastCommit::Recorded`], and up to
/// [`OWN_STAGE_FETCH_AGE`] before this call: several preparations waiting on the mirror
/// or in the queue share it; after this host's own stage, one that began up to that age
/// before; in either case a fetch now when the stage's commit is not in the mirror).
///
/// - A branch new to this host starts from `start_commit` (the task's last recorded stage
///   commit) when there is one, else from the remote's branch, else from `base_branch`;
///   with [`LastCommit::OnBranch`] it fails with [`WorkspaceError::BranchNotHere`].
/// - A branch the remote has ahead (a stage ran on another host) is fast-forwarded to it,
///   and so is a branch behind a recorded `start_commit`.
/// - A branch that has diverged from either fails with a reason; both are kept.
pub fn prepare(
    root: &Path,
    path: &Path,
    access: &RepoAccess,
    task_key: &str,
    branch: &str,
    base_branch: &str,
    start_commit: LastCommit<'_>,
) -> Result<Prepared, WorkspaceError> {
    let due = Instant::now();
    std::fs::create_dir_all(root).map_err(|source| WorkspaceError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let _lock = lock_mirror(root)?;
    let mirror = take_mirror(root, access)?;
    // The task has no live run: locks of its worktree and branch are leftovers.
    clear_lock(
        &mirror
            .path()
            .join("worktrees")
            .join(task_key)
            .join("index.lock"),
    );
    clear_lock(
        &mirror
            .path()
            .join("worktrees")
            .join(task_key)
            .join("HEAD.lock"),
    );
    clear_lock(&mirror.path().join(format!("refs/heads/{branch}.lock")));
    let local = mirror.find_branch(branch, BranchType::Local).ok();
    let local = local.and_then(|b| b.get().target());
    if local.is_none() && start_commit == LastCommit::OnBranch {
        keep_mirror(root, mirror);
        return Err(WorkspaceError::BranchNotHere(branch.to_string()));
    }
    let served_since = served_since(start_commit, due);
    fetch_since(&mirror, access, served_since)?;

    let start = match start_commit {
        LastCommit::Recorded(Some(sha), _) | LastCommit::HereAt(sha) => {
            let oid = Oid::from_str(sha).map_err(git(format!("read commit {sha}")))?;
            if mirror.find_commit(oid).is_err() && served_since < due {
                // The mirror was made anew, or the commit pushed, since the fetch that
                // served: the remote may have it now.
                fetch_since(&mirror, access, due)?;
            }
            if mirror.find_commit(oid).is_err() {
                return Err(WorkspaceError::Missing(format!(
                    "the task's last stage commit {sha} is neither on the remote nor on this host"
                )));
            }
            Some(oid)
        }
        LastCommit::Recorded(None, _) | LastCommit::OnBranch => None,
    };
    let remote_tip = mirror
        .find_branch(&format!("{ORIGIN}/{branch}"), BranchType::Remote)
        .ok()
        .and_then(|b| b.get().target());
    let (tip, fast_forwarded) = match local {
        None => {
            let tip = match (start, remote_tip) {
                (Some(s), _) => s,
                (None, Some(r)) => r,
                (None, None) => mirror
                    .find_branch(&format!("{ORIGIN}/{base_branch}"), BranchType::Remote)
                    .map_err(git(format!("find {base_branch} on {}", access.url)))?
                    .get()
                    .target()
                    .ok_or_else(|| {
                        WorkspaceError::Missing(format!("{base_branch} has no commit"))
                    })?,
            };
            let commit = mirror
                .find_commit(tip)
                .map_err(git("find the start commit"))?;
            mirror
                .branch(branch, &commit, true)
                .map_err(git(format!("create branch {branch}")))?;
            (tip, None)
        }
        Some(mut tip) => {
            let mut moved = None;
            for target in [remote_tip, start].into_iter().flatten() {
                if target == tip || descends(&mirror, tip, target)? {
                    continue;
                }
                if !descends(&mirror, target, tip)? {
                    return Err(WorkspaceError::Diverged(format!(
                        "branch {branch} has diverged: this host has {tip}, the {} has {target}; \
                         both are kept, reconcile them by hand",
                        if Some(target) == remote_tip {
                            "remote"
                        } else {
                            "task's last stage"
                        },
                    )));
                }
                tip = target;
                moved = Some(target.to_string());
            }
            (tip, moved)
        }
    };
    // Most stages find their task's worktree as the last one left it: nothing to check
    // out, and no need to open it (which reads its configuration, the user's and the
    // system's).
    let created = if on_tip(&mirror, path, task_key, branch, tip) {
        false
    } else {
        let (worktree, created) = ensure_worktree(&mirror, path, task_key, branch)?;
        checkout(&worktree, branch, tip)?;
        created
    };
    keep_mirror(root, mirror);
    Ok(Prepared {
        path: path.to_path_buf(),
        created,
        fast_forwarded: fast_forwarded.filter(|_| !created),
        tip: tip.to_string(),
    })
}

/// True when the worktree `task_key` at `path` holds the files [`add_worktree`] writes,
/// as it writes them (with `branch` checked out), and the branch is at `tip`: what
/// [`checkout`] leaves, read from the mirror and four small files. A worktree laid out
/// otherwise (by libgit2's own add, in earlier releases, or by `git worktree add` through
/// a symbolic link) is opened and checked as before.
fn on_tip(mirror: &Repository, path: &Path, task_key: &str, branch: &str, tip: Oid) -> bool {
    let Ok(path) = std::path::absolute(path) else {
        return false;
    };
    worktree_files(mirror, &path, task_key, branch)
        .iter()
        .all(|(file, text)| std::fs::read_to_string(file).is_ok_and(|t| &t == text))
        && mirror.refname_to_id(&format!("refs/heads/{branch}")).ok() == Some(tip)
}

/// The files that make the absolute `path` the worktree `name` of the mirror on `branch`,
/// with their contents, as `git worktree add` lays them out: `commondir`, `gitdir` and
/// `HEAD` in the mirror's `worktrees/NAME/`, and a `.git` file in the checkout.
fn worktree_files(
    mirror: &Repository,
    path: &Path,
    name: &str,
    branch: &str,
) -> [(PathBuf, String); 4] {
    let admin = mirror.path().join("worktrees").join(name);
    let dot_git = path.join(".git");
    [
        (admin.join("commondir"), "../..\n".to_string()),
        (admin.join("gitdir"), format!("{}\n", dot_git.display())),
        (admin.join("HEAD"), format!("ref: refs/heads/{branch}\n")),
        (dot_git, format!("gitdir: {}\n", admin.display())),
    ]
}

/// True when `commit` descends from (or is) `ancestor`.
pub(super) fn descends(
    repo: &Repository,
    commit: Oid,
    ancestor: Oid,
) -> Result<bool, WorkspaceError> {
    Ok(commit == ancestor
        || repo
            .graph_descendant_of(commit, ancestor)
            .map_err(git("compare commits"))?)
}

/// Makes sure the task's worktree exists and opens; a broken one is pruned and added
/// anew (its commits live in the mirror). True when it was added now.
fn ensure_worktree(
    mirror: &Repository,
    path: &Path,
    task_key: &str,
    branch: &str,
) -> Result<(Repository, bool), WorkspaceError> {
    if let Ok(repo) = Repository::open(path) {
        return Ok((repo, false));
    }
    if let Ok(wt) = mirror.find_worktree(task_key) {
        let mut opts = WorktreePruneOptions::new();
        opts.valid(true).locked(true).working_tree(true);
        wt.prune(Some(&mut opts))
            .map_err(git(format!("prune the broken worktree {task_key}")))?;
    }
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(|source| WorkspaceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    }
    mirror
        .find_reference(&format!("refs/heads/{branch}"))
        .map_err(git(format!("find branch {branch}")))?;
    Ok((add_worktree(mirror, path, task_key, branch)?, true))
}

/// Adds the worktree `name` at `path` on `branch`, laid out as `git worktree add` lays it
/// out ([`worktree_files`]), and checks the branch out. libgit2's own add first opens every other
/// worktree of the mirror to see whether the branch is checked out there, so a host's
/// Nth task would cost N repository opens; a task's branch is only ever in its own.
fn add_worktree(
    mirror: &Repository,
    path: &Path,
    name: &str,
    branch: &str,
) -> Result<Repository, WorkspaceError> {
    let admin = mirror.path().join("worktrees").join(name);
    let path = &std::path::absolute(path).map_err(|source| WorkspaceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    for dir in [&admin, &path.to_path_buf()] {
        std::fs::create_dir_all(dir).map_err(|source| WorkspaceError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    for (file, text) in worktree_files(mirror, path, name, branch) {
        std::fs::write(&file, text).map_err(|source| WorkspaceError::Io { path: file, source })?;
    }
    let repo = Repository::open(path).map_err(git(format!("open {}", path.display())))?;
    repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))
        .map_err(git(format!("check out {branch} in {}", path.display())))?;
    Ok(repo)
}

/// Puts the worktree on `branch` at `tip`: the files first (refusing to overwrite local
/// changes), then the branch.
fn checkout(repo: &Repository, branch: &str, tip: Oid) -> Result<(), WorkspaceError> {
    let refname = format!("refs/heads/{branch}");
    let commit = repo
        .find_commit(tip)
        .map_err(git("find the branch's commit"))?;
    let on_tip = repo
        .head()
        .ok()
        .is_some_and(|h| h.name().ok() == Some(refname.as_str()) && h.target() == Some(tip));
    if on_tip {
        return Ok(());
    }
    repo.checkout_tree(
        commit.as_object(),
        Some(git2::build::CheckoutBuilder::new().safe()),
    )
    .map_err(git(format!("check out {branch} at {tip}")))?;
    repo.reference(&refname, tip, true, "baton: fast-forward")
        .map_err(git(format!("move {branch} to {tip}")))?;
    repo.set_head(&refname)
        .map_err(git(format!("switch to {branch}")))?;
    Ok(())
}

#[cfg(test)]
mod tests;

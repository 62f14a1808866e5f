//! Task workspaces: one bare mirror of the repository per host and one git worktree of
//! it per task under `workspace_root`, on the task's branch `{branch_prefix}{task}`,
//! fetched before every stage, or a moment before after this host's own
//! ([ADR 0007](../docs/adr/0007-workspaces.md)); the
//! auto-commit after a stage; the credentials and time bound of every network operation.

mod access;
mod mirror;
mod retention;

use std::path::{Path, PathBuf};

use git2::{IndexAddOption, Oid, Repository, Signature};

pub use access::{RepoAccess, set_network_timeout};
pub use mirror::{MIRROR_DIR, MIRROR_LOCK, Prepared, prepare};
pub use retention::{MirrorGc, WorktreeRemoval, disk_usage, gc_mirror, remove_worktree};

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace path {0} would leave workspace_root")]
    Escapes(PathBuf),
    #[error("cannot create workspace folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("git: {context}: {source}")]
    Git {
        context: String,
        source: git2::Error,
    },
    /// A commit the task needs exists nowhere this host can reach.
    #[error("{0}")]
    Missing(String),
    /// The task's branch here and the remote's (or the task's record) went apart.
    #[error("{0}")]
    Diverged(String),
    /// Asked to build on this host's branch ([`LastCommit::OnBranch`]), which is not here.
    #[error("branch {0} is not on this host")]
    BranchNotHere(String),
}

/// What a stage's branch is moved to, besides the remote's branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastCommit<'a> {
    /// The task's last recorded stage commit (none before its first): a branch new to
    /// the host starts from it, an existing one is fast-forwarded to it when behind. For a
    /// job queued (or due again, for a retry) at the given instant: a fetch that began
    /// after it, and up to [`OWN_STAGE_FETCH_AGE`] before the preparation, serves it, so
    /// the stages of a backlog share fetches (a caller that knows no queue time passes
    /// `Instant::now()`); a recorded commit the mirror then lacks is fetched for at once.
    Recorded(Option<&'a str>, std::time::Instant),
    /// This host's branch holds it already: the task's previous stage ran here, in this
    /// worktree, was decided by its own Monitor, and committed nothing. A branch not on
    /// this host fails with [`WorkspaceError::BranchNotHere`], and the caller reads the
    /// record instead.
    OnBranch,
    /// This host made it: the task's previous stage ran here, was decided by its own
    /// Monitor, and committed it. As `Recorded(Some(..))`, but, as with `OnBranch`, the
    /// remote can only hold what others pushed to the branch since: a fetch that began up
    /// to [`OWN_STAGE_FETCH_AGE`] before serves the preparation.
    HereAt(&'a str),
}

/// How long before a preparation that follows this host's own stage (`OnBranch`,
/// `HereAt`) a fetch may have begun and still serve it; for a job taken from the queue
/// (`Recorded`), it must also have begun after the job was queued.
pub const OWN_STAGE_FETCH_AGE: std::time::Duration = std::time::Duration::from_secs(1);

fn git(context: impl Into<String>) -> impl FnOnce(git2::Error) -> WorkspaceError {
    let context = context.into();
    move |source| WorkspaceError::Git { context, source }
}

/// The workspace folder of a task, checked to stay inside `root`.
pub fn path_for(root: &Path, task_key: &str) -> Result<PathBuf, WorkspaceError> {
    std::fs::create_dir_all(root).map_err(|source| WorkspaceError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let root = root.canonicalize().map_err(|source| WorkspaceError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let path = root.join(task_key);
    let escapes = task_key.is_empty()
        || Path::new(task_key).components().count() != 1
        || !matches!(
            Path::new(task_key).components().next(),
            Some(std::path::Component::Normal(_))
        )
        || !path.starts_with(&root);
    if escapes {
        return Err(WorkspaceError::Escapes(path));
    }
    Ok(path)
}

/// The refs of the remote, as `git ls-remote` lists them: the credentials and the
/// network timeout put to the test without fetching anything.
pub fn ls_remote(access: &RepoAccess) -> Result<Vec<String>, WorkspaceError> {
    let mut remote =
        git2::Remote::create_detached(access.url.as_str()).map_err(git("use repo.url"))?;
    let next = std::cell::Cell::new(0);
    let conn = remote
        .connect_auth(git2::Direction::Fetch, Some(access.callbacks(&next)), None)
        .map_err(git(format!("connect to {}", access.url)))?;
    let heads = conn
        .list()
        .map_err(git(format!("list the refs of {}", access.url)))?
        .iter()
        .map(|h| h.name().to_string())
        .collect();
    Ok(heads)
}

/// Runs a command of baton's own in a task's worktree (a hook of the repository such as
/// `hook setup`, or a stage's `gate command`), its output appended to the run's log under
/// a header, with the run's environment less `env_remove` (baton's secrets), in a process
/// group of its own that is ended whole at `timeout`. The error says how it failed.
pub async fn run_hook(
    name: &str,
    argv: &[String],
    cwd: &Path,
    log: &Path,
    env: &std::collections::BTreeMap<String, String>,
    env_remove: &[String],
    timeout: std::time::Duration,
) -> Result<(), String> {
    use std::io::Write;
    let (program, args) = argv.split_first().ok_or(format!("{name} is empty"))?;
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open the run's log {}: {e}", log.display()))?;
    let _ = writeln!(file, "==== baton: {name}: {}", argv.join(" "));
    let (out, err) = match (file.try_clone(), file.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(format!("cannot share the run's log with {name}")),
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    for k in env_remove {
        cmd.env_remove(k);
    }
    cmd.envs(env);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {name} ({program:?}): {e}"))?;
    let pid = child.id().map(|p| p as i32);
    let started = std::time::Instant::now();
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("{name} failed: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                crate::agent::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = writeln!(
                file,
                "==== baton: {name} stopped after {}: it ran too long",
                humantime::format_duration(timeout)
            );
            return Err(format!(
                "{name} ran longer than {}",
                humantime::format_duration(timeout)
            ));
        }
    };
    let took = std::time::Duration::from_millis(started.elapsed().as_millis() as u64);
    let _ = writeln!(
        file,
        "==== baton: {name} ended: {status} after {}",
        humantime::format_duration(took)
    );
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(format!(
            "{name} exited with code {code} after {}",
            humantime::format_duration(took)
        )),
        None => Err(format!("{name} was ended by a signal ({status})")),
    }
}

/// Commits everything in the workspace (new, changed and deleted files) with `message`.
/// Returns the new commit's id, or `None` when there was nothing to commit.
pub fn commit_all(path: &Path, message: &str) -> Result<Option<String>, WorkspaceError> {
    let repo = Repository::open(path).map_err(git(format!("open {}", path.display())))?;
    commit_in(&repo, message)
}

/// [`commit_all`] in the opened worktree `repo`.
fn commit_in(repo: &Repository, message: &str) -> Result<Option<String>, WorkspaceError> {
    let mut index = repo.index().map_err(git("read the index"))?;
    // One pass over the worktree: libgit2's add-all also takes out of the index what the
    // worktree no longer has (an update-all after it was a second pass).
    index
        .add_all(["*"], IndexAddOption::DEFAULT, None)
        .map_err(git("stage files"))?;
    let tree_id = index.write_tree().map_err(git("write the tree"))?;
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    if parent.as_ref().is_some_and(|p| p.tree_id() == tree_id) {
        // Nothing to commit: the index file is left as it was (a file less per stage).
        return Ok(None);
    }
    index.write().map_err(git("write the index"))?;
    let tree = repo.find_tree(tree_id).map_err(git("find the tree"))?;
    let sig = Signature::now("baton", "baton@localhost").map_err(git("make a signature"))?;
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let id = repo
        .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .map_err(git("commit"))?;
    Ok(Some(id.to_string()))
}

/// A stage's auto-commit on the task's `branch`: what the stage left in the worktree is
/// committed ([`commit_all`]), and the stage's commit is the one that is new on the
/// branch since `started` (the branch's tip when the stage's preparation ended, before
/// its hooks, when known): baton's own, or, when there was nothing left to commit, the
/// agent's own commits on top of `started`. A checkout the agent left off the branch
/// (detached, or on a branch of its own) whose commits build on the branch moves the
/// branch to them, so that they are pushed and the next stage builds on them; an
/// auto-commit that does not build on it fails the stage, both kept. A checkout merely
/// moved elsewhere, with nothing to commit, is left for the next preparation to put back.
pub fn commit_stage(
    path: &Path,
    branch: &str,
    started: Option<&str>,
    message: &str,
) -> Result<Option<String>, WorkspaceError> {
    let repo = Repository::open(path).map_err(git(format!("open {}", path.display())))?;
    let made = commit_in(&repo, message)?;
    let refname = format!("refs/heads/{branch}");
    let (Some(head), Ok(tip)) = (
        repo.head().ok().and_then(|h| h.target()),
        repo.refname_to_id(&refname),
    ) else {
        return Ok(made);
    };
    if tip != head {
        if !mirror::descends(&repo, head, tip)? {
            return match made {
                Some(_) => Err(WorkspaceError::Diverged(format!(
                    "the stage left its work off branch {branch}: the checkout is at \
                     {head}, which does not build on the branch's {tip}; both are kept"
                ))),
                None => Ok(None),
            };
        }
        repo.reference_matching(&refname, head, true, tip, "baton: the stage's commits")
            .map_err(git(format!("move {branch} to {head}")))?;
        repo.set_head(&refname)
            .map_err(git(format!("check out {branch}")))?;
    }
    // Commits of the agent's own count when they build on where the stage began (not a
    // branch reset below it).
    let ahead = match started.map(Oid::from_str) {
        Some(Ok(s)) => s != head && mirror::descends(&repo, head, s)?,
        _ => false,
    };
    Ok(made.or_else(|| ahead.then(|| head.to_string())))
}

/// The auto-commit message of a stage's run.
pub fn commit_message(stage: &str, task: &str, run_id: i64) -> String {
    format!("{stage}({task}): auto-commit from {stage} run_id={run_id}")
}

/// The HEAD commit when it is the auto-commit of `run_id`: what a run committed before
/// its monitor died, for the Reaper's read-only finalization.
pub fn head_commit_of_run(path: &Path, run_id: i64) -> Option<String> {
    let repo = Repository::open(path).ok()?;
    let head = repo.head().ok()?.peel_to_commit().ok()?;
    let msg = head.message().ok()?;
    msg.trim_end()
        .ends_with(&format!("run_id={run_id}"))
        .then(|| head.id().to_string())
}

/// A bare remote whose `main` has one commit with a README.
pub fn seed_remote(seed: &Path, remote: &Path) -> Result<(), git2::Error> {
    let bare = Repository::init_bare(remote)?;
    bare.set_head("refs/heads/main")?;
    let repo = Repository::init(seed)?;
    std::fs::write(seed.join("README.md"), "# demo app\n")
        .map_err(|e| git2::Error::from_str(&e.to_string()))?;
    let mut index = repo.index()?;
    index.add_path(Path::new("README.md"))?;
    index.write()?;
    let tree = repo.find_tree(index.write_tree()?)?;
    let sig = Signature::now("baton", "baton@localhost")?;
    repo.commit(
        Some("refs/heads/main"),
        &sig,
        &sig,
        "initial commit",
        &tree,
        &[],
    )?;
    let mut origin = repo.remote("origin", &remote.to_string_lossy())?;
    origin.push(&["refs/heads/main:refs/heads/main"], None)?;
    Ok(())
}

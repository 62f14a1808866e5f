//! Task workspaces: one git checkout per task under `workspace_root`, on the task's
//! branch `{branch_prefix}{task}`, and the auto-commit after a stage.

use std::path::{Path, PathBuf};

use git2::{BranchType, IndexAddOption, Repository, Signature};

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
}

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

/// Makes sure the task's checkout exists and is on its branch. A new checkout clones
/// `url` and starts the branch from the remote's copy of it when there is one (work of
/// earlier stages pushed from another node), else from `base_branch`.
pub fn prepare(
    url: &str,
    path: &Path,
    branch: &str,
    base_branch: &str,
) -> Result<PathBuf, WorkspaceError> {
    let repo = if path.join(".git").exists() {
        Repository::open(path).map_err(git(format!("open {}", path.display())))?
    } else {
        Repository::clone(url, path).map_err(git(format!("clone {url} into {}", path.display())))?
    };
    let local = repo.find_branch(branch, BranchType::Local);
    if local.is_err() {
        let start = repo
            .find_branch(&format!("origin/{branch}"), BranchType::Remote)
            .or_else(|_| repo.find_branch(&format!("origin/{base_branch}"), BranchType::Remote))
            .map_err(git(format!("find origin/{base_branch} in {url}")))?;
        let commit = start
            .get()
            .peel_to_commit()
            .map_err(git(format!("resolve the start of {branch}")))?;
        repo.branch(branch, &commit, false)
            .map_err(git(format!("create branch {branch}")))?;
    }
    let refname = format!("refs/heads/{branch}");
    let head_is_branch = repo
        .head()
        .ok()
        .and_then(|h| h.name().ok().map(|n| n == refname))
        .unwrap_or(false);
    if !head_is_branch {
        let obj = repo
            .revparse_single(&refname)
            .map_err(git(format!("resolve {refname}")))?;
        repo.checkout_tree(&obj, Some(git2::build::CheckoutBuilder::new().safe()))
            .map_err(git(format!("check out {branch}")))?;
        repo.set_head(&refname)
            .map_err(git(format!("switch to {branch}")))?;
    }
    Ok(path.to_path_buf())
}

/// Commits everything in the workspace (new, changed and deleted files) with `message`.
/// Returns the new commit's id, or `None` when there was nothing to commit.
pub fn commit_all(path: &Path, message: &str) -> Result<Option<String>, WorkspaceError> {
    let repo = Repository::open(path).map_err(git(format!("open {}", path.display())))?;
    let mut index = repo.index().map_err(git("read the index"))?;
    index
        .add_all(["*"], IndexAddOption::DEFAULT, None)
        .map_err(git("stage files"))?;
    index
        .update_all(["*"], None)
        .map_err(git("stage deletions"))?;
    index.write().map_err(git("write the index"))?;
    let tree_id = index.write_tree().map_err(git("write the tree"))?;
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    if parent.as_ref().is_some_and(|p| p.tree_id() == tree_id) {
        return Ok(None);
    }
    let tree = repo.find_tree(tree_id).map_err(git("find the tree"))?;
    let sig = Signature::now("baton", "baton@localhost").map_err(git("make a signature"))?;
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let id = repo
        .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .map_err(git("commit"))?;
    Ok(Some(id.to_string()))
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

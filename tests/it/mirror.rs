//! The mirror and a task's worktree in it, prepared before every stage: a task that
//! moves between hosts, a stage after one of this host's own, jobs that waited in the
//! queue together, a stage's commit, a diverged branch, leftovers of a crash, what an
//! auto-commit holds.

use std::path::Path;
use std::time::Instant;

use baton::workspace::LastCommit::{HereAt, OnBranch, Recorded};
use baton::workspace::{self, RepoAccess};

use crate::support::harness::*;

/// A bare remote seeded with a first commit on `main`, and the access to it.
pub fn seeded() -> (tempfile::TempDir, RepoAccess) {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote.git");
    workspace::seed_remote(&dir.path().join("seed"), &remote).unwrap();
    let access = RepoAccess {
        url: remote.display().to_string(),
        ..Default::default()
    };
    (dir, access)
}

/// Prepares task `key`'s worktree `root/key` on its branch `baton/key`.
fn prepare_key(
    root: &Path,
    access: &RepoAccess,
    key: &str,
    last: workspace::LastCommit<'_>,
) -> Result<workspace::Prepared, workspace::WorkspaceError> {
    let branch = format!("baton/{key}");
    workspace::prepare(root, &root.join(key), access, key, &branch, "main", last)
}

#[test]
fn a_task_that_comes_back_to_a_host_builds_on_the_work_done_elsewhere() {
    let (dir, access) = seeded();
    let host = |name: &str| {
        let root = dir.path().join(name);
        let path = root.join("ABA-1");
        (root, path)
    };
    let (root_a, ws_a) = host("host-a");
    let (root_b, ws_b) = host("host-b");
    let prepare = |root: &Path, start: Option<&str>| {
        prepare_key(root, &access, "ABA-1", Recorded(start, Instant::now())).unwrap()
    };
    let stage = |ws: &Path, name: &str| {
        std::fs::write(ws.join(format!("{name}.txt")), name).unwrap();
        let sha = workspace::commit_all(ws, &format!("{name}(ABA-1)"))
            .unwrap()
            .unwrap();
        let push = git2::Repository::open(ws).unwrap();
        push.remote_anonymous(&access.url)
            .unwrap()
            .push(&["refs/heads/baton/ABA-1:refs/heads/baton/ABA-1"], None)
            .unwrap();
        sha
    };
    // Host A runs stage one, host B stage two (from the remote's branch), host A stage
    // three: its old checkout is brought up to B's work before the stage.
    prepare(&root_a, None);
    let one = stage(&ws_a, "one");
    let p = prepare(&root_b, Some(&one));
    assert!(p.created && ws_b.join("one.txt").exists());
    let two = stage(&ws_b, "two");
    let p = prepare(&root_a, Some(&two));
    assert_eq!(p.fast_forwarded.as_deref(), Some(two.as_str()));
    assert!(
        ws_a.join("two.txt").exists(),
        "stage three would miss stage two's work"
    );
    // Hosts B and F fetch, at two, right before three is pushed.
    let fetched = Instant::now();
    prepare(&root_b, Some(&two));
    let (root_f, _) = host("host-f");
    prepare(&root_f, Some(&two));
    let three = stage(&ws_a, "three");
    // Host B is at two, the remote at three (pushed by another than B's own last stage).
    // A stage after one of B's own is served by B's fetch of a moment ago, which did not
    // see three; any other preparation fetches, and moves to the remote's branch.
    let asked = Instant::now();
    let on_branch = prepare_key(&root_b, &access, "ABA-1", OnBranch).unwrap();
    let here_at = prepare_key(&root_b, &access, "ABA-1", HereAt(&two)).unwrap();
    if asked.duration_since(fetched) < workspace::OWN_STAGE_FETCH_AGE {
        assert_eq!(on_branch.fast_forwarded, None, "fetched again");
        assert_eq!(here_at.fast_forwarded, None, "fetched again");
    }
    prepare_key(&root_b, &access, "ABA-1", Recorded(None, Instant::now())).unwrap();
    assert!(ws_b.join("three.txt").exists(), "three was not fetched");
    // A commit said to be this host's own that its mirror lacks (the mirror was made
    // anew since, say) is fetched all the same: host F fetched before three was pushed.
    let p = prepare_key(&root_f, &access, "ABA-1", HereAt(&three)).unwrap();
    assert_eq!(p.fast_forwarded.as_deref(), Some(three.as_str()));
    let log = remote_log(&dir.path().join("remote.git"), "baton/ABA-1");
    assert_eq!(log[..3], ["three(ABA-1)", "two(ABA-1)", "one(ABA-1)"]);
    // A host new to the task starts from the task's last commit, not from main.
    let (root_c, ws_c) = host("host-c");
    prepare(&root_c, Some(&two));
    assert!(ws_c.join("two.txt").exists());
    // A stage that follows one of this host's own builds on the branch here, unread.
    let p = prepare_key(&root_a, &access, "ABA-1", OnBranch).unwrap();
    assert_eq!((p.created, p.fast_forwarded), (false, None));
    assert!(ws_a.join("three.txt").exists());
    // On a host without the branch that is an error of its own: the caller reads the
    // task's last commit instead.
    let (root_e, _) = host("host-e");
    let err = prepare_key(&root_e, &access, "ABA-1", OnBranch).unwrap_err();
    assert!(
        matches!(err, workspace::WorkspaceError::BranchNotHere(_)),
        "{err}"
    );
    // A last commit that exists nowhere reachable is an error, not a start from main.
    let (root_d, _) = host("host-d");
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let err = prepare_key(
        &root_d,
        &access,
        "ABA-1",
        Recorded(Some(missing), Instant::now()),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("neither on the remote nor on this host"),
        "{err}"
    );
}

/// A commit on the remote's `branch`, after its tip (or `main`'s), as another host's
/// stage or a person would push it.
fn push_commit(dir: &Path, branch: &str, message: &str) -> String {
    let bare = git2::Repository::open_bare(dir.join("remote.git")).unwrap();
    let parent = bare
        .find_reference(&format!("refs/heads/{branch}"))
        .or_else(|_| bare.find_reference("refs/heads/main"))
        .unwrap()
        .peel_to_commit()
        .unwrap();
    let sig = git2::Signature::now("t", "t@t").unwrap();
    let tree = parent.tree().unwrap();
    let oid = bare
        .commit(None, &sig, &sig, message, &tree, &[&parent])
        .unwrap();
    bare.reference(&format!("refs/heads/{branch}"), oid, true, message)
        .unwrap();
    oid.to_string()
}

#[test]
fn jobs_that_waited_in_the_queue_together_share_a_fetch_begun_after_they_were_queued() {
    let (dir, access) = seeded();
    let root = dir.path().join("host");
    let queued = Instant::now();
    let first = prepare_key(&root, &access, "Q-1", Recorded(None, queued)).unwrap();
    // The remote's main moves after that fetch: a job queued before it is served by it
    // and starts where the first did; one queued since fetches, and starts at the move.
    // (So long as that fetch is less than a second old, the most it may be.)
    let moved = push_commit(dir.path(), "main", "moved");
    let asked = Instant::now();
    let second = prepare_key(&root, &access, "Q-2", Recorded(None, queued)).unwrap();
    if asked.duration_since(queued) < workspace::OWN_STAGE_FETCH_AGE {
        assert_eq!(second.tip, first.tip, "a job of the backlog fetched again");
    }
    let later = prepare_key(&root, &access, "Q-3", Recorded(None, Instant::now())).unwrap();
    assert_eq!(
        later.tip, moved,
        "a job queued after the fetch missed the remote's move"
    );
    // A recorded commit pushed since the fetch that serves (by another host's stage) is
    // fetched for, not reported missing.
    let theirs = push_commit(dir.path(), "baton/Q-4", "theirs(Q-4)");
    let p = prepare_key(&root, &access, "Q-4", Recorded(Some(&theirs), queued)).unwrap();
    assert_eq!(p.tip, theirs);
}

/// A stage's commit is the one new on the task's branch since it began; a stage that
/// left nothing has none, and one whose checkout no longer builds on the branch fails,
/// its work and the branch both kept.
#[test]
fn a_stage_commit_is_what_is_new_on_the_branch() {
    let (dir, access) = seeded();
    let root = dir.path().join("ws");
    let path = root.join("OFF-1");
    let (branch, message) = ("baton/OFF-1", "stage(OFF-1)");
    let p = prepare_key(&root, &access, "OFF-1", Recorded(None, Instant::now())).unwrap();
    let stage = |started: &str| workspace::commit_stage(&path, branch, Some(started), message);
    assert_eq!(stage(&p.tip).unwrap(), None, "nothing new");
    std::fs::write(path.join("a.txt"), "a").unwrap();
    let a = stage(&p.tip).unwrap().expect("baton's commit");
    // The agent's own commit on top of where the stage began is the stage's.
    let repo = git2::Repository::open(&path).unwrap();
    let head = repo.head().unwrap().peel_to_commit().unwrap();
    let sig = git2::Signature::now("agent", "agent@localhost").unwrap();
    let own = repo
        .commit(
            Some("HEAD"),
            &sig,
            &sig,
            "own",
            &head.tree().unwrap(),
            &[&head],
        )
        .unwrap()
        .to_string();
    assert_eq!(stage(&a).unwrap().as_deref(), Some(own.as_str()));
    // A branch reset below where the stage began is no commit of the stage's.
    repo.reset(head.as_object(), git2::ResetType::Hard, None)
        .unwrap();
    assert_eq!(stage(&own).unwrap(), None);
    // The agent left the checkout on main, with nothing to commit: nothing is at risk,
    // and the next preparation puts it back.
    let main = repo.refname_to_id("refs/remotes/origin/main").unwrap();
    repo.set_head_detached(main).unwrap();
    let mut force = git2::build::CheckoutBuilder::new();
    repo.checkout_head(Some(force.force())).unwrap();
    assert_eq!(stage(&own).unwrap(), None);
    assert_eq!(
        repo.refname_to_id(&format!("refs/heads/{branch}")).unwrap(),
        head.id()
    );
    // The agent left the checkout on a new branch of no history (an orphan), with
    // work in it: baton's commit there does not build on the task's branch.
    repo.set_head("refs/heads/unrelated").unwrap();
    std::fs::write(path.join("b.txt"), "b").unwrap();
    let err = stage(&a).unwrap_err();
    assert!(err.to_string().contains("off branch baton/OFF-1"), "{err}");
    let tip = repo.refname_to_id(&format!("refs/heads/{branch}")).unwrap();
    assert_eq!(tip.to_string(), a, "the branch was moved");
    assert!(
        repo.refname_to_id("refs/heads/unrelated").is_ok(),
        "the work was lost"
    );
}

#[test]
fn a_diverged_branch_fails_and_keeps_both() {
    let (dir, access) = seeded();
    let root = dir.path().join("ws");
    let path = root.join("DIV-1");
    let p = prepare_key(&root, &access, "DIV-1", Recorded(None, Instant::now())).unwrap();
    assert!(p.created);
    std::fs::write(path.join("mine.txt"), "mine\n").unwrap();
    let mine = workspace::commit_all(&path, "mine").unwrap().unwrap();
    // Another host pushed other work to the same branch.
    let other = dir.path().join("other");
    let repo = git2::Repository::clone(&access.url, &other).unwrap();
    std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
    workspace::commit_all(&other, "theirs").unwrap().unwrap();
    repo.find_remote("origin")
        .unwrap()
        .push(&["refs/heads/main:refs/heads/baton/DIV-1"], None)
        .unwrap();
    let err = prepare_key(&root, &access, "DIV-1", Recorded(None, Instant::now())).unwrap_err();
    assert!(err.to_string().contains("has diverged"), "{err}");
    // Nothing was discarded: the local commit is still the branch's.
    let ws = git2::Repository::open(&path).unwrap();
    assert_eq!(ws.head().unwrap().target().unwrap().to_string(), mine);
}

#[test]
fn leftovers_of_a_crash_are_cleared_and_a_broken_mirror_is_made_anew() {
    let (dir, access) = seeded();
    let root = dir.path().join("ws");
    let path = root.join("LOCK-1");
    let prep = |start: Option<&str>| {
        prepare_key(&root, &access, "LOCK-1", Recorded(start, Instant::now()))
    };
    prep(None).unwrap();
    std::fs::write(path.join("a.txt"), "a\n").unwrap();
    let sha = workspace::commit_all(&path, "work").unwrap().unwrap();
    // A crash mid-commit left git's lock files behind.
    let gitdir = root.join(".mirror.git").join("worktrees").join("LOCK-1");
    std::fs::write(gitdir.join("index.lock"), "").unwrap();
    std::fs::write(root.join(".mirror.git/refs/heads/baton/LOCK-1.lock"), "").unwrap();
    prep(Some(&sha)).unwrap();
    std::fs::write(path.join("b.txt"), "b\n").unwrap();
    assert!(workspace::commit_all(&path, "more work").unwrap().is_some());
    // A worktree whose link is gone is added anew on the branch, its commits kept.
    std::fs::remove_file(path.join(".git")).unwrap();
    let p = prep(None).unwrap();
    assert!(p.created);
    assert!(path.join("b.txt").exists(), "the branch's work was lost");
    // A mirror cut short (a clone killed half way) is made anew.
    std::fs::remove_dir_all(root.join(".mirror.git/objects")).unwrap();
    std::fs::remove_dir_all(&path).unwrap();
    let p = prep(None).unwrap();
    assert!(p.created && path.join("README.md").exists());
}

#[test]
fn the_auto_commit_holds_new_changed_and_deleted_files() {
    let (dir, access) = seeded();
    let root = dir.path().join("ws");
    let path = root.join("DEL-1");
    prepare_key(&root, &access, "DEL-1", Recorded(None, Instant::now())).unwrap();
    std::fs::write(path.join("a.txt"), "a\n").unwrap();
    std::fs::create_dir(path.join("sub")).unwrap();
    std::fs::write(path.join("sub/b.txt"), "b\n").unwrap();
    workspace::commit_all(&path, "first").unwrap().unwrap();
    // A stage that changes one file, deletes two (one in a folder) and adds one.
    std::fs::write(path.join("a.txt"), "changed\n").unwrap();
    std::fs::remove_file(path.join("README.md")).unwrap();
    std::fs::remove_dir_all(path.join("sub")).unwrap();
    std::fs::write(path.join("c.txt"), "c\n").unwrap();
    let sha = workspace::commit_all(&path, "second").unwrap().unwrap();
    let repo = git2::Repository::open(&path).unwrap();
    let tree = repo
        .find_commit(git2::Oid::from_str(&sha).unwrap())
        .unwrap()
        .tree()
        .unwrap();
    let names: Vec<String> = tree.iter().map(|e| e.name().unwrap().to_string()).collect();
    assert_eq!(names, ["a.txt", "c.txt"]);
    let a = tree.get_name("a.txt").unwrap().to_object(&repo).unwrap();
    assert_eq!(a.as_blob().unwrap().content(), b"changed\n");
    // A deletion alone is a change to commit; then nothing is left to commit.
    std::fs::remove_file(path.join("c.txt")).unwrap();
    assert!(workspace::commit_all(&path, "third").unwrap().is_some());
    assert_eq!(workspace::commit_all(&path, "nothing").unwrap(), None);
    // The index agrees with the last commit: a status shows nothing.
    let statuses = repo.statuses(None).unwrap();
    assert_eq!(statuses.len(), 0);
}

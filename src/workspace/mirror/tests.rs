//! The mirror's preparations, against a seeded bare remote.

use super::*;

/// A temporary folder with a seeded bare remote, and the access to it.
fn seeded() -> (tempfile::TempDir, PathBuf, RepoAccess) {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote.git");
    crate::workspace::seed_remote(&dir.path().join("seed"), &remote).unwrap();
    let access = RepoAccess {
        url: remote.display().to_string(),
        ..Default::default()
    };
    (dir, remote, access)
}

#[test]
fn a_preparation_is_served_by_a_fetch_that_began_after_it_and_only_by_such_a_one() {
    let (dir, remote, access) = seeded();
    let bare = Repository::open_bare(&remote).unwrap();
    let head = bare.head().unwrap().peel_to_commit().unwrap();
    bare.branch("old", &head, false).unwrap();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    let mirror = open_mirror(&root, &access).unwrap();
    let has = |name: &str| {
        mirror
            .find_branch(&format!("origin/{name}"), BranchType::Remote)
            .is_ok()
    };
    assert!(has("old"));
    bare.find_branch("old", BranchType::Local)
        .unwrap()
        .delete()
        .unwrap();
    let first = Instant::now();
    fetch_since(&mirror, &access, first).unwrap();
    assert!(
        !has("old"),
        "the first fetch prunes what the remote deleted"
    );
    // The remote moves after the first preparation began and was served.
    bare.branch("late", &head, false).unwrap();
    // A preparation due no later than that fetch shares it: no fetch of its own.
    fetch_since(&mirror, &access, first).unwrap();
    assert!(
        !has("late"),
        "a second fetch ran for a preparation already served"
    );
    // One due after it fetches, and sees what the remote has now.
    fetch_since(&mirror, &access, Instant::now()).unwrap();
    assert!(
        has("late"),
        "a preparation missed what the remote had when it began"
    );
    // Pruning waits for PRUNE_EVERY: a fetch soon after keeps a deleted branch's ref.
    bare.find_branch("late", BranchType::Local)
        .unwrap()
        .delete()
        .unwrap();
    fetch_since(&mirror, &access, Instant::now()).unwrap();
    assert!(has("late"), "every fetch pruned");
}

/// A job taken from the queue is served by a fetch begun after it was queued, but none
/// older than a stage after this host's own may take.
#[test]
fn a_queued_job_is_served_by_a_fetch_begun_since_it_was_queued_and_not_long_before() {
    let age = OWN_STAGE_FETCH_AGE;
    let due = Instant::now() + age * 120;
    let queued = |at| LastCommit::Recorded(None, at);
    assert_eq!(served_since(queued(due - age / 2), due), due - age / 2);
    assert_eq!(
        served_since(queued(due - age * 60), due),
        due - age,
        "a fetch older than a second served a job that waited long"
    );
    assert_eq!(
        served_since(queued(due + age), due),
        due,
        "queued after it began"
    );
    assert_eq!(served_since(queued(due), due), due, "queued as it began");
    assert_eq!(served_since(LastCommit::OnBranch, due), due - age);
    assert_eq!(served_since(LastCommit::HereAt("0"), due), due - age);
}

/// A stage that finds its worktree as the last one left it is prepared without
/// opening it; one whose agent moved the checkout off its branch is put back.
#[test]
fn a_worktree_left_on_its_branch_is_taken_as_it_is_and_one_moved_off_it_is_put_back() {
    let (dir, _remote, access) = seeded();
    let root = dir.path().join("ws");
    let path = root.join("K-1");
    let prep = || {
        prepare(
            &root,
            &path,
            &access,
            "K-1",
            "baton/K-1",
            "main",
            LastCommit::Recorded(None, Instant::now()),
        )
    };
    assert!(prep().unwrap().created);
    // The next stage finds it as it is; what the agent left in it stays.
    std::fs::write(path.join("notes.txt"), "left by the agent").unwrap();
    let p = prep().unwrap();
    assert_eq!((p.created, p.fast_forwarded), (false, None));
    assert!(path.join("notes.txt").is_file());
    let mirror = Repository::open_bare(root.join(MIRROR_DIR)).unwrap();
    let tip = mirror.refname_to_id("refs/heads/baton/K-1").unwrap();
    let here = |tip| on_tip(&mirror, &path, "K-1", "baton/K-1", tip);
    assert!(here(tip), "a worktree just made is not found on its tip");
    assert!(!here(Oid::ZERO_SHA1), "on a tip the branch is not at");
    // The agent switched the checkout to a branch of its own.
    let wt = Repository::open(&path).unwrap();
    let head = wt.head().unwrap().peel_to_commit().unwrap();
    wt.branch("mine", &head, false).unwrap();
    wt.set_head("refs/heads/mine").unwrap();
    assert!(!here(tip));
    let p = prep().unwrap();
    assert!(!p.created);
    assert_eq!(wt.head().unwrap().name().ok(), Some("refs/heads/baton/K-1"));
    assert!(here(tip));
    // A checkout whose `.git` file is gone is made anew.
    std::fs::remove_file(path.join(".git")).unwrap();
    assert!(!here(tip));
    assert!(prep().unwrap().created);
    assert!(here(tip));
}

/// A preparation keeps the mirror it opened for the next one, which builds on what a
/// fetch into the kept mirror brought; a mirror whose folder was removed is made anew.
#[test]
fn the_opened_mirror_is_kept_between_preparations_while_its_folder_is_whole() {
    let (dir, remote, access) = seeded();
    let root = dir.path().join("ws");
    let key = root.join(MIRROR_DIR);
    let kept = || OPENED.lock().unwrap().contains_key(&key);
    let prep = |task: &str| {
        prepare(
            &root,
            &root.join(task),
            &access,
            task,
            &format!("baton/{task}"),
            "main",
            LastCommit::Recorded(None, Instant::now()),
        )
    };
    prep("K-1").unwrap();
    assert!(kept(), "the mirror was not kept");
    // The remote gets the task's branch ahead (another host's stage); the kept
    // mirror's fetch brings it, and the next preparation moves to it.
    let bare = Repository::open_bare(&remote).unwrap();
    let head = bare.head().unwrap().peel_to_commit().unwrap();
    let sig = git2::Signature::now("t", "t@t").unwrap();
    let ahead = bare
        .commit(None, &sig, &sig, "ahead", &head.tree().unwrap(), &[&head])
        .unwrap();
    bare.reference("refs/heads/baton/K-2", ahead, true, "ahead")
        .unwrap();
    let p = prep("K-2").unwrap();
    let wt = Repository::open(&p.path).unwrap();
    assert_eq!(wt.head().unwrap().target(), Some(ahead));
    // The mirror's folder goes: the kept handle is dropped and the mirror made anew.
    std::fs::remove_dir_all(&key).unwrap();
    std::fs::remove_dir_all(root.join("K-1")).unwrap();
    let p = prep("K-1").unwrap();
    assert!(p.created && key.join("HEAD").is_file());
}

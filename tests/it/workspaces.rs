//! Workspaces for real repositories on a running node: a branch that left the host,
//! hooks, reaching the remote (`config check --remote`, a hung one included), private
//! remotes, and cleaning up. The mirror's own preparations are in `mirror`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton::model::{EventKind, TaskStatus};
use baton::service::ServeOptions;
use baton::workspace::LastCommit::Recorded;
use baton::workspace::{self, RepoAccess};

use crate::mirror::seeded;
use crate::on_both;
use crate::support::TestDb;
use crate::support::harness::*;

/// Runs task `key` through `stages` (TOML of `[pipelines.default]` and its stages) on one
/// node with pushes off, so that the remote never has the task's branch; returns the
/// task's jobs as (stage, attempt) and its worktree.
async fn run_without_pushes(h: &Harness, key: &str, stages: &str) -> (Vec<(String, i32)>, PathBuf) {
    let mut config = h.config(stages);
    config.effects.push = false;
    let first = stages
        .split_once("stages = [\"")
        .and_then(|(_, rest)| rest.split('"').next())
        .unwrap();
    let d = h.run_to_done(config, key, first).await;
    let jobs = d
        .jobs
        .iter()
        .map(|j| (j.stage.clone(), j.attempt))
        .collect();
    (jobs, h.root.join("workspaces").join(key))
}

/// A stage that follows one of this host's own, whose branch is no longer here (deleted
/// from the mirror between the stages), reads the task's last commit and builds on it.
async fn a_stage_whose_branch_left_this_host_reads_the_last_commit(db: TestDb) {
    let h = Harness::new(db);
    let mirror = h.root.join("workspaces").join(workspace::MIRROR_DIR);
    let stages = format!(
        r#"
[pipelines.default]
stages = ["one", "two", "three"]
[stages.one]
command = ["sh", "-c", "echo one > one.txt"]
[stages.two]
command = ["true"]
commit = false
gate.command = ["git", "--git-dir", "{mirror}", "update-ref", "-d", "refs/heads/baton/GONE-1"]
[stages.three]
command = ["sh", "-c", "git cat-file -e HEAD:one.txt && git rev-parse --abbrev-ref HEAD > branch.txt"]
commit = false
"#,
        mirror = mirror.display()
    );
    let (jobs, ws) = run_without_pushes(&h, "GONE-1", &stages).await;
    let once = |s: &str| (s.to_string(), 1);
    assert_eq!(jobs, [once("one"), once("two"), once("three")]);
    let branch = std::fs::read_to_string(ws.join("branch.txt")).unwrap();
    assert_eq!(branch, "baton/GONE-1\n");
}
on_both!(
    a_stage_whose_branch_left_this_host_reads_the_last_commit,
    a_stage_whose_branch_left_this_host_reads_the_last_commit
);

/// A stage that follows one of this host's own builds on that stage's commit, even one
/// made off the task's branch (stage a's agent left the checkout detached); after a stage
/// that committed nothing it builds on the branch as that stage left it, unread against
/// the record (ADR 0007): here stage b's agent reset the branch below a's commit, and
/// stage c starts there.
async fn a_stage_after_one_of_this_hosts_builds_on_the_branch_as_it_was_left(db: TestDb) {
    let h = Harness::new(db);
    let stages = r#"
[pipelines.default]
stages = ["a", "b", "c"]
[stages.a]
command = ["sh", "-c", "git checkout -q --detach && echo a > a.txt"]
[stages.b]
command = ["sh", "-c", "test -f a.txt && git reset -q --hard HEAD~1"]
commit = false
[stages.c]
command = ["sh", "-c", "ls > listing.txt"]
commit = false
"#;
    let (jobs, ws) = run_without_pushes(&h, "RESET-1", stages).await;
    let once = |s: &str| (s.to_string(), 1);
    assert_eq!(jobs, [once("a"), once("b"), once("c")]);
    let listing = std::fs::read_to_string(ws.join("listing.txt")).unwrap();
    assert!(listing.contains("README.md"), "{listing}");
    assert!(
        !listing.contains("a.txt"),
        "moved back to the record: {listing}"
    );
}
on_both!(
    a_stage_after_one_of_this_hosts_builds_on_the_branch_as_it_was_left,
    a_stage_after_one_of_this_hosts_builds_on_the_branch_as_it_was_left
);

async fn hooks_set_a_worktree_up_once_and_run_before_every_stage(db: TestDb) {
    let h = Harness::new(db);
    let counts = h.root.join("hooks.txt");
    let stages = "[pipelines.default]\nstages = [\"one\", \"two\"]\n[stages.one]\ncommand = [\"true\"]\n[stages.two]\ncommand = [\"true\"]\n";
    let mut config = h.config(stages);
    config.repo.setup = vec![
        "sh".into(),
        "-c".into(),
        format!("echo setup >> {}", counts.display()),
    ];
    config.repo.before_stage = vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo \"before $BATON_STAGE\" >> {}; echo hook-output",
            counts.display()
        ),
    ];
    h.submit("HOOK-1", "one").await;
    let (node, mut rx) = h.start(config.clone()).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    assert_eq!(
        std::fs::read_to_string(&counts).unwrap(),
        "setup\nbefore one\nbefore two\n"
    );
    let d =
        h.db.store
            .task_detail(&crate::support::key("HOOK-1"))
            .await
            .unwrap();
    let log = std::fs::read_to_string(&d.runs[0].log_path).unwrap();
    assert!(log.contains("==== baton: hook setup"), "{log}");
    assert!(log.contains("hook-output"), "{log}");

    // A failing hook fails the attempt with its exit status, in the log and the events.
    config.repo.before_stage = vec!["sh".into(), "-c".into(), "exit 3".into()];
    h.submit("HOOK-2", "one").await;
    let (node, mut rx) = h.start(config).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    let d =
        h.db.store
            .task_detail(&crate::support::key("HOOK-2"))
            .await
            .unwrap();
    let failed = d
        .events
        .iter()
        .find(|e| e.kind == EventKind::TaskFailed)
        .unwrap();
    assert!(
        failed
            .detail
            .contains("hook before_stage exited with code 3"),
        "{}",
        failed.detail
    );
    let log = std::fs::read_to_string(&d.runs[0].log_path).unwrap();
    assert!(
        log.contains("baton: hook before_stage exited with code 3"),
        "{log}"
    );
}
on_both!(
    hooks_set_a_worktree_up_once_and_run_before_every_stage,
    hooks_set_a_worktree_up_once_and_run_before_every_stage
);

fn config_check_remote(dir: &Path, url: &str, extra: &str) -> (bool, String) {
    let config = dir.join("baton.toml");
    std::fs::write(
        &config,
        format!(
            "[repo]\nurl = \"{url}\"\n{extra}\n[pipelines.default]\nstages = [\"one\"]\n[stages.one]\ncommand = [\"true\"]\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(&config)
        .args(["config", "check", "--remote"])
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_reaches_the_remote_and_a_hung_one_times_out() {
    let (dir, access) = seeded();
    let (ok, text) = config_check_remote(dir.path(), &access.url, "");
    assert!(ok, "{text}");
    assert!(
        text.contains("is reachable: 1 branch(es), main among them"),
        "{text}"
    );
    let (ok, text) = config_check_remote(dir.path(), "/nonexistent/repo.git", "");
    assert!(!ok);
    assert!(text.contains("cannot be reached"), "{text}");
    // A remote that accepts the connection and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let started = std::time::Instant::now();
    let dir2 = dir.path().to_path_buf();
    let (ok, text) = tokio::task::spawn_blocking(move || {
        config_check_remote(
            &dir2,
            &format!("http://127.0.0.1:{port}/app.git"),
            "network_timeout = \"1s\"",
        )
    })
    .await
    .unwrap();
    silent.abort();
    assert!(!ok, "{text}");
    assert!(text.contains("cannot be reached"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a hung remote held the check for {:?}",
        started.elapsed()
    );
}

/// A private remote over https (git's smart HTTP behind Basic authentication): cloned,
/// fetched and pushed with the token of `repo.token_env`; without it, refused with a
/// reason that `baton status KEY` shows.
async fn a_private_remote_needs_its_token(db: TestDb) {
    let h = Harness::new(db);
    let server = crate::support::git_http::GitHttp::start(&h.root, "s3cret-token").await;
    let stages = r#"
[pipelines.default]
stages = ["one", "two"]
[stages.one]
command = ["sh", "-c", "echo one > one.txt"]
[stages.two]
command = ["sh", "-c", "echo two > two.txt"]
[effects]
push = true
"#;
    let mut config = h.config(stages);
    config.repo.url = server.url("remote.git");
    config.repo.token_env = Some("BATON_TEST_REPO_TOKEN".into());
    config.retry.max_attempts = 1;
    let with_token = baton::config::Secrets {
        repo_token: Some("s3cret-token".into()),
        ..Default::default()
    };
    h.submit("PRIV-1", "one").await;
    let opts = ServeOptions {
        secrets: Some(with_token),
        ..Default::default()
    };
    let (node, mut rx) = h.start_with(config.clone(), opts).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    let log = remote_log(&h.root.join("remote.git"), "baton/PRIV-1");
    assert!(log[0].starts_with("two(PRIV-1)"), "{log:?}");
    assert!(log[1].starts_with("one(PRIV-1)"), "{log:?}");

    // Another host without the token: its first fetch is refused and the task fails,
    // saying why where the operator looks.
    config.workspace_root = h.root.join("tokenless-host");
    h.submit("PRIV-2", "one").await;
    let opts = ServeOptions {
        secrets: Some(baton::config::Secrets::default()),
        ..Default::default()
    };
    let (node, mut rx) = h.start_with(config, opts).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Failed);
    node.shutdown().await;
    let d =
        h.db.store
            .task_detail(&crate::support::key("PRIV-2"))
            .await
            .unwrap();
    let shown = baton::present::render_detail(&d, 0);
    assert!(
        shown.contains("refused every credential baton has"),
        "{shown}"
    );
    let log = std::fs::read_to_string(&d.runs[0].log_path).unwrap();
    assert!(log.contains("refused every credential baton has"), "{log}");
    assert!(!log.contains("s3cret-token") && !shown.contains("s3cret-token"));
}
on_both!(
    a_private_remote_needs_its_token,
    a_private_remote_needs_its_token
);

/// `[retention]`: the worktree and logs of a task that ended long enough ago are removed
/// (a dry run only reports them); an active task's are never touched, and the mirror
/// keeps no admin entry of a removed worktree.
async fn gc_removes_only_what_ended_tasks_left(db: TestDb) {
    let h = Harness::new(db);
    let config = h.config(
        r#"
[pipelines.default]
stages = ["one"]
[stages.one]
command = ["sh", "-c", "echo one > one.txt"]
[effects]
push = true
"#,
    );
    h.submit("GC-1", "one").await;
    let (node, mut rx) = h.start(config.clone()).await;
    assert_eq!(wait_task_end(&mut rx).await, TaskStatus::Done);
    node.shutdown().await;
    // An active task with a worktree of its own (its first stage not started yet).
    h.submit("GC-2", "one").await;
    let access = RepoAccess {
        url: config.repo.url.clone(),
        ..Default::default()
    };
    let root = config.workspace_root.clone();
    let ws2 = workspace::path_for(&root, "GC-2").unwrap();
    workspace::prepare(
        &root,
        &ws2,
        &access,
        "GC-2",
        "baton/GC-2",
        "main",
        Recorded(None, std::time::Instant::now()),
    )
    .unwrap();
    let ws1 = workspace::path_for(&root, "GC-1").unwrap();
    let logs1 = config.log_dir.join("GC-1");
    assert!(ws1.join("one.txt").exists() && logs1.exists());

    let store = &h.db.store;
    let now = baton::clock::Clock::system().now_ms();
    // Not yet past retention.worktrees (7 days by default): nothing to remove.
    let report = baton::retention::run_once(store, &config, now, false, false)
        .await
        .unwrap();
    assert!(report.is_empty(), "{report:?}");

    let later = now + 8 * 24 * 3600 * 1000;
    let dry = baton::retention::run_once(store, &config, later, true, false)
        .await
        .unwrap();
    assert_eq!(
        dry.worktrees
            .iter()
            .map(|r| r.task.as_str())
            .collect::<Vec<_>>(),
        ["GC-1"]
    );
    assert!(dry.logs.is_empty(), "logs are kept 30 days: {dry:?}");
    assert!(dry.freed() > 0 && ws1.exists(), "a dry run removes nothing");

    let much_later = now + 31 * 24 * 3600 * 1000;
    let report = baton::retention::run_once(store, &config, much_later, false, true)
        .await
        .unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.worktrees.len(), 1);
    assert_eq!(report.logs.len(), 1);
    assert!(
        report.render().contains("removed worktree of GC-1"),
        "{}",
        report.render()
    );
    assert!(!ws1.exists() && !logs1.exists());
    assert!(ws2.exists(), "an active task's worktree was touched");
    let mirror = git2::Repository::open_bare(root.join(workspace::MIRROR_DIR)).unwrap();
    assert!(
        mirror.find_worktree("GC-1").is_err(),
        "the worktree is still registered"
    );
    assert!(mirror.find_worktree("GC-2").is_ok());
    // GC-1's branch was on the remote, so it left the mirror too; its work did not.
    assert!(
        mirror
            .find_branch("baton/GC-1", git2::BranchType::Local)
            .is_err()
    );
    assert!(remote_log(&h.root.join("remote.git"), "baton/GC-1")[0].starts_with("one(GC-1)"));

    // The database keeps a task's history for retention.history (90 days by default):
    // then its events, runs and settled effects go; the task and its jobs stay. An active
    // task's history is never touched. Webhook deliveries go after their window (7 days).
    let key1 = crate::support::key("GC-1");
    let before = store.task_detail(&key1).await.unwrap();
    assert!(!before.events.is_empty() && !before.runs.is_empty());
    assert_eq!(report.history.tasks, 0, "{report:?}");
    store
        .record_delivery("old-delivery", baton::model::EventSource::Webhook, now)
        .await
        .unwrap();
    let past_history = now + 91 * 24 * 3600 * 1000;
    let dry = baton::retention::run_once(store, &config, past_history, true, false)
        .await
        .unwrap();
    assert_eq!(dry.history.tasks, 1);
    assert_eq!(
        store.task_detail(&key1).await.unwrap().events.len(),
        before.events.len()
    );
    let report = baton::retention::run_once(store, &config, past_history, false, false)
        .await
        .unwrap();
    let pruned = report.history;
    let counts = (pruned.tasks, pruned.runs as usize, pruned.deliveries);
    assert_eq!(counts, (1, before.runs.len(), 1), "{pruned:?}");
    assert_eq!(pruned.events as usize, before.events.len());
    let after = store.task_detail(&key1).await.unwrap();
    assert!(after.events.is_empty() && after.runs.is_empty() && after.effects.is_empty());
    assert_eq!(after.jobs.len(), before.jobs.len(), "the jobs stay");
    assert!(after.task.history_pruned_at.is_some());
    let active = store
        .task_detail(&crate::support::key("GC-2"))
        .await
        .unwrap();
    assert!(
        !active.events.is_empty(),
        "an active task's history was pruned"
    );
    // A delivery seen again after its window counts as new.
    assert!(
        store
            .record_delivery(
                "old-delivery",
                baton::model::EventSource::Webhook,
                past_history
            )
            .await
            .unwrap()
    );
    let again = baton::retention::run_once(store, &config, past_history, false, false)
        .await
        .unwrap();
    assert_eq!(again.history.tasks, 0, "pruned once");

    // The command: a dry run reports, as text and as JSON.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("--config")
        .arg(h.root.join("baton.toml"))
        .args(["gc", "--dry-run", "--json"])
        .env_remove("BATON_DATABASE_URL")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["dry_run"], true);
    assert_eq!(doc["worktrees"].as_array().unwrap().len(), 0, "{doc}");
}
on_both!(
    gc_removes_only_what_ended_tasks_left,
    gc_removes_only_what_ended_tasks_left
);

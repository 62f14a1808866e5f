//! `baton bench --large-repo`: what a task pays for its checkout on a large repository.
//! It generates a repository (`--commits` commits, each adding `--blob-kib` KiB of
//! incompressible data to one of 2,000 files) with `git fast-import`, then measures, for a
//! first task and `--later-tasks` more on the same host:
//!
//! - before (a clone per task, as baton did before mirrors): a clone into a folder of the
//!   task's own;
//! - after (one mirror per host, a worktree per task): `workspace::prepare`, which fetches
//!   into the mirror (a clone for the first task) and adds the task's worktree;
//!
//! each with its time and the disk it added, from the repository as a local path and
//! served by `git daemon` on loopback (a pack is sent, as from a forge). A node's submit-to-first-agent-start time
//! is this plus dispatch (see docs/benchmarks-data.md).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::RngCore;

use crate::retention::human_bytes;
use crate::workspace::{self, RepoAccess};

pub struct LargeRepoArgs {
    pub commits: usize,
    pub blob_kib: usize,
    pub later_tasks: usize,
}

/// One way of making a task's checkout, measured.
#[derive(Debug, Clone, Default)]
pub struct CheckoutFigures {
    pub first: Duration,
    pub first_disk: u64,
    pub later: Vec<Duration>,
    /// Disk added by each later task, on average.
    pub later_disk: u64,
}

impl CheckoutFigures {
    pub fn later_max(&self) -> Duration {
        self.later.iter().max().copied().unwrap_or_default()
    }

    pub fn later_mean(&self) -> Duration {
        let n = self.later.len().max(1) as u32;
        self.later.iter().sum::<Duration>() / n
    }
}

/// Returns (clone per task, mirror and worktree) for each remote measured.
pub async fn run(args: LargeRepoArgs) -> anyhow::Result<Vec<(CheckoutFigures, CheckoutFigures)>> {
    let tmp = tempfile::Builder::new()
        .prefix("baton-bench-repo-")
        .tempdir()?;
    let remote = tmp.path().join("remote.git");
    println!(
        "generating a repository: {} commits, {} KiB each ...",
        args.commits, args.blob_kib
    );
    let started = Instant::now();
    let made = remote.clone();
    let blob = args.blob_kib * 1024;
    tokio::task::spawn_blocking(move || generate(&made, args.commits, blob)).await??;
    println!(
        "  {} on disk, made in {:.1}s",
        human_bytes(workspace::disk_usage(&remote)),
        started.elapsed().as_secs_f64()
    );
    // A path (libgit2 copies the object files) and git's own protocol on loopback (a
    // pack is sent, as from a forge), each measured both ways.
    let daemon = GitDaemon::start(tmp.path())?;
    let mut results = Vec::new();
    for (transport, url) in [
        ("local path", remote.display().to_string()),
        ("git:// on loopback", daemon.url("remote.git")),
    ] {
        let dir = tmp.path().join(transport.replace([' ', ':', '/'], "-"));
        let later = args.later_tasks;
        let figures = tokio::task::spawn_blocking(move || compare(&dir, &url, later)).await??;
        results.push((transport, figures));
    }
    let url = daemon.url("remote.git");
    println!("{url}: a node, submit to the agent's start");
    let starts = submit_to_start(&tmp.path().join("node"), &url, args.later_tasks).await?;
    println!(
        "\nresults ({} later tasks after the first)",
        args.later_tasks
    );
    println!(
        "  {:<20} {:<18} {:>8} {:>11}   {:>19}   {:>11}",
        "remote", "checkout", "first", "first disk", "later mean / max", "later disk"
    );
    for (transport, (before, after)) in &results {
        for (name, f) in [("clone per task", before), ("mirror + worktree", after)] {
            println!(
                "  {transport:<20} {name:<18} {:>7.2}s {:>11}   {:>7.3}s / {:>7.3}s   {:>11}",
                f.first.as_secs_f64(),
                human_bytes(f.first_disk),
                f.later_mean().as_secs_f64(),
                f.later_max().as_secs_f64(),
                human_bytes(f.later_disk),
            );
        }
        let speedup =
            before.later_mean().as_secs_f64() / after.later_mean().as_secs_f64().max(1e-9);
        let disk = before.later_disk as f64 / (after.later_disk.max(1)) as f64;
        println!(
            "  {transport:<20} later tasks ready {speedup:.1}x sooner, {disk:.1}x less disk each"
        );
    }
    if let Some((first, later)) = starts.split_first() {
        let max = later.iter().max().copied().unwrap_or_default();
        let mean = later.iter().sum::<Duration>() / later.len().max(1) as u32;
        println!(
            "  a node on git://: submit to agent start {:.2}s for the first task, {:.3}s mean / {:.3}s max for the later ones",
            first.as_secs_f64(),
            mean.as_secs_f64(),
            max.as_secs_f64()
        );
    }
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

/// Both ways of making a checkout, for a first task and `later` more, from `url`.
fn compare(
    dir: &Path,
    url: &str,
    later: usize,
) -> anyhow::Result<(CheckoutFigures, CheckoutFigures)> {
    let tasks: Vec<String> = (0..=later).map(|i| format!("BIG-{i}")).collect();
    println!("{url}: a clone per task");
    let clones = dir.join("clones");
    std::fs::create_dir_all(&clones)?;
    let before = measure(&tasks, &clones, |key| {
        git2::build::RepoBuilder::new()
            .branch("main")
            .clone(url, &clones.join(key))
            .map(|_| ())
            .with_context(|| format!("clone for {key}"))
    })?;
    println!("{url}: one mirror per host, a worktree per task");
    let root = dir.join("workspaces");
    std::fs::create_dir_all(&root)?;
    let access = RepoAccess {
        url: url.to_string(),
        ..Default::default()
    };
    let after = measure(&tasks, &root, |key| {
        let path = workspace::path_for(&root, key)?;
        let branch = format!("baton/{key}");
        workspace::prepare(
            &root,
            &path,
            &access,
            key,
            &branch,
            "main",
            workspace::LastCommit::Recorded(None, std::time::Instant::now()),
        )
        .map(|_| ())
        .with_context(|| format!("worktree for {key}"))
    })?;
    Ok((before, after))
}

/// `git daemon` serving a folder's repositories on a free loopback port.
struct GitDaemon {
    child: std::process::Child,
    port: u16,
}

impl GitDaemon {
    fn start(base: &Path) -> anyhow::Result<GitDaemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // `git daemon` runs `git-daemon` as a child: the group is ended whole.
            .process_group(0)
            .spawn()
            .context("run git daemon (is git installed?)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "git daemon did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(GitDaemon { child, port })
    }

    fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        crate::agent::signal_group(self.child.id() as i32, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A node with a one-stage pipeline of `true` on `url`: submits `later` + 1 tasks one
/// after another and returns, for each, the time from its submit to its agent's start
/// (the `run_started` event).
async fn submit_to_start(dir: &Path, url: &str, later: usize) -> anyhow::Result<Vec<Duration>> {
    use crate::model::{EventKind, Origin, TaskKey};
    std::fs::create_dir_all(dir)?;
    let toml = format!(
        r#"
database_url = "sqlite://{db}?mode=rwc"
[repo]
url = "{url}"
[pipelines.default]
stages = ["one"]
[stages.one]
command = ["true"]
[effects]
push = false
[http]
listen = "127.0.0.1:0"
"#,
        db = dir.join("bench.db").display(),
    );
    let config = crate::config::Config::from_toml(&toml, dir, &Default::default())
        .map_err(|p| anyhow::anyhow!("bench config: {p:?}"))?;
    let node = crate::service::Node::start(
        config.clone(),
        crate::service::ServeOptions {
            dispatcher_interval: Some(Duration::from_millis(20)),
            ..Default::default()
        },
    )
    .await?;
    let store = node.store.clone();
    let clock = crate::clock::Clock::system();
    let mut out = Vec::new();
    for i in 0..=later {
        let key = TaskKey::parse(format!("NODE-{i}")).map_err(anyhow::Error::msg)?;
        let request = crate::tasks::SubmitRequest::new(key);
        let submitted =
            crate::tasks::submit(&store, &config, request, Origin::Cli, clock.now_ms()).await?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let started = loop {
            let events = store.events(submitted.task.id).await?;
            if let Some(e) = events.iter().find(|e| e.kind == EventKind::RunStarted) {
                break e.at;
            }
            anyhow::ensure!(Instant::now() < deadline, "NODE-{i} never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let took = (started - submitted.task.created_at).max(0) as u64;
        out.push(Duration::from_millis(took));
        print!(".");
        let _ = std::io::stdout().flush();
    }
    println!();
    node.shutdown().await;
    Ok(out)
}

/// Makes each task's checkout in turn, timing it and measuring the disk of `dir` it added.
fn measure(
    tasks: &[String],
    dir: &Path,
    mut make: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<CheckoutFigures> {
    let mut f = CheckoutFigures::default();
    let mut later_disk = 0;
    for (i, key) in tasks.iter().enumerate() {
        let before = workspace::disk_usage(dir);
        let started = Instant::now();
        make(key)?;
        let took = started.elapsed();
        let added = workspace::disk_usage(dir).saturating_sub(before);
        if i == 0 {
            (f.first, f.first_disk) = (took, added);
        } else {
            f.later.push(took);
            later_disk += added;
        }
        print!(".");
        let _ = std::io::stdout().flush();
    }
    println!();
    f.later_disk = later_disk / (tasks.len().saturating_sub(1).max(1)) as u64;
    Ok(f)
}

/// A bare repository at `path` whose `main` has `commits` commits, each writing `blob`
/// bytes of random data to one of 2,000 files in 50 folders.
fn generate(path: &Path, commits: usize, blob: usize) -> anyhow::Result<()> {
    git2::Repository::init_bare(path)?.set_head("refs/heads/main")?;
    let mut child = Command::new("git")
        .arg("--git-dir")
        .arg(path)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .context("run git fast-import (is git installed?)")?;
    let stdin = child.stdin.take().context("fast-import's stdin")?;
    let mut input = std::io::BufWriter::new(stdin);
    let mut rng = rand::rng();
    let mut data = vec![0u8; blob];
    for i in 1..=commits {
        rng.fill_bytes(&mut data);
        write!(input, "blob\nmark :{i}\ndata {}\n", data.len())?;
        input.write_all(&data)?;
        let msg = format!("change {i}");
        write!(
            input,
            "\ncommit refs/heads/main\ncommitter bench <bench@localhost> {} +0000\ndata {}\n{msg}\n",
            1_700_000_000 + i,
            msg.len()
        )?;
        writeln!(input, "M 100644 :{i} d{}/f{}.bin\n", i % 50, i % 2000)?;
    }
    drop(input);
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "git fast-import failed: {status}");
    Ok(())
}

//! `baton bench`: pushes N tasks through a 4-stage pipeline of `true` agents and prints
//! what it measured, next to a baseline taken in the same run on the same machine: the
//! raw rate at which this machine spawns and reaps `true` at the same concurrency.
//! Figures, not verdicts: shared machines are noisy, so compare ratios.

pub mod history;
pub mod workspaces;

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::clock::Clock;
use crate::config::{Config, EnvOverrides};
use crate::model::{Origin, TaskKey, TaskStatus};
use crate::service::{Node, ServeOptions};
use crate::tasks::{self, SubmitRequest};

pub struct BenchArgs {
    pub tasks: usize,
    pub concurrency: usize,
    /// Defaults to an SQLite file in a temp folder.
    pub database_url: Option<String>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub stages: usize,
    pub elapsed: Duration,
    pub stages_per_sec: f64,
    pub baseline_per_sec: f64,
    pub ratio: f64,
    pub advance_p50_ms: i64,
    pub advance_p99_ms: i64,
    pub peak_rss_kib: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let tmp = tempfile::Builder::new().prefix("baton-bench-").tempdir()?;
    let root = tmp.path();
    let stages = args.tasks * 4;

    println!(
        "baseline: spawning and reaping `true` {stages} times, {} at a time",
        args.concurrency
    );
    let baseline_per_sec = spawn_baseline(stages, args.concurrency).await?;
    println!("  {baseline_per_sec:.1} processes/s");

    crate::workspace::seed_remote(&root.join("seed"), &root.join("remote.git"))
        .context("seed the remote")?;
    let db = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", root.join("bench.db").display()));
    let toml = format!(
        r#"
database_url = "{db}"
max_concurrent_jobs = {conc}
[repo]
url = "{remote}"
[pipelines.default]
stages = ["s1", "s2", "s3", "s4"]
[stages.s1]
command = ["true"]
[stages.s2]
command = ["true"]
[stages.s3]
command = ["true"]
[stages.s4]
command = ["true"]
[effects]
push = false
plane_comment = false
[http]
listen = "127.0.0.1:0"
"#,
        conc = args.concurrency,
        remote = root.join("remote.git").display(),
    );
    let config = Config::from_toml(&toml, root, &EnvOverrides::default())
        .map_err(|p| anyhow::anyhow!("bench config: {p:?}"))?;
    let store = crate::store::Store::open(&config.database_url).await?;
    let clock = Clock::system();
    for i in 0..args.tasks {
        let key = TaskKey::parse(format!("BENCH-{i}")).map_err(anyhow::Error::msg)?;
        let request = SubmitRequest::new(key);
        tasks::submit(&store, &config, request, Origin::Cli, clock.now_ms()).await?;
    }
    println!(
        "baton: {} tasks x 4 stages of `true`, max_concurrent_jobs = {}",
        args.tasks, args.concurrency
    );
    let started = Instant::now();
    let node = Node::start(
        config,
        ServeOptions {
            dispatcher_interval: Some(Duration::from_millis(50)),
            ..Default::default()
        },
    )
    .await?;
    let mut last_print = Instant::now();
    loop {
        let tasks = store.list_tasks(None).await?;
        let open = tasks
            .iter()
            .filter(|t| t.task.status == TaskStatus::Active)
            .count();
        if open == 0 {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            println!("  {} of {} tasks finished", tasks.len() - open, tasks.len());
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    node.shutdown().await;

    // Advance latency: an agent's recorded exit to the next stage's agent start.
    let mut latencies = Vec::new();
    // Where a stage's time goes: agent (started -> exit recorded), finalization (exit ->
    // claim won), start of the next (claim won -> next agent started).
    let (mut agent, mut finalize, mut start) = (Vec::new(), Vec::new(), Vec::new());
    for t in store.list_tasks(None).await? {
        let events = store.events(t.task.id).await?;
        let (mut exited, mut started_at, mut won): (Option<i64>, Option<i64>, Option<i64>) =
            (None, None, None);
        for e in events {
            match e.kind.as_str() {
                "run_exited" => {
                    if let Some(s) = started_at.take() {
                        agent.push(e.at - s);
                    }
                    exited = Some(e.at);
                }
                "claim_won" => {
                    if let Some(x) = exited {
                        finalize.push(e.at - x);
                    }
                    won = Some(e.at);
                }
                "run_started" => {
                    started_at = Some(e.at);
                    if let Some(at) = exited.take() {
                        latencies.push(e.at - at);
                    }
                    if let Some(w) = won.take() {
                        start.push(e.at - w);
                    }
                }
                _ => {}
            }
        }
    }
    let mean = |v: &[i64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<i64>() as f64 / v.len() as f64
        }
    };
    println!(
        "  mean per stage: agent {:.1} ms, finalization {:.1} ms, next start {:.1} ms",
        mean(&agent),
        mean(&finalize),
        mean(&start)
    );
    latencies.sort_unstable();
    let pct = |p: f64| -> i64 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i]
    };
    let stages_per_sec = stages as f64 / elapsed.as_secs_f64();
    let report = BenchReport {
        stages,
        elapsed,
        stages_per_sec,
        baseline_per_sec,
        ratio: stages_per_sec / baseline_per_sec,
        advance_p50_ms: pct(0.50),
        advance_p99_ms: pct(0.99),
        peak_rss_kib: peak_rss_kib(),
    };
    store.close().await;
    println!(
        "\nresults ({})",
        if db.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        }
    );
    println!("  stages             {}", report.stages);
    println!("  wall time          {:.2}s", report.elapsed.as_secs_f64());
    println!("  stages/s           {:.1}", report.stages_per_sec);
    println!(
        "  raw spawn rate     {:.1}/s (baseline, same concurrency)",
        report.baseline_per_sec
    );
    println!("  ratio              {:.3}", report.ratio);
    println!(
        "  advance latency    p50 {} ms, p99 {} ms ({} samples)",
        report.advance_p50_ms,
        report.advance_p99_ms,
        latencies.len()
    );
    println!("  peak RSS           {} MiB", report.peak_rss_kib / 1024);
    Ok(report)
}

/// Spawns and reaps `true` `n` times with `concurrency` at once; returns processes/s.
async fn spawn_baseline(n: usize, concurrency: usize) -> anyhow::Result<f64> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        handles.push(tokio::spawn(async move {
            let status = tokio::process::Command::new("true").status().await;
            drop(permit);
            status
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The peak resident set size of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

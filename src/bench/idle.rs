//! `baton bench --idle N`: N agents that sleep under one node, and what supervising them
//! costs that node while nothing happens: its CPU time over a window (as a share of one
//! core) and its peak resident memory. The agents are real processes (`sleep`), each with
//! its shim, its worktree and its run, as a team's long agent runs would be.

use std::time::{Duration, Instant};

use super::{cpu_time, node_config, peak_rss_kib, proc_status_kib};
use crate::clock::Clock;
use crate::model::{Origin, TaskKey};
use crate::service::{Node, ServeOptions};
use crate::store::Store;
use crate::tasks::{self, SubmitRequest};

pub struct IdleArgs {
    pub agents: usize,
    /// How long the node is watched once every agent runs.
    pub window: Duration,
    pub database_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct IdleReport {
    pub agents: usize,
    /// From the node's start to every agent running.
    pub start_all: Duration,
    /// The node's CPU time over the window, as a share of one core.
    pub cpu_share: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

pub async fn run(args: IdleArgs) -> anyhow::Result<IdleReport> {
    let (tmp, database) = super::bench_dir("baton-bench-idle-", args.database_url.as_deref())?;
    let root = tmp.path();
    let command = r#"["sleep", "86400"]"#;
    let config = node_config(
        root,
        &database,
        args.agents,
        root,
        &["wait"],
        command,
        false,
    )?;
    let store = Store::open(&config.database_url).await?;
    let clock = Clock::system();
    println!("submitting {} tasks of one stage: `sleep`", args.agents);
    for i in 0..args.agents {
        let key = TaskKey::parse(format!("IDLE-{i}")).map_err(anyhow::Error::msg)?;
        tasks::submit(
            &store,
            &config,
            SubmitRequest::new(key),
            Origin::Cli,
            clock.now_ms(),
        )
        .await?;
    }
    let started = Instant::now();
    let node = Node::start(
        config,
        ServeOptions {
            stop_agents: true,
            ..Default::default()
        },
    )
    .await?;
    let mut last_print = Instant::now();
    loop {
        let live = store.live_runs().await? as usize;
        if live >= args.agents {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            println!("  {live} of {} agents started", args.agents);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start_all = started.elapsed();
    println!(
        "  all {} agents run ({:.1}s); watching the node for {}",
        args.agents,
        start_all.as_secs_f64(),
        humantime::format_duration(args.window)
    );
    let (cpu_before, at) = (cpu_time(), Instant::now());
    tokio::time::sleep(args.window).await;
    let cpu = cpu_time().saturating_sub(cpu_before);
    let report = IdleReport {
        agents: args.agents,
        start_all,
        cpu_share: cpu.as_secs_f64() / at.elapsed().as_secs_f64(),
        rss_kib: proc_status_kib("VmRSS:"),
        peak_rss_kib: peak_rss_kib(),
    };
    println!("  stopping the agents");
    node.shutdown().await;
    store.close().await;
    println!(
        "\nresults ({})",
        if database.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        }
    );
    println!("  sleeping agents    {}", report.agents);
    println!(
        "  all started after  {:.1}s",
        report.start_all.as_secs_f64()
    );
    println!(
        "  supervision CPU    {:.2}% of one core (over {})",
        report.cpu_share * 100.0,
        humantime::format_duration(args.window)
    );
    println!(
        "  RSS                {} MiB (peak {} MiB)",
        report.rss_kib / 1024,
        report.peak_rss_kib / 1024
    );
    Ok(report)
}

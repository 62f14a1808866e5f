//! `baton bench`: pushes N tasks through a 4-stage pipeline of `true` agents on a real node
//! and prints what it measured, next to a baseline taken in the same run on the same
//! machine: the raw rate at which this machine spawns and reaps `true` at the same
//! concurrency. For each number of slots it runs with the auto-commit off and then on;
//! then it measures advance latency with one task at a time on an idle node.
//! Figures, not verdicts: shared machines are noisy, so compare ratios.

mod advancer;
pub mod history;
pub mod idle;
pub mod workspaces;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::clock::Clock;
use crate::config::{Config, EnvOverrides};
use crate::model::{Origin, TaskKey};
use crate::service::{Node, ServeOptions};
use crate::store::Store;
use crate::tasks::{self, SubmitRequest};

pub struct BenchArgs {
    pub tasks: usize,
    /// The node's slots (`max_concurrent_jobs`), one measure each.
    pub slots: Vec<usize>,
    /// Tasks pushed one at a time through an idle node, for advance latency.
    pub latency_tasks: usize,
    /// Defaults to an SQLite file in a temp folder.
    pub database_url: Option<String>,
}

/// What one throughput run measured.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub slots: usize,
    pub commits: bool,
    pub stages: usize,
    pub elapsed: Duration,
    pub stages_per_sec: f64,
    pub baseline_per_sec: f64,
    pub ratio: f64,
    /// The CPU time of baton's own process (user + system) per stage; the shims and
    /// agents are other processes.
    pub cpu_ms_per_stage: f64,
    pub advance: Latency,
    pub advancer: advancer::AdvancerLoad,
}

/// Advance latency (an agent's recorded exit to the next stage's agent start), with where
/// a stage's time goes.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub p50_ms: i64,
    pub p99_ms: i64,
    pub samples: usize,
    /// Mean agent time (started to exit recorded), finalization (exit to claim won) and
    /// next start (claim won to the next agent started), in ms.
    pub agent_ms: f64,
    pub finalize_ms: f64,
    pub start_ms: f64,
}

/// Everything one `baton bench` measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub throughput: Vec<Throughput>,
    /// One task at a time, auto-commit off; `None` with `--latency-tasks 0`.
    pub idle_latency: Option<Latency>,
    pub peak_rss_kib: u64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let (tmp, database) = bench_dir("baton-bench-", args.database_url.as_deref())?;
    let root = tmp.path();
    let mut bench = Bench {
        root: root.to_path_buf(),
        database: database.clone(),
        runs: 0,
    };
    let exe = std::env::current_exe()?;
    let shim = crate::agent::shim_exe_beside(&exe);
    println!(
        "agents start through {} ({})",
        shim.display(),
        if shim == exe {
            "`baton shim`: there is no baton-shim beside baton"
        } else {
            match linked_statically(&shim) {
                Ok(true) => "linked statically",
                Ok(false) => {
                    "linked dynamically: `cargo build-static-shim` builds a static one, to put \
                     in its place"
                }
                Err(_) => "not an ELF program this bench can read",
            }
        }
    );
    let mut throughput = Vec::new();
    // `--tasks 0`: the one-task latency only.
    let slots_runs = if args.tasks == 0 {
        &[][..]
    } else {
        &args.slots[..]
    };
    for &slots in slots_runs {
        let stages = args.tasks * STAGES.len();
        println!("baseline: spawning and reaping `true` {stages} times, {slots} at a time");
        let baseline_per_sec = spawn_baseline(stages, slots).await?;
        println!("  {baseline_per_sec:.1} processes/s");
        for commits in [false, true] {
            println!(
                "baton: {} tasks x {} stages of `true`, {slots} slots, auto-commit {}",
                args.tasks,
                STAGES.len(),
                if commits { "on" } else { "off" }
            );
            let run = bench.node_run(slots, commits, args.tasks, false).await?;
            let t = Throughput {
                slots,
                commits,
                stages: run.stages,
                elapsed: run.elapsed,
                stages_per_sec: run.stages as f64 / run.elapsed.as_secs_f64(),
                baseline_per_sec,
                ratio: run.stages as f64 / run.elapsed.as_secs_f64() / baseline_per_sec,
                cpu_ms_per_stage: run.cpu.as_secs_f64() * 1000.0 / run.stages.max(1) as f64,
                advance: run.latency,
                advancer: run.advancer,
            };
            let (a, l) = (&t.advance, &t.advancer);
            println!(
                "  {:.1} stages/s, ratio {:.3}, baton CPU {:.2} ms/stage, advance p50 {} ms p99 {} ms \
                 (mean per stage: agent {:.1} ms, finalization {:.1} ms, next start {:.1} ms); \
                 the Advancer decided groups of {:.1} claims in {:.1} ms each, busy {:.0}% of the run",
                t.stages_per_sec,
                t.ratio,
                t.cpu_ms_per_stage,
                a.p50_ms,
                a.p99_ms,
                a.agent_ms,
                a.finalize_ms,
                a.start_ms,
                l.mean_group(),
                l.mean_ms(),
                l.busy_percent(t.elapsed),
            );
            throughput.push(t);
        }
    }
    let idle_latency = if args.latency_tasks == 0 {
        None
    } else {
        println!(
            "baton: {} tasks x {} stages, one task at a time, auto-commit off",
            args.latency_tasks,
            STAGES.len()
        );
        Some(
            bench
                .node_run(1, false, args.latency_tasks, true)
                .await?
                .latency,
        )
    };
    let report = BenchReport {
        throughput,
        idle_latency,
        peak_rss_kib: peak_rss_kib(),
    };
    print_report(&report, &database);
    Ok(report)
}

/// A bench's temp folder, with a seeded bare remote (`remote.git`) in it, and its
/// database: `database_url`, else an SQLite file in the folder.
pub(crate) fn bench_dir(
    prefix: &str,
    database_url: Option<&str>,
) -> anyhow::Result<(tempfile::TempDir, String)> {
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let root = tmp.path();
    crate::workspace::seed_remote(&root.join("seed"), &root.join("remote.git"))
        .context("seed the remote")?;
    let database = match database_url {
        Some(url) => url.to_string(),
        None => format!("sqlite://{}?mode=rwc", root.join("bench.db").display()),
    };
    Ok((tmp, database))
}

const STAGES: [&str; 4] = ["s1", "s2", "s3", "s4"];

struct Bench {
    root: std::path::PathBuf,
    database: String,
    /// Node runs so far: each uses task keys and a workspace root of its own.
    runs: usize,
}

struct NodeRun {
    stages: usize,
    elapsed: Duration,
    cpu: Duration,
    latency: Latency,
    advancer: advancer::AdvancerLoad,
}

impl Bench {
    /// Starts a node on `tasks` submitted tasks and waits until they all ended. With
    /// `one_at_a_time`, each task is submitted after the one before ended.
    async fn node_run(
        &mut self,
        slots: usize,
        commits: bool,
        tasks: usize,
        one_at_a_time: bool,
    ) -> anyhow::Result<NodeRun> {
        self.runs += 1;
        let dir = self.root.join(format!("run{}", self.runs));
        std::fs::create_dir_all(&dir)?;
        let command = r#"["true"]"#;
        let config = node_config(
            &dir,
            &self.database,
            slots,
            &self.root,
            &STAGES,
            command,
            commits,
        )?;
        let store = Store::open(&config.database_url).await?;
        let clock = Clock::system();
        let keys: Vec<TaskKey> = (0..tasks)
            .map(|i| TaskKey::parse(format!("BENCH{}-{i}", self.runs)))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        let submit = |key: TaskKey| {
            let (store, config, clock) = (store.clone(), config.clone(), clock.clone());
            async move {
                let request = SubmitRequest::new(key);
                tasks::submit(&store, &config, request, Origin::Cli, clock.now_ms()).await
            }
        };
        if !one_at_a_time {
            for key in &keys {
                submit(key.clone()).await?;
            }
        }
        let (probe, counter) = advancer::Counter::start();
        let cpu_before = cpu_time();
        let started = Instant::now();
        let node = Node::start(
            config.clone(),
            ServeOptions {
                dispatcher_interval: Some(Duration::from_millis(50)),
                probe: Some(probe),
                ..Default::default()
            },
        )
        .await?;
        if one_at_a_time {
            for key in &keys {
                submit(key.clone()).await?;
                wait_idle(&store, None).await?;
            }
        } else {
            wait_idle(&store, Some(tasks)).await?;
        }
        let elapsed = started.elapsed();
        let cpu = cpu_time().saturating_sub(cpu_before);
        node.shutdown().await;
        let advancer = counter.stop();
        let latency = latency(&store, &keys).await?;
        store.close().await;
        Ok(NodeRun {
            stages: tasks * STAGES.len(),
            elapsed,
            cpu,
            latency,
            advancer,
        })
    }
}

/// A node's config for a bench: `stages` in one pipeline, each running `command` (a TOML
/// array), the auto-commit on or off, nothing pushed, on the bench's bare remote.
pub(crate) fn node_config(
    dir: &Path,
    database: &str,
    slots: usize,
    bench_root: &Path,
    stages: &[&str],
    command: &str,
    commits: bool,
) -> anyhow::Result<Config> {
    let names: Vec<String> = stages.iter().map(|s| format!("{s:?}")).collect();
    let mut toml = format!(
        r#"
database_url = "{database}"
max_concurrent_jobs = {slots}
workspace_root = "{ws}"
log_dir = "{logs}"
[repo]
url = "{remote}"
[pipelines.default]
stages = [{names}]
[effects]
push = false
plane_comment = false
[http]
listen = "127.0.0.1:0"
"#,
        ws = dir.join("workspaces").display(),
        logs = dir.join("logs").display(),
        remote = bench_root.join("remote.git").display(),
        names = names.join(", "),
    );
    for s in stages {
        toml.push_str(&format!(
            "[stages.{s}]\ncommand = {command}\ncommit = {commits}\ntimeout = \"24h\"\n"
        ));
    }
    Config::from_toml(&toml, dir, &EnvOverrides::default())
        .map_err(|p| anyhow::anyhow!("bench config: {p:?}"))
}

/// Waits until no job is queued or running (and, with `total`, shows progress).
async fn wait_idle(store: &Store, total: Option<usize>) -> anyhow::Result<()> {
    let mut last_print = Instant::now();
    loop {
        let (queued, running) = store.queue_depth().await?;
        if queued + running == 0 {
            return Ok(());
        }
        if let Some(total) = total
            && last_print.elapsed() > Duration::from_secs(2)
        {
            println!("  {queued} jobs queued, {running} running ({total} tasks)");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Advance latency and the mean phases of a stage, from the events of `keys`' tasks.
async fn latency(store: &Store, keys: &[TaskKey]) -> anyhow::Result<Latency> {
    let mut latencies = Vec::new();
    let (mut agent, mut finalize, mut start) = (Vec::new(), Vec::new(), Vec::new());
    for key in keys {
        let task = store.task_by_key(key).await?;
        let (mut exited, mut started_at, mut won): (Option<i64>, Option<i64>, Option<i64>) =
            (None, None, None);
        for e in store.events(task.id).await? {
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
    let mean = |v: &[i64]| v.iter().sum::<i64>() as f64 / v.len().max(1) as f64;
    latencies.sort_unstable();
    let pct = |p: f64| -> i64 {
        let i = ((latencies.len().max(1) as f64 - 1.0) * p).round() as usize;
        latencies.get(i).copied().unwrap_or(0)
    };
    Ok(Latency {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        samples: latencies.len(),
        agent_ms: mean(&agent),
        finalize_ms: mean(&finalize),
        start_ms: mean(&start),
    })
}

fn print_report(r: &BenchReport, database: &str) {
    let db = if database.starts_with("sqlite") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    println!("\nresults ({db})");
    if !r.throughput.is_empty() {
        println!(
            "  slots  commits  stages  wall     stages/s  raw spawn/s  ratio  baton CPU/stage  advance p50/p99"
        );
    }
    for t in &r.throughput {
        println!(
            "  {:>5}  {:>7}  {:>6}  {:>6.2}s  {:>8.1}  {:>11.1}  {:>5.3}  {:>12.2} ms  {} / {} ms",
            t.slots,
            if t.commits { "on" } else { "off" },
            t.stages,
            t.elapsed.as_secs_f64(),
            t.stages_per_sec,
            t.baseline_per_sec,
            t.ratio,
            t.cpu_ms_per_stage,
            t.advance.p50_ms,
            t.advance.p99_ms
        );
    }
    match &r.idle_latency {
        Some(l) => println!(
            "  one task at a time: advance latency p50 {} ms, p99 {} ms ({} samples); mean per stage: agent {:.1} ms, finalization {:.1} ms, next start {:.1} ms",
            l.p50_ms, l.p99_ms, l.samples, l.agent_ms, l.finalize_ms, l.start_ms
        ),
        None => println!("  one task at a time: not run (--latency-tasks 0)"),
    }
    println!("  peak RSS           {} MiB", r.peak_rss_kib / 1024);
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

/// The CPU time (user + system) this process has used so far.
pub(crate) fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default()
}

/// The peak resident set size of this process (VmHWM), in KiB.
pub(crate) fn peak_rss_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

/// A `kB` figure of `/proc/self/status`.
pub(crate) fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether the ELF program at `path` starts without the dynamic loader: it has no
/// interpreter (`PT_INTERP`) among its program headers.
fn linked_statically(path: &std::path::Path) -> std::io::Result<bool> {
    const PT_INTERP: u64 = 3;
    let elf = std::fs::read(path)?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    // Little-endian ELF64 fields, read from where the header says they are.
    let field = |at: u64, len: usize| -> std::io::Result<u64> {
        let bytes = usize::try_from(at)
            .ok()
            .and_then(|at| elf.get(at..at.checked_add(len)?))
            .ok_or_else(|| bad("cut short"))?;
        Ok(bytes.iter().rev().fold(0, |n, b| n << 8 | u64::from(*b)))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(bad("not a little-endian 64-bit ELF file"));
    }
    // `e_phoff` at 0x20, `e_phentsize` at 0x36, `e_phnum` at 0x38.
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    if phnum == 0 {
        return Err(bad("no program headers: not a program"));
    }
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|off| off.checked_add(phoff))
            .ok_or_else(|| bad("program headers out of range"))?;
        if field(at, 4)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_program_with_an_interpreter_is_linked_dynamically() {
        let dir = tempfile::tempdir().unwrap();
        // Two program headers at 64: a `PT_LOAD`, then a `PT_INTERP` or another `PT_LOAD`.
        let mut elf = vec![0u8; 64 + 2 * 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        elf[64] = 1;
        elf[120] = 3;
        let program = dir.path().join("program");
        std::fs::write(&program, &elf).unwrap();
        assert!(!super::linked_statically(&program).unwrap(), "interpreter");
        elf[120] = 1;
        std::fs::write(&program, &elf).unwrap();
        assert!(super::linked_statically(&program).unwrap(), "none");
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\ntrue\n").unwrap();
        assert!(super::linked_statically(&text).is_err());
        std::fs::write(&text, b"\x7fELF\x02\x01").unwrap();
        assert!(super::linked_statically(&text).is_err(), "cut short");
        // A header whose program headers lie past any address: an error, not an overflow.
        let mut huge = vec![0u8; 64];
        huge[..6].copy_from_slice(b"\x7fELF\x02\x01");
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        huge[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        huge[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        std::fs::write(&text, &huge).unwrap();
        assert!(super::linked_statically(&text).is_err(), "out of range");
        // One without program headers is not a program at all.
        huge[0x38..0x3a].copy_from_slice(&0u16.to_le_bytes());
        std::fs::write(&text, &huge).unwrap();
        assert!(super::linked_statically(&text).is_err(), "no headers");
    }
}

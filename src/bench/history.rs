//! `baton bench --history`: what an operator's reads cost as history grows. It writes
//! `--small` finished tasks (four stages each, with their runs, events and effects), times
//! every read the dashboard, the API and the CLI make, then grows the history to
//! `--large` tasks and times them again, on the same database, in the same run.
//! Reads go through the real HTTP listener and the real `baton` binary.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::clock::Clock;
use crate::config::{Config, EnvOverrides, Secrets};
use crate::store::Store;

pub struct HistoryArgs {
    pub small: usize,
    pub large: usize,
    /// Defaults to an SQLite file in a temp folder.
    pub database_url: Option<String>,
}

/// The reads measured: (what, an HTTP path or `cli:` and the command's arguments).
const READS: [(&str, &str); 6] = [
    ("dashboard poll", "/api/v1/overview"),
    ("task list", "/api/v1/tasks"),
    ("finished tasks", "/api/v1/tasks?status=done&limit=50"),
    ("one task", "/api/v1/tasks/HIST-7"),
    ("baton status", "cli:status"),
    ("baton status KEY", "cli:status HIST-7"),
];
/// Times each read is made; the median counts.
const TRIES: usize = 9;

pub async fn run(args: HistoryArgs) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let tmp = tempfile::Builder::new()
        .prefix("baton-bench-history-")
        .tempdir()?;
    let root = tmp.path();
    let db = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", root.join("bench.db").display()));
    let toml = format!(
        "database_url = \"{db}\"\n[repo]\nurl = \"/nonexistent.git\"\n[pipelines.default]\nstages = [\"s1\", \"s2\", \"s3\", \"s4\"]\n[stages.s1]\ncommand = [\"true\"]\n[stages.s2]\ncommand = [\"true\"]\n[stages.s3]\ncommand = [\"true\"]\n[stages.s4]\ncommand = [\"true\"]\n"
    );
    let config_path = root.join("baton.toml");
    std::fs::write(&config_path, &toml)?;
    let config = Config::from_toml(&toml, root, &EnvOverrides::default())
        .map_err(|p| anyhow::anyhow!("bench config: {p:?}"))?;
    let store = Store::open(&config.database_url).await?;
    let clock = Clock::system();
    // A few active tasks, as a live system has, beside the finished ones.
    for i in 0..5 {
        let key = crate::model::TaskKey::parse(format!("LIVE-{i}")).map_err(anyhow::Error::msg)?;
        let request = crate::tasks::SubmitRequest::new(key);
        crate::tasks::submit(
            &store,
            &config,
            request,
            crate::model::Origin::Cli,
            clock.now_ms(),
        )
        .await?;
    }
    // Only the HTTP listener: no actor moves anything while reads are timed.
    let state = crate::http::HttpState::standalone(
        Arc::new(config),
        store.clone(),
        Secrets::default(),
        clock.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, _) = crate::http::serve(state, "127.0.0.1:0", async {
        let _ = stopped.await;
    })
    .await?;
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    let mut figures = Vec::new();
    let mut written = 0;
    for target in [args.small, args.large] {
        let started = Instant::now();
        println!("writing {} finished tasks ...", target - written);
        let step = 10_000;
        while written < target {
            let n = step.min(target - written);
            store.seed_history(written, n, clock.now_ms()).await?;
            written += n;
            if target > step {
                println!("  {written} of {target}");
            }
        }
        store.analyze().await?;
        println!("  done in {:.1}s", started.elapsed().as_secs_f64());
        let mut row = Vec::new();
        for (what, read) in READS {
            let ms = median_ms(&http, &base, &config_path, read).await?;
            println!("  {what:<18} {ms:>9.1} ms   ({read})");
            row.push(ms);
        }
        figures.push(row);
    }
    let _ = stop.send(());
    println!(
        "\nresults: median of {TRIES} reads, {} finished tasks against {} ({})",
        args.large,
        args.small,
        if db.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        }
    );
    println!(
        "  {:<18} {:>10} {:>10} {:>7}   target",
        "read", "small", "large", "ratio"
    );
    let mut out = Vec::new();
    for (i, (what, _)) in READS.iter().enumerate() {
        let (small, large) = (figures[0][i], figures[1][i]);
        let ratio = large / small.max(0.001);
        let met = ratio <= 2.0 || large < 50.0;
        println!(
            "  {what:<18} {small:>8.1}ms {large:>8.1}ms {ratio:>7.2}   {}",
            if met { "met" } else { "NOT MET" }
        );
        out.push((what.to_string(), small, large));
    }
    store.close().await;
    Ok(out)
}

/// The median time of one read: an HTTP GET of `read`, or the `baton` binary with the
/// arguments after `cli:`.
async fn median_ms(
    http: &reqwest::Client,
    base: &str,
    config: &Path,
    read: &str,
) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(TRIES);
    for _ in 0..TRIES {
        let started = Instant::now();
        if let Some(args) = read.strip_prefix("cli:") {
            let out = tokio::process::Command::new(std::env::current_exe()?)
                .arg("--config")
                .arg(config)
                .args(args.split(' '))
                .env_remove("BATON_DATABASE_URL")
                .env_remove("DATABASE_URL")
                .output()
                .await?;
            anyhow::ensure!(
                out.status.success(),
                "baton {args} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let resp = http.get(format!("{base}{read}")).send().await?;
            anyhow::ensure!(resp.status().is_success(), "GET {read}: {}", resp.status());
            let _ = resp.bytes().await?;
        }
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[TRIES / 2].as_secs_f64() * 1000.0)
}

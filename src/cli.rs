//! The command-line interface. Each command is a thin layer over the library: it loads
//! the config, opens the store and prints what it did, as a table or as JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;

use crate::clock::Clock;
use crate::config::{CONFIG_PATH_DEFAULT, Config, validate_name};
use crate::store::{NewTask, Source, Store, TaskDetail, TaskSummary};

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Drives tasks through pipelines of AI-agent stages, advancing every stage exactly once"
)]
pub struct Cli {
    /// The configuration file.
    #[arg(long, global = true, env = "BATON_CONFIG", default_value = CONFIG_PATH_DEFAULT)]
    pub config: PathBuf,
    /// Log as JSON lines instead of readable text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: migrations, actors and HTTP API; stops cleanly on SIGINT/SIGTERM.
    Serve {
        /// Terminate running agents on shutdown (within shutdown.grace) instead of
        /// leaving them to be adopted by the next start.
        #[arg(long)]
        stop_agents: bool,
    },
    /// Enqueue a task (works whether or not `serve` is running).
    Submit {
        /// The task's key, e.g. ORCH-65: ASCII letters, digits, '-', '_' and '.'.
        key: String,
        #[arg(long, default_value = "default")]
        pipeline: String,
        #[arg(long)]
        title: Option<String>,
        #[arg(long)]
        plane_issue: Option<String>,
    },
    /// Tasks with their jobs and runs.
    Status {
        key: Option<String>,
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// The task's events in order.
    History {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task and kill its agent.
    Cancel { key: String },
    /// Re-queue a failed or cancelled task at the stage where it stopped.
    Retry { key: String },
    /// Apply the database migrations.
    Migrate,
    /// The self-contained tour: a temp dir, SQLite, a git repo with a bare remote and a
    /// 4-stage pipeline of bundled scripted agents (one reviewer rejection included).
    Demo {
        /// Keep the demo's folder instead of deleting it at the end.
        #[arg(long)]
        keep: bool,
    },
    /// Push N tasks through a 4-stage pipeline of `true` agents and print the figures
    /// (stages/s against this machine's raw spawn rate, advance latency, peak RSS).
    Bench {
        #[arg(long, default_value_t = 100)]
        tasks: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Database to use instead of a temp SQLite file (e.g. a scratch PostgreSQL database).
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Starts an agent in its own session and records its exit status (internal).
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        log: PathBuf,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print the effective settings, secrets redacted.
    Check,
}

/// Logging for every command but `serve`, which sets up traces and metrics as well.
pub fn init_tracing(cli: &Cli) {
    // The demo shows its own progress; the service logs what it does.
    let default = match cli.command {
        Command::Demo { .. } | Command::Bench { .. } => "warn",
        _ => "info,sqlx=warn,sea_orm=warn",
    };
    crate::telemetry::init_logs(default, cli.log_json);
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::open(&config.database_url).await?)
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Serve { .. }) {
        init_tracing(&cli);
    }
    let clock = Clock::system();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = load_config(&cli.config)?;
            println!("# {} is valid; effective settings:\n", cli.config.display());
            print!("{}", config.render_effective());
            check_plane_states(&config).await?;
        }
        Command::Migrate => {
            let config = load_config(&cli.config)?;
            let store = Store::connect(&config.database_url).await?;
            let applied = store.migrate().await?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                for m in applied {
                    println!("applied {m}");
                }
            }
        }
        Command::Submit {
            key,
            pipeline,
            title,
            plane_issue,
        } => {
            let config = load_config(&cli.config)?;
            let submitted = submit(
                &config,
                key,
                pipeline,
                title,
                plane_issue,
                Source::Cli,
                &clock,
            )
            .await?;
            println!(
                "submitted {} (pipeline {}, first stage {}, job {})",
                submitted.task.key, submitted.task.pipeline, submitted.job.stage, submitted.job.id
            );
        }
        Command::Status {
            key, watch: true, ..
        } => {
            let config = load_config(&cli.config)?;
            if let Some(key) = &key {
                check_key(key)?;
            }
            let store = open_store(&config).await?;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tick.tick() => {}
                }
                let screen = render_watch(&store, key.as_deref(), &clock).await?;
                // Clear and redraw in place.
                print!("\x1b[2J\x1b[H{screen}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        }
        Command::Status { key, json, .. } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            if let Some(key) = key {
                check_key(&key)?;
                let detail = store.task_detail(&key).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&detail_json(&detail))?);
                } else {
                    print!("{}", render_detail(&detail));
                }
            } else {
                let tasks = store.list_tasks(None).await?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&json!({ "tasks": tasks }))?
                    );
                } else {
                    print!("{}", render_tasks(&tasks));
                }
            }
        }
        Command::History { key, json } => {
            let config = load_config(&cli.config)?;
            check_key(&key)?;
            let store = open_store(&config).await?;
            let task = store.task_by_key(&key).await?;
            let events = store.events(task.id).await?;
            if json {
                let events: Vec<_> = events.iter().map(event_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"task": key, "events": events}))?
                );
            } else {
                for e in &events {
                    println!(
                        "{}  {:<16} {:<10} job={:<5} run={:<5} {}",
                        fmt_time(e.at),
                        e.kind,
                        e.source,
                        e.job_id
                            .map(|j| j.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e.run_id
                            .map(|j| j.to_string())
                            .unwrap_or_else(|| "-".into()),
                        e.detail
                    );
                }
            }
        }
        Command::Cancel { key } => {
            let config = load_config(&cli.config)?;
            check_key(&key)?;
            let store = open_store(&config).await?;
            let runs = store.cancel(&key, Source::Cli, clock.now_ms()).await?;
            println!("cancelled {key}");
            let host = crate::hostname();
            for r in runs {
                match (r.run.pid, r.hostname.as_deref()) {
                    (Some(pid), Some(h)) if h == host => {
                        let alive = crate::agent::alive(pid);
                        crate::agent::terminate_group(pid, crate::agent::AGENT_KILL_GRACE_DEFAULT)
                            .await;
                        println!(
                            "  run {}: agent pid {pid} {}",
                            r.run.id,
                            if alive { "terminated" } else { "already gone" }
                        );
                    }
                    (Some(pid), h) => println!(
                        "  run {}: agent pid {pid} runs on {}; its monitor stops it at its next heartbeat",
                        r.run.id,
                        h.unwrap_or("an unknown host")
                    ),
                    (None, _) => println!("  run {}: no agent started yet", r.run.id),
                }
            }
        }
        Command::Retry { key } => {
            let config = load_config(&cli.config)?;
            check_key(&key)?;
            let store = open_store(&config).await?;
            let job = store.retry(&key, Source::Cli, clock.now_ms()).await?;
            println!(
                "re-queued {key} at stage {} (job {}, iteration {})",
                job.stage, job.id, job.iteration
            );
        }
        Command::Serve { stop_agents } => {
            let config = match load_config(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    init_tracing(&cli);
                    return Err(e);
                }
            };
            let telemetry = crate::telemetry::init_service(&config.telemetry, cli.log_json)?;
            tracing::info!(config = %cli.config.display(), database = %crate::config::redact_url(&config.database_url), "starting");
            crate::service::run(
                config,
                crate::service::ServeOptions {
                    stop_agents,
                    metrics_registry: Some(telemetry.registry.clone()),
                    ..Default::default()
                },
                crate::service::shutdown_signal(),
            )
            .await?;
        }
        Command::Demo { keep } => {
            return crate::demo::run(keep).await;
        }
        Command::Bench {
            tasks,
            concurrency,
            database_url,
        } => {
            crate::bench::run(crate::bench::BenchArgs {
                tasks,
                concurrency,
                database_url,
            })
            .await?;
        }
        Command::Shim { log, argv } => {
            return Ok(ExitCode::from(
                crate::agent::shim_main(&log, &argv).clamp(0, 255) as u8,
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// With Plane configured and reachable, every state name the config uses must exist in
/// the project; when Plane cannot be asked, says so and goes on.
async fn check_plane_states(config: &Config) -> anyhow::Result<()> {
    let Some(plane) = &config.plane else {
        return Ok(());
    };
    let secrets = crate::config::Secrets::from_env(config);
    let Some(key) = secrets.plane_api_key.as_deref() else {
        println!(
            "# ${} is not set: Plane state names were not checked",
            plane.api_key_env
        );
        return Ok(());
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let states = match crate::effects::plane::list_states(&http, plane, key).await {
        Ok(states) => states,
        Err(e) => {
            println!(
                "# Plane at {} could not be asked ({e}): state names were not checked",
                plane.api_url
            );
            return Ok(());
        }
    };
    let names: Vec<&str> = states.iter().map(|s| s.name.as_str()).collect();
    let wanted = [
        ("plane.trigger_state", plane.trigger_state.as_deref()),
        ("plane.states.on_start", plane.states.on_start.as_deref()),
        ("plane.states.on_done", plane.states.on_done.as_deref()),
        ("plane.states.on_failed", plane.states.on_failed.as_deref()),
    ];
    let missing: Vec<String> = wanted
        .iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .filter(|(_, v)| !names.iter().any(|n| n.eq_ignore_ascii_case(v)))
        .map(|(k, v)| format!("  - {k}: Plane has no state named {v:?}"))
        .collect();
    if missing.is_empty() {
        println!(
            "# Plane state names checked against the project: all {} exist",
            names.len()
        );
        return Ok(());
    }
    anyhow::bail!(
        "unknown Plane state names (the project has: {}):\n{}",
        names.join(", "),
        missing.join("\n")
    )
}

/// Validates and submits a task: the key, the pipeline and its first stage are checked
/// against the config before anything is written.
pub async fn submit(
    config: &Config,
    key: String,
    pipeline: String,
    title: Option<String>,
    plane_issue: Option<String>,
    source: Source,
    clock: &Clock,
) -> anyhow::Result<crate::store::Submitted> {
    check_key(&key)?;
    let first_stage = config
        .pipeline(&pipeline)
        .map_err(anyhow::Error::msg)?
        .stages
        .first()
        .cloned()
        .with_context(|| format!("pipeline {pipeline} has no stages"))?;
    let store = open_store(config).await?;
    let submitted = store
        .submit(
            NewTask {
                title: title.unwrap_or_else(|| key.clone()),
                key,
                pipeline,
                plane_issue_id: plane_issue,
                first_stage,
                trace_parent: None,
            },
            source,
            clock.now_ms(),
        )
        .await?;
    Ok(submitted)
}

fn check_key(key: &str) -> anyhow::Result<()> {
    validate_name(key).map_err(|msg| anyhow::anyhow!("invalid task key: {msg}"))
}

pub fn fmt_time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn event_json(e: &entity::events::Model) -> serde_json::Value {
    json!({
        "id": e.id, "at": e.at, "kind": e.kind, "source": e.source,
        "job_id": e.job_id, "run_id": e.run_id,
        "detail": serde_json::from_str::<serde_json::Value>(&e.detail).unwrap_or(json!(e.detail)),
    })
}

pub fn detail_json(d: &TaskDetail) -> serde_json::Value {
    json!({
        "task": d.task, "jobs": d.jobs, "runs": d.runs, "effects": d.effects,
        "events": d.events.iter().map(event_json).collect::<Vec<_>>(),
    })
}

/// The stage a task is at: its newest job.
fn current_job(jobs: &[entity::jobs::Model]) -> Option<&entity::jobs::Model> {
    jobs.iter().max_by_key(|j| j.id)
}

/// One screen of `status --watch`: the tasks (or one task), then the running agents.
pub async fn render_watch(
    store: &Store,
    key: Option<&str>,
    clock: &Clock,
) -> anyhow::Result<String> {
    let now = clock.now_ms();
    let mut out = format!("baton status -- {} (Ctrl-C to stop)\n\n", fmt_time(now));
    match key {
        Some(key) => out.push_str(&render_detail(&store.task_detail(key).await?)),
        None => out.push_str(&render_tasks(&store.list_tasks(None).await?)),
    }
    let running = store.running_jobs().await?;
    let running: Vec<_> = running
        .into_iter()
        .filter(|r| key.is_none_or(|k| r.task.key == k))
        .collect();
    out.push_str(&format!("\nrunning agents: {}\n", running.len()));
    for r in &running {
        if let Some(run) = &r.run {
            out.push_str(&format!(
                "  {:<20} {:<12} run {:<6} pid {:<7} age {}{}\n",
                r.task.key,
                r.job.stage,
                run.id,
                run.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                humantime::format_duration(Duration::from_secs(
                    ((now - run.started_at).max(0) / 1000) as u64
                )),
                if run.exited_at.is_some() {
                    " (finalizing)"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(out)
}

pub fn render_tasks(tasks: &[TaskSummary]) -> String {
    if tasks.is_empty() {
        return "no tasks; submit one with `baton submit KEY`\n".to_string();
    }
    let mut out = format!(
        "{:<20} {:<10} {:<10} {:<24} {}\n",
        "TASK", "PIPELINE", "STATUS", "STAGE", "UPDATED"
    );
    for t in tasks {
        let stage = current_job(&t.jobs)
            .map(|j| {
                format!(
                    "{}#{} {} (attempt {})",
                    j.stage, j.iteration, j.status, j.attempt
                )
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<20} {:<10} {:<10} {:<24} {}\n",
            t.task.key,
            t.task.pipeline,
            t.task.status,
            stage,
            fmt_time(t.task.updated_at)
        ));
    }
    out
}

pub fn render_detail(d: &TaskDetail) -> String {
    let t = &d.task;
    let mut out = format!(
        "{} ({}) pipeline={} status={} created={}\n",
        t.key,
        t.title,
        t.pipeline,
        t.status,
        fmt_time(t.created_at)
    );
    if let Some(p) = &t.plane_issue_id {
        out.push_str(&format!("  plane issue: {p}\n"));
    }
    out.push_str("  jobs:\n");
    for j in &d.jobs {
        out.push_str(&format!(
            "    #{:<5} {:<12} iter {:<2} {:<10} attempt {}\n",
            j.id, j.stage, j.iteration, j.status, j.attempt
        ));
        for r in d.runs.iter().filter(|r| r.job_id == j.id) {
            out.push_str(&format!(
                "           run {:<5} attempt {} pid {:<7} exit {:<4} outcome {:<9} commit {} log {}\n",
                r.id,
                r.attempt,
                r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                r.exit_code.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                r.outcome.as_deref().unwrap_or("-"),
                r.commit_sha.as_deref().map(|s| &s[..s.len().min(10)]).unwrap_or("-"),
                r.log_path
            ));
        }
    }
    if !d.effects.is_empty() {
        out.push_str("  effects:\n");
        for e in &d.effects {
            out.push_str(&format!(
                "    #{:<5} {:<14} {:<8} attempts {} {}{}\n",
                e.id,
                e.kind,
                e.status,
                e.attempts,
                e.external_ref.as_deref().unwrap_or(""),
                e.last_error
                    .as_deref()
                    .map(|s| format!(" last error: {s}"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

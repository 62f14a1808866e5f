//! The command-line interface. Each command is a thin layer over the library: it loads
//! the config, opens the store and prints what it did, as a table or as JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::clock::Clock;
use crate::config::{CONFIG_PATH_DEFAULT, Config};
use crate::model::{Origin, TaskKey};
use crate::present;
use crate::store::Store;
use crate::tasks::{self, AgentStop, EffectsToRetry, SubmitRequest};

mod check;
mod status;

use check::{check_orphans, check_plane_states, check_remote};
pub use status::render_watch;
use status::status_tasks;

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
        /// What to do with in-flight tasks whose pipeline or stage the config no longer
        /// has: refuse to start (the default), or fail them with a reason.
        #[arg(long, value_enum, default_value_t)]
        orphaned: crate::service::OrphanPolicy,
    },
    /// Enqueue a task (works whether or not `serve` is running).
    Submit {
        /// The task's key, e.g. ORCH-65: ASCII letters, digits, '-', '_' and '.'.
        key: TaskKey,
        /// The pipeline to run (default: `default`).
        #[arg(long)]
        pipeline: Option<String>,
        /// The task's title (default: its key).
        #[arg(long)]
        title: Option<String>,
        /// What the task is about, shown to agents as `task.description` (at most 64 KiB).
        #[arg(long, conflicts_with = "description_file")]
        description: Option<String>,
        /// Read the description from a file; `-` reads standard input.
        #[arg(long, value_name = "PATH")]
        description_file: Option<PathBuf>,
        /// The Plane work item (its UUID) that the task reports to.
        #[arg(long)]
        plane_issue: Option<String>,
        /// Print the new task and its first job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tasks with their jobs and runs.
    Status {
        /// One task's jobs, runs and effects instead of the table of tasks.
        key: Option<TaskKey>,
        /// Print JSON instead of text.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Every task, not only the active ones and the last 20 others.
        #[arg(long, conflicts_with = "key")]
        all: bool,
    },
    /// The task's events in order.
    History {
        /// The task's key, e.g. ORCH-65.
        key: TaskKey,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a task and kill its agent.
    Cancel {
        /// The task's key, e.g. ORCH-65.
        key: TaskKey,
        /// Print what was cancelled as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-queue a failed or cancelled task at the stage where it stopped (or deliver its
    /// work again, when only its push or pull request failed).
    Retry {
        /// The task's key, e.g. ORCH-65.
        key: TaskKey,
        /// Print the new job (or the delivery retried) as JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// (stages/s against this machine's raw spawn rate, baton's CPU time per stage,
    /// advance latency, peak RSS), for each number of slots, auto-commit off and on.
    Bench {
        /// How many tasks to push through (0: only the one-task latency below).
        #[arg(long, default_value_t = 100)]
        tasks: usize,
        /// Agents run at once (max_concurrent_jobs): one measure for each.
        #[arg(long, alias = "concurrency", value_delimiter = ',', default_values_t = [2, 8])]
        slots: Vec<usize>,
        /// Tasks pushed one at a time through an idle node, for advance latency.
        #[arg(long, default_value_t = 25)]
        latency_tasks: usize,
        /// Measure instead what supervising N sleeping agents costs a node (CPU, memory).
        #[arg(long, conflicts_with_all = ["large_repo", "history"])]
        idle: Option<usize>,
        /// With --idle: how long the node is watched once every agent runs.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "idle")]
        window: std::time::Duration,
        /// Database to use instead of a temp SQLite file (e.g. a scratch PostgreSQL database).
        #[arg(long)]
        database_url: Option<String>,
        /// Measure instead what a task's checkout costs on a large generated repository:
        /// a clone per task against the mirror and a worktree per task.
        #[arg(long)]
        large_repo: bool,
        /// With --large-repo: the generated repository's commits.
        #[arg(long, default_value_t = 20_000, requires = "large_repo")]
        commits: usize,
        /// With --large-repo: KiB of incompressible data each commit adds.
        #[arg(long, default_value_t = 10, requires = "large_repo")]
        blob_kib: usize,
        /// With --large-repo: the tasks measured after the first.
        #[arg(long, default_value_t = 10, requires = "large_repo")]
        later_tasks: usize,
        /// Measure instead what the dashboard's, the API's and the CLI's reads cost with
        /// --small and then --large finished tasks in the database.
        #[arg(long, conflicts_with = "large_repo")]
        history: bool,
        /// With --history: the finished tasks of the first measure.
        #[arg(long, default_value_t = 1_000, requires = "history")]
        small: usize,
        /// With --history: the finished tasks of the second measure.
        #[arg(long, default_value_t = 100_000, requires = "history")]
        large: usize,
    },
    /// Remove the worktrees and run logs of tasks that ended longer ago than
    /// `[retention]` keeps them, and garbage-collect the mirror; prints what it removed
    /// and the space freed. Nothing of an active task is touched.
    Gc {
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The effects outbox.
    Effects {
        #[command(subcommand)]
        command: EffectsCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum EffectsCommand {
    /// Make failed effects pending again once their cause is fixed (a token, a branch
    /// protection): one by its id, or every failed effect of a task.
    Retry {
        /// The effect's id (see `baton status KEY`).
        #[arg(required_unless_present = "task", conflicts_with = "task")]
        id: Option<i64>,
        /// Every failed effect of this task.
        #[arg(long)]
        task: Option<TaskKey>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and print the effective settings, secrets redacted.
    Check {
        /// Also reach repo.url with the configured credentials (an ls-remote, within
        /// repo.network_timeout) and say exactly what failed.
        #[arg(long)]
        remote: bool,
        /// Print the effective settings (secrets redacted) as JSON; the further checks
        /// (remote, Plane states, in-flight tasks) then write to standard error.
        #[arg(long)]
        json: bool,
    },
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

/// The database of a command that reads or writes tasks: its schema must be this
/// version's; only `migrate` and `serve` change it.
async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(Store::open_current(&config.database_url).await?)
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Serve { .. }) {
        init_tracing(&cli);
    }
    let clock = Clock::system();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { remote, json },
        } => {
            let config = load_config(&cli.config)?;
            if json {
                let doc = json!({"valid": true, "path": cli.config, "effective": config.effective_json()});
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("# {} is valid; effective settings:\n", cli.config.display());
                print!("{}", config.render_effective());
            }
            if remote {
                check_remote(&config, json).await?;
            }
            check_plane_states(&config, json).await?;
            check_orphans(&config, json).await?;
        }
        Command::Migrate => {
            let config = load_config(&cli.config)?;
            let store =
                Store::connect_with(&config.database_url, crate::store::COMMAND_CONNECT_TIMEOUT)
                    .await?;
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
            description,
            description_file,
            plane_issue,
            json: as_json,
        } => {
            let config = load_config(&cli.config)?;
            let description = match description_file {
                Some(path) => Some(read_description(&path)?),
                None => description,
            };
            let store = open_store(&config).await?;
            let request = SubmitRequest {
                key,
                pipeline,
                title,
                description,
                plane_issue_id: plane_issue,
            };
            let submitted =
                tasks::submit(&store, &config, request, Origin::Cli, clock.now_ms()).await?;
            if as_json {
                let doc = json!({"task": submitted.task, "job": submitted.job});
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "submitted {} (pipeline {}, first stage {}, job {})",
                submitted.task.key, submitted.task.pipeline, submitted.job.stage, submitted.job.id
            );
        }
        Command::Status {
            key, watch: true, ..
        } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tick.tick() => {}
                }
                let screen = render_watch(&store, key.as_ref(), &clock).await?;
                use std::io::{IsTerminal, Write};
                let mut out = std::io::stdout().lock();
                // A terminal is redrawn in place; a pipe or a file gets one screen after
                // another, without screen codes.
                let clear = if out.is_terminal() {
                    "\x1b[2J\x1b[H"
                } else {
                    "\n"
                };
                // A reader that went away (`| head`) ends the watch; it is not an error.
                if write!(out, "{clear}{screen}")
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
        Command::Status { key, json, all, .. } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            if let Some(key) = key {
                let detail = store.task_detail(&key).await?;
                if json {
                    let doc = present::detail_json(&detail, clock.now_ms());
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    print!("{}", present::render_detail(&detail, clock.now_ms()));
                }
            } else {
                let tasks = status_tasks(&store, all).await?;
                if json {
                    let doc = json!({ "tasks": tasks });
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    print!("{}", present::render_tasks(&tasks));
                }
            }
        }
        Command::History { key, json } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            let task = store.task_by_key(&key).await?;
            let events = store.events(task.id).await?;
            if json {
                let doc = present::history_json(key.as_str(), &events);
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", present::render_history(&events));
            }
        }
        Command::Cancel { key, json: as_json } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            let host = config.node.host();
            let cancelled = tasks::cancel(&store, &key, Origin::Cli, clock.now_ms(), &host).await?;
            if as_json {
                let runs: Vec<_> = cancelled
                    .runs
                    .iter()
                    .map(|(run_id, stop)| json!({"run_id": run_id, "stop": stop}))
                    .collect();
                let doc = json!({"task": key, "status": "cancelled", "runs": runs});
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("cancelled {key}");
            for (run_id, stop) in cancelled.runs {
                match stop {
                    AgentStop::Terminated { pid } => {
                        println!("  run {run_id}: agent pid {pid} terminated")
                    }
                    AgentStop::AlreadyGone { pid } => {
                        println!("  run {run_id}: agent pid {pid} already gone")
                    }
                    AgentStop::OtherHost { pid, host } => println!(
                        "  run {run_id}: agent pid {pid} runs on {}; its monitor stops it at its next heartbeat",
                        host.as_deref().unwrap_or("an unknown host")
                    ),
                    AgentStop::NotStarted => println!("  run {run_id}: no agent started yet"),
                }
            }
        }
        Command::Retry { key, json: as_json } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            let retried = tasks::retry(&store, &key, Origin::Cli, clock.now_ms()).await?;
            if as_json {
                let doc = match &retried {
                    crate::store::Retried::Job(job) => json!({"task": key, "job": job}),
                    crate::store::Retried::Delivery { effects, status } => json!({
                        "task": key, "delivery": {"effects_retried": effects, "status": status}
                    }),
                };
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(ExitCode::SUCCESS);
            }
            match retried {
                crate::store::Retried::Job(job) => println!(
                    "re-queued {key} at stage {} (job {}, iteration {})",
                    job.stage, job.id, job.iteration
                ),
                crate::store::Retried::Delivery { effects, status } => println!(
                    "{key}'s pipeline had ended: {effects} push(es) and pull request(s) made pending again; the task is {status}{}",
                    if status == crate::model::TaskStatus::Active {
                        " until they are done"
                    } else {
                        ""
                    }
                ),
            }
        }
        Command::Gc { dry_run, json } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            let mut report =
                crate::retention::run_once(&store, &config, clock.now_ms(), dry_run, true).await?;
            // The database's history goes in batches: passes until one removes less.
            let mut last = report.history;
            while !dry_run && last.tasks == crate::retention::HISTORY_BATCH {
                let more =
                    crate::retention::run_once(&store, &config, clock.now_ms(), false, false)
                        .await?;
                last = more.history;
                let h = &mut report.history;
                h.tasks += last.tasks;
                h.events += last.events;
                h.runs += last.runs;
                h.effects += last.effects;
                h.deliveries += last.deliveries;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            if !report.errors.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Effects {
            command: EffectsCommand::Retry { id, task },
        } => {
            let config = load_config(&cli.config)?;
            let store = open_store(&config).await?;
            let which = match (id, task) {
                (Some(id), _) => EffectsToRetry::One(id),
                (None, Some(key)) => EffectsToRetry::OfTask(key),
                (None, None) => anyhow::bail!("name an effect id or --task KEY"),
            };
            let retried = tasks::retry_effects(&store, which, Origin::Cli, clock.now_ms()).await?;
            if retried.is_empty() {
                println!("no failed effect to retry");
            }
            for e in retried {
                println!("effect {} ({}) is pending again", e.id, e.kind);
            }
        }
        Command::Serve {
            stop_agents,
            orphaned,
        } => {
            let config = match load_config(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    init_tracing(&cli);
                    return Err(e);
                }
            };
            let telemetry = crate::telemetry::init_service(&config.telemetry, cli.log_json)?;
            tracing::info!(config = %cli.config.display(), database = %crate::store::redact_url(&config.database_url), "starting");
            crate::service::run(
                config,
                crate::service::ServeOptions {
                    stop_agents,
                    orphaned,
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
            history: true,
            small,
            large,
            database_url,
            ..
        } => {
            let args = crate::bench::history::HistoryArgs {
                small,
                large: large.max(small),
                database_url,
            };
            crate::bench::history::run(args).await?;
        }
        Command::Bench {
            large_repo: true,
            commits,
            blob_kib,
            later_tasks,
            ..
        } => {
            let args = crate::bench::workspaces::LargeRepoArgs {
                commits,
                blob_kib,
                later_tasks,
            };
            crate::bench::workspaces::run(args).await?;
        }
        Command::Bench {
            idle: Some(agents),
            window,
            database_url,
            ..
        } => {
            let args = crate::bench::idle::IdleArgs {
                agents,
                window,
                database_url,
            };
            crate::bench::idle::run(args).await?;
        }
        Command::Bench {
            tasks,
            slots,
            latency_tasks,
            database_url,
            ..
        } => {
            crate::bench::run(crate::bench::BenchArgs {
                tasks,
                slots,
                latency_tasks,
                database_url,
            })
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A description from a file, or from standard input for `-`.
fn read_description(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the description from standard input")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the description from {}", path.display()))?;
    }
    Ok(text)
}

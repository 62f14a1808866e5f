//! `baton demo`: the self-contained tour. It builds a temp folder with an SQLite
//! database, a bare git remote with a first commit, four scripted agents and a config;
//! submits one task and runs a node until the task ends, showing every event as it
//! happens, then prints a summary of stages, runs, commits and the history.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use git2::Repository;

use crate::clock::Clock;
use crate::config::{Config, EnvOverrides};
use crate::model::{EffectStatus, EventKind, Origin, RunOutcome, TaskKey, TaskStatus};
use crate::service::{Node, ServeOptions};
use crate::tasks::{self, SubmitRequest};
use crate::workspace::seed_remote;

const DEMO_TASK: &str = "DEMO-1";
/// The demo gives up after this long.
const DEMO_DEADLINE: Duration = Duration::from_secs(180);

const AGENT_SCRIPT: &str = r#"#!/bin/sh
# A scripted stand-in for a coding agent: it writes what its stage produces.
set -e
dir="docs/$BATON_TASK"
mkdir -p "$dir" src
echo "[$BATON_STAGE] run $BATON_RUN_ID, attempt $BATON_ATTEMPT, iteration $BATON_ITERATION"
echo "[$BATON_STAGE] my prompt ($BATON_PROMPT_FILE):"
sed 's/^/  | /' "$BATON_PROMPT_FILE"
sleep 0.3
case "$BATON_STAGE" in
  analyst)   printf '# Analysis of %s\n\nThe ticket asks for a greeting.\n' "$BATON_TASK" > "$dir/analysis.md" ;;
  architect) printf '# Design of %s\n\nOne function, greet(), in src/greet.sh.\n' "$BATON_TASK" > "$dir/design.md" ;;
  developer)
    if [ "$BATON_ITERATION" = "1" ]; then
      printf '#!/bin/sh\necho hello\n' > src/greet.sh
    else
      printf '#!/bin/sh\necho "hello, ${1:-world}"\n' > src/greet.sh
    fi ;;
  reviewer)
    if grep -q 'world' src/greet.sh; then
      printf 'APPROVED\n' > "$dir/review.md"
    else
      printf 'CHANGES_REQUESTED: greet() must take a name\n' > "$dir/review.md"
    fi ;;
esac
echo "[$BATON_STAGE] done"
"#;

/// The prompt every demo stage renders: the ticket, where to work, and the feedback of
/// a rejection or a failed attempt.
const PROMPT_TEMPLATE: &str = r#"You are the {{ stage }} of {{ task.key }}: {{ task.title }}.

{{ task.description }}

Work on branch {{ branch }} in {{ workspace }} (iteration {{ iteration }}, attempt {{ attempt }}).
{% if feedback %}
Feedback to address first:
{{ feedback }}
{% endif %}"#;

/// Runs the demo; exit code 0 when the demo task is done.
pub async fn run(keep: bool) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new().prefix("baton-demo-").tempdir()?;
    let root = tmp.path().to_path_buf();
    println!("baton demo in {}", root.display());
    let config = setup(&root)?;
    println!("  database   {}", config.database_url);
    println!("  remote     {}", config.repo.url);
    println!(
        "  pipeline   analyst -> architect -> developer -> reviewer (reviewer rejects once)\n"
    );

    let clock = Clock::system();
    let node = Node::start(
        config.clone(),
        ServeOptions {
            dispatcher_interval: Some(Duration::from_millis(100)),
            ..Default::default()
        },
    )
    .await?;
    let store = node.store.clone();
    let key = TaskKey::parse(DEMO_TASK).map_err(anyhow::Error::msg)?;
    let request = SubmitRequest {
        title: Some("Add a greeting".into()),
        description: Some(
            "The app needs greet(), which greets the person it is given by name.".into(),
        ),
        ..SubmitRequest::new(key.clone())
    };
    let submitted = tasks::submit(&store, &config, request, Origin::Cli, clock.now_ms()).await?;

    // Live progress: every event as it is written.
    let started = tokio::time::Instant::now();
    let mut shown = 0usize;
    let final_status = loop {
        let events = store.events(submitted.task.id).await?;
        print_events(&events[shown..], started);
        shown = events.len();
        let task = store.task(submitted.task.id).await?;
        if task.status != TaskStatus::Active {
            break task.status.to_string();
        }
        if started.elapsed() > DEMO_DEADLINE {
            break format!("still {} after {}s", task.status, DEMO_DEADLINE.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Let the outbox drain (the pushes of the last stages) before stopping.
    let drain_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < drain_deadline {
        let detail = store.task_detail(&key).await?;
        if !detail
            .effects
            .iter()
            .any(|e| e.status == EffectStatus::Pending)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = store.events(submitted.task.id).await?;
    print_events(&events[shown.min(events.len())..], started);
    node.shutdown().await;

    // Summary.
    let detail = store.task_detail(&key).await?;
    println!("\n== summary\n");
    print!(
        "{}",
        crate::present::render_detail(&detail, crate::clock::Clock::system().now_ms())
    );
    // The developer's second iteration was told what the reviewer wrote.
    if let Some(r) = detail
        .jobs
        .iter()
        .filter(|j| j.stage == "developer" && j.iteration == 2)
        .flat_map(|j| detail.runs.iter().filter(move |r| r.job_id == j.id))
        .find(|r| r.prompt.is_some())
    {
        println!("\n  the prompt of developer iteration 2 (run {}):", r.id);
        for line in r.prompt.as_deref().unwrap_or_default().lines() {
            println!("    | {line}");
        }
    }
    println!("\n  commits on baton/{DEMO_TASK}:");
    let ws = config.workspace_root.join(DEMO_TASK);
    for line in git_log(&ws).unwrap_or_default() {
        println!("    {line}");
    }
    let count = |k: EventKind| detail.events.iter().filter(|e| e.kind == k).count();
    println!(
        "\n  {} events: {} runs started, {} claims won, {} lost, {} advances, {} rejection loop(s)",
        detail.events.len(),
        count(EventKind::RunStarted),
        count(EventKind::ClaimWon),
        count(EventKind::ClaimLost),
        count(EventKind::JobAdvanced),
        detail
            .runs
            .iter()
            .filter(|r| r.outcome == Some(RunOutcome::Rejected))
            .count(),
    );
    store.close().await;
    if keep {
        let kept = tmp.keep();
        println!("\n  kept {}", kept.display());
    }
    if final_status == TaskStatus::Done.as_str() {
        println!("\ndemo task {DEMO_TASK} is done");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("\ndemo task {DEMO_TASK} did not finish: {final_status}; see the events above");
        Ok(ExitCode::FAILURE)
    }
}

/// Live progress: one line an event, with the time since the start.
fn print_events(events: &[entity::events::Model], started: tokio::time::Instant) {
    for e in events {
        println!(
            "  {:>6.1}s  {:<17} {:<10} {}",
            started.elapsed().as_secs_f32(),
            e.kind,
            e.source,
            e.detail
        );
    }
}

/// Writes the demo's repository, agents and config below `root`.
fn setup(root: &Path) -> anyhow::Result<Config> {
    let remote = root.join("remote.git");
    seed_remote(&root.join("seed"), &remote).context("create the demo's git remote")?;
    let agent = root.join("agents").join("agent.sh");
    std::fs::create_dir_all(agent.parent().unwrap_or(root))?;
    std::fs::write(&agent, AGENT_SCRIPT)?;
    std::fs::create_dir_all(root.join("prompts"))?;
    std::fs::write(root.join("prompts").join("stage.md"), PROMPT_TEMPLATE)?;
    let toml = format!(
        r#"
database_url = "sqlite://{db}?mode=rwc"
workspace_root = "workspaces"
log_dir = "logs"
max_concurrent_jobs = 2

[reaper]
interval = "1s"
finalize_grace = "30s"
heartbeat_timeout = "10s"

[node]
heartbeat_interval = "1s"

[retry]
max_attempts = 2
backoff_initial = "1s"

[repo]
url = "{remote}"
base_branch = "main"
branch_prefix = "baton/"

[pipelines.default]
stages = ["analyst", "architect", "developer", "reviewer"]
max_iterations = 3

[stages.analyst]
command = ["sh", "{agent}"]
prompt_file = "prompts/stage.md"
timeout = "1m"
gate.artifacts = ["docs/{{task}}/analysis.md"]

[stages.architect]
command = ["sh", "{agent}"]
prompt_file = "prompts/stage.md"
timeout = "1m"
gate.artifacts = ["docs/{{task}}/design.md"]

[stages.developer]
command = ["sh", "{agent}"]
prompt_file = "prompts/stage.md"
timeout = "1m"
gate.command = ["sh", "-n", "src/greet.sh"]

[stages.reviewer]
command = ["sh", "{agent}"]
prompt_file = "prompts/stage.md"
timeout = "1m"
on_reject = "developer"
gate.verdict = {{ file = "docs/{{task}}/review.md", approve = "APPROVED", reject = "CHANGES_REQUESTED" }}

[effects]
push = true
plane_comment = false

[http]
listen = "127.0.0.1:0"
"#,
        db = root.join("baton.db").display(),
        remote = remote.display(),
        agent = agent.display(),
    );
    let path = root.join("baton.toml");
    std::fs::write(&path, &toml)?;
    Config::from_toml(&toml, root, &EnvOverrides::default()).map_err(|problems| {
        anyhow::anyhow!(
            "the demo's config is invalid: {}",
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

fn git_log(ws: &Path) -> Option<Vec<String>> {
    let repo = Repository::open(ws).ok()?;
    let mut walk = repo.revwalk().ok()?;
    walk.push_head().ok()?;
    let mut out = Vec::new();
    for id in walk.flatten() {
        let c = repo.find_commit(id).ok()?;
        out.push(format!(
            "{} {}",
            &id.to_string()[..10],
            c.summary().ok().flatten().unwrap_or("")
        ));
    }
    Some(out)
}

//! Presentation: the JSON documents and terminal renderings of tasks, shared by the CLI,
//! the HTTP API and the demo. Pure functions of what the store returned.

use std::time::{Duration, UNIX_EPOCH};

use entity::{effects, events, jobs};
use serde_json::{Value, json};

use crate::model::{EffectStatus, Usage};
use crate::store::{RunningJob, TaskDetail, TaskSummary};

/// A timestamp (ms since the epoch) as RFC 3339, to the second.
pub fn fmt_time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// An event with its detail as JSON rather than JSON text.
pub fn event_json(e: &events::Model) -> Value {
    json!({
        "id": e.id, "at": e.at, "kind": e.kind, "source": e.source,
        "job_id": e.job_id, "run_id": e.run_id,
        "detail": serde_json::from_str::<Value>(&e.detail).unwrap_or(json!(e.detail)),
    })
}

/// The usage of a task's runs, summed.
pub fn task_usage(d: &TaskDetail) -> Usage {
    d.runs
        .iter()
        .fold(Usage::default(), |sum, r| sum.plus(Usage::of_run(r)))
}

/// What a pending effect waits for, and since when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EffectWait {
    /// `effect`, `attempt`, `backoff`, `host` or `worker`.
    pub on: &'static str,
    /// In words: `effect #12 (push)`, `host host-b, which has the commit`, ...
    pub what: String,
    /// Since when (ms since the epoch).
    pub since: i64,
}

/// What the pending effect `e` of a task waits for at `now`: an earlier effect of the
/// task (effects of one task run in order), an attempt under way, a backoff after a
/// failed attempt, the one host that can perform it, or a free worker.
pub fn effect_wait(e: &effects::Model, all: &[effects::Model], now: i64) -> Option<EffectWait> {
    if e.status != EffectStatus::Pending {
        return None;
    }
    let earlier = all
        .iter()
        .find(|o| o.id < e.id && o.task_id == e.task_id && o.status == EffectStatus::Pending);
    let (on, what, since) = if let Some(o) = earlier {
        (
            "effect",
            format!("effect #{} ({}) before it", o.id, o.kind),
            e.created_at,
        )
    } else if let (Some(node), true) = (&e.leased_by, e.next_attempt_at > now) {
        (
            "attempt",
            format!("attempt {} under way on node {node}", e.attempts),
            e.updated_at,
        )
    } else if e.next_attempt_at > now {
        let after = e.last_error.as_deref().unwrap_or("a failed attempt");
        let what = format!(
            "backoff until {} after: {after}",
            fmt_time(e.next_attempt_at)
        );
        ("backoff", what, e.updated_at)
    } else if let Some(host) = &e.host {
        let what = format!("host {host}, the only one with the stage's commit");
        ("host", what, e.created_at)
    } else {
        ("worker", "a free effect worker".to_string(), e.created_at)
    };
    Some(EffectWait { on, what, since })
}

/// Why a run did not pass, as its winning claim recorded it (the verdict's reason).
pub fn run_reason(d: &TaskDetail, run_id: i64) -> Option<String> {
    d.events
        .iter()
        .filter(|e| e.kind == crate::model::EventKind::ClaimWon && e.run_id == Some(run_id))
        .find_map(|e| {
            let detail: Value = serde_json::from_str(&e.detail).ok()?;
            detail["verdict"]["reason"].as_str().map(str::to_string)
        })
}

/// Why the task failed, as its last `task_failed` event says.
pub fn failure_reason(d: &TaskDetail) -> Option<String> {
    if d.task.status != crate::model::TaskStatus::Failed {
        return None;
    }
    d.events
        .iter()
        .rev()
        .find(|e| e.kind == crate::model::EventKind::TaskFailed)
        .and_then(|e| {
            let detail: Value = serde_json::from_str(&e.detail).ok()?;
            detail["reason"].as_str().map(str::to_string)
        })
}

/// The document of one task: `baton status KEY --json` and `GET /api/v1/tasks/{key}`.
/// Each run carries its prompt and usage; `usage` is the task's total; each pending
/// effect says what it waits for.
pub fn detail_json(d: &TaskDetail, now: i64) -> Value {
    let effects: Vec<Value> = d
        .effects
        .iter()
        .map(|e| {
            let mut v = json!(e);
            v["waiting"] = json!(effect_wait(e, &d.effects, now));
            v
        })
        .collect();
    let runs: Vec<Value> = d
        .runs
        .iter()
        .map(|r| {
            let mut v = json!(r);
            v["reason"] = json!(run_reason(d, r.id));
            v
        })
        .collect();
    json!({
        "task": d.task, "jobs": d.jobs, "runs": runs, "effects": effects,
        "failure": failure_reason(d),
        "usage": task_usage(d),
        "events": d.events.iter().map(event_json).collect::<Vec<_>>(),
    })
}

/// A usage in a few words: `12.3k in, 456 out, $0.0123, 4 turns`; empty when unknown.
pub fn fmt_usage(u: Usage) -> String {
    let tokens = |n: i64| {
        if n >= 10_000 {
            format!("{:.1}k", n as f64 / 1000.0)
        } else {
            n.to_string()
        }
    };
    let mut parts = Vec::new();
    if let Some(n) = u.tokens_in {
        parts.push(format!("{} in", tokens(n)));
    }
    if let Some(n) = u.tokens_out {
        parts.push(format!("{} out", tokens(n)));
    }
    if let Some(c) = u.cost_microusd {
        parts.push(format!("${:.4}", c as f64 / 1_000_000.0));
    }
    if let Some(t) = u.turns {
        parts.push(format!("{t} turns"));
    }
    parts.join(", ")
}

/// The document of a task's history: `baton history KEY --json`.
pub fn history_json(key: &str, events: &[events::Model]) -> Value {
    json!({"task": key, "events": events.iter().map(event_json).collect::<Vec<_>>()})
}

/// A task's history, one event a line.
pub fn render_history(events: &[events::Model]) -> String {
    let id = |v: Option<i64>| v.map(|j| j.to_string()).unwrap_or_else(|| "-".into());
    events
        .iter()
        .map(|e| {
            format!(
                "{}  {:<17} {:<10} job={:<5} run={:<5} {}\n",
                fmt_time(e.at),
                e.kind,
                e.source,
                id(e.job_id),
                id(e.run_id),
                e.detail
            )
        })
        .collect()
}

/// `text` with every line indented by `pad`.
fn indent(text: &str, pad: &str) -> String {
    text.lines()
        .map(|l| format!("{pad}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn current_job(jobs: &[jobs::Model]) -> Option<&jobs::Model> {
    jobs.iter().max_by_key(|j| j.id)
}

/// The task table of `baton status`.
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

/// One task with its jobs, runs and effects: `baton status KEY` and the demo's summary.
pub fn render_detail(d: &TaskDetail, now: i64) -> String {
    let t = &d.task;
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{} ({}) pipeline={} status={} created={}\n",
        t.key,
        t.title,
        t.pipeline,
        t.status,
        fmt_time(t.created_at)
    );
    if let Some(reason) = failure_reason(d) {
        out.push_str(&format!("  failed: {reason}\n"));
    }
    if let Some(p) = &t.plane_issue_id {
        out.push_str(&format!("  plane issue: {p}\n"));
    }
    if let Some(desc) = &t.description {
        out.push_str(&format!(
            "  description: {}\n",
            indent(desc, "    ").trim_start()
        ));
    }
    let usage = fmt_usage(task_usage(d));
    if !usage.is_empty() {
        out.push_str(&format!("  usage: {usage}\n"));
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
                dash(r.pid.map(|p| p.to_string())),
                dash(r.exit_code.map(|p| p.to_string())),
                dash(r.outcome.map(|o| o.to_string())),
                dash(r.commit_sha.as_deref().map(|s| s.chars().take(10).collect())),
                r.log_path
            ));
            if let Some(reason) = run_reason(d, r.id) {
                out.push_str(&format!("           reason: {reason}\n"));
            }
            let usage = fmt_usage(Usage::of_run(r));
            if !usage.is_empty() {
                out.push_str(&format!("           usage {usage}\n"));
            }
        }
        if let Some(fb) = &j.feedback {
            out.push_str(&format!(
                "           feedback:\n{}\n",
                indent(fb, "             ")
            ));
        }
    }
    if let Some(r) = d.runs.iter().rev().find(|r| r.prompt.is_some()) {
        let prompt = r.prompt.as_deref().unwrap_or_default();
        out.push_str(&format!(
            "  prompt of run {}:\n{}\n",
            r.id,
            indent(prompt, "    ")
        ));
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
            if let Some(w) = effect_wait(e, &d.effects, now) {
                out.push_str(&format!(
                    "           waits for {} (since {})\n",
                    w.what,
                    fmt_time(w.since)
                ));
            }
        }
    }
    out
}

/// The running agents of `baton status --watch`, with their age at `now`.
pub fn render_running(running: &[RunningJob], now: i64) -> String {
    let mut out = format!("\nrunning agents: {}\n", running.len());
    for r in running {
        let Some(run) = &r.run else { continue };
        let age = Duration::from_secs(((now - run.started_at).max(0) / 1000) as u64);
        out.push_str(&format!(
            "  {:<20} {:<12} run {:<6} pid {:<7} age {}{}\n",
            r.task.key,
            r.job.stage,
            run.id,
            run.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            humantime::format_duration(age),
            if run.exited_at.is_some() {
                " (finalizing)"
            } else {
                ""
            }
        ));
    }
    out
}

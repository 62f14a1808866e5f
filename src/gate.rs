//! The quality gate of a stage, evaluated READ-ONLY by whoever sends the claim (the
//! Monitor normally, the Reaper in recovery): it reads the workspace and may run the
//! gate command, but writes nothing to the database.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{GateSettings, StageSettings};
use crate::model::Verdict;

/// The values of the placeholders `{task}`, `{stage}`, `{run_id}`, `{attempt}`,
/// `{workspace}` and, in an agent's command, `{prompt}`.
#[derive(Debug, Clone)]
pub struct Vars {
    pub task: String,
    pub stage: String,
    pub run_id: i64,
    pub attempt: i32,
    pub workspace: String,
    /// The rendered prompt, when the stage has one.
    pub prompt: Option<String>,
}

impl Vars {
    /// The run's environment, as its agent and its gate command get it: the stage's
    /// `env` (resolved), then the `BATON_*` variables, `BATON_ITERATION` and
    /// `TRACEPARENT`, which a stage cannot override.
    pub fn env(
        &self,
        stage_env: BTreeMap<String, String>,
        iteration: i32,
        trace_parent: Option<String>,
    ) -> BTreeMap<String, String> {
        let mut env = stage_env;
        env.extend([
            ("BATON_TASK".to_string(), self.task.clone()),
            ("BATON_STAGE".to_string(), self.stage.clone()),
            ("BATON_RUN_ID".to_string(), self.run_id.to_string()),
            ("BATON_ATTEMPT".to_string(), self.attempt.to_string()),
            ("BATON_ITERATION".to_string(), iteration.to_string()),
            ("BATON_WORKSPACE".to_string(), self.workspace.clone()),
        ]);
        if let Some(tp) = trace_parent {
            env.insert("TRACEPARENT".to_string(), tp);
        }
        env
    }

    pub fn expand(&self, s: &str) -> String {
        // `{prompt}` goes last: its text may hold braces that are not placeholders.
        let s = s
            .replace("{task}", &self.task)
            .replace("{stage}", &self.stage)
            .replace("{run_id}", &self.run_id.to_string())
            .replace("{attempt}", &self.attempt.to_string())
            .replace("{workspace}", &self.workspace);
        match &self.prompt {
            Some(p) => s.replace("{prompt}", p),
            None => s,
        }
    }
}

/// The gate's verdict, with the verdict file's text when it rejected: what the stage it
/// loops back to is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub verdict_text: Option<String>,
}

impl From<Verdict> for Judgement {
    fn from(verdict: Verdict) -> Self {
        Judgement {
            verdict,
            verdict_text: None,
        }
    }
}

/// Evaluates the gate of `stage` for a run that exited with `exit_code`. The gate
/// command is bounded by `gate.timeout` ([ADR 0009](../docs/adr/0009-gates.md)): a
/// finalizing Monitor is protected by being alive, not by a clock.
pub async fn evaluate(
    stage: &StageSettings,
    workspace: &Path,
    vars: &Vars,
    exit_code: i32,
    run: &GateRun<'_>,
) -> Judgement {
    let gate: &GateSettings = &stage.gate;
    if gate.exit_zero && exit_code != 0 {
        return failed(format!("agent exited with code {exit_code}"));
    }
    for artifact in &gate.artifacts {
        let rel = vars.expand(artifact);
        if !workspace.join(&rel).is_file() {
            return failed(format!("artifact {rel} is missing"));
        }
    }
    if let Some(v) = &gate.verdict {
        let rel = vars.expand(&v.file);
        let text = match tokio::fs::read_to_string(workspace.join(&rel)).await {
            Ok(t) => t,
            Err(e) => {
                return failed(format!("verdict file {rel} cannot be read: {e}"));
            }
        };
        if text.contains(&v.reject) {
            return Judgement {
                verdict: Verdict::Rejected,
                verdict_text: Some(crate::prompt::bounded(&text, crate::prompt::FEEDBACK_MAX)),
            };
        }
        if !text.contains(&v.approve) {
            return failed(format!(
                "verdict file {rel} says neither {} nor {}",
                v.approve, v.reject
            ));
        }
    }
    if let Some(cmd) = &gate.command {
        let argv: Vec<String> = cmd.iter().map(|a| vars.expand(a)).collect();
        let ran = crate::workspace::run_hook(
            "gate command",
            &argv,
            workspace,
            run.log,
            run.env,
            run.hidden,
            stage.gate.timeout,
        )
        .await;
        if let Err(why) = ran {
            // The end of its output says which test failed.
            let tail = crate::prompt::log_tail(run.log);
            let tail = crate::prompt::last_lines(&tail, GATE_REASON_LINES);
            return failed(format!(
                "{why} ({}); the end of its output:\n{tail}",
                argv.join(" ")
            ));
        }
    }
    Verdict::Passed.into()
}

fn failed(reason: String) -> Judgement {
    Verdict::Failed { reason }.into()
}

/// How many lines of a failed gate command's output its reason carries.
const GATE_REASON_LINES: usize = 20;

/// Where a gate command of a run writes, and what it must not inherit.
#[derive(Debug, Clone, Copy)]
pub struct GateRun<'a> {
    /// The run's log: the command's output is appended to it.
    pub log: &'a Path,
    /// baton's secrets (and database URLs): never in the command's environment.
    pub hidden: &'a [String],
    /// The run's environment ([`Vars::env`]), as its agent got it.
    pub env: &'a BTreeMap<String, String>,
}

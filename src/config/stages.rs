//! `[pipelines.X]` and `[stages.X]`: the stages a task goes through, what each runs, its
//! gate, its environment and its concurrency.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The default bound on a gate command.
pub const GATE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub stages: Vec<String>,
    /// Bound on how often a reject loop may enter one stage.
    #[serde(default = "default_max_iterations")]
    pub max_iterations: i32,
    /// A Plane work item with one of these labels (by name, any case) runs this
    /// pipeline; among several matching pipelines the highest `priority` wins, and a work
    /// item that matches none runs `default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plane_labels: Vec<String>,
    /// Which of several pipelines whose labels match wins: the highest.
    #[serde(default)]
    pub priority: i32,
}

fn default_max_iterations() -> i32 {
    3
}

fn default_true() -> bool {
    true
}

fn default_stage_timeout() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageSettings {
    /// The agent's argv, with placeholders.
    pub command: Vec<String>,
    /// Past this the agent is killed and the attempt failed.
    #[serde(default = "default_stage_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Auto-commit the workspace after the run.
    #[serde(default = "default_true")]
    pub commit: bool,
    /// The stage a rejection loops back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_reject: Option<String>,
    #[serde(default)]
    pub gate: GateSettings,
    /// The prompt template (minijinja), given inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The prompt template in a file, relative to the config file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_file: Option<PathBuf>,
    /// The template's text, from `prompt` or read from `prompt_file` at load.
    #[serde(skip)]
    pub template: Option<String>,
    /// Environment of the stage's agent and gate command: a literal value, or
    /// `"${NAME}"`, the value of baton's variable NAME when the node starts (never shown).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// At most this many agents of the stage at once, across every node of the database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
}

impl StageSettings {
    /// The environment variable a value of `env` names (`"${NAME}"`), if it names one.
    pub fn env_reference(value: &str) -> Option<&str> {
        value.strip_prefix("${")?.strip_suffix('}')
    }

    /// The stage's environment as its agent gets it: references read from `lookup`
    /// (baton's environment). A reference to an unset variable is left out (config
    /// check names it).
    pub fn resolved_env(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> BTreeMap<String, String> {
        self.env
            .iter()
            .filter_map(|(k, v)| match Self::env_reference(v) {
                Some(var) => lookup(var).map(|value| (k.clone(), value)),
                None => Some((k.clone(), v.clone())),
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GateSettings {
    pub exit_zero: bool,
    /// Files that must exist in the workspace after the run.
    pub artifacts: Vec<String>,
    /// A command run in the workspace that must exit 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// How long the gate command may run; its whole process group is ended then.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<VerdictSettings>,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            exit_zero: true,
            artifacts: Vec::new(),
            command: None,
            timeout: GATE_TIMEOUT_DEFAULT,
            verdict: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerdictSettings {
    pub file: String,
    pub approve: String,
    pub reject: String,
}

impl super::Config {
    /// The pipeline of a Plane work item with these labels: of the pipelines whose
    /// `plane_labels` name one of them (any case), the one of highest `priority` (the
    /// first by name among equals); `None` (the default pipeline) when none does.
    pub fn pipeline_for_labels(&self, labels: &[String]) -> Option<String> {
        let has = |wanted: &String| labels.iter().any(|l| l.trim().eq_ignore_ascii_case(wanted));
        self.pipelines
            .iter()
            .filter(|(_, p)| p.plane_labels.iter().any(has))
            // Highest priority first; among equals the first by name (the map's order).
            .min_by_key(|(_, p)| std::cmp::Reverse(p.priority))
            .map(|(name, _)| name.clone())
    }
}

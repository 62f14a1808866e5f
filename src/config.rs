//! The configuration file (`baton.toml`): its format, its defaults and its validation.
//!
//! Loading collects every problem it can find, unknown keys included, and names each one
//! by its key path and, where it can be found, its line, so that one `baton config check`
//! shows everything that is wrong at once. The checks live in `config/validate.rs`.

mod env;
mod remotes;
mod retention;
mod stages;
mod validate;

pub use env::{EnvOverrides, Secret, SecretVar, Secrets};
pub use remotes::{ForgeSettings, PlaneSettings, PlaneStates};
pub use retention::{RETENTION_MAX, RetentionSettings};
pub use stages::{
    GATE_TIMEOUT_DEFAULT, GateSettings, PipelineSettings, StageSettings, VerdictSettings,
};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::Backoff;
use crate::policy::{PipelineDef, PlaneStateNames, Policy};
use validate::KeyPositions;

/// The default path of the configuration file.
pub const CONFIG_PATH_DEFAULT: &str = "baton.toml";
/// The database used when the config names none: an SQLite file beside the config.
pub const DATABASE_URL_DEFAULT: &str = "sqlite://baton.db?mode=rwc";
/// The environment variables that override `database_url`, the first set one winning.
pub const DATABASE_URL_VARS: [&str; 2] = ["BATON_DATABASE_URL", "DATABASE_URL"];
/// Durations longer than this are taken for a typo (`5000h`) rather than intent.
const DURATION_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Placeholders that commands and gate paths may use.
pub const PLACEHOLDERS: &[&str] = &["task", "stage", "run_id", "attempt", "workspace", "prompt"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `sqlite://...` or `postgres://...`; overridden by `BATON_DATABASE_URL` or `DATABASE_URL`.
    pub database_url: String,
    /// One git checkout per task below this directory.
    pub workspace_root: PathBuf,
    /// One log file per run below this directory.
    pub log_dir: PathBuf,
    /// How many agents this node runs at once.
    pub max_concurrent_jobs: usize,
    pub reaper: ReaperSettings,
    pub node: NodeSettings,
    pub shutdown: ShutdownSettings,
    pub retry: RetrySettings,
    pub repo: RepoSettings,
    pub pipelines: BTreeMap<String, PipelineSettings>,
    pub stages: BTreeMap<String, StageSettings>,
    pub effects: EffectsSettings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forge: Option<ForgeSettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plane: Option<PlaneSettings>,
    pub http: HttpSettings,
    pub telemetry: TelemetrySettings,
    pub retention: RetentionSettings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: DATABASE_URL_DEFAULT.to_string(),
            workspace_root: PathBuf::from("workspaces"),
            log_dir: PathBuf::from("logs"),
            max_concurrent_jobs: 8,
            reaper: ReaperSettings::default(),
            node: NodeSettings::default(),
            shutdown: ShutdownSettings::default(),
            retry: RetrySettings::default(),
            repo: RepoSettings::default(),
            pipelines: BTreeMap::new(),
            stages: BTreeMap::new(),
            effects: EffectsSettings::default(),
            forge: None,
            plane: None,
            http: HttpSettings::default(),
            telemetry: TelemetrySettings::default(),
            retention: RetentionSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaperSettings {
    /// How often the Reaper looks for runs past their window.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A run whose exit was recorded is reaped only this long after the exit.
    #[serde(with = "humantime_serde")]
    pub finalize_grace: Duration,
    /// A node whose heartbeat is older than this is taken for dead, with its runs.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
}

impl Default for ReaperSettings {
    fn default() -> Self {
        ReaperSettings {
            interval: Duration::from_secs(10),
            finalize_grace: Duration::from_secs(300),
            heartbeat_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeSettings {
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The host this node runs on, which owns the runs it starts, their workspaces and
    /// their adoption; empty: the machine's hostname. Set it where the hostname changes
    /// across restarts (containers), or to run several hosts on one machine.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// How long the runs of a host that stopped cleanly are kept for its next boot to
    /// adopt before other hosts may reap them (a restart is not a death).
    #[serde(with = "humantime_serde")]
    pub adoption_window: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            heartbeat_interval: Duration::from_secs(10),
            host: String::new(),
            adoption_window: Duration::from_secs(600),
        }
    }
}

impl NodeSettings {
    /// The host name this node runs as: `node.host`, else the machine's.
    pub fn host(&self) -> String {
        if self.host.trim().is_empty() {
            crate::hostname()
        } else {
            self.host.trim().to_string()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ShutdownSettings {
    /// With `serve --stop-agents`: how long agents get between TERM and KILL.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrySettings {
    /// Attempts of one job, the first included.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 3,
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
        }
    }
}

impl RetrySettings {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.backoff_initial,
            max: self.backoff_max,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RepoSettings {
    /// Any URL or path git understands; a relative path is taken from the config's folder.
    pub url: String,
    pub base_branch: String,
    pub branch_prefix: String,
    /// A private key file for an ssh remote (else the ssh agent is asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<PathBuf>,
    /// The environment variable that holds a token for an https remote; default: the
    /// forge token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Every clone, fetch and push gives up after this long.
    #[serde(with = "humantime_serde")]
    pub network_timeout: Duration,
    /// Run once in a task's worktree after it is created (e.g. `["npm", "ci"]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<String>,
    /// Run in the task's worktree before each stage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub before_stage: Vec<String>,
}

impl Default for RepoSettings {
    fn default() -> Self {
        RepoSettings {
            url: String::new(),
            base_branch: "main".to_string(),
            branch_prefix: "baton/".to_string(),
            ssh_key: None,
            token_env: None,
            network_timeout: Duration::from_secs(300),
            setup: Vec::new(),
            before_stage: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EffectsSettings {
    pub push: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_request_after: Option<String>,
    pub plane_comment: bool,
    /// Attempts of one effect before it is marked failed.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Effects performed at once (of different tasks; one task's run in order).
    pub concurrency: usize,
    /// How often the outbox is looked at when nothing wakes the worker.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for EffectsSettings {
    fn default() -> Self {
        EffectsSettings {
            push: true,
            pull_request_after: None,
            plane_comment: true,
            max_attempts: 8,
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            concurrency: 4,
            interval: Duration::from_secs(1),
        }
    }
}

impl EffectsSettings {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.backoff_initial,
            max: self.backoff_max,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "127.0.0.1:7700".to_string(),
            token_env: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetrySettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    pub protocol: String,
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            protocol: "http".to_string(),
            service_name: "baton".to_string(),
        }
    }
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `stages.developer.timeout`; empty for the whole file.
    pub key: String,
    /// 1-based line, where it could be found.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (Some(line), false) => write!(f, "line {line}: {}: {}", self.key, self.message),
            (Some(line), true) => write!(f, "line {line}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.key, self.message),
            (None, true) => write!(f, "{}", self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "config file {} not found; copy baton.example.toml there or pass --config PATH (or set BATON_CONFIG)",
        .0.display()
    )]
    NotFound(PathBuf),
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {} has {} problem(s):\n{}", path.display(), problems.len(), render_problems(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads, parses and validates the file at `path`, then applies the environment
    /// overrides and resolves relative paths against the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::NotFound(path.to_path_buf()));
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        // Relative paths in the file are taken from its folder, made absolute: agents run
        // in their workspaces, where a relative log path would point elsewhere.
        let parent = path.parent().unwrap_or(Path::new(""));
        let base = std::path::absolute(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
        .unwrap_or_else(|_| parent.to_path_buf());
        Config::from_toml(&text, &base, &EnvOverrides::from_process()).map_err(|problems| {
            ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            }
        })
    }

    /// Parses and validates `text`; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path, env: &EnvOverrides) -> Result<Config, Vec<Problem>> {
        let positions = KeyPositions::new(text);
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> = toml::Deserializer::parse(text)
            .and_then(|de| serde_ignored::deserialize(de, |path| unknown.push(path.to_string())));
        let mut config = match parsed {
            Ok(config) => config,
            Err(e) => {
                let start = e.span().map(|span| span.start);
                return Err(vec![Problem {
                    key: start
                        .map(|o| positions.key_at_offset(o))
                        .unwrap_or_default(),
                    line: start.map(|o| positions.line_of_offset(o)),
                    message: e.message().trim().to_string(),
                }]);
            }
        };
        let mut problems: Vec<Problem> = unknown
            .into_iter()
            .map(|key| Problem {
                line: positions.line_of_key(&key),
                message: "unknown key".to_string(),
                key,
            })
            .collect();
        if let Some(url) = &env.database_url {
            config.database_url = url.clone();
        }
        config.load_templates(base, &mut problems);
        config.validate(&mut problems);
        for p in &mut problems {
            if p.line.is_none() && !p.key.is_empty() {
                p.line = positions.line_of_key(&p.key);
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        config.resolve_paths(base);
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        self.workspace_root = resolve(&self.workspace_root);
        self.log_dir = resolve(&self.log_dir);
        if is_local_path(&self.repo.url) {
            self.repo.url = resolve(Path::new(&self.repo.url))
                .to_string_lossy()
                .into_owned();
        }
        if let Some(rest) = self.database_url.strip_prefix("sqlite://") {
            let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !file.is_empty() && !file.starts_with(':') && Path::new(file).is_relative() {
                let full = base.join(file);
                self.database_url = if query.is_empty() {
                    format!("sqlite://{}", full.display())
                } else {
                    format!("sqlite://{}?{query}", full.display())
                };
            }
        }
    }

    /// The pipeline named `name`, or an error naming the pipelines there are.
    pub fn pipeline(&self, name: &str) -> Result<&PipelineSettings, String> {
        self.pipelines.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.pipelines.keys().map(String::as_str).collect();
            format!(
                "unknown pipeline {name:?}; the config defines: {}",
                known.join(", ")
            )
        })
    }

    /// What the claim needs of this config to choose transitions.
    pub fn policy(&self) -> Policy {
        Policy {
            pipelines: self
                .pipelines
                .iter()
                .map(|(name, p)| {
                    let def = PipelineDef {
                        stages: p.stages.clone(),
                        max_iterations: p.max_iterations,
                    };
                    (name.clone(), def)
                })
                .collect(),
            on_reject: self
                .stages
                .iter()
                .filter_map(|(k, s)| s.on_reject.clone().map(|t| (k.clone(), t)))
                .collect(),
            max_attempts: self.retry.max_attempts,
            retry_backoff: self.retry.backoff(),
            push: self.effects.push,
            pull_request_after: self.effects.pull_request_after.clone(),
            plane_comment: self.effects.plane_comment && self.plane.is_some(),
            plane_states: self
                .plane
                .as_ref()
                .map(|p| PlaneStateNames {
                    on_start: p.states.on_start.clone(),
                    on_done: p.states.on_done.clone(),
                    on_failed: p.states.on_failed.clone(),
                })
                .unwrap_or_default(),
            branch_prefix: self.repo.branch_prefix.clone(),
            base_branch: self.repo.base_branch.clone(),
            stage_limits: self
                .stages
                .iter()
                .filter_map(|(k, s)| s.max_concurrent.map(|n| (k.clone(), n)))
                .collect(),
        }
    }
}

/// True when `url` names a folder on this machine rather than a remote.
pub fn is_local_path(url: &str) -> bool {
    // `host:path` (scp-like ssh) is remote; `/abs`, `./rel` and `rel` are local.
    let scp_like = url.contains(':') && !url.starts_with('/') && !url.starts_with('.');
    !(url.is_empty() || url.contains("://") || scp_like)
}

#[cfg(test)]
mod tests;

//! The configuration file (`baton.toml`): its format, its defaults and its validation.
//!
//! Loading collects every problem it can find, unknown keys included, and names each one
//! by its key path and, where it can be found, its line, so that one `baton config check`
//! shows everything that is wrong at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The default path of the configuration file.
pub const CONFIG_PATH_DEFAULT: &str = "baton.toml";
/// The database used when the config names none: an SQLite file beside the config.
pub const DATABASE_URL_DEFAULT: &str = "sqlite://baton.db?mode=rwc";
/// Durations longer than this are taken for a typo (`5000h`) rather than intent.
const DURATION_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Placeholders that commands and gate paths may use.
pub const PLACEHOLDERS: &[&str] = &["task", "stage", "run_id", "attempt", "workspace"];

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
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            heartbeat_interval: Duration::from_secs(10),
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
    /// Backoff before attempt `next_attempt` (2 for the first retry): exponential, capped.
    pub fn backoff(&self, next_attempt: i32) -> Duration {
        let exp = (next_attempt - 2).clamp(0, 30) as u32;
        self.backoff_initial
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.backoff_max)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RepoSettings {
    /// Any URL or path git understands; a relative path is taken from the config's folder.
    pub url: String,
    pub base_branch: String,
    pub branch_prefix: String,
}

impl Default for RepoSettings {
    fn default() -> Self {
        RepoSettings {
            url: String::new(),
            base_branch: "main".to_string(),
            branch_prefix: "baton/".to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub stages: Vec<String>,
    /// Bound on how often a reject loop may enter one stage.
    #[serde(default = "default_max_iterations")]
    pub max_iterations: i32,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<VerdictSettings>,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            exit_zero: true,
            artifacts: Vec::new(),
            command: None,
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
    /// Backoff after failed attempt `attempt` (1-based): exponential, capped.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = (attempt - 1).clamp(0, 30) as u32;
        self.backoff_initial
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.backoff_max)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForgeSettings {
    /// `github` or `gitea` (Gitea and Forgejo).
    pub kind: String,
    pub api_url: String,
    /// `owner/name`.
    pub repo: String,
    /// The environment variable that holds the token.
    pub token_env: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaneSettings {
    pub api_url: String,
    pub workspace: String,
    pub project_id: String,
    pub api_key_env: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_state: Option<String>,
    #[serde(default)]
    pub states: PlaneStates,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaneStates {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_done: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_failed: Option<String>,
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
        let mut unknown = Vec::new();
        let parsed: Result<Config, _> = toml::Deserializer::parse(text)
            .and_then(|de| serde_ignored::deserialize(de, |path| unknown.push(path.to_string())));
        let mut config = match parsed {
            Ok(config) => config,
            Err(e) => {
                let line = e.span().map(|span| line_of_offset(text, span.start));
                let key = line.map(|l| key_at_line(text, l)).unwrap_or_default();
                return Err(vec![Problem {
                    key,
                    line,
                    message: e.message().trim().to_string(),
                }]);
            }
        };
        let mut problems: Vec<Problem> = unknown
            .into_iter()
            .map(|key| Problem {
                line: line_of_key(text, &key),
                message: "unknown key".to_string(),
                key,
            })
            .collect();
        if let Some(url) = &env.database_url {
            config.database_url = url.clone();
        }
        config.validate(&mut problems);
        for p in &mut problems {
            if p.line.is_none() && !p.key.is_empty() {
                p.line = line_of_key(text, &p.key);
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

    fn validate(&self, problems: &mut Vec<Problem>) {
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_string(),
                line: None,
                message,
            })
        };
        let db = self.database_url.as_str();
        if !(db.starts_with("sqlite:")
            || db.starts_with("postgres://")
            || db.starts_with("postgresql://"))
        {
            problem(
                "database_url",
                format!(
                    "{:?} is neither sqlite://... nor postgres://...",
                    redact_url(db)
                ),
            );
        }
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > 10_000 {
            problem(
                "max_concurrent_jobs",
                format!("{} is not between 1 and 10000", self.max_concurrent_jobs),
            );
        }
        let durations = [
            ("reaper.interval", self.reaper.interval),
            ("reaper.finalize_grace", self.reaper.finalize_grace),
            ("reaper.heartbeat_timeout", self.reaper.heartbeat_timeout),
            ("node.heartbeat_interval", self.node.heartbeat_interval),
            ("shutdown.grace", self.shutdown.grace),
            ("retry.backoff_initial", self.retry.backoff_initial),
            ("retry.backoff_max", self.retry.backoff_max),
            ("effects.backoff_initial", self.effects.backoff_initial),
            ("effects.backoff_max", self.effects.backoff_max),
            ("effects.interval", self.effects.interval),
        ];
        for (key, d) in durations {
            if let Some(msg) = check_duration(d) {
                problem(key, msg);
            }
        }
        if self.node.heartbeat_interval >= self.reaper.heartbeat_timeout {
            problem(
                "node.heartbeat_interval",
                format!(
                    "must be shorter than reaper.heartbeat_timeout ({}), or live nodes look dead",
                    humantime::format_duration(self.reaper.heartbeat_timeout)
                ),
            );
        }
        if self.retry.max_attempts == 0 || self.retry.max_attempts > 100 {
            problem(
                "retry.max_attempts",
                format!("{} is not between 1 and 100", self.retry.max_attempts),
            );
        }
        if self.retry.backoff_initial > self.retry.backoff_max {
            problem(
                "retry.backoff_initial",
                "is longer than retry.backoff_max".to_string(),
            );
        }
        if self.repo.url.trim().is_empty() {
            problem(
                "repo.url",
                "is missing: name the git repository the tasks work on".to_string(),
            );
        }
        if self.repo.base_branch.trim().is_empty() {
            problem("repo.base_branch", "is empty".to_string());
        }
        if git_ref_invalid(&format!("{}X", self.repo.branch_prefix)) {
            problem(
                "repo.branch_prefix",
                format!(
                    "{:?} cannot start a git branch name",
                    self.repo.branch_prefix
                ),
            );
        }
        if self.pipelines.is_empty() {
            problem(
                "pipelines",
                "no pipeline is defined: add [pipelines.default] with its stages".to_string(),
            );
        }
        for (name, pipeline) in &self.pipelines {
            let key = format!("pipelines.{name}.stages");
            if pipeline.stages.is_empty() {
                problem(&key, "is empty".to_string());
            }
            for (i, stage) in pipeline.stages.iter().enumerate() {
                if !self.stages.contains_key(stage) {
                    problem(
                        &key,
                        format!("names stage {stage:?}, which has no [stages.{stage}] section"),
                    );
                }
                if pipeline.stages[..i].contains(stage) {
                    problem(&key, format!("names stage {stage:?} twice"));
                }
            }
            if pipeline.max_iterations < 1 || pipeline.max_iterations > 100 {
                problem(
                    &format!("pipelines.{name}.max_iterations"),
                    format!("{} is not between 1 and 100", pipeline.max_iterations),
                );
            }
        }
        for (name, stage) in &self.stages {
            if let Err(msg) = validate_name(name) {
                problem(&format!("stages.{name}"), format!("stage name {msg}"));
            }
            let key = format!("stages.{name}.command");
            if stage.command.is_empty() || stage.command[0].trim().is_empty() {
                problem(
                    &key,
                    "is empty: give the agent's program and its arguments".to_string(),
                );
            }
            for arg in &stage.command {
                if let Some(msg) = check_placeholders(arg) {
                    problem(&key, msg);
                }
            }
            if let Some(msg) = check_duration(stage.timeout) {
                problem(&format!("stages.{name}.timeout"), msg);
            }
            if let Some(target) = &stage.on_reject {
                let key = format!("stages.{name}.on_reject");
                for (pname, pipeline) in &self.pipelines {
                    let Some(pos) = pipeline.stages.iter().position(|s| s == name) else {
                        continue;
                    };
                    match pipeline.stages.iter().position(|s| s == target) {
                        None => problem(
                            &key,
                            format!(
                                "stage {target:?} is not in pipeline {pname:?}, which runs {name:?}"
                            ),
                        ),
                        Some(t) if t > pos => problem(
                            &key,
                            format!("stage {target:?} comes after {name:?} in pipeline {pname:?}"),
                        ),
                        Some(_) => {}
                    }
                }
            }
            if stage.on_reject.is_some() && stage.gate.verdict.is_none() {
                problem(
                    &format!("stages.{name}.on_reject"),
                    "needs gate.verdict to tell a rejection".to_string(),
                );
            }
            for (i, a) in stage.gate.artifacts.iter().enumerate() {
                if let Some(msg) = check_placeholders(a).or_else(|| check_relative(a)) {
                    problem(&format!("stages.{name}.gate.artifacts.{i}"), msg);
                }
            }
            if let Some(cmd) = &stage.gate.command {
                if cmd.is_empty() || cmd[0].trim().is_empty() {
                    problem(
                        &format!("stages.{name}.gate.command"),
                        "is empty".to_string(),
                    );
                }
                for arg in cmd {
                    if let Some(msg) = check_placeholders(arg) {
                        problem(&format!("stages.{name}.gate.command"), msg);
                    }
                }
            }
            if let Some(v) = &stage.gate.verdict {
                let key = format!("stages.{name}.gate.verdict");
                if let Some(msg) = check_placeholders(&v.file).or_else(|| check_relative(&v.file)) {
                    problem(&format!("{key}.file"), msg);
                }
                if v.approve.is_empty() || v.reject.is_empty() || v.approve == v.reject {
                    problem(
                        &key,
                        "approve and reject must be two different, non-empty words".to_string(),
                    );
                }
            }
        }
        if self.effects.max_attempts == 0 || self.effects.max_attempts > 1000 {
            problem(
                "effects.max_attempts",
                format!("{} is not between 1 and 1000", self.effects.max_attempts),
            );
        }
        if self.effects.concurrency == 0 || self.effects.concurrency > 256 {
            problem(
                "effects.concurrency",
                format!("{} is not between 1 and 256", self.effects.concurrency),
            );
        }
        if let Some(stage) = &self.effects.pull_request_after {
            if !self.stages.contains_key(stage) {
                problem(
                    "effects.pull_request_after",
                    format!("stage {stage:?} is not defined"),
                );
            }
            if self.forge.is_none() {
                problem(
                    "effects.pull_request_after",
                    "needs a [forge] section to open the pull request".to_string(),
                );
            }
        }
        if let Some(forge) = &self.forge {
            if forge.kind != "github" && forge.kind != "gitea" {
                problem(
                    "forge.kind",
                    format!("{:?} is neither \"github\" nor \"gitea\"", forge.kind),
                );
            }
            if !forge.api_url.starts_with("http://") && !forge.api_url.starts_with("https://") {
                problem(
                    "forge.api_url",
                    format!("{:?} is not an http(s) URL", forge.api_url),
                );
            }
            if forge.repo.split('/').filter(|s| !s.is_empty()).count() != 2 {
                problem("forge.repo", format!("{:?} is not owner/name", forge.repo));
            }
            if let Some(msg) = check_env_name(&forge.token_env) {
                problem("forge.token_env", msg);
            }
        }
        if let Some(plane) = &self.plane {
            if !plane.api_url.starts_with("http://") && !plane.api_url.starts_with("https://") {
                problem(
                    "plane.api_url",
                    format!("{:?} is not an http(s) URL", plane.api_url),
                );
            }
            if plane.workspace.is_empty() {
                problem("plane.workspace", "is empty".to_string());
            }
            if plane.project_id.is_empty() {
                problem("plane.project_id", "is empty".to_string());
            }
            if let Some(msg) = check_env_name(&plane.api_key_env) {
                problem("plane.api_key_env", msg);
            }
            if let Some(msg) = plane.webhook_secret_env.as_deref().and_then(check_env_name) {
                problem("plane.webhook_secret_env", msg);
            }
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            problem(
                "http.listen",
                format!(
                    "{:?} is not an address such as 127.0.0.1:7700",
                    self.http.listen
                ),
            );
        }
        if let Some(msg) = self.http.token_env.as_deref().and_then(check_env_name) {
            problem("http.token_env", msg);
        }
        if let Some(ep) = &self.telemetry.otlp_endpoint
            && !ep.starts_with("http://")
            && !ep.starts_with("https://")
        {
            problem(
                "telemetry.otlp_endpoint",
                format!("{ep:?} is not an http(s) URL such as http://127.0.0.1:4318"),
            );
        }
        if self.telemetry.protocol != "http" && self.telemetry.protocol != "grpc" {
            problem(
                "telemetry.protocol",
                format!(
                    "{:?} is neither \"http\" nor \"grpc\"",
                    self.telemetry.protocol
                ),
            );
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

    /// The effective settings as TOML, secrets redacted, followed by the state of every
    /// environment variable the config names for a secret.
    pub fn render_effective(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        let mut out =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        let mut secrets = Vec::new();
        if let Some(f) = &self.forge {
            secrets.push(("forge.token_env", f.token_env.as_str()));
        }
        if let Some(p) = &self.plane {
            secrets.push(("plane.api_key_env", p.api_key_env.as_str()));
            if let Some(w) = &p.webhook_secret_env {
                secrets.push(("plane.webhook_secret_env", w.as_str()));
            }
        }
        if let Some(t) = &self.http.token_env {
            secrets.push(("http.token_env", t.as_str()));
        }
        out.push_str("\n# secrets (values are never shown)\n");
        if secrets.is_empty() {
            out.push_str("# none configured\n");
        }
        for (key, var) in secrets {
            let state = match std::env::var_os(var) {
                Some(v) if !v.is_empty() => "set",
                _ => "NOT SET",
            };
            out.push_str(&format!("# {key}: ${var} is {state}\n"));
        }
        out
    }
}

/// baton's own secrets, read once from the environment variables the config names.
/// They are never written to the config, the database or the logs, and never passed to
/// agents.
#[derive(Clone, Default)]
pub struct Secrets {
    pub forge_token: Option<String>,
    pub plane_api_key: Option<String>,
    pub webhook_secret: Option<String>,
    pub api_token: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |v: &Option<String>| if v.is_some() { "set" } else { "unset" };
        f.debug_struct("Secrets")
            .field("forge_token", &s(&self.forge_token))
            .field("plane_api_key", &s(&self.plane_api_key))
            .field("webhook_secret", &s(&self.webhook_secret))
            .field("api_token", &s(&self.api_token))
            .finish()
    }
}

impl Secrets {
    pub fn from_env(config: &Config) -> Secrets {
        let read = |var: Option<&str>| {
            var.and_then(|v| std::env::var(v).ok())
                .filter(|v| !v.is_empty())
        };
        Secrets {
            forge_token: read(config.forge.as_ref().map(|f| f.token_env.as_str())),
            plane_api_key: read(config.plane.as_ref().map(|p| p.api_key_env.as_str())),
            webhook_secret: read(
                config
                    .plane
                    .as_ref()
                    .and_then(|p| p.webhook_secret_env.as_deref()),
            ),
            api_token: read(config.http.token_env.as_deref()),
        }
    }
}

/// The environment variables that override the file.
#[derive(Debug, Clone, Default)]
pub struct EnvOverrides {
    pub database_url: Option<String>,
}

impl EnvOverrides {
    pub fn from_process() -> Self {
        let database_url = ["BATON_DATABASE_URL", "DATABASE_URL"]
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
        EnvOverrides { database_url }
    }
}

/// Replaces the password of a URL such as `postgres://user:secret@host/db` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

fn check_duration(d: Duration) -> Option<String> {
    if d.is_zero() {
        Some("must be longer than zero".to_string())
    } else if d > DURATION_MAX {
        Some(format!(
            "{} is absurdly long (more than {})",
            humantime::format_duration(d),
            humantime::format_duration(DURATION_MAX)
        ))
    } else {
        None
    }
}

fn check_placeholders(s: &str) -> Option<String> {
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Some(format!("{s:?} has an unclosed '{{'"));
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Some(format!(
                "{s:?} uses unknown placeholder {{{name}}}; known: {}",
                PLACEHOLDERS
                    .iter()
                    .map(|p| format!("{{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        rest = &after[close + 1..];
    }
    None
}

fn check_relative(path: &str) -> Option<String> {
    let p = Path::new(path);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        Some(format!(
            "{path:?} must be a path inside the workspace (relative, without '..')"
        ))
    } else {
        None
    }
}

fn check_env_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    (!ok).then(|| format!("{name:?} is not an environment variable name; name the variable that holds the secret, not the secret"))
}

fn git_ref_invalid(name: &str) -> bool {
    name.contains("..")
        || name.starts_with('/')
        || name.contains("//")
        || name
            .chars()
            .any(|c| c.is_ascii_control() || " ~^:?*[\\".contains(c))
}

/// True when `url` names a folder on this machine rather than a remote.
pub fn is_local_path(url: &str) -> bool {
    // `host:path` (scp-like ssh) is remote; `/abs`, `./rel` and `rel` are local.
    let scp_like = url.contains(':') && !url.starts_with('/') && !url.starts_with('.');
    !(url.is_empty() || url.contains("://") || scp_like)
}

/// Checks a name used for task keys and stage names, which become branch, directory
/// and file names: ASCII letters, digits, '-', '_' and '.', not starting with '-' or
/// '.', no "..", at most 64 characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_string());
    }
    if name.len() > 64 {
        return Err(format!("{:?}... is longer than 64 characters", &name[..20]));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!(
            "{name:?} contains {c:?}; use ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    if name.starts_with('-') || name.starts_with('.') {
        return Err(format!("{name:?} must not start with '-' or '.'"));
    }
    if name.contains("..") {
        return Err(format!("{name:?} must not contain \"..\""));
    }
    Ok(())
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The dotted key path defined at `line` (1-based), for errors the parser reports by
/// position only.
fn key_at_line(text: &str, line: usize) -> String {
    let mut table: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        let path = if l.starts_with('[') {
            table = split_key(l.trim_start_matches('[').split(']').next().unwrap_or(""));
            table.clone()
        } else if let Some((k, _)) = l.split_once('=') {
            let mut p = table.clone();
            p.extend(split_key(k));
            p
        } else {
            table.clone()
        };
        if i + 1 == line {
            return path.join(".");
        }
    }
    String::new()
}

fn split_key(s: &str) -> Vec<String> {
    s.split('.')
        .map(|p| p.trim().trim_matches('"').trim_matches('\'').to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Finds the line that defines `key` (a dotted path), following `[table]` headers and
/// dotted keys. Good enough for pointing a human at the place; `None` when not found.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let want: Vec<&str> = key.split('.').collect();
    let mut table: Vec<String> = Vec::new();
    let mut best: Option<(usize, usize)> = None;
    let split = split_key;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let path: Vec<String> = if line.starts_with('[') {
            table = split(line.trim_start_matches('[').split(']').next().unwrap_or(""));
            table.clone()
        } else if let Some((k, _)) = line.split_once('=') {
            let mut p = table.clone();
            p.extend(split(k));
            p
        } else {
            continue;
        };
        let common = path.iter().zip(&want).take_while(|(a, b)| a == *b).count();
        if common == path.len() && common > 0 && best.is_none_or(|(n, _)| common > n) {
            best = Some((common, i + 1));
        }
    }
    best.map(|(_, line)| line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
database_url = "sqlite://baton.db?mode=rwc"
[repo]
url = "/srv/app.git"
[pipelines.default]
stages = ["developer", "reviewer"]
[stages.developer]
command = ["sh", "-c", "echo {task}"]
timeout = "45m"
[stages.reviewer]
command = ["review"]
on_reject = "developer"
gate.verdict = { file = "docs/{task}/review.md", approve = "APPROVED", reject = "CHANGES_REQUESTED" }
"#;

    fn load(text: &str) -> Result<Config, Vec<Problem>> {
        Config::from_toml(text, Path::new("/etc/baton"), &EnvOverrides::default())
    }

    #[test]
    fn good_config_loads_with_defaults_and_resolved_paths() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.stages["developer"].timeout, Duration::from_secs(45 * 60));
        assert_eq!(c.reaper.finalize_grace, Duration::from_secs(300));
        assert_eq!(c.workspace_root, PathBuf::from("/etc/baton/workspaces"));
        assert_eq!(c.database_url, "sqlite:///etc/baton/baton.db?mode=rwc");
        assert!(c.stages["developer"].gate.exit_zero);
    }

    #[test]
    fn env_overrides_database_url() {
        let env = EnvOverrides {
            database_url: Some("postgres://u:pw@db/baton".into()),
        };
        let c = Config::from_toml(GOOD, Path::new("."), &env).unwrap();
        assert_eq!(c.database_url, "postgres://u:pw@db/baton");
        assert!(c.render_effective().contains("postgres://u:***@db/baton"));
        assert!(!c.render_effective().contains("pw@"));
    }

    #[test]
    fn every_problem_is_collected_with_key_and_line() {
        let text = GOOD.replace("timeout = \"45m\"", "timeout = \"0s\"\ncomand = [\"x\"]")
            + "[pipelines.other]\nstages = [\"ghost\"]\n[reaper]\nfinalize_grace = \"900d\"\n";
        let problems = load(&text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"stages.developer.comand"), "{problems:?}");
        assert!(keys.contains(&"stages.developer.timeout"), "{problems:?}");
        assert!(keys.contains(&"pipelines.other.stages"), "{problems:?}");
        assert!(keys.contains(&"reaper.finalize_grace"), "{problems:?}");
        assert_eq!(problems.len(), 4, "{problems:?}");
        let timeout = problems
            .iter()
            .find(|p| p.key == "stages.developer.timeout")
            .unwrap();
        assert_eq!(timeout.line, Some(9));
        let unknown = problems
            .iter()
            .find(|p| p.key == "stages.developer.comand")
            .unwrap();
        assert_eq!(unknown.line, Some(10));
    }

    #[test]
    fn on_reject_outside_the_pipeline_is_named() {
        let text = GOOD.replace("on_reject = \"developer\"", "on_reject = \"analyst\"");
        let problems = load(&text).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].key, "stages.reviewer.on_reject");
        assert!(problems[0].message.contains("not in pipeline \"default\""));
        assert_eq!(problems[0].line, Some(12));
    }

    #[test]
    fn syntax_and_type_errors_carry_a_line() {
        let problems = load("max_concurrent_jobs = \"many\"\n").unwrap_err();
        assert_eq!(problems[0].line, Some(1));
        assert_eq!(problems[0].key, "max_concurrent_jobs");
        let problems = load("[repo\nurl = 1\n").unwrap_err();
        assert_eq!(problems[0].line, Some(1));
        let problems = load(&GOOD.replace("\"45m\"", "\"45 parsecs\"")).unwrap_err();
        assert_eq!(problems[0].line, Some(9), "{problems:?}");
    }

    #[test]
    fn empty_command_and_unknown_placeholder_are_problems() {
        let text = GOOD
            .replace("[\"review\"]", "[]")
            .replace("echo {task}", "echo {tsak}");
        let problems = load(&text).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.key == "stages.reviewer.command" && p.message.contains("empty"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.key == "stages.developer.command" && p.message.contains("{tsak}"))
        );
    }

    #[test]
    fn names_are_validated() {
        for good in ["ORCH-65", "a.b_c", "X"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a..b",
            "a/b",
            "a b",
            "../etc",
            "ü",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let r = RetrySettings {
            max_attempts: 5,
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(25),
        };
        assert_eq!(r.backoff(2), Duration::from_secs(10));
        assert_eq!(r.backoff(3), Duration::from_secs(20));
        assert_eq!(r.backoff(4), Duration::from_secs(25));
    }
}

//! Validation of a parsed config: every problem collected, each named by its key path;
//! and the positions of keys in the file, taken from the TOML parser's spans.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{Config, DURATION_MAX, PLACEHOLDERS, Problem};
use crate::model::check_name;
use crate::store::redact_url;

impl Config {
    /// Reads every stage's prompt template, inline or from its file.
    pub(super) fn load_templates(&mut self, base: &Path, problems: &mut Vec<Problem>) {
        for (name, stage) in &mut self.stages {
            stage.template = match (&stage.prompt, &stage.prompt_file) {
                (Some(_), Some(_)) => {
                    problems.push(Problem {
                        key: format!("stages.{name}.prompt_file"),
                        line: None,
                        message:
                            "give the prompt inline (prompt) or in a file (prompt_file), not both"
                                .to_string(),
                    });
                    None
                }
                (Some(text), None) => Some(text.clone()),
                (None, Some(file)) => match std::fs::read_to_string(base.join(file)) {
                    Ok(text) => Some(text),
                    Err(e) => {
                        problems.push(Problem {
                            key: format!("stages.{name}.prompt_file"),
                            line: None,
                            message: format!("cannot read {}: {e}", base.join(file).display()),
                        });
                        None
                    }
                },
                (None, None) => None,
            };
        }
    }

    pub(super) fn validate(&self, problems: &mut Vec<Problem>) {
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
            ("node.adoption_window", self.node.adoption_window),
            ("repo.network_timeout", self.repo.network_timeout),
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
        for (key, d) in self.retention.periods() {
            if d.is_zero() || d > super::RETENTION_MAX {
                problem(
                    key,
                    format!(
                        "{} is not between 1s and {}",
                        humantime::format_duration(d),
                        humantime::format_duration(super::RETENTION_MAX)
                    ),
                );
            }
        }
        if !self.node.host.is_empty() && self.node.host.trim().is_empty() {
            problem(
                "node.host",
                "is blank; leave it out to use the hostname".to_string(),
            );
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
        if let Some(msg) = self.repo.token_env.as_deref().and_then(check_env_name) {
            problem("repo.token_env", msg);
        }
        for (key, cmd) in [
            ("repo.setup", &self.repo.setup),
            ("repo.before_stage", &self.repo.before_stage),
        ] {
            if cmd.first().is_some_and(|p| p.trim().is_empty()) {
                problem(key, "starts with an empty program".to_string());
            }
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
            if let Err(msg) = check_name(name) {
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
            if let Some(template) = &stage.template {
                let key = if stage.prompt.is_some() {
                    "prompt"
                } else {
                    "prompt_file"
                };
                if let Err(e) = crate::prompt::check(template) {
                    problem(&format!("stages.{name}.{key}"), e.to_string());
                }
            } else if stage.command.iter().any(|a| a.contains("{prompt}")) {
                problem(
                    &key,
                    "uses {prompt}, but the stage has no prompt (prompt or prompt_file)"
                        .to_string(),
                );
            }
            if let Some(msg) = check_duration(stage.timeout) {
                problem(&format!("stages.{name}.timeout"), msg);
            }
            if let Some(msg) = check_duration(stage.gate.timeout) {
                problem(&format!("stages.{name}.gate.timeout"), msg);
            }
            for (var, value) in &stage.env {
                let key = format!("stages.{name}.env.{var}");
                let valid_name = !var.is_empty()
                    && !var.starts_with(|c: char| c.is_ascii_digit())
                    && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid_name {
                    problem(
                        &key,
                        "is not a variable name (letters, digits and _)".into(),
                    );
                } else if var.starts_with("BATON_") || var == "TRACEPARENT" {
                    problem(
                        &key,
                        "is set by baton for every run; choose another name".into(),
                    );
                }
                if (value.starts_with("${") && !value.ends_with('}'))
                    || crate::config::StageSettings::env_reference(value).is_some_and(str::is_empty)
                {
                    problem(
                        &key,
                        format!("{value:?} is neither a literal nor \"${{NAME}}\""),
                    );
                }
            }
            if stage.max_concurrent == Some(0) {
                problem(
                    &format!("stages.{name}.max_concurrent"),
                    "must be at least 1 (leave it out for no bound)".into(),
                );
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
            if plane.poll_interval > DURATION_MAX {
                problem(
                    "plane.poll_interval",
                    "is absurdly long; use \"0s\" to turn the poll off".to_string(),
                );
            }
            if plane.requests_per_minute == 0 || plane.requests_per_minute > 6000 {
                problem(
                    "plane.requests_per_minute",
                    format!("{} is not between 1 and 6000", plane.requests_per_minute),
                );
            }
            if let Some(w) = &plane.web_url
                && !w.starts_with("http://")
                && !w.starts_with("https://")
            {
                problem("plane.web_url", format!("{w:?} is not an http(s) URL"));
            }
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

/// A place in the parsed document while a key path is followed.
enum Node<'a, 't> {
    Table(&'a DeTable<'t>),
    Array(&'a [Spanned<DeValue<'t>>]),
    Leaf,
}

/// Where keys are in a config file, from the parser's spans.
pub(super) struct KeyPositions<'t> {
    text: &'t str,
    root: Option<Spanned<DeTable<'t>>>,
}

impl<'t> KeyPositions<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        KeyPositions {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// The 1-based line of a byte offset.
    pub(super) fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The line that defines `key` (a dotted path; array elements by index), or of its
    /// deepest ancestor that the file defines.
    pub(super) fn line_of_key(&self, key: &str) -> Option<usize> {
        let mut node = Node::Table(self.root.as_ref()?.get_ref());
        let mut found: Option<Range<usize>> = None;
        for part in key.split('.') {
            let value = match node {
                Node::Table(t) => match t.iter().find(|(k, _)| k.get_ref().as_ref() == part) {
                    Some((k, v)) => {
                        found = Some(k.span());
                        v
                    }
                    None => break,
                },
                Node::Array(items) => match part.parse::<usize>().ok().and_then(|i| items.get(i)) {
                    Some(v) => {
                        found = Some(v.span());
                        v
                    }
                    None => break,
                },
                Node::Leaf => break,
            };
            node = match value.get_ref() {
                DeValue::Table(t) => Node::Table(t),
                DeValue::Array(a) => Node::Array(a),
                _ => Node::Leaf,
            };
        }
        found.map(|span| self.line_of_offset(span.start))
    }

    /// The dotted path of the deepest key whose value holds `offset`: what a parser's
    /// error at that position is about.
    pub(super) fn key_at_offset(&self, offset: usize) -> String {
        let mut path = Vec::new();
        let Some(root) = &self.root else {
            return String::new();
        };
        let mut table = root.get_ref();
        'descend: loop {
            for (k, v) in table.iter() {
                if k.span().contains(&offset) || v.span().contains(&offset) {
                    path.push(k.get_ref().to_string());
                    if let DeValue::Table(t) = v.get_ref() {
                        table = t;
                        continue 'descend;
                    }
                    break 'descend;
                }
            }
            break;
        }
        path.join(".")
    }
}

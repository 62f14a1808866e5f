//! What baton reads from its environment: its own secrets, from the variables the config
//! names, what `baton config check` shows of them, and the overrides of the file.

use super::{Config, DATABASE_URL_VARS};
use crate::store::redact_url;

impl Config {
    /// The effective settings as TOML, secrets redacted, followed by the state of every
    /// environment variable the config names for a secret.
    pub fn render_effective(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        let mut out =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        let secrets = self.secret_vars();
        out.push_str("\n# secrets (values are never shown)\n");
        if secrets.is_empty() && self.stage_env_references().is_empty() {
            out.push_str("# none configured\n");
        }
        for SecretVar { key, var, .. } in secrets {
            let state = match std::env::var_os(&var) {
                Some(v) if !v.is_empty() => "set",
                _ => "NOT SET",
            };
            out.push_str(&format!("# {key}: ${var} is {state}\n"));
        }
        for (key, var) in self.stage_env_references() {
            let state = match std::env::var_os(&var) {
                Some(v) if !v.is_empty() => "set",
                _ => "NOT SET: the stage's agents run without it",
            };
            out.push_str(&format!("# {key}: ${var} is {state}\n"));
        }
        out
    }

    /// The effective settings as JSON (`config check --json`), secrets redacted, with
    /// the state of every variable the config names for a secret or a stage's `env`.
    pub fn effective_json(&self) -> serde_json::Value {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        let is_set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
        let secrets: Vec<serde_json::Value> =
            self.secret_vars()
                .into_iter()
                .map(|s| serde_json::json!({"key": s.key, "var": s.var, "set": is_set(&s.var)}))
                .chain(self.stage_env_references().into_iter().map(
                    |(key, var)| serde_json::json!({"key": key, "var": var, "set": is_set(&var)}),
                ))
                .collect();
        serde_json::json!({"settings": shown, "secrets": secrets})
    }

    /// Every environment variable that holds one of baton's own secrets: the one list
    /// that reading, redacting and keeping them from agents all use.
    pub fn secret_vars(&self) -> Vec<SecretVar> {
        let mut v = Vec::new();
        if let Some(f) = &self.forge {
            v.push(SecretVar::new(
                "forge.token_env",
                &f.token_env,
                Secret::ForgeToken,
            ));
        }
        if let Some(p) = &self.plane {
            v.push(SecretVar::new(
                "plane.api_key_env",
                &p.api_key_env,
                Secret::PlaneApiKey,
            ));
            if let Some(w) = &p.webhook_secret_env {
                v.push(SecretVar::new(
                    "plane.webhook_secret_env",
                    w,
                    Secret::WebhookSecret,
                ));
            }
        }
        if let Some(t) = &self.http.token_env {
            v.push(SecretVar::new("http.token_env", t, Secret::ApiToken));
        }
        if let Some(t) = &self.repo.token_env {
            v.push(SecretVar::new("repo.token_env", t, Secret::RepoToken));
        }
        v
    }

    /// How this node reaches the repository: its URL, ssh key and https token (the
    /// repository's own, else the forge's).
    pub fn repo_access(&self, secrets: &Secrets) -> crate::workspace::RepoAccess {
        crate::workspace::RepoAccess {
            url: self.repo.url.clone(),
            ssh_key: self.repo.ssh_key.clone(),
            token: secrets.repo_token.clone().or(secrets.forge_token.clone()),
        }
    }

    /// The variables an agent (or anything else baton starts) must not inherit: the
    /// secrets, the database URL overrides, which may carry a password, and the variables
    /// a stage's `env` takes its values from (only that stage gets them, under its name).
    pub fn hidden_vars(&self) -> Vec<String> {
        let mut v: Vec<String> = DATABASE_URL_VARS.iter().map(|s| s.to_string()).collect();
        v.extend(self.secret_vars().into_iter().map(|s| s.var));
        v.extend(self.stage_env_references().into_iter().map(|(_, var)| var));
        v.sort();
        v.dedup();
        v
    }

    /// Every `"${NAME}"` value of a stage's `env`: (its key path, NAME).
    pub fn stage_env_references(&self) -> Vec<(String, String)> {
        self.stages
            .iter()
            .flat_map(|(name, stage)| {
                stage.env.iter().filter_map(move |(key, value)| {
                    let var = super::StageSettings::env_reference(value)?;
                    Some((format!("stages.{name}.env.{key}"), var.to_string()))
                })
            })
            .collect()
    }

    /// The environment `stage` adds for its agent and gate, its references read from
    /// baton's environment now.
    pub fn stage_env(&self, stage: &str) -> std::collections::BTreeMap<String, String> {
        self.stages
            .get(stage)
            .map(|s| s.resolved_env(|var| std::env::var(var).ok().filter(|v| !v.is_empty())))
            .unwrap_or_default()
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
    /// `repo.token_env`'s token for an https remote.
    pub repo_token: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |v: &Option<String>| if v.is_some() { "set" } else { "unset" };
        f.debug_struct("Secrets")
            .field("forge_token", &s(&self.forge_token))
            .field("plane_api_key", &s(&self.plane_api_key))
            .field("webhook_secret", &s(&self.webhook_secret))
            .field("api_token", &s(&self.api_token))
            .field("repo_token", &s(&self.repo_token))
            .finish()
    }
}

impl Secrets {
    pub fn from_env(config: &Config) -> Secrets {
        let mut secrets = Secrets::default();
        for s in config.secret_vars() {
            let value = std::env::var(&s.var).ok().filter(|v| !v.is_empty());
            let slot = match s.secret {
                Secret::ForgeToken => &mut secrets.forge_token,
                Secret::PlaneApiKey => &mut secrets.plane_api_key,
                Secret::WebhookSecret => &mut secrets.webhook_secret,
                Secret::ApiToken => &mut secrets.api_token,
                Secret::RepoToken => &mut secrets.repo_token,
            };
            *slot = value;
        }
        secrets
    }
}

/// Which of baton's secrets a variable holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    ForgeToken,
    PlaneApiKey,
    WebhookSecret,
    ApiToken,
    RepoToken,
}

/// A config key that names an environment variable holding a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVar {
    /// The config key, e.g. `forge.token_env`.
    pub key: &'static str,
    /// The variable's name.
    pub var: String,
    pub secret: Secret,
}

impl SecretVar {
    fn new(key: &'static str, var: &str, secret: Secret) -> Self {
        SecretVar {
            key,
            var: var.to_string(),
            secret,
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
        let database_url = DATABASE_URL_VARS
            .iter()
            .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
        EnvOverrides { database_url }
    }
}

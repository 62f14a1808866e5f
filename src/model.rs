//! The domain vocabulary: task keys, verdicts, claims, deciders, effect payloads and
//! backoff. Everything here is plain data with no I/O, shared by every layer; the
//! statuses stored in the database live in the `entity` crate and are re-exported here.
//!
//! Values are parsed once at the edge (the CLI, the API, the webhook) into these types,
//! and everything inside takes the type, never a string to re-check.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use entity::{
    AdvanceDecider, EffectKind, EffectStatus, EventKind, EventSource, JobStatus, RunOutcome,
    TaskStatus,
};

/// Names (task keys, stage names) become branch, directory and file names: at most this
/// many characters.
pub const NAME_LEN_MAX: usize = 64;

/// Checks a name used for task keys and stage names: ASCII letters, digits, '-', '_' and
/// '.', not starting with '-' or '.', no "..", at most [`NAME_LEN_MAX`] characters. The
/// error says what is wrong, for the caller to prefix with what the name is.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_string());
    }
    if name.chars().count() > NAME_LEN_MAX {
        let head: String = name.chars().take(20).collect();
        return Err(format!(
            "{head:?}... is longer than {NAME_LEN_MAX} characters"
        ));
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

/// A task's key, such as `ORCH-65`: checked once where it enters (see [`check_name`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskKey(String);

impl TaskKey {
    pub fn parse(key: impl Into<String>) -> Result<TaskKey, String> {
        let key = key.into();
        check_name(&key).map_err(|msg| format!("invalid task key: {msg}"))?;
        Ok(TaskKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TaskKey::parse(s)
    }
}

impl From<TaskKey> for String {
    fn from(k: TaskKey) -> String {
        k.0
    }
}

impl std::str::FromStr for TaskKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TaskKey::parse(s)
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl AsRef<str> for TaskKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The entry point through which a person (or their tracker) acted on a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Cli,
    Api,
    Webhook,
}

impl From<Origin> for EventSource {
    fn from(o: Origin) -> EventSource {
        match o {
            Origin::Cli => EventSource::Cli,
            Origin::Api => EventSource::Api,
            Origin::Webhook => EventSource::Webhook,
        }
    }
}

/// Why the Reaper claims for a run (brief §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapTier {
    /// Tier 1: the agent is gone without an exit status.
    LostAgent,
    /// Tier 2: the exit was recorded `finalize_grace` ago and nobody finalized the run.
    Unfinished,
    /// The agent ran past its stage timeout and was killed.
    Timeout,
}

impl ReapTier {
    /// The name recorded in events and metrics: `1`, `2` or `timeout`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReapTier::LostAgent => "1",
            ReapTier::Unfinished => "2",
            ReapTier::Timeout => "timeout",
        }
    }
}

impl fmt::Display for ReapTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl Serialize for ReapTier {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Who sends a claim: the run's Monitor (normal path) or the Reaper (recovery), with the
/// tier it reaps at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    Monitor,
    Reaper(ReapTier),
}

impl Decider {
    pub fn advance_decider(self) -> AdvanceDecider {
        match self {
            Decider::Monitor => AdvanceDecider::Monitor,
            Decider::Reaper(_) => AdvanceDecider::Reaper,
        }
    }

    pub fn source(self) -> EventSource {
        match self {
            Decider::Monitor => EventSource::Monitor,
            Decider::Reaper(_) => EventSource::Reaper,
        }
    }

    pub fn tier(self) -> Option<ReapTier> {
        match self {
            Decider::Monitor => None,
            Decider::Reaper(t) => Some(t),
        }
    }

    pub fn as_str(self) -> &'static str {
        self.advance_decider().as_str()
    }
}

impl Serialize for Decider {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What the sender of a claim decided, read-only, before claiming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The gate passed: advance to the next stage, or end the task.
    Passed,
    /// The gate's verdict file said reject: loop back to the stage's `on_reject`.
    Rejected,
    /// The gate failed: retry with backoff, or fail the job and the task.
    Failed { reason: String },
    /// The agent is gone without an exit status (Reaper tier 1).
    Lost { reason: String },
    /// The agent ran past its stage timeout and was killed.
    TimedOut,
}

impl Verdict {
    /// The run's `outcome` column.
    pub fn outcome(&self) -> RunOutcome {
        match self {
            Verdict::Passed => RunOutcome::Passed,
            Verdict::Rejected => RunOutcome::Rejected,
            Verdict::Failed { .. } => RunOutcome::Failed,
            Verdict::Lost { .. } => RunOutcome::Lost,
            Verdict::TimedOut => RunOutcome::Timeout,
        }
    }

    /// A failed attempt, which is retried while attempts are left.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Verdict::Failed { .. } | Verdict::Lost { .. } | Verdict::TimedOut
        )
    }
}

/// A request to finalize one run of one job.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub job_id: i64,
    /// The fence: the claim wins only if this is the job's `current_run_id`.
    pub run_id: i64,
    pub verdict: Verdict,
    pub decided_by: Decider,
    pub commit_sha: Option<String>,
    /// What the next job of this decision starts with: the verdict's text on a
    /// rejection, the failure and the end of the log on a failed attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<String>,
    /// What the agent's tool reported it used, recorded on the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// What an agent's tool reported it used (Claude Code's final `result` record, Codex's
/// `turn.completed` events). Each figure is absent when the tool did not report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    /// Millionths of a US dollar.
    pub cost_microusd: Option<i64>,
    pub turns: Option<i32>,
}

impl Usage {
    /// The sum of two usages; a figure is known when either knows it.
    pub fn plus(self, other: Usage) -> Usage {
        fn add<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            }
        }
        Usage {
            tokens_in: add(self.tokens_in, other.tokens_in),
            tokens_out: add(self.tokens_out, other.tokens_out),
            cost_microusd: add(self.cost_microusd, other.cost_microusd),
            turns: add(self.turns, other.turns),
        }
    }

    /// The usage recorded on a run.
    pub fn of_run(run: &entity::agent_runs::Model) -> Usage {
        Usage {
            tokens_in: run.tokens_in,
            tokens_out: run.tokens_out,
            cost_microusd: run.cost_microusd,
            turns: run.turns,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ClaimOutcome {
    Won(ClaimWon),
    /// Another claim finalized the job, or the run is not the job's current run.
    Lost,
    /// This very run's claim was already applied.
    AlreadyAdvanced,
}

impl ClaimOutcome {
    /// `won`, `lost` or `already_advanced`, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ClaimOutcome::Won(_) => "won",
            ClaimOutcome::Lost => "lost",
            ClaimOutcome::AlreadyAdvanced => "already_advanced",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimWon {
    /// The job's new status: `done`, `failed`, or `queued` for a retry.
    pub job_status: JobStatus,
    /// The next job the claim queued, as written: running when its hand-off took it.
    pub next_job: Option<entity::jobs::Model>,
    /// Set when the task ended with this claim.
    pub task_status: Option<TaskStatus>,
    pub effects: usize,
}

/// What an effect does, with the fields it needs. The `effects` row keeps the kind in its
/// `kind` column and these fields as JSON in `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EffectPayload {
    Push(PushPayload),
    PullRequest(PullRequestPayload),
    PlaneComment(PlaneCommentPayload),
    PlaneState(PlaneStatePayload),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushPayload {
    pub branch: String,
    pub commit: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestPayload {
    pub branch: String,
    pub base: String,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneCommentPayload {
    pub issue: String,
    pub task: String,
    pub stage: String,
    pub verdict: RunOutcome,
    pub run_id: i64,
    pub attempt: i32,
    pub commit: Option<String>,
    pub next_stage: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneStatePayload {
    pub issue: String,
    /// The state's name; its id is looked up at the time the effect is performed.
    pub state: String,
}

impl EffectPayload {
    pub fn kind(&self) -> EffectKind {
        match self {
            EffectPayload::Push(_) => EffectKind::Push,
            EffectPayload::PullRequest(_) => EffectKind::PullRequest,
            EffectPayload::PlaneComment(_) => EffectKind::PlaneComment,
            EffectPayload::PlaneState(_) => EffectKind::PlaneState,
        }
    }

    /// The `payload` column's text.
    pub fn to_json(&self) -> String {
        let v = match self {
            EffectPayload::Push(p) => serde_json::to_string(p),
            EffectPayload::PullRequest(p) => serde_json::to_string(p),
            EffectPayload::PlaneComment(p) => serde_json::to_string(p),
            EffectPayload::PlaneState(p) => serde_json::to_string(p),
        };
        v.unwrap_or_else(|_| "{}".to_string())
    }

    /// Reads a row's kind and payload back.
    pub fn from_row(kind: EffectKind, payload: &str) -> Result<EffectPayload, serde_json::Error> {
        Ok(match kind {
            EffectKind::Push => EffectPayload::Push(serde_json::from_str(payload)?),
            EffectKind::PullRequest => EffectPayload::PullRequest(serde_json::from_str(payload)?),
            EffectKind::PlaneComment => EffectPayload::PlaneComment(serde_json::from_str(payload)?),
            EffectKind::PlaneState => EffectPayload::PlaneState(serde_json::from_str(payload)?),
        })
    }
}

/// Exponential backoff, capped: the wait after failed attempt `n` (1 for the first) is
/// `initial * 2^(n-1)`, at most `max`. Job retries and effect retries both use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn after_attempt(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(30);
        self.initial
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// No text panics the key parser (a key of euro signs once did), and what it
        /// accepts is a safe file and branch name.
        #[test]
        fn no_text_panics_the_task_key_parser(text in "\\PC{0,100}") {
            if let Ok(key) = TaskKey::parse(text.clone()) {
                proptest::prop_assert!(key.as_str().len() <= 64);
                proptest::prop_assert!(key
                    .as_str()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
            }
        }
    }

    #[test]
    fn task_keys_are_checked_once_and_never_panic() {
        assert_eq!(TaskKey::parse("ORCH-65").unwrap().as_str(), "ORCH-65");
        for bad in ["", "-x", ".x", "a..b", "a b", "ä", "a/b"] {
            assert!(TaskKey::parse(bad).is_err(), "{bad:?} was accepted");
        }
        // Multi-byte characters past the length bound are cut by characters, not bytes.
        let euros = "€".repeat(30);
        let err = TaskKey::parse(euros.as_str()).unwrap_err();
        assert!(err.contains("contains"), "{err}");
        let long = "é".repeat(NAME_LEN_MAX + 1);
        assert!(TaskKey::parse(long).unwrap_err().contains("longer than 64"));
        // Tables pad keys and statuses to a width.
        assert_eq!(
            format!("{:<8}|", TaskKey::parse("A-1").unwrap()),
            "A-1     |"
        );
        assert_eq!(format!("{:<8}|", JobStatus::Done), "done    |");
        let k: TaskKey = serde_json::from_str("\"APP-1\"").unwrap();
        assert_eq!(k.to_string(), "APP-1");
        assert!(serde_json::from_str::<TaskKey>("\"../x\"").is_err());
    }

    #[test]
    fn backoff_doubles_from_the_first_failure_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
        };
        assert_eq!(b.after_attempt(1), Duration::from_secs(10));
        assert_eq!(b.after_attempt(2), Duration::from_secs(20));
        assert_eq!(b.after_attempt(3), Duration::from_secs(40));
        assert_eq!(b.after_attempt(10), Duration::from_secs(300));
        assert_eq!(b.after_attempt(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn effect_payloads_round_trip_through_their_row() {
        let p = EffectPayload::PlaneComment(PlaneCommentPayload {
            issue: "i".into(),
            task: "APP-1".into(),
            stage: "dev".into(),
            verdict: RunOutcome::Passed,
            run_id: 3,
            attempt: 1,
            commit: None,
            next_stage: Some("rev".into()),
        });
        let back = EffectPayload::from_row(p.kind(), &p.to_json()).unwrap();
        assert_eq!(back, p);
        assert!(EffectPayload::from_row(EffectKind::Push, "{\"branch\":1}").is_err());
    }

    #[test]
    fn deciders_name_their_source_and_tier() {
        let d = Decider::Reaper(ReapTier::Unfinished);
        assert_eq!(d.source(), EventSource::Reaper);
        assert_eq!(d.tier().map(ReapTier::as_str), Some("2"));
        assert_eq!(serde_json::to_value(d).unwrap(), "reaper");
        assert_eq!(Decider::Monitor.advance_decider(), AdvanceDecider::Monitor);
    }
}

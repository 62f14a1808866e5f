//! baton: a supervisor for AI-agent pipelines that advances every stage exactly once.
//!
//! A task (a ticket such as `ORCH-65`) goes through the stages of its pipeline; each
//! stage is one agent process in the task's git checkout. baton records every step in a
//! database (SQLite or PostgreSQL), which is the arbiter of who may advance a job.
//!
//! # Layout
//!
//! - [`config`]: the `baton.toml` format, defaults and validation.
//! - [`store`]: all database access, including the fenced claim; no SQL elsewhere.
//! - [`clock`]: time in the database's unit, controllable by tests.
//! - [`actors`]: the Supervisor, Dispatcher, Monitor, Reaper and Advancer (ractor).
//! - [`agent`]: the shim that starts agents in their own session, and their signals.
//! - [`gate`]: the read-only quality gate of a stage.
//! - [`effects`]: performing the outbox: push (git2), pull requests, Plane.
//! - [`workspace`]: one git checkout per task and the auto-commit (git2).
//! - [`http`]: the node's HTTP listener (axum): health, the API, metrics, the
//!   dashboard and Plane webhooks.
//! - [`service`]: `baton serve`: one node, started and stopped.
//! - [`demo`] and [`bench`]: the self-contained tour and the benchmark.
//! - [`telemetry`]: logs, one OpenTelemetry trace per task, metrics.
//! - [`cli`]: the command-line interface; `main.rs` only parses and dispatches.

pub mod actors;
pub mod agent;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod effects;
pub mod gate;
pub mod http;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod workspace;

/// This machine's host name, which runs and nodes are recorded with.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

//! baton: a supervisor for AI-agent pipelines that advances every stage exactly once.
//!
//! A task (a ticket such as `ORCH-65`) goes through the stages of its pipeline; each
//! stage is one agent process in the task's git checkout. baton records every step in a
//! database (SQLite or PostgreSQL), which is the arbiter of who may advance a job.
//!
//! # Layout
//!
//! From the bottom up: a module uses only the modules listed before it (and `entity`).
//!
//! - [`model`]: the domain vocabulary: task keys, statuses, verdicts, claims, deciders,
//!   effect payloads, backoff. No I/O.
//! - [`clock`]: time in the database's unit, controllable by tests.
//! - [`prompt`] and [`usage`]: prompt templates (minijinja) and the bounds on what agents
//!   are given; the usage an agent's tool reported in its log.
//! - [`policy`]: the pure transition policy: which transition a claim makes and which
//!   effects it writes.
//! - [`liveness`]: host liveness (alive, stopped within its adoption window, dead) from
//!   the node rows, which decides whether another host may take over a host's runs.
//! - [`store`]: all database access, split by topic; the fenced claim applies the
//!   policy's decision. No SQL elsewhere; knows no config, telemetry or actors.
//! - [`config`]: the `baton.toml` format, defaults, validation and secrets.
//! - [`telemetry`]: logs, one OpenTelemetry trace per task, metrics.
//! - [`agent`], [`workspace`], [`gate`]: the shim that starts agents, one git checkout
//!   per task, the read-only quality gate.
//! - [`effects`]: performing the outbox: push (git2), pull requests, Plane.
//! - [`tasks`]: the application layer: submit, cancel, retry, for every entry point.
//! - [`retention`]: `[retention]` and `baton gc`: what ended tasks left on disk.
//! - [`present`]: the JSON documents and terminal renderings of tasks.
//! - [`actors`]: the Supervisor, Dispatcher, Monitor, Reaper, Advancer,
//!   EffectWorker, PlanePoller and Janitor.
//! - [`http`]: the node's HTTP listener: the API, metrics, the dashboard, Plane webhooks.
//! - [`service`]: `baton serve`: one node, started and stopped.
//! - [`demo`] and [`bench`]: the self-contained tour and the benchmark.
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
pub mod liveness;
pub mod model;
pub mod policy;
pub mod present;
pub mod prompt;
pub mod retention;
pub mod service;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod usage;
pub mod workspace;

/// This machine's host name, which runs and nodes are recorded with.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

//! sea-orm entities of baton's schema, one module a table.
//!
//! Timestamps are integer milliseconds since the Unix epoch (see
//! `docs/adr/0003-integer-timestamps.md`): they compare the same way on SQLite and
//! PostgreSQL and come from baton's `Clock`, which tests control.

pub mod advances;
pub mod agent_runs;
pub mod effects;
pub mod events;
pub mod jobs;
pub mod leases;
pub mod nodes;
pub mod tasks;
pub mod types;
pub mod webhook_deliveries;

pub use types::{
    AdvanceDecider, EffectKind, EffectStatus, EventKind, EventSource, JobStatus, RunOutcome,
    TaskStatus,
};

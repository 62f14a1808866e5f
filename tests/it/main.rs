//! baton's integration tests: one binary, one module per area. Every test that touches
//! the database runs twice, on SQLite and on PostgreSQL (see `support`).

mod agents;
mod api;
mod cli;
mod dashboard;
mod durable;
mod effects;
mod handoff;
mod handoff_quiet;
mod locks;
mod mirror;
mod nodes;
mod pipeline;
mod reaper_windows;
mod restarts;
mod runs;
mod stages;
mod store;
mod support;
mod traces;
mod webhooks;
mod workspaces;

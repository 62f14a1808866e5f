//! Host liveness: one notion, keyed by host rather than by boot, that says whether the
//! runs of a host may be taken over by another host. The Reaper, the effect leases and
//! the durable-work rules all ask it ([ADR 0008](../docs/adr/0008-host-liveness.md)).
//!
//! - `Alive`: a node of the host heartbeats (within `reaper.heartbeat_timeout`) and has
//!   not stopped. The host itself finalizes or adopts its runs.
//! - `Stopped`: the host's latest boot stopped cleanly less than `node.adoption_window`
//!   ago. A restart or an upgrade is not a death: its runs wait for its next boot.
//! - `Dead`: neither. Other hosts may reap its runs and take over its effects.
//!
//! A pure function of the `nodes` rows, so that it is tested without a database.

use std::collections::HashMap;

use entity::nodes;

/// Whether a host's runs may be taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostLiveness {
    Alive,
    /// Stopped cleanly at `at`, within the adoption window.
    Stopped {
        at: i64,
    },
    Dead,
}

impl HostLiveness {
    /// Another host may reap this host's runs and take over its effect leases.
    pub fn is_dead(self) -> bool {
        self == HostLiveness::Dead
    }
}

/// The windows that decide liveness, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessWindows {
    pub heartbeat_timeout_ms: i64,
    pub adoption_window_ms: i64,
}

/// The liveness of a host from the rows of its nodes (every boot of it).
pub fn host_liveness(boots: &[&nodes::Model], now: i64, w: LivenessWindows) -> HostLiveness {
    if boots
        .iter()
        .any(|n| n.stopped_at.is_none() && now - n.heartbeat_at <= w.heartbeat_timeout_ms)
    {
        return HostLiveness::Alive;
    }
    // Only the latest boot speaks for the host: an older clean stop does not cover a
    // later boot that crashed.
    match boots.iter().max_by_key(|n| (n.started_at, n.heartbeat_at)) {
        Some(latest) => match latest.stopped_at {
            Some(at) if now - at <= w.adoption_window_ms => HostLiveness::Stopped { at },
            _ => HostLiveness::Dead,
        },
        // A host with no node row at all never ran anything that is still ours to wait on.
        None => HostLiveness::Dead,
    }
}

/// The liveness of every host among `nodes`.
pub fn by_host(
    nodes: &[nodes::Model],
    now: i64,
    w: LivenessWindows,
) -> HashMap<String, HostLiveness> {
    let mut boots: HashMap<&str, Vec<&nodes::Model>> = HashMap::new();
    for n in nodes {
        boots.entry(n.hostname.as_str()).or_default().push(n);
    }
    boots
        .into_iter()
        .map(|(host, b)| (host.to_string(), host_liveness(&b, now, w)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: LivenessWindows = LivenessWindows {
        heartbeat_timeout_ms: 60_000,
        adoption_window_ms: 600_000,
    };

    fn node(id: &str, started: i64, heartbeat: i64, stopped: Option<i64>) -> nodes::Model {
        nodes::Model {
            id: id.into(),
            hostname: "h".into(),
            pid: 1,
            started_at: started,
            heartbeat_at: heartbeat,
            stopped_at: stopped,
        }
    }

    #[test]
    fn a_heartbeating_node_keeps_its_host_alive() {
        let n = node("a", 0, 1_000_000, None);
        assert_eq!(host_liveness(&[&n], 1_050_000, W), HostLiveness::Alive);
        assert_eq!(host_liveness(&[&n], 1_060_001, W), HostLiveness::Dead);
    }

    #[test]
    fn a_clean_stop_keeps_the_runs_for_the_adoption_window() {
        let n = node("a", 0, 1_000_000, Some(1_000_000));
        assert_eq!(
            host_liveness(&[&n], 1_500_000, W),
            HostLiveness::Stopped { at: 1_000_000 }
        );
        assert_eq!(host_liveness(&[&n], 1_600_001, W), HostLiveness::Dead);
    }

    #[test]
    fn only_the_latest_boot_speaks_for_the_host() {
        // Stopped cleanly, then started again and crashed: dead once silent.
        let old = node("a", 0, 100_000, Some(100_000));
        let crashed = node("b", 200_000, 300_000, None);
        assert_eq!(
            host_liveness(&[&old, &crashed], 400_000, W),
            HostLiveness::Dead
        );
        // A new boot that heartbeats makes the host alive whatever the older ones did.
        let live = node("c", 500_000, 550_000, None);
        assert_eq!(
            host_liveness(&[&old, &crashed, &live], 560_000, W),
            HostLiveness::Alive
        );
    }

    #[test]
    fn hosts_are_told_apart() {
        let mut a = node("a", 0, 100, None);
        a.hostname = "one".into();
        let mut b = node("b", 0, 100, Some(100));
        b.hostname = "two".into();
        let all = by_host(&[a, b], 200, W);
        assert_eq!(all["one"], HostLiveness::Alive);
        assert_eq!(all["two"], HostLiveness::Stopped { at: 100 });
        assert!(!all["one"].is_dead());
    }
}

//! What the node's one Advancer did in a bench run, counted from its probe: the groups
//! of claims it decided and the time it spent deciding them (the rest of the run it
//! waited for claims). A busy Advancer is what the stages wait for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::actors::{Probe, ProbeEvent};

#[derive(Debug, Clone, Copy, Default)]
pub struct AdvancerLoad {
    pub claims: u64,
    pub groups: u64,
    pub busy: Duration,
}

impl AdvancerLoad {
    /// Counts one claim's event; the claims of a group are reported one after the other,
    /// each with the group's size and time. `left`: the group's claims still to come.
    fn add(&mut self, group: usize, elapsed_us: u64, left: &mut usize) {
        if *left == 0 {
            self.groups += 1;
            self.busy += Duration::from_micros(elapsed_us);
            *left = group;
        }
        *left = left.saturating_sub(1);
        self.claims += 1;
    }

    /// The mean claims per group.
    pub fn mean_group(&self) -> f64 {
        self.claims as f64 / self.groups.max(1) as f64
    }

    /// The mean time a group took, in ms.
    pub fn mean_ms(&self) -> f64 {
        self.busy.as_secs_f64() * 1000.0 / self.groups.max(1) as f64
    }

    /// The share of `run` spent deciding, in percent.
    pub fn busy_percent(&self, run: Duration) -> f64 {
        self.busy.as_secs_f64() * 100.0 / run.as_secs_f64().max(f64::EPSILON)
    }
}

/// Counts the Advancer's groups from the probe it hands out, until stopped.
pub(super) struct Counter {
    load: Arc<Mutex<AdvancerLoad>>,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    /// The probe to give the node, and the counter reading it.
    pub(super) fn start() -> (Probe, Counter) {
        let (probe, mut events) = tokio::sync::mpsc::unbounded_channel();
        let load = Arc::new(Mutex::new(AdvancerLoad::default()));
        let counted = load.clone();
        let task = tokio::spawn(async move {
            let mut left = 0;
            while let Some(ev) = events.recv().await {
                if let ProbeEvent::Advancer {
                    group, elapsed_us, ..
                } = ev
                    && let Ok(mut l) = counted.lock()
                {
                    l.add(group, elapsed_us, &mut left);
                }
            }
        });
        (probe, Counter { load, task })
    }

    /// What was counted; the node has stopped.
    pub(super) fn stop(self) -> AdvancerLoad {
        self.task.abort();
        self.load.lock().map(|l| *l).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_counts_once_with_its_time() {
        let mut load = AdvancerLoad::default();
        let mut left = 0;
        for (group, us) in [(3, 900), (3, 900), (3, 900), (1, 200), (2, 500), (2, 500)] {
            load.add(group, us, &mut left);
        }
        assert_eq!((load.claims, load.groups), (6, 3));
        assert_eq!(load.busy, Duration::from_micros(1600));
        assert!((load.mean_group() - 2.0).abs() < 1e-9);
        assert!((load.busy_percent(Duration::from_micros(3200)) - 50.0).abs() < 1e-9);
    }
}

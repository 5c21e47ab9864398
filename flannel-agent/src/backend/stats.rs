//! What the control plane spends on the datapath, as plain counters for logs and metrics:
//! how often the full peer set was reconciled and how long that took, and how long single
//! lease events took from arrival to programmed. Shared by cloning; cheap to update.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

/// Shared counters; clones see the same values.
#[derive(Clone, Debug, Default)]
pub struct Stats(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    reconciles: AtomicU64,
    reconcile_failures: AtomicU64,
    reconcile_nanos: AtomicU64,
    last_reconcile_nanos: AtomicU64,
    events: AtomicU64,
    event_failures: AtomicU64,
    event_nanos: AtomicU64,
    max_event_nanos: AtomicU64,
    peers: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Full reconciles run (start, snapshots, resyncs, repairs).
    pub reconciles: u64,
    /// Of those, how many reported an error.
    pub reconcile_failures: u64,
    /// Total time spent reconciling.
    pub reconcile_time: Duration,
    /// Duration of the latest reconcile.
    pub last_reconcile_time: Duration,
    /// Lease events applied one by one (adds, changes, removals).
    pub events: u64,
    /// Of those, how many failed in the backend.
    pub event_failures: u64,
    /// Total time from an event's arrival to its peer being programmed.
    pub event_time: Duration,
    /// The slowest single event.
    pub max_event_time: Duration,
    /// Peers in the set after the latest change.
    pub peers: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Stats {
    /// A full reconcile took `took`.
    pub fn reconciled(&self, took: Duration, ok: bool) {
        let i = &self.0;
        i.reconciles.fetch_add(1, Relaxed);
        if !ok {
            i.reconcile_failures.fetch_add(1, Relaxed);
        }
        i.reconcile_nanos.fetch_add(nanos(took), Relaxed);
        i.last_reconcile_nanos.store(nanos(took), Relaxed);
        crate::metrics::get().observe_reconcile(ok, took);
    }

    /// One lease event took `took` from arrival to programmed.
    pub fn event(&self, took: Duration, ok: bool) {
        let i = &self.0;
        i.events.fetch_add(1, Relaxed);
        if !ok {
            i.event_failures.fetch_add(1, Relaxed);
        }
        i.event_nanos.fetch_add(nanos(took), Relaxed);
        i.max_event_nanos.fetch_max(nanos(took), Relaxed);
        if ok {
            crate::metrics::get()
                .event_to_programmed
                .observe(took.as_secs_f64());
        }
    }

    /// The peer set now has `n` peers.
    pub fn set_peers(&self, n: usize) {
        self.0.peers.store(n as u64, Relaxed);
    }

    /// Read every counter.
    pub fn snapshot(&self) -> Snapshot {
        let i = &self.0;
        Snapshot {
            reconciles: i.reconciles.load(Relaxed),
            reconcile_failures: i.reconcile_failures.load(Relaxed),
            reconcile_time: Duration::from_nanos(i.reconcile_nanos.load(Relaxed)),
            last_reconcile_time: Duration::from_nanos(i.last_reconcile_nanos.load(Relaxed)),
            events: i.events.load(Relaxed),
            event_failures: i.event_failures.load(Relaxed),
            event_time: Duration::from_nanos(i.event_nanos.load(Relaxed)),
            max_event_time: Duration::from_nanos(i.max_event_nanos.load(Relaxed)),
            peers: i.peers.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_counters() {
        let s = Stats::default();
        let c = s.clone();
        c.reconciled(Duration::from_millis(3), true);
        c.reconciled(Duration::from_millis(5), false);
        c.event(Duration::from_millis(2), true);
        c.event(Duration::from_millis(7), true);
        c.set_peers(12);
        let snap = s.snapshot();
        assert_eq!(snap.reconciles, 2);
        assert_eq!(snap.reconcile_failures, 1);
        assert_eq!(snap.reconcile_time, Duration::from_millis(8));
        assert_eq!(snap.last_reconcile_time, Duration::from_millis(5));
        assert_eq!(snap.events, 2);
        assert_eq!(snap.max_event_time, Duration::from_millis(7));
        assert_eq!(snap.peers, 12);
    }
}

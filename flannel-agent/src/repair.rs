//! The repair ledger: every time the agent puts back something it owns that someone else
//! deleted or changed (a device, a route, a tcx link, a rule set, its own lease), it says so
//! here, once: one log line naming what was repaired, and one count per kind.
//!
//! The counts are plain process-wide data ([`counts`]) so the metrics endpoint can export
//! them as `flannel_repairs_total{kind="…"}` without being wired through every backend.
//! What *triggers* a repair lives elsewhere: the netlink monitor ([`crate::net::monitor`])
//! and the periodic resync in the agent's main loop.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

/// What was repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RepairKind {
    /// The VXLAN device was missing and was created again.
    Device,
    /// The VXLAN device's address, MTU, MAC or up flag was changed back.
    DeviceSettings,
    /// A per-peer route (VXLAN onlink route, direct route, host-gw route).
    Route,
    /// A per-peer neighbour (ARP) entry on the VXLAN device.
    Neighbour,
    /// A per-peer FDB entry on the VXLAN device.
    Fdb,
    /// The blackhole route for this host's subnet.
    BlackholeRoute,
    /// The masquerade / forward rules (nftables table or iptables chains).
    Rules,
    /// An eBPF program's tcx link (detached or unpinned).
    TcxLink,
    /// A pinned BPF map (unpinned or replaced).
    PinnedMap,
    /// The eBPF datapath configuration (CONFIG map: ifindexes, addresses, MAC).
    DatapathConfig,
    /// This host's own lease in the subnet store (overwritten or deleted).
    Lease,
    /// The nftables VXLAN peer guard (table, peer sets, chain or rules).
    PeerGuard,
}

impl RepairKind {
    /// Every kind, in a stable order (for exporting all counters, zeros included).
    pub const ALL: [Self; 12] = [
        Self::Device,
        Self::DeviceSettings,
        Self::Route,
        Self::Neighbour,
        Self::Fdb,
        Self::BlackholeRoute,
        Self::Rules,
        Self::TcxLink,
        Self::PinnedMap,
        Self::DatapathConfig,
        Self::Lease,
        Self::PeerGuard,
    ];

    /// The label value (`flannel_repairs_total{kind="route"}`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::DeviceSettings => "device_settings",
            Self::Route => "route",
            Self::Neighbour => "neighbour",
            Self::Fdb => "fdb",
            Self::BlackholeRoute => "blackhole_route",
            Self::Rules => "rules",
            Self::TcxLink => "tcx_link",
            Self::PinnedMap => "pinned_map",
            Self::DatapathConfig => "datapath_config",
            Self::Lease => "lease",
            Self::PeerGuard => "peer_guard",
        }
    }
}

impl std::fmt::Display for RepairKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

static COUNTS: [AtomicU64; RepairKind::ALL.len()] =
    [const { AtomicU64::new(0) }; RepairKind::ALL.len()];

/// Record one repair: counts it and logs one line naming it (`detail` says exactly what,
/// e.g. `"route 10.244.2.0/24 via 10.244.2.0 dev flannel.1"`).
pub fn record(kind: RepairKind, detail: impl std::fmt::Display) {
    COUNTS[kind as usize].fetch_add(1, Ordering::Relaxed);
    warn!(kind = kind.as_str(), "repaired {kind}: {detail}");
}

/// How many repairs of each kind this process made, every kind listed.
pub fn counts() -> Vec<(RepairKind, u64)> {
    RepairKind::ALL
        .iter()
        .map(|k| (*k, COUNTS[*k as usize].load(Ordering::Relaxed)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_index_their_own_counter() {
        for (i, k) in RepairKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k}");
        }
        let before = counts()
            .into_iter()
            .find(|(k, _)| *k == RepairKind::Fdb)
            .unwrap()
            .1;
        record(RepairKind::Fdb, "fdb 02:00:00:00:00:01 dst 198.18.0.2");
        let after = counts()
            .into_iter()
            .find(|(k, _)| *k == RepairKind::Fdb)
            .unwrap()
            .1;
        assert_eq!(after, before + 1);
    }
}

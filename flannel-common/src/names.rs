//! Names of maps, programs and pins, shared by the programs, the agent, the tests and the
//! docs. The kernel keeps 15 bytes of an object name, so every name here is at most that
//! long (checked below).

/// Version of the map layout. Part of the pin path: a release that changes any type in
/// [`crate::maps`] or [`crate::stats`] bumps it, so it never opens a pinned map of the old
/// layout (aya reuses a pinned map without checking its key or value size).
pub const LAYOUT_VERSION: &str = "v5";

/// Default bpffs directory under which the agent pins its maps and links.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/flannel";

/// LPM trie: remote pod subnet → peer ([`crate::Route`]).
pub const MAP_ROUTES: &str = "ROUTES";
/// Hash: peer underlay address (either family) → peer record ([`crate::Peer`]); the
/// ingress allow-list.
pub const MAP_PEERS: &str = "PEERS";
/// Array with one element: this host's [`crate::DatapathConfig`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Per-CPU array indexed by peer slot: [`crate::PeerStats`].
pub const MAP_PEER_STATS: &str = "PEER_STATS";
/// Hash: local pod IPv4 → [`crate::Endpoint`], for the opt-in fast path.
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Per-CPU array indexed by [`crate::DropReason`]: [`crate::Counter`].
pub const MAP_DROPS: &str = "DROPS";
/// Per-CPU array indexed by [`crate::stats::PassReason`]: [`crate::Counter`]. Packets the
/// programs handed to the kernel path, and why.
pub const MAP_PASSES: &str = "PASSES";

/// TC egress program on `flannel.<VNI>`: encapsulates routed overlay traffic.
pub const PROG_ENCAP: &str = "vxlan_encap";
/// TC ingress program on the uplink: decapsulates VXLAN from known peers.
pub const PROG_DECAP: &str = "vxlan_decap";
/// TC ingress program on a pod's host-side veth: what the pod sends (fast path sender).
pub const PROG_FROM_POD: &str = "from_pod";
/// TC egress program on a pod's host-side veth: what the kernel path delivers to the pod.
pub const PROG_TO_POD: &str = "to_pod";
/// Never attached: run once by the agent through `BPF_PROG_TEST_RUN` to learn whether the
/// kernel offers [`crate::maps::BPF_F_ADJ_ROOM_DECAP_L4_UDP`].
pub const PROG_PROBE_DECAP_L4_UDP: &str = "probe_decap_l4";

/// Maximum number of flows the per-flow fast path tracks (least recently used go first).
pub const MAX_FLOWS: u32 = 65536;

/// LRU hash: [`crate::FlowKey`] → [`crate::Flow`], the per-flow fast path's observations.
pub const MAP_FLOWS: &str = "FLOWS";
/// Ring buffer of [`crate::FlowKey`]s: verified TCP flows whose conntrack entry the agent
/// should make safe to skip before they go fast.
pub const MAP_FLOW_EVENTS: &str = "FLOW_EVENTS";
/// Per-CPU array indexed by [`crate::PathReason`]: [`crate::Counter`]. Fast path vs
/// kernel path, and why.
pub const MAP_PATHS: &str = "PATHS";

/// Most strangers (sources of dropped VXLAN) tracked at once; the least recent go first.
pub const MAX_STRANGERS: u32 = 1024;

/// LRU hash: outer source address, either family ([`crate::PeerKey`]) → [`crate::Counter`], VXLAN the
/// known-peer check dropped.
pub const MAP_STRANGERS: &str = "STRANGERS";

/// Every map name, for pinning and for cleanup.
pub const ALL_MAPS: [&str; 11] = [
    MAP_ROUTES,
    MAP_PEERS,
    MAP_ENDPOINTS,
    MAP_CONFIG,
    MAP_PEER_STATS,
    MAP_DROPS,
    MAP_PASSES,
    MAP_FLOWS,
    MAP_FLOW_EVENTS,
    MAP_PATHS,
    MAP_STRANGERS,
];

/// Maximum number of local pods the fast path delivers to directly.
pub const MAX_ENDPOINTS: u32 = 1024;

/// Peer capacity compiled into the object (slots in [`MAP_PEER_STATS`], entries in
/// [`MAP_PEERS`] and [`MAP_ROUTES`]). Only a default: the agent sizes these three maps for
/// the cluster at load time (the network's subnet count, or `--ebpf-max-peers`), and
/// resizes pinned ones of another size on restart.
pub const DEFAULT_PEER_CAPACITY: u32 = 4096;

/// The maps whose size is the peer capacity.
pub const PEER_MAPS: [&str; 3] = [MAP_ROUTES, MAP_PEERS, MAP_PEER_STATS];

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(ALL_MAPS[i].len() <= 15);
        i += 1;
    }
    assert!(PROG_ENCAP.len() <= 15);
    assert!(PROG_DECAP.len() <= 15);
    assert!(PROG_FROM_POD.len() <= 15);
    assert!(PROG_TO_POD.len() <= 15);
    assert!(PROG_PROBE_DECAP_L4_UDP.len() <= 15);
};

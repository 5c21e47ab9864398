//! Every map the programs use. BTF-defined (`#[btf_map]`) so the kernel knows the key and
//! value types and `bpftool map dump` prints field names. Names and sizes come from
//! `flannel_common::names`; the agent pins them under the versioned pin directory.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use flannel_common::{
    Counter, DatapathConfig, DropReason, Endpoint, EndpointKey, Flow, FlowKey, PassReason,
    PathReason, Peer, PeerKey, PeerStats, Route,
    names::{DEFAULT_PEER_CAPACITY, MAX_ENDPOINTS, MAX_FLOWS, MAX_STRANGERS},
};

/// The compiled size of the peer-keyed maps; the agent overrides it at load time.
const PEERS_MAX: usize = DEFAULT_PEER_CAPACITY as usize;

/// Remote pod subnet (either family, 16-byte keys: see `flannel_common::Route`) → peer.
/// LPM so subnets of any length can coexist.
#[btf_map]
pub static ROUTES: LpmTrie<[u8; 16], Route, PEERS_MAX> = LpmTrie::new();

/// Peer underlay address (either family) → peer. No-prealloc so an update is an RCU swap of the whole value:
/// a reader never sees a half-written entry.
#[btf_map]
pub static PEERS: HashMap<PeerKey, Peer, PEERS_MAX, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Local pod IPv4 → where to deliver it directly (opt-in fast path).
#[btf_map]
pub static ENDPOINTS: HashMap<
    EndpointKey,
    Endpoint,
    { MAX_ENDPOINTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// This host's parameters; element 0.
#[btf_map]
pub static CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Per-peer traffic, indexed by `Route::peer_slot` / `Peer::slot`.
#[btf_map]
pub static PEER_STATS: PerCpuArray<PeerStats, PEERS_MAX> = PerCpuArray::new();

/// Drops by `DropReason`.
#[btf_map]
pub static DROPS: PerCpuArray<Counter, { DropReason::COUNT as usize }> = PerCpuArray::new();

/// Hand-offs to the kernel path by `PassReason`.
#[btf_map]
pub static PASSES: PerCpuArray<Counter, { PassReason::COUNT as usize }> = PerCpuArray::new();

/// Per-flow fast path observations. LRU: a full table forgets the least recently used
/// flow, which then simply takes the kernel path and is verified again.
#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, Flow, { MAX_FLOWS as usize }> = LruHashMap::new();

/// Verified TCP flows the agent should prepare conntrack for (64 KiB: 4096 events).
#[btf_map]
pub static FLOW_EVENTS: RingBuf<FlowKey, { 64 * 1024 }> = RingBuf::new();

/// Fast path vs kernel path by `PathReason`.
#[btf_map]
pub static PATHS: PerCpuArray<Counter, { PathReason::COUNT as usize }> = PerCpuArray::new();

/// VXLAN the known-peer check dropped, by outer source address: the agent reads it to
/// name each stranger once, with the remedy (a peer sending from an address its lease
/// does not list). LRU: a flood of spoofed sources pushes out the oldest, never fails.
/// Per-CPU, like every counter here: no atomics (the BPF target has no atomic RMW in
/// `core`), the agent sums the CPUs.
#[btf_map]
pub static STRANGERS: LruPerCpuHashMap<PeerKey, Counter, { MAX_STRANGERS as usize }> =
    LruPerCpuHashMap::new();

/// Room for the IPv6 encapsulation's headers, which do not fit the 512-byte BPF stack
/// next to everything else it holds.
#[repr(C)]
pub struct Scratch6 {
    /// The headers written in front of the inner packet.
    pub headers: [u8; flannel_common::wire::VXLAN6_HEADERS],
    /// The inner IPv6 header, as read.
    pub inner: [u8; flannel_common::wire::IPV6_LEN],
}

/// Per-CPU [`Scratch6`]. Not pinned and not shared: each loaded object has its own, and
/// a program run only uses its CPU's.
#[btf_map]
pub static SCRATCH6: PerCpuArray<Scratch6, 1> = PerCpuArray::new();

/// Count one dropped packet of `bytes` from the stranger `addr` (16 bytes, IPv4-mapped
/// for IPv4).
#[inline(always)]
pub fn count_stranger(addr: [u8; 16], bytes: u32) {
    let key = PeerKey { addr };
    match STRANGERS.get_ptr_mut(key) {
        // SAFETY: this CPU's value, valid for the program's run; nothing else writes it now.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        },
        // A new entry: this CPU's value is set, the other CPUs' start at zero.
        None => {
            let first = Counter {
                packets: 1,
                bytes: u64::from(bytes),
            };
            let _ = STRANGERS.insert(key, first, u64::from(BPF_NOEXIST));
        }
    }
}

/// The datapath configuration in place (no copy on the stack), if the agent has enabled
/// it.
#[inline(always)]
pub fn config_ref() -> Option<&'static DatapathConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & flannel_common::maps::CONFIG_F_ENABLED == 0 {
        return None;
    }
    Some(cfg)
}

/// The datapath configuration, if the agent has enabled it.
#[inline(always)]
pub fn config() -> Option<DatapathConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & flannel_common::maps::CONFIG_F_ENABLED == 0 {
        return None;
    }
    Some(*cfg)
}

/// The route for a 16-byte destination address, if any.
#[inline(always)]
pub fn route(dst: [u8; 16]) -> Option<Route> {
    ROUTES
        .get(&aya_ebpf::maps::lpm_trie::Key::new(128, dst))
        .copied()
}

/// Add one packet of `bytes` to a per-CPU counter (no atomics: the slot is this CPU's).
#[inline(always)]
pub fn count<const N: usize>(map: &PerCpuArray<Counter, N>, index: u32, bytes: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, valid for the program's run; nothing else writes it now.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

/// Account a packet sent to (`tx`) or received from a peer.
#[inline(always)]
pub fn count_peer(slot: u32, bytes: u32, tx: bool) {
    if let Some(s) = PEER_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            if tx {
                (*s).tx_packets += 1;
                (*s).tx_bytes += u64::from(bytes);
            } else {
                (*s).rx_packets += 1;
                (*s).rx_bytes += u64::from(bytes);
            }
        }
    }
}

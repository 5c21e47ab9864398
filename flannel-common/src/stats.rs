//! Per-CPU counters: per peer, per drop reason, per pass-to-kernel reason.

/// Value of [`crate::names::MAP_PEER_STATS`]: traffic exchanged with one peer through the
/// eBPF path (the kernel fallback path is counted by the kernel on `flannel.<VNI>`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerStats {
    /// Packets encapsulated towards the peer (a GSO super-packet counts once).
    pub tx_packets: u64,
    /// Bytes of those packets before encapsulation.
    pub tx_bytes: u64,
    /// Packets from the peer decapsulated and delivered.
    pub rx_packets: u64,
    /// Bytes of those packets after decapsulation.
    pub rx_bytes: u64,
}

/// Value of [`crate::names::MAP_DROPS`] and [`crate::names::MAP_PASSES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Their bytes as seen by the program.
    pub bytes: u64,
}

/// Why the ingress program dropped a packet: index into [`crate::names::MAP_DROPS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// VXLAN on our port from an underlay address that holds no lease.
    UnknownPeer = 0,
    /// VXLAN on our port with another VNI.
    BadVni = 1,
    /// VXLAN header flags other than the I bit.
    BadFlags = 2,
    /// A header claimed to be there but was cut short.
    Malformed = 3,
}

impl DropReason {
    /// Number of reasons: the size of the drops map.
    pub const COUNT: u32 = 4;
    /// Every reason, in index order.
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::UnknownPeer,
        Self::BadVni,
        Self::BadFlags,
        Self::Malformed,
    ];

    /// Stable name for logs, metrics and `flanneld` output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::UnknownPeer => "unknown_peer",
            Self::BadVni => "bad_vni",
            Self::BadFlags => "bad_flags",
            Self::Malformed => "malformed",
        }
    }
}

/// Why a program handed a packet to the kernel path instead of handling it: index into
/// [`crate::names::MAP_PASSES`]. None of these is an error; they explain where traffic went.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// The agent has not enabled the datapath yet.
    Disabled = 0,
    /// No route for the destination in the routes map.
    NoRoute = 1,
    /// Not IP the programs carry (ARP, …; IPv6 when this host has no `flannel-v6.<VNI>`,
    /// IPv4 when it has no `flannel.<VNI>`, i.e. is IPv6-only).
    NotIpv4 = 2,
    /// Too big for the uplink once encapsulated: the kernel sends frag-needed or fragments.
    TooBig = 3,
    /// An outer IPv4 fragment or IPv4 options from a known peer: the kernel reassembles (the
    /// peer check has already run on the first fragment).
    Fragment = 4,
    /// A GSO aggregate on ingress: the kernel VXLAN device decapsulates it (6.18 cannot clear
    /// the tunnel GSO state from BPF).
    GsoIngress = 5,
    /// A helper refused (adjust_room, fib lookup, redirect): the kernel path retries.
    HelperFailed = 6,
    /// The inner frame is not addressed to our VTEP MAC or is not IPv4.
    NotForUs = 7,
    /// VXLAN from an address that is not a known peer, with the peer check off
    /// (`--vxlan-peer-check=false`): the kernel device takes it, as upstream's does.
    UnknownPeer = 8,
    /// The inner source lies outside the sending peer's subnet (e.g. the peer's host
    /// traffic that is not masqueraded): the kernel device carries it, as upstream's does.
    ForeignSource = 9,
    /// A known peer's plain VXLAN packet whose outer IPv4 header checksum is wrong or whose
    /// IPv4/UDP lengths do not match the packet: the kernel drops or trims it, as it does
    /// without our programs; it is never decapsulated as it stands.
    BadOuter = 10,
    /// A GSO aggregate to send over IPv6: IPv6 needs an outer UDP checksum in every
    /// segment, which only the kernel device can fill (BPF cannot mark the aggregate
    /// `SKB_GSO_UDP_TUNNEL_CSUM`), so `flannel-v6.<VNI>` sends it.
    Ipv6Gso = 11,
    /// IPv6 the programs leave to the kernel: an inner packet with extension headers or
    /// an upper layer other than TCP, UDP (with a checksum) or ICMPv6 (its outer UDP
    /// checksum cannot be had without reading the payload), or a known peer's outer IPv6
    /// with extension headers (fragments included), which the kernel parses.
    Ipv6Unsupported = 12,
}

impl PassReason {
    /// Number of reasons: the size of the passes map.
    pub const COUNT: u32 = 13;
    /// Every reason, in index order.
    pub const ALL: [PassReason; Self::COUNT as usize] = [
        Self::Disabled,
        Self::NoRoute,
        Self::NotIpv4,
        Self::TooBig,
        Self::Fragment,
        Self::GsoIngress,
        Self::HelperFailed,
        Self::NotForUs,
        Self::UnknownPeer,
        Self::ForeignSource,
        Self::BadOuter,
        Self::Ipv6Gso,
        Self::Ipv6Unsupported,
    ];

    /// Stable name for logs, metrics and `flanneld` output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::NoRoute => "no_route",
            Self::NotIpv4 => "not_ipv4",
            Self::TooBig => "too_big",
            Self::Fragment => "fragment",
            Self::GsoIngress => "gso_ingress",
            Self::HelperFailed => "helper_failed",
            Self::NotForUs => "not_for_us",
            Self::UnknownPeer => "unknown_peer",
            Self::ForeignSource => "foreign_source",
            Self::BadOuter => "bad_outer",
            Self::Ipv6Gso => "ipv6_gso",
            Self::Ipv6Unsupported => "ipv6_unsupported",
        }
    }
}

/// Which path a pod's overlay packet took under the per-flow fast path, and why it took the
/// kernel path: index into [`crate::names::MAP_PATHS`]. Counted where the decision is made:
/// TC ingress of a pod's veth for packets a pod sends, the uplink for VXLAN from a peer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathReason {
    /// Sent on the fast path from the pod's veth: IPv4 encapsulated there and sent
    /// straight out of the uplink; IPv6 handed straight to `flannel-v6.<VNI>`'s transmit
    /// (whose program or driver encapsulates it, the driver filling each GSO segment's
    /// outer UDP checksum).
    FastTx = 0,
    /// Received on the fast path: decapsulated and put straight into the pod.
    FastRx = 1,
    /// Kernel path: the destination is no remote pod (a Service address, this host, a
    /// local pod, the outside world).
    Unrouted = 2,
    /// Kernel path: not TCP/UDP over IPv4 without options and fragmentation, or over IPv6
    /// without extension headers.
    Unsupported = 3,
    /// Kernel path: the flow has not been seen to pass netfilter unchanged in both
    /// directions (new, NATed, or dropped by policy).
    Unverified = 4,
    /// Kernel path: the periodic re-check of a fast flow (netfilter, conntrack timeout).
    Refresh = 5,
    /// Kernel path: TCP SYN, FIN or RST, or the rest of a closing TCP flow.
    TcpControl = 6,
    /// Kernel path: a verified TCP flow whose conntrack entry the agent has not yet made
    /// safe to skip.
    ConntrackPending = 7,
    /// Kernel path: too big for the overlay MTU (the kernel sends frag-needed).
    TooBig = 8,
    /// Kernel path: TTL (hop limit) would expire (the kernel sends time-exceeded).
    TtlExpired = 9,
    /// Kernel path: the packet carries an skb mark, which policy may route or filter by.
    Marked = 10,
}

impl PathReason {
    /// Number of reasons: the size of the paths map.
    pub const COUNT: u32 = 11;
    /// Every reason, in index order.
    pub const ALL: [PathReason; Self::COUNT as usize] = [
        Self::FastTx,
        Self::FastRx,
        Self::Unrouted,
        Self::Unsupported,
        Self::Unverified,
        Self::Refresh,
        Self::TcpControl,
        Self::ConntrackPending,
        Self::TooBig,
        Self::TtlExpired,
        Self::Marked,
    ];

    /// Stable name for logs, metrics and `flanneld` output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FastTx => "fast_tx",
            Self::FastRx => "fast_rx",
            Self::Unrouted => "kernel_unrouted",
            Self::Unsupported => "kernel_unsupported",
            Self::Unverified => "kernel_unverified",
            Self::Refresh => "kernel_refresh",
            Self::TcpControl => "kernel_tcp_control",
            Self::ConntrackPending => "kernel_conntrack_pending",
            Self::TooBig => "kernel_too_big",
            Self::TtlExpired => "kernel_ttl_expired",
            Self::Marked => "kernel_marked",
        }
    }

    /// Whether packets counted under this reason took the fast path.
    pub const fn is_fast(self) -> bool {
        matches!(self, Self::FastTx | Self::FastRx)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]` structs of `u64`s: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::PeerStats {}
    unsafe impl aya::Pod for super::Counter {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn counters_layout_is_pinned() {
        assert_eq!(size_of::<PeerStats>(), 32);
        assert_eq!(offset_of!(PeerStats, tx_packets), 0);
        assert_eq!(offset_of!(PeerStats, tx_bytes), 8);
        assert_eq!(offset_of!(PeerStats, rx_packets), 16);
        assert_eq!(offset_of!(PeerStats, rx_bytes), 24);
        assert_eq!(size_of::<Counter>(), 16);
    }

    #[test]
    fn reason_indices_are_dense_and_stable() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in PassReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in PathReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert_eq!(PathReason::FastTx.as_str(), "fast_tx");
        assert_eq!(DropReason::UnknownPeer.as_str(), "unknown_peer");
        assert_eq!(PassReason::GsoIngress.as_str(), "gso_ingress");
    }
}

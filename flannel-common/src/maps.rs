//! Map keys and values.

/// The route is a DirectRouting peer: forward the inner packet as is (no VXLAN), because the
/// peer shares our L2 segment.
pub const ROUTE_F_DIRECT: u16 = 1;

/// Value of [`crate::names::MAP_ROUTES`]: where to send traffic for a remote pod subnet.
///
/// Both families share the peer-keyed maps (routes, peers, strangers): every address in
/// them is 16 bytes, an IPv6 address as it is and an IPv4 address IPv4-mapped
/// (`::ffff:a.b.c.d`, [`crate::wire::v4_mapped`]), so one trie and one hash serve both
/// and an IPv4 subnet `/n` is the mapped prefix `/96+n`. The programs never look an IPv6
/// packet's address up when it is IPv4-mapped (the kernel drops such packets), so the two
/// families cannot meet in a key.
///
/// The key is the kernel's `struct bpf_lpm_trie_key_u8` with sixteen data bytes (aya's
/// `lpm_trie::Key<[u8; 16]>` on both sides): prefix length, then the subnet base in network
/// order, which the trie matches most-significant bit first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Peer's underlay (public) address, 16 bytes (IPv4-mapped for IPv4): the outer
    /// destination, and the outer family (the inner one's: IPv4 over IPv4, IPv6 over IPv6,
    /// as upstream's two devices).
    pub peer_ip: [u8; 16],
    /// Peer's VTEP MAC: the inner destination MAC the peer's VXLAN device accepts.
    pub vtep_mac: [u8; 6],
    /// `ROUTE_F_*` bits.
    pub flags: u16,
    /// Index into [`crate::names::MAP_PEER_STATS`].
    pub peer_slot: u32,
}

/// Key of [`crate::names::MAP_PEERS`] and [`crate::names::MAP_STRANGERS`]: an underlay
/// address, 16 bytes (IPv4-mapped for IPv4, see [`Route`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Underlay address, network order.
    pub addr: [u8; 16],
}

/// Value of [`crate::names::MAP_PEERS`]: what the ingress program knows about a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Index into [`crate::names::MAP_PEER_STATS`].
    pub slot: u32,
    /// The pod subnet (of the key's family) base, 16 bytes as in [`Route`]: inner sources
    /// outside it are spoofed.
    pub subnet: [u8; 16],
    /// Prefix length of `subnet` over 128 bits (an IPv4 `/24` is `/120`).
    pub prefix_len: u32,
}

/// Key of [`crate::names::MAP_ENDPOINTS`]: a local pod's IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// Pod IPv4, network order.
    pub addr: [u8; 4],
}

/// Value of [`crate::names::MAP_ENDPOINTS`]: how to hand a decapsulated packet straight to a
/// local pod (fast path: `bpf_redirect_peer` into the pod's namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Interface index of the pod veth's host side (the bridge port).
    pub ifindex: u32,
    /// The pod's MAC: destination of the delivered frame.
    pub pod_mac: [u8; 6],
    /// The host side veth's MAC: source of the delivered frame.
    pub host_mac: [u8; 6],
}

/// The datapath is configured and may handle packets. Until the agent sets it, both
/// programs hand everything to the kernel path.
pub const CONFIG_F_ENABLED: u32 = 1;

/// Opt-in "all flows" fast path: VXLAN for a local pod listed in the endpoints map is
/// decapsulated and delivered straight into the pod's namespace, GSO aggregates included,
/// whatever the flow. This skips the host's routing and netfilter (FORWARD, conntrack,
/// reverse NAT) for that traffic, so kube-proxy Services and netfilter-based NetworkPolicy
/// break for it; the per-flow fast path ([`CONFIG_F_FLOW_CACHE`]) is the safe default.
pub const CONFIG_F_FAST_INGRESS: u32 = 2;

/// Turns the known-peer check off (`--vxlan-peer-check=false`): VXLAN from an address
/// that is not in the peers map is handed to the kernel device, which accepts anyone, as
/// upstream's does. Off by default, so a zeroed flag word never opens the check.
pub const CONFIG_F_ANY_PEER: u32 = 4;

/// The network uses VXLAN Group Based Policy (`"GBP": true`): the G bit and the policy id
/// are accepted on ingress and written into `skb->mark`, and egress writes the policy id
/// from `skb->mark`, exactly as the kernel device configured with `gbp` does.
pub const CONFIG_F_GBP: u32 = 8;

/// Per-flow fast path (the default): a pod-to-remote-pod TCP/UDP flow whose packets the
/// kernel path carried unchanged (no NAT) through netfilter in both directions skips the
/// bridge, routing, netfilter and `flannel.<VNI>` on both hosts, with one packet per
/// direction re-checked on the kernel path every [`DatapathConfig::flow_refresh_ms`].
pub const CONFIG_F_FLOW_CACHE: u32 = 16;

/// The kernel's `bpf_skb_adjust_room` knows [`BPF_F_ADJ_ROOM_DECAP_L4_UDP`] (the agent's
/// probe says so): a GSO aggregate from a known peer that no fast path takes is
/// decapsulated in BPF onto the kernel path too, the flag clearing the tunnel GSO state
/// the kernel's own decap clears. Without it such aggregates go to `flannel.<VNI>`
/// undecapsulated, since a decapsulated aggregate that keeps `SKB_GSO_UDP_TUNNEL` would
/// be re-segmented wrongly on its next transmit.
pub const CONFIG_F_DECAP_L4_UDP: u32 = 32;

/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (1 << 10): proposed in 2026 (bpf-next), not in Linux
/// 6.18 and not in aya's bindings. Flags are checked when the helper runs, not by the
/// verifier, so a kernel without it answers `-EINVAL` at run time: hence a probe.
pub const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;

/// Value of [`crate::names::MAP_CONFIG`] (one element): this host's VXLAN parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// VXLAN UDP destination port, host order (8472 for flannel).
    pub port: u16,
    /// Lowest outer UDP source port, host order (the kernel's `ip_local_port_range`).
    pub sport_min: u16,
    /// One past the highest outer UDP source port, host order.
    pub sport_max: u16,
    /// Padding, always zero.
    pub _pad0: u16,
    /// This host's underlay IPv4, network order: the outer source address.
    pub local_ip: [u8; 4],
    /// This host's VTEP MAC (the MAC of `flannel.<VNI>`): inner frames for us carry it.
    pub vtep_mac: [u8; 6],
    /// Padding, always zero.
    pub _pad1: [u8; 2],
    /// Interface index of the uplink the outer packets leave through.
    pub uplink_ifindex: u32,
    /// Interface index of `flannel.<VNI>`, where decapsulated packets are delivered.
    pub vxlan_ifindex: u32,
    /// Outer TTL.
    pub ttl: u8,
    /// Padding, always zero.
    pub _pad2: u8,
    /// Largest inner IPv4 packet the overlay carries (the `flannel.<VNI>` MTU): bigger
    /// packets leave the fast path so the kernel sends frag-needed or fragments.
    pub mtu: u16,
    /// How often, per direction, one packet of a fast flow takes the kernel path again, to
    /// re-check netfilter and refresh conntrack (milliseconds).
    pub flow_refresh_ms: u32,
    /// This host's underlay IPv6, network order: the outer source over IPv6. All zero
    /// without `flannel-v6.<VNI>`, which leaves IPv6 to the kernel path.
    pub local_ip6: [u8; 16],
    /// The MAC of `flannel-v6.<VNI>`: inner IPv6 frames for us carry it.
    pub vtep_mac6: [u8; 6],
    /// Largest inner IPv6 packet the overlay carries (the `flannel-v6.<VNI>` MTU), as
    /// `mtu` is for IPv4.
    pub mtu6: u16,
    /// Interface index of `flannel-v6.<VNI>`, where decapsulated IPv6 is delivered; 0
    /// without it.
    pub vxlan6_ifindex: u32,
}

/// The agent made conntrack safe for this TCP flow to skip it (window tracking liberal,
/// as `nf_flow_table` does for offloaded flows), or conntrack does not track it.
pub const FLOW_F_CT_READY: u32 = 1;
/// A FIN or RST was seen: the rest of the flow stays on the kernel path so conntrack sees
/// the teardown.
pub const FLOW_F_CLOSING: u32 = 2;

/// Key of [`crate::names::MAP_FLOWS`]: a flow between a local pod and a remote pod, seen
/// from the local pod (the same key for both directions).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The local pod's address, network order: IPv6, or IPv4 mapped into IPv6
    /// (`::ffff:a.b.c.d`, as the route and peer maps hold it).
    pub pod: [u8; 16],
    /// The remote pod's address, in the same form.
    pub remote: [u8; 16],
    /// The local pod's port, host order.
    pub pod_port: u16,
    /// The remote pod's port, host order.
    pub remote_port: u16,
    /// IP protocol (TCP or UDP).
    pub proto: u8,
    /// Padding, always zero.
    pub _pad: [u8; 3],
}

/// Value of [`crate::names::MAP_FLOWS`]: what the programs observed of one flow. "seen"
/// stamps are taken before netfilter (TC ingress of the pod's veth for packets the pod
/// sends, the uplink for packets it receives), "ok" stamps after it with the 5-tuple
/// unchanged (TC egress of `flannel.<VNI>`, TC egress of the pod's veth). Times are
/// `bpf_ktime_get_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    /// Last packet from the pod seen before netfilter.
    pub tx_seen_ns: u64,
    /// Last packet from the pod that left netfilter unchanged.
    pub tx_ok_ns: u64,
    /// Last packet to the pod seen before netfilter.
    pub rx_seen_ns: u64,
    /// Last packet to the pod that left netfilter unchanged.
    pub rx_ok_ns: u64,
    /// When the programs last asked the agent to prepare conntrack for this flow.
    pub ct_asked_ns: u64,
    /// Packets from the pod sent on the fast path.
    pub fast_tx_packets: u64,
    /// Packets to the pod delivered on the fast path.
    pub fast_rx_packets: u64,
    /// The host-side veth the kernel path delivered the flow's packets to.
    pub rx_ifindex: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    /// Destination and source MAC of the frames the kernel path delivered to the pod.
    pub rx_eth: [u8; 12],
    /// Padding, always zero.
    pub _pad: [u8; 4],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // with explicit padding fields, so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::Route {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn route_layout_is_pinned() {
        assert_eq!(size_of::<Route>(), 28);
        assert_eq!(align_of::<Route>(), 4);
        assert_eq!(offset_of!(Route, peer_ip), 0);
        assert_eq!(offset_of!(Route, vtep_mac), 16);
        assert_eq!(offset_of!(Route, flags), 22);
        assert_eq!(offset_of!(Route, peer_slot), 24);
    }

    #[test]
    fn peer_layout_is_pinned() {
        assert_eq!(size_of::<PeerKey>(), 16);
        assert_eq!(size_of::<Peer>(), 24);
        assert_eq!(offset_of!(Peer, slot), 0);
        assert_eq!(offset_of!(Peer, subnet), 4);
        assert_eq!(offset_of!(Peer, prefix_len), 20);
    }

    #[test]
    fn endpoint_layout_is_pinned() {
        assert_eq!(size_of::<EndpointKey>(), 4);
        assert_eq!(size_of::<Endpoint>(), 16);
        assert_eq!(offset_of!(Endpoint, ifindex), 0);
        assert_eq!(offset_of!(Endpoint, pod_mac), 4);
        assert_eq!(offset_of!(Endpoint, host_mac), 10);
    }

    #[test]
    fn config_layout_is_pinned() {
        assert_eq!(size_of::<DatapathConfig>(), 72);
        assert_eq!(align_of::<DatapathConfig>(), 4);
        assert_eq!(offset_of!(DatapathConfig, flags), 0);
        assert_eq!(offset_of!(DatapathConfig, vni), 4);
        assert_eq!(offset_of!(DatapathConfig, port), 8);
        assert_eq!(offset_of!(DatapathConfig, sport_min), 10);
        assert_eq!(offset_of!(DatapathConfig, sport_max), 12);
        assert_eq!(offset_of!(DatapathConfig, local_ip), 16);
        assert_eq!(offset_of!(DatapathConfig, vtep_mac), 20);
        assert_eq!(offset_of!(DatapathConfig, uplink_ifindex), 28);
        assert_eq!(offset_of!(DatapathConfig, vxlan_ifindex), 32);
        assert_eq!(offset_of!(DatapathConfig, ttl), 36);
        assert_eq!(offset_of!(DatapathConfig, mtu), 38);
        assert_eq!(offset_of!(DatapathConfig, flow_refresh_ms), 40);
        assert_eq!(offset_of!(DatapathConfig, local_ip6), 44);
        assert_eq!(offset_of!(DatapathConfig, vtep_mac6), 60);
        assert_eq!(offset_of!(DatapathConfig, mtu6), 66);
        assert_eq!(offset_of!(DatapathConfig, vxlan6_ifindex), 68);
    }

    #[test]
    fn flow_layout_is_pinned() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(offset_of!(FlowKey, remote), 16);
        assert_eq!(offset_of!(FlowKey, pod_port), 32);
        assert_eq!(offset_of!(FlowKey, proto), 36);
        assert_eq!(size_of::<Flow>(), 80);
        assert_eq!(offset_of!(Flow, fast_rx_packets), 48);
        assert_eq!(offset_of!(Flow, rx_ifindex), 56);
        assert_eq!(offset_of!(Flow, flags), 60);
        assert_eq!(offset_of!(Flow, rx_eth), 64);
    }
}

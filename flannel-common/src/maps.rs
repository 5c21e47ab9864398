//! Map keys and values.

/// The route is a DirectRouting peer: forward the inner packet as is (no VXLAN), because the
/// peer shares our L2 segment.
pub const ROUTE_F_DIRECT: u16 = 1;

/// Value of [`crate::names::MAP_ROUTES`]: where to send traffic for a remote pod subnet.
///
/// The key is the kernel's `struct bpf_lpm_trie_key_u8` with four data bytes (aya's
/// `lpm_trie::Key<[u8; 4]>` on both sides): prefix length, then the subnet base in network
/// order, which the trie matches most-significant bit first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Peer's underlay (public) IPv4, network order: the outer destination.
    pub peer_ip: [u8; 4],
    /// Peer's VTEP MAC: the inner destination MAC the peer's VXLAN device accepts.
    pub vtep_mac: [u8; 6],
    /// `ROUTE_F_*` bits.
    pub flags: u16,
    /// Index into [`crate::names::MAP_PEER_STATS`].
    pub peer_slot: u32,
}

/// Key of [`crate::names::MAP_PEERS`]: a peer's underlay IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Underlay IPv4, network order.
    pub addr: [u8; 4],
}

/// Value of [`crate::names::MAP_PEERS`]: what the ingress program knows about a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Index into [`crate::names::MAP_PEER_STATS`].
    pub slot: u32,
    /// The peer's pod subnet base, network order: inner sources outside it are spoofed.
    pub subnet: [u8; 4],
    /// Prefix length of `subnet`.
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

/// Opt-in fast path: VXLAN for a local pod listed in the endpoints map is decapsulated and
/// delivered straight into the pod's namespace, GSO aggregates included. This skips the
/// host's routing and netfilter (FORWARD, conntrack) for that traffic, so it is off by
/// default: kube-proxy Services and netfilter-based NetworkPolicy need the default path.
pub const CONFIG_F_FAST_INGRESS: u32 = 2;

/// Turns the known-peer check off (`--vxlan-peer-check=false`): VXLAN from an address
/// that is not in the peers map is handed to the kernel device, which accepts anyone, as
/// upstream's does. Off by default, so a zeroed flag word never opens the check.
pub const CONFIG_F_ANY_PEER: u32 = 4;

/// The network uses VXLAN Group Based Policy (`"GBP": true`): the G bit and the policy id
/// are accepted on ingress and written into `skb->mark`, and egress writes the policy id
/// from `skb->mark`, exactly as the kernel device configured with `gbp` does.
pub const CONFIG_F_GBP: u32 = 8;

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
    pub _pad2: [u8; 3],
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn route_layout_is_pinned() {
        assert_eq!(size_of::<Route>(), 16);
        assert_eq!(align_of::<Route>(), 4);
        assert_eq!(offset_of!(Route, peer_ip), 0);
        assert_eq!(offset_of!(Route, vtep_mac), 4);
        assert_eq!(offset_of!(Route, flags), 10);
        assert_eq!(offset_of!(Route, peer_slot), 12);
    }

    #[test]
    fn peer_layout_is_pinned() {
        assert_eq!(size_of::<PeerKey>(), 4);
        assert_eq!(size_of::<Peer>(), 12);
        assert_eq!(offset_of!(Peer, slot), 0);
        assert_eq!(offset_of!(Peer, subnet), 4);
        assert_eq!(offset_of!(Peer, prefix_len), 8);
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
        assert_eq!(size_of::<DatapathConfig>(), 40);
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
    }
}

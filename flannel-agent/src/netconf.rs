//! The cluster network configuration (`net-conf.json`, etcd `<prefix>/config`).
//!
//! SKELETON: the control-plane work fills in parsing (Go-JSON semantics: case-insensitive
//! keys), defaulting and validation exactly as upstream's `CheckNetworkConfig`.

use ipnetwork::{Ipv4Network, Ipv6Network};

/// The validated network configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Whether the IPv4 family is enabled (default true).
    pub enable_ipv4: bool,
    /// Whether the IPv6 family is enabled.
    pub enable_ipv6: bool,
    /// IPv4 cluster network.
    pub network: Option<Ipv4Network>,
    /// Per-host IPv4 prefix length.
    pub subnet_len: u8,
    /// First allocatable IPv4 subnet base.
    pub subnet_min: std::net::Ipv4Addr,
    /// Last allocatable IPv4 subnet base.
    pub subnet_max: std::net::Ipv4Addr,
    /// IPv6 cluster network.
    pub ipv6_network: Option<Ipv6Network>,
    /// Per-host IPv6 prefix length.
    pub ipv6_subnet_len: u8,
    /// First allocatable IPv6 subnet base.
    pub ipv6_subnet_min: Option<std::net::Ipv6Addr>,
    /// Last allocatable IPv6 subnet base.
    pub ipv6_subnet_max: Option<std::net::Ipv6Addr>,
    /// Use nftables rather than iptables for masquerade/forward rules.
    pub enable_nftables: bool,
    /// The backend section.
    pub backend: BackendConfig,
}

/// The `Backend` section, by `Type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendConfig {
    /// `"vxlan"`.
    Vxlan(VxlanConfig),
    /// `"host-gw"`.
    HostGw,
}

impl BackendConfig {
    /// Upstream's name for the backend type, as published in leases.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Vxlan(_) => "vxlan",
            Self::HostGw => "host-gw",
        }
    }
}

/// Options of the vxlan backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanConfig {
    /// VXLAN network identifier (default 1).
    pub vni: u32,
    /// UDP port (default 8472).
    pub port: u16,
    /// Group Based Policy extension.
    pub gbp: bool,
    /// MAC learning on the device (default off).
    pub learning: bool,
    /// Plain routes to peers on the same L2 segment.
    pub direct_routing: bool,
    /// Uplink MTU override; the device gets this minus 50.
    pub mtu: Option<u32>,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self {
            vni: flannel_common::wire::FLANNEL_VNI,
            port: flannel_common::wire::FLANNEL_VXLAN_PORT,
            gbp: false,
            learning: false,
            direct_routing: false,
            mtu: None,
        }
    }
}

//! SKELETON: host networking helpers.
pub mod blackhole;
pub mod conntrack;
pub mod iface;
pub mod masq;
pub mod monitor;
pub mod netlink;
pub mod nexthop;
pub mod sockets;
pub mod vxlan_guard;

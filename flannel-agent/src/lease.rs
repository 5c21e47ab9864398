//! Leases: a host's claim on one subnet of the cluster network, in upstream flannel's wire
//! format (etcd key `<prefix>/subnets/10.244.7.0-24`, value JSON below).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// What a host publishes with its lease: where to reach it and its backend's data.
///
/// Serialises exactly as upstream's `lease.LeaseAttrs` (field names, order, and
/// `"PublicIPv6":null` when absent).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// Underlay IPv4 peers send to.
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// Underlay IPv6 peers send to, when IPv6 is enabled.
    #[serde(rename = "PublicIPv6")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Backend that owns the lease ("vxlan", "host-gw"); empty for upstream's udp backend.
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    /// Backend-specific JSON (vxlan: `{"VNI":1,"VtepMAC":"…"}`), kept verbatim.
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<Box<RawValue>>,
    /// IPv6 counterpart of `backend_data`.
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, other: &Self) -> bool {
        let raw = |r: &Option<Box<RawValue>>| r.as_ref().map(|r| r.get().to_owned());
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw(&self.backend_data) == raw(&other.backend_data)
            && raw(&self.backend_v6_data) == raw(&other.backend_v6_data)
    }
}
impl Eq for LeaseAttrs {}

/// A host's lease: its subnet(s) and attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 pod subnet (network address, e.g. 10.244.7.0/24).
    pub subnet: Ipv4Network,
    /// The IPv6 pod subnet, when IPv6 is enabled.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// Published attributes.
    pub attrs: LeaseAttrs,
}

/// A change in the set of leases, as a subnet manager reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// The complete current set (on start, and again after a resync: a relist after a
    /// disconnect or compaction). Anything not in it is gone.
    Snapshot(Vec<Lease>),
    /// A lease appeared or changed.
    Added(Lease),
    /// A lease went away (deleted or expired). Only the subnet is guaranteed to be right:
    /// etcd's delete events carry no value.
    Removed(Lease),
}

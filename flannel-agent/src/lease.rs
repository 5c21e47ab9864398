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
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    /// Backend-specific JSON (vxlan: `{"VNI":1,"VtepMAC":"…"}`), kept verbatim.
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<Box<RawValue>>,
    /// IPv6 counterpart of `backend_data`.
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
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

/// Why a lease record (etcd key or value) could not be read. Each names what was wrong so
/// the warning for a skipped record points at it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The key does not end in `a.b.c.d-N[&v6-M]`.
    #[error("subnet key {key:?} is not of the form a.b.c.d-N[&ipv6-M]")]
    BadKey {
        /// The key as found.
        key: String,
    },
    /// The value is not upstream's `LeaseAttrs` JSON.
    #[error("lease value is not valid lease JSON: {reason}")]
    BadValue {
        /// serde_json's message.
        reason: String,
    },
    /// The vxlan `BackendData` is missing or malformed.
    #[error("vxlan BackendData {data:?} is invalid: {reason}")]
    BadBackendData {
        /// The raw JSON (or `null`).
        data: String,
        /// What is wrong.
        reason: String,
    },
}

/// The subnet(s) a lease is keyed by: the IPv4 subnet and, for dual stack, the IPv6 one.
pub type SubnetId = (Ipv4Network, Option<Ipv6Network>);

/// Upstream's `ParseSubnetKey` pattern. Unanchored at the start on purpose (upstream applies
/// it to the full etcd key); `[0-9]` rather than `\d` because Go's RE2 `\d` is ASCII only.
static SUBNET_KEY_RE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"([0-9]+\.[0-9]+.[0-9]+.[0-9]+)-([0-9]+)(?:&([a-f0-9:]+)-([0-9]+))?$")
        .expect("static subnet key regex compiles")
});

/// The etcd key suffix for a lease: `10.5.34.0-24` or `10.12.13.0-24&fd00:12:13::-56`
/// (upstream `MakeSubnetKey`; IPv6 in RFC 5952 form, which is Go's too).
pub fn make_subnet_key(subnet: Ipv4Network, ipv6_subnet: Option<Ipv6Network>) -> String {
    match ipv6_subnet {
        None => format!("{}-{}", subnet.ip(), subnet.prefix()),
        Some(v6) => format!(
            "{}-{}&{}-{}",
            subnet.ip(),
            subnet.prefix(),
            v6.ip(),
            v6.prefix()
        ),
    }
}

/// Parses a subnet key (or a full etcd key ending in one), as upstream's `ParseSubnetKey`:
/// the IPv4 prefix must fit 5 bits (so at most 31) and the IPv6 one 7 bits.
pub fn parse_subnet_key(key: &str) -> Result<SubnetId, Error> {
    let bad = || Error::BadKey {
        key: key.to_owned(),
    };
    let caps = SUBNET_KEY_RE.captures(key).ok_or_else(bad)?;
    let ip: Ipv4Addr = caps[1].parse().map_err(|_| bad())?;
    let len: u8 = caps[2].parse().ok().filter(|l| *l < 32).ok_or_else(bad)?;
    let v4 = Ipv4Network::new(ip, len).map_err(|_| bad())?;
    let v6 = match (caps.get(3), caps.get(4)) {
        (Some(ip6), Some(len6)) => {
            let ip6: Ipv6Addr = ip6.as_str().parse().map_err(|_| bad())?;
            let len6: u8 = len6
                .as_str()
                .parse()
                .ok()
                .filter(|l| *l < 128)
                .ok_or_else(bad)?;
            Some(Ipv6Network::new(ip6, len6).map_err(|_| bad())?)
        }
        _ => None,
    };
    Ok((v4, v6))
}

impl LeaseAttrs {
    /// The value upstream stores in etcd (Go `json.Marshal` of `LeaseAttrs`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("LeaseAttrs always serialises")
    }

    /// Parses an etcd lease value. A `null`/non-IPv4 `PublicIP` makes the whole value
    /// unreadable, as upstream.
    pub fn from_json(value: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(value).map_err(|e| Error::BadValue {
            reason: e.to_string(),
        })
    }
}

impl Lease {
    /// The subnet(s) identifying this lease.
    pub fn id(&self) -> SubnetId {
        (self.subnet, self.ipv6_subnet)
    }

    /// The etcd key suffix of this lease.
    pub fn key(&self) -> String {
        make_subnet_key(self.subnet, self.ipv6_subnet)
    }
}

/// A MAC address, printed as Go's `net.HardwareAddr` (lower-case, `:`-separated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    /// Accepts `:` or `-` separators, either case (Go's `ParseMAC` for 6-byte addresses).
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a 6-byte MAC address"));
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("{s:?} is not a 6-byte MAC address"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} has a non-hex byte"))?;
        }
        Ok(Self(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The vxlan backend's `BackendData`: `{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    /// The peer's VNI.
    #[serde(rename = "VNI", alias = "vni", alias = "Vni")]
    pub vni: u32,
    /// The MAC of the peer's `flannel.<VNI>` device.
    #[serde(
        rename = "VtepMAC",
        alias = "vtepMAC",
        alias = "vtepmac",
        alias = "VtepMac"
    )]
    pub vtep_mac: MacAddr,
}

impl VxlanBackendData {
    /// The raw JSON to put in [`LeaseAttrs::backend_data`].
    pub fn to_raw(&self) -> Box<RawValue> {
        let s = serde_json::to_string(self).expect("VxlanBackendData always serialises");
        RawValue::from_string(s).expect("serde_json output is valid JSON")
    }

    /// Reads a peer's vxlan data; a missing or malformed value names the raw JSON.
    pub fn from_raw(raw: Option<&RawValue>) -> Result<Self, Error> {
        let text = raw.map_or("null", RawValue::get);
        serde_json::from_str(text).map_err(|e| Error::BadBackendData {
            data: text.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// One thing the backend must do after a lease event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Program (or re-program, when its attributes changed) a peer.
    Add(Lease),
    /// Remove a peer; carries the last lease seen for it, so its PublicIP/VTEP MAC are known.
    Remove(Lease),
}

/// The set of peers (every lease but our own), maintained from [`LeaseEvent`]s.
///
/// Pure, so the rules that decide what the backend is told are unit-tested without etcd:
/// the own lease is filtered out (by IPv4 subnet, as upstream does for etcd), a removal is
/// reported with the cached lease (delete events carry no value), a snapshot is diffed
/// against the cache, and unlike upstream a snapshot whose entry changed attributes yields
/// an [`PeerChange::Add`] so a peer that re-registered with a new VTEP MAC during a
/// disconnect is re-programmed.
#[derive(Clone, Debug)]
pub struct PeerSet {
    own: Ipv4Network,
    peers: std::collections::BTreeMap<SubnetId, Lease>,
}

impl PeerSet {
    /// An empty set for the host whose lease has IPv4 subnet `own`.
    pub fn new(own: Ipv4Network) -> Self {
        Self {
            own,
            peers: Default::default(),
        }
    }

    /// The current peers, ordered by subnet.
    pub fn peers(&self) -> Vec<Lease> {
        self.peers.values().cloned().collect()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    fn is_own(&self, lease: &Lease) -> bool {
        lease.subnet == self.own
    }

    /// Applies one event and returns what changed, in a deterministic order (by subnet).
    pub fn apply(&mut self, event: LeaseEvent) -> Vec<PeerChange> {
        match event {
            LeaseEvent::Added(lease) => {
                if self.is_own(&lease) {
                    return Vec::new();
                }
                match self.peers.get(&lease.id()) {
                    Some(old) if old.attrs == lease.attrs => Vec::new(),
                    _ => {
                        self.peers.insert(lease.id(), lease.clone());
                        vec![PeerChange::Add(lease)]
                    }
                }
            }
            LeaseEvent::Removed(lease) => {
                if self.is_own(&lease) {
                    return Vec::new();
                }
                let key = self
                    .peers
                    .contains_key(&lease.id())
                    .then(|| lease.id())
                    .or_else(|| {
                        self.peers
                            .keys()
                            .find(|(v4, _)| *v4 == lease.subnet)
                            .copied()
                    });
                key.and_then(|k| self.peers.remove(&k))
                    .map(PeerChange::Remove)
                    .into_iter()
                    .collect()
            }
            LeaseEvent::Snapshot(leases) => {
                let mut fresh = std::collections::BTreeMap::new();
                for lease in leases {
                    if !self.is_own(&lease) {
                        fresh.insert(lease.id(), lease);
                    }
                }
                let mut changes: Vec<PeerChange> = self
                    .peers
                    .iter()
                    .filter(|(k, _)| !fresh.contains_key(*k))
                    .map(|(_, l)| PeerChange::Remove(l.clone()))
                    .collect();
                changes.extend(
                    fresh
                        .iter()
                        .filter(|(k, l)| self.peers.get(*k).is_none_or(|old| old.attrs != l.attrs))
                        .map(|(_, l)| PeerChange::Add(l.clone())),
                );
                self.peers = fresh;
                changes
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upstream's documented canonical value (Documentation/reservations.md).
    const UPSTREAM: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

    #[test]
    fn golden_upstream_value_round_trips_byte_identical() {
        let attrs = LeaseAttrs::from_json(UPSTREAM.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(attrs.public_ipv6, None);
        assert_eq!(attrs.backend_type, "vxlan");
        let data = VxlanBackendData::from_raw(attrs.backend_data.as_deref()).unwrap();
        assert_eq!(data.vni, 1);
        assert_eq!(data.vtep_mac.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!(attrs.to_json(), UPSTREAM);

        // Built from scratch, not parsed: still byte-identical.
        let ours = LeaseAttrs {
            public_ip: Ipv4Addr::new(192, 168, 64, 3),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(
                VxlanBackendData {
                    vni: 1,
                    vtep_mac: "C6-D2-32-6F-8F-44".parse().unwrap(),
                }
                .to_raw(),
            ),
            backend_v6_data: None,
        };
        assert_eq!(ours.to_json(), UPSTREAM);
    }

    #[test]
    fn dual_stack_and_host_gw_values() {
        let v = r#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"host-gw"}"#;
        let attrs = LeaseAttrs::from_json(v.as_bytes()).unwrap();
        assert_eq!(attrs.public_ipv6, Some("fd00::1".parse().unwrap()));
        assert!(attrs.backend_data.is_none());
        assert_eq!(attrs.to_json(), v);
        // udp/alloc leases carry no BackendType at all.
        let udp = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.2","PublicIPv6":null}"#).unwrap();
        assert_eq!(udp.backend_type, "");
    }

    #[test]
    fn bad_values_are_errors() {
        for v in [
            r#"{"PublicIP":null,"PublicIPv6":null}"#,
            r#"{"PublicIP":"fd00::1"}"#,
            r#"{"PublicIP":"nope"}"#,
            r#"{"PublicIPv6":null}"#,
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.1"}"#,
            r#"not json"#,
            "",
        ] {
            assert!(LeaseAttrs::from_json(v.as_bytes()).is_err(), "{v}");
        }
        for d in [
            r#"{"VNI":1}"#,
            r#"{"VNI":"1","VtepMAC":"c6:d2:32:6f:8f:44"}"#,
            r#"{"VNI":1,"VtepMAC":"zz"}"#,
            "null",
        ] {
            let raw = RawValue::from_string(d.to_owned()).unwrap();
            assert!(VxlanBackendData::from_raw(Some(&raw)).is_err(), "{d}");
        }
        assert!(VxlanBackendData::from_raw(None).is_err());
    }

    #[test]
    fn subnet_keys() {
        let v4: Ipv4Network = "10.5.34.0/24".parse().unwrap();
        let v6: Ipv6Network = "fd00:12:13::/56".parse().unwrap();
        assert_eq!(make_subnet_key(v4, None), "10.5.34.0-24");
        assert_eq!(
            make_subnet_key("10.12.13.0/24".parse().unwrap(), Some(v6)),
            "10.12.13.0-24&fd00:12:13::-56"
        );
        assert_eq!(parse_subnet_key("10.5.34.0-24").unwrap(), (v4, None));
        assert_eq!(
            parse_subnet_key("/coreos.com/network/subnets/10.12.13.0-24&fd00:12:13::-56").unwrap(),
            ("10.12.13.0/24".parse().unwrap(), Some(v6))
        );
        for bad in [
            "10.5.34.0-32",
            "10.5.34.0",
            "10.5.34.0/24",
            "300.5.34.0-24",
            "10.5.34.0-24&fd00::-128",
            "10.5.34.0-24&FD00::-64",
            "10.5.34.0-24&zz::-64",
            "",
            "10.5.34.0-24x",
        ] {
            assert!(parse_subnet_key(bad).is_err(), "{bad}");
        }
    }

    fn lease(sn: &str, ip: [u8; 4]) -> Lease {
        Lease {
            subnet: sn.parse().unwrap(),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: ip.into(),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: None,
                backend_v6_data: None,
            },
        }
    }

    fn bare(sn: &str) -> Lease {
        lease(sn, [0, 0, 0, 0])
    }

    #[test]
    fn peer_set_filters_own_and_uses_cache_on_remove() {
        let mut set = PeerSet::new("10.0.1.0/24".parse().unwrap());
        let a = lease("10.0.2.0/24", [1, 1, 1, 2]);
        assert_eq!(set.apply(LeaseEvent::Added(bare("10.0.1.0/24"))), vec![]);
        assert_eq!(
            set.apply(LeaseEvent::Added(a.clone())),
            vec![PeerChange::Add(a.clone())]
        );
        // A renewal re-put with identical attributes is not a change.
        assert_eq!(set.apply(LeaseEvent::Added(a.clone())), vec![]);
        let a2 = lease("10.0.2.0/24", [1, 1, 1, 9]);
        assert_eq!(
            set.apply(LeaseEvent::Added(a2.clone())),
            vec![PeerChange::Add(a2.clone())]
        );
        assert_eq!(
            set.apply(LeaseEvent::Removed(bare("10.0.2.0/24"))),
            vec![PeerChange::Remove(a2)]
        );
        assert_eq!(set.apply(LeaseEvent::Removed(bare("10.0.2.0/24"))), vec![]);
        assert_eq!(set.apply(LeaseEvent::Removed(bare("10.0.1.0/24"))), vec![]);
        assert!(set.is_empty());
    }

    #[test]
    fn peer_set_snapshot_diff() {
        let mut set = PeerSet::new("10.0.1.0/24".parse().unwrap());
        let a = lease("10.0.2.0/24", [1, 1, 1, 2]);
        let b = lease("10.0.3.0/24", [1, 1, 1, 3]);
        let c = lease("10.0.4.0/24", [1, 1, 1, 4]);
        let own = lease("10.0.1.0/24", [1, 1, 1, 1]);
        assert_eq!(
            set.apply(LeaseEvent::Snapshot(vec![
                b.clone(),
                own.clone(),
                a.clone()
            ])),
            vec![PeerChange::Add(a.clone()), PeerChange::Add(b.clone())]
        );
        let b2 = lease("10.0.3.0/24", [1, 1, 1, 33]);
        assert_eq!(
            set.apply(LeaseEvent::Snapshot(vec![b2.clone(), c.clone(), own])),
            vec![
                PeerChange::Remove(a),
                PeerChange::Add(b2.clone()),
                PeerChange::Add(c.clone())
            ]
        );
        assert_eq!(set.peers(), vec![b2, c]);
        assert_eq!(set.len(), 2);
    }
}

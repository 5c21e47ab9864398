//! Leases on the wire, as upstream flannel stores them: the etcd key suffix
//! (`10.244.7.0-24`, `10.12.13.0-24&fd00:12:13::-56`), the value (upstream's
//! `lease.LeaseAttrs` JSON) and the per-backend `BackendData`
//! (vxlan: `{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}`; host-gw: none).
//!
//! Everything is parsed into types here, once: the rest of the agent sees a
//! [`BackendAttrs::Vxlan`] with a VNI and a [`MacAddr`], never JSON. Reading follows Go's
//! `encoding/json` (field names case-insensitive, unknown fields ignored, `null` = absent);
//! writing reproduces Go's `json.Marshal` byte for byte (field order, `"PublicIPv6":null`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::Serialize;
use serde_json::{Value, value::RawValue};

use super::{cidr::Cidr, gojson::GoObject, mac::MacAddr, truncated};

/// Why a lease record (etcd key, value or backend data) could not be read. Each names
/// what was wrong, with the offending text truncated, so the warning for a skipped record
/// points at it without flooding the log.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The key does not end in `a.b.c.d-N[&v6-M]`.
    #[error("subnet key {key:?} is not of the form a.b.c.d-N[&ipv6-M]")]
    BadKey {
        /// The key as found (truncated).
        key: String,
    },
    /// The value is not upstream's `LeaseAttrs` JSON.
    #[error("lease value is not valid lease JSON: {reason}")]
    BadValue {
        /// What is wrong.
        reason: String,
    },
    /// The backend data is malformed for its backend type.
    #[error("{field} {data} is invalid for BackendType {backend_type:?}: {reason}")]
    BadBackendData {
        /// `BackendData` or `BackendV6Data`.
        field: &'static str,
        /// The backend type.
        backend_type: String,
        /// The raw JSON (truncated).
        data: String,
        /// What is wrong.
        reason: String,
    },
}

/// The subnet(s) identifying a lease: the IPv4 subnet, the IPv6 one, or both (dual stack).
/// At least one is set; an IPv6-only (kube mode) lease has no IPv4 part.
pub type SubnetId = (Option<Ipv4Network>, Option<Ipv6Network>);

/// The subnet(s) an etcd key names: upstream's keys always carry an IPv4 part
/// (`a.b.c.d-N[&v6-M]`), which is why etcd mode cannot be IPv6-only.
pub type KeySubnets = (Ipv4Network, Option<Ipv6Network>);

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
/// the IPv4 prefix must fit 5 bits (so at most 31) and the IPv6 one 7 bits. Host bits are
/// kept as written, so validation can refuse `10.244.117.7-24`.
pub fn parse_subnet_key(key: &str) -> Result<KeySubnets, Error> {
    let bad = || Error::BadKey {
        key: truncated(key.as_bytes()),
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

/// The vxlan backend's data for one family: `{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct VxlanBackendData {
    /// The peer's VNI. Informational, as upstream: receivers do not check it, and a lease
    /// without one (Go's zero value) is read as VNI 0.
    #[serde(rename = "VNI")]
    pub vni: u32,
    /// The MAC of the peer's `flannel.<VNI>` device: the inner destination MAC its kernel
    /// accepts.
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

impl VxlanBackendData {
    /// Go's compact `json.Marshal` of upstream's `vxlanLeaseAttrs` (field order included).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("VxlanBackendData always serialises")
    }

    /// Reads vxlan backend data (an object; `VtepMAC` required, `VNI` optional).
    pub fn parse(json: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Self::from_value(&value)
    }

    fn from_value(value: &Value) -> Result<Self, String> {
        let Value::Object(map) = value else {
            return Err("expected a JSON object".into());
        };
        let obj = GoObject::new(map, "");
        let vni = match obj.int("VNI").map_err(|e| e.to_string())? {
            None => 0,
            Some(v) => u32::try_from(v)
                .ok()
                .filter(|v| *v < 1 << 24)
                .ok_or_else(|| format!("VNI {v} is not in 0..16777215"))?,
        };
        let vtep_mac = obj
            .parsed("VtepMAC", "a MAC address")
            .map_err(|e| e.to_string())?
            .ok_or("VtepMAC is missing")?;
        Ok(Self { vni, vtep_mac })
    }
}

/// What a lease says about its backend, by `BackendType`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendAttrs {
    /// `"vxlan"`: the VTEP of each family the host runs (`BackendData`, `BackendV6Data`).
    Vxlan {
        /// IPv4 VTEP (`flannel.<VNI>`).
        v4: Option<VxlanBackendData>,
        /// IPv6 VTEP (`flannel-v6.<VNI>`).
        v6: Option<VxlanBackendData>,
    },
    /// `"host-gw"`: no data.
    HostGw,
    /// A backend this agent does not program (udp — no `BackendType` at all —, wireguard,
    /// ipip…). Its data is kept as compact JSON text, only to notice changes.
    Other {
        /// `BackendType` as found (empty for udp).
        backend_type: String,
        /// `BackendData`.
        data: Option<String>,
        /// `BackendV6Data`.
        v6_data: Option<String>,
    },
}

impl BackendAttrs {
    /// Upstream's name of the backend type (`BackendType`, the `backend-type` annotation).
    pub fn type_name(&self) -> &str {
        match self {
            Self::Vxlan { .. } => "vxlan",
            Self::HostGw => "host-gw",
            Self::Other { backend_type, .. } => backend_type,
        }
    }

    /// Parses the backend data of a lease whose `BackendType` is `backend_type`; `data`
    /// and `v6_data` are raw JSON (`None` or `null` when absent). The one place backend
    /// data is read, for etcd values and node annotations alike.
    pub fn parse(
        backend_type: &str,
        data: Option<&str>,
        v6_data: Option<&str>,
    ) -> Result<Self, Error> {
        fn present(s: Option<&str>) -> Option<&str> {
            s.map(str::trim).filter(|s| *s != "null")
        }
        match backend_type {
            "vxlan" => {
                let one = |field, text: Option<&str>| {
                    present(text)
                        .map(|t| {
                            VxlanBackendData::parse(t).map_err(|reason| Error::BadBackendData {
                                field,
                                backend_type: backend_type.to_owned(),
                                data: truncated(t.as_bytes()),
                                reason,
                            })
                        })
                        .transpose()
                };
                Ok(Self::Vxlan {
                    v4: one("BackendData", data)?,
                    v6: one("BackendV6Data", v6_data)?,
                })
            }
            "host-gw" => Ok(Self::HostGw),
            other => {
                let compact = |field, text: Option<&str>| {
                    present(text)
                        .map(|t| {
                            serde_json::from_str::<Value>(t)
                                .map(|v| v.to_string())
                                .map_err(|e| Error::BadBackendData {
                                    field,
                                    backend_type: other.to_owned(),
                                    data: truncated(t.as_bytes()),
                                    reason: e.to_string(),
                                })
                        })
                        .transpose()
                };
                Ok(Self::Other {
                    backend_type: other.to_owned(),
                    data: compact("BackendData", data)?,
                    v6_data: compact("BackendV6Data", v6_data)?,
                })
            }
        }
    }

    /// `BackendData` as compact JSON, `None` when there is none.
    pub fn data_json(&self) -> Option<String> {
        match self {
            Self::Vxlan { v4, .. } => v4.map(|d| d.to_json()),
            Self::HostGw => None,
            Self::Other { data, .. } => data.clone(),
        }
    }

    /// `BackendV6Data` as compact JSON, `None` when there is none.
    pub fn v6_data_json(&self) -> Option<String> {
        match self {
            Self::Vxlan { v6, .. } => v6.map(|d| d.to_json()),
            Self::HostGw => None,
            Self::Other { v6_data, .. } => v6_data.clone(),
        }
    }

    /// The IPv4 VTEP, when this is a vxlan lease that has one.
    pub fn vxlan_v4(&self) -> Option<VxlanBackendData> {
        match self {
            Self::Vxlan { v4, .. } => *v4,
            _ => None,
        }
    }
}

/// What a host publishes with its lease: where to reach it and its backend's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// Underlay IPv4 peers send to (`0.0.0.0` for an IPv6-only kube node).
    pub public_ip: Ipv4Addr,
    /// Underlay IPv6 peers send to, when IPv6 is enabled.
    pub public_ipv6: Option<Ipv6Addr>,
    /// The backend and its data.
    pub backend: BackendAttrs,
}

/// Field order and omission rules of Go's `json.Marshal(lease.LeaseAttrs)`.
#[derive(Serialize)]
struct WireAttrs<'a> {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6")]
    public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", skip_serializing_if = "str::is_empty")]
    backend_type: &'a str,
    #[serde(rename = "BackendData", skip_serializing_if = "Option::is_none")]
    backend_data: Option<Box<RawValue>>,
    #[serde(rename = "BackendV6Data", skip_serializing_if = "Option::is_none")]
    backend_v6_data: Option<Box<RawValue>>,
}

impl LeaseAttrs {
    /// A vxlan host's attributes (IPv4 VTEP only).
    pub fn vxlan(public_ip: Ipv4Addr, data: VxlanBackendData) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend: BackendAttrs::Vxlan {
                v4: Some(data),
                v6: None,
            },
        }
    }

    /// A host-gw host's attributes.
    pub fn host_gw(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend: BackendAttrs::HostGw,
        }
    }

    /// Upstream's name of the lease's backend type.
    pub fn backend_type(&self) -> &str {
        self.backend.type_name()
    }

    /// The value upstream stores in etcd (Go `json.Marshal` of `LeaseAttrs`).
    pub fn to_json(&self) -> String {
        let raw = |s: Option<String>| s.and_then(|s| RawValue::from_string(s).ok());
        serde_json::to_string(&WireAttrs {
            public_ip: self.public_ip,
            public_ipv6: self.public_ipv6,
            backend_type: self.backend.type_name(),
            backend_data: raw(self.backend.data_json()),
            backend_v6_data: raw(self.backend.v6_data_json()),
        })
        .expect("LeaseAttrs always serialises")
    }

    /// Parses an etcd lease value. A missing, `null` or non-IPv4 `PublicIP` makes the
    /// whole value unreadable, as upstream; so does backend data its type cannot read.
    pub fn from_json(value: &[u8]) -> Result<Self, Error> {
        let bad = |reason: String| Error::BadValue { reason };
        let value: Value = serde_json::from_slice(value).map_err(|e| bad(e.to_string()))?;
        let Value::Object(map) = &value else {
            return Err(bad(format!(
                "expected a JSON object, got {}",
                truncated(value.to_string().as_bytes())
            )));
        };
        let obj = GoObject::new(map, "");
        let public_ip = obj
            .parsed("PublicIP", "an IPv4 address")
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("PublicIP is missing".into()))?;
        let public_ipv6 = obj
            .parsed("PublicIPv6", "an IPv6 address")
            .map_err(|e| bad(e.to_string()))?;
        let backend_type = obj
            .str("BackendType")
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or_default();
        let text = |name| obj.get(name).map(Value::to_string);
        let backend = BackendAttrs::parse(
            backend_type,
            text("BackendData").as_deref(),
            text("BackendV6Data").as_deref(),
        )?;
        Ok(Self {
            public_ip,
            public_ipv6,
            backend,
        })
    }
}

/// A host's lease: its subnet(s) and attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 pod subnet (e.g. 10.244.7.0/24), when IPv4 is enabled. Always set in etcd
    /// mode (the key has an IPv4 part); `None` for an IPv6-only kube node.
    pub subnet: Option<Ipv4Network>,
    /// The IPv6 pod subnet, when IPv6 is enabled.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// Published attributes.
    pub attrs: LeaseAttrs,
    /// Other addresses the host may send VXLAN from besides `attrs.public_ip` and
    /// `attrs.public_ipv6` (kube mode: the node's InternalIP/ExternalIP and public-ip(v6)
    /// annotations; a host whose published address is a `public-ip-overwrite` sends from
    /// its interface address). Not part of the wire value: what the known-peer checks must
    /// accept.
    pub extra_senders: Vec<IpAddr>,
}

impl Lease {
    /// Every IPv4 address this host may send VXLAN from: `PublicIP` first, then the extra
    /// IPv4 senders, each once, unusable ones (unspecified, loopback, multicast) left out.
    pub fn senders(&self) -> Vec<Ipv4Addr> {
        let extra = self.extra_senders.iter().filter_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        });
        usable_once(std::iter::once(self.attrs.public_ip).chain(extra))
    }

    /// Every IPv6 address this host may send VXLAN over IPv6 from: `PublicIPv6` first (if
    /// any), then the extra IPv6 senders, each once, unusable ones left out.
    pub fn senders6(&self) -> Vec<Ipv6Addr> {
        let extra = self.extra_senders.iter().filter_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        });
        usable_once(self.attrs.public_ipv6.into_iter().chain(extra))
    }

    /// Whether `other` would program the datapath differently (attributes or senders).
    pub fn differs_from(&self, other: &Lease) -> bool {
        self.attrs != other.attrs || self.extra_senders != other.extra_senders
    }

    /// The subnet(s) identifying this lease.
    pub fn id(&self) -> SubnetId {
        (self.subnet, self.ipv6_subnet)
    }

    /// The etcd key suffix of this lease; `None` for an IPv6-only lease, which no etcd
    /// key can name.
    pub fn key(&self) -> Option<String> {
        self.subnet.map(|v4| make_subnet_key(v4, self.ipv6_subnet))
    }

    /// The subnet(s) for a log line: `10.244.7.0/24`, `fd00:10:244:7::/64` or both,
    /// joined by `&` as in an etcd key.
    pub fn subnets(&self) -> Subnets {
        Subnets(self.id())
    }

    /// Whether `other` names the same host as this lease by subnet, as upstream's
    /// `LeaseWatcher` compares them: by the IPv4 subnet when both have one (etcd events
    /// compare only that), otherwise by the IPv6 subnet.
    pub fn same_subnet(&self, other: &Lease) -> bool {
        same_subnet(self.id(), other.id())
    }

    /// A lease that is only a subnet (what an etcd delete event carries).
    pub fn bare(subnet: Option<Ipv4Network>, ipv6_subnet: Option<Ipv6Network>) -> Self {
        Self {
            subnet,
            ipv6_subnet,
            extra_senders: Vec::new(),
            attrs: LeaseAttrs {
                public_ip: Ipv4Addr::UNSPECIFIED,
                public_ipv6: None,
                backend: BackendAttrs::Other {
                    backend_type: String::new(),
                    data: None,
                    v6_data: None,
                },
            },
        }
    }
}

/// Whether two subnet ids name the same host (see [`Lease::same_subnet`]).
pub fn same_subnet(a: SubnetId, b: SubnetId) -> bool {
    match (a, b) {
        ((Some(a4), _), (Some(b4), _)) => a4 == b4,
        ((_, a6), (_, b6)) => a6.is_some() && a6 == b6,
    }
}

/// A lease's subnet(s), displayed for logs and errors (see [`Lease::subnets`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnets(pub SubnetId);

impl std::fmt::Display for Subnets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            (Some(v4), Some(v6)) => write!(f, "{v4}&{v6}"),
            (Some(v4), None) => write!(f, "{v4}"),
            (None, Some(v6)) => write!(f, "{v6}"),
            (None, None) => f.write_str("(no subnet)"),
        }
    }
}

/// The usable unicast addresses of `addrs`, each once, in order.
fn usable_once<A: Copy + PartialEq + Into<IpAddr>>(addrs: impl Iterator<Item = A>) -> Vec<A> {
    let mut out = Vec::new();
    for ip in addrs {
        if super::cidr::unusable_unicast(ip.into()).is_none() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// One address family's half of a lease (the IPv4 subnet, `PublicIP` and `BackendData`;
/// or the IPv6 subnet, `PublicIPv6` and `BackendV6Data`), so what programs a family is
/// written once.
pub trait LeaseFamily: Cidr {
    /// The lease's subnet of this family, if it has one.
    fn subnet(lease: &Lease) -> Option<Self>;
    /// The underlay address peers send this family's traffic to.
    fn public_ip(attrs: &LeaseAttrs) -> Option<Self::Addr>;
    /// This family's VXLAN VTEP, when the lease is a vxlan lease that has one.
    fn vxlan_data(backend: &BackendAttrs) -> Option<VxlanBackendData>;
}

impl LeaseFamily for Ipv4Network {
    fn subnet(lease: &Lease) -> Option<Self> {
        lease.subnet
    }
    fn public_ip(attrs: &LeaseAttrs) -> Option<Ipv4Addr> {
        Some(attrs.public_ip)
    }
    fn vxlan_data(backend: &BackendAttrs) -> Option<VxlanBackendData> {
        match backend {
            BackendAttrs::Vxlan { v4, .. } => *v4,
            _ => None,
        }
    }
}

impl LeaseFamily for Ipv6Network {
    fn subnet(lease: &Lease) -> Option<Self> {
        lease.ipv6_subnet
    }
    fn public_ip(attrs: &LeaseAttrs) -> Option<Ipv6Addr> {
        attrs.public_ipv6
    }
    fn vxlan_data(backend: &BackendAttrs) -> Option<VxlanBackendData> {
        match backend {
            BackendAttrs::Vxlan { v6, .. } => *v6,
            _ => None,
        }
    }
}

/// Parses one etcd lease record: the key (or key suffix) and its value. The public entry
/// point for the etcd wire format.
pub fn parse_record(key: &str, value: &[u8]) -> Result<Lease, Error> {
    let (subnet, ipv6_subnet) = parse_subnet_key(key)?;
    Ok(Lease {
        subnet: Some(subnet),
        ipv6_subnet,
        attrs: LeaseAttrs::from_json(value)?,
        // Upstream's etcd lease names one IPv4 address, PublicIP: nothing else is known.
        extra_senders: Vec::new(),
    })
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
        assert_eq!(attrs.backend_type(), "vxlan");
        let data = attrs.backend.vxlan_v4().unwrap();
        assert_eq!(data.vni, 1);
        assert_eq!(data.vtep_mac.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!(attrs.to_json(), UPSTREAM);

        // Built from scratch, not parsed: still byte-identical.
        let ours = LeaseAttrs::vxlan(
            Ipv4Addr::new(192, 168, 64, 3),
            VxlanBackendData {
                vni: 1,
                vtep_mac: "C6-D2-32-6F-8F-44".parse().unwrap(),
            },
        );
        assert_eq!(ours.to_json(), UPSTREAM);
    }

    #[test]
    fn go_json_semantics_case_insensitive_and_vni_optional() {
        let v = br#"{"publicip":"10.0.0.1","backendtype":"vxlan","backenddata":{"vtepmac":"0E:2A:00:00:00:01","extra":1}}"#;
        let attrs = LeaseAttrs::from_json(v).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            attrs.backend.vxlan_v4(),
            Some(VxlanBackendData {
                vni: 0,
                vtep_mac: MacAddr([0x0e, 0x2a, 0, 0, 0, 1])
            })
        );
    }

    #[test]
    fn dual_stack_host_gw_udp_and_other_values() {
        let v = r#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"host-gw"}"#;
        let attrs = LeaseAttrs::from_json(v.as_bytes()).unwrap();
        assert_eq!(attrs.public_ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(attrs.backend, BackendAttrs::HostGw);
        assert_eq!(attrs.to_json(), v);
        // udp/alloc leases carry no BackendType at all.
        let udp = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.2","PublicIPv6":null}"#).unwrap();
        assert_eq!(udp.backend_type(), "");
        assert_eq!(
            udp.to_json(),
            r#"{"PublicIP":"10.0.0.2","PublicIPv6":null}"#
        );
        let wg = r#"{"PublicIP":"10.0.0.3","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"x"}}"#;
        assert_eq!(LeaseAttrs::from_json(wg.as_bytes()).unwrap().to_json(), wg);
        let dual = r#"{"PublicIP":"10.0.0.4","PublicIPv6":"fd00::4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:04"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:06"}}"#;
        assert_eq!(
            LeaseAttrs::from_json(dual.as_bytes()).unwrap().to_json(),
            dual
        );
    }

    #[test]
    fn bad_values_are_errors() {
        for v in [
            r#"{"PublicIP":null,"PublicIPv6":null}"#,
            r#"{"PublicIP":"fd00::1"}"#,
            r#"{"PublicIP":"nope"}"#,
            r#"{"PublicIPv6":null}"#,
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.1"}"#,
            r#"{"PublicIP":"10.0.0.1","BackendType":7}"#,
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":"1","VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":16777216,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#,
            r#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":[1]}"#,
            r#"not json"#,
            "[]",
            "",
        ] {
            assert!(LeaseAttrs::from_json(v.as_bytes()).is_err(), "{v}");
        }
    }

    #[test]
    fn errors_truncate_huge_input() {
        let huge = format!(
            r#"{{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{{"VtepMAC":"{}"}}}}"#,
            "a".repeat(1 << 20)
        );
        let err = LeaseAttrs::from_json(huge.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.len() < 1000, "{} bytes", err.len());
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
        // Host bits are kept as written, for validation to refuse.
        assert_eq!(
            parse_subnet_key("10.244.117.7-24").unwrap().0.ip(),
            Ipv4Addr::new(10, 244, 117, 7)
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
}

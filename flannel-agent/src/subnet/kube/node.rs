//! Pure conversions between a `Node` object and flannel leases: which pod CIDRs a node has,
//! what a peer's annotations say, and which annotations our own node still needs.
//!
//! Kept free of I/O so the rules (upstream `nodeToLease` and `AcquireLease`) are unit-tested
//! without an API server.

use std::{collections::BTreeMap, net::IpAddr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::Node;

pub use crate::wire::annotations::Families;
use crate::{
    lease::{Lease, LeaseAttrs},
    wire::{
        annotations::{self, AnnotationError, AnnotationNames},
        cidr::masked,
        truncated,
    },
};

/// Why a node cannot be turned into a lease. Every variant names the node and the field, so
/// the warning tells an operator exactly what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    /// The node does not carry `kube-subnet-manager: "true"`: flannel does not run there
    /// (yet), so it is not a peer.
    #[error("node {node}: annotation {annotation} is {value:?}, not \"true\": not a flannel node")]
    NotManaged {
        /// Node name.
        node: String,
        /// The `kube-subnet-manager` annotation key.
        annotation: String,
        /// Its value (`None` when absent).
        value: Option<String>,
    },
    /// A required annotation is absent.
    #[error("node {node}: annotation {annotation} is missing")]
    MissingAnnotation {
        /// Node name.
        node: String,
        /// The missing annotation key.
        annotation: String,
    },
    /// An annotation does not parse.
    #[error("node {node}: annotation {annotation}={value:?} is invalid: {reason}")]
    InvalidAnnotation {
        /// Node name.
        node: String,
        /// The annotation key.
        annotation: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Neither `spec.podCIDRs` nor `spec.podCIDR` is set.
    #[error("node {node}: pod cidr not assigned (spec.podCIDR is empty)")]
    PodCidrNotAssigned {
        /// Node name.
        node: String,
    },
    /// `spec.podCIDRs` has more entries than address families.
    #[error(
        "node {node}: spec.podCIDRs has {count} entries, at most 2 (one per family) are allowed"
    )]
    TooManyPodCidrs {
        /// Node name.
        node: String,
        /// How many there are.
        count: usize,
    },
    /// A pod CIDR does not parse.
    #[error("node {node}: {field}={value:?} is not a CIDR: {reason}")]
    InvalidPodCidr {
        /// Node name.
        node: String,
        /// `spec.podCIDR` or `spec.podCIDRs`.
        field: &'static str,
        /// The value.
        value: String,
        /// Parser message.
        reason: String,
    },
    /// The lease the node publishes breaks a rule (outside `Network`, a non-unicast
    /// public IP…).
    #[error("node {node}: {reason}")]
    InvalidLease {
        /// Node name.
        node: String,
        /// The rule broken.
        reason: crate::lease::Invalid,
    },
    /// The node has no pod CIDR of an enabled family.
    #[error("node {node}: spec.podCIDRs has no {family} entry")]
    MissingFamily {
        /// Node name.
        node: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
}

impl NodeError {
    /// The node the error is about.
    pub fn node(&self) -> &str {
        match self {
            Self::NotManaged { node, .. }
            | Self::MissingAnnotation { node, .. }
            | Self::InvalidAnnotation { node, .. }
            | Self::PodCidrNotAssigned { node }
            | Self::TooManyPodCidrs { node, .. }
            | Self::InvalidPodCidr { node, .. }
            | Self::MissingFamily { node, .. }
            | Self::InvalidLease { node, .. } => node,
        }
    }
}

/// A node's pod CIDRs, by family, with host bits cleared (Go's `net.ParseCIDR` semantics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCidrs {
    /// The IPv4 pod CIDR.
    pub v4: Option<Ipv4Network>,
    /// The IPv6 pod CIDR.
    pub v6: Option<Ipv6Network>,
}

fn node_name(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Reads `spec.podCIDRs` (0–2 entries), falling back to `spec.podCIDR`.
pub fn pod_cidrs(node: &Node) -> Result<PodCidrs, NodeError> {
    let name = node_name(node);
    let spec = node.spec.as_ref();
    let list = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let (field, values) = if list.is_empty() {
        let single = spec.and_then(|s| s.pod_cidr.clone()).unwrap_or_default();
        if single.is_empty() {
            return Err(NodeError::PodCidrNotAssigned { node: name });
        }
        ("spec.podCIDR", vec![single])
    } else if list.len() > 2 {
        return Err(NodeError::TooManyPodCidrs {
            node: name,
            count: list.len(),
        });
    } else {
        ("spec.podCIDRs", list)
    };
    let mut out = PodCidrs::default();
    for value in values {
        let net: IpNetwork =
            value
                .parse()
                .map_err(|e: ipnetwork::IpNetworkError| NodeError::InvalidPodCidr {
                    node: name.clone(),
                    field,
                    value: truncated(value.as_bytes()),
                    reason: e.to_string(),
                })?;
        match net {
            IpNetwork::V4(n) => {
                out.v4.get_or_insert(masked(n));
            }
            IpNetwork::V6(n) => {
                out.v6.get_or_insert(masked(n));
            }
        }
    }
    Ok(out)
}

/// Names the node in an annotation error.
fn on_node(node: &Node) -> impl Fn(AnnotationError) -> NodeError + '_ {
    move |e| match e {
        AnnotationError::Missing { annotation } => NodeError::MissingAnnotation {
            node: node_name(node),
            annotation,
        },
        AnnotationError::Invalid {
            annotation,
            value,
            reason,
        } => NodeError::InvalidAnnotation {
            node: node_name(node),
            annotation,
            value,
            reason,
        },
    }
}

/// Builds a peer's lease from its annotations and pod CIDRs (upstream `nodeToLease`).
pub fn node_to_lease(
    node: &Node,
    names: &AnnotationNames,
    families: Families,
) -> Result<Lease, NodeError> {
    let managed = annotation(node, &names.subnet_kube_managed);
    if managed != Some("true") {
        return Err(NodeError::NotManaged {
            node: node_name(node),
            annotation: names.subnet_kube_managed.clone(),
            value: managed.map(|v| truncated(v.as_bytes())),
        });
    }
    let cidrs = pod_cidrs(node)?;
    let attrs = annotations::parse_lease_attrs(|k| annotation(node, k), names, families)
        .map_err(on_node(node))?;
    let missing = |family| NodeError::MissingFamily {
        node: node_name(node),
        family,
    };
    // Each enabled family needs its pod CIDR; a disabled one is not read (an IPv6-only
    // network ignores a node's IPv4 pod CIDR, as upstream's `nodeToLease`).
    let subnet = if families.ipv4 {
        Some(cidrs.v4.ok_or_else(|| missing("IPv4"))?)
    } else {
        None
    };
    let ipv6_subnet = if families.ipv6 {
        Some(cidrs.v6.ok_or_else(|| missing("IPv6"))?)
    } else {
        None
    };
    let extra_senders = sending_addresses(node, names)
        .into_iter()
        .filter(|ip| *ip != IpAddr::from(attrs.public_ip))
        .filter(|ip| attrs.public_ipv6.is_none_or(|p| *ip != IpAddr::from(p)))
        .filter(|ip| {
            if ip.is_ipv4() {
                families.ipv4
            } else {
                families.ipv6
            }
        })
        .collect();
    Ok(Lease {
        subnet,
        ipv6_subnet,
        extra_senders,
        attrs,
    })
}

/// Every address a node may send VXLAN from, as far as its object says: its published
/// addresses (`status.addresses` InternalIP and ExternalIP, both families) and its
/// `public-ip(v6)` and `public-ip(v6)-overwrite` annotations. A node told to publish an
/// overwrite (a NAT address, a second address) still sends from its interface address,
/// which is normally its InternalIP; a multi-homed node may send from any of them. Sorted,
/// each once; unreadable or unusable (loopback, unspecified, multicast) values are left out.
pub fn sending_addresses(node: &Node, names: &AnnotationNames) -> Vec<IpAddr> {
    let published = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .map(|a| a.address.as_str());
    let annotated = [
        &names.backend_public_ip,
        &names.backend_public_ip_overwrite,
        &names.backend_public_ipv6,
        &names.backend_public_ipv6_overwrite,
    ]
    .into_iter()
    .filter_map(|k| annotation(node, k));
    let mut out: Vec<IpAddr> = published
        .chain(annotated)
        .filter_map(|v| v.trim().parse::<IpAddr>().ok())
        .filter(|ip| crate::wire::cidr::unusable_unicast(*ip).is_none())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The user's `public-ip-overwrite` / `public-ipv6-overwrite`, if set and valid. An invalid
/// one is reported, not published (upstream would publish it verbatim and break peers).
pub fn overwrite_ip(node: &Node, key: &str, want_v4: bool) -> Result<Option<IpAddr>, NodeError> {
    annotation(node, key)
        .map(|value| annotations::parse_family_ip(key, value, want_v4))
        .transpose()
        .map_err(on_node(node))
}

/// What our node publishes for `attrs`, as peers (and our own lease watch) read it back:
/// the `public-ip(v6)-overwrite` annotations replace the detected addresses. Invalid
/// overwrites are ignored here (and warned about by [`annotations_to_patch`]).
pub fn published_attrs(
    node: &Node,
    names: &AnnotationNames,
    families: Families,
    attrs: &LeaseAttrs,
) -> LeaseAttrs {
    let mut published = attrs.clone();
    // Peers of an IPv6-only network do not read `public-ip`, so an IPv4 overwrite changes
    // nothing they see.
    if families.ipv4
        && let Ok(Some(IpAddr::V4(ip))) =
            overwrite_ip(node, &names.backend_public_ip_overwrite, true)
    {
        published.public_ip = ip;
    }
    if families.ipv6
        && let Ok(Some(IpAddr::V6(ip))) =
            overwrite_ip(node, &names.backend_public_ipv6_overwrite, false)
    {
        published.public_ipv6 = Some(ip);
    }
    published
}

/// The annotations our own node must carry to publish `attrs`, minus those it already has
/// with the right value: an empty map means no patch is needed.
///
/// Which keys are written follows upstream `AcquireLease`: `kube-subnet-manager` and
/// `backend-type` always; IPv4 data and address when the backend has IPv4 data (or is not
/// vxlan, e.g. host-gw publishes `null`); IPv6 likewise when it has IPv6 data or an IPv6
/// address. `public-ip(v6)-overwrite` replaces the published address.
pub fn annotations_to_patch(
    node: &Node,
    names: &AnnotationNames,
    families: Families,
    attrs: &LeaseAttrs,
) -> BTreeMap<String, String> {
    let overwrite = |key: &str, v4: bool| {
        overwrite_ip(node, key, v4).unwrap_or_else(|error| {
            tracing::warn!(%error, "ignoring the public IP overwrite");
            None
        })
    };
    let overwrites = (
        overwrite(&names.backend_public_ip_overwrite, true),
        overwrite(&names.backend_public_ipv6_overwrite, false),
    );
    let mut want = annotations::lease_annotations(names, families, attrs, overwrites);
    want.retain(|k, v| annotation(node, k) != Some(v.as_str()));
    want
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeSpec, NodeStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use std::net::Ipv4Addr;

    use super::*;
    use crate::wire::{annotations::DEFAULT_PREFIX, lease::BackendAttrs};

    const V4: Families = Families {
        ipv4: true,
        ipv6: false,
    };
    const DUAL: Families = Families {
        ipv4: true,
        ipv6: true,
    };

    fn names() -> AnnotationNames {
        AnnotationNames::new(DEFAULT_PREFIX).unwrap()
    }

    fn node(name: &str, cidrs: &[&str], ann: &[(&str, &str)]) -> Node {
        let p = "flannel.alpha.coreos.com/";
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| (format!("{p}{k}"), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidrs.first().map(|c| (*c).to_owned()),
                pod_cidrs: Some(cidrs.iter().map(|c| (*c).to_owned()).collect()),
                ..Default::default()
            }),
            status: None,
        }
    }

    const VXLAN_DATA: &str = r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#;

    fn good(name: &str) -> Node {
        node(
            name,
            &["10.244.1.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", VXLAN_DATA),
                ("public-ip", "198.18.0.2"),
            ],
        )
    }

    #[test]
    fn peer_lease_from_upstream_annotations() {
        let lease = node_to_lease(&good("a"), &names(), V4).unwrap();
        assert_eq!(lease.subnet, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(lease.attrs.backend_type(), "vxlan");
        assert_eq!(lease.attrs.backend.data_json().unwrap(), VXLAN_DATA);
        assert_eq!(lease.ipv6_subnet, None);
    }

    #[test]
    fn a_peer_sends_from_its_published_addresses_and_annotations() {
        let mut n = good("a");
        n.metadata.annotations.as_mut().unwrap().insert(
            "flannel.alpha.coreos.com/public-ip-overwrite".into(),
            "198.18.0.2".into(),
        );
        let addr = |type_: &str, address: &str| NodeAddress {
            type_: type_.into(),
            address: address.into(),
        };
        n.status = Some(NodeStatus {
            addresses: Some(vec![
                addr("InternalIP", "198.18.1.2"),
                addr("ExternalIP", "203.0.113.7"),
                addr("Hostname", "a"),
                addr("InternalIP", "fd00:198::2"),
                addr("InternalIP", "127.0.0.1"),
                addr("InternalDNS", "10.9.9.9"),
            ]),
            ..Default::default()
        });
        let lease = node_to_lease(&n, &names(), V4).unwrap();
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 2));
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // An IPv4-only network: the node's IPv6 address is no sender.
        assert_eq!(
            lease.extra_senders,
            vec![
                IpAddr::from(ip("198.18.1.2")),
                IpAddr::from(ip("203.0.113.7"))
            ]
        );
        assert_eq!(
            lease.senders(),
            vec![ip("198.18.0.2"), ip("198.18.1.2"), ip("203.0.113.7")]
        );
        // Dual stack: the IPv6 InternalIP sends VXLAN over IPv6, next to PublicIPv6.
        let mut d = n.clone();
        d.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.244.1.0/24".into(), "fd00:0:0:1::/64".into()]);
        d.metadata.annotations.as_mut().unwrap().insert(
            "flannel.alpha.coreos.com/public-ipv6".into(),
            "fd18::2".into(),
        );
        let dual = node_to_lease(&d, &names(), DUAL).unwrap();
        assert_eq!(
            dual.senders6(),
            vec![
                "fd18::2".parse::<std::net::Ipv6Addr>().unwrap(),
                "fd00:198::2".parse().unwrap()
            ]
        );
        assert_eq!(dual.senders(), lease.senders());
        // Without status addresses: the published address alone.
        assert!(
            node_to_lease(&good("b"), &names(), V4)
                .unwrap()
                .extra_senders
                .is_empty()
        );
    }

    #[test]
    fn pod_cidr_host_bits_cleared_and_single_field_fallback() {
        let mut n = good("a");
        n.spec = Some(NodeSpec {
            pod_cidr: Some("10.244.3.7/24".into()),
            ..Default::default()
        });
        assert_eq!(
            pod_cidrs(&n).unwrap().v4,
            Some("10.244.3.0/24".parse().unwrap())
        );
        n.spec = Some(NodeSpec::default());
        assert!(matches!(
            pod_cidrs(&n),
            Err(NodeError::PodCidrNotAssigned { .. })
        ));
        let n = node("b", &["10.244.1.0/24", "fd00::/64", "fd01::/64"], &[]);
        assert!(matches!(
            pod_cidrs(&n),
            Err(NodeError::TooManyPodCidrs { count: 3, .. })
        ));
    }

    #[test]
    fn malformed_peers_are_named() {
        let bad_ip = node(
            "x",
            &["10.244.1.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", VXLAN_DATA),
                ("public-ip", "not-an-ip"),
            ],
        );
        let err = node_to_lease(&bad_ip, &names(), V4).unwrap_err();
        assert!(
            matches!(&err, NodeError::InvalidAnnotation { node, annotation, .. }
                if node == "x" && annotation == "flannel.alpha.coreos.com/public-ip"),
            "{err}"
        );
        let bad_json = node(
            "y",
            &["10.244.1.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", "{VNI:1"),
                ("public-ip", "198.18.0.3"),
            ],
        );
        assert!(matches!(
            node_to_lease(&bad_json, &names(), V4),
            Err(NodeError::InvalidAnnotation { annotation, .. }) if annotation.ends_with("/backend-data")
        ));
        let unmanaged = node("z", &["10.244.1.0/24"], &[("public-ip", "198.18.0.3")]);
        assert!(matches!(
            node_to_lease(&unmanaged, &names(), V4),
            Err(NodeError::NotManaged { value: None, .. })
        ));
        let no_cidr = node(
            "w",
            &["banana"],
            &[("kube-subnet-manager", "true"), ("backend-type", "host-gw")],
        );
        assert!(matches!(
            node_to_lease(&no_cidr, &names(), V4),
            Err(NodeError::InvalidPodCidr {
                field: "spec.podCIDRs",
                ..
            })
        ));
    }

    #[test]
    fn host_gw_null_data_is_none() {
        let n = node(
            "h",
            &["10.244.2.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "host-gw"),
                ("backend-data", "null"),
                ("public-ip", "198.18.0.4"),
            ],
        );
        let lease = node_to_lease(&n, &names(), V4).unwrap();
        assert_eq!(lease.attrs.backend, BackendAttrs::HostGw);
    }

    #[test]
    fn dual_stack_peer() {
        let n = node(
            "d",
            &["10.244.5.0/24", "fd00:0:0:5::/64"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", VXLAN_DATA),
                (
                    "backend-v6-data",
                    r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}"#,
                ),
                ("public-ip", "198.18.0.5"),
                ("public-ipv6", "fd18::5"),
            ],
        );
        let lease = node_to_lease(&n, &names(), DUAL).unwrap();
        assert_eq!(lease.ipv6_subnet, Some("fd00:0:0:5::/64".parse().unwrap()));
        assert_eq!(lease.attrs.public_ipv6, Some("fd18::5".parse().unwrap()));
    }

    const V6_ONLY: Families = Families {
        ipv4: false,
        ipv6: true,
    };
    const VXLAN6_DATA: &str = r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e6"}"#;

    #[test]
    fn ipv6_only_peer_reads_the_ipv6_half_alone() {
        // A dual-stack node object on an IPv6-only network: the IPv4 pod CIDR and
        // annotations are not read (upstream `nodeToLease` with EnableIPv4 false).
        let n = node(
            "v6",
            &["10.244.5.0/24", "fd00:10:244:5::/64"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-v6-data", VXLAN6_DATA),
                ("public-ipv6", "fd00:198::5"),
            ],
        );
        let lease = node_to_lease(&n, &names(), V6_ONLY).unwrap();
        assert_eq!(lease.subnet, None);
        assert_eq!(
            lease.ipv6_subnet,
            Some("fd00:10:244:5::/64".parse().unwrap())
        );
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            lease.attrs.public_ipv6,
            Some("fd00:198::5".parse().unwrap())
        );
        assert_eq!(lease.attrs.backend.v6_data_json().unwrap(), VXLAN6_DATA);
        assert_eq!(lease.attrs.backend.data_json(), None);
        // An IPv6-only node object (podCIDRs has the IPv6 entry only) reads the same.
        let only = node("v6", &["fd00:10:244:5::/64"], &[]);
        let mut only = only;
        only.metadata.annotations = n.metadata.annotations.clone();
        assert_eq!(node_to_lease(&only, &names(), V6_ONLY).unwrap(), lease);
        // Without an IPv6 pod CIDR it is no peer, named.
        let v4_only = node("x", &["10.244.5.0/24"], &[]);
        let mut v4_only = v4_only;
        v4_only.metadata.annotations = n.metadata.annotations.clone();
        assert!(matches!(
            node_to_lease(&v4_only, &names(), V6_ONLY),
            Err(NodeError::MissingFamily { family: "IPv6", .. })
        ));
        // Without public-ipv6 neither.
        let mut no_ip = n.clone();
        no_ip
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove("flannel.alpha.coreos.com/public-ipv6");
        assert!(matches!(
            node_to_lease(&no_ip, &names(), V6_ONLY),
            Err(NodeError::MissingAnnotation { annotation, .. }) if annotation.ends_with("/public-ipv6")
        ));
    }

    #[test]
    fn ipv6_only_vxlan_node_publishes_upstreams_annotations() {
        let n = node("me", &["fd00:10:244:9::/64"], &[]);
        let a = LeaseAttrs {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: Some("fd00:198::9".parse().unwrap()),
            backend: BackendAttrs::parse("vxlan", None, Some(VXLAN6_DATA)).unwrap(),
        };
        let patch = annotations_to_patch(&n, &names(), V6_ONLY, &a);
        let expect: BTreeMap<String, String> = [
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/backend-v6-data", VXLAN6_DATA),
            ("flannel.alpha.coreos.com/public-ipv6", "fd00:198::9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(patch, expect);
        // The overwrite replaces the published IPv6 address, and our lease says so.
        let mut n = n;
        n.metadata.annotations.as_mut().unwrap().insert(
            "flannel.alpha.coreos.com/public-ipv6-overwrite".into(),
            "fd00:198::99".into(),
        );
        let patch = annotations_to_patch(&n, &names(), V6_ONLY, &a);
        assert_eq!(
            patch["flannel.alpha.coreos.com/public-ipv6"],
            "fd00:198::99"
        );
        let published = published_attrs(&n, &names(), V6_ONLY, &a);
        n.metadata.annotations.as_mut().unwrap().extend(patch);
        assert_eq!(
            node_to_lease(&n, &names(), V6_ONLY).unwrap().attrs,
            published
        );
    }

    #[test]
    fn ipv6_only_host_gw_node_publishes_upstreams_annotations() {
        // Upstream writes backend-data/public-ip for every non-vxlan backend, whatever the
        // families: an IPv6-only host-gw node says `null` and its zero PublicIP.
        let n = node("me", &["fd00:10:244:9::/64"], &[]);
        let a = LeaseAttrs {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: Some("fd00:198::9".parse().unwrap()),
            backend: BackendAttrs::HostGw,
        };
        let patch = annotations_to_patch(&n, &names(), V6_ONLY, &a);
        let expect: BTreeMap<String, String> = [
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/backend-type", "host-gw"),
            ("flannel.alpha.coreos.com/backend-data", "null"),
            ("flannel.alpha.coreos.com/public-ip", "0.0.0.0"),
            ("flannel.alpha.coreos.com/backend-v6-data", "null"),
            ("flannel.alpha.coreos.com/public-ipv6", "fd00:198::9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(patch, expect);
        let mut n = n;
        n.metadata.annotations.as_mut().unwrap().extend(patch);
        let lease = node_to_lease(&n, &names(), V6_ONLY).unwrap();
        assert_eq!(lease.attrs.backend, BackendAttrs::HostGw);
        assert_eq!(lease.attrs, a);
    }

    #[test]
    fn dual_stack_vxlan_node_publishes_both_halves() {
        let n = node("me", &["10.244.9.0/24", "fd00:10:244:9::/64"], &[]);
        let a = LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 18, 0, 9),
            public_ipv6: Some("fd00:198::9".parse().unwrap()),
            backend: BackendAttrs::parse("vxlan", Some(VXLAN_DATA), Some(VXLAN6_DATA)).unwrap(),
        };
        let patch = annotations_to_patch(&n, &names(), DUAL, &a);
        let expect: BTreeMap<String, String> = [
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/backend-data", VXLAN_DATA),
            ("flannel.alpha.coreos.com/public-ip", "198.18.0.9"),
            ("flannel.alpha.coreos.com/backend-v6-data", VXLAN6_DATA),
            ("flannel.alpha.coreos.com/public-ipv6", "fd00:198::9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(patch, expect);
        let mut n = n;
        n.metadata.annotations.as_mut().unwrap().extend(patch);
        let lease = node_to_lease(&n, &names(), DUAL).unwrap();
        assert_eq!(lease.attrs, a);
        assert_eq!(lease.subnet, Some("10.244.9.0/24".parse().unwrap()));
        assert_eq!(
            lease.ipv6_subnet,
            Some("fd00:10:244:9::/64".parse().unwrap())
        );
    }

    fn attrs() -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 18, 0, 9),
            public_ipv6: None,
            backend: BackendAttrs::parse("vxlan", Some(VXLAN_DATA), None).unwrap(),
        }
    }

    #[test]
    fn own_annotations_upstream_names_and_values() {
        let n = node("me", &["10.244.9.0/24"], &[]);
        let patch = annotations_to_patch(&n, &names(), V4, &attrs());
        let expect: BTreeMap<String, String> = [
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/backend-data", VXLAN_DATA),
            ("flannel.alpha.coreos.com/public-ip", "198.18.0.9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(patch, expect);
    }

    #[test]
    fn unchanged_annotations_need_no_patch_and_overwrite_wins() {
        let n = node(
            "me",
            &["10.244.9.0/24"],
            &[
                ("kube-subnet-manager", "true"),
                ("backend-type", "vxlan"),
                ("backend-data", VXLAN_DATA),
                ("public-ip", "198.18.0.9"),
            ],
        );
        assert!(annotations_to_patch(&n, &names(), V4, &attrs()).is_empty());
        let mut n = n;
        n.metadata.annotations.as_mut().unwrap().insert(
            "flannel.alpha.coreos.com/public-ip-overwrite".into(),
            "198.19.7.7".into(),
        );
        let patch = annotations_to_patch(&n, &names(), V4, &attrs());
        assert_eq!(patch.len(), 1);
        assert_eq!(patch["flannel.alpha.coreos.com/public-ip"], "198.19.7.7");
        // What the node then says is what our lease is: the own-lease watch compares the
        // two, and must not see a hijack in the overwrite.
        let published = published_attrs(&n, &names(), V4, &attrs());
        assert_eq!(published.public_ip, Ipv4Addr::new(198, 19, 7, 7));
        n.metadata.annotations.as_mut().unwrap().extend(patch);
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.9.0/24".into()]);
        assert_eq!(node_to_lease(&n, &names(), V4).unwrap().attrs, published);
    }

    #[test]
    fn host_gw_publishes_null_data() {
        let n = node("me", &["10.244.9.0/24"], &[]);
        let mut a = attrs();
        a.backend = BackendAttrs::HostGw;
        let patch = annotations_to_patch(&n, &names(), V4, &a);
        assert_eq!(patch["flannel.alpha.coreos.com/backend-data"], "null");
        assert_eq!(patch["flannel.alpha.coreos.com/public-ip"], "198.18.0.9");
    }

    #[test]
    fn ipv6_host_publishes_public_ipv6() {
        let n = node("me", &["10.244.9.0/24", "fd00:0:0:9::/64"], &[]);
        let mut a = attrs();
        a.public_ipv6 = Some("fd18::9".parse().unwrap());
        let patch = annotations_to_patch(&n, &names(), DUAL, &a);
        assert_eq!(patch["flannel.alpha.coreos.com/public-ipv6"], "fd18::9");
        // A vxlan host without an IPv6 VTEP publishes no v6 data (none to give)…
        assert!(!patch.contains_key("flannel.alpha.coreos.com/backend-v6-data"));
        // …and such a node is still a readable dual-stack peer.
        let mut n = good("peer");
        n.spec.as_mut().unwrap().pod_cidrs =
            Some(vec!["10.244.1.0/24".into(), "fd00:0:0:1::/64".into()]);
        n.metadata.annotations.as_mut().unwrap().extend(
            patch
                .into_iter()
                .filter(|(k, _)| k.ends_with("/public-ipv6")),
        );
        let lease = node_to_lease(&n, &names(), DUAL).unwrap();
        assert_eq!(lease.attrs.public_ipv6, Some("fd18::9".parse().unwrap()));
    }
}

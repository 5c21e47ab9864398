//! Node annotations (upstream `pkg/subnet/kube/annotations.go`): their names under the
//! normalised `--kube-annotation-prefix`, a peer's lease attributes read from them, and the
//! values our own node publishes.
//!
//! The names and values are wire format: upstream flanneld nodes read exactly these keys,
//! so a mixed cluster only works if the prefix is normalised the same way.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::LazyLock,
};

use regex::Regex;

use super::{
    lease::{BackendAttrs, Error as LeaseError, LeaseAttrs},
    truncated,
};

/// The default `--kube-annotation-prefix`.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// Why an annotation prefix was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    /// More than one `/` (a Kubernetes annotation key has at most one).
    #[error("annotation prefix {prefix:?} contains more than one '/'")]
    TooManySlashes {
        /// The prefix as given.
        prefix: String,
    },
    /// The normalised prefix is not a DNS-subdomain-like name followed by `/`.
    #[error(
        "annotation prefix {prefix:?} (normalised {normalised:?}) is not a valid annotation \
         prefix: expected something like \"flannel.alpha.coreos.com\" or \"example.com/net\""
    )]
    Invalid {
        /// The prefix as given.
        prefix: String,
        /// What normalisation turned it into.
        normalised: String,
    },
}

/// Upstream's acceptance pattern for a normalised prefix.
static PREFIX_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")
        .expect("static annotation prefix regex compiles")
});

/// Normalises a prefix the way upstream does: no `/` → append `/`; one `/` not at the end →
/// append `-` (so `example.com/net` yields `example.com/net-backend-data`).
pub fn normalise_prefix(prefix: &str) -> Result<String, PrefixError> {
    let normalised = match prefix.matches('/').count() {
        0 => format!("{prefix}/"),
        1 if prefix.ends_with('/') => prefix.to_owned(),
        1 => format!("{prefix}-"),
        _ => {
            return Err(PrefixError::TooManySlashes {
                prefix: prefix.to_owned(),
            });
        }
    };
    if PREFIX_RE.is_match(&normalised) {
        Ok(normalised)
    } else {
        Err(PrefixError::Invalid {
            prefix: prefix.to_owned(),
            normalised,
        })
    }
}

/// The full annotation keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnotationNames {
    /// `kube-subnet-manager`: `"true"` on every node flannel runs on; peers ignore others.
    pub subnet_kube_managed: String,
    /// `backend-type`, e.g. `vxlan`.
    pub backend_type: String,
    /// `backend-data`: IPv4 backend JSON (`{"VNI":1,"VtepMAC":"…"}`, `null` for host-gw).
    pub backend_data: String,
    /// `backend-v6-data`: IPv6 backend JSON.
    pub backend_v6_data: String,
    /// `public-ip`: the IPv4 address peers tunnel to.
    pub backend_public_ip: String,
    /// `public-ipv6`: the IPv6 address peers tunnel to.
    pub backend_public_ipv6: String,
    /// `public-ip-overwrite`: user-set; published as `public-ip` instead of the detected IP.
    pub backend_public_ip_overwrite: String,
    /// `public-ipv6-overwrite`: IPv6 counterpart.
    pub backend_public_ipv6_overwrite: String,
    /// `node-public-ip`: user-set; replaces `--public-ip` at start-up.
    pub node_public_ip: String,
    /// `node-public-ipv6`: IPv6 counterpart.
    pub node_public_ipv6: String,
}

impl AnnotationNames {
    /// Builds the names under `prefix` (as given on the command line; normalised here).
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        let p = normalise_prefix(prefix)?;
        Ok(Self {
            subnet_kube_managed: format!("{p}kube-subnet-manager"),
            backend_type: format!("{p}backend-type"),
            backend_data: format!("{p}backend-data"),
            backend_v6_data: format!("{p}backend-v6-data"),
            backend_public_ip: format!("{p}public-ip"),
            backend_public_ipv6: format!("{p}public-ipv6"),
            backend_public_ip_overwrite: format!("{p}public-ip-overwrite"),
            backend_public_ipv6_overwrite: format!("{p}public-ipv6-overwrite"),
            node_public_ip: format!("{p}node-public-ip"),
            node_public_ipv6: format!("{p}node-public-ipv6"),
        })
    }
}

/// Which address families the cluster network enables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    /// `EnableIPv4`.
    pub ipv4: bool,
    /// `EnableIPv6`.
    pub ipv6: bool,
}

/// Why a node's annotations do not make a lease; the node itself is named by the caller.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    /// A required annotation is absent.
    #[error("annotation {annotation} is missing")]
    Missing {
        /// The annotation key.
        annotation: String,
    },
    /// An annotation does not parse.
    #[error("annotation {annotation}={value:?} is invalid: {reason}")]
    Invalid {
        /// The annotation key.
        annotation: String,
        /// Its value (truncated).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(annotation: &str, value: &str, reason: impl ToString) -> AnnotationError {
    AnnotationError::Invalid {
        annotation: annotation.to_owned(),
        value: truncated(value.as_bytes()),
        reason: reason.to_string(),
    }
}

/// An address annotation of the family `A`.
pub fn parse_ip<A: std::str::FromStr>(annotation: &str, value: &str) -> Result<A, AnnotationError>
where
    A::Err: std::fmt::Display,
{
    value.parse().map_err(|e| invalid(annotation, value, e))
}

/// A user-set address annotation (`public-ip-overwrite`, `node-public-ip`…) that must be of
/// the family `want_v4` says.
pub fn parse_family_ip(
    annotation: &str,
    value: &str,
    want_v4: bool,
) -> Result<IpAddr, AnnotationError> {
    let ip: IpAddr = parse_ip(annotation, value)?;
    if ip.is_ipv4() != want_v4 {
        let family = if want_v4 { "an IPv4" } else { "an IPv6" };
        return Err(invalid(
            annotation,
            value,
            format!("expected {family} address"),
        ));
    }
    Ok(ip)
}

/// Reads a peer's lease attributes from its annotations (upstream `nodeToLease`): the
/// `backend-type`; for IPv4 `public-ip` and, for vxlan, `backend-data`; for IPv6
/// `public-ipv6` and `backend-v6-data` when present. `get` looks an annotation up. The
/// public entry point for the annotation wire format.
pub fn parse_lease_attrs<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
    names: &AnnotationNames,
    families: Families,
) -> Result<LeaseAttrs, AnnotationError> {
    let required = |key: &str| {
        get(key).ok_or_else(|| AnnotationError::Missing {
            annotation: key.to_owned(),
        })
    };
    let backend_type = required(&names.backend_type)?;
    let mut public_ip = Ipv4Addr::UNSPECIFIED;
    let mut data = None;
    if families.ipv4 {
        public_ip = parse_ip(
            &names.backend_public_ip,
            required(&names.backend_public_ip)?,
        )?;
        // Peers need a vxlan node's VTEP MAC; other backends publish `null` or nothing.
        data = if backend_type == "vxlan" {
            Some(required(&names.backend_data)?)
        } else {
            get(&names.backend_data)
        };
        if backend_type == "vxlan" && data.is_some_and(|d| d.trim() == "null") {
            return Err(invalid(
                &names.backend_data,
                data.unwrap_or_default(),
                "vxlan nodes must publish backend data",
            ));
        }
    }
    let mut public_ipv6 = None;
    let mut v6_data = None;
    if families.ipv6 {
        let key = &names.backend_public_ipv6;
        public_ipv6 = Some(parse_ip::<Ipv6Addr>(key, required(key)?)?);
        v6_data = get(&names.backend_v6_data);
    }
    let backend = BackendAttrs::parse(backend_type, data, v6_data).map_err(|e| match e {
        LeaseError::BadBackendData {
            field,
            data,
            reason,
            ..
        } => {
            let key = if field == "BackendV6Data" {
                &names.backend_v6_data
            } else {
                &names.backend_data
            };
            // `data` is already truncated by the lease codec.
            AnnotationError::Invalid {
                annotation: key.clone(),
                value: data,
                reason,
            }
        }
        other => invalid(&names.backend_data, "", other),
    })?;
    Ok(LeaseAttrs {
        public_ip,
        public_ipv6,
        backend,
    })
}

/// The annotations a node publishing `attrs` carries (upstream `AcquireLease`):
/// `kube-subnet-manager` and `backend-type` always; `public-ip` and `backend-data` (`null`
/// when the backend has none) unless a vxlan host has no IPv4 VTEP; with IPv6,
/// `public-ipv6` whenever the host has an IPv6 address, and `backend-v6-data` when the
/// backend has IPv6 data or is not vxlan. The overwrite annotations replace the published
/// addresses.
///
/// Upstream's IPv4 condition does not look at `EnableIPv4`: an IPv6-only vxlan host has no
/// IPv4 VTEP and so writes neither, but an IPv6-only host-gw host writes
/// `backend-data: null` and `public-ip: 0.0.0.0` (its zero `PublicIP`). Kept, so a node
/// looks the same whichever implementation runs on it; no peer reads them.
pub fn lease_annotations(
    names: &AnnotationNames,
    families: Families,
    attrs: &LeaseAttrs,
    overwrite: (Option<IpAddr>, Option<IpAddr>),
) -> BTreeMap<String, String> {
    let is_vxlan = matches!(attrs.backend, BackendAttrs::Vxlan { .. });
    let mut want = BTreeMap::new();
    want.insert(names.subnet_kube_managed.clone(), "true".to_owned());
    want.insert(names.backend_type.clone(), attrs.backend_type().to_owned());
    let data = attrs.backend.data_json();
    if !is_vxlan || data.is_some() {
        want.insert(
            names.backend_data.clone(),
            data.unwrap_or_else(|| "null".into()),
        );
        let public = overwrite.0.unwrap_or(attrs.public_ip.into());
        want.insert(names.backend_public_ip.clone(), public.to_string());
    }
    if families.ipv6 {
        let v6_data = attrs.backend.v6_data_json();
        if !is_vxlan || v6_data.is_some() {
            want.insert(
                names.backend_v6_data.clone(),
                v6_data.unwrap_or_else(|| "null".into()),
            );
        }
        if let Some(public) = overwrite.1.or(attrs.public_ipv6.map(IpAddr::from)) {
            want.insert(names.backend_public_ipv6.clone(), public.to_string());
        }
    }
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_gives_upstream_names() {
        let n = AnnotationNames::new(DEFAULT_PREFIX).unwrap();
        assert_eq!(
            n.subnet_kube_managed,
            "flannel.alpha.coreos.com/kube-subnet-manager"
        );
        assert_eq!(n.backend_type, "flannel.alpha.coreos.com/backend-type");
        assert_eq!(n.backend_data, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(
            n.backend_v6_data,
            "flannel.alpha.coreos.com/backend-v6-data"
        );
        assert_eq!(n.backend_public_ip, "flannel.alpha.coreos.com/public-ip");
        assert_eq!(
            n.backend_public_ipv6,
            "flannel.alpha.coreos.com/public-ipv6"
        );
        assert_eq!(
            n.backend_public_ip_overwrite,
            "flannel.alpha.coreos.com/public-ip-overwrite"
        );
        assert_eq!(
            n.backend_public_ipv6_overwrite,
            "flannel.alpha.coreos.com/public-ipv6-overwrite"
        );
        assert_eq!(n.node_public_ip, "flannel.alpha.coreos.com/node-public-ip");
        assert_eq!(
            n.node_public_ipv6,
            "flannel.alpha.coreos.com/node-public-ipv6"
        );
    }

    #[test]
    fn normalisation_matches_upstream() {
        assert_eq!(
            normalise_prefix("flannel.alpha.coreos.com").unwrap(),
            "flannel.alpha.coreos.com/"
        );
        assert_eq!(normalise_prefix("example.com/").unwrap(), "example.com/");
        assert_eq!(
            normalise_prefix("example.com/net").unwrap(),
            "example.com/net-"
        );
        assert_eq!(
            AnnotationNames::new("example.com/net")
                .unwrap()
                .backend_data,
            "example.com/net-backend-data"
        );
        assert!(matches!(
            normalise_prefix("a.com/b/c"),
            Err(PrefixError::TooManySlashes { .. })
        ));
        for bad in [
            "",
            "nodots",
            "Upper.Case",
            "example.com/Net",
            "example.com/a.b",
            "bad space.com",
        ] {
            assert!(
                matches!(normalise_prefix(bad), Err(PrefixError::Invalid { .. })),
                "{bad:?} should be refused"
            );
        }
    }
}

//! Node annotation names and their normalised prefix (upstream `pkg/subnet/kube/annotations.go`).
//!
//! The names are wire format: upstream flanneld nodes read exactly these keys, so a mixed
//! cluster only works if the prefix is normalised the same way.

use std::sync::LazyLock;

use regex::Regex;

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

//! `subnet.env`: what flanneld tells the CNI plugin (and `mk-docker-opts.sh`) about this
//! host — written by the agent, read back by the agent at start (its previous subnet) and
//! by the CNI plugin on every ADD.
//!
//! Written exactly as upstream's `WriteSubnetFile` (names, order, `KEY=VALUE\n`, the subnet
//! as base+1: `10.244.1.1/24`). Read in one of two dialects, as upstream reads it: the CNI
//! plugin's strict line parser ([`Dialect::Strict`]: split at the first `=`, no trimming, a
//! bad value is an error naming the line) and flanneld's `godotenv` ([`Dialect::Dotenv`]:
//! `export`, quotes and spaces tolerated, an unreadable value simply unset).

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::cidr::{Cidr, first_host, masked, parse_cidr};

/// How to read the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// The CNI plugin's: exact lines, bad values are errors, all keys required.
    Strict,
    /// flanneld's `godotenv`: lenient, bad or missing values are unset.
    Dotenv,
}

/// Why `subnet.env` was refused ([`Dialect::Strict`] only).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A recognised key has a bad value.
    #[error("line {line}: {key}={value:?}: {reason}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Required keys are missing.
    #[error("missing {missing}")]
    Incomplete {
        /// The missing keys, comma separated (upstream's wording).
        missing: String,
    },
}

/// The contents of `subnet.env`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK` (a comma list, deduplicated, in order).
    pub networks: Vec<Ipv4Network>,
    /// `FLANNEL_SUBNET`, host bits cleared (`10.244.1.1/24` → `10.244.1.0/24`).
    pub subnet: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_networks: Vec<Ipv6Network>,
    /// `FLANNEL_IPV6_SUBNET`, host bits cleared.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// `FLANNEL_MTU`.
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ` (`"true"` is true, anything else false).
    pub ip_masq: Option<bool>,
}

fn list<N: Cidr>(nets: &[N]) -> String {
    nets.iter().map(N::to_string).collect::<Vec<_>>().join(",")
}

/// `10.244.1.0/24` as `10.244.1.1/24`.
fn gateway_form<N: Cidr>(net: N) -> String {
    format!("{}/{}", first_host(net), net.prefix_len())
}

impl SubnetEnv {
    /// The file's exact contents.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.networks.is_empty() {
            out += &format!("FLANNEL_NETWORK={}\n", list(&self.networks));
        }
        if let Some(s) = self.subnet {
            out += &format!("FLANNEL_SUBNET={}\n", gateway_form(s));
        }
        if !self.ipv6_networks.is_empty() {
            out += &format!("FLANNEL_IPV6_NETWORK={}\n", list(&self.ipv6_networks));
        }
        if let Some(s) = self.ipv6_subnet {
            out += &format!("FLANNEL_IPV6_SUBNET={}\n", gateway_form(s));
        }
        if let Some(mtu) = self.mtu {
            out += &format!("FLANNEL_MTU={mtu}\n");
        }
        if let Some(m) = self.ip_masq {
            out += &format!("FLANNEL_IPMASQ={m}\n");
        }
        out
    }

    /// Parses the file in `dialect`. Unknown keys are ignored in both.
    pub fn parse(text: &str, dialect: Dialect) -> Result<Self, Error> {
        let mut env = Self::default();
        for (idx, line) in text.lines().enumerate() {
            let line = match dialect {
                Dialect::Strict => line,
                Dialect::Dotenv => {
                    let l = line.trim();
                    l.strip_prefix("export ").unwrap_or(l)
                }
            };
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = match dialect {
                Dialect::Strict => (key, value),
                Dialect::Dotenv => (
                    key.trim(),
                    value.trim().trim_matches(|c| c == '"' || c == '\''),
                ),
            };
            let bad = |reason: String| Error::BadLine {
                line: idx + 1,
                key: key.to_owned(),
                value: value.to_owned(),
                reason,
            };
            let result = match key {
                "FLANNEL_NETWORK" => cidr_list(value).map(|n| env.networks = n),
                "FLANNEL_SUBNET" => cidr(value).map(|n| env.subnet = Some(n)),
                "FLANNEL_IPV6_NETWORK" => cidr_list(value).map(|n| env.ipv6_networks = n),
                "FLANNEL_IPV6_SUBNET" => cidr(value).map(|n| env.ipv6_subnet = Some(n)),
                "FLANNEL_MTU" => value
                    .parse()
                    .map(|m| env.mtu = Some(m))
                    .map_err(|e| format!("not an unsigned integer: {e}")),
                "FLANNEL_IPMASQ" => {
                    env.ip_masq = Some(value == "true");
                    Ok(())
                }
                _ => Ok(()),
            };
            match (result, dialect) {
                (Ok(()), _) => {}
                (Err(reason), Dialect::Strict) => return Err(bad(reason)),
                // godotenv hands flanneld the string; a value it cannot use means "none".
                (Err(_), Dialect::Dotenv) => {}
            }
        }
        if dialect == Dialect::Strict {
            env.require_complete()?;
        }
        Ok(env)
    }

    /// What the CNI plugin needs: a network, a subnet, the MTU and the masquerade flag.
    fn require_complete(&self) -> Result<(), Error> {
        let mut missing = Vec::new();
        if self.networks.is_empty() && self.ipv6_networks.is_empty() {
            missing.push("FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK");
        }
        if self.subnet.is_none() && self.ipv6_subnet.is_none() {
            missing.push("FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET");
        }
        if self.mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if self.ip_masq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Incomplete {
                missing: missing.join(", "),
            })
        }
    }

    /// The single IPv4 network, when exactly one is listed (flanneld's previous network).
    pub fn network(&self) -> Option<Ipv4Network> {
        match self.networks.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The single IPv6 network, when exactly one is listed.
    pub fn ipv6_network(&self) -> Option<Ipv6Network> {
        match self.ipv6_networks.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}

/// One CIDR of the family `N`, host bits cleared (Go's `net.ParseCIDR`, as the plugin).
fn cidr<N: Cidr>(s: &str) -> Result<N, String> {
    parse_cidr::<N>(s)
        .map(masked)
        .ok_or_else(|| format!("{s:?} is not an {} CIDR (address/prefix length)", N::FAMILY))
}

/// A comma list of CIDRs, deduplicated in order.
fn cidr_list<N: Cidr>(s: &str) -> Result<Vec<N>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let n = cidr(part)?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOCK: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
                         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn upstream_format_v4_and_dual_stack_round_trip() {
        let env = SubnetEnv {
            networks: vec!["10.244.0.0/16".parse().unwrap()],
            subnet: Some("10.244.1.0/24".parse().unwrap()),
            mtu: Some(1450),
            ip_masq: Some(true),
            ..Default::default()
        };
        assert_eq!(env.render(), STOCK);
        assert_eq!(SubnetEnv::parse(STOCK, Dialect::Strict).unwrap(), env);
        let dual = SubnetEnv {
            ipv6_networks: vec!["2001:cafe:42::/56".parse().unwrap()],
            ipv6_subnet: Some("2001:cafe:42::/64".parse().unwrap()),
            ip_masq: Some(false),
            ..env
        };
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
             FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
        assert_eq!(dual.render(), text);
        assert_eq!(SubnetEnv::parse(text, Dialect::Strict).unwrap(), dual);
        assert_eq!(SubnetEnv::parse(text, Dialect::Dotenv).unwrap(), dual);
    }

    #[test]
    fn ipv6_only_has_no_ipv4_lines() {
        // Upstream writes FLANNEL_NETWORK/FLANNEL_SUBNET only with EnableIPv4: four lines.
        let env = SubnetEnv {
            ipv6_networks: vec!["fd00:10:244::/56".parse().unwrap()],
            ipv6_subnet: Some("fd00:10:244:1::/64".parse().unwrap()),
            mtu: Some(1430),
            ip_masq: Some(true),
            ..Default::default()
        };
        let text = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n\
                    FLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n";
        assert_eq!(env.render(), text);
        assert_eq!(SubnetEnv::parse(text, Dialect::Strict).unwrap(), env);
    }

    #[test]
    fn strict_parser() {
        let e = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16,10.244.0.0/16\n\
             FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n# c\nOTHER=1\n",
            Dialect::Strict,
        )
        .unwrap();
        assert_eq!(e.networks.len(), 2);
        assert_eq!(e.network(), None);
        assert_eq!(e.subnet, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(e.ip_masq, Some(false));
        let err = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU= 1450\n",
            Dialect::Strict,
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::BadLine { line: 2, key, .. } if key == "FLANNEL_MTU"),
            "{err}"
        );
        let err = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\n",
            Dialect::Strict,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_IPMASQ"
        );
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=\"10.244.0.0/16\"\n", Dialect::Strict).is_err());
        assert!(SubnetEnv::parse("FLANNEL_SUBNET=fd00::1/64\n", Dialect::Strict).is_err());
    }

    #[test]
    fn dotenv_parser_is_lenient() {
        let e = SubnetEnv::parse(
            "FLANNEL_SUBNET=10.1.1.1/24,10.2.1.1/24\nFLANNEL_IPV6_SUBNET=bogus\n",
            Dialect::Dotenv,
        )
        .unwrap();
        assert_eq!(e, SubnetEnv::default());
        let e =
            SubnetEnv::parse("export FLANNEL_SUBNET=\"10.1.1.1/24\"\n", Dialect::Dotenv).unwrap();
        assert_eq!(e.subnet, Some("10.1.1.0/24".parse().unwrap()));
    }
}

//! The cluster network configuration (`net-conf.json`, etcd `<prefix>/config`).
//!
//! Parsed with Go `encoding/json` semantics, because the same JSON is read by upstream
//! flanneld: object keys match field names case-insensitively (`"network"`, `"Network"` and
//! `"NETWORK"` are the same field), unknown keys are ignored, `null` leaves the default.
//! [`NetworkConfig::parse`] only parses (what upstream's kube manager uses);
//! [`NetworkConfig::parse_and_check`] also defaults and validates exactly like upstream's
//! `CheckNetworkConfig` (what the etcd manager uses).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::Value;

use crate::wire::{
    cidr::{self, Cidr},
    gojson::{FieldError, GoObject},
    truncated,
};

/// Why a network configuration was refused. Every variant names the field and the value, so
/// the operator knows what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not JSON at all.
    #[error("network config is not valid JSON: {reason}")]
    Json {
        /// serde_json's message (with line and column).
        reason: String,
    },
    /// Valid JSON, but not an object.
    #[error("network config must be a JSON object, got {value}")]
    NotObject {
        /// The JSON given.
        value: String,
    },
    /// A field has the wrong JSON type or an unparsable value.
    #[error("network config field {field}: {value} is not {expected}")]
    Field {
        /// Field name (upstream spelling, e.g. `Backend.VNI`).
        field: String,
        /// The JSON value found.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A value parsed but fails upstream's `CheckNetworkConfig` rules.
    #[error("network config field {field}: {value}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// No `Backend` section: upstream then uses its `udp` backend, which we do not have.
    #[error(
        "network config has no \"Backend\" section: upstream flannel then defaults to the \
         \"udp\" backend, which is not supported here; set \"Backend\": {{\"Type\": \"vxlan\"}}"
    )]
    NoBackend,
    /// `Backend.Type` names a backend we do not implement (or none at all).
    #[error(
        "network config field Backend.Type: unknown or unsupported backend type {value:?} \
         (supported: \"vxlan\", \"host-gw\")"
    )]
    UnsupportedBackend {
        /// The type as given.
        value: String,
    },
    /// Neither family is enabled.
    #[error("network config: EnableIPv4 and EnableIPv6 are both false; enable at least one")]
    NoFamily,
}

/// Result of configuration parsing.
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    /// First allocatable IPv4 subnet base (`0.0.0.0` = unset before checking).
    pub subnet_min: Ipv4Addr,
    /// Last allocatable IPv4 subnet base (`0.0.0.0` = unset before checking).
    pub subnet_max: Ipv4Addr,
    /// IPv6 cluster network.
    pub ipv6_network: Option<Ipv6Network>,
    /// Per-host IPv6 prefix length.
    pub ipv6_subnet_len: u8,
    /// First allocatable IPv6 subnet base.
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// Last allocatable IPv6 subnet base.
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// Use nftables rather than iptables for masquerade/forward rules. Defaults to true
    /// when the key is absent (upstream defaults to iptables): nftables is what current
    /// distributions run, and an explicit `"EnableNFTables": false` still selects the
    /// iptables rules. The rules are per host, so hosts of either kind mix freely.
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

impl From<FieldError> for Error {
    fn from(e: FieldError) -> Self {
        Self::Field {
            field: e.field,
            value: e.value,
            expected: e.expected,
        }
    }
}

fn prefix_len(obj: &GoObject<'_>, name: &str) -> Result<u8> {
    match obj.int(name)? {
        None => Ok(0),
        Some(n) => u8::try_from(n).map_err(|_| {
            obj.field_err(
                name,
                &Value::from(n),
                "a prefix length (unsigned, at most 128)",
            )
            .into()
        }),
    }
}

impl NetworkConfig {
    /// Parses `net-conf.json` with Go-JSON semantics and resolves the backend, without
    /// upstream's defaulting/validation (the kube manager uses this as is).
    pub fn parse(json: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json).map_err(|e| Error::Json {
            reason: e.to_string(),
        })?;
        let Value::Object(map) = &value else {
            // Quoted truncated: a config is outside input and may be huge.
            return Err(Error::NotObject {
                value: truncated(value.to_string().as_bytes()),
            });
        };
        let obj = GoObject::new(map, "");
        const V4_CIDR: &str = "an IPv4 CIDR (a.b.c.d/n)";
        const V6_CIDR: &str = "an IPv6 CIDR (x::/n)";
        Ok(Self {
            enable_ipv4: obj.bool("EnableIPv4", true)?,
            enable_ipv6: obj.bool("EnableIPv6", false)?,
            network: obj.cidr("Network", V4_CIDR)?,
            subnet_len: prefix_len(&obj, "SubnetLen")?,
            subnet_min: obj
                .parsed("SubnetMin", "an IPv4 address")?
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            subnet_max: obj
                .parsed("SubnetMax", "an IPv4 address")?
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            ipv6_network: obj.cidr("IPv6Network", V6_CIDR)?,
            ipv6_subnet_len: prefix_len(&obj, "IPv6SubnetLen")?,
            ipv6_subnet_min: obj
                .parsed::<Ipv6Addr>("IPv6SubnetMin", "an IPv6 address")?
                .filter(|a| !a.is_unspecified()),
            ipv6_subnet_max: obj
                .parsed::<Ipv6Addr>("IPv6SubnetMax", "an IPv6 address")?
                .filter(|a| !a.is_unspecified()),
            enable_nftables: obj.bool("EnableNFTables", true)?,
            backend: parse_backend(obj.get("Backend"))?,
        })
    }

    /// Parses and then applies upstream's `CheckNetworkConfig` (etcd manager semantics).
    pub fn parse_and_check(json: &str) -> Result<Self> {
        let mut cfg = Self::parse(json)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Defaults `SubnetLen`/`SubnetMin`/`SubnetMax` (and the IPv6 counterparts) and
    /// validates them, as upstream's `CheckNetworkConfig`.
    pub fn check(&mut self) -> Result<()> {
        if !self.enable_ipv4 && !self.enable_ipv6 {
            return Err(Error::NoFamily);
        }
        if self.enable_ipv4 {
            self.check_v4()?;
        }
        if self.enable_ipv6 {
            self.check_v6()?;
        }
        Ok(())
    }

    fn check_v4(&mut self) -> Result<()> {
        let unset = |a: Ipv4Addr| Some(a).filter(|a| !a.is_unspecified());
        let (len, min, max) = check_family(
            &V4_FIELDS,
            self.network,
            self.subnet_len,
            unset(self.subnet_min),
            unset(self.subnet_max),
        )?;
        (self.subnet_len, self.subnet_min, self.subnet_max) = (len, min, max);
        Ok(())
    }

    fn check_v6(&mut self) -> Result<()> {
        let (len, min, max) = check_family(
            &V6_FIELDS,
            self.ipv6_network,
            self.ipv6_subnet_len,
            self.ipv6_subnet_min,
            self.ipv6_subnet_max,
        )?;
        self.ipv6_subnet_len = len;
        self.ipv6_subnet_min = Some(min);
        self.ipv6_subnet_max = Some(max);
        Ok(())
    }

    /// Whether `subnet` is one this configuration would hand out (checked config): the base
    /// lies in `[SubnetMin, SubnetMax]` and the prefix is `SubnetLen`. Upstream's
    /// `isSubnetConfigCompat` for IPv4.
    pub fn v4_compatible(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len
            && subnet.ip() >= self.subnet_min
            && subnet.ip() <= self.subnet_max
    }

    /// IPv6 counterpart of [`Self::v4_compatible`]; with IPv6 disabled only `None` fits.
    pub fn v6_compatible(&self, subnet: Option<Ipv6Network>) -> bool {
        match (self.enable_ipv6, subnet) {
            (false, s) => s.is_none(),
            (true, None) => false,
            (true, Some(s)) => {
                s.prefix() == self.ipv6_subnet_len
                    && self.ipv6_subnet_min.is_some_and(|m| s.ip() >= m)
                    && self.ipv6_subnet_max.is_some_and(|m| s.ip() <= m)
            }
        }
    }
}

/// The field names of one family and the one rule that is not derived from the width.
struct FamilyFields {
    network: &'static str,
    subnet_len: &'static str,
    min: &'static str,
    max: &'static str,
    /// The subnet length used for networks of at most `default_len - 2` bits.
    default_len: u8,
}

const V4_FIELDS: FamilyFields = FamilyFields {
    network: "Network",
    subnet_len: "SubnetLen",
    min: "SubnetMin",
    max: "SubnetMax",
    default_len: 24,
};

const V6_FIELDS: FamilyFields = FamilyFields {
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    min: "IPv6SubnetMin",
    max: "IPv6SubnetMax",
    default_len: 64,
};

/// Upstream's `CheckNetworkConfig` for one family: defaults the subnet length and the
/// allocatable range and validates them. Returns `(subnet_len, min, max)`.
fn check_family<N: Cidr>(
    f: &FamilyFields,
    network: Option<N>,
    subnet_len: u8,
    min: Option<N::Addr>,
    max: Option<N::Addr>,
) -> Result<(u8, N::Addr, N::Addr)> {
    let network = match network {
        Some(n) if !(N::addr_bits(n.addr()) == 0 && n.prefix_len() == 0) => n,
        other => {
            return Err(Error::Invalid {
                field: f.network,
                value: other.map_or_else(|| "(missing)".into(), |n| n.to_string()),
                reason: format!(
                    "please define a correct {} parameter in the flannel config",
                    f.network
                ),
            });
        }
    };
    let prefix = network.prefix_len();
    let len = if subnet_len > 0 {
        if subnet_len > N::BITS - 2 {
            return Err(invalid_len(
                f.subnet_len,
                subnet_len,
                &format!("{} must be less than /{}", f.subnet_len, N::BITS - 1),
            ));
        }
        if subnet_len < prefix + 2 {
            return Err(invalid_len(
                f.subnet_len,
                subnet_len,
                &format!(
                    "{} {network} must be able to accommodate at least four subnets",
                    f.network
                ),
            ));
        }
        subnet_len
    } else if prefix > N::BITS - 4 {
        return Err(Error::Invalid {
            field: f.network,
            value: network.to_string(),
            reason: format!(
                "{} is too small. Minimum useful network prefix is /{}",
                f.network,
                N::BITS - 4
            ),
        });
    } else if prefix <= f.default_len - 2 {
        f.default_len
    } else {
        prefix + 2
    };
    let size = cidr::block_size::<N>(len);
    let base = N::addr_bits(network.addr());
    let inside = |field: &'static str, addr: N::Addr| {
        let host = N::build(addr, N::BITS).expect("a full-length prefix is valid");
        if cidr::contains(network, host) {
            Ok(addr)
        } else {
            Err(outside(field, addr, network))
        }
    };
    let min = match min {
        None => N::addr_from_bits(base.wrapping_add(size)),
        Some(a) => inside(f.min, a)?,
    };
    let max = match max {
        None => N::addr_from_bits(
            base.wrapping_add(cidr::block_size::<N>(prefix))
                .wrapping_sub(size),
        ),
        Some(a) => inside(f.max, a)?,
    };
    for (field, addr) in [(f.min, min), (f.max, max)] {
        if !cidr::addr_aligned::<N>(addr, len) {
            return Err(Error::Invalid {
                field,
                value: addr.to_string(),
                reason: format!("{field} is not on a {} (/{len}) boundary", f.subnet_len),
            });
        }
    }
    Ok((len, min, max))
}

fn invalid_len(field: &'static str, len: u8, reason: &str) -> Error {
    Error::Invalid {
        field,
        value: len.to_string(),
        reason: reason.to_owned(),
    }
}

fn outside(field: &'static str, addr: impl ToString, network: impl std::fmt::Display) -> Error {
    Error::Invalid {
        field,
        value: addr.to_string(),
        reason: format!("{field} is not within Network {network}"),
    }
}

/// Resolves the `Backend` section. Upstream lower-cases `Type` before looking it up.
fn parse_backend(backend: Option<&Value>) -> Result<BackendConfig> {
    let Some(backend) = backend else {
        return Err(Error::NoBackend);
    };
    let Value::Object(map) = backend else {
        return Err(Error::Field {
            field: "Backend".into(),
            value: truncated(backend.to_string().as_bytes()),
            expected: "an object",
        });
    };
    let obj = GoObject::new(map, "Backend.");
    let ty = obj.str("Type")?.unwrap_or_default();
    match ty.to_ascii_lowercase().as_str() {
        "vxlan" => parse_vxlan(&obj).map(BackendConfig::Vxlan),
        "host-gw" => Ok(BackendConfig::HostGw),
        _ => Err(Error::UnsupportedBackend {
            value: truncated(ty.as_bytes()),
        }),
    }
}

fn parse_vxlan(obj: &GoObject<'_>) -> Result<VxlanConfig> {
    let mut cfg = VxlanConfig::default();
    if let Some(vni) = obj.int("VNI")? {
        // The kernel's VNI is 24 bits; upstream would fail later creating the device.
        cfg.vni = u32::try_from(vni)
            .ok()
            .filter(|v| *v < 1 << 24)
            .ok_or_else(|| obj.field_err("VNI", &Value::from(vni), "a VNI in 0..16777215"))?;
    }
    // 0 means "not sent to the kernel", i.e. the kernel default 8472.
    if let Some(port) = obj.int("Port")?.filter(|p| *p != 0) {
        cfg.port = u16::try_from(port)
            .ok()
            .ok_or_else(|| obj.field_err("Port", &Value::from(port), "a UDP port in 0..65535"))?;
    }
    // 0 means "the external interface's MTU".
    if let Some(mtu) = obj.int("MTU")?.filter(|m| *m != 0) {
        cfg.mtu = Some(
            u32::try_from(mtu)
                .ok()
                .filter(|m| *m >= 68 + 50 && *m <= 65535)
                .ok_or_else(|| obj.field_err("MTU", &Value::from(mtu), "an MTU in 118..65535"))?,
        );
    }
    cfg.gbp = obj.bool("GBP", false)?;
    cfg.learning = obj.bool("Learning", false)?;
    cfg.direct_routing = obj.bool("DirectRouting", false)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const VX: &str = r#""Backend":{"Type":"vxlan"}"#;

    #[test]
    fn huge_bad_values_are_quoted_truncated() {
        // Found by the parser property test: these quoted a megabyte whole.
        let big = "x".repeat(1 << 20);
        for json in [
            format!(r#"["{big}"]"#),
            format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{big}"}}}}"#),
            format!(r#"{{"Network":"10.244.0.0/16","Backend":"{big}"}}"#),
        ] {
            let e = NetworkConfig::parse(&json).unwrap_err().to_string();
            assert!(e.len() < 600, "{} bytes", e.len());
        }
    }

    #[test]
    fn upstream_example_lower_camel_case() {
        let cfg = NetworkConfig::parse_and_check(&format!(r#"{{"network":"10.3.0.0/16",{VX}}}"#))
            .unwrap();
        assert_eq!(cfg.network, Some("10.3.0.0/16".parse().unwrap()));
        assert_eq!(cfg.subnet_len, 24);
        assert_eq!(cfg.subnet_min, v4("10.3.1.0"));
        assert_eq!(cfg.subnet_max, v4("10.3.255.0"));
        assert!(cfg.enable_ipv4);
        assert!(!cfg.enable_ipv6);
        assert_eq!(cfg.backend, BackendConfig::Vxlan(VxlanConfig::default()));
    }

    #[test]
    fn upstream_ipv6_example() {
        let cfg = NetworkConfig::parse_and_check(&format!(
            r#"{{"EnableIPv4":false,"enableIPv6":true,"ipv6Network":"fc00::/48",{VX}}}"#
        ))
        .unwrap();
        assert_eq!(cfg.ipv6_subnet_len, 64);
        assert_eq!(cfg.ipv6_subnet_min, Some("fc00:0:0:1::".parse().unwrap()));
        assert_eq!(
            cfg.ipv6_subnet_max,
            Some("fc00:0:0:ffff::".parse().unwrap())
        );
    }

    #[test]
    fn host_bits_masked_and_derived_lengths() {
        let cfg = NetworkConfig::parse_and_check(&format!(r#"{{"Network":"10.244.1.0/16",{VX}}}"#))
            .unwrap();
        assert_eq!(cfg.network, Some("10.244.0.0/16".parse().unwrap()));
        for (prefix, len) in [(8, 24), (22, 24), (23, 25), (26, 28), (28, 30)] {
            let cfg = NetworkConfig::parse_and_check(&format!(
                r#"{{"Network":"10.0.0.0/{prefix}",{VX}}}"#
            ))
            .unwrap();
            assert_eq!(cfg.subnet_len, len, "prefix {prefix}");
        }
        let err = NetworkConfig::parse_and_check(&format!(r#"{{"Network":"10.0.0.0/29",{VX}}}"#))
            .unwrap_err();
        assert!(err.to_string().contains("/28"), "{err}");
    }

    #[test]
    fn nftables_is_the_default_and_iptables_stays_selectable() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .unwrap();
        assert!(cfg.enable_nftables);
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableNFTables":false,"Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert!(!cfg.enable_nftables);
    }

    #[test]
    fn explicit_range_and_case_insensitive_keys() {
        let cfg = NetworkConfig::parse_and_check(
            r#"{"NETWORK":"10.5.0.0/16","subnetlen":26,"subnetMin":"10.5.1.0","SUBNETMAX":"10.5.2.192",
                "enablenftables":true,"backend":{"type":"VXLAN","vni":42,"port":4789,"gbp":true,
                "directrouting":true,"Learning":true,"mtu":9000},"Unknown":1}"#,
        )
        .unwrap();
        assert_eq!(cfg.subnet_len, 26);
        assert_eq!(cfg.subnet_min, v4("10.5.1.0"));
        assert_eq!(cfg.subnet_max, v4("10.5.2.192"));
        assert!(cfg.enable_nftables);
        assert_eq!(
            cfg.backend,
            BackendConfig::Vxlan(VxlanConfig {
                vni: 42,
                port: 4789,
                gbp: true,
                learning: true,
                direct_routing: true,
                mtu: Some(9000),
            })
        );
    }

    #[test]
    fn host_gw_and_null_fields() {
        let cfg = NetworkConfig::parse_and_check(
            r#"{"Network":"10.1.0.0/16","SubnetLen":null,"Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.backend, BackendConfig::HostGw);
        assert_eq!(cfg.subnet_len, 24);
    }

    #[test]
    fn zero_min_is_unset() {
        let cfg = NetworkConfig::parse_and_check(&format!(
            r#"{{"Network":"10.1.0.0/16","SubnetMin":"0.0.0.0",{VX}}}"#
        ))
        .unwrap();
        assert_eq!(cfg.subnet_min, v4("10.1.1.0"));
    }

    fn err(json: &str) -> String {
        NetworkConfig::parse_and_check(json)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_field_and_value() {
        let cases: &[(&str, &[&str])] = &[
            (r#"{"Network":"10.1.0.0/16"}"#, &["Backend", "udp"]),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{}}"#,
                &["Backend.Type", "\"\""],
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#,
                &["Backend.Type", "udp"],
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"foo"}}"#,
                &["Backend.Type", "foo"],
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":"vxlan"}"#,
                &["Backend", "\"vxlan\""],
            ),
            (&format!(r#"{{{VX}}}"#), &["Network", "missing"]),
            (
                &format!(r#"{{"Network":"0.0.0.0/0",{VX}}}"#),
                &["Network", "0.0.0.0/0"],
            ),
            (
                &format!(r#"{{"Network":"fc00::/48",{VX}}}"#),
                &["Network", "fc00::/48"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0",{VX}}}"#),
                &["Network", "10.1.0.0"],
            ),
            (&format!(r#"{{"Network":7,{VX}}}"#), &["Network", "7"]),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetLen":31,{VX}}}"#),
                &["SubnetLen", "31"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetLen":17,{VX}}}"#),
                &["SubnetLen", "17"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetLen":-1,{VX}}}"#),
                &["SubnetLen", "-1"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetLen":24.5,{VX}}}"#),
                &["SubnetLen", "24.5"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0",{VX}}}"#),
                &["SubnetMin", "10.2.0.0"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetMax":"10.2.0.0",{VX}}}"#),
                &["SubnetMax", "10.2.0.0"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetMin":"10.1.0.7",{VX}}}"#),
                &["SubnetMin", "10.1.0.7", "boundary"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","SubnetMin":"bogus",{VX}}}"#),
                &["SubnetMin", "bogus"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","EnableIPv4":"yes",{VX}}}"#),
                &["EnableIPv4", "yes"],
            ),
            (
                &format!(r#"{{"EnableIPv4":false,{VX}}}"#),
                &["EnableIPv4", "EnableIPv6"],
            ),
            (
                &format!(r#"{{"Network":"10.1.0.0/16","EnableIPv6":true,{VX}}}"#),
                &["IPv6Network", "missing"],
            ),
            (
                &format!(
                    r#"{{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127,{VX}}}"#
                ),
                &["IPv6SubnetLen", "127"],
            ),
            (
                &format!(
                    r#"{{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/126",{VX}}}"#
                ),
                &["IPv6Network", "fc00::/126"],
            ),
            (
                &format!(
                    r#"{{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fd00::",{VX}}}"#
                ),
                &["IPv6SubnetMin", "fd00::"],
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
                &["Backend.VNI", "16777216"],
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","Port":70000}}"#,
                &["Backend.Port", "70000"],
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","MTU":-5}}"#,
                &["Backend.MTU", "-5"],
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":1}}"#,
                &["Backend.GBP", "1"],
            ),
            ("[1]", &["object", "[1]"]),
            ("{", &["JSON"]),
        ];
        for (json, needles) in cases {
            let msg = err(json);
            for n in *needles {
                assert!(
                    msg.contains(n),
                    "error for {json} was {msg:?}, expected it to mention {n:?}"
                );
            }
        }
    }

    #[test]
    fn parse_only_does_not_default() {
        let cfg = NetworkConfig::parse(&format!(r#"{{"Network":"10.1.0.0/16",{VX}}}"#)).unwrap();
        assert_eq!(cfg.subnet_len, 0);
        assert_eq!(cfg.subnet_min, Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn compatibility() {
        let cfg = NetworkConfig::parse_and_check(&format!(
            r#"{{"Network":"10.1.0.0/16","SubnetMax":"10.1.9.0",{VX}}}"#
        ))
        .unwrap();
        assert!(cfg.v4_compatible("10.1.1.0/24".parse().unwrap()));
        assert!(cfg.v4_compatible("10.1.9.0/24".parse().unwrap()));
        assert!(!cfg.v4_compatible("10.1.0.0/24".parse().unwrap()));
        assert!(!cfg.v4_compatible("10.1.10.0/24".parse().unwrap()));
        assert!(!cfg.v4_compatible("10.1.2.0/25".parse().unwrap()));
        assert!(cfg.v6_compatible(None));
        assert!(!cfg.v6_compatible(Some("fc00::/64".parse().unwrap())));
    }
}

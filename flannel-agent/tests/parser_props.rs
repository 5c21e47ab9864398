//! Property tests of every parser of outside input: net-conf, lease keys and values with
//! their backend data, node annotations, `subnet.env`, MAC addresses and the CNI netconf.
//!
//! For each: arbitrary bytes or JSON never panic and never produce an error message that
//! quotes a huge input whole; what we write parses back to what we wrote (whatever the
//! key case, as Go's `encoding/json` reads it); and upstream's own examples (the golden
//! cases of flannel-spec.md) parse to what upstream makes of them. Case counts are fixed
//! (see [`config`]) so the file runs in seconds in CI.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use flannel_agent::{
    cni::config::{NetConf, parse_subnet_env, render_delegate},
    netconf::{BackendConfig, NetworkConfig},
    wire::{
        annotations::{
            AnnotationNames, Families, lease_annotations, normalise_prefix, parse_lease_attrs,
        },
        lease::{
            BackendAttrs, LeaseAttrs, VxlanBackendData, make_subnet_key, parse_record,
            parse_subnet_key,
        },
        mac::MacAddr,
        subnet_env::{Dialect, SubnetEnv},
    },
};
use ipnetwork::{Ipv4Network, Ipv6Network};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Cases per property; with ~30 properties the file stays well under 60 s in a debug build.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// An error message must name the problem, not echo a megabyte of input: every parser
/// quotes at most a few hundred bytes of what it was given.
const MAX_ERROR_LEN: usize = 1024;

fn short_error(e: impl std::fmt::Display) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        text.len() <= MAX_ERROR_LEN,
        "error of {} bytes: {}…",
        text.len(),
        text.chars().take(300).collect::<String>()
    );
    Ok(())
}

/// `name` with the ASCII case of each letter flipped where `mask` has a bit set: Go's
/// `encoding/json` matches field names case-insensitively, so upstream reads all of these.
fn recase(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                if c.is_ascii_uppercase() {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                }
            } else {
                c
            }
        })
        .collect()
}

/// Field names the parsers look for, so random objects hit real fields, not only unknown ones.
const FIELDS: &[&str] = &[
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "EnableNFTables",
    "Backend",
    "Type",
    "VNI",
    "Port",
    "GBP",
    "Learning",
    "DirectRouting",
    "MTU",
    "PublicIP",
    "PublicIPv6",
    "BackendType",
    "BackendData",
    "BackendV6Data",
    "VtepMAC",
    "cniVersion",
    "name",
    "type",
    "subnetFile",
    "dataDir",
    "delegate",
    "ipam",
    "runtimeConfig",
    "routes",
    "ranges",
];

/// Strings that are almost what a field wants: CIDRs, addresses, MACs, numbers, backend
/// names, off by a little.
fn near_miss_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("10.244.0.0/16".to_owned()),
        Just("vxlan".to_owned()),
        Just("host-gw".to_owned()),
        Just("VXLAN".to_owned()),
        Just("fd00:10:244::/56".to_owned()),
        Just("c6:d2:32:6f:8f:44".to_owned()),
        Just("null".to_owned()),
        (any::<[u8; 4]>(), 0u8..40).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a))),
        any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_string()),
        (any::<[u8; 16]>(), 0u8..140).prop_map(|(a, p)| format!("{}/{p}", Ipv6Addr::from(a))),
        any::<[u8; 6]>().prop_map(|m| MacAddr(m).to_string()),
        "[0-9a-fA-F:./+-]{0,24}",
        ".{0,16}",
    ]
}

/// Arbitrary JSON of bounded size, biased towards the shapes the parsers read.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-70_000i64..70_000).prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        near_miss_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (prop::sample::select(FIELDS), any::<u64>()).prop_map(|(f, m)| recase(f, m)),
        1 => "[A-Za-z0-9_]{0,10}",
    ]
}

/// A JSON object with known fields (any case) holding arbitrary values.
fn json_object() -> impl Strategy<Value = Value> {
    prop::collection::vec((field_name(), json_value()), 0..10)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// Input bytes: raw garbage, JSON-looking garbage, or a real object cut short.
fn input_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        "[{}\\[\\]\",:0-9a-zA-Z .\\\\/-]{0,128}".prop_map(String::into_bytes),
        (json_object(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let bytes = v.to_string().into_bytes();
            let at = cut.index(bytes.len() + 1);
            bytes[..at].to_vec()
        }),
    ]
}

fn v4net(max_prefix: u8) -> impl Strategy<Value = Ipv4Network> {
    (any::<[u8; 4]>(), 0..=max_prefix).prop_map(|(a, p)| Ipv4Network::new(a.into(), p).unwrap())
}

fn v6net(max_prefix: u8) -> impl Strategy<Value = Ipv6Network> {
    (any::<[u8; 16]>(), 0..=max_prefix).prop_map(|(a, p)| Ipv6Network::new(a.into(), p).unwrap())
}

fn masked4(n: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(n.network(), n.prefix()).unwrap()
}

fn masked6(n: Ipv6Network) -> Ipv6Network {
    Ipv6Network::new(n.network(), n.prefix()).unwrap()
}

fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

fn vxlan_data() -> impl Strategy<Value = VxlanBackendData> {
    (0u32..1 << 24, mac()).prop_map(|(vni, vtep_mac)| VxlanBackendData { vni, vtep_mac })
}

/// Compact JSON without floats (their text form is not guaranteed to survive a round trip
/// through any JSON library, Go's included) and not `null` (a `null` BackendData is absent).
fn backend_json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[A-Za-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(|v| v.to_string())
}

/// A backend type other than the two we parse into their own variants.
fn other_type() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,9}".prop_filter("not a parsed backend", |t| t != "vxlan" && t != "host-gw")
}

/// Lease attributes for a node of the given families, as our agent or upstream's writes them.
fn lease_attrs(v4: bool, v6: bool) -> impl Strategy<Value = LeaseAttrs> {
    let public_ip =
        any::<[u8; 4]>().prop_map(move |a| if v4 { a.into() } else { Ipv4Addr::UNSPECIFIED });
    let public_ipv6 = any::<[u8; 16]>().prop_map(move |a| v6.then(|| a.into()));
    let backend = prop_oneof![
        (vxlan_data(), prop::option::of(vxlan_data())).prop_map(move |(d4, d6)| {
            BackendAttrs::Vxlan {
                v4: v4.then_some(d4),
                v6: if v6 { d6 } else { None },
            }
        }),
        Just(BackendAttrs::HostGw),
        (
            other_type(),
            prop::option::of(backend_json()),
            prop::option::of(backend_json())
        )
            .prop_map(move |(backend_type, data, v6_data)| BackendAttrs::Other {
                backend_type,
                data: if v4 { data } else { None },
                v6_data: if v6 { v6_data } else { None },
            }),
    ];
    (public_ip, public_ipv6, backend).prop_map(|(public_ip, public_ipv6, backend)| LeaseAttrs {
        public_ip,
        public_ipv6,
        backend,
    })
}

/// Re-cases every object key of `v`, recursively.
fn recase_keys(v: &Value, mask: u64) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    (
                        recase(k, mask.rotate_left(i as u32 * 7)),
                        recase_keys(v, mask),
                    )
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| recase_keys(v, mask)).collect()),
        other => other.clone(),
    }
}

/// A lease value with upstream's field names re-cased: the top level, and the vxlan
/// backend data (whose fields we read). Other backends' data is opaque and kept as is.
fn recase_lease(text: &str, mask: u64, vxlan: bool) -> String {
    let Value::Object(m) = serde_json::from_str(text).unwrap() else {
        unreachable!("lease JSON is an object")
    };
    let out: Map<String, Value> = m
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let data = k.starts_with("Backend") && k != "BackendType";
            let v = if data && vxlan {
                recase_keys(&v, mask)
            } else {
                v
            };
            (recase(&k, mask.rotate_left(i as u32 * 7)), v)
        })
        .collect();
    Value::Object(out).to_string()
}

// ---------------------------------------------------------------------------------------
// net-conf.json

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn netconf_never_panics_on_bytes(bytes in input_bytes()) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = NetworkConfig::parse(&text) { short_error(e)?; }
        if let Err(e) = NetworkConfig::parse_and_check(&text) { short_error(e)?; }
    }

    #[test]
    fn netconf_never_panics_on_objects(v in json_object()) {
        let text = v.to_string();
        if let Err(e) = NetworkConfig::parse(&text) { short_error(e)?; }
        match NetworkConfig::parse_and_check(&text) {
            Err(e) => short_error(e)?,
            // What the check accepts obeys upstream's CheckNetworkConfig rules.
            Ok(cfg) => {
                if cfg.enable_ipv4 {
                    let net = cfg.network.expect("checked IPv4 config has a Network");
                    prop_assert!(cfg.subnet_len <= 30 && cfg.subnet_len >= net.prefix() + 2);
                    for a in [cfg.subnet_min, cfg.subnet_max] {
                        prop_assert!(net.contains(a), "{} outside {}", a, net);
                        prop_assert_eq!(masked4(Ipv4Network::new(a, cfg.subnet_len).unwrap()).ip(), a);
                    }
                }
                if cfg.enable_ipv6 {
                    let net = cfg.ipv6_network.expect("checked IPv6 config has an IPv6Network");
                    prop_assert!(cfg.ipv6_subnet_len <= 126 && cfg.ipv6_subnet_len >= net.prefix() + 2);
                    for a in [cfg.ipv6_subnet_min.unwrap(), cfg.ipv6_subnet_max.unwrap()] {
                        prop_assert!(net.contains(a), "{} outside {}", a, net);
                    }
                }
            }
        }
    }
}

/// A valid vxlan or host-gw net-conf, written with upstream's field names in any case.
#[derive(Clone, Debug)]
struct NetConfCase {
    network: Ipv4Network,
    subnet_len: Option<u8>,
    vni: Option<u32>,
    port: Option<u16>,
    gbp: bool,
    direct_routing: bool,
    mtu: Option<u32>,
    host_gw: bool,
    nftables: Option<bool>,
    mask: u64,
}

fn netconf_case() -> impl Strategy<Value = NetConfCase> {
    (
        (any::<[u8; 4]>(), 8u8..=28)
            .prop_map(|(a, p)| masked4(Ipv4Network::new(a.into(), p).unwrap())),
        prop::option::of(0u8..=2),
        prop::option::of(0u32..1 << 24),
        prop::option::of(any::<u16>()),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::option::of(118u32..=65535),
        prop::option::of(any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |(network, extra, vni, port, (gbp, direct_routing, host_gw), mtu, nftables, mask)| {
                // An explicit SubnetLen, when given, must leave room for four subnets and stay
                // under /31: network prefix + 2 + extra, capped at 30.
                let subnet_len = extra.map(|e| (network.prefix() + 2 + e).min(30));
                NetConfCase {
                    network,
                    subnet_len,
                    vni,
                    port,
                    gbp,
                    direct_routing,
                    mtu,
                    host_gw,
                    nftables,
                    mask,
                }
            },
        )
}

impl NetConfCase {
    fn json(&self) -> String {
        let mut backend = Map::new();
        backend.insert(
            "Type".into(),
            json!(if self.host_gw { "host-gw" } else { "vxlan" }),
        );
        if !self.host_gw {
            if let Some(v) = self.vni {
                backend.insert("VNI".into(), json!(v));
            }
            if let Some(p) = self.port {
                backend.insert("Port".into(), json!(p));
            }
            if let Some(m) = self.mtu {
                backend.insert("MTU".into(), json!(m));
            }
            backend.insert("GBP".into(), json!(self.gbp));
            backend.insert("DirectRouting".into(), json!(self.direct_routing));
        }
        let mut root = Map::new();
        root.insert("Network".into(), json!(self.network.to_string()));
        if let Some(l) = self.subnet_len {
            root.insert("SubnetLen".into(), json!(l));
        }
        if let Some(n) = self.nftables {
            root.insert("EnableNFTables".into(), json!(n));
        }
        root.insert("Backend".into(), Value::Object(backend));
        recase_keys(&Value::Object(root), self.mask).to_string()
    }
}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn valid_netconf_reads_back_in_any_key_case(c in netconf_case()) {
        let cfg = NetworkConfig::parse_and_check(&c.json())
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", c.json())))?;
        prop_assert_eq!(cfg.network, Some(c.network));
        let len = c.subnet_len.unwrap_or(if c.network.prefix() <= 22 { 24 } else { c.network.prefix() + 2 });
        prop_assert_eq!(cfg.subnet_len, len);
        // Upstream's defaults: the second subnet and the last one.
        let size = 1u32 << (32 - len);
        prop_assert_eq!(u32::from(cfg.subnet_min), u32::from(c.network.ip()) + size);
        prop_assert_eq!(
            u64::from(u32::from(cfg.subnet_max)),
            u64::from(u32::from(c.network.ip())) + (1u64 << (32 - c.network.prefix())) - u64::from(size)
        );
        prop_assert_eq!(cfg.enable_nftables, c.nftables.unwrap_or(true));
        match cfg.backend {
            BackendConfig::HostGw => prop_assert!(c.host_gw),
            BackendConfig::Vxlan(vx) => {
                prop_assert!(!c.host_gw);
                prop_assert_eq!(vx.vni, c.vni.unwrap_or(1));
                prop_assert_eq!(vx.port, c.port.filter(|p| *p != 0).unwrap_or(8472));
                prop_assert_eq!(vx.mtu, c.mtu);
                prop_assert_eq!((vx.gbp, vx.direct_routing), (c.gbp, c.direct_routing));
            }
        }
    }
}

#[test]
fn netconf_golden_cases_from_upstream() {
    // pkg/subnet/config_test.go: {"network":"10.3.0.0/16"} → /24, 10.3.1.0 … 10.3.255.0.
    let cfg =
        NetworkConfig::parse_and_check(r#"{"network":"10.3.0.0/16","backend":{"type":"vxlan"}}"#)
            .unwrap();
    assert_eq!(
        (cfg.subnet_len, cfg.subnet_min, cfg.subnet_max),
        (24, Ipv4Addr::new(10, 3, 1, 0), Ipv4Addr::new(10, 3, 255, 0))
    );
    // The stock kube-flannel.yml net-conf.json, and its "VXLAN" spelled in capitals.
    for ty in ["vxlan", "VXLAN"] {
        let cfg = NetworkConfig::parse_and_check(&format!(
            r#"{{"Network": "10.244.0.0/16", "EnableNFTables": false, "Backend": {{"Type": "{ty}"}}}}"#
        ))
        .unwrap();
        assert_eq!(cfg.backend, BackendConfig::Vxlan(Default::default()));
        assert!(!cfg.enable_nftables);
    }
    // Host bits are masked as Go's net.ParseCIDR does; /23 → SubnetLen 25.
    let cfg = NetworkConfig::parse_and_check(
        r#"{"Network":"10.244.1.0/23","Backend":{"Type":"host-gw"}}"#,
    )
    .unwrap();
    assert_eq!(
        (cfg.network.unwrap().to_string().as_str(), cfg.subnet_len),
        ("10.244.0.0/23", 25)
    );
    // (The IPv6 example of §1.2, fc00::/48, is netconf.rs's own unit test.)
    // What upstream refuses, we refuse.
    for bad in [
        r#"{"Network":"10.244.0.0/29","Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"10.244.0.0/16","SubnetLen":17,"Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0","Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.7","Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"10.244.0.0","Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"fd00::/48","Backend":{"Type":"vxlan"}}"#,
        r#"{"Network":"10.244.0.0/16","Backend":{}}"#,
    ] {
        assert!(NetworkConfig::parse_and_check(bad).is_err(), "{bad}");
    }
}

// Huge inputs are slow to generate and parse: fewer cases, each up to 50 kB.
proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn netconf_huge_values_give_short_errors(
        field in prop::sample::select(FIELDS), filler in "[a-z0-9]{1,4}", n in 2_000usize..20_000,
    ) {
        let big = filler.repeat(n / filler.len());
        for v in [json!({ field: big }), json!({ field: [big.clone()] }), json!([big.clone()]),
                  json!({"Network": "10.244.0.0/16", "Backend": { "Type": big.clone() }}),
                  json!({"Network": "10.244.0.0/16", "Backend": { field: [big.clone()] }})] {
            if let Err(e) = NetworkConfig::parse_and_check(&v.to_string()) { short_error(e)?; }
        }
    }

    #[test]
    fn huge_lease_values_give_short_errors(field in prop::sample::select(FIELDS), n in 2_000usize..50_000) {
        let big = "x".repeat(n);
        for v in [json!({ field: big }), json!({"PublicIP": "198.18.0.1", "BackendType": "vxlan", "BackendData": { "VtepMAC": big }}),
                  json!({"PublicIP": "198.18.0.1", "BackendType": "vxlan", "BackendData": [big.clone()]}),
                  json!({"PublicIP": "198.18.0.1", "BackendType": "udp", "BackendData": "x"}), json!([big.clone()])] {
            if let Err(e) = LeaseAttrs::from_json(v.to_string().as_bytes()) { short_error(e)?; }
        }
        if let Err(e) = parse_subnet_key(&format!("/coreos.com/network/subnets/{big}")) { short_error(e)?; }
    }
}

// ---------------------------------------------------------------------------------------
// CIDR text: what Go's net.ParseCIDR accepts, and only that.

/// Go's `net.ParseCIDR` (Go ≥ 1.17): an address (no zone) that `netip.ParseAddr` takes,
/// `/`, then decimal digits only (leading zeros allowed, no sign, no spaces) up to the
/// address width. Rust's std address parsers agree with `netip.ParseAddr` for these forms.
fn go_parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, mask) = s.split_once('/')?;
    let ip: std::net::IpAddr = addr.parse().ok()?;
    if mask.is_empty() || !mask.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let n: u32 = mask.trim_start_matches('0').parse().unwrap_or(
        if mask.trim_start_matches('0').is_empty() {
            0
        } else {
            u32::MAX
        },
    );
    (n <= bits).then_some((ip, n as u8))
}

fn cidr_text() -> impl Strategy<Value = String> {
    let addr = prop_oneof![
        any::<[u8; 4]>().prop_map(|a| Ipv4Addr::from(a).to_string()),
        any::<[u8; 16]>().prop_map(|a| Ipv6Addr::from(a).to_string()),
        Just("10.244.0.0".to_owned()),
        Just("010.244.0.0".to_owned()),
        Just("10.244.0".to_owned()),
        Just("::ffff:10.244.0.0".to_owned()),
        Just("fe80::1%eth0".to_owned()),
        "[0-9.:a-f]{0,16}",
    ];
    let prefix = prop_oneof![
        (0u32..140).prop_map(|p| p.to_string()),
        Just("024".to_owned()),
        Just("+24".to_owned()),
        Just("-1".to_owned()),
        Just("".to_owned()),
        Just(" 24".to_owned()),
        Just("24 ".to_owned()),
        Just("255.255.0.0".to_owned()),
        Just("0000000000000000000016".to_owned()),
        "[0-9+ .-]{0,4}",
    ];
    prop_oneof![
        (addr.clone(), prefix).prop_map(|(a, p)| format!("{a}/{p}")),
        addr,
    ]
}

proptest! {
    #![proptest_config(config(2_000))]

    /// net-conf's Network / IPv6Network and subnet.env's FLANNEL_NETWORK / FLANNEL_SUBNET
    /// take exactly what Go's `net.ParseCIDR` takes, masked as it masks.
    #[test]
    fn cidr_fields_accept_what_go_accepts(text in cidr_text()) {
        let go = go_parse_cidr(&text);
        let conf = NetworkConfig::parse(&json!({"Network": text, "IPv6Network": text, "Backend": {"Type": "vxlan"}}).to_string());
        let go4 = go.filter(|(ip, _)| ip.is_ipv4());
        let go6 = go.filter(|(ip, _)| ip.is_ipv6());
        match (go4, NetworkConfig::parse(&json!({"Network": text, "Backend": {"Type": "vxlan"}}).to_string())) {
            (Some((ip, p)), Ok(cfg)) => {
                let want = masked4(Ipv4Network::new(ip.to_string().parse().unwrap(), p).unwrap());
                prop_assert_eq!(cfg.network, Some(want));
            }
            (None, Err(_)) => {}
            (go, ours) => prop_assert!(false, "Network {:?}: Go {:?}, ours {:?}", text, go, ours),
        }
        match (go6, NetworkConfig::parse(&json!({"IPv6Network": text, "Backend": {"Type": "vxlan"}}).to_string())) {
            (Some((ip, p)), Ok(cfg)) => {
                let want = masked6(Ipv6Network::new(ip.to_string().parse().unwrap(), p).unwrap());
                prop_assert_eq!(cfg.ipv6_network, Some(want));
            }
            (None, Err(_)) => {}
            (go, ours) => prop_assert!(false, "IPv6Network {:?}: Go {:?}, ours {:?}", text, go, ours),
        }
        drop(conf);
        let env = format!("FLANNEL_NETWORK={text}\nFLANNEL_SUBNET={text}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        let parsed = SubnetEnv::parse(&env, Dialect::Strict);
        match (go, parsed) {
            (Some((ip, p)), Ok(e)) if ip.is_ipv4() => {
                let want = masked4(Ipv4Network::new(ip.to_string().parse().unwrap(), p).unwrap());
                prop_assert_eq!(e.subnet, Some(want));
                prop_assert_eq!(e.networks, vec![want]);
            }
            // An IPv6 CIDR in the IPv4 keys is refused, as the plugin refuses it.
            (Some((ip, _)), Err(_)) if ip.is_ipv6() => {}
            (None, Err(_)) => {}
            (go, ours) => prop_assert!(false, "subnet.env {:?}: Go {:?}, ours {:?}", text, go, ours),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Lease keys, values and backend data.

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn lease_parsers_never_panic(key in ".{0,40}", bytes in input_bytes()) {
        if let Err(e) = parse_subnet_key(&key) { short_error(e)?; }
        if let Err(e) = parse_record(&key, &bytes) { short_error(e)?; }
        if let Err(e) = LeaseAttrs::from_json(&bytes) { short_error(e)?; }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = VxlanBackendData::parse(&text) { short_error(e)?; }
        for ty in ["vxlan", "host-gw", "udp", ""] {
            if let Err(e) = BackendAttrs::parse(ty, Some(&text), Some(&text)) { short_error(e)?; }
        }
    }

    #[test]
    fn lease_values_of_random_objects_never_panic(v in json_object()) {
        let bytes = v.to_string().into_bytes();
        if let Err(e) = LeaseAttrs::from_json(&bytes) { short_error(e)?; }
    }

    #[test]
    fn subnet_keys_round_trip(v4 in v4net(31), v6 in prop::option::of(v6net(127))) {
        // Go prints an IPv4-mapped IPv6 address with dots (as Rust does), which upstream's
        // own key pattern `[a-f0-9:]+` cannot read back: such keys are unreadable upstream
        // too, and no IPv6 pod network is IPv4-mapped.
        prop_assume!(v6.is_none_or(|n| n.ip().to_ipv4_mapped().is_none()));
        let key = make_subnet_key(v4, v6);
        prop_assert_eq!(parse_subnet_key(&key), Ok((v4, v6)));
        // Upstream applies the pattern to the full etcd key.
        prop_assert_eq!(parse_subnet_key(&format!("/coreos.com/network/subnets/{key}")), Ok((v4, v6)));
    }

    #[test]
    fn lease_values_round_trip_in_any_key_case(
        attrs in (any::<bool>(), any::<bool>()).prop_flat_map(|(a, b)| lease_attrs(a || !b, b)),
        mask in any::<u64>(),
    ) {
        let text = attrs.to_json();
        prop_assert_eq!(LeaseAttrs::from_json(text.as_bytes()), Ok(attrs.clone()), "{}", text);
        // Upstream's Go reads field names in any case; so must we.
        let vxlan = matches!(attrs.backend, BackendAttrs::Vxlan { .. });
        let recased = recase_lease(&text, mask, vxlan);
        prop_assert_eq!(LeaseAttrs::from_json(recased.as_bytes()), Ok(attrs), "{}", recased);
    }
}

#[test]
fn lease_golden_cases_from_upstream() {
    // flannel-spec.md §2.3: the canonical IPv4-only vxlan value, byte for byte.
    let golden = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    let attrs = LeaseAttrs::from_json(golden.as_bytes()).unwrap();
    assert_eq!(
        attrs,
        LeaseAttrs::vxlan(
            Ipv4Addr::new(192, 168, 64, 3),
            VxlanBackendData {
                vni: 1,
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            }
        )
    );
    assert_eq!(attrs.to_json(), golden);
    // Keys: IPv4 and dual stack; `-32` does not parse upstream (5-bit prefix).
    assert_eq!(
        make_subnet_key("10.5.34.0/24".parse().unwrap(), None),
        "10.5.34.0-24"
    );
    let dual =
        parse_subnet_key("/coreos.com/network/subnets/10.12.13.0-24&fd00:12:13::-56").unwrap();
    assert_eq!(
        make_subnet_key(dual.0, dual.1),
        "10.12.13.0-24&fd00:12:13::-56"
    );
    assert!(parse_subnet_key("10.5.34.0-32").is_err());
    // The udp backend omits BackendType; host-gw has no data.
    let udp = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#).unwrap();
    assert_eq!(udp.backend_type(), "");
    let hg = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.1","BackendType":"host-gw"}"#).unwrap();
    assert_eq!(hg, LeaseAttrs::host_gw(Ipv4Addr::new(10, 0, 0, 1)));
    // Go's zero value: a vxlan lease without VNI is VNI 0; a null PublicIP is unparseable.
    let no_vni = LeaseAttrs::from_json(
        br#"{"publicip":"10.0.0.1","backendtype":"vxlan","backenddata":{"vtepmac":"0e:2a:00:00:00:01"}}"#,
    )
    .unwrap();
    assert_eq!(no_vni.backend.vxlan_v4().unwrap().vni, 0);
    assert!(LeaseAttrs::from_json(br#"{"PublicIP":null,"BackendType":"vxlan"}"#).is_err());
}

// ---------------------------------------------------------------------------------------
// MAC addresses.

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn macs_round_trip_in_every_spelling(m in mac(), upper in any::<bool>(), dash in any::<bool>()) {
        let text = m.to_string();
        prop_assert_eq!(text.len(), 17);
        prop_assert_eq!(text.parse::<MacAddr>(), Ok(m));
        let mut alt = if upper { text.to_uppercase() } else { text.clone() };
        if dash { alt = alt.replace(':', "-"); }
        prop_assert_eq!(alt.parse::<MacAddr>(), Ok(m));
    }

    #[test]
    fn mac_parser_never_panics(s in prop_oneof![".{0,40}", "[0-9a-fA-F:-]{0,20}"]) {
        if let Ok(m) = s.parse::<MacAddr>() {
            // Only six two-digit hex groups with one kind of separator get through.
            prop_assert_eq!(s.len(), 17);
            prop_assert_eq!(s.to_ascii_lowercase().replace('-', ":"), m.to_string());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Node annotations.

fn prefix() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("flannel.alpha.coreos.com".to_owned()),
        "[a-z0-9_-]{1,8}(\\.[a-z0-9_-]{1,8}){1,3}(/([a-z0-9_-]{1,6})?)?",
    ]
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn annotation_prefixes_never_panic(p in ".{0,40}") {
        match normalise_prefix(&p) {
            Ok(n) => {
                prop_assert!(n.ends_with('/') || n.ends_with('-'));
                prop_assert!(AnnotationNames::new(&p).is_ok());
            }
            Err(e) => short_error(e)?,
        }
    }

    #[test]
    fn annotations_of_random_nodes_never_panic(
        values in prop::collection::vec((prop::sample::select(&["kube-subnet-manager", "backend-type", "backend-data", "backend-v6-data", "public-ip", "public-ipv6"][..]), prop_oneof![near_miss_string(), json_object().prop_map(|v| v.to_string()), input_bytes().prop_map(|b| String::from_utf8_lossy(&b).into_owned())]), 0..8),
        v4 in any::<bool>(), v6 in any::<bool>(),
    ) {
        let names = AnnotationNames::new("flannel.alpha.coreos.com").unwrap();
        let map: BTreeMap<String, String> = values.into_iter()
            .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v))
            .collect();
        let get = |k: &str| map.get(k).map(String::as_str);
        if let Err(e) = parse_lease_attrs(get, &names, Families { ipv4: v4, ipv6: v6 }) { short_error(e)?; }
    }

    #[test]
    fn annotations_round_trip(
        (v4, v6, attrs) in (any::<bool>(), any::<bool>()).prop_flat_map(|(a, b)| {
            let (v4, v6) = (a || !b, b);
            (Just(v4), Just(v6), lease_attrs(v4, v6))
        }),
        p in prefix(),
    ) {
        let names = AnnotationNames::new(&p).map_err(|e| TestCaseError::reject(e.to_string()))?;
        let families = Families { ipv4: v4, ipv6: v6 };
        let written = lease_annotations(&names, families, &attrs, (None, None));
        prop_assert_eq!(written.get(&names.subnet_kube_managed).map(String::as_str), Some("true"));
        let read = parse_lease_attrs(|k| written.get(k).map(String::as_str), &names, families);
        // A vxlan node without IPv4 data publishes no backend-data, which peers refuse.
        let unpublishable = v4 && matches!(attrs.backend, BackendAttrs::Vxlan { v4: None, .. });
        if unpublishable {
            prop_assert!(read.is_err());
        } else {
            prop_assert_eq!(read, Ok(attrs), "{:?}", written);
        }
    }
}

#[test]
fn annotation_golden_cases_from_upstream() {
    // flannel-spec.md §3.2: the names under the default prefix and a custom one.
    let names = AnnotationNames::new("flannel.alpha.coreos.com").unwrap();
    assert_eq!(names.backend_data, "flannel.alpha.coreos.com/backend-data");
    assert_eq!(
        names.backend_public_ip_overwrite,
        "flannel.alpha.coreos.com/public-ip-overwrite"
    );
    assert_eq!(
        AnnotationNames::new("example.com/net")
            .unwrap()
            .backend_type,
        "example.com/net-backend-type"
    );
    assert!(normalise_prefix("a/b/c").is_err());
    // A vxlan node as upstream annotates it.
    let node = BTreeMap::from([
        ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
        ("flannel.alpha.coreos.com/backend-type", "vxlan"),
        (
            "flannel.alpha.coreos.com/backend-data",
            r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#,
        ),
        ("flannel.alpha.coreos.com/public-ip", "192.168.1.5"),
    ]);
    let attrs = parse_lease_attrs(
        |k| node.get(k).copied(),
        &names,
        Families {
            ipv4: true,
            ipv6: false,
        },
    )
    .unwrap();
    assert_eq!(
        attrs,
        LeaseAttrs::vxlan(
            Ipv4Addr::new(192, 168, 1, 5),
            VxlanBackendData {
                vni: 1,
                vtep_mac: "12:c6:65:89:b4:e3".parse().unwrap()
            }
        )
    );
    // And we write exactly those values back (compact, key order VNI, VtepMAC).
    let written = lease_annotations(
        &names,
        Families {
            ipv4: true,
            ipv6: false,
        },
        &attrs,
        (None, None),
    );
    for (k, v) in node {
        assert_eq!(written.get(k).map(String::as_str), Some(v), "{k}");
    }
    // host-gw publishes `null` backend data.
    let hg = lease_annotations(
        &names,
        Families {
            ipv4: true,
            ipv6: false,
        },
        &LeaseAttrs::host_gw(Ipv4Addr::new(10, 0, 0, 1)),
        (None, None),
    );
    assert_eq!(hg[&names.backend_data], "null");
}

// ---------------------------------------------------------------------------------------
// subnet.env.

fn unique<T: PartialEq>(v: Vec<T>) -> Vec<T> {
    let mut out = Vec::new();
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// A `subnet.env` as flanneld writes it. Subnets are at most /31 (/127): the file stores
/// base+1, which for a /32 lies outside the subnet — upstream writes the same unreadable
/// value, and no lease is ever that small (SubnetLen ≤ 30).
fn subnet_env() -> impl Strategy<Value = SubnetEnv> {
    (
        prop::collection::vec(v4net(32).prop_map(masked4), 0..3),
        prop::option::of(v4net(31).prop_map(masked4)),
        prop::collection::vec(v6net(128).prop_map(masked6), 0..3),
        prop::option::of(v6net(127).prop_map(masked6)),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            |(networks, subnet, ipv6_networks, ipv6_subnet, mtu, ip_masq)| SubnetEnv {
                networks: unique(networks),
                subnet,
                ipv6_networks: unique(ipv6_networks),
                ipv6_subnet,
                mtu,
                ip_masq,
            },
        )
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn subnet_env_never_panics(bytes in prop_oneof![
        input_bytes(),
        prop::collection::vec(("(export )?FLANNEL_(NETWORK|SUBNET|IPV6_NETWORK|IPV6_SUBNET|MTU|IPMASQ) ?= ?", near_miss_string()), 0..8)
            .prop_map(|l| l.into_iter().map(|(k, v)| format!("{k}{v}\n")).collect::<String>().into_bytes()),
    ]) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = SubnetEnv::parse(&text, Dialect::Dotenv);
        if let Err(e) = parse_subnet_env(&text, Path::new("/run/flannel/subnet.env")) { short_error(e)?; }
    }

    #[test]
    fn subnet_env_round_trips(env in subnet_env(), quote in prop::sample::select(&["", "\"", "'"][..]), export in any::<bool>()) {
        let text = env.render();
        prop_assert_eq!(SubnetEnv::parse(&text, Dialect::Dotenv), Ok(env.clone()), "{}", text);
        let complete = (!env.networks.is_empty() || !env.ipv6_networks.is_empty())
            && (env.subnet.is_some() || env.ipv6_subnet.is_some())
            && env.mtu.is_some() && env.ip_masq.is_some();
        let strict = SubnetEnv::parse(&text, Dialect::Strict);
        if complete {
            prop_assert_eq!(strict, Ok(env.clone()));
        } else {
            prop_assert!(strict.is_err());
        }
        // godotenv also reads what a human edited: `export`, quotes, spaces.
        let edited: String = text.lines().map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            format!("{}{k} = {quote}{v}{quote}\n", if export { "export " } else { "" })
        }).collect();
        prop_assert_eq!(SubnetEnv::parse(&edited, Dialect::Dotenv), Ok(env));
    }
}

#[test]
fn subnet_env_golden_cases_from_upstream() {
    // flannel-spec.md §4: the IPv4 head and the dual-stack file, exactly as upstream writes.
    let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    let env = SubnetEnv::parse(text, Dialect::Strict).unwrap();
    assert_eq!(env.subnet, Some("10.244.1.0/24".parse().unwrap()));
    assert_eq!(env.render(), text);
    let dual = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
                FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\nFLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n\
                FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
    assert_eq!(
        SubnetEnv::parse(dual, Dialect::Strict).unwrap().render(),
        dual
    );
    // The legacy comma list is read and deduplicated.
    let multi = SubnetEnv::parse(
        "FLANNEL_NETWORK=10.1.0.0/16,10.2.0.0/16,10.1.0.0/16\n",
        Dialect::Dotenv,
    )
    .unwrap();
    assert_eq!(multi.networks.len(), 2);
    // The plugin's strict reader refuses what upstream's does: a missing key, a bad MTU.
    assert!(
        SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n",
            Dialect::Strict
        )
        .is_err()
    );
    assert!(SubnetEnv::parse(&text.replace("1450", "-1"), Dialect::Strict).is_err());
}

// ---------------------------------------------------------------------------------------
// The CNI plugin's netconf.

fn cni_netconf() -> impl Strategy<Value = Value> {
    let delegate = prop::collection::btree_map(
        prop_oneof![
            Just("type".to_owned()),
            Just("hairpinMode".to_owned()),
            Just("ipMasq".to_owned()),
            Just("mtu".to_owned()),
            Just("isGateway".to_owned()),
            "[a-zA-Z]{1,8}"
        ],
        json_value(),
        0..5,
    );
    (
        prop::option::of(".{0,10}"),
        prop::option::of(prop::sample::select(&["0.3.1", "0.4.0", "1.0.0", ""][..])),
        prop::option::of(delegate),
        prop::option::of(prop::collection::btree_map(
            "[a-z]{1,6}",
            json_value(),
            0..4,
        )),
        prop::option::of(json_value()),
    )
        .prop_map(|(name, version, delegate, ipam, rc)| {
            let mut m = Map::new();
            m.insert("type".into(), json!("flannel"));
            if let Some(n) = name {
                m.insert("name".into(), json!(n));
            }
            if let Some(v) = version {
                m.insert("cniVersion".into(), json!(v));
            }
            if let Some(d) = delegate {
                m.insert("delegate".into(), Value::Object(d.into_iter().collect()));
            }
            if let Some(i) = ipam {
                m.insert("ipam".into(), Value::Object(i.into_iter().collect()));
            }
            if let Some(r) = rc {
                m.insert("runtimeConfig".into(), r);
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn cni_netconf_never_panics(bytes in input_bytes()) {
        if let Err(e) = NetConf::parse(&bytes) { short_error(e)?; }
    }

    /// Whatever netconf the runtime hands over and whatever subnet.env says, the delegate
    /// config is the user's delegate plus flannel's fields, as upstream's `doCmdAdd` builds it.
    #[test]
    fn cni_delegate_follows_upstream(conf in cni_netconf(), env in subnet_env()) {
        let text = conf.to_string();
        let parsed = match NetConf::parse(text.as_bytes()) {
            Ok(p) => p,
            Err(e) => {
                short_error(&e)?;
                // Refused only for upstream's reasons: a non-string delegate type, or a
                // delegate that sets `name` or `ipam` (flannel sets those).
                let d = &conf["delegate"];
                let why = d.get("type").is_some_and(|t| !t.is_string())
                    || d.get("name").is_some()
                    || d.get("ipam").is_some();
                prop_assert!(why, "{}: {}", text, e);
                return Ok(());
            }
        };
        let d = render_delegate(&parsed, &env);
        // The user's keys as we read them (serde_json may round a 17-digit float's last
        // digit where Go keeps it; see fuzz notes).
        let user = parsed.delegate.clone().unwrap_or_default();
        prop_assert_eq!(&d["name"], &json!(parsed.name));
        prop_assert_eq!(d.get("type").cloned(), Some(user.get("type").cloned().unwrap_or(json!("bridge"))));
        if let Some(m) = env.ip_masq {
            prop_assert_eq!(d.get("ipMasq").cloned(), Some(user.get("ipMasq").cloned().unwrap_or(json!(!m))));
        }
        if let Some(mtu) = env.mtu {
            prop_assert_eq!(d.get("mtu").cloned(), Some(user.get("mtu").cloned().unwrap_or(json!(mtu))));
        }
        let ipam = d["ipam"].as_object().expect("ipam is an object");
        let ranges = ipam["ranges"].as_array().unwrap();
        prop_assert_eq!(ranges.len(), usize::from(env.subnet.is_some()) + usize::from(env.ipv6_subnet.is_some()));
        if let Some(s) = env.subnet {
            prop_assert_eq!(&ranges[0], &json!([{ "subnet": s.to_string() }]));
        }
        let routes = ipam["routes"].as_array().unwrap();
        prop_assert!(routes.len() >= env.networks.len() + env.ipv6_networks.len());
    }
}

//! The plugin's inputs (its netconf and flanneld's `subnet.env`) and the delegate netconf
//! rendered from them, following upstream `flannel-io/cni-plugin` (`flannel.go`,
//! `flannel_linux.go`) so a node can swap plugins without pods noticing.

use std::path::PathBuf;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Default `subnetFile`: where flanneld writes `subnet.env`.
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Default `dataDir`: rendered delegate configs, one file per container.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// Why the inputs are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// stdin is not a JSON netconf.
    #[error("failed to parse the network configuration: {0}")]
    Decode(#[source] serde_json::Error),
    /// The `delegate` object breaks a rule.
    #[error("'delegate' dictionary {0}")]
    Delegate(&'static str),
    /// `subnet.env` could not be read.
    #[error(
        "failed to load flannel 'subnet.env' file {path}: {source}. Check the flannel pod's logs."
    )]
    ReadSubnetEnv {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `subnet.env` line does not parse.
    #[error(
        "failed to load flannel 'subnet.env' file {path}: line {line}: {key}={value:?}: {reason}. \
         Check the flannel pod's logs."
    )]
    BadSubnetEnvLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// `subnet.env` lacks a required key.
    #[error(
        "failed to load flannel 'subnet.env' file: {path} is missing {missing}. Check the \
         flannel pod's logs."
    )]
    SubnetEnvIncomplete {
        /// The file.
        path: PathBuf,
        /// The missing keys, comma separated (upstream's wording).
        missing: String,
    },
}

/// The plugin's own netconf (the `flannel` entry of the conflist).
#[derive(Clone, Debug, Deserialize)]
pub struct NetConf {
    /// CNI version of the configuration.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Plugin type (`flannel`).
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Where flanneld writes `subnet.env`.
    #[serde(rename = "subnetFile", default = "default_subnet_file")]
    pub subnet_file: PathBuf,
    /// Where rendered delegate configs are kept for DEL.
    #[serde(rename = "dataDir", default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Merged into the delegate config.
    #[serde(default)]
    pub delegate: Option<Map<String, Value>>,
    /// Base of the delegate's `ipam`.
    #[serde(default)]
    pub ipam: Option<Map<String, Value>>,
    /// Copied to the delegate's `runtimeConfig`.
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Option<Value>,
}

fn default_subnet_file() -> PathBuf {
    PathBuf::from(DEFAULT_SUBNET_FILE)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

impl NetConf {
    /// Parses and checks the netconf as upstream's `loadFlannelNetConf` does.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let conf: Self = serde_json::from_slice(bytes).map_err(ConfigError::Decode)?;
        if let Some(d) = &conf.delegate {
            if d.get("type").is_some_and(|t| !t.is_string()) {
                return Err(ConfigError::Delegate("must have (string) 'type' field"));
            }
            if d.contains_key("name") {
                return Err(ConfigError::Delegate(
                    "must not have 'name' field, it'll be set by flannel",
                ));
            }
            if d.contains_key("ipam") {
                return Err(ConfigError::Delegate(
                    "must not have 'ipam' field, it'll be set by flannel",
                ));
            }
        }
        Ok(conf)
    }
}

/// What `subnet.env` says about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK` (comma list, deduplicated, in order).
    pub networks: Vec<Ipv4Network>,
    /// `FLANNEL_SUBNET`, host bits cleared (`10.244.1.1/24` → `10.244.1.0/24`).
    pub subnet: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_networks: Vec<Ipv6Network>,
    /// `FLANNEL_IPV6_SUBNET`, host bits cleared.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// `FLANNEL_MTU`.
    pub mtu: Option<u32>,
    /// `FLANNEL_IPMASQ == "true"`.
    pub ipmasq: Option<bool>,
}

fn masked(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).expect("prefix of a parsed network is valid")
}

impl SubnetEnv {
    /// Reads `path` with [`SubnetEnv::parse`].
    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadSubnetEnv {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Strict line parser, like upstream's: split at the first `=`, no trimming, no quotes;
    /// unknown keys are ignored; a recognised key with a bad value is an error naming the
    /// line. `path` only labels errors.
    pub fn parse(text: &str, path: &std::path::Path) -> Result<Self, ConfigError> {
        let mut env = Self::default();
        for (idx, line) in text.lines().enumerate() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let bad = |reason: String| ConfigError::BadSubnetEnvLine {
                path: path.to_owned(),
                line: idx + 1,
                key: key.to_owned(),
                value: value.to_owned(),
                reason,
            };
            let cidr = |s: &str| -> Result<IpNetwork, ConfigError> {
                s.parse::<IpNetwork>()
                    .map(masked)
                    .map_err(|e| bad(format!("{s:?} is not a CIDR: {e}")))
            };
            let v4 = |n: IpNetwork| match n {
                IpNetwork::V4(n) => Ok(n),
                IpNetwork::V6(_) => Err(bad("expected an IPv4 network".into())),
            };
            let v6 = |n: IpNetwork| match n {
                IpNetwork::V6(n) => Ok(n),
                IpNetwork::V4(_) => Err(bad("expected an IPv6 network".into())),
            };
            match key {
                "FLANNEL_NETWORK" => {
                    for part in value.split(',') {
                        let n = v4(cidr(part)?)?;
                        if !env.networks.contains(&n) {
                            env.networks.push(n);
                        }
                    }
                }
                "FLANNEL_SUBNET" => env.subnet = Some(v4(cidr(value)?)?),
                "FLANNEL_IPV6_NETWORK" => {
                    for part in value.split(',') {
                        let n = v6(cidr(part)?)?;
                        if !env.ipv6_networks.contains(&n) {
                            env.ipv6_networks.push(n);
                        }
                    }
                }
                "FLANNEL_IPV6_SUBNET" => env.ipv6_subnet = Some(v6(cidr(value)?)?),
                "FLANNEL_MTU" => {
                    env.mtu = Some(
                        value
                            .parse()
                            .map_err(|e| bad(format!("not an unsigned integer: {e}")))?,
                    );
                }
                "FLANNEL_IPMASQ" => env.ipmasq = Some(value == "true"),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        if env.networks.is_empty() && env.ipv6_networks.is_empty() {
            missing.push("FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK");
        }
        if env.subnet.is_none() && env.ipv6_subnet.is_none() {
            missing.push("FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET");
        }
        if env.mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if env.ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        if !missing.is_empty() {
            return Err(ConfigError::SubnetEnvIncomplete {
                path: path.to_owned(),
                missing: missing.join(", "),
            });
        }
        Ok(env)
    }
}

/// Renders the delegate netconf (upstream `doCmdAdd` + `getDelegateIPAM`): the user's
/// `delegate` keys win, flannel fills `name`, `type` (bridge), `ipMasq` (the inverse of
/// flanneld's: whoever does not masquerade leaves it to the other), `mtu`, `isGateway`,
/// `cniVersion`, and an `ipam` whose `ranges` are this node's subnets and whose `routes`
/// add the cluster networks.
pub fn render_delegate(conf: &NetConf, env: &SubnetEnv) -> Map<String, Value> {
    let mut d = conf.delegate.clone().unwrap_or_default();
    d.insert("name".into(), json!(conf.name));
    d.entry("type").or_insert_with(|| json!("bridge"));
    if let Some(ipmasq) = env.ipmasq {
        d.entry("ipMasq").or_insert_with(|| json!(!ipmasq));
    }
    if let Some(mtu) = env.mtu {
        d.entry("mtu").or_insert_with(|| json!(mtu));
    }
    if d.get("type").and_then(Value::as_str) == Some("bridge") {
        d.entry("isGateway").or_insert_with(|| json!(true));
    }
    if !conf.cni_version.is_empty() {
        d.insert("cniVersion".into(), json!(conf.cni_version));
    }
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }

    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert_with(|| json!("host-local"));
    let mut ranges = Vec::new();
    if let Some(sn) = env.subnet {
        ranges.push(json!([{ "subnet": sn.to_string() }]));
    }
    if let Some(sn) = env.ipv6_subnet {
        ranges.push(json!([{ "subnet": sn.to_string() }]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes = match ipam.get("routes") {
        Some(Value::Array(r)) => r.clone(),
        _ => Vec::new(),
    };
    let nets = env
        .networks
        .iter()
        .map(|n| IpNetwork::V4(*n))
        .chain(env.ipv6_networks.iter().map(|n| IpNetwork::V6(*n)));
    routes.extend(nets.map(|n| json!({ "dst": n.to_string() })));
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    d
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const STOCK_SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
                                    FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn env(text: &str) -> Result<SubnetEnv, ConfigError> {
        SubnetEnv::parse(text, Path::new("/run/flannel/subnet.env"))
    }

    /// The flannel entry of upstream's `kube-flannel.yml` conflist, as libcni hands it to
    /// the plugin (name and cniVersion injected from the list).
    const STOCK_NETCONF: &str = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
        "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;

    #[test]
    fn golden_stock_manifest() {
        let conf = NetConf::parse(STOCK_NETCONF.as_bytes()).unwrap();
        let rendered = Value::Object(render_delegate(&conf, &env(STOCK_SUBNET_ENV).unwrap()));
        // §10.3 of the spec: what the bridge plugin receives on a stock node.
        let golden = json!({
            "cniVersion": "0.3.1",
            "hairpinMode": true,
            "ipMasq": false,
            "ipam": {
                "ranges": [[{"subnet": "10.244.1.0/24"}]],
                "routes": [{"dst": "10.244.0.0/16"}],
                "type": "host-local"
            },
            "isDefaultGateway": true,
            "isGateway": true,
            "mtu": 1450,
            "name": "cbr0",
            "type": "bridge"
        });
        assert_eq!(rendered, golden);
        // Go marshals maps with sorted keys; so do we (serde_json's default map).
        assert_eq!(
            serde_json::to_string(&rendered).unwrap(),
            serde_json::to_string(&golden).unwrap()
        );
    }

    #[test]
    fn golden_upstream_unit_test_dual_stack() {
        // Shape of upstream flannel_linux_test.go's dual-stack case.
        let conf = NetConf::parse(
            br#"{"name":"cni-flannel","type":"flannel","cniVersion":"0.3.1",
                 "ipam":{"routes":[{"dst":"192.168.0.0/16","gw":"10.1.17.1"}]}}"#,
        )
        .unwrap();
        let e = env("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\n\
             FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
        .unwrap();
        let rendered = Value::Object(render_delegate(&conf, &e));
        assert_eq!(
            rendered,
            json!({
                "cniVersion": "0.3.1",
                "ipMasq": true,
                "ipam": {
                    "ranges": [[{"subnet": "10.1.17.0/24"}], [{"subnet": "fc00::/64"}]],
                    "routes": [
                        {"dst": "192.168.0.0/16", "gw": "10.1.17.1"},
                        {"dst": "10.1.0.0/16"},
                        {"dst": "fc00::/48"}
                    ],
                    "type": "host-local"
                },
                "isGateway": true,
                "mtu": 1472,
                "name": "cni-flannel",
                "type": "bridge"
            })
        );
    }

    #[test]
    fn delegate_keys_win_and_non_bridge_has_no_gateway() {
        let conf = NetConf::parse(
            br#"{"name":"n","type":"flannel","delegate":{"type":"macvlan","ipMasq":true,"mtu":9000},
                 "runtimeConfig":{"portMappings":[]}}"#,
        )
        .unwrap();
        let d = render_delegate(&conf, &env(STOCK_SUBNET_ENV).unwrap());
        assert_eq!(d["type"], json!("macvlan"));
        assert_eq!(d["ipMasq"], json!(true));
        assert_eq!(d["mtu"], json!(9000));
        assert!(!d.contains_key("isGateway"));
        assert!(!d.contains_key("cniVersion"));
        assert_eq!(d["runtimeConfig"], json!({"portMappings": []}));
    }

    #[test]
    fn delegate_rules() {
        for (bad, why) in [
            (r#"{"delegate":{"name":"x"}}"#, "name"),
            (r#"{"delegate":{"ipam":{}}}"#, "ipam"),
            (r#"{"delegate":{"type":7}}"#, "type"),
        ] {
            let err = NetConf::parse(bad.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        let conf = NetConf::parse(b"{}").unwrap();
        assert_eq!(conf.subnet_file, Path::new(DEFAULT_SUBNET_FILE));
        assert_eq!(conf.data_dir, Path::new(DEFAULT_DATA_DIR));
    }

    #[test]
    fn subnet_env_strict_parser() {
        let e = env(
            "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16,10.244.0.0/16\n\
                     FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n\
                     # comment\nOTHER=1\n",
        )
        .unwrap();
        assert_eq!(e.networks.len(), 2);
        assert_eq!(e.subnet, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!(e.ipmasq, Some(false));
        // No trimming: a space makes the value invalid, and the error names the line.
        let err = env("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU= 1450\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadSubnetEnvLine { line: 2, key, .. } if key == "FLANNEL_MTU"),
            "{err}"
        );
        let err = env("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("is missing FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_IPMASQ"),
            "{msg}"
        );
        assert!(msg.contains("Check the flannel pod's logs"), "{msg}");
        assert!(env("FLANNEL_NETWORK=\"10.244.0.0/16\"\n").is_err());
    }
}

//! The plugin's inputs (its netconf and flanneld's `subnet.env`) and the delegate netconf
//! rendered from them, following upstream `flannel-io/cni-plugin` (`flannel.go`,
//! `flannel_linux.go`) so a node can swap plugins without pods noticing.

use std::path::PathBuf;

use ipnetwork::IpNetwork;
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
    /// The result of the last ADD (CHECK, and DEL where the runtime has it).
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// GC (CNI 1.1): the attachments that are still valid; everything else may go.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The same under the name an early 1.1 draft used; libcni 1.2 sends both.
    #[serde(rename = "cni.dev/attachments", default)]
    pub attachments: Option<Vec<Attachment>>,
}

/// One entry of GC's `cni.dev/valid-attachments`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// `CNI_CONTAINERID` of the attachment's ADD.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME` of the attachment's ADD.
    #[serde(rename = "ifname")]
    pub ifname: String,
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

pub use crate::wire::subnet_env::SubnetEnv;
use crate::wire::subnet_env::{self, Dialect};

/// Reads flanneld's `subnet.env` with the plugin's strict parser; errors name the file.
pub fn read_subnet_env(path: &std::path::Path) -> Result<SubnetEnv, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadSubnetEnv {
        path: path.to_owned(),
        source,
    })?;
    parse_subnet_env(&text, path)
}

/// [`SubnetEnv::parse`] in the strict dialect; `path` only labels errors.
pub fn parse_subnet_env(text: &str, path: &std::path::Path) -> Result<SubnetEnv, ConfigError> {
    SubnetEnv::parse(text, Dialect::Strict).map_err(|e| match e {
        subnet_env::Error::BadLine {
            line,
            key,
            value,
            reason,
        } => ConfigError::BadSubnetEnvLine {
            path: path.to_owned(),
            line,
            key,
            value,
            reason,
        },
        subnet_env::Error::Incomplete { missing } => ConfigError::SubnetEnvIncomplete {
            path: path.to_owned(),
            missing,
        },
    })
}

/// The plugin a rendered delegate config names (`type`), `bridge` when it names none, as
/// upstream's plugin defaults.
pub fn delegate_type(rendered: &Map<String, Value>) -> String {
    rendered
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("bridge")
        .to_owned()
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
    if let Some(ipmasq) = env.ip_masq {
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
        parse_subnet_env(text, Path::new("/run/flannel/subnet.env"))
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
    fn ipv6_only_hands_host_local_the_ipv6_range_alone() {
        let conf = NetConf::parse(STOCK_NETCONF.as_bytes()).unwrap();
        let e = env(
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n\
             FLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let rendered = Value::Object(render_delegate(&conf, &e));
        assert_eq!(
            rendered["ipam"],
            json!({
                "ranges": [[{"subnet": "fd00:10:244:1::/64"}]],
                "routes": [{"dst": "fd00:10:244::/56"}],
                "type": "host-local"
            })
        );
        assert_eq!(rendered["mtu"], json!(1430));
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
        assert_eq!(e.ip_masq, Some(false));
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

//! The `flannel` CNI plugin: a meta-plugin that turns flanneld's `subnet.env` into a
//! `bridge` + `host-local` configuration and delegates to those plugins, as upstream's
//! `flannel-io/cni-plugin` does (spec §10). The runtime talks to it through `CNI_*`
//! environment variables, the netconf on stdin, and a result or error JSON on stdout.

pub mod config;
pub mod delegate;
mod status_gc;

use std::io::{Read as _, Write as _};

use serde_json::{Value, json};

use self::{
    config::{ConfigError, NetConf, delegate_type, read_subnet_env, render_delegate},
    delegate::DelegateError,
};

/// CNI versions this plugin accepts: all that exist (upstream's `version.All`), 1.1.0
/// (STATUS and GC) included.
pub const SUPPORTED_VERSIONS: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest supported version, used when the input names none.
pub const CURRENT_VERSION: &str = "1.1.0";

/// CNI error codes (CNI spec, "Error" section).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (flanneld has not written `subnet.env` yet).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD (CNI 1.1).
    pub const NOT_AVAILABLE: u32 = 50;
    /// Anything else (libcni's `ErrInternal`).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error result: printed as `{"cniVersion","code","msg","details"}` on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// CNI error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The JSON the runtime reads.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl From<ConfigError> for CniError {
    fn from(e: ConfigError) -> Self {
        let code = match &e {
            ConfigError::Decode(_) => code::DECODE,
            ConfigError::Delegate(_) => code::INVALID_CONFIG,
            ConfigError::ReadSubnetEnv { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                code::TRY_AGAIN_LATER
            }
            _ => code::INTERNAL,
        };
        Self::new(code, e.to_string())
    }
}

impl From<DelegateError> for CniError {
    fn from(e: DelegateError) -> Self {
        // Pass the delegate's own error through (libcni does the same).
        if let DelegateError::Failed { stdout, .. } = &e
            && let Ok(v) = serde_json::from_slice::<Value>(stdout)
            && let Some(code) = v.get("code").and_then(Value::as_u64)
        {
            let text = |k| {
                v.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            return Self {
                code: u32::try_from(code).unwrap_or(code::INTERNAL),
                msg: format!("failed to delegate: {}", text("msg")),
                details: text("details"),
            };
        }
        Self::new(code::INTERNAL, e.to_string())
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_PATH`.
    pub path: String,
}

impl CniEnv {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let var = |k| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            path: var("CNI_PATH"),
        }
    }

    fn require(&self, netns: bool) -> Result<(), CniError> {
        let mut missing = Vec::new();
        for (name, value, needed) in [
            ("CNI_CONTAINERID", &self.container_id, true),
            ("CNI_NETNS", &self.netns, netns),
            ("CNI_IFNAME", &self.ifname, true),
            ("CNI_PATH", &self.path, true),
        ] {
            if needed && value.is_empty() {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("required env variables [{}] missing", missing.join(",")),
            ));
        }
        // The container ID names a file in dataDir: refuse anything path-like.
        let id_ok = self
            .container_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !self.container_id.starts_with('.');
        if !id_ok {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("invalid CNI_CONTAINERID {:?}", self.container_id),
            ));
        }
        Ok(())
    }
}

fn version_key(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(str::parse::<u32>);
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

/// Whether `v` names `min` or a later version.
fn at_least(v: &str, min: (u32, u32, u32)) -> bool {
    version_key(v) >= Some(min)
}

/// The config's version, checked against [`SUPPORTED_VERSIONS`]; empty means 0.1.0 (libcni).
fn check_version(v: &str) -> Result<&str, CniError> {
    let v = if v.is_empty() { "0.1.0" } else { v };
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(v)
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI versions; config is {v:?}, plugin supports {SUPPORTED_VERSIONS:?}"
            ),
        ))
    }
}

/// Runs one CNI command; returns what goes to stdout on success.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    match env.command.as_str() {
        "VERSION" => Ok(version_info(stdin)),
        "ADD" => cmd_add(env, stdin),
        "DEL" => cmd_del(env, stdin),
        "CHECK" => cmd_check(env, stdin),
        "STATUS" => status_gc::cmd_status(env, stdin),
        "GC" => status_gc::cmd_gc(env, stdin),
        "" => Err(CniError::new(
            code::INVALID_ENV,
            "required env variables [CNI_COMMAND] missing",
        )),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND: {other}"),
        )),
    }
}

fn version_info(stdin: &[u8]) -> Vec<u8> {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CURRENT_VERSION.to_owned());
    let out = json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS });
    serde_json::to_vec(&out).expect("JSON values serialise")
}

fn cmd_add(env: &CniEnv, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    env.require(true)?;
    let conf = NetConf::parse(stdin)?;
    check_version(&conf.cni_version)?;
    let subnet_env = read_subnet_env(&conf.subnet_file)?;
    let mut rendered = render_delegate(&conf, &subnet_env);
    let plugin = delegate_type(&rendered);
    let path = delegate::find_plugin(&plugin, &env.path)?;
    let spoken = delegate_version(&path, &conf.cni_version)?;
    if spoken != conf.cni_version {
        rendered.insert("cniVersion".into(), json!(spoken));
    }
    let bytes = serde_json::to_vec(&rendered).expect("JSON values serialise");
    delegate::save(&conf.data_dir, &env.container_id, &env.ifname, &bytes)?;
    let result = delegate::invoke(&path, "ADD", &bytes)?;
    Ok(relabel_result(result, &conf.cni_version, &spoken))
}

/// The version to speak to the delegate for a config of version `wanted`.
///
/// A 1.1.0 config reaches plugins that stop at 1.0.0 (Debian's 1.1.1, and every
/// containernetworking/plugins release before 1.5): they refuse it outright. 1.1.0 only added
/// verbs and optional result fields to 1.0.0, so such a delegate is spoken to in 1.0.0 and its
/// result is a valid 1.1.0 result. Versions up to 1.0.0 go through as they are, without
/// asking (every delegate speaks them; upstream's plugin does the same).
fn delegate_version(path: &std::path::Path, wanted: &str) -> Result<String, CniError> {
    if !at_least(wanted, (1, 1, 0)) {
        return Ok(wanted.to_owned());
    }
    let theirs = delegate::supported_versions(path)?;
    if theirs.iter().any(|v| v == wanted) {
        Ok(wanted.to_owned())
    } else if theirs.iter().any(|v| v == "1.0.0") {
        Ok("1.0.0".to_owned())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "delegate {} speaks CNI {theirs:?}, neither {wanted} nor 1.0.0",
                path.display()
            ),
        ))
    }
}

/// The delegate's result, labelled with the version the runtime asked for when the delegate
/// spoke an older one (see [`delegate_version`]).
fn relabel_result(result: Vec<u8>, asked: &str, spoken: &str) -> Vec<u8> {
    if asked == spoken {
        return result;
    }
    match serde_json::from_slice::<Value>(&result) {
        Ok(Value::Object(mut m)) => {
            m.insert("cniVersion".into(), json!(asked));
            serde_json::to_vec(&m).expect("JSON values serialise")
        }
        _ => result,
    }
}

/// The delegate type recorded in a stored config.
fn stored_type(bytes: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    v.get("type")?.as_str().map(str::to_owned)
}

fn cmd_del(env: &CniEnv, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    env.require(false)?;
    let conf = NetConf::parse(stdin)?;
    check_version(&conf.cni_version)?;
    let Some(bytes) = delegate::load(&conf.data_dir, &env.container_id)? else {
        // Never added, or already deleted: DEL must succeed.
        return Ok(Vec::new());
    };
    let Some(plugin) = stored_type(&bytes) else {
        // Upstream's choice: log and succeed, so the runtime does not retry forever.
        eprintln!(
            "flannel: stored config {} is unreadable; interface may leak until reboot",
            delegate::scratch_path(&conf.data_dir, &env.container_id).display()
        );
        return Ok(Vec::new());
    };
    let path = delegate::find_plugin(&plugin, &env.path)?;
    delegate::invoke(&path, "DEL", &bytes)?;
    delegate::remove(&conf.data_dir, &env.container_id)?;
    Ok(Vec::new())
}

/// CHECK hands the delegate the config ADD stored for this container and the runtime's
/// `prevResult`, as the spec asks of a plugin that delegates: `bridge` then checks the
/// interface, addresses and routes in the pod and asks `host-local` whether the address is
/// still reserved. (Upstream's flannel plugin answers CHECK with success unconditionally; a
/// container it never set up, or a pod that lost its route, is an error here.)
fn cmd_check(env: &CniEnv, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    env.require(true)?;
    let conf = NetConf::parse(stdin)?;
    let version = check_version(&conf.cni_version)?;
    if !at_least(version, (0, 4, 0)) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version {version:?} does not allow CHECK"),
        ));
    }
    let Some(bytes) = delegate::load(&conf.data_dir, &env.container_id)? else {
        return Err(CniError::new(
            code::INTERNAL,
            format!(
                "flannel set up no network for container {}",
                env.container_id
            ),
        ));
    };
    let unreadable = || {
        CniError::new(
            code::DECODE,
            format!(
                "stored delegate config {} is unreadable",
                delegate::scratch_path(&conf.data_dir, &env.container_id).display()
            ),
        )
    };
    let Ok(Value::Object(mut stored)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(unreadable());
    };
    let Some(plugin) = stored
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Err(unreadable());
    };
    let Some(Value::Object(mut prev)) = conf.prev_result.clone() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs the runtime's prevResult (the result of the container's ADD)",
        ));
    };
    // The delegate parses prevResult in the version it was spoken to at ADD.
    if let Some(v) = stored.get("cniVersion") {
        prev.insert("cniVersion".into(), v.clone());
    }
    with_route_gateways(&mut prev);
    stored.insert("prevResult".into(), Value::Object(prev));
    let path = delegate::find_plugin(&plugin, &env.path)?;
    let config = serde_json::to_vec(&stored).expect("JSON values serialise");
    delegate::invoke(&path, "CHECK", &config)?;
    Ok(Vec::new())
}

/// Names, on every route of `result` without a `gw`, the gateway of the address of the same
/// family: the next hop `ipam.ConfigureIface` installed it with.
///
/// containernetworking/plugins before v1.3.0 (Debian ships 1.1.1) look a gateway-less result
/// route up in the pod as a route *without* a gateway (`ValidateExpectedRoute`, fixed by
/// containernetworking/plugins#887), so `bridge` CHECK fails every flannel pod with
/// `Expected Route {Dst:10.244.0.0/16 GW:<nil>} not found`. With the gateway named, old and
/// fixed plugins both look for exactly the route that is there, and a pod that lost it
/// still fails CHECK.
fn with_route_gateways(result: &mut serde_json::Map<String, Value>) {
    let gateway = |v6: bool| {
        result.get("ips")?.as_array()?.iter().find_map(|ip| {
            let addr: ipnetwork::IpNetwork = ip.get("address")?.as_str()?.parse().ok()?;
            let gw = ip.get("gateway")?.as_str()?;
            (addr.is_ipv6() == v6).then(|| gw.to_owned())
        })
    };
    let (v4, v6) = (gateway(false), gateway(true));
    let Some(Value::Array(routes)) = result.get_mut("routes") else {
        return;
    };
    for route in routes.iter_mut().filter_map(Value::as_object_mut) {
        if route.contains_key("gw") {
            continue;
        }
        let dst = route
            .get("dst")
            .and_then(Value::as_str)
            .and_then(|d| d.parse::<ipnetwork::IpNetwork>().ok());
        let gw = match dst {
            Some(d) if d.is_ipv6() => v6.clone(),
            Some(_) => v4.clone(),
            None => None,
        };
        if let Some(gw) = gw {
            route.insert("gw".into(), json!(gw));
        }
    }
}

/// The plugin binary's whole life: read env and stdin, run, print, exit 0 or 1.
pub fn main() -> std::process::ExitCode {
    let env = CniEnv::from_process();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| CURRENT_VERSION.to_owned());
    let result = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => Err(CniError::new(code::DECODE, format!("reading stdin: {e}"))),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(bytes) => {
            if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            let json = serde_json::to_vec(&e.to_json(&version)).expect("JSON values serialise");
            // Nothing else can be done if stdout is gone; the exit code still says failure.
            let _ = out.write_all(&json).and_then(|()| out.flush());
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_answers_all_supported() {
        let out: Value =
            serde_json::from_slice(&version_info(br#"{"cniVersion":"0.4.0"}"#)).unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["supportedVersions"].as_array().unwrap().len(), 7);
        let out: Value = serde_json::from_slice(&version_info(b"")).unwrap();
        assert_eq!(out["cniVersion"], "1.1.0");
    }

    #[test]
    fn env_and_version_errors_have_cni_codes() {
        let env = CniEnv {
            command: "ADD".into(),
            ..Default::default()
        };
        let e = run(&env, b"{}").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{}", e.msg);
        let env = CniEnv {
            command: "ADD".into(),
            container_id: "../../etc".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            path: "/usr/lib/cni".into(),
        };
        assert_eq!(run(&env, b"{}").unwrap_err().code, code::INVALID_ENV);
        assert_eq!(
            check_version("9.9.9").unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(check_version("").unwrap(), "0.1.0");
        let bogus = CniEnv {
            command: "FROB".into(),
            ..Default::default()
        };
        assert_eq!(run(&bogus, b"{}").unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn delegate_error_passes_through() {
        let e = DelegateError::Failed {
            path: "/usr/lib/cni/bridge".into(),
            status: std::os::unix::process::ExitStatusExt::from_raw(256),
            stdout: br#"{"code":11,"msg":"busy","details":"d"}"#.to_vec(),
        };
        let c = CniError::from(e);
        assert_eq!(c.code, 11);
        assert_eq!(c.details, "d");
        assert!(c.msg.contains("busy"));
    }

    #[test]
    fn check_names_the_gateway_of_gatewayless_routes() {
        let mut prev = json!({
            "cniVersion": "1.0.0",
            "ips": [
                {"interface": 2, "address": "10.244.7.5/24", "gateway": "10.244.7.1"},
                {"interface": 2, "address": "fd00:10:244:7::5/64", "gateway": "fd00:10:244:7::1"}
            ],
            "routes": [
                {"dst": "10.244.0.0/16"},
                {"dst": "0.0.0.0/0", "gw": "10.244.7.254"},
                {"dst": "fd00:10:244::/56"},
                {"dst": "garbage"}
            ]
        });
        with_route_gateways(prev.as_object_mut().unwrap());
        assert_eq!(
            prev["routes"],
            json!([
                {"dst": "10.244.0.0/16", "gw": "10.244.7.1"},
                {"dst": "0.0.0.0/0", "gw": "10.244.7.254"},
                {"dst": "fd00:10:244::/56", "gw": "fd00:10:244:7::1"},
                {"dst": "garbage"}
            ])
        );
        // No addresses, no routes: nothing to do, and no panic.
        let mut empty = serde_json::Map::new();
        with_route_gateways(&mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn results_of_an_older_delegate_carry_the_asked_version() {
        let out = relabel_result(
            br#"{"cniVersion":"1.0.0","ips":[]}"#.to_vec(),
            "1.1.0",
            "1.0.0",
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"cniVersion": "1.1.0", "ips": []}));
        let same = br#"{"cniVersion":"0.3.1"}"#.to_vec();
        assert_eq!(relabel_result(same.clone(), "0.3.1", "0.3.1"), same);
        assert!(at_least("1.1.0", (1, 1, 0)) && !at_least("1.0.0", (1, 1, 0)));
        assert!(!at_least("bogus", (0, 1, 0)));
    }
}

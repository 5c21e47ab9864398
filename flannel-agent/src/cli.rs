//! The `flanneld` command line: upstream's flag names and `FLANNELD_*` environment variables
//! (so existing manifests and unit files keep working), plus this implementation's own
//! `--dataplane`, `--bpf-pin-path`, `--subnet-lease-ttl` and `--log-level`.
//!
//! Go's `flag` package semantics that matter here: `-flag` is the same as `--flag`
//! ([`normalize_args`]), booleans are switched off with `--flag=false`, an environment
//! variable applies only when the flag is not on the command line (clap's `env` does that),
//! and a repeatable flag gets exactly one value from the environment (no splitting).

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum};

/// Which VXLAN datapath to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dataplane {
    /// eBPF if the kernel supports it, else the kernel VXLAN device alone.
    Auto,
    /// eBPF only; fail if it cannot be loaded.
    Ebpf,
    /// Kernel VXLAN device only (exactly upstream's datapath).
    Kernel,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `tracing`'s human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Parses a boolean the way Go's `strconv.ParseBool` does.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (use true or false)")),
    }
}

/// Validates a regular expression at parse time so a typo fails before any side effect.
fn regex_arg(s: &str) -> Result<String, String> {
    regex::Regex::new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("invalid regular expression {s:?}: {e}"))
}

/// flanneld: leases this host a pod subnet and connects it to every other host's.
#[derive(Clone, Debug, Parser)]
// Go's flag package keeps the last of repeated flags (`--iface` and `--iface-regex` are
// lists and append), so a flag given twice is not an error.
#[command(
    name = "flanneld",
    disable_version_flag = true,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Cli {
    /// Comma-separated list of etcd endpoints.
    #[arg(long, env = "FLANNELD_ETCD_ENDPOINTS", default_value = crate::subnet::etcd::DEFAULT_ENDPOINTS)]
    pub etcd_endpoints: String,
    /// etcd prefix.
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = crate::subnet::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// SSL key file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", default_value = "")]
    pub etcd_keyfile: String,
    /// SSL certification file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", default_value = "")]
    pub etcd_certfile: String,
    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", default_value = "")]
    pub etcd_cafile: String,
    /// Username for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", default_value = "")]
    pub etcd_username: String,
    /// Password for BasicAuth to etcd.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub etcd_password: String,

    /// Interface to use (IP or name) for inter-host communication. Can be given more than
    /// once; tried in order.
    #[arg(long, env = "FLANNELD_IFACE", action = ArgAction::Append)]
    pub iface: Vec<String>,
    /// Regex matching the IP or name of the interface to use. Can be given more than once;
    /// tried after --iface.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", action = ArgAction::Append, value_parser = regex_arg)]
    pub iface_regex: Vec<String>,
    /// Use the interface of the route to this IP.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IPv4 address advertised to other hosts.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address advertised to other hosts.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// File the subnet and MTU are written to (read by the CNI plugin).
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Minutes before expiry the lease is renewed (etcd only).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=1439))]
    pub subnet_lease_renew_margin: u32,
    /// Lease TTL in seconds (etcd only; upstream's fixed 24 h). A test knob.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value_t = 86400, hide = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub subnet_lease_ttl: u64,

    /// Set up IP masquerade for traffic leaving the cluster network.
    #[arg(long, env = "FLANNELD_IP_MASQ", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub ip_masq: bool,
    /// Do not use --random-fully in the masquerade rules.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub ip_masq_fully_random_disable: bool,
    /// Use the Kubernetes API instead of etcd for leases.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL (defaults to in-cluster configuration).
    #[arg(long, env = "FLANNELD_KUBE_API_URL", default_value = "")]
    pub kube_api_url: String,
    /// Prefix of the node annotations flannel reads and writes.
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,
    /// kubeconfig file location.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", default_value = "")]
    pub kubeconfig_file: String,
    /// Print the version to stderr and exit.
    #[arg(long, value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub version: bool,

    /// Address the health server listens on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of the health server (0 disables it).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Seconds between checks of the masquerade/forward rules.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub iptables_resync: u64,
    /// Add FORWARD accept rules for the cluster network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    pub iptables_forward_rules: bool,
    /// Add a blackhole route for the own subnet.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub ip_blackhole_route: bool,
    /// Network configuration file (kube subnet manager only).
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,
    /// Set the node's NetworkUnavailable condition to false once ready (kube only).
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    pub set_node_network_unavailable: bool,

    /// VXLAN datapath: eBPF with kernel fallback, eBPF only, or kernel only.
    #[arg(long, env = "FLANNELD_DATAPLANE", value_enum, default_value_t = Dataplane::Auto)]
    pub dataplane: Dataplane,
    /// bpffs directory the eBPF programs and maps are pinned under.
    #[arg(
        long,
        env = "FLANNELD_BPF_PIN_PATH",
        default_value = flannel_common::names::DEFAULT_PIN_ROOT
    )]
    pub bpf_pin_path: PathBuf,
    /// eBPF datapath only, opt-in: deliver VXLAN for local pods straight into their
    /// namespace (bpf_redirect_peer) for ALL flows, NAT included, bypassing the host's
    /// routing and netfilter for that traffic: kube-proxy Services and netfilter
    /// NetworkPolicy break for it. The per-flow fast path (--ebpf-flow-cache) is the safe
    /// default.
    #[arg(long, env = "FLANNELD_EBPF_FAST_PATH", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub ebpf_fast_path: bool,
    /// Accept VXLAN only from known peers (the addresses their leases and nodes publish):
    /// in the eBPF programs and, with an nftables rule, on the kernel device path. Default:
    /// on with the eBPF datapath, off with the kernel one (upstream accepts anyone). Turn it
    /// off where a peer's sending address cannot be known (NAT between nodes).
    #[arg(long, env = "FLANNELD_VXLAN_PEER_CHECK", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub vxlan_peer_check: Option<bool>,
    /// eBPF datapath only: how many peers the BPF maps hold. Default: every subnet the
    /// network can hold (at least 4096, at most 262144). Peers beyond it are carried by
    /// the kernel VXLAN device, with an error logged.
    #[arg(long, env = "FLANNELD_EBPF_MAX_PEERS", value_parser = clap::value_parser!(u32).range(1..))]
    pub ebpf_max_peers: Option<u32>,
    /// eBPF datapath only: the per-flow fast path. Pod-to-remote-pod TCP/UDP flows that the
    /// kernel path carried unchanged (no NAT) through netfilter in both directions skip the
    /// bridge, routing, netfilter and flannel.<VNI> on this host; everything else keeps the
    /// kernel path.
    #[arg(long, env = "FLANNELD_EBPF_FLOW_CACHE", value_parser = go_bool, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    pub ebpf_flow_cache: bool,
    /// eBPF datapath only: every this many milliseconds, per direction, one packet of a
    /// fast flow takes the kernel path again, so netfilter re-checks it (a new DROP rule
    /// takes effect within this time) and conntrack keeps the flow alive.
    #[arg(long, env = "FLANNELD_EBPF_FLOW_REFRESH_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(100..=60_000))]
    pub ebpf_flow_refresh_ms: u32,
    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "flannel_agent=debug").
    #[arg(long, env = "FLANNELD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log line format: human-readable text, or one JSON object per line for collectors.
    #[arg(long, env = "FLANNELD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// klog verbosity, accepted for compatibility: 0-1 info, 2-4 debug, 5+ trace.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", hide = true)]
    pub klog_v: Option<u8>,
    /// klog per-module verbosity, accepted and ignored.
    #[arg(long = "vmodule", env = "FLANNELD_VMODULE", hide = true)]
    pub klog_vmodule: Option<String>,
}

impl Cli {
    /// Parses the process arguments (after [`normalize_args`]); exits on error or `--help`.
    pub fn from_env() -> Self {
        Self::try_from_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (first element is the program name) with `FLANNELD_*` from the
    /// process environment.
    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Self::try_from_args_env(args, |name| std::env::var_os(name))
    }

    /// Parses `args` with environment variables from `env` (tests pass a map).
    ///
    /// Go's `flagutil.SetFlagsFromEnv` semantics, done here rather than by clap so they are
    /// exact: a variable applies only to a flag absent from the command line, an empty value
    /// is ignored, and a repeatable flag gets the whole value as one element.
    pub fn try_from_args_env<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args = normalize_args(args);
        // The env-less command parses; the full one only renders help (with env names).
        let bare = || Self::command().mut_args(|a| a.env(None));
        let given = match bare().try_get_matches_from(&args) {
            Ok(m) => m,
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
                return Err(Self::command()
                    .try_get_matches_from(&args)
                    .err()
                    .unwrap_or(e));
            }
            Err(e) => return Err(e),
        };
        let mut injected: Vec<OsString> = Vec::new();
        for arg in Self::command().get_arguments() {
            let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            let from_cli = given.value_source(arg.get_id().as_str())
                == Some(clap::parser::ValueSource::CommandLine);
            let Some(value) = var.to_str().and_then(&env).filter(|v| !v.is_empty()) else {
                continue;
            };
            if !from_cli {
                let mut flag = OsString::from(format!("--{long}="));
                flag.push(value);
                injected.push(flag);
            }
        }
        let mut full = args.clone();
        if !injected.is_empty() {
            full.splice(1..1, injected);
        }
        let matches = bare().try_get_matches_from(full)?;
        Self::from_arg_matches(&matches)
    }

    /// Endpoints split on `,` (upstream), empty pieces dropped.
    pub fn etcd_endpoint_list(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The renew margin as a duration.
    pub fn renew_margin(&self) -> Duration {
        Duration::from_secs(u64::from(self.subnet_lease_renew_margin) * 60)
    }

    /// The lease TTL as a duration.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.subnet_lease_ttl)
    }

    /// The log filter: `--log-level`, unless the klog `-v` asks for more detail.
    pub fn log_filter(&self) -> String {
        match self.klog_v {
            Some(v) if v >= 5 => "trace".to_owned(),
            Some(v) if v >= 2 && self.log_level == "info" => "debug".to_owned(),
            _ => self.log_level.clone(),
        }
    }
}

/// Rewrites Go-style single-dash long flags (`-iface=eth0`, `-ip-masq`) to `--iface=eth0`,
/// leaving short flags (`-h`, `-v`), values and everything after `--` alone.
pub fn normalize_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut rest = false;
    for (i, arg) in args.into_iter().enumerate() {
        let arg: OsString = arg.into();
        if i == 0 || rest {
            out.push(arg);
            continue;
        }
        match arg.to_str() {
            Some("--") => {
                rest = true;
                out.push(arg);
            }
            Some(s)
                if s.starts_with('-')
                    && !s.starts_with("--")
                    && s.len() > 2
                    && s.as_bytes()[1].is_ascii_alphabetic()
                    && s.as_bytes()[2] != b'=' =>
            {
                out.push(format!("-{s}").into());
            }
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses with an empty environment, so the host's variables cannot leak in.
    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_from_args_env(
            std::iter::once("flanneld").chain(args.iter().copied()),
            |_| None,
        )
    }

    #[test]
    fn repeated_flags_keep_the_last_value_and_lists_append() {
        let c = parse(&[
            "--etcd-prefix=/a",
            "-etcd-prefix=/b",
            "--ip-masq",
            "--ip-masq=false",
            "--healthz-port=1",
            "--healthz-port=2",
            "--iface=eth0",
            "--iface=eth1",
        ])
        .unwrap();
        assert_eq!(c.etcd_prefix, "/b");
        assert!(!c.ip_masq);
        assert_eq!(c.healthz_port, 2);
        assert_eq!(c.iface, ["eth0", "eth1"]);
        assert_eq!(parse(&[]).unwrap().log_format, LogFormat::Text);
        assert_eq!(
            parse(&["--log-format=json"]).unwrap().log_format,
            LogFormat::Json
        );
        assert!(parse(&["--log-format=xml"]).is_err());
    }

    #[test]
    fn defaults_match_upstream() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.etcd_endpoint_list(),
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(c.etcd_prefix, "/coreos.com/network");
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.subnet_lease_renew_margin, 60);
        assert!(!c.ip_masq);
        assert!(c.iptables_forward_rules);
        assert!(c.set_node_network_unavailable);
        assert_eq!(c.healthz_port, 0);
        assert_eq!(c.healthz_ip, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.iptables_resync, 5);
        assert_eq!(c.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(
            c.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert_eq!(c.dataplane, Dataplane::Auto);
        assert_eq!(c.bpf_pin_path, PathBuf::from("/sys/fs/bpf/flannel"));
        assert!(!c.ebpf_fast_path);
        assert_eq!(c.ebpf_max_peers, None);
        assert!(c.ebpf_flow_cache);
        assert_eq!(c.ebpf_flow_refresh_ms, 2000);
        assert_eq!(c.lease_ttl(), Duration::from_secs(86400));
    }

    #[test]
    fn go_style_flags_and_bools() {
        let c = parse(&[
            "-ip-masq",
            "-iface=eth0",
            "--iface",
            "10.0.0.1",
            "-iptables-forward-rules=false",
            "--kube-subnet-mgr=true",
            "-public-ip=198.18.0.1",
            "--dataplane=kernel",
            "-v=2",
        ])
        .unwrap();
        assert!(c.ip_masq);
        assert!(c.kube_subnet_mgr);
        assert!(!c.iptables_forward_rules);
        assert_eq!(c.iface, ["eth0", "10.0.0.1"]);
        assert_eq!(c.public_ip, Some(Ipv4Addr::new(198, 18, 0, 1)));
        assert_eq!(c.dataplane, Dataplane::Kernel);
        assert_eq!(c.log_filter(), "debug");
        assert!(!parse(&["--ip-masq=0"]).unwrap().ip_masq);
        assert!(parse(&["--version"]).unwrap().version);
    }

    #[test]
    fn bad_flags_fail() {
        for args in [
            &["--no-such-flag"][..],
            &["--subnet-lease-renew-margin=0"],
            &["--subnet-lease-renew-margin=1440"],
            &["--ip-masq=maybe"],
            &["--ip-masq", "false"],
            &["--public-ip=fd00::1"],
            &["--public-ip=nope"],
            &["--iface-regex=("],
            &["--dataplane=xdp"],
            &["--healthz-port=70000"],
            &["--iface-can-reach=host"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }

    #[test]
    fn normalization_leaves_values_and_short_flags() {
        let n = normalize_args([
            "flanneld", "-h", "-v", "3", "-iface", "-x=1", "--", "-iface",
        ]);
        assert_eq!(
            n,
            [
                "flanneld", "-h", "-v", "3", "--iface", "-x=1", "--", "-iface"
            ]
        );
    }

    #[test]
    fn env_applies_only_without_flag() {
        let vars = [
            ("FLANNELD_IFACE", "eth9,eth8"),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_ETCD_PREFIX", "/env/prefix"),
            ("FLANNELD_HEALTHZ_PORT", ""),
            ("FLANNELD_DATAPLANE", "kernel"),
            ("FLANNELD_V", "5"),
        ];
        let env = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        };
        let c = Cli::try_from_args_env(["flanneld"], env).unwrap();
        assert_eq!(
            c.iface,
            ["eth9,eth8"],
            "exactly one value from env, no splitting"
        );
        assert!(c.ip_masq);
        assert_eq!(c.etcd_prefix, "/env/prefix");
        assert_eq!(c.healthz_port, 0, "empty env is ignored");
        assert_eq!(c.dataplane, Dataplane::Kernel);
        assert_eq!(c.log_filter(), "trace");
        let c = Cli::try_from_args_env(
            [
                "flanneld",
                "-ip-masq=false",
                "--etcd-prefix=/flag",
                "--iface=eth1",
            ],
            env,
        )
        .unwrap();
        assert!(!c.ip_masq);
        assert_eq!(c.etcd_prefix, "/flag");
        assert_eq!(c.iface, ["eth1"]);
        let bad = Cli::try_from_args_env(["flanneld"], |n: &str| {
            (n == "FLANNELD_SUBNET_LEASE_RENEW_MARGIN").then(|| "0".into())
        });
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("subnet-lease-renew-margin")
        );
    }

    #[test]
    fn help_mentions_env_vars() {
        let err = parse(&["--help"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(err.to_string().contains("FLANNELD_IFACE"), "{err}");
    }
}

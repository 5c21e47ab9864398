//! The agent's configuration as one validated value: the command line ([`Cli`]) turned
//! into [`Config`] before anything else happens, then checked against the network
//! configuration ([`Config::plan`]) before anything is created on the host. Whatever is
//! refused is refused with the flag or field named, and leaves no device, pin or file
//! behind. "Unset" is `None` here, never an empty string.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    backend::ebpf::EbpfOptions,
    cli::{Cli, Dataplane},
    net::iface,
    netconf::{BackendConfig, NetworkConfig, VxlanConfig},
    subnet::{env_file::PreviousSubnets, etcd::EtcdOptions, kube::ClientOptions},
    wire::annotations::AnnotationNames,
};

/// A configuration that cannot run, naming the flag or net-conf field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A flag's value is unusable.
    #[error("{flag}={value:?}: {reason}")]
    Flag {
        /// The flag (`--etcd-endpoints`).
        flag: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// Flags, or a flag and the network configuration, contradict each other.
    #[error("{flag}: {reason}")]
    Conflict {
        /// The flag or net-conf field at fault.
        flag: &'static str,
        /// Why it cannot be honoured.
        reason: String,
    },
}

/// Where leases live, with what the chosen manager needs.
#[derive(Clone, Debug)]
pub enum ManagerConfig {
    /// etcd (`--etcd-*`).
    Etcd(EtcdOptions),
    /// The Kubernetes API (`--kube-subnet-mgr`).
    Kube(KubeConfig),
}

/// The kube subnet manager's settings.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// How to reach the API server.
    pub client: ClientOptions,
    /// `--net-config-path`.
    pub net_config_path: PathBuf,
    /// `--kube-annotation-prefix` (checked).
    pub annotation_prefix: String,
    /// `--set-node-network-unavailable`.
    pub set_node_network_unavailable: bool,
}

/// Masquerade, forward and blackhole rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficConfig {
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--ip-masq-fully-random-disable`.
    pub fully_random_disable: bool,
    /// `--iptables-forward-rules`.
    pub forward_rules: bool,
    /// `--iptables-resync`.
    pub resync: Duration,
    /// `--ip-blackhole-route`.
    pub blackhole_route: bool,
}

/// Everything the agent runs with, checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// The subnet manager.
    pub manager: ManagerConfig,
    /// How the external interface is chosen (`--iface*`, `--public-ip*`); the families
    /// are filled in from the network configuration.
    pub interface: iface::Selector,
    /// `--subnet-file`.
    pub subnet_file: PathBuf,
    /// Traffic rules.
    pub traffic: TrafficConfig,
    /// `--healthz-ip:--healthz-port`; `None` with port 0.
    pub healthz: Option<SocketAddr>,
    /// `--dataplane`.
    pub dataplane: Dataplane,
    /// `--bpf-pin-path`, `--ebpf-fast-path`, `--vxlan-peer-check`, `--ebpf-max-peers` for
    /// the eBPF datapath.
    pub ebpf: EbpfOptions,
    /// `--vxlan-peer-check` as given (`None`: on with eBPF, off with the kernel device).
    pub vxlan_peer_check: Option<bool>,
}

/// Which backend to build, decided from the configuration before any side effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// host-gw routes.
    HostGw,
    /// The kernel VXLAN device alone.
    Kernel(VxlanConfig),
    /// eBPF VXLAN, failing if it cannot load.
    Ebpf(VxlanConfig),
    /// eBPF VXLAN, else the kernel VXLAN device.
    EbpfOrKernel(VxlanConfig),
}

/// An empty string flag is "unset".
fn set(s: &str) -> Option<String> {
    Some(s.to_owned()).filter(|s| !s.is_empty())
}

impl Config {
    /// Checks the command line. `previous` is what the last run's `subnet.env` said (the
    /// etcd manager prefers those subnets).
    pub fn from_cli(cli: &Cli, previous: PreviousSubnets) -> Result<Self, Error> {
        if cli.ebpf_fast_path && cli.dataplane == Dataplane::Kernel {
            return Err(Error::Conflict {
                flag: "--ebpf-fast-path",
                reason: "the fast path is part of the eBPF datapath, but --dataplane=kernel \
                         disables it"
                    .into(),
            });
        }
        let manager = if cli.kube_subnet_mgr {
            AnnotationNames::new(&cli.kube_annotation_prefix).map_err(|e| Error::Flag {
                flag: "--kube-annotation-prefix",
                value: cli.kube_annotation_prefix.clone(),
                reason: e.to_string(),
            })?;
            ManagerConfig::Kube(KubeConfig {
                client: ClientOptions {
                    api_url: set(&cli.kube_api_url),
                    kubeconfig: set(&cli.kubeconfig_file).map(PathBuf::from),
                },
                net_config_path: cli.net_config_path.clone(),
                annotation_prefix: cli.kube_annotation_prefix.clone(),
                set_node_network_unavailable: cli.set_node_network_unavailable,
            })
        } else {
            let endpoints = cli.etcd_endpoint_list();
            if endpoints.is_empty() {
                return Err(Error::Flag {
                    flag: "--etcd-endpoints",
                    value: cli.etcd_endpoints.clone(),
                    reason: "no endpoint given".into(),
                });
            }
            ManagerConfig::Etcd(EtcdOptions {
                endpoints,
                prefix: cli.etcd_prefix.clone(),
                keyfile: set(&cli.etcd_keyfile).map(PathBuf::from),
                certfile: set(&cli.etcd_certfile).map(PathBuf::from),
                cafile: set(&cli.etcd_cafile).map(PathBuf::from),
                username: set(&cli.etcd_username),
                password: set(&cli.etcd_password),
                ttl: cli.lease_ttl(),
                renew_margin: cli.renew_margin(),
                previous,
            })
        };
        Ok(Self {
            manager,
            interface: iface::Selector {
                iface: cli.iface.clone(),
                iface_regex: cli.iface_regex.clone(),
                iface_can_reach: cli.iface_can_reach,
                public_ip: cli.public_ip,
                public_ipv6: cli.public_ipv6,
                ipv4: true,
                ipv6: false,
            },
            subnet_file: cli.subnet_file.clone(),
            traffic: TrafficConfig {
                ip_masq: cli.ip_masq,
                fully_random_disable: cli.ip_masq_fully_random_disable,
                forward_rules: cli.iptables_forward_rules,
                resync: Duration::from_secs(cli.iptables_resync),
                blackhole_route: cli.ip_blackhole_route,
            },
            healthz: (cli.healthz_port > 0)
                .then(|| SocketAddr::new(cli.healthz_ip, cli.healthz_port)),
            dataplane: cli.dataplane,
            ebpf: EbpfOptions {
                pin_root: cli.bpf_pin_path.clone(),
                fast_path: cli.ebpf_fast_path,
                flow_cache: cli.ebpf_flow_cache,
                flow_refresh_ms: cli.ebpf_flow_refresh_ms,
                peer_check: cli.vxlan_peer_check != Some(false),
                max_peers: cli.ebpf_max_peers,
                vtep_macs: Default::default(),
            },
            vxlan_peer_check: cli.vxlan_peer_check,
        })
    }

    /// `"etcd"` or `"kube"`, for the start-up log.
    pub fn manager_name(&self) -> &'static str {
        match self.manager {
            ManagerConfig::Etcd(_) => "etcd",
            ManagerConfig::Kube(_) => "kube",
        }
    }

    /// Checks the network configuration against the flags and decides the backend. Runs
    /// after the config is fetched and before the interface is chosen or anything is
    /// created, so a refused combination leaves the host untouched.
    pub fn plan(&self, net: &NetworkConfig) -> Result<Plan, Error> {
        if !net.enable_ipv4 && !net.enable_ipv6 {
            return Err(Error::Conflict {
                flag: "EnableIPv4",
                reason: "EnableIPv4 and EnableIPv6 are both false; enable at least one".into(),
            });
        }
        if matches!(self.manager, ManagerConfig::Etcd(_)) && !net.enable_ipv4 {
            return Err(Error::Conflict {
                flag: "EnableIPv4",
                reason: "the etcd subnet manager needs EnableIPv4: true (etcd subnet keys \
                         always have an IPv4 part); IPv6-only networks need --kube-subnet-mgr"
                    .into(),
            });
        }
        Ok(match (&net.backend, self.dataplane) {
            (BackendConfig::HostGw, Dataplane::Ebpf) => {
                return Err(Error::Conflict {
                    flag: "--dataplane=ebpf",
                    reason: "the eBPF datapath is a VXLAN datapath but the network config \
                             selects the host-gw backend (use --dataplane=auto or kernel)"
                        .into(),
                });
            }
            (BackendConfig::HostGw, _) if self.ebpf.fast_path => {
                return Err(Error::Conflict {
                    flag: "--ebpf-fast-path",
                    reason: "the fast path is part of the eBPF VXLAN datapath but the network \
                             config selects the host-gw backend"
                        .into(),
                });
            }
            (BackendConfig::HostGw, _) => Plan::HostGw,
            (BackendConfig::Vxlan(vx), Dataplane::Kernel) => Plan::Kernel(vx.clone()),
            // Either family (IPv6-only included): the programs ride on whichever VXLAN
            // devices the network has.
            (BackendConfig::Vxlan(vx), Dataplane::Ebpf) => Plan::Ebpf(vx.clone()),
            (BackendConfig::Vxlan(vx), Dataplane::Auto) => Plan::EbpfOrKernel(vx.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_from_args_env(
            std::iter::once("flanneld").chain(args.iter().copied()),
            |_| None,
        )
        .unwrap()
    }

    fn config(args: &[&str]) -> Result<Config, Error> {
        Config::from_cli(&cli(args), PreviousSubnets::default())
    }

    fn net(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    const VX: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    const HOSTGW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
    const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#;

    #[test]
    fn empty_strings_are_unset() {
        let c = config(&["--etcd-keyfile=", "--etcd-username="]).unwrap();
        let ManagerConfig::Etcd(e) = &c.manager else {
            panic!("etcd by default")
        };
        assert_eq!((e.keyfile.as_ref(), e.username.as_ref()), (None, None));
        let c = config(&["--etcd-keyfile=/k", "--etcd-password=p"]).unwrap();
        let ManagerConfig::Etcd(e) = &c.manager else {
            panic!()
        };
        assert_eq!(e.keyfile, Some(PathBuf::from("/k")));
        assert_eq!(e.password.as_deref(), Some("p"));
        let c = config(&["--kube-subnet-mgr", "--kubeconfig-file="]).unwrap();
        let ManagerConfig::Kube(k) = &c.manager else {
            panic!()
        };
        assert_eq!(
            (k.client.api_url.as_ref(), k.client.kubeconfig.as_ref()),
            (None, None)
        );
        assert_eq!(c.healthz, None);
        assert!(config(&["--healthz-port=8081"]).unwrap().healthz.is_some());
    }

    #[test]
    fn refused_command_lines_name_the_flag() {
        for (args, flag) in [
            (&["--etcd-endpoints=,"][..], "--etcd-endpoints"),
            (
                &["--kube-subnet-mgr", "--kube-annotation-prefix=a/b/c"],
                "--kube-annotation-prefix",
            ),
            (
                &["--ebpf-fast-path", "--dataplane=kernel"],
                "--ebpf-fast-path",
            ),
        ] {
            let err = config(args).unwrap_err().to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn plans_and_refused_combinations() {
        let c = |dp: &str| config(&[dp]).unwrap();
        let vx = VxlanConfig::default();
        assert_eq!(
            c("--dataplane=auto").plan(&net(VX)).unwrap(),
            Plan::EbpfOrKernel(vx.clone())
        );
        assert_eq!(
            c("--dataplane=kernel").plan(&net(VX)).unwrap(),
            Plan::Kernel(vx.clone())
        );
        assert_eq!(
            c("--dataplane=ebpf").plan(&net(VX)).unwrap(),
            Plan::Ebpf(vx)
        );
        assert_eq!(
            c("--dataplane=auto").plan(&net(HOSTGW)).unwrap(),
            Plan::HostGw
        );
        assert_eq!(
            c("--dataplane=kernel").plan(&net(HOSTGW)).unwrap(),
            Plan::HostGw
        );
        for (args, json, needles) in [
            (
                &["--dataplane=ebpf"][..],
                HOSTGW,
                &["--dataplane=ebpf", "host-gw"][..],
            ),
            (
                &["--ebpf-fast-path"],
                HOSTGW,
                &["--ebpf-fast-path", "host-gw"],
            ),
            (&["--dataplane=ebpf"], V6_ONLY, &["EnableIPv4", "etcd"]),
            (
                &[],
                r#"{"EnableIPv4":false,"Backend":{"Type":"vxlan"}}"#,
                &["EnableIPv4", "EnableIPv6"],
            ),
        ] {
            let err = config(args)
                .unwrap()
                .plan(&net(json))
                .unwrap_err()
                .to_string();
            for n in needles {
                assert!(err.contains(n), "{args:?} {json}: {err}");
            }
        }
        // IPv6-only is a kube-manager feature.
        let kube = config(&["--kube-subnet-mgr", "--dataplane=kernel"]).unwrap();
        assert!(matches!(kube.plan(&net(V6_ONLY)), Ok(Plan::Kernel(_))));
        // The eBPF datapath rides on flannel-v6.<VNI> alone: auto tries it, an explicit
        // ebpf is accepted.
        let auto = config(&["--kube-subnet-mgr", "--dataplane=auto"]).unwrap();
        assert_eq!(
            auto.plan(&net(V6_ONLY)).unwrap(),
            Plan::EbpfOrKernel(VxlanConfig::default())
        );
        let ebpf = config(&["--kube-subnet-mgr", "--dataplane=ebpf"]).unwrap();
        assert_eq!(
            ebpf.plan(&net(V6_ONLY)).unwrap(),
            Plan::Ebpf(VxlanConfig::default())
        );
        // An IPv6-only host-gw network needs no eBPF at all.
        let hostgw6 = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"host-gw"}}"#;
        assert_eq!(auto.plan(&net(hostgw6)).unwrap(), Plan::HostGw);
    }
}

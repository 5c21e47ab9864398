//! Hosts running `flanneld --kube-subnet-mgr` against the in-test API server
//! ([`crate::kube_api`]), which listens on the underlay so every host reaches it.

use std::{path::PathBuf, process::Stdio, time::Duration};

use crate::{
    cluster::flanneld_bin,
    kube_api::KubeApi,
    netns::{ChildGuard, Host, NetNs, Underlay, wait_until},
};

/// The annotation prefix flannel uses by default.
pub const P: &str = "flannel.alpha.coreos.com/";
/// Where the API server listens on the underlay.
pub const API_IP: &str = "198.18.0.254";
/// Where [`KubeBench::new_ipv6`]'s API server listens on the IPv6 underlay.
pub const API_IP6: &str = "fd00:198::fe";

/// A bpffs pin directory, removed on drop. flanneld deliberately leaves its pins (maps and
/// tcx links) behind on exit so a restart is hitless; a test must not.
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// One running agent. Fields drop in order: the process stops first, then its pins and
/// files go.
pub struct KubeAgent {
    /// The flanneld process.
    pub child: ChildGuard,
    /// Its pin directory (`--bpf-pin-path`).
    pub pins: PinDir,
    /// Its files: net-conf.json, subnet.env, flanneld.log.
    pub dir: tempfile::TempDir,
}

impl KubeAgent {
    /// Path of its `subnet.env`.
    pub fn subnet_env(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("flanneld.log")).unwrap_or_default()
    }

    /// The `FLANNEL_MTU` it wrote.
    pub fn mtu(&self) -> u32 {
        let text = std::fs::read_to_string(self.subnet_env()).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("FLANNEL_MTU="))
            .expect("FLANNEL_MTU line")
            .parse()
            .expect("FLANNEL_MTU is a number")
    }
}

/// Start flanneld in `host` as node `node` on `dataplane` (`kernel`, `ebpf`), with
/// `extra` arguments after the defaults (a repeated flag: the last one wins).
pub fn start_agent(
    host: &NetNs,
    node: &str,
    api: &KubeApi,
    dataplane: &str,
    extra: &[&str],
) -> KubeAgent {
    start_agent_with(
        host,
        node,
        api,
        dataplane,
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#,
        extra,
    )
}

/// [`start_agent`] with `net_conf` as its `net-conf.json`.
pub fn start_agent_with(
    host: &NetNs,
    node: &str,
    api: &KubeApi,
    dataplane: &str,
    net_conf_json: &str,
    extra: &[&str],
) -> KubeAgent {
    let dir = tempfile::tempdir().expect("temp dir");
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(&net_conf, net_conf_json).expect("write net-conf.json");
    let log = std::fs::File::create(dir.path().join("flanneld.log")).expect("log file");
    let pins = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/flannel-test-{}",
        host.name()
    )));
    let child = host
        .command(flanneld_bin().to_str().expect("UTF-8 path"))
        .args([
            "--kube-subnet-mgr".to_owned(),
            format!("--kube-api-url={}", api.url()),
            format!("--net-config-path={}", net_conf.display()),
            format!("--subnet-file={}", dir.path().join("subnet.env").display()),
            "--iface=eth0".to_owned(),
            format!("--dataplane={dataplane}"),
            format!("--bpf-pin-path={}", pins.0.display()),
            "--log-level=flannel_agent=debug,info".to_owned(),
        ])
        .args(extra)
        .env("NODE_NAME", node)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn flanneld");
    KubeAgent {
        child: ChildGuard::new(child),
        pins,
        dir,
    }
}

/// One ping with a one-second deadline.
pub fn ping(from: &NetNs, to: std::net::Ipv4Addr) -> bool {
    from.run(&format!("ping -c 1 -W 1 {to}")).status.success()
}

/// The API server, reachable from every host at [`API_IP`] on the underlay. Fields drop in
/// order: server, then underlay, then the server's runtime.
pub struct KubeBench {
    /// The API server.
    pub api: KubeApi,
    /// The underlay bridge the hosts attach to.
    pub underlay: Underlay,
    rt: tokio::runtime::Runtime,
}

impl KubeBench {
    /// An underlay with the API server on it.
    pub fn new() -> Self {
        Self::on(API_IP.parse().expect("static address"))
    }

    /// An underlay with the API server on its IPv6 address [`API_IP6`], for hosts with
    /// no IPv4 at all.
    pub fn new_ipv6() -> Self {
        Self::on(API_IP6.parse().expect("static address"))
    }

    fn on(ip: std::net::IpAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let underlay = Underlay::new();
        let (len, flags) = if ip.is_ipv4() {
            (15, "")
        } else {
            (64, " nodad")
        };
        underlay
            .ns
            .sh(&format!("ip addr add {ip}/{len} dev br0{flags}"));
        let listener = underlay
            .ns
            .enter(move || std::net::TcpListener::bind((ip, 0)).expect("bind on underlay"));
        let api = {
            let _guard = rt.enter();
            KubeApi::start_on(listener)
        };
        Self { api, underlay, rt }
    }

    /// Stop the API server (its port refuses connections, open watches end), keeping its
    /// objects.
    pub fn stop_api(&mut self) {
        let _guard = self.rt.enter();
        self.api.stop();
    }

    /// Serve again on the same address, with the objects (and history) it had.
    pub fn resume_api(&mut self) {
        let addr = self.api.addr();
        let listener = self
            .underlay
            .ns
            .enter(move || std::net::TcpListener::bind(addr).expect("rebind the API address"));
        let _guard = self.rt.enter();
        self.api.resume_on(listener);
    }
}

impl Default for KubeBench {
    fn default() -> Self {
        Self::new()
    }
}

/// Wait (30 s) until every agent wrote its `subnet.env`; panics with their logs if not.
pub fn wait_for_subnet_env(agents: &[&KubeAgent]) {
    let up = wait_until(Duration::from_secs(30), || {
        agents.iter().all(|a| a.subnet_env().exists())
    });
    assert!(
        up,
        "agents did not write subnet.env\n{}",
        agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("--- agent {}:\n{}\n", i + 1, a.log()))
            .collect::<String>()
    );
}

/// Nodes `h1`…`hN` on `bench`'s API server, node `h<i>` with pod CIDR [`pod_subnet4`]`(i)`,
/// and a host namespace for each (host `i` at `host_ip(i)`). A test annotates the nodes
/// or prepares the hosts here, before [`start_kube_agents`].
pub fn kube_hosts<const N: usize>(bench: &mut KubeBench) -> [Host; N] {
    std::array::from_fn(|i| {
        let i = u8::try_from(i + 1).expect("few hosts");
        bench
            .api
            .add_node(&format!("h{i}"), &[&pod_subnet4(i).to_string()]);
        bench.underlay.add_host(i)
    })
}

/// Start the agent of each of [`kube_hosts`]' hosts, in order (the `i`th is node
/// `h<i>`), with its `--dataplane` and extra flags; wait until all wrote `subnet.env`,
/// then give each host one pod at its agent's MTU.
pub fn start_kube_agents<const N: usize>(
    api: &KubeApi,
    hosts: [(&mut Host, &str, &[&str]); N],
) -> [KubeAgent; N] {
    let mut started = Vec::with_capacity(N);
    for (i, (host, dataplane, extra)) in hosts.into_iter().enumerate() {
        let agent = start_agent(&host.ns, &format!("h{}", i + 1), api, dataplane, extra);
        started.push((host, agent));
    }
    wait_for_subnet_env(&started.iter().map(|(_, a)| a).collect::<Vec<_>>());
    for (i, (host, agent)) in started.iter_mut().enumerate() {
        let cidr = pod_subnet4(u8::try_from(i + 1).expect("few hosts"));
        host.add_pods(cidr, agent.mtu(), 1);
    }
    let agents: Vec<KubeAgent> = started.into_iter().map(|(_, a)| a).collect();
    agents
        .try_into()
        .unwrap_or_else(|_| unreachable!("one agent per host"))
}

/// The port agents started with [`HEALTHZ`] serve `/readyz` on, on their own loopback.
pub const HEALTHZ_PORT: u16 = 18081;
/// Flags for an agent's health server on [`HEALTHZ_PORT`].
pub const HEALTHZ: [&str; 2] = ["--healthz-ip=127.0.0.1", "--healthz-port=18081"];

/// The agent in `ns`'s answer to `GET /readyz` (status line first), or the error.
pub fn readyz(ns: &NetNs) -> String {
    use std::io::{Read, Write};
    ns.enter(|| {
        let mut s = std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, HEALTHZ_PORT))?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        std::io::Result::Ok(out)
    })
    .unwrap_or_else(|e| format!("error: {e}"))
}

/// Whether the agent in `ns` answers `/readyz` with 200.
pub fn is_ready(ns: &NetNs) -> bool {
    readyz(ns).starts_with("HTTP/1.1 200")
}

/// Which address families a [`KubeCluster`]'s hosts, nodes and pods have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// IPv6 only: node `h<i>` has the pod CIDR [`pod_subnet6`]`(i)` alone and the hosts no
    /// IPv4 address at all (the API server is on the IPv6 underlay too).
    Ipv6Only,
    /// Both families: pod CIDRs [`pod_subnet4`]`(i)` and [`pod_subnet6`]`(i)`.
    DualStack,
}

/// Node `h<i>`'s IPv4 pod CIDR: `10.244.<i>.0/24`.
pub fn pod_subnet4(i: u8) -> ipnetwork::Ipv4Network {
    ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::new(10, 244, i, 0), 24).expect("valid")
}

/// Node `h<i>`'s IPv6 pod CIDR: `fd00:10:244:<i>::/64`.
pub fn pod_subnet6(i: u8) -> ipnetwork::Ipv6Network {
    let net = std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(i), 0, 0, 0, 0);
    ipnetwork::Ipv6Network::new(net, 64).expect("valid")
}

/// A kube-mode cluster on one underlay: host `i` (1-based) is node `h<i>` of the in-test
/// API server, with the [`Stack`]'s pod CIDRs and underlay addresses ([`host_ip`],
/// [`host_ip6`]), and runs one agent. Built in steps ([`KubeCluster::hosts`], then
/// [`KubeCluster::start_agents`], then [`KubeCluster::add_pods`]) so a test can change a
/// node or a host in between; [`KubeCluster::start`] does all three. Fields drop in
/// order: the agents stop first, then the pods and hosts go, then the API server and the
/// underlay.
///
/// [`host_ip`]: crate::netns::host_ip
/// [`host_ip6`]: crate::netns::host_ip6
pub struct KubeCluster {
    /// One agent per host, in host order (empty until [`KubeCluster::start_agents`]).
    pub agents: Vec<KubeAgent>,
    /// The hosts, in order (host `i` at index `i - 1`).
    pub hosts: Vec<crate::netns::Host>,
    /// The API server and the underlay.
    pub bench: KubeBench,
    stack: Stack,
}

impl KubeCluster {
    /// `n` hosts and their Node objects (pod CIDRs, `InternalIP` addresses as the kubelet
    /// reports them), no agent yet.
    pub fn hosts(n: u8, stack: Stack) -> Self {
        use crate::netns::{host_ip, host_ip6};
        let mut bench = match stack {
            Stack::Ipv6Only => KubeBench::new_ipv6(),
            Stack::DualStack => KubeBench::new(),
        };
        let mut hosts = Vec::new();
        for i in 1..=n {
            let name = format!("h{i}");
            let (v4, v6) = (host_ip(i).to_string(), host_ip6(i).to_string());
            let (s4, s6) = (pod_subnet4(i).to_string(), pod_subnet6(i).to_string());
            match stack {
                Stack::Ipv6Only => {
                    bench.api.add_node(&name, &[&s6]);
                    bench.api.set_addresses(&name, &[("InternalIP", &v6)]);
                }
                Stack::DualStack => {
                    bench.api.add_node(&name, &[&s4, &s6]);
                    bench
                        .api
                        .set_addresses(&name, &[("InternalIP", &v4), ("InternalIP", &v6)]);
                }
            }
            let mut h = bench.underlay.add_host(i);
            h.add_ipv6(i);
            if stack == Stack::Ipv6Only {
                h.ns.sh("ip -4 addr flush dev eth0");
                assert!(h.ns.sh("ip -4 -o addr show scope global").trim().is_empty());
            }
            hosts.push(h);
        }
        Self {
            agents: Vec::new(),
            hosts,
            bench,
            stack,
        }
    }

    /// Start one agent per host with `net_conf`: host `i` on `dataplane(i)` with the
    /// [`HEALTHZ`] flags and `extra(i)` after them; then wait until each wrote its
    /// `subnet.env`.
    pub fn start_agents(
        &mut self,
        net_conf: &str,
        dataplane: impl Fn(u8) -> &'static str,
        extra: impl Fn(u8) -> Vec<String>,
    ) {
        for (i, h) in (1u8..).zip(&self.hosts) {
            let extra = extra(i);
            let args: Vec<&str> = HEALTHZ
                .iter()
                .copied()
                .chain(extra.iter().map(String::as_str))
                .collect();
            self.agents.push(start_agent_with(
                &h.ns,
                &format!("h{i}"),
                &self.bench.api,
                dataplane(i),
                net_conf,
                &args,
            ));
        }
        wait_for_subnet_env(&self.agent_refs());
    }

    /// `count` pods behind every host at its agent's MTU: IPv6 only, or both families.
    pub fn add_pods(&mut self, count: usize) {
        for ((i, h), a) in (1u8..).zip(&mut self.hosts).zip(&self.agents) {
            match self.stack {
                Stack::Ipv6Only => h.add_pods_v6_only(pod_subnet6(i), a.mtu(), count),
                Stack::DualStack => {
                    h.add_pods(pod_subnet4(i), a.mtu(), count);
                    h.add_pod_ipv6(pod_subnet6(i));
                }
            }
        }
    }

    /// [`hosts`](Self::hosts), [`start_agents`](Self::start_agents) and two pods per host.
    pub fn start(
        n: u8,
        stack: Stack,
        net_conf: &str,
        dataplane: impl Fn(u8) -> &'static str,
        extra: impl Fn(u8) -> Vec<String>,
    ) -> Self {
        let mut c = Self::hosts(n, stack);
        c.start_agents(net_conf, dataplane, extra);
        c.add_pods(2);
        c
    }

    /// The agents, borrowed.
    pub fn agent_refs(&self) -> Vec<&KubeAgent> {
        self.agents.iter().collect()
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("--- agent {}:\n{}\n", i + 1, a.log()))
            .collect()
    }

    /// Host `host`'s (1-based) pin layout, to open its agent's maps.
    pub fn pin_layout(&self, host: u8) -> flannel_agent::backend::ebpf::PinLayout {
        flannel_agent::backend::ebpf::PinLayout::new(&self.agents[usize::from(host) - 1].pins.0)
    }

    /// iperf3 for `seconds` over IPv6 from host `from`'s first pod to host `to`'s first
    /// pod (1-based); bytes received.
    pub fn iperf6(&self, from: u8, to: u8, seconds: u32) -> u64 {
        let server = &self.hosts[usize::from(to) - 1].pods[0];
        let addr = server.ip6.expect("pod has an IPv6 address").to_string();
        let _srv = server
            .ns
            .spawn_server("iperf3", &["-s", "-1", "-B", &addr], 5201);
        let out = self.hosts[usize::from(from) - 1].pods[0].ns.sh(&format!(
            "iperf3 -6 -c {addr} -t {seconds} -J --connect-timeout 3000"
        ));
        let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
        v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0)
    }
}

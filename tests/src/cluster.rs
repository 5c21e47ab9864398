//! A small flannel cluster for end-to-end tests: one real etcd, N host namespaces on a
//! shared underlay, one real `flanneld` per host (inside its namespace), and pods behind
//! each host's `cni0` once its `subnet.env` exists.
//!
//! etcd runs in the root namespace on 127.0.0.1 (the shared [`EtcdServer`] harness); each
//! host reaches it through an in-process relay listening on the host namespace's own
//! 127.0.0.1 (the listening socket is created inside the namespace, the outbound one in
//! the root namespace), so no link or address is added to the root namespace.
//!
//! The agent binary is `<target dir>/debug/flanneld` (or `$FLANNELD_BIN`): build it first
//! with `cargo build -p flannel-agent --bin flanneld` (`cargo xtask test` and CI do).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::{
    etcd::{EtcdCluster, EtcdServer},
    netns::{ChildGuard, Host, NetNs, Underlay, wait_until},
};

/// upstream's default etcd prefix.
pub const PREFIX: &str = "/coreos.com/network";

/// Path of the `flanneld` binary under test.
pub fn flanneld_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLANNELD_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let bin = target.join("debug/flanneld");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!(
            "{} not found: run `cargo build -p flannel-agent --bin flanneld` first (or set FLANNELD_BIN)",
            bin.display()
        )
    });
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flannel-agent/src");
    if newest_mtime(&src).is_some_and(|t| t > built) {
        eprintln!(
            "warning: {} is older than flannel-agent/src; testing a stale agent \
             (run `cargo build -p flannel-agent --bin flanneld`)",
            bin.display()
        );
    }
    bin
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            if meta.is_dir() {
                newest_mtime(&e.path())
            } else {
                meta.modified().ok()
            }
        })
        .max()
}

/// Relays TCP connections from `127.0.0.1:<port>` inside a namespace to the same port on
/// the root namespace's loopback. Stops accepting when dropped.
struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn new(ns: &NetNs, port: u16) -> Self {
        let listener = ns
            .enter(move || TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
            .unwrap_or_else(|e| panic!("relay bind 127.0.0.1:{port} in {}: {e}", ns.name()));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // This thread stays in the root namespace: its outbound connects reach etcd.
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inside, _)) => {
                        let _ = inside.set_nonblocking(false);
                        if let Ok(outside) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                            pipe(inside, outside);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    std::thread::spawn(move || copy(a, b2));
    std::thread::spawn(move || copy(b, a2));
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One host of the cluster: its namespace and pods, its agent, and what the agent wrote.
pub struct Node {
    /// Agent process (None while stopped). Declared first: stopped before the namespace goes.
    pub agent: Option<ChildGuard>,
    /// Keeps the etcd relays of this host alive (one per etcd member).
    _relays: Vec<Relay>,
    /// The host namespace and its pods.
    pub host: Host,
    /// Where the agent writes `subnet.env`.
    pub subnet_file: PathBuf,
    /// The agent's log file (stderr).
    pub log_file: PathBuf,
    args: Vec<String>,
}

/// What `subnet.env` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`.
    pub network: Ipv4Network,
    /// `FLANNEL_SUBNET` as a network (the file has the gateway address, `.1/24`).
    pub subnet: Ipv4Network,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: bool,
    /// `FLANNEL_IPV6_NETWORK` (dual stack).
    pub ipv6_network: Option<Ipv6Network>,
    /// `FLANNEL_IPV6_SUBNET` as a network (dual stack).
    pub ipv6_subnet: Option<Ipv6Network>,
}

impl Node {
    /// Start (or restart) the agent.
    pub fn start(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .expect("agent log file");
        let child = self
            .host
            .ns
            .command(&flanneld_bin().to_string_lossy())
            .args(&self.args)
            // `--log-level` in the node's arguments wins over this default.
            .env(
                "RUST_LOG",
                if self.args.iter().any(|a| a.starts_with("--log-level")) {
                    ""
                } else {
                    "info"
                },
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn flanneld");
        self.agent = Some(ChildGuard::new(child));
    }

    /// The agent's command-line arguments (to run `flanneld inspect`/`cleanup` alike).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// SIGKILL the agent (a crash: nothing is cleaned up).
    pub fn kill(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    /// SIGTERM the agent and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop(libc::SIGTERM, Duration::from_secs(5));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Parse `subnet.env`, if the agent wrote it.
    pub fn subnet_env(&self) -> Option<SubnetEnv> {
        use flannel_agent::wire::subnet_env::{Dialect, SubnetEnv as Wire};
        let text = std::fs::read_to_string(&self.subnet_file).ok()?;
        let env = Wire::parse(&text, Dialect::Strict).ok()?;
        Some(SubnetEnv {
            network: env.network()?,
            subnet: env.subnet?,
            mtu: env.mtu?,
            ipmasq: env.ip_masq?,
            ipv6_network: env.ipv6_network(),
            ipv6_subnet: env.ipv6_subnet,
        })
    }

    /// Wait for `subnet.env` (written once the lease is held and the datapath is set up).
    pub fn wait_subnet_env(&mut self, timeout: Duration) -> SubnetEnv {
        let mut env = None;
        let mut exited = false;
        let ok = wait_until(timeout, || {
            env = self.subnet_env();
            exited = !self.agent.as_mut().is_some_and(ChildGuard::running);
            env.is_some() || exited
        });
        assert!(
            !exited || env.is_some(),
            "flanneld in {} exited; log:\n{}",
            self.host.ns.name(),
            self.log()
        );
        assert!(
            ok,
            "no subnet.env from {} after {timeout:?}; log:\n{}",
            self.host.ns.name(),
            self.log()
        );
        env.expect("checked")
    }
}

/// The cluster.
pub struct Cluster {
    /// Hosts, in order (host `i` has underlay address `198.18.0.<i+1>`).
    pub nodes: Vec<Node>,
    /// The underlay (kept for attaching more namespaces, e.g. an "outside" one).
    pub underlay: Underlay,
    /// etcd (the first member, when there are several).
    pub etcd: EtcdServer,
    /// The other members of a multi-member etcd cluster (empty for a single etcd).
    pub etcd_others: Vec<EtcdServer>,
    /// Per-test scratch directory (subnet.env files, logs).
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// etcd with `net_conf` at `<prefix>/config`, `hosts` host namespaces, and an agent
    /// started in each with `--iface=eth0` plus `extra_args`.
    pub fn start(hosts: u8, net_conf: &str, extra_args: &[&str]) -> Self {
        Self::start_each(hosts, net_conf, |_| {
            extra_args.iter().map(|s| (*s).to_owned()).collect()
        })
    }

    /// Like [`Cluster::start`], with each host's extra arguments from `args(i)` (`i` is
    /// 1-based, the host's underlay index): for mixed clusters (eBPF and kernel hosts).
    pub fn start_each(hosts: u8, net_conf: &str, args_for: impl Fn(u8) -> Vec<String>) -> Self {
        Self::start_with_etcd(hosts, 1, net_conf, args_for)
    }

    /// Like [`Cluster::start_each`] on an etcd cluster of `members` members; every agent
    /// gets all of them in `--etcd-endpoints`, in member order.
    pub fn start_with_etcd(
        hosts: u8,
        members: usize,
        net_conf: &str,
        args_for: impl Fn(u8) -> Vec<String>,
    ) -> Self {
        let mut cluster = Self::prepare_with_etcd(hosts, members, net_conf, args_for);
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster
    }

    /// Like [`Cluster::start_each`], but no agent is started yet ([`Node::start`] does):
    /// for tests that fill etcd first.
    pub fn prepare_each(hosts: u8, net_conf: &str, args_for: impl Fn(u8) -> Vec<String>) -> Self {
        Self::prepare_with_etcd(hosts, 1, net_conf, args_for)
    }

    /// [`Cluster::start_with_etcd`] without starting the agents.
    pub fn prepare_with_etcd(
        hosts: u8,
        members: usize,
        net_conf: &str,
        args_for: impl Fn(u8) -> Vec<String>,
    ) -> Self {
        let mut servers = if members == 1 {
            vec![EtcdServer::start().expect("start etcd")]
        } else {
            EtcdCluster::start(members)
                .expect("start etcd cluster")
                .members
        };
        let ports: Vec<u16> = servers.iter().map(EtcdServer::client_port).collect();
        let etcd = servers.remove(0);
        let mut cluster = Self {
            nodes: Vec::new(),
            underlay: Underlay::new(),
            etcd,
            etcd_others: servers,
            dir: tempfile::Builder::new()
                .prefix("flannel-e2e-")
                .tempdir()
                .expect("tempdir"),
        };
        cluster.etcd_put(&format!("{PREFIX}/config"), net_conf);
        for i in 1..=hosts {
            let host = cluster.underlay.add_host(i);
            let relays = ports.iter().map(|p| Relay::new(&host.ns, *p)).collect();
            let subnet_file = cluster.dir.path().join(format!("h{i}-subnet.env"));
            let log_file = cluster.dir.path().join(format!("h{i}-flanneld.log"));
            let endpoints: Vec<String> = ports
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect();
            let mut args = vec![
                format!("--etcd-endpoints={}", endpoints.join(",")),
                format!("--etcd-prefix={PREFIX}"),
                "--iface=eth0".to_owned(),
                format!("--subnet-file={}", subnet_file.display()),
            ];
            args.extend(args_for(i));
            cluster.nodes.push(Node {
                agent: None,
                _relays: relays,
                host,
                subnet_file,
                log_file,
                args,
            });
        }
        cluster
    }

    /// Wait for every agent's `subnet.env`, then give each host `pods` pods in its subnet
    /// with the MTU it reports. Returns the envs.
    pub fn add_pods(&mut self, pods: usize) -> Vec<SubnetEnv> {
        let mut envs = Vec::new();
        for n in &mut self.nodes {
            let env = n.wait_subnet_env(Duration::from_secs(30));
            n.host.add_pods(env.subnet, env.mtu, pods);
            envs.push(env);
        }
        envs
    }

    /// Run an etcd-client operation on a private runtime (root namespace).
    fn etcd<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = R>,
    {
        // Every member still running: a test may have killed some.
        let endpoints: Vec<String> = std::iter::once(&self.etcd)
            .chain(&self.etcd_others)
            .filter(|m| m.is_running_now())
            .map(EtcdServer::endpoint)
            .collect();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let client = etcd_client::Client::connect(endpoints, None)
                    .await
                    .expect("etcd connect");
                f(client).await
            })
    }

    /// Put `value` at `key`, giving up after a second (a put stuck behind a member whose
    /// leader just died waits out etcd's own 7 s request timeout); whether it was written.
    pub fn try_etcd_put(&self, key: &str, value: &str) -> bool {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.etcd(|mut c| async move {
            matches!(
                tokio::time::timeout(Duration::from_secs(1), c.put(k, v, None)).await,
                Ok(Ok(_))
            )
        })
    }

    /// Put `value` at `key`.
    pub fn etcd_put(&self, key: &str, value: &str) {
        let (k, v) = (key.to_owned(), value.to_owned());
        self.etcd(|mut c| async move { c.put(k, v, None).await.expect("etcd put") });
    }

    /// Put many keys fast: transactions of 128 puts (etcd's default `--max-txn-ops`).
    pub fn etcd_put_many(&self, kvs: Vec<(String, String)>) {
        self.etcd(|mut c| async move {
            for chunk in kvs.chunks(128) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.as_str(), None))
                    .collect();
                c.txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .expect("etcd txn");
            }
        });
    }

    /// Delete `key`; returns how many keys were deleted.
    pub fn etcd_delete(&self, key: &str) -> i64 {
        let k = key.to_owned();
        self.etcd(|mut c| async move { c.delete(k, None).await.expect("etcd delete").deleted() })
    }

    /// The etcd key of a lease: `<prefix>/subnets/10.244.7.0-24`.
    pub fn lease_key(subnet: Ipv4Network) -> String {
        format!("{PREFIX}/subnets/{}-{}", subnet.network(), subnet.prefix())
    }

    /// Value of `key`, if present.
    pub fn etcd_get(&self, key: &str) -> Option<String> {
        let k = key.to_owned();
        self.etcd(|mut c| async move {
            let resp = c.get(k, None).await.expect("etcd get");
            resp.kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        })
    }

    /// A dual-stack cluster of `hosts` hosts (IPv6 underlay too), agents running, two pods
    /// per host with both families; returns the cluster and each host's `subnet.env`.
    pub fn start_dual_stack(
        hosts: u8,
        conf: &str,
        args: impl Fn(u8) -> Vec<String>,
    ) -> (Self, Vec<SubnetEnv>) {
        let mut c = Self::prepare_each(hosts, conf, args);
        c.add_ipv6_underlay();
        for n in &mut c.nodes {
            n.start();
        }
        let envs = c.add_pods(2);
        c.add_pod_ipv6(&envs);
        (c, envs)
    }

    /// Dual stack: give every host its IPv6 underlay address (before the agents start).
    pub fn add_ipv6_underlay(&mut self) {
        for (i, n) in self.nodes.iter_mut().enumerate() {
            n.host.add_ipv6(u8::try_from(i + 1).expect("few hosts"));
        }
    }

    /// Dual stack: after [`Cluster::add_pods`], give every pod its IPv6 address from its
    /// host's `FLANNEL_IPV6_SUBNET`. Returns the IPv6 subnets in host order.
    pub fn add_pod_ipv6(&mut self, envs: &[SubnetEnv]) -> Vec<Ipv6Network> {
        let mut out = Vec::new();
        for (n, env) in self.nodes.iter_mut().zip(envs) {
            let sn6 = env.ipv6_subnet.expect("FLANNEL_IPV6_SUBNET in subnet.env");
            n.host.add_pod_ipv6(sn6);
            out.push(sn6);
        }
        out
    }

    /// Like [`Cluster::assert_all_pods_reach_each_other`], over IPv6.
    pub fn assert_all_pods_reach_each_other_v6(&self) {
        let pods: Vec<(&NetNs, Ipv6Addr)> = self
            .nodes
            .iter()
            .flat_map(|n| n.host.pods.iter())
            .map(|p| (&p.ns, p.ip6.expect("pod has an IPv6 address")))
            .collect();
        for (from, _) in &pods {
            for (_, to) in &pods {
                let ok = wait_until(Duration::from_secs(15), || {
                    from.run(&format!("ping -6 -c 1 -W 1 {to}"))
                        .status
                        .success()
                });
                assert!(ok, "{} cannot reach {to}\n{}", from.name(), self.logs());
            }
        }
    }

    /// Every pod of every host with its address.
    pub fn pods(&self) -> Vec<(&NetNs, Ipv4Addr)> {
        self.nodes
            .iter()
            .flat_map(|n| n.host.pods.iter().map(|p| (&p.ns, p.ip)))
            .collect()
    }

    /// Wait until every pod answers a ping from every pod (agents program peers as their
    /// leases appear, so the first rounds may race them); panics with the logs otherwise.
    pub fn assert_all_pods_reach_each_other(&self) {
        let pods = self.pods();
        for (from, _) in &pods {
            for (_, to) in &pods {
                let ok = wait_until(Duration::from_secs(15), || {
                    from.run(&format!("ping -c 1 -W 1 {to}")).status.success()
                });
                assert!(ok, "{} cannot reach {to}\n{}", from.name(), self.logs());
            }
        }
    }

    /// iperf3 for `seconds` from host `from`'s first pod to host `to`'s first pod (0-based
    /// host indices); bytes received.
    pub fn iperf(&self, from: usize, to: usize, seconds: u32) -> u64 {
        self.iperf_to(from, to, seconds, false)
    }

    /// [`Cluster::iperf`] to the server pod's IPv6 address.
    pub fn iperf6(&self, from: usize, to: usize, seconds: u32) -> u64 {
        self.iperf_to(from, to, seconds, true)
    }

    fn iperf_to(&self, from: usize, to: usize, seconds: u32, ipv6: bool) -> u64 {
        let server = &self.nodes[to].host.pods[0];
        let addr = if ipv6 {
            server.ip6.expect("pod has an IPv6 address").to_string()
        } else {
            server.ip.to_string()
        };
        let _srv = server
            .ns
            .spawn_server("iperf3", &["-s", "-1", "-B", &addr], 5201);
        let out = self.nodes[from].host.pods[0].ns.sh(&format!(
            "iperf3 -c {addr} -t {seconds} -J --connect-timeout 3000"
        ));
        let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
        v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0)
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("==== {} ====\n{}", n.host.ns.name(), n.log()))
            .collect()
    }
}

/// A dual-stack net-conf: 10.244.0.0/16 with /24s and fd00:10:244::/56 with /64s.
pub fn dual_stack_net_conf(backend: &str) -> String {
    format!(
        r#"{{"Network":"10.244.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64,"Backend":{backend}}}"#
    )
}

/// Build `flanneld`'s net-conf JSON for a VXLAN or host-gw cluster on 10.244.0.0/16.
pub fn net_conf(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{backend}}}"#)
}

/// Everything `ip`/`bridge` know about a namespace, for failure messages.
pub fn dump(ns: &NetNs) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .args([
            "sh",
            "-c",
            "ip -d link; ip addr; ip route; ip neigh; bridge fdb show",
        ])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// bpffs pin roots for the agents of one test (or the demo), one per host, removed on
/// drop. The agents never unpin on exit (that is what makes restarts hitless), so whoever
/// starts them cleans up: declare this before the [`Cluster`], so the agents stop first.
pub struct BpfPins(Vec<PathBuf>);

impl BpfPins {
    /// Pin roots for hosts `1..=hosts` under `/sys/fs/bpf/flannel-<role>-<unique tag>-h<i>`.
    pub fn new(role: &str, hosts: u8) -> Self {
        let tag = crate::netns::unique_tag();
        Self(
            (1..=hosts)
                .map(|i| PathBuf::from(format!("/sys/fs/bpf/flannel-{role}-{tag}-h{i}")))
                .collect(),
        )
    }

    /// Host `host`'s (1-based) pin root.
    pub fn root(&self, host: u8) -> &Path {
        &self.0[usize::from(host) - 1]
    }

    /// `--bpf-pin-path=…` for host `host`.
    pub fn arg(&self, host: u8) -> String {
        format!("--bpf-pin-path={}", self.root(host).display())
    }

    /// Host `host`'s pin layout, to open its maps.
    pub fn layout(&self, host: u8) -> flannel_agent::backend::ebpf::PinLayout {
        flannel_agent::backend::ebpf::PinLayout::new(self.root(host))
    }
}

impl Drop for BpfPins {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

//! `cargo xtask bench --control-plane`: how fast one agent programs a big cluster.
//!
//! For N peer leases (upstream lease JSON written straight into a real etcd under
//! `<prefix>/subnets/…`, in batched transactions; network 10.0.0.0/8 in /24s) and each
//! datapath (eBPF maps, kernel VXLAN objects), one release `flanneld` is started in a fresh
//! host namespace and measured: time from its start to all N peers programmed (polled in
//! the pinned maps or over netlink), peak and final RSS (VmHWM, VmRSS), CPU seconds
//! (utime + stime), and at N = 5,000 the latency of single lease events (a new lease
//! written, or in kube mode a new Node created → its peer programmed; paced over more
//! than one resync period). In etcd mode an event is timed from when etcd delivers it to
//! a watcher (the bench watches the prefix beside the agent), so etcd's own commit time
//! (its WAL fsync: 2–3 ms here, once in a few hundred writes 25 ms or more) is not counted
//! as the agent's; the time from the write is printed too. Prints a table and a verdict
//! per target.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use flannel_agent::{backend::ebpf::PinLayout, net::netlink::Netlink};
use flannel_e2e::{
    cluster::{BpfPins, Cluster},
    netns::NetNs,
};
use ipnetwork::Ipv4Network;

const NETWORK: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const DEADLINE: Duration = Duration::from_secs(120);
const LATENCY_SAMPLES: usize = 60;
/// Between single lease events: 60 × 200 ms spans more than the agent's 10 s resync
/// period, so some events arrive while a resync of all N peers runs, as they would in a
/// live cluster.
const LATENCY_GAP: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Datapath {
    Ebpf,
    Kernel,
}

impl Datapath {
    fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "eBPF maps",
            Self::Kernel => "kernel objects",
        }
    }
}

/// Where the leases live.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Store {
    Etcd,
    /// Node objects in the in-test API server.
    Kube,
}

struct Row {
    n: usize,
    store: Store,
    datapath: Datapath,
    programmed: Option<Duration>,
    hwm_kib: u64,
    rss_kib: u64,
    cpu: Duration,
    latency: Option<(Duration, Duration)>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<usize> = match args.iter().position(|a| a == "--sizes") {
        Some(i) => args[i + 1]
            .split(',')
            .map(|s| s.parse().expect("--sizes N,N,…"))
            .collect(),
        None => vec![100, 1_000, 5_000, 10_000],
    };
    if !flannel_e2e::require_root() {
        return;
    }
    let bin = flannel_e2e::cluster::flanneld_bin();
    eprintln!("agent: {}", bin.display());
    let kube_sizes: Vec<usize> = match args.iter().position(|a| a == "--kube-sizes") {
        Some(i) => args[i + 1]
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("--kube-sizes N,N,…"))
            .collect(),
        None => vec![1_000, 5_000],
    };
    let datapaths: Vec<Datapath> = match args.iter().position(|a| a == "--datapath") {
        Some(i) if args[i + 1] == "kernel" => vec![Datapath::Kernel],
        Some(i) if args[i + 1] == "ebpf" => vec![Datapath::Ebpf],
        _ => vec![Datapath::Ebpf, Datapath::Kernel],
    };
    let mut runs: Vec<(usize, Store, Datapath)> = Vec::new();
    for &n in &sizes {
        for &dp in &datapaths {
            runs.push((n, Store::Etcd, dp));
        }
    }
    for &n in &kube_sizes {
        runs.push((n, Store::Kube, Datapath::Ebpf));
    }
    let mut rows = Vec::new();
    for (n, store, dp) in runs {
        {
            let row = match store {
                Store::Etcd => run(n, dp, n == 5_000),
                Store::Kube => run_kube(n, dp, n == 5_000),
            };
            eprintln!(
                "N={n} {store:?} {}: programmed {:?}, HWM {} KiB, RSS {} KiB, CPU {:?}, latency {:?}",
                dp.name(),
                row.programmed,
                row.hwm_kib,
                row.rss_kib,
                row.cpu,
                row.latency
            );
            rows.push(row);
        }
    }
    report(&rows);
}

/// The i-th peer (0-based): subnet 10.x.y.0/24 (skipping 10.0.0.0/24), underlay
/// 198.19.x.y, MAC 0e:00:00:…
fn peer(i: usize) -> (Ipv4Network, Ipv4Addr, String) {
    let k = u32::try_from(i + 1).expect("small");
    let subnet = Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 | (k << 8)), 24).expect("subnet");
    let ip = Ipv4Addr::new(198, 19, (k >> 8) as u8, k as u8);
    let mac = format!(
        "0e:00:00:{:02x}:{:02x}:{:02x}",
        k >> 16 & 0xff,
        k >> 8 & 0xff,
        k & 0xff
    );
    (subnet, ip, mac)
}

fn lease_kv(i: usize) -> (String, String) {
    let (subnet, ip, mac) = peer(i);
    (
        Cluster::lease_key(subnet),
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        ),
    )
}

fn run(n: usize, dp: Datapath, latency: bool) -> Row {
    let pins = BpfPins::new("cpbench", 1);
    let mut args = vec![
        "--log-level=warn".to_owned(),
        format!(
            "--dataplane={}",
            if dp == Datapath::Ebpf {
                "ebpf"
            } else {
                "kernel"
            }
        ),
    ];
    if dp == Datapath::Ebpf {
        args.push(pins.arg(1));
    }
    let mut cluster = Cluster::prepare_each(1, NETWORK, |_| args.clone());
    let wrote = Instant::now();
    cluster.etcd_put_many((0..n).map(lease_kv).collect());
    eprintln!("N={n}: {n} leases written in {:?}", wrote.elapsed());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut etcd = rt
        .block_on(etcd_client::Client::connect(
            [cluster.etcd.endpoint()],
            None,
        ))
        .expect("etcd connect");
    let started = Instant::now();
    cluster.nodes[0].start();
    let node = &cluster.nodes[0];
    let pid = node.agent.as_ref().expect("agent").pid();
    let poller = Poller {
        dp,
        layout: pins.layout(1),
        ns: &node.host.ns,
    };
    let last = peer(n - 1).0;
    let programmed = poller
        .wait(last, started + DEADLINE)
        .and_then(|_| poller.wait_count(n, started + DEADLINE))
        .map(|at| at - started);
    // CPU spent getting there (the latency samples below come on top).
    let cpu = cpu_time(pid);
    if programmed.is_none() {
        eprintln!(
            "N={n} {}: not all programmed within {DEADLINE:?}\n{}",
            dp.name(),
            tail(&node.log(), 20)
        );
    }
    let mut samples = Vec::new();
    let mut from_write = Vec::new();
    if latency && programmed.is_some() {
        let delivered = watch_deliveries(cluster.etcd.endpoint());
        // The agent leased a free subnet of the network at random: never write a "new
        // peer" onto it (the agent would rightly restore its own lease instead).
        let own = node.subnet_env().map(|e| e.subnet);
        let fresh = (n..).filter(|i| Some(peer(*i).0) != own);
        for i in fresh.take(LATENCY_SAMPLES) {
            let (k, v) = lease_kv(i);
            let t0 = Instant::now();
            rt.block_on(etcd.put(k.clone(), v, None)).expect("etcd put");
            let deadline = Instant::now() + Duration::from_secs(10);
            let seen = loop {
                match delivered.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok((key, at)) if key == k => break Some(at),
                    Ok(_) => {}
                    Err(_) => break None,
                }
            };
            match (
                seen,
                poller.wait(peer(i).0, Instant::now() + Duration::from_secs(10)),
            ) {
                (Some(seen), Some(at)) => {
                    samples.push(at.saturating_duration_since(seen));
                    from_write.push(at - t0);
                }
                (None, _) => eprintln!("lease {i}: the bench's own watch did not deliver it"),
                (_, None) => eprintln!(
                    "lease {i} not programmed within 10 s\n{}",
                    tail(&node.log(), 20)
                ),
            }
            std::thread::sleep(LATENCY_GAP);
        }
    }
    let (hwm_kib, rss_kib) = memory(pid);
    let latency = percentiles(&mut samples);
    if let Some((p50, p99)) = percentiles(&mut from_write) {
        eprintln!(
            "N={n} {}: from the write (etcd's commit included): p50 {p50:?}, p99 {p99:?}, max {:?}",
            dp.name(),
            from_write.last().expect("samples")
        );
    }
    drop(poller);
    drop(cluster);
    Row {
        n,
        store: Store::Etcd,
        datapath: dp,
        programmed,
        hwm_kib,
        rss_kib,
        cpu,
        latency,
    }
}

/// N peer nodes (annotated as upstream's kube subnet manager writes them) and this host's
/// node in the in-test API server, reachable on the underlay; the agent in kube mode.
fn run_kube(n: usize, dp: Datapath, latency: bool) -> Row {
    use flannel_e2e::{kube_api::KubeApi, netns::Underlay};
    const API_IP: &str = "198.18.0.254";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let pins = BpfPins::new("cpbench-kube", 1);
    let mut underlay = Underlay::new();
    underlay.ns.sh(&format!("ip addr add {API_IP}/15 dev br0"));
    let listener = underlay
        .ns
        .enter(|| std::net::TcpListener::bind(format!("{API_IP}:0")).expect("bind"));
    let api = {
        let _guard = rt.enter();
        KubeApi::start_on(listener)
    };
    api.add_node("h1", &["10.0.0.0/24"]);
    let wrote = Instant::now();
    for i in 0..n {
        api.put_node(&peer_node(i));
    }
    eprintln!("N={n}: {n} nodes created in {:?}", wrote.elapsed());
    let host = underlay.add_host(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(&net_conf, NETWORK).expect("net-conf");
    let log_path = dir.path().join("flanneld.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let started = Instant::now();
    let child = host
        .ns
        .command(&flannel_e2e::cluster::flanneld_bin().to_string_lossy())
        .args([
            "--kube-subnet-mgr".to_owned(),
            format!("--kube-api-url={}", api.url()),
            format!("--net-config-path={}", net_conf.display()),
            format!("--subnet-file={}", dir.path().join("subnet.env").display()),
            "--iface=eth0".to_owned(),
            format!(
                "--dataplane={}",
                if dp == Datapath::Ebpf {
                    "ebpf"
                } else {
                    "kernel"
                }
            ),
            pins.arg(1),
            "--log-level=warn".to_owned(),
        ])
        .env("NODE_NAME", "h1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn flanneld");
    let agent = flannel_e2e::netns::ChildGuard::new(child);
    let pid = agent.pid();
    let poller = Poller {
        dp,
        layout: pins.layout(1),
        ns: &host.ns,
    };
    let programmed = poller
        .wait(peer(n - 1).0, started + DEADLINE)
        .and_then(|_| poller.wait_count(n, started + DEADLINE))
        .map(|at| at - started);
    if programmed.is_none() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        eprintln!(
            "N={n} kube {}: not all programmed\n{}",
            dp.name(),
            tail(&text, 20)
        );
    }
    let cpu = cpu_time(pid);
    let mut samples = Vec::new();
    if latency && programmed.is_some() {
        for s in 0..LATENCY_SAMPLES {
            let i = n + s;
            let t0 = Instant::now();
            api.put_node(&peer_node(i));
            match poller.wait(peer(i).0, Instant::now() + Duration::from_secs(10)) {
                Some(at) => samples.push(at - t0),
                None => eprintln!("node {i} not programmed within 10 s"),
            }
            std::thread::sleep(LATENCY_GAP);
        }
    }
    let (hwm_kib, rss_kib) = memory(pid);
    let latency = percentiles(&mut samples);
    drop(poller);
    drop(agent);
    drop(host);
    drop(api);
    Row {
        n,
        store: Store::Kube,
        datapath: dp,
        programmed,
        hwm_kib,
        rss_kib,
        cpu,
        latency,
    }
}

/// The i-th peer as a Node with upstream's flannel annotations.
fn peer_node(i: usize) -> k8s_openapi::api::core::v1::Node {
    let (subnet, ip, mac) = peer(i);
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("peer-{i}"),
            "uid": format!("uid-peer-{i}"),
            "annotations": {
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                "flannel.alpha.coreos.com/public-ip": ip.to_string(),
            },
        },
        "spec": { "podCIDR": subnet.to_string(), "podCIDRs": [subnet.to_string()] },
    }))
    .expect("node JSON")
}

/// Each put under the lease prefix with the moment etcd delivered it to a watcher of the
/// prefix (a thread of its own, ending with etcd or with the receiver).
fn watch_deliveries(endpoint: String) -> std::sync::mpsc::Receiver<(String, Instant)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut client = etcd_client::Client::connect([endpoint], None)
                .await
                .expect("etcd connect");
            let prefix = Cluster::lease_key(peer(0).0);
            let prefix = &prefix[..=prefix.rfind('/').expect("a key path")];
            let mut stream = client
                .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
                .await
                .expect("etcd watch");
            let _ = ready_tx.send(());
            while let Ok(Some(resp)) = stream.message().await {
                let now = Instant::now();
                for ev in resp.events() {
                    if ev.event_type() != etcd_client::EventType::Put {
                        continue;
                    }
                    let Some(key) = ev.kv().and_then(|kv| kv.key_str().ok()) else {
                        continue;
                    };
                    if tx.send((key.to_owned(), now)).is_err() {
                        return;
                    }
                }
            }
        });
    });
    ready_rx.recv().expect("the bench's etcd watch started");
    rx
}

/// (p50, p99) of `samples`, sorted in place; `None` when there are none.
fn percentiles(samples: &mut [Duration]) -> Option<(Duration, Duration)> {
    samples.sort_unstable();
    (!samples.is_empty()).then(|| (percentile(samples, 50), percentile(samples, 99)))
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[((sorted.len() * p).div_ceil(100)).clamp(1, sorted.len()) - 1]
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Watches the agent's datapath from outside: the pinned routes map, or the kernel's
/// routes, neighbours and FDB inside the host namespace.
struct Poller<'a> {
    dp: Datapath,
    layout: PinLayout,
    ns: &'a NetNs,
}

impl Poller<'_> {
    /// When `subnet` became programmed (polled every millisecond), or `None` by `deadline`.
    fn wait(&self, subnet: Ipv4Network, deadline: Instant) -> Option<Instant> {
        match self.dp {
            Datapath::Ebpf => {
                let key = Key::new(
                    flannel_common::wire::V4_MAPPED_PREFIX + u32::from(subnet.prefix()),
                    flannel_common::wire::v4_mapped(subnet.network().octets()),
                );
                let mut maps = None;
                while Instant::now() < deadline {
                    if maps.is_none() {
                        maps = flannel_agent::backend::ebpf::open_pinned(&self.layout).ok();
                    }
                    if let Some(m) = &maps
                        && m.routes.get(&key, 0).is_ok()
                    {
                        return Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                None
            }
            Datapath::Kernel => self.ns.block_on(move || async move {
                let nl = Netlink::connect().expect("netlink");
                let mut dev = None;
                while Instant::now() < deadline {
                    if dev.is_none() {
                        dev = nl
                            .link_by_name("flannel.1")
                            .await
                            .ok()
                            .flatten()
                            .map(|l| l.header.index);
                    }
                    // `route get` answers with the address looked up, so the device tells.
                    if let Ok(r) = nl.route_get_v4(subnet.network()).await
                        && dev.is_some()
                        && flannel_agent::net::netlink::route_oif(&r) == dev
                    {
                        return Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                None
            }),
        }
    }

    /// When at least `n` peers were fully programmed (polled every 50 ms: a full read).
    fn wait_count(&self, n: usize, deadline: Instant) -> Option<Instant> {
        while Instant::now() < deadline {
            if self.count() >= n {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn count(&self) -> usize {
        match self.dp {
            Datapath::Ebpf => flannel_agent::backend::ebpf::open_pinned(&self.layout)
                .ok()
                .and_then(|m| {
                    let routes = m.current_routes().ok()?.len();
                    let peers = m.current_peers().ok()?.len();
                    Some(routes.min(peers))
                })
                .unwrap_or(0),
            Datapath::Kernel => self.ns.block_on(|| async {
                use netlink_packet_route::AddressFamily;
                let nl = Netlink::connect().expect("netlink");
                let Ok(Some(dev)) = nl.link_by_name("flannel.1").await else {
                    return 0;
                };
                let index = dev.header.index;
                let routes = nl
                    .routes_v4()
                    .await
                    .map(|r| {
                        r.iter()
                            .filter(|r| flannel_agent::net::netlink::route_oif(r) == Some(index))
                            .count()
                    })
                    .unwrap_or(0);
                let neigh = nl
                    .neighbours(AddressFamily::Inet, index)
                    .await
                    .map_or(0, |v| v.len());
                let fdb = nl
                    .neighbours(AddressFamily::Bridge, index)
                    .await
                    .map_or(0, |v| {
                        v.iter()
                            .filter(|n| flannel_agent::net::netlink::neigh_dst(n).is_some())
                            .count()
                    });
                routes.min(neigh).min(fdb)
            }),
        }
    }
}

/// (VmHWM, VmRSS) in KiB; where the resident memory is (heap and stacks vs pages of the
/// binary and libraries) goes to stderr, to tell the agent's data from its code.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    eprintln!(
        "  agent memory: RssAnon {} KiB, RssFile {} KiB, RssShmem {} KiB",
        field("RssAnon:"),
        field("RssFile:"),
        field("RssShmem:")
    );
    (field("VmHWM:"), field("VmRSS:"))
}

/// utime + stime of the process.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn report(rows: &[Row]) {
    println!();
    println!(
        "| N | leases in | datapath | all peers programmed | RSS peak / final | agent CPU | one lease event p50 / p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.1} / {:.1} MiB | {:.2} s | {} |",
            group(r.n),
            match r.store {
                Store::Etcd => "etcd",
                Store::Kube => "kube API",
            },
            r.datapath.name(),
            r.programmed
                .map_or_else(|| "not within 120 s".to_owned(), ms),
            r.hwm_kib as f64 / 1024.0,
            r.rss_kib as f64 / 1024.0,
            r.cpu.as_secs_f64(),
            r.latency
                .map_or_else(|| "–".to_owned(), |(a, b)| format!("{} / {}", ms(a), ms(b))),
        );
    }
    println!();
    let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
    if let Some(r) = rows.iter().find(|r| r.n == 5_000 && r.store == Store::Kube) {
        let p99 = r.latency.map(|(_, p)| p);
        println!(
            "{}: one Node change at 5,000 nodes programmed p99 < 50 ms, kube API, {} (measured {})",
            verdict(p99.is_some_and(|p| p < Duration::from_millis(50))),
            r.datapath.name(),
            p99.map_or("none".to_owned(), ms)
        );
    }
    let find = |n: usize, dp: Datapath| {
        rows.iter()
            .find(|r| r.n == n && r.datapath == dp && r.store == Store::Etcd)
    };
    if let Some(r) = find(5_000, Datapath::Ebpf) {
        let t = r.programmed;
        println!(
            "{}: 5,000 peers programmed in the eBPF maps < 1 s (measured {})",
            verdict(t.is_some_and(|t| t < Duration::from_secs(1))),
            t.map_or("never".to_owned(), ms)
        );
    }
    if let Some(r) = find(5_000, Datapath::Kernel) {
        let t = r.programmed;
        println!(
            "{}: 5,000 peers programmed as kernel objects < 3 s (measured {})",
            verdict(t.is_some_and(|t| t < Duration::from_secs(3))),
            t.map_or("never".to_owned(), ms)
        );
    }
    for dp in [Datapath::Ebpf, Datapath::Kernel] {
        if let Some(r) = find(5_000, dp) {
            let mib = r.hwm_kib as f64 / 1024.0;
            println!(
                "{}: agent RSS < 40 MiB at 5,000 peers, {} (peak {mib:.1} MiB)",
                verdict(mib < 40.0),
                dp.name()
            );
            let p99 = r.latency.map(|(_, p)| p);
            println!(
                "{}: one lease event at 5,000 peers programmed p99 < 50 ms, {} (measured {})",
                verdict(p99.is_some_and(|p| p < Duration::from_millis(50))),
                dp.name(),
                p99.map_or("none".to_owned(), ms)
            );
        }
        if let (Some(a), Some(b)) = (find(1_000, dp), find(10_000, dp))
            && let (Some(ta), Some(tb)) = (a.programmed, b.programmed)
        {
            let slope = (tb.as_secs_f64() / ta.as_secs_f64()).ln() / 10f64.ln();
            println!(
                "{}: growth 1,000 → 10,000 close to linear, {} (log-log slope {slope:.2})",
                verdict(slope < 1.3),
                dp.name()
            );
        }
    }
}

fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

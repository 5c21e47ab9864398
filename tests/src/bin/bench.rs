//! `cargo xtask bench`: the eBPF VXLAN datapath against the kernel VXLAN device, host-gw
//! (no encapsulation) and the bare underlay (the ceiling), side by side in one run, rounds
//! interleaved so the noise of a shared machine hits every mode alike.
//!
//! Each mode is two host namespaces on one veth with a pod behind each, every host set up
//! as a real flannel node is (pod behind `cni0`, kube-proxy's, the kubelet's and flanneld's
//! iptables rules, so conntrack runs: `twohost::Node::Kubernetes`, `kube_node`), the same
//! for every mode. Per round and mode: iperf3 one stream, iperf3 four streams,
//! and a TCP request/response ping-pong (1-byte messages, TCP_NODELAY) for p50/p99, measured
//! with both ends spinning on non-blocking sockets so VM wake-up latency doesn't dominate.
//!
//! The IPv6 modes (`ebpf6`, `kernel6`) are pod to pod over IPv6 between two real agents of
//! a dual-stack cluster (`cluster::Cluster`), the eBPF datapath against the kernel's
//! `flannel-v6.<VNI>`.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpListener, TcpStream},
    time::Instant,
};

use flannel_e2e::{
    cluster::{BpfPins, Cluster},
    netns::NetNs,
    twohost::{
        Carrier, EbpfHost, FastPath, Host, Node, attach_ebpf_with, counters, iperf, try_sh,
        two_hosts_on,
    },
};

const RR_PORT: u16 = 7007;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("rr-server") => {
            pin_to(args.get(2));
            rr_server()
        }
        Some("rr-client") => {
            pin_to(args.get(4));
            rr_client(&args[2], args[3].parse().expect("transaction count"))
        }
        _ => bench(&args[1..]),
    }
}

/// Run this process on CPU `cpu` only, if one is given: with `--placement per-host` the
/// ping-pong's ends sit where iperf3's do (`-A 0,1`), each on its host's receive CPU, so
/// the scheduler never moves a spinning end onto the other host's CPU mid-run.
fn pin_to(cpu: Option<&String>) {
    let Some(cpu) = cpu else { return };
    let cpu: usize = cpu.parse().expect("CPU number");
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "pin to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// Echo one byte per message until the peer closes, for every connection.
fn rr_server() {
    // `::` takes IPv4 too (as mapped addresses).
    let listener = TcpListener::bind(("::", RR_PORT)).expect("bind rr server");
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        let _ = s.set_nodelay(true);
        let _ = s.set_nonblocking(true);
        let mut b = [0u8; 1];
        while spin_read(&mut s, &mut b) {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    }
}

/// `count` request/response transactions; prints p50 and p99 in microseconds.
fn rr_client(addr: &str, count: usize) {
    let mut s = TcpStream::connect((addr, RR_PORT)).expect("connect rr server");
    s.set_nodelay(true).expect("nodelay");
    s.set_nonblocking(true).expect("nonblocking");
    let mut lat = Vec::with_capacity(count);
    let mut b = [7u8; 1];
    // Warm up caches, ARP and conntrack before measuring.
    for _ in 0..200 {
        s.write_all(&b).expect("send");
        assert!(spin_read(&mut s, &mut b), "rr server went away");
    }
    for _ in 0..count {
        let t0 = Instant::now();
        s.write_all(&b).expect("send");
        assert!(spin_read(&mut s, &mut b), "rr server went away");
        lat.push(t0.elapsed().as_nanos() as f64 / 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    println!("{} {}", percentile(&lat, 0.50), percentile(&lat, 0.99));
}

/// Read one byte from a non-blocking socket by spinning: neither side ever sleeps, so the
/// round trip measures the datapath, not how fast a VM wakes an idle CPU. False on EOF or
/// error.
fn spin_read(s: &mut TcpStream, b: &mut [u8; 1]) -> bool {
    loop {
        match s.read(b) {
            Ok(1) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(_) => return false,
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ebpf,
    EbpfAllFlows,
    KernelVxlan,
    HostGw,
    Underlay,
    /// Pod to pod over IPv6 (IPv6 underlay), real agents in a dual-stack etcd cluster.
    Ebpf6,
    KernelVxlan6,
}

impl Mode {
    const ALL: [Mode; 7] = [
        Mode::Ebpf,
        Mode::EbpfAllFlows,
        Mode::KernelVxlan,
        Mode::HostGw,
        Mode::Underlay,
        Mode::Ebpf6,
        Mode::KernelVxlan6,
    ];
    /// What runs without `--modes`. Not the opt-in all-flows fast path: on a node with
    /// kube-proxy's rules its TCP connections never establish (likely: it delivers the SYN
    /// past conntrack, so the SYN-ACK crosses FORWARD as INVALID and `KUBE-FORWARD` drops
    /// it).
    const DEFAULT: [Mode; 6] = [
        Mode::Ebpf,
        Mode::KernelVxlan,
        Mode::HostGw,
        Mode::Underlay,
        Mode::Ebpf6,
        Mode::KernelVxlan6,
    ];
    /// The name `--modes` takes.
    fn flag(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::EbpfAllFlows => "all-flows",
            Mode::KernelVxlan => "kernel",
            Mode::HostGw => "host-gw",
            Mode::Underlay => "underlay",
            Mode::Ebpf6 => "ebpf6",
            Mode::KernelVxlan6 => "kernel6",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "eBPF VXLAN (default: per-flow fast path)",
            Mode::EbpfAllFlows => "eBPF VXLAN, all-flows fast path (opt-in, no netfilter)",
            Mode::KernelVxlan => "kernel VXLAN",
            Mode::HostGw => "host-gw",
            Mode::Underlay => "bare underlay",
            Mode::Ebpf6 => "IPv6: eBPF VXLAN (flanneld)",
            Mode::KernelVxlan6 => "IPv6: kernel VXLAN (flanneld)",
        }
    }
    fn fast_path(self) -> Option<FastPath> {
        match self {
            Mode::Ebpf => Some(FastPath::PerFlow),
            Mode::EbpfAllFlows => Some(FastPath::AllFlows),
            _ => None,
        }
    }
    /// The IPv6 modes run real agents (`--dataplane`), not hand-programmed hosts.
    fn agent_dataplane(self) -> Option<&'static str> {
        match self {
            Mode::Ebpf6 => Some("ebpf"),
            Mode::KernelVxlan6 => Some("kernel"),
            _ => None,
        }
    }
}

#[derive(Default, Clone)]
struct Samples {
    one: Vec<f64>,
    four: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// sys + softirq CPU seconds (machine-wide) per GB received, over both iperf3 runs of a
    /// round.
    cpu_per_gb: Vec<f64>,
}

/// One mode's two hosts.
enum Hosts {
    /// Hand-programmed as upstream programs the kernel (plus the eBPF loader): the IPv4
    /// modes.
    Pair {
        a: Host,
        b: Host,
        /// eBPF modes only: the agents' part of hosts a and b (declared before the pins,
        /// so they stop first).
        _agents: Vec<EbpfHost>,
    },
    /// A two-host dual-stack cluster of real agents: the IPv6 modes.
    Agents(Cluster),
}

struct Setup {
    hosts: Hosts,
    /// eBPF modes only: the pins of hosts a and b.
    pins: Option<BpfPins>,
}

impl Setup {
    /// Who talks to whom in `mode`: pod to pod (over IPv6 in the IPv6 modes), or host to
    /// host over the bare underlay.
    fn endpoints(&self, mode: Mode) -> (&NetNs, &NetNs, IpAddr) {
        match &self.hosts {
            Hosts::Pair { a, b, .. } if mode == Mode::Underlay => (&a.ns, &b.ns, b.underlay.into()),
            Hosts::Pair { a, b, .. } => (&a.pod, &b.pod, b.pod_ip().into()),
            Hosts::Agents(c) => {
                let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[1].host.pods[0]);
                (&a.ns, &b.ns, b.ip6.expect("pod IPv6").into())
            }
        }
    }

    /// Host A's namespace.
    fn host_a(&self) -> &NetNs {
        match &self.hosts {
            Hosts::Pair { a, .. } => &a.ns,
            Hosts::Agents(c) => &c.nodes[0].host.ns,
        }
    }
}

/// Two hosts with real agents (`--dataplane=<dataplane>`), dual stack, a pod on each
/// with both families.
fn agent_cluster(dataplane: &str, pins: Option<&BpfPins>, per_host: bool) -> Cluster {
    let conf = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#;
    let mut c = Cluster::prepare_each(2, conf, |i| {
        let mut args = vec![format!("--dataplane={dataplane}")];
        args.extend(pins.map(|p| p.arg(i)));
        args
    });
    c.add_ipv6_underlay();
    for n in &mut c.nodes {
        n.start();
    }
    let envs = c.add_pods(1);
    c.add_pod_ipv6(&envs);
    c.assert_all_pods_reach_each_other_v6();
    if per_host {
        for (cpu, n) in c.nodes.iter().enumerate() {
            n.host.ns.steer_receive_to("eth0", cpu);
        }
    }
    c
}

/// Machine-wide kernel CPU time (sys + softirq) in seconds, from /proc/stat.
fn kernel_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("cpu line");
    // cpu user nice system idle iowait irq softirq steal ...
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[2] + f[6]) / hz
}

/// An iperf3 run: Gbit/s, bytes received and the kernel CPU seconds it cost the machine.
fn measured_iperf(client: &NetNs, server: &NetNs, addr: IpAddr, args: &[&str]) -> (f64, f64, f64) {
    let before = kernel_cpu_seconds();
    let report = iperf(client, server, addr, args);
    let cpu = kernel_cpu_seconds() - before;
    let bytes = report["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or(0.0);
    (gbits(&report), bytes, cpu)
}

fn bench(args: &[String]) {
    let rounds: usize = flag(args, "--rounds").unwrap_or(7);
    let secs: u64 = flag(args, "--seconds").unwrap_or(5);
    let rr: usize = flag(args, "--transactions").unwrap_or(20_000);
    // The sender's congestion control, set per socket so the machine's sysctl does not
    // decide it: cubic, the kernel's default and what nodes run unless told otherwise.
    let cc: String = flag(args, "--cc").unwrap_or_else(|| "cubic".to_owned());
    // Where each host's receive work runs. `per-host`: host a's on CPU 0 (with the iperf3
    // client), host b's on CPU 1 (with the server), as on two real nodes. `shared`: where
    // the veth puts it, which is the sending CPU, so one CPU does both hosts' work.
    let placement: String = flag(args, "--placement").unwrap_or_else(|| "per-host".to_owned());
    let per_host = match placement.as_str() {
        "per-host" => true,
        "shared" => false,
        other => panic!("--placement: unknown value {other:?} (per-host, shared)"),
    };
    assert!(flannel_e2e::require_root(), "the benchmark needs root");

    let modes: Vec<Mode> = match flag::<String>(args, "--modes") {
        None => Mode::DEFAULT.to_vec(),
        Some(list) => list
            .split(',')
            .map(|f| {
                *Mode::ALL.iter().find(|m| m.flag() == f).unwrap_or_else(|| {
                    panic!(
                        "--modes: unknown mode {f:?} (ebpf, all-flows, kernel, host-gw, underlay)"
                    )
                })
            })
            .collect(),
    };

    let mut setups: Vec<(Mode, Setup)> = Vec::new();
    for &mode in &modes {
        if let Some(dataplane) = mode.agent_dataplane() {
            let pins = (dataplane == "ebpf").then(|| BpfPins::new("bench6", 2));
            let c = agent_cluster(dataplane, pins.as_ref(), per_host);
            setups.push((
                mode,
                Setup {
                    hosts: Hosts::Agents(c),
                    pins,
                },
            ));
            continue;
        }
        let carrier = if mode == Mode::HostGw {
            Carrier::HostGw
        } else {
            Carrier::Vxlan
        };
        let (a, b) = two_hosts_on(carrier, Node::Kubernetes);
        if per_host {
            a.steer_underlay_receive_to(0);
            b.steer_underlay_receive_to(1);
        }
        let mut agents = Vec::new();
        let pins = mode.fast_path().map(|fast| {
            let pins = BpfPins::new("bench", 2);
            agents.push(attach_ebpf_with(&a, &b, pins.root(1), fast));
            agents.push(attach_ebpf_with(&b, &a, pins.root(2), fast));
            pins
        });
        setups.push((
            mode,
            Setup {
                hosts: Hosts::Pair {
                    a,
                    b,
                    _agents: agents,
                },
                pins,
            },
        ));
    }
    let exe = std::env::current_exe().expect("own path");
    let mut results: Vec<(Mode, Samples)> =
        modes.iter().map(|m| (*m, Samples::default())).collect();

    for round in 0..rounds {
        // Rotate the order every round so no mode always runs first or last.
        for i in 0..setups.len() {
            let idx = (i + round) % setups.len();
            let (mode, s) = &setups[idx];
            let (client, server, addr) = s.endpoints(*mode);
            let t_arg = secs.to_string();
            let (one, bytes1, cpu1) = measured_iperf(
                client,
                server,
                addr,
                &["-t", &t_arg, "-O", "1", "-A", "0,1", "-C", &cc],
            );
            let (four, bytes4, cpu4) = measured_iperf(
                client,
                server,
                addr,
                &["-t", &t_arg, "-O", "1", "-P", "4", "-C", &cc],
            );
            let cpu_per_gb = (cpu1 + cpu4) / ((bytes1 + bytes4) / 1e9);
            let (p50, p99) = request_response(&exe, client, server, addr, rr, per_host);
            eprintln!(
                "round {}: {:<13} 1 stream {one:6.2} Gbit/s, 4 streams {four:6.2} Gbit/s, RR p50 {p50:6.1} µs p99 {p99:6.1} µs, {cpu_per_gb:.3} CPU-s/GB",
                round + 1,
                mode.name()
            );
            let r = &mut results.iter_mut().find(|(m, _)| m == mode).expect("mode").1;
            r.one.push(one);
            r.four.push(four);
            r.p50.push(p50);
            r.p99.push(p99);
            r.cpu_per_gb.push(cpu_per_gb);
        }
    }

    // What netfilter did on host A of each mode: proof that conntrack and the FORWARD
    // rules ran (and, for the eBPF modes, how much of the traffic skipped them).
    for (mode, s) in setups.iter().filter(|(m, _)| m.agent_dataplane().is_none()) {
        let a = s.host_a();
        let (_, ct) = try_sh(a, "cat /proc/sys/net/netfilter/nf_conntrack_count");
        let (_, fwd) = try_sh(
            a,
            "iptables -t filter -L KUBE-FORWARD -v -x -n | awk '/RELATED,ESTABLISHED/ {print $1}'",
        );
        let (_, invalid) = try_sh(
            a,
            "iptables -t filter -L KUBE-FORWARD -v -x -n | awk '/INVALID/ {print $1}'",
        );
        let (_, input) = try_sh(
            a,
            "iptables -t filter -L INPUT -v -x -n | awk '/KUBE-FIREWALL/ {print $1}'",
        );
        eprintln!(
            "{}: host A netfilter: {} conntrack entries; FORWARD accepted {} established packets, dropped {} INVALID; INPUT saw {} packets",
            mode.name(),
            ct.trim(),
            fwd.trim(),
            invalid.trim(),
            input.trim()
        );
    }
    for (mode, pins) in setups
        .iter()
        .filter_map(|(m, s)| s.pins.as_ref().map(|p| (m, p)))
    {
        for (host, root) in [("A (iperf3 client)", 1), ("B (iperf3 server)", 2)] {
            let c = counters(pins.root(root));
            let passes: Vec<_> = c.passes.iter().filter(|(_, v)| v.packets > 0).collect();
            // Packets and bytes per packet: a bulk flow's fast packets should be GSO
            // aggregates (tens of KB) in the data direction.
            let paths: Vec<_> = c
                .paths
                .iter()
                .filter(|(_, v)| v.packets > 0)
                .map(|(k, v)| format!("{k} {} ({} B/pkt)", v.packets, v.bytes / v.packets))
                .collect();
            eprintln!(
                "{}: host {host}: passed to the kernel {passes:?}; per-flow paths {}",
                mode.name(),
                paths.join(", ")
            );
        }
    }
    report(&results, rounds, secs, &cc, &placement);
}

fn gbits(report: &serde_json::Value) -> f64 {
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// The ping-pong between `client` and `server`; with `pinned`, the client on CPU 0 and
/// the server on CPU 1. Returns p50 and p99 in microseconds.
fn request_response(
    exe: &std::path::Path,
    client: &NetNs,
    server: &NetNs,
    addr: IpAddr,
    count: usize,
    pinned: bool,
) -> (f64, f64) {
    let exe = exe.to_string_lossy();
    let server_args: &[&str] = if pinned {
        &["rr-server", "1"]
    } else {
        &["rr-server"]
    };
    let _server = server.spawn_server(&exe, server_args, RR_PORT);
    let (addr, count) = (addr.to_string(), count.to_string());
    let mut client_args = vec!["rr-client", &addr, &count];
    if pinned {
        client_args.push("0");
    }
    let out = client
        .command(&exe)
        .args(&client_args)
        .output()
        .expect("rr client");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    (it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.1}–{max:.1}")
}

fn report(results: &[(Mode, Samples)], rounds: usize, secs: u64, cc: &str, placement: &str) {
    let m = |mode: Mode| results.iter().find(|(x, _)| *x == mode).map(|(_, s)| s);
    println!(
        "\n{rounds} interleaved rounds, iperf3 {secs} s per run; medians (min–max); CPU = sys + softirq seconds of the whole machine per GB received"
    );
    println!(
        "every host: pod behind cni0 (bridge plugin), iptables rules of kube-proxy ({} Services), the kubelet and flanneld, conntrack on; iperf3 sender congestion control {cc}; iperf3 client on CPU 0, server on CPU 1, receive placement {placement}{}\n",
        flannel_e2e::kube_node::SERVICES,
        if placement == "per-host" {
            " (RR client on CPU 0, server on CPU 1)"
        } else {
            ""
        }
    );
    if results.iter().any(|(m, _)| m.agent_dataplane().is_some()) {
        println!(
            "IPv6 modes: two flanneld hosts of a dual-stack etcd cluster (IPv6 underlay), pod behind cni0, flanneld's own rules only (no kube-proxy rules), conntrack on\n"
        );
    }
    println!("| mode | 1 stream Gbit/s | 4 streams Gbit/s | RR p50 µs | RR p99 µs | CPU-s/GB |");
    println!("|---|---|---|---|---|---|");
    for (mode, s) in results {
        println!(
            "| {} | {:.2} ({}) | {:.2} ({}) | {:.1} ({}) | {:.1} ({}) | {:.3} ({}) |",
            mode.name(),
            median(&s.one),
            spread(&s.one),
            median(&s.four),
            spread(&s.four),
            median(&s.p50),
            spread(&s.p50),
            median(&s.p99),
            spread(&s.p99),
            median(&s.cpu_per_gb),
            spread3(&s.cpu_per_gb),
        );
    }
    println!();
    println!("| ratio | 1 stream | 4 streams | RR p50 | RR p99 | CPU/GB |");
    println!("|---|---|---|---|---|---|");
    for (ours, mode) in [
        ("eBPF", Mode::Ebpf),
        ("eBPF all-flows", Mode::EbpfAllFlows),
        ("IPv6: eBPF", Mode::Ebpf6),
    ] {
        let Some(e) = m(mode) else { continue };
        let others: &[(&str, Mode)] = if mode == Mode::Ebpf6 {
            &[("kernel VXLAN", Mode::KernelVxlan6)]
        } else {
            &[
                ("kernel VXLAN", Mode::KernelVxlan),
                ("host-gw", Mode::HostGw),
                ("bare underlay", Mode::Underlay),
            ]
        };
        for &(name, other) in others {
            let Some(other) = m(other) else { continue };
            println!(
                "| {ours} / {name} | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
                ratio(&e.one, &other.one),
                ratio(&e.four, &other.four),
                ratio(&e.p50, &other.p50),
                ratio(&e.p99, &other.p99),
                ratio(&e.cpu_per_gb, &other.cpu_per_gb),
            );
        }
    }
    let (Some(e), Some(k), Some(h)) = (m(Mode::Ebpf), m(Mode::KernelVxlan), m(Mode::HostGw)) else {
        println!("\nno verdicts: they need the ebpf, kernel and host-gw modes");
        return;
    };
    println!("\nverdicts (default eBPF mode, medians):");
    let at_least = |what: &str, r: f64, target: f64| {
        let (word, by) = if r >= target {
            ("MET", r / target - 1.0)
        } else {
            ("MISSED", 1.0 - r / target)
        };
        println!(
            "  {word:6} {what}: {r:.2}× (target ≥ {target:.2}×, by {:.1} %)",
            by * 100.0
        );
    };
    let at_most = |what: &str, r: f64, target: f64| {
        let (word, by) = if r <= target {
            ("MET", 1.0 - r / target)
        } else {
            ("MISSED", r / target - 1.0)
        };
        println!(
            "  {word:6} {what}: {r:.2}× (target ≤ {target:.2}×, by {:.1} %)",
            by * 100.0
        );
    };
    at_least("1 stream vs kernel VXLAN", ratio(&e.one, &k.one), 1.15);
    at_least("4 streams vs kernel VXLAN", ratio(&e.four, &k.four), 1.15);
    at_least("1 stream vs host-gw", ratio(&e.one, &h.one), 0.95);
    at_least("4 streams vs host-gw", ratio(&e.four, &h.four), 0.95);
    at_most("RR p50 vs kernel VXLAN", ratio(&e.p50, &k.p50), 0.80);
    at_most("RR p99 vs kernel VXLAN", ratio(&e.p99, &k.p99), 0.80);
    at_most(
        "CPU per GB vs kernel VXLAN",
        ratio(&e.cpu_per_gb, &k.cpu_per_gb),
        0.85,
    );
}

fn ratio(a: &[f64], b: &[f64]) -> f64 {
    median(a) / median(b)
}

fn spread3(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.3}–{max:.3}")
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

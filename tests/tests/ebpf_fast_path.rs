//! The per-flow fast path (the default eBPF mode) end to end: which flows go fast, which
//! stay on the kernel path, and that netfilter, conntrack and the kernel's ICMP answers stay
//! truthful for both. Two hosts, both on our programs with the pod programs on the pod's
//! veth and the agent's conntrack helper running (`twohost::attach_ebpf`).

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use flannel_common::{Flow, FlowKey};
use flannel_e2e::{
    cluster::BpfPins,
    netns::NetNs,
    twohost::{
        EbpfHost, FLOW_REFRESH_MS, Host, attach_ebpf, counters, flows, iperf, try_sh, two_hosts,
    },
};

/// Two hosts, both on our programs, with the agents' part running.
fn two_ebpf_hosts(pins: &BpfPins) -> (Host, Host, [EbpfHost; 2]) {
    let (a, b) = two_hosts();
    let agents = [
        attach_ebpf(&a, &b, pins.root(1)),
        attach_ebpf(&b, &a, pins.root(2)),
    ];
    (a, b, agents)
}

/// The flows host `host` tracks on port `port` (either end), busiest first (iperf3 opens
/// a control connection next to its data connection).
fn flows_on_port(pins: &BpfPins, host: u8, port: u16) -> Vec<(FlowKey, Flow)> {
    let mut v: Vec<_> = flows(pins.root(host))
        .into_iter()
        .filter(|(k, _)| k.remote_port == port || k.pod_port == port)
        .collect();
    v.sort_by_key(|(_, f)| std::cmp::Reverse(f.fast_tx_packets + f.fast_rx_packets));
    v
}

/// The busiest flow on `port`.
fn flow_to_port(pins: &BpfPins, host: u8, port: u16) -> Option<(FlowKey, Flow)> {
    flows_on_port(pins, host, port).into_iter().next()
}

const SERVICE_IP: &str = "198.19.255.10";

/// A UDP echo server on `port` in `ns` for as long as the returned guard lives.
struct UdpEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    fn start(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn_thread(move || {
            let sock = UdpSocket::bind((addr, port)).expect("bind udp echo");
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            tx.send(()).expect("ready");
            let mut buf = [0u8; 2048];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv().expect("udp echo started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Send one datagram per `interval` for `duration` from `ns` to `to:port` on one socket
/// (one flow); returns how many echoes came back.
fn udp_ping_pong(
    ns: &NetNs,
    to: Ipv4Addr,
    port: u16,
    duration: Duration,
    interval: Duration,
) -> usize {
    ns.enter(move || {
        let sock = UdpSocket::bind(("0.0.0.0", 40_000 + port)).expect("bind");
        sock.connect((to, port)).expect("connect");
        sock.set_read_timeout(Some(interval.max(Duration::from_millis(50))))
            .expect("timeout");
        let (start, mut echoes, mut buf) = (Instant::now(), 0, [0u8; 64]);
        while start.elapsed() < duration {
            let sent = Instant::now();
            let _ = sock.send(b"ping");
            if sock.recv(&mut buf).is_ok() {
                echoes += 1;
            }
            if let Some(rest) = interval.checked_sub(sent.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        echoes
    })
}

#[test]
fn pod_to_pod_flows_go_fast_while_service_flows_stay_on_the_kernel_path() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    let service: Ipv4Addr = SERVICE_IP.parse().unwrap();
    for (what, dnat) in [
        (
            "iptables",
            format!(
                "iptables -t nat -A PREROUTING -d {SERVICE_IP}/32 -p tcp --dport 5201 -j DNAT --to-destination {}:5201",
                b.pod_ip()
            ),
        ),
        (
            "nftables",
            format!(
                "nft 'add table ip svc; add chain ip svc pre {{ type nat hook prerouting priority dstnat; }}; add rule ip svc pre ip daddr {SERVICE_IP} tcp dport 5201 dnat to {}:5201'",
                b.pod_ip()
            ),
        ),
    ] {
        a.ns.sh(&dnat);
        let before = counters(pins.root(1)).paths;
        // The Service flow (port 5201, through DNAT) and a plain pod-to-pod flow (port
        // 5202) at the same time, each for 3 s, in both directions (-R for the service).
        let (svc, direct) = std::thread::scope(|s| {
            let direct = s.spawn(|| iperf_on(&a.pod, &b.pod, b.pod_ip(), 5202, &["-t", "3"]));
            let svc = iperf(&a.pod, &b.pod, service, &["-t", "3", "-R"]);
            (svc, direct.join().expect("direct iperf"))
        });
        let svc_bytes = svc["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        let direct_bytes = direct["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            svc_bytes > 5_000_000,
            "{what} service: only {svc_bytes} bytes"
        );
        assert!(
            direct_bytes > 5_000_000,
            "{what} pod flow: only {direct_bytes} bytes"
        );

        let svc_flows = flows_on_port(&pins, 1, 5201);
        assert!(
            !svc_flows.is_empty(),
            "{what}: the Service backend's flows are tracked"
        );
        for (k, f) in &svc_flows {
            assert_eq!(
                (f.fast_tx_packets, f.fast_rx_packets),
                (0, 0),
                "{what}: the Service flow must stay on the kernel path: {k:?} {f:?}"
            );
        }
        let (_, pod_flow) = flow_to_port(&pins, 1, 5202).expect("pod flow tracked");
        assert!(
            pod_flow.fast_tx_packets > 100 && pod_flow.fast_rx_packets > 100,
            "{what}: the pod-to-pod flow must go fast both ways: {pod_flow:?}"
        );
        let after = counters(pins.root(1)).paths;
        let delta = |k: &str| after[k].packets - before[k].packets;
        assert!(
            delta("kernel_unrouted") > 100,
            "service packets to the ClusterIP: {after:?}"
        );
        assert!(
            delta("fast_tx") > 100 && delta("fast_rx") > 100,
            "{after:?}"
        );
        a.ns.sh("iptables -t nat -F PREROUTING; nft delete table ip svc 2>/dev/null; true");
    }
}

/// iperf3 server on `port` in `server`, client in `client`: the JSON report.
fn iperf_on(
    client: &NetNs,
    server: &NetNs,
    addr: Ipv4Addr,
    port: u16,
    args: &[&str],
) -> serde_json::Value {
    let port_s = port.to_string();
    let _server = server.spawn("iperf3", &["-s", "-1", "-p", &port_s]);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = try_sh(
        client,
        &format!("iperf3 -c {addr} -p {port} -J {}", args.join(" ")),
    );
    assert!(ok, "iperf3 client failed: {out}");
    serde_json::from_str(&out).expect("iperf3 JSON")
}

#[test]
fn a_udp_flow_goes_fast_and_a_later_drop_rule_stops_it_within_the_refresh_time() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    let _echo = UdpEcho::start(&b.pod, b.pod_ip(), 7100);
    let echoes = udp_ping_pong(
        &a.pod,
        b.pod_ip(),
        7100,
        Duration::from_secs(2),
        Duration::from_millis(5),
    );
    assert!(echoes > 100, "only {echoes} echoes");
    let (_, f) = flow_to_port(&pins, 1, 7100).expect("flow tracked");
    assert!(
        f.fast_tx_packets > 50 && f.fast_rx_packets > 50,
        "a bidirectional UDP flow goes fast: {f:?}"
    );
    // A drop rule on the receiving host, added while the flow is fast: the periodic
    // re-check takes the flow back to netfilter, which drops it.
    b.ns.sh(&format!(
        "iptables -I FORWARD -s {} -d {} -p udp -j DROP",
        a.pod_ip(),
        b.pod_ip()
    ));
    let settle = Duration::from_millis(u64::from(FLOW_REFRESH_MS) * 3);
    let _ = udp_ping_pong(&a.pod, b.pod_ip(), 7100, settle, Duration::from_millis(5));
    let later = udp_ping_pong(
        &a.pod,
        b.pod_ip(),
        7100,
        Duration::from_secs(2),
        Duration::from_millis(5),
    );
    assert_eq!(later, 0, "the DROP rule must stop the fast flow");
}

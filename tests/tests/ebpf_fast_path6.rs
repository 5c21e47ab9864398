//! The per-flow fast path over IPv6, end to end: two dual-stack hosts running the default
//! eBPF datapath (real agents, real etcd), pods with both families. What holds for IPv4
//! (`ebpf_fast_path`) must hold for IPv6: pod-to-pod flows go fast both ways, NATed
//! (Service) flows and flows policy drops never do, and a fast TCP flow whose programs
//! vanish carries on through the kernel path without a reset or an INVALID drop, which
//! needs the agent to have made its IPv6 conntrack entry liberal.
//!
//! Needs root and a built agent: `cargo build --bins`, then
//! `cargo test -p flannel-e2e --test ebpf_fast_path6`.

use std::{
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use flannel_agent::backend::ebpf::{Counters, addr_of};
use flannel_common::{Flow, FlowKey};
use flannel_e2e::{
    cluster::{BpfPins, Cluster, dual_stack_net_conf},
    netns::{NetNs, connect_from, listen_in, wait_until},
    require_root,
    twohost::{
        FLOW_REFRESH_MS, UdpEcho, assert_no_invalid_forward, count_invalid_forward, counters,
        df_udp_probe, flows, iperf, iperf_on,
    },
};

const SERVICE_IP6: &str = "fd00:198:ffff::10";

/// Two dual-stack vxlan hosts on the default eBPF datapath (per-flow fast path on).
fn two_fast_hosts(pins: &BpfPins) -> Cluster {
    let (c, _) = Cluster::start_dual_stack(2, &dual_stack_net_conf(r#"{"Type":"vxlan"}"#), |i| {
        vec!["--dataplane=ebpf".into(), pins.arg(i)]
    });
    c.assert_all_pods_reach_each_other_v6();
    c
}

/// Host `h`'s (0-based) first pod: its namespace and IPv6 address.
fn pod6(c: &Cluster, h: usize) -> (&NetNs, Ipv6Addr) {
    let p = &c.nodes[h].host.pods[0];
    (&p.ns, p.ip6.expect("pod has an IPv6 address"))
}

/// The IPv6 flows host `host` (1-based) tracks on `port` (either end), busiest first.
fn flows6_on_port(pins: &BpfPins, host: u8, port: u16) -> Vec<(FlowKey, Flow)> {
    let mut v: Vec<_> = flows(pins.root(host))
        .into_iter()
        .filter(|(k, _)| addr_of(k.pod).is_ipv6() && (k.remote_port == port || k.pod_port == port))
        .collect();
    v.sort_by_key(|(_, f)| std::cmp::Reverse(f.fast_tx_packets + f.fast_rx_packets));
    v
}

fn flow6_to_port(pins: &BpfPins, host: u8, port: u16) -> Option<(FlowKey, Flow)> {
    flows6_on_port(pins, host, port).into_iter().next()
}

/// Count (and drop) what conntrack calls INVALID in each host's forward path.
fn count_invalid(c: &Cluster) {
    for n in &c.nodes {
        count_invalid_forward(&n.host.ns);
    }
}

fn assert_no_invalid(c: &Cluster, what: &str) {
    for n in &c.nodes {
        assert_no_invalid_forward(&n.host.ns, what);
    }
}

#[test]
fn ipv6_pod_flows_go_fast_while_an_ipv6_service_flow_stays_on_the_kernel_path() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("fast6", 2);
    let c = two_fast_hosts(&pins);
    count_invalid(&c);
    let ((a, _), (b, b_ip)) = (pod6(&c, 0), pod6(&c, 1));
    let service: Ipv6Addr = SERVICE_IP6.parse().unwrap();
    c.nodes[0].host.ns.sh(&format!(
        "ip6tables -t nat -A PREROUTING -d {SERVICE_IP6}/128 -p tcp --dport 5201 -j DNAT --to-destination [{b_ip}]:5201"
    ));
    let before = [counters(pins.root(1)), counters(pins.root(2))];
    // The Service flow (port 5201, through DNAT, data towards the client) and a plain
    // pod-to-pod flow (port 5202) at the same time.
    let (svc, direct) = std::thread::scope(|s| {
        let direct = s.spawn(|| iperf_on(a, b, b_ip, 5202, &["-t", "3"]));
        let svc = iperf(a, b, service, &["-t", "3", "-R"]);
        (svc, direct.join().expect("direct iperf"))
    });
    for (what, report) in [("service", &svc), ("pod flow", &direct)] {
        let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            bytes > 5_000_000,
            "{what}: only {bytes} bytes\n{}",
            c.logs()
        );
    }

    // On the NATing host the Service flow never verifies: what it sends goes to the
    // ClusterIP, and what it receives leaves netfilter with the ClusterIP as source.
    let svc_flows = flows6_on_port(&pins, 1, 5201);
    assert!(
        !svc_flows.is_empty(),
        "the Service flow is tracked on host 1"
    );
    for (k, f) in &svc_flows {
        assert_eq!(
            (f.fast_tx_packets, f.fast_rx_packets),
            (0, 0),
            "the Service flow must stay on the kernel path: {k:?} {f:?}"
        );
    }
    // The pod flow is fast both ways on both hosts.
    for host in [1, 2] {
        let (k, f) = flow6_to_port(&pins, host, 5202).expect("the pod flow is tracked");
        assert!(
            f.fast_tx_packets > 100 && f.fast_rx_packets > 100,
            "host {host}: the IPv6 pod flow must go fast both ways: {k:?} {f:?}\n{}",
            c.logs()
        );
    }
    let after = [counters(pins.root(1)), counters(pins.root(2))];
    let delta = |h: usize, k: &str| {
        let (b, a) = (&before[h].paths[k], &after[h].paths[k]);
        (a.packets - b.packets, a.bytes - b.bytes)
    };
    let (unrouted, _) = delta(0, "kernel_unrouted");
    assert!(
        unrouted > 100,
        "Service packets to the ClusterIP: {:?}",
        after[0].paths
    );
    // The bulk crosses as GSO aggregates: sent fast into `flannel-v6.1`, whose driver
    // encapsulates them (`ipv6_gso`), and received fast straight into the pod.
    let (tx, tx_bytes) = delta(0, "fast_tx");
    let (rx, rx_bytes) = delta(1, "fast_rx");
    assert!(
        tx > 100 && tx_bytes / tx > 3000,
        "host 1 fast_tx {tx} packets, {tx_bytes} bytes"
    );
    assert!(
        rx > 100 && rx_bytes / rx > 3000,
        "host 2 fast_rx {rx} packets, {rx_bytes} bytes"
    );
    let gso = |c: &Counters| c.passes["ipv6_gso"].packets;
    assert!(
        gso(&after[0]) > gso(&before[0]),
        "fast IPv6 aggregates reach the driver: {:?}",
        after[0].passes
    );
    assert_no_invalid(&c, "service and pod flows");
}

/// One request/response on an established connection (1 s timeout).
fn exchange(client: &mut std::net::TcpStream, server: &mut std::net::TcpStream) {
    try_exchange(client, server).expect("request/response");
}

fn try_exchange(
    client: &mut std::net::TcpStream,
    server: &mut std::net::TcpStream,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut b = [0u8; 4];
    for s in [&*client, &*server] {
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
    }
    client.write_all(b"ping")?;
    server.read_exact(&mut b)?;
    server.write_all(b"pong")?;
    client.read_exact(&mut b)
}

/// An established TCP connection from host 1's pod to host 2's on `port`, exchanged on
/// until it runs on the fast path both ways.
fn fast_tcp_connection(
    c: &Cluster,
    pins: &BpfPins,
    port: u16,
) -> (std::net::TcpStream, std::net::TcpStream) {
    let ((a, _), (b, b_ip)) = (pod6(c, 0), pod6(c, 1));
    let listener = listen_in(b, b_ip, port);
    let mut client = connect_from(a, b_ip, port).expect("connect");
    let (mut served, _) = listener.accept().expect("accept");
    let fast = wait_until(Duration::from_secs(5), || {
        exchange(&mut client, &mut served);
        flow6_to_port(pins, 1, port)
            .is_some_and(|(_, f)| f.fast_tx_packets > 0 && f.fast_rx_packets > 0)
    });
    assert!(
        fast,
        "the IPv6 TCP flow never went fast: {:?}\n{}",
        flows6_on_port(pins, 1, port),
        c.logs()
    );
    (client, served)
}

#[test]
fn an_ip6tables_rule_dropping_new_connections_blocks_them_while_a_fast_ipv6_flow_goes_on() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("fast6-new", 2);
    let c = two_fast_hosts(&pins);
    for n in &c.nodes {
        // As on a kube-proxy node: conntrack tracks every flow from its first packet.
        n.host
            .ns
            .sh("ip6tables -A FORWARD -m conntrack --ctstate INVALID -j DROP");
    }
    let ((a, a_ip), (_, b_ip)) = (pod6(&c, 0), pod6(&c, 1));
    let (mut client, mut served) = fast_tcp_connection(&c, &pins, 5301);

    // NetworkPolicy style, on the receiving host: no NEW connection from pod a to pod b.
    c.nodes[1].host.ns.sh(&format!(
        "ip6tables -I FORWARD -s {a_ip} -d {b_ip} -p tcp -m conntrack --ctstate NEW -j DROP"
    ));
    let refused = connect_from(a, b_ip, 5301);
    assert!(
        refused.is_err(),
        "a NEW connection must be dropped: {refused:?}"
    );
    // The established flow carries on, fast, through several re-checks.
    let start = Instant::now();
    let fast_before = flow6_to_port(&pins, 1, 5301)
        .expect("flow")
        .1
        .fast_tx_packets;
    while start.elapsed() < Duration::from_millis(u64::from(FLOW_REFRESH_MS) * 2) {
        exchange(&mut client, &mut served);
    }
    let (_, f) = flow6_to_port(&pins, 1, 5301).expect("flow");
    assert!(f.fast_tx_packets > fast_before + 10, "{f:?}");
}

/// The sending host's own FORWARD policy: fast packets skip it, but the re-check every
/// `FLOW_REFRESH_MS` takes one through it, and a dropped re-check takes the flow off the
/// fast path. (Fast IPv6 packets pass `flannel-v6.1`'s egress, where the kernel path's
/// packets confirm a flow; were they to confirm it themselves, the rule would never bite.)
#[test]
fn a_drop_rule_on_the_sending_host_stops_a_fast_ipv6_flow_within_the_refresh_time() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("fast6-drop", 2);
    let c = two_fast_hosts(&pins);
    let ((_, a_ip), (_, b_ip)) = (pod6(&c, 0), pod6(&c, 1));
    let (mut client, mut served) = fast_tcp_connection(&c, &pins, 5303);
    // While fast, the send side is confirmed only by the re-check packets netfilter
    // passed: each confirmation comes within moments of its packet being seen before
    // netfilter, never from the fast packets that follow (up to the 1 s window).
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(u64::from(FLOW_REFRESH_MS) + 500) {
        exchange(&mut client, &mut served);
    }
    let (_, f) = flow6_to_port(&pins, 1, 5303).expect("flow");
    let lag = f.tx_ok_ns.wrapping_sub(f.tx_seen_ns);
    assert!(
        f.fast_tx_packets > 100 && lag < 100_000_000,
        "fast packets confirmed their own flow ({} ms after the last re-check): {f:?}",
        lag / 1_000_000
    );
    c.nodes[0].host.ns.sh(&format!(
        "ip6tables -I FORWARD -s {a_ip} -d {b_ip} -p tcp -j DROP"
    ));
    let stopped = wait_until(
        Duration::from_millis(u64::from(FLOW_REFRESH_MS) * 3),
        || try_exchange(&mut client, &mut served).is_err(),
    );
    let (_, f) = flow6_to_port(&pins, 1, 5303).expect("flow");
    assert!(stopped, "the DROP rule never stopped the fast flow: {f:?}");
}

#[test]
fn sigkilling_the_agents_and_unpinning_mid_fast_ipv6_tcp_flow_resets_nothing() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("fast6-kill", 2);
    let mut c = two_fast_hosts(&pins);
    count_invalid(&c);
    let (_, b_ip) = pod6(&c, 1);
    let _srv = c.nodes[1].host.pods[0].ns.spawn_server(
        "iperf3",
        &["-s", "-1", "-p", "5502", "-B", &b_ip.to_string()],
        5502,
    );
    let mut client = c.nodes[0].host.pods[0].ns.command("iperf3");
    client.args(["-c", &b_ip.to_string(), "-p", "5502", "-t", "8", "-J"]);
    let client = std::thread::spawn(move || client.output().expect("iperf3 client"));
    let fast = wait_until(Duration::from_secs(4), || {
        flow6_to_port(&pins, 1, 5502).is_some_and(|(_, f)| f.fast_tx_packets > 1000)
    });
    assert!(
        fast,
        "never fast: {:?}\n{}",
        flows6_on_port(&pins, 1, 5502),
        c.logs()
    );
    // Both agents die mid-flow and their programs go: the kernel path takes the flow over
    // with conntrack entries that had not seen most of its segments.
    c.nodes[0].kill();
    c.nodes[1].kill();
    pins.layout(1).remove_all().expect("unpin host 1");
    pins.layout(2).remove_all().expect("unpin host 2");
    let out = client.join().expect("client thread");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(
        out.status.success() && report.get("error").is_none(),
        "the transfer must survive: {report}\n{}",
        c.logs()
    );
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 50 * 1024 * 1024, "only {bytes} bytes in 8 s");
    assert_no_invalid(&c, "after the programs went");
}

/// #11's item 5 over IPv6: a pod that may send bigger packets than `flannel-v6.1` carries
/// gets ICMPv6 packet-too-big for an oversized DF datagram of a fast flow, exactly as on
/// the kernel path (which is where the program leaves it).
#[test]
fn oversized_ipv6_packets_on_a_fast_flow_get_packet_too_big_from_the_kernel_path() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("fast6-ptb", 2);
    let c = two_fast_hosts(&pins);
    // `ip`, not /sys/class/net: sysfs shows the namespace it was mounted in.
    let link = c.nodes[0].host.ns.sh("ip -o link show flannel-v6.1");
    let tunnel: u32 = link
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no MTU in {link:?}"));
    // Host 1's second pod (on veth3) may send 1500-byte packets.
    let pod = &c.nodes[0].host.pods[1];
    c.nodes[0].host.ns.sh("ip link set veth3 mtu 1500");
    pod.ns.sh("ip link set eth0 mtu 1500");
    let (_, to) = pod6(&c, 1);
    let _echo = UdpEcho::start(&c.nodes[1].host.pods[0].ns, to, 7500);
    let pins_root = pins.root(1).to_owned();
    // 1452 bytes of payload: a 1500-byte packet, too big for the overlay.
    let probe = df_udp_probe(&pod.ns, to, 7500, 1452, move || {
        flows(&pins_root).iter().any(|(k, f)| {
            addr_of(k.pod).is_ipv6() && f.fast_tx_packets > 5 && f.fast_rx_packets > 5
        })
    });
    let (fast, mtu, big_sends) = (probe.fast, probe.mtu, probe.big_sends);
    assert!(fast, "the IPv6 UDP flow never went fast\n{}", c.logs());
    assert_eq!(
        mtu, tunnel,
        "the kernel's packet-too-big must have taught the pod flannel-v6.1's MTU"
    );
    assert!(
        big_sends < 5,
        "later oversized sends must fail with EMSGSIZE"
    );
    let paths = counters(pins.root(1)).paths;
    assert!(paths["kernel_too_big"].packets > 0, "{paths:?}");
}

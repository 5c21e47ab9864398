//! The per-flow fast path (the default eBPF mode) end to end: which flows go fast, which
//! stay on the kernel path, and that netfilter, conntrack and the kernel's ICMP answers stay
//! truthful for both. Two hosts, both on our programs with the pod programs on the pod's
//! veth and the agent's conntrack helper running (`twohost::attach_ebpf`).

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_common::{Flow, FlowKey};
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    netns::{NetNs, connect_from, listen_in, wait_until},
    twohost::{
        EbpfHost, FLOW_REFRESH_MS, Host, UdpEcho, assert_no_invalid_forward, attach_ebpf,
        count_invalid_forward, counters, df_udp_probe, flows, iperf, iperf_on, two_hosts,
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

/// Send one datagram per `interval` for `duration` from `ns` to `to:port` on one socket
/// (one flow); returns how many echoes came back.
fn udp_ping_pong(
    ns: &NetNs,
    to: Ipv4Addr,
    port: u16,
    duration: Duration,
    interval: Duration,
) -> Exchanges {
    ns.enter(move || {
        let sock = UdpSocket::bind(("0.0.0.0", 40_000 + port)).expect("bind");
        sock.connect((to, port)).expect("connect");
        sock.set_read_timeout(Some(interval.max(Duration::from_millis(50))))
            .expect("timeout");
        let (start, mut done, mut buf) = (Instant::now(), Exchanges::default(), [0u8; 64]);
        while start.elapsed() < duration {
            let sent = Instant::now();
            if sock.send(b"ping").is_ok() {
                done.sent += 1;
            }
            if sock.recv(&mut buf).is_ok() {
                done.echoes += 1;
            }
            if let Some(rest) = interval.checked_sub(sent.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        done
    })
}

/// What a ping-pong run did. Losses are judged against `sent`, not against the wall clock:
/// on a loaded 2-vCPU machine the sender itself runs late.
#[derive(Debug, Default, Clone, Copy)]
struct Exchanges {
    sent: usize,
    echoes: usize,
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
    )
    .echoes;
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
    assert!(later.sent > 0, "nothing was sent: {later:?}");
    assert_eq!(later.echoes, 0, "the DROP rule must stop the fast flow");
}

#[test]
fn a_rule_dropping_new_connections_still_blocks_them_while_established_flows_go_on() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    for h in [&a, &b] {
        // As on a kube-proxy node, conntrack tracks every flow from its first packet (a
        // namespace starts tracking only once a rule uses it; a flow it first meets mid-way
        // counts as NEW, on the kernel path too).
        h.ns.sh("iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP");
    }
    let listener = listen_in(&b.pod, b.pod_ip(), 5301);
    let established = connect_from(&a.pod, b.pod_ip(), 5301).expect("connect before the rule");
    let (mut served, _) = listener.accept().expect("accept");
    // Traffic both ways until the flow is on the fast path.
    let mut client = established.try_clone().expect("clone");
    let ok = wait_until(Duration::from_secs(5), || {
        exchange(&mut client, &mut served);
        flow_to_port(&pins, 1, 5301)
            .is_some_and(|(_, f)| f.fast_tx_packets > 0 && f.fast_rx_packets > 0)
    });
    assert!(
        ok,
        "the TCP flow never went fast: {:?}",
        flows_on_port(&pins, 1, 5301)
    );

    // NetworkPolicy style, on the receiving host: no NEW connection from pod a to pod b.
    b.ns.sh(&format!(
        "iptables -I FORWARD -s {} -d {} -p tcp -m conntrack --ctstate NEW -j DROP",
        a.pod_ip(),
        b.pod_ip()
    ));
    let refused = connect_from(&a.pod, b.pod_ip(), 5301);
    assert!(
        refused.is_err(),
        "a NEW connection must be dropped: {refused:?}"
    );
    // The established flow carries on, fast, through several re-checks.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(u64::from(FLOW_REFRESH_MS) * 2) {
        exchange(&mut client, &mut served);
    }
    let (_, f) = flow_to_port(&pins, 1, 5301).expect("flow");
    assert!(f.fast_tx_packets > 10, "{f:?}");
}

/// One request/response on an established connection (1 s timeout).
fn exchange(client: &mut std::net::TcpStream, server: &mut std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut b = [0u8; 4];
    for s in [&*client, &*server] {
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
    }
    client.write_all(b"ping").expect("send");
    server.read_exact(&mut b).expect("server read");
    server.write_all(b"pong").expect("reply");
    client.read_exact(&mut b).expect("client read");
}

#[test]
fn a_fast_udp_flow_outlives_the_conntrack_udp_timeout() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    for h in [&a, &b] {
        // Conntrack tracks the namespace once a rule uses it; INVALID packets are dropped
        // (and counted) as kube-proxy does.
        h.ns.sh("sysctl -qw net.netfilter.nf_conntrack_udp_timeout=10 && \
             sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream=10 && \
             iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP");
    }
    let _echo = UdpEcho::start(&b.pod, b.pod_ip(), 7300);
    let Exchanges { sent, echoes } = udp_ping_pong(
        &a.pod,
        b.pod_ip(),
        7300,
        Duration::from_secs(30),
        Duration::from_millis(10),
    );
    // Three conntrack timeouts long; at least one ping per 100 ms even on a loaded machine.
    assert!(sent >= 300, "only {sent} pings sent in 30 s");
    assert!(
        echoes * 10 >= sent * 9,
        "only {echoes} of {sent} pings echoed over 30 s"
    );
    let (_, f) = flow_to_port(&pins, 1, 7300).expect("flow");
    assert!(
        f.fast_tx_packets * 10 >= echoes as u64 * 8,
        "the flow ran on the fast path: {f:?} ({echoes} echoes)"
    );
    // The entry is still there on both hosts although almost no packet passed conntrack
    // for three timeouts: the re-checks refreshed it.
    for h in [&a, &b] {
        let table = h.ns.sh("cat /proc/net/nf_conntrack");
        let entry = table
            .lines()
            .find(|l| l.contains("udp") && l.contains("dport=7300"));
        assert!(
            entry.is_some(),
            "conntrack entry gone on {}: {table}",
            h.ns.name()
        );
    }
}

#[test]
fn detaching_the_programs_mid_fast_tcp_flow_hands_it_to_the_kernel_path_without_invalid_drops() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, agents) = two_ebpf_hosts(&pins);
    for h in [&a, &b] {
        count_invalid_forward(&h.ns);
    }
    let _server = b
        .pod
        .spawn_server("iperf3", &["-s", "-1", "-p", "5402"], 5402);
    let mut client = a.pod.command("iperf3");
    client.args(["-c", &b.pod_ip().to_string(), "-p", "5402", "-t", "6", "-J"]);
    let client = std::thread::spawn(move || client.output().expect("iperf3 client"));
    let fast = wait_until(Duration::from_secs(3), || {
        flow_to_port(&pins, 1, 5402).is_some_and(|(_, f)| f.fast_tx_packets > 1000)
    });
    assert!(
        fast,
        "the transfer never went fast: {:?}",
        flows_on_port(&pins, 1, 5402)
    );
    std::thread::sleep(Duration::from_secs(1));
    // The agents stop, then every program goes on both hosts while the flow runs fast.
    drop(agents);
    pins.layout(1).remove_all().expect("unpin host 1");
    pins.layout(2).remove_all().expect("unpin host 2");
    let out = client.join().expect("client thread");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(
        out.status.success() && report.get("error").is_none(),
        "the transfer must survive: {report}"
    );
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 50 * 1024 * 1024, "only {bytes} bytes in 6 s");
    let retransmits = report["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .unwrap_or(0);
    for h in [&a, &b] {
        assert_no_invalid_forward(&h.ns, &format!("{retransmits} retransmits"));
    }
}

#[test]
fn oversized_df_packets_on_a_fast_flow_get_frag_needed_from_the_kernel_path() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    // The pod may send 1500-byte packets; the overlay carries 1450 (flannel.1's MTU).
    a.ns.sh("ip link set veth0 mtu 1500");
    a.pod.sh("ip link set eth0 mtu 1500");
    let _echo = UdpEcho::start(&b.pod, b.pod_ip(), 7500);
    let pins_root = pins.root(1).to_owned();
    // 1472 bytes of payload: a 1500-byte DF packet, too big for the overlay.
    let probe = df_udp_probe(&a.pod, b.pod_ip(), 7500, 1472, move || {
        flows(&pins_root)
            .values()
            .any(|f| f.fast_tx_packets > 5 && f.fast_rx_packets > 5)
    });
    let (fast_before, mtu, big_sends) = (probe.fast, probe.mtu, probe.big_sends);
    assert!(fast_before, "the flow never went fast");
    assert_eq!(
        mtu, 1450,
        "the kernel's frag-needed must have taught the pod the overlay MTU"
    );
    assert!(
        big_sends < 5,
        "later oversized DF sends must fail with EMSGSIZE"
    );
    let paths = counters(pins.root(1)).paths;
    assert!(paths["kernel_too_big"].packets > 0, "{paths:?}");
}

#[test]
fn a_new_pod_with_a_deleted_pods_ip_gets_its_traffic_at_once() {
    if !flannel_e2e::require_root() {
        return;
    }
    // Real agents this time: they learn pods and pod churn from netlink events.
    let pins = BpfPins::new("test", 2);
    let mut c = Cluster::start_each(2, &net_conf(r#"{"Type":"vxlan"}"#), |i| {
        vec!["--dataplane=ebpf".into(), pins.arg(i)]
    });
    let envs = c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let server_ip = c.nodes[1].host.pods[0].ip;
    let on_host2 = |port: u16| {
        open_pinned(&pins.layout(2))
            .expect("host 2 maps")
            .flows()
            .expect("flows")
            .into_iter()
            .find(|(k, _)| k.pod_port == port)
    };

    let echo = UdpEcho::start(&c.nodes[1].host.pods[0].ns, server_ip, 7600);
    let echoes = udp_ping_pong(
        &c.nodes[0].host.pods[0].ns,
        server_ip,
        7600,
        Duration::from_secs(2),
        Duration::from_millis(5),
    )
    .echoes;
    assert!(echoes > 100, "only {echoes} echoes\n{}", c.logs());
    let (_, before) = on_host2(7600).expect("host 2 tracks the flow");
    assert!(
        before.fast_rx_packets > 50,
        "the flow went fast on host 2: {before:?}\n{}",
        c.logs()
    );
    let old_veth = before.rx_ifindex;

    // The pod goes and another takes its IP straight away.
    drop(echo);
    let t0 = Instant::now();
    c.nodes[1].host.replace_pod(0, envs[1].subnet, envs[1].mtu);
    let new_veth = c.nodes[1].host.ns.ifindex("vethr0");
    let echo = UdpEcho::start(&c.nodes[1].host.pods[0].ns, server_ip, 7600);
    let forgotten = wait_until(Duration::from_secs(1), || {
        on_host2(7600).is_none_or(|(_, f)| f.rx_ifindex != old_veth)
    });
    assert!(
        forgotten,
        "host 2 still delivers the flow to the deleted veth after {:?}",
        t0.elapsed()
    );
    // Same flow (same socket ports): the new pod answers, first through the kernel path,
    // then fast again once the agent has put the programs on the new veth.
    let run = udp_ping_pong(
        &c.nodes[0].host.pods[0].ns,
        server_ip,
        7600,
        Duration::from_secs(3),
        Duration::from_millis(5),
    );
    assert!(
        run.sent >= 100 && run.echoes * 3 >= run.sent * 2,
        "the new pod answered only {run:?}\n{}",
        c.logs()
    );
    let (_, after) = on_host2(7600).expect("flow tracked again");
    assert_eq!(after.rx_ifindex, new_veth, "{after:?}");
    assert!(
        after.fast_rx_packets > 50,
        "fast again to the new pod: {after:?}\n{}",
        c.logs()
    );
    drop(echo);
}

#[test]
fn sigkilling_the_agents_mid_fast_tcp_flow_resets_nothing_and_drops_nothing_as_invalid() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let mut c = Cluster::start_each(2, &net_conf(r#"{"Type":"vxlan"}"#), |i| {
        vec!["--dataplane=ebpf".into(), pins.arg(i)]
    });
    c.add_pods(1);
    for n in &c.nodes {
        count_invalid_forward(&n.host.ns);
    }
    c.assert_all_pods_reach_each_other();
    let server = &c.nodes[1].host.pods[0];
    let _srv = server.ns.spawn_server(
        "iperf3",
        &["-s", "-1", "-p", "5502", "-B", &server.ip.to_string()],
        5502,
    );
    let mut client = c.nodes[0].host.pods[0].ns.command("iperf3");
    client.args(["-c", &server.ip.to_string(), "-p", "5502", "-t", "8", "-J"]);
    let client = std::thread::spawn(move || client.output().expect("iperf3 client"));
    let fast = wait_until(Duration::from_secs(4), || {
        flow_to_port(&pins, 1, 5502).is_some_and(|(_, f)| f.fast_tx_packets > 1000)
    });
    assert!(
        fast,
        "never fast: {:?}\n{}",
        flows_on_port(&pins, 1, 5502),
        c.logs()
    );
    // Both agents die mid-flow; one comes back while the transfer still runs.
    c.nodes[0].kill();
    c.nodes[1].kill();
    std::thread::sleep(Duration::from_secs(2));
    c.nodes[0].start();
    let out = client.join().expect("client thread");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(
        out.status.success() && report.get("error").is_none(),
        "the transfer must survive: {report}\n{}",
        c.logs()
    );
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 50 * 1024 * 1024, "only {bytes} bytes in 8 s");
    for n in &c.nodes {
        assert_no_invalid_forward(&n.host.ns, "agents killed mid-flow");
    }
}

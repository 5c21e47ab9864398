//! The eBPF datapath carrying real traffic between two host namespaces, one running our
//! programs on top of a kernel `flannel.1`, the other a plain kernel `flannel.1` (the Linux
//! VXLAN driver as the interop peer): pings and TSO-sized TCP in both directions, MTU
//! behaviour, and counters proving which path the packets took.

use flannel_e2e::{
    cluster::BpfPins,
    twohost::{EbpfHost, Host, attach_ebpf, counters, iperf, iperf_bytes, ping, try_sh, two_hosts},
};

/// Two hosts, both on our programs (pins under `pins`, hosts 1 and 2), with the agents'
/// part running (keep it alive for as long as the hosts are used).
fn two_ebpf_hosts(pins: &BpfPins) -> (Host, Host, [EbpfHost; 2]) {
    let (a, b) = two_hosts();
    let agents = [
        attach_ebpf(&a, &b, pins.root(1)),
        attach_ebpf(&b, &a, pins.root(2)),
    ];
    (a, b, agents)
}

#[test]
fn ebpf_host_and_kernel_vxlan_host_exchange_pod_traffic_both_ways() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 1);
    let (a, b) = two_hosts();
    let _agent = attach_ebpf(&a, &b, pins.root(1));

    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(ok, "ping eBPF pod → kernel pod: {out}");
    let (ok, out) = ping(&b, a.pod_ip(), 56);
    assert!(ok, "ping kernel pod → eBPF pod: {out}");

    // TSO-sized bursts: a GSO metadata bug shows here (0.3 Mbit/s), never with ping.
    let sent = iperf_bytes(&a, &b);
    assert!(
        sent > 20_000_000,
        "eBPF → kernel TCP moved only {sent} bytes in 2 s"
    );
    let back = iperf_bytes(&b, &a);
    assert!(
        back > 20_000_000,
        "kernel → eBPF TCP moved only {back} bytes in 2 s"
    );

    let c = counters(pins.root(1));
    eprintln!("eBPF host counters after {sent} bytes out, {back} bytes in: {c:#?}");
    let peer = c.peers.get(&b.underlay).copied().unwrap_or_default();
    assert!(peer.tx_packets > 100, "encap must carry A's traffic: {c:?}");
    assert!(peer.tx_bytes > 20_000_000, "encapsulated bytes: {c:?}");
    // B → A: small packets are decapsulated by the program, aggregates by the kernel.
    assert!(
        peer.rx_packets > 0,
        "decap must carry some of B's traffic: {c:?}"
    );
    assert_eq!(
        c.drops.values().map(|d| d.packets).sum::<u64>(),
        0,
        "no drops: {c:?}"
    );
}

#[test]
fn pod_mtu_is_respected_and_oversized_df_packets_get_frag_needed() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 1);
    let (a, b) = two_hosts();
    let _agent = attach_ebpf(&a, &b, pins.root(1));
    // 1422 bytes of ICMP payload + 28 = 1450, the pod MTU.
    let (ok, out) = ping(&a, b.pod_ip(), 1422);
    assert!(ok, "a 1450-byte DF packet must cross: {out}");
    // Pod MTU is 1450, so a larger DF packet can't even leave the pod; send it from the
    // host instead, whose route via flannel.1 carries MTU 1450: the kernel answers with
    // frag-needed.
    let (ok, out) = try_sh(
        &a.ns,
        &format!(
            "ping -c 1 -W 2 -M do -s 1423 -I {} {}",
            a.subnet.network(),
            b.pod_ip()
        ),
    );
    assert!(!ok, "an oversized DF packet must not cross: {out}");
    assert!(
        out.contains("message too long") || out.contains("mtu=1450") || out.contains("Frag needed"),
        "expected a frag-needed/EMSGSIZE report, got: {out}"
    );
}

#[test]
fn both_hosts_on_ebpf_and_traffic_survives_replacing_the_programs() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    let sent = iperf_bytes(&a, &b);
    assert!(
        sent > 20_000_000,
        "eBPF ↔ eBPF TCP moved only {sent} bytes in 2 s"
    );

    // A restarted agent loads the programs again: the pinned links are updated in place
    // and the maps reused, so the peer is still there without being re-added.
    a.ns.enter({
        let layout = pins.layout(1);
        move || {
            let before = attached_ids();
            let dp =
                flannel_agent::backend::ebpf::load(&layout, "flannel.1", "eth0").expect("reload");
            assert_eq!(
                dp.current_peers().expect("peers").len(),
                1,
                "maps survived the reload"
            );
            let after = attached_ids();
            // Replaced in place, not added: one program per hook, and a new one.
            assert_eq!(
                after.0.len(),
                1,
                "one program on flannel.1 egress: {after:?}"
            );
            assert_eq!(after.1.len(), 1, "one program on eth0 ingress: {after:?}");
            assert_ne!(before, after, "the reload must swap in the new programs");
        }
    });
    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(ok, "traffic after the reload: {out}");
    let c = counters(pins.root(1));
    assert!(c.peers[&b.underlay].tx_packets > 0);
}

/// Program ids attached (tcx) to flannel.1 egress and eth0 ingress in this namespace.
fn attached_ids() -> (Vec<u32>, Vec<u32>) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ids = |dev, dir| {
        SchedClassifier::query_tcx(dev, dir)
            .expect("query tcx")
            .1
            .iter()
            .map(|p| p.id())
            .collect::<Vec<_>>()
    };
    (
        ids("flannel.1", TcAttachType::Egress),
        ids("eth0", TcAttachType::Ingress),
    )
}

/// A ClusterIP-style service address: inside the test underlay range, never routed anywhere
/// but DNATed on the client's host.
const SERVICE_IP: &str = "198.19.255.10";

#[test]
fn services_and_network_policy_keep_working_on_the_ebpf_path() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    let service: std::net::Ipv4Addr = SERVICE_IP.parse().unwrap();

    // kube-proxy (iptables mode) style: DNAT in PREROUTING on the client's host; the
    // reply must be un-NATed by that host's conntrack, so decapsulated packets have to
    // meet netfilter there.
    a.ns.sh(&format!(
            "iptables -t nat -A PREROUTING -d {SERVICE_IP}/32 -p tcp --dport 5201 -j DNAT --to-destination {}:5201",
        b.pod_ip()
    ));
    for args in [&["-t", "1"][..], &["-t", "1", "-R"][..]] {
        let report = iperf(&a.pod, &b.pod, service, args);
        let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(
            bytes > 5_000_000,
            "iptables service, iperf3 {args:?}: only {bytes} bytes"
        );
    }
    a.ns.sh("iptables -t nat -F PREROUTING");

    // kube-proxy (nftables mode) style.
    a.ns.sh(&format!(
            "nft 'add table ip svc; add chain ip svc pre {{ type nat hook prerouting priority dstnat; }}; add rule ip svc pre ip daddr {SERVICE_IP} tcp dport 5201 dnat to {}:5201'",
        b.pod_ip()
    ));
    let report = iperf(&a.pod, &b.pod, service, &["-t", "1"]);
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 5_000_000, "nftables service: only {bytes} bytes");
    a.ns.sh("nft delete table ip svc");

    // NetworkPolicy-style FORWARD drop on the receiving host: packets the eBPF decap
    // delivered still traverse FORWARD there and are dropped.
    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(ok, "baseline ping: {out}");
    let rule = format!("FORWARD -s {} -d {} -j DROP", a.pod_ip(), b.pod_ip());
    b.ns.sh(&format!("iptables -I {rule}"));
    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(
        !ok,
        "a FORWARD drop on the receiving host must drop eBPF-delivered traffic: {out}"
    );
    b.ns.sh(&format!("iptables -D {rule}"));
    // And on the sending host, before encapsulation.
    a.ns.sh(&format!("iptables -I {rule}"));
    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(
        !ok,
        "a FORWARD drop on the sending host must drop before encap: {out}"
    );
    a.ns.sh(&format!("iptables -D {rule}"));
    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(ok, "traffic flows again once the rules are gone: {out}");

    let c = counters(pins.root(1));
    assert!(
        c.peers[&b.underlay].tx_packets > 0 && c.peers[&b.underlay].rx_packets > 0,
        "{c:?}"
    );
}

#[test]
fn detaching_the_programs_mid_flow_hands_traffic_to_the_kernel_device() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let (a, b, _agents) = two_ebpf_hosts(&pins);
    let _server = b
        .pod
        .spawn_server("iperf3", &["-s", "-1", "-p", "5202"], 5202);
    let mut iperf_client = a.pod.command("iperf3");
    iperf_client.args(["-c", &b.pod_ip().to_string(), "-p", "5202", "-t", "5", "-J"]);
    let client = std::thread::spawn(move || iperf_client.output().expect("iperf3 client"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    // Unpinning drops the last reference to the tcx links: both programs detach on both
    // hosts while the transfer runs.
    pins.layout(1).remove_all().expect("unpin host 1");
    pins.layout(2).remove_all().expect("unpin host 2");
    let out = client.join().expect("client thread");
    let (ok, out) = (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    );
    assert!(ok, "the transfer must survive the detach: {out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    assert!(report.get("error").is_none(), "{report}");
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 50 * 1024 * 1024, "only {bytes} bytes in 5 s");
    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(ok, "the kernel device carries on alone: {out}");
    let tcx = a.ns.enter(attached_ids);
    assert_eq!(tcx, (vec![], vec![]), "no program left attached");
}

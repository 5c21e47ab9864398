//! End to end with real agents on the eBPF datapath: a mixed cluster (eBPF hosts and a
//! kernel-VXLAN host), maps filled from leases and reconciled after a restart, an agent
//! SIGKILLed under iperf3 load, datapath selection and its fallback, and VXLAN from an
//! address without a lease dropped, counted and logged.

use std::{
    net::{Ipv4Addr, UdpSocket},
    process::Command,
    time::Duration,
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    netns::wait_until,
    require_root,
};
use ipnetwork::Ipv4Network;

const VXLAN: &str = r#"{"Type":"vxlan"}"#;

/// The routes map of a host: subnet → peer underlay.
fn routes(pins: &BpfPins, host: u8) -> Vec<(Ipv4Network, Ipv4Addr)> {
    let dp = open_pinned(&pins.layout(host)).expect("open pinned maps");
    dp.current_routes()
        .expect("routes")
        .into_iter()
        .map(|(net, r)| {
            (
                net,
                Ipv4Addr::from(flannel_common::wire::v4_unmapped(&r.peer_ip)),
            )
        })
        .collect()
}

#[test]
fn mixed_cluster_of_ebpf_and_kernel_vxlan_hosts() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("test", 3);
    let mut c = Cluster::start_each(3, &net_conf(VXLAN), |i| {
        if i < 3 {
            vec!["--dataplane=ebpf".into(), pins.arg(i)]
        } else {
            vec!["--dataplane=kernel".into()]
        }
    });
    let envs = c.add_pods(1);
    c.assert_all_pods_reach_each_other();

    // Both directions between an eBPF host and the kernel host, and between eBPF hosts.
    for (from, to) in [(0, 2), (2, 0), (0, 1), (1, 0)] {
        let bytes = c.iperf(from, to, 2);
        assert!(
            bytes > 10 * 1024 * 1024,
            "host {from} → host {to}: only {bytes} bytes"
        );
    }

    // The maps equal the lease set: host 1 routes host 2's and host 3's subnets.
    let mut want: Vec<(Ipv4Network, Ipv4Addr)> = vec![
        (envs[1].subnet, Ipv4Addr::new(198, 18, 0, 2)),
        (envs[2].subnet, Ipv4Addr::new(198, 18, 0, 3)),
    ];
    want.sort();
    assert_eq!(routes(&pins, 1), want);
    let counters = open_pinned(&pins.layout(1)).unwrap().counters().unwrap();
    for peer in [Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)] {
        let s = counters.peers[&peer];
        assert!(
            s.tx_packets > 0 && s.rx_packets > 0,
            "peer {peer}: {counters:?}"
        );
    }
    // What an operator sees with bpftool.
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.layout(1).map("ROUTES"))
        .output()
        .expect("bpftool");
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    assert_eq!(dump.as_array().map(Vec::len), Some(2), "{dump}");
    assert!(
        dump[0]["formatted"]["value"]["vtep_mac"].is_array(),
        "{dump}"
    );

    assert!(
        c.nodes[0].log().contains("eBPF VXLAN datapath attached"),
        "{}",
        c.logs()
    );
    assert!(!c.nodes[2].log().contains("eBPF VXLAN datapath attached"));
    // The kernel's answer to the DECAP_L4_UDP probe: logged, and in CONFIG's flags.
    let cfg = open_pinned(&pins.layout(1))
        .unwrap()
        .config
        .get(&0, 0)
        .expect("CONFIG");
    let flagged = cfg.flags & flannel_common::maps::CONFIG_F_DECAP_L4_UDP != 0;
    assert!(
        c.nodes[0]
            .log()
            .contains(&format!("kernel_has_decap_l4_udp={flagged}")),
        "{}",
        c.nodes[0].log()
    );
}

#[test]
fn sigkilled_agent_under_load_resets_no_connection_and_reconciles_its_maps() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("test", 3);
    let mut c = Cluster::start_each(3, &net_conf(VXLAN), |i| {
        vec!["--dataplane=ebpf".into(), pins.arg(i)]
    });
    let envs = c.add_pods(1);
    c.assert_all_pods_reach_each_other();

    // A long transfer from host 1's pod; host 1's agent dies in the middle of it.
    let server = &c.nodes[1].host.pods[0];
    let _srv = server
        .ns
        .spawn_server("iperf3", &["-s", "-1", "-B", &server.ip.to_string()], 5201);
    let client_ns = c.nodes[0].host.pods[0].ns.path();
    let client = std::thread::spawn({
        let ip = server.ip;
        move || {
            Command::new("nsenter")
                .arg(format!("--net={client_ns}"))
                .args(["iperf3", "-c", &ip.to_string(), "-t", "8", "-J"])
                .output()
                .expect("iperf3 client")
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    c.nodes[0].kill();

    // While host 1's agent is down, host 3 leaves for good.
    c.nodes[2].stop();
    assert_eq!(c.etcd_delete(&Cluster::lease_key(envs[2].subnet)), 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        routes(&pins, 1).len(),
        2,
        "nobody updated the maps while the agent was down"
    );

    std::fs::remove_file(&c.nodes[0].subnet_file).expect("remove subnet.env");
    c.nodes[0].start();
    c.nodes[0].wait_subnet_env(Duration::from_secs(30));

    let out = client.join().expect("client thread");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    assert!(
        out.status.success() && report.get("error").is_none(),
        "the transfer must survive the crash and restart: {report}\n{}",
        c.logs()
    );
    let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes > 50 * 1024 * 1024, "only {bytes} bytes in 8 s");

    // After the restart the maps equal the lease set again: host 3 is gone.
    let ok = wait_until(Duration::from_secs(10), || {
        routes(&pins, 1) == vec![(envs[1].subnet, Ipv4Addr::new(198, 18, 0, 2))]
    });
    assert!(
        ok,
        "routes after restart: {:?}\n{}",
        routes(&pins, 1),
        c.logs()
    );
    assert!(
        c.nodes[0].log().contains("replaced program in pinned link"),
        "{}",
        c.logs()
    );
}

#[test]
fn auto_falls_back_to_kernel_vxlan_and_says_why_while_ebpf_refuses() {
    if !require_root() {
        return;
    }
    // A pin path outside bpffs: eBPF cannot run there.
    let not_bpffs = tempfile::tempdir().expect("tempdir");
    let pin_arg = format!(
        "--bpf-pin-path={}",
        not_bpffs.path().join("flannel").display()
    );
    let mut c = Cluster::start_each(2, &net_conf(VXLAN), |_| {
        vec!["--dataplane=auto".into(), pin_arg.clone()]
    });
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let log = c.nodes[0].log();
    assert!(
        log.contains("no bpffs mounted"),
        "the reason must be logged:\n{log}"
    );

    // `--dataplane=ebpf` fails loudly instead of falling back.
    let mut strict = Cluster::start_each(1, &net_conf(VXLAN), |_| {
        vec!["--dataplane=ebpf".into(), pin_arg.clone()]
    });
    let node = &mut strict.nodes[0];
    let exited = wait_until(Duration::from_secs(20), || {
        !node.agent.as_mut().is_some_and(|a| a.running())
    });
    assert!(
        exited,
        "flanneld --dataplane=ebpf kept running without bpffs:\n{}",
        node.log()
    );
    assert!(node.log().contains("no bpffs mounted"), "{}", node.log());
    assert!(
        node.subnet_env().is_none(),
        "no subnet.env without a datapath"
    );
}

#[test]
fn vxlan_from_an_address_without_a_lease_is_dropped_counted_and_logged() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let mut c = Cluster::start_each(2, &net_conf(VXLAN), |i| {
        vec![
            "--dataplane=ebpf".into(),
            pins.arg(i),
            "--log-level=debug".into(),
        ]
    });
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let stranger = c.underlay.attach("x", Ipv4Addr::new(198, 18, 1, 66), 1500);
    let target = c.nodes[0].host.pods[0].ip;
    stranger.enter(move || {
        let sock = UdpSocket::bind("198.18.1.66:0").expect("bind");
        let mut packet = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        // Inner Ethernet + IPv4 header claiming to come from a pod.
        packet.extend_from_slice(&[0xff; 6]);
        packet.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x66, 0x08, 0x00]);
        packet.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 99, 9]);
        packet.extend_from_slice(&target.octets());
        packet.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        for _ in 0..5 {
            sock.send_to(&packet, "198.18.0.1:8472").expect("send");
        }
    });
    let ok = wait_until(Duration::from_secs(5), || {
        open_pinned(&pins.layout(1))
            .map(|d| d.counters().expect("counters"))
            .map(|c| c.drops["unknown_peer"].packets >= 5)
            .unwrap_or(false)
    });
    assert!(
        ok,
        "drops: {:?}",
        open_pinned(&pins.layout(1))
            .unwrap()
            .counters()
            .unwrap()
            .drops
    );
    let logged = wait_until(Duration::from_secs(5), || {
        c.nodes[0]
            .log()
            .contains("dropped VXLAN from unknown peer 198.18.1.66")
    });
    assert!(
        logged,
        "the program's aya-log record must reach the agent log:\n{}",
        c.nodes[0].log()
    );
}

#[test]
fn direct_routing_peers_bypass_vxlan_on_the_ebpf_datapath() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let mut c = Cluster::start_each(
        2,
        &net_conf(r#"{"Type":"vxlan","DirectRouting":true}"#),
        |i| vec!["--dataplane=ebpf".into(), pins.arg(i)],
    );
    let envs = c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    assert!(c.iperf(0, 1, 1) > 10 * 1024 * 1024);
    // Peers on our L2 segment get a plain route via their address, no encapsulation.
    let route = c.nodes[0]
        .host
        .ns
        .sh(&format!("ip route show {}", envs[1].subnet));
    assert!(route.contains("via 198.18.0.2 dev eth0"), "{route}");
    let counters = open_pinned(&pins.layout(1)).unwrap().counters().unwrap();
    let peer = counters
        .peers
        .get(&Ipv4Addr::new(198, 18, 0, 2))
        .copied()
        .unwrap_or_default();
    assert_eq!(
        peer.tx_packets, 0,
        "nothing may be encapsulated: {counters:?}"
    );
    assert_eq!(
        peer.rx_packets, 0,
        "nothing arrives encapsulated: {counters:?}"
    );
}

#[test]
fn opt_in_fast_path_delivers_straight_to_pods_aggregates_included() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("test", 2);
    let mut c = Cluster::start_each(2, &net_conf(VXLAN), |i| {
        vec![
            "--dataplane=ebpf".into(),
            pins.arg(i),
            "--ebpf-fast-path".into(),
        ]
    });
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    // The agent learned each host's pod from cni0's neighbour table and FDB.
    for (host, node) in [(1u8, 0usize), (2, 1)] {
        let pod = c.nodes[node].host.pods[0].ip;
        let ok = wait_until(Duration::from_secs(10), || {
            open_pinned(&pins.layout(host))
                .map(|d| d.current_endpoints().expect("endpoints"))
                .is_ok_and(|e| e.contains_key(&pod))
        });
        assert!(ok, "host {host} never listed its pod {pod}\n{}", c.logs());
    }
    let before = open_pinned(&pins.layout(2)).unwrap().counters().unwrap();
    for (from, to) in [(0, 1), (1, 0)] {
        let bytes = c.iperf(from, to, 2);
        assert!(
            bytes > 10 * 1024 * 1024,
            "host {from} → host {to}: only {bytes} bytes"
        );
    }
    let after = open_pinned(&pins.layout(2)).unwrap().counters().unwrap();
    let peer = Ipv4Addr::new(198, 18, 0, 1);
    let rx = after.peers[&peer].rx_bytes - before.peers[&peer].rx_bytes;
    assert!(
        rx > 10 * 1024 * 1024,
        "host 2 must have decapsulated the bulk itself: {after:?}"
    );
    assert_eq!(
        after.passes["gso_ingress"].packets, before.passes["gso_ingress"].packets,
        "no aggregate may fall back to the kernel device: {after:?}"
    );
}

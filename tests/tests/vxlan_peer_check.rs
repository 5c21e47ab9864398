//! VXLAN only from known peers, end to end with real agents: a stranger on the underlay
//! sends VXLAN (crafted on a raw socket) as outer fragments and with IP options to a pod on
//! an eBPF host, on a kernel-VXLAN host with `--vxlan-peer-check=true` (the nftables guard
//! alone) and on a kernel-VXLAN host with upstream's default; legitimate peers send the
//! same shapes. Nothing of the stranger's arrives where the check is on, the drops are
//! counted, the peers' traffic arrives everywhere, and on the upstream-default host the
//! stranger's gets through (which shows the probe can see an arrival).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    craft::{self, Inner, NOP_OPTIONS, Shape},
    netns::{NetNs, wait_until},
    require_root,
};

const PORT: u16 = 7777;

fn vtep_mac(ns: &NetNs) -> [u8; 6] {
    let out = ns.sh("ip -j link show flannel.1");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip JSON");
    let bytes: Vec<u8> = v[0]["address"]
        .as_str()
        .expect("address")
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("6 bytes")
}

/// Every payload that reaches `sock` until `quiet` passes without one.
fn received(sock: &UdpSocket, quiet: Duration) -> BTreeSet<String> {
    sock.set_read_timeout(Some(quiet)).expect("timeout");
    let mut got = BTreeSet::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(n) = sock.recv(&mut buf) {
        got.insert(String::from_utf8_lossy(&buf[..n]).into_owned());
        if Instant::now() > deadline {
            break;
        }
    }
    got
}

/// The shapes every sender tries: outer fragments, options, both.
const SHAPES: [(&str, Shape); 3] = [
    (
        "fragments",
        Shape {
            options: &[],
            fragment: Some(48),
        },
    ),
    (
        "options",
        Shape {
            options: NOP_OPTIONS,
            fragment: None,
        },
    ),
    (
        "options+fragments",
        Shape {
            options: NOP_OPTIONS,
            fragment: Some(64),
        },
    ),
];

#[test]
fn stranger_vxlan_as_fragments_or_with_options_never_reaches_a_pod() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("guard", 1);
    let mut c = Cluster::start_each(3, &net_conf(r#"{"Type":"vxlan"}"#), |i| match i {
        1 => vec!["--dataplane=ebpf".into(), pins.arg(1)],
        2 => vec![
            "--dataplane=kernel".into(),
            "--vxlan-peer-check=true".into(),
        ],
        _ => vec!["--dataplane=kernel".into()],
    });
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let stranger_ip = Ipv4Addr::new(198, 18, 1, 66);
    let stranger = c.underlay.attach("x", stranger_ip, 1500);

    let pods: Vec<Ipv4Addr> = c.nodes.iter().map(|n| n.host.pods[0].ip).collect();
    let socks: Vec<UdpSocket> = c
        .nodes
        .iter()
        .map(|n| {
            let ip = n.host.pods[0].ip;
            n.host.pods[0]
                .ns
                .enter(move || UdpSocket::bind((ip, PORT)))
                .expect("bind in pod")
        })
        .collect();
    // Who sends to host `to`: the stranger, and a legitimate peer (host 2 for host 1, host
    // 1 for the others), each in every shape. The inner source is another host's pod.
    let send = |from: &NetNs, from_ip: Ipv4Addr, to: usize, tag: &str| {
        let spoofed_src = pods[(to + 1) % 3];
        for (shape_name, shape) in SHAPES {
            let inner = Inner {
                dst_mac: vtep_mac(&c.nodes[to].host.ns),
                src_mac: [0x02, 0, 0, 0, 0x66, 0x66],
                src: spoofed_src,
                dst: pods[to],
                port: PORT,
                payload: format!("{tag} {shape_name}").into_bytes(),
            };
            let datagram = craft::vxlan_datagram(1, 8472, &inner);
            let host_ip = c.nodes[to].host.ip;
            craft::send_raw(
                from,
                host_ip,
                craft::ipv4_packets(from_ip, host_ip, &datagram, shape),
            );
        }
    };
    for to in 0..3 {
        send(&stranger, stranger_ip, to, "stranger");
        let peer = if to == 0 { 1 } else { 0 };
        let peer_ns = &c.nodes[peer].host.ns;
        send(peer_ns, c.nodes[peer].host.ip, to, "peer");
    }
    let got: Vec<BTreeSet<String>> = socks
        .iter()
        .map(|s| received(s, Duration::from_millis(1500)))
        .collect();
    let all = |tag: &str| -> BTreeSet<String> {
        SHAPES
            .iter()
            .map(|(shape, _)| format!("{tag} {shape}"))
            .collect()
    };
    eprintln!("arrived: {got:?}");
    assert_eq!(
        got[0],
        all("peer"),
        "eBPF host: the peer's fragments and options arrive, nothing of the stranger's\n{}",
        c.logs()
    );
    assert_eq!(
        got[1],
        all("peer"),
        "kernel host with --vxlan-peer-check=true: the same"
    );
    let upstream: BTreeSet<String> = all("peer").union(&all("stranger")).cloned().collect();
    assert_eq!(
        got[2], upstream,
        "kernel host with upstream's default accepts anyone (the probe works)"
    );

    // Counted: the program dropped the stranger's first fragments and option packets…
    let drops = open_pinned(&pins.layout(1))
        .expect("open pinned maps")
        .counters()
        .expect("counters")
        .drops["unknown_peer"]
        .packets;
    assert!(drops >= 3, "unknown_peer drops on host 1: {drops}");
    // … and the guard the reassembled datagrams on the kernel host.
    let counter = c.nodes[1]
        .host
        .ns
        .sh("nft -j list counter inet flannel-vxlan-guard dropped");
    let v: serde_json::Value = serde_json::from_str(&counter).expect("nft JSON");
    let guarded = v["nftables"][1]["counter"]["packets"].as_u64().unwrap_or(0);
    assert_eq!(guarded, 3, "guard drops on host 2: {counter}");
    eprintln!("drops: eBPF program {drops} packets, nftables guard {guarded} datagrams");
    // The guard counts them by source too, and the agent names the source once.
    let strangers = c.nodes[1]
        .host
        .ns
        .sh("nft -j list set inet flannel-vxlan-guard strangers");
    assert!(
        strangers.contains(&format!("\"val\": \"{stranger_ip}\"")),
        "{strangers}"
    );
    let named = |c: &Cluster| {
        c.nodes[1]
            .log()
            .matches(&format!(
                "VXLAN from {stranger_ip} is not from a known peer"
            ))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(15), || named(&c) >= 1),
        "the kernel host did not name the stranger\n{}",
        c.nodes[1].log()
    );
    assert_eq!(named(&c), 1, "{}", c.nodes[1].log());

    // The guard on the eBPF host holds exactly the peers' addresses; the upstream-default
    // host has no guard at all.
    let set = c.nodes[0]
        .host
        .ns
        .sh("nft -j list set inet flannel-vxlan-guard peers");
    for peer in ["198.18.0.2", "198.18.0.3"] {
        assert!(set.contains(peer), "{set}");
    }
    assert!(!set.contains("198.18.0.1"), "{set}");
    assert!(
        !c.nodes[2]
            .host
            .ns
            .run("nft list table inet flannel-vxlan-guard")
            .status
            .success()
    );
}

#[test]
fn the_guard_follows_the_peer_set() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("guard", 2);
    let mut c = Cluster::start_each(2, &net_conf(r#"{"Type":"vxlan"}"#), |i| {
        vec!["--dataplane=ebpf".into(), pins.arg(i)]
    });
    let envs = c.add_pods(1);
    let peers = |c: &Cluster| {
        c.nodes[0]
            .host
            .ns
            .sh("nft -j list set inet flannel-vxlan-guard peers")
    };
    assert!(
        wait_until(Duration::from_secs(10), || peers(&c).contains("198.18.0.2")),
        "{}",
        peers(&c)
    );
    // A peer leaves: its address leaves the set.
    c.nodes[1].stop();
    assert_eq!(c.etcd_delete(&Cluster::lease_key(envs[1].subnet)), 1);
    assert!(
        wait_until(Duration::from_secs(10), || !peers(&c)
            .contains("198.18.0.2")),
        "{}",
        peers(&c)
    );
    // A flushed ruleset comes back with the next peer change (the peer rejoins).
    c.nodes[0].host.ns.sh("nft flush ruleset");
    c.nodes[1].start();
    assert!(
        wait_until(Duration::from_secs(15), || c.nodes[0]
            .host
            .ns
            .run("nft list set inet flannel-vxlan-guard peers")
            .status
            .success()
            && peers(&c).contains("198.18.0.2")),
        "{}",
        c.logs()
    );
}

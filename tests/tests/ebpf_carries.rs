//! The eBPF datapath carries what the kernel device carries, end to end with real agents
//! and etcd, each case next to its kernel-mode twin:
//!
//! * GBP: on a `"GBP": true` network, pod traffic marked on the sending host travels as
//!   GBP-flagged VXLAN (G bit, policy id = the mark) and arrives in the peer's pod with the
//!   mark restored — between an eBPF host and a kernel-VXLAN host, both ways, and between
//!   two kernel hosts (upstream's behaviour);
//! * inner sources outside the sending peer's subnet: a host's own underlay address
//!   talking to a remote pod (`--ip-masq` off, nothing rewrites it) reaches the pod on an
//!   eBPF host as on a kernel host; the eBPF host hands it to its kernel device (counted as
//!   `foreign_source`), never drops it.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    netns::{NetNs, wait_until},
    require_root,
};

/// The mark (and so the GBP policy id) the senders put on their pods' traffic.
const MARK: u32 = 0x42;

/// Mark what `pod` sends on its host, as a policy agent would (before routing, so the
/// VXLAN device — or our encap program — sees it); count what arrives for `local_pod`
/// carrying the mark, after decapsulation.
fn mark_and_count(ns: &NetNs, pod: Ipv4Addr, local_pod: Ipv4Addr) {
    ns.sh(&format!(
        "nft add table ip gbptest && \
         nft add chain ip gbptest marking '{{ type filter hook prerouting priority mangle; }}' && \
         nft add rule ip gbptest marking ip saddr {pod} meta mark set {MARK} && \
         nft add chain ip gbptest arrivals '{{ type filter hook forward priority -10; }}' && \
         nft add rule ip gbptest arrivals ip daddr {local_pod} meta mark {MARK} counter"
    ));
}

/// Packets that reached this host's pod with the mark restored from the GBP header.
fn marked_arrivals(ns: &NetNs) -> u64 {
    let out = ns.sh("nft -j list chain ip gbptest arrivals");
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft JSON");
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum()
}

/// Two hosts on a GBP network; `dataplanes[i]` for host i+1. Pods ping each other with
/// their traffic marked; every host's pod receives marked packets.
fn gbp_is_carried(dataplanes: [&str; 2]) {
    let tag = if dataplanes.contains(&"ebpf") {
        "gbp-ebpf"
    } else {
        "gbp-kernel"
    };
    let pins = BpfPins::new(tag, 2);
    let mut c = Cluster::start_each(2, &net_conf(r#"{"Type":"vxlan","GBP":true}"#), |i| {
        let mut args = vec![format!("--dataplane={}", dataplanes[usize::from(i) - 1])];
        if dataplanes[usize::from(i) - 1] == "ebpf" {
            args.push(pins.arg(i));
        }
        args
    });
    c.add_pods(1);
    for n in &c.nodes {
        let link = n.host.ns.sh("ip -d link show flannel.1");
        assert!(link.contains("gbp"), "flannel.1 without gbp: {link}");
    }
    let pods: Vec<Ipv4Addr> = c.nodes.iter().map(|n| n.host.pods[0].ip).collect();
    for n in &c.nodes {
        mark_and_count(&n.host.ns, n.host.pods[0].ip, n.host.pods[0].ip);
    }
    c.assert_all_pods_reach_each_other();
    for (from, to) in [(0, 1), (1, 0)] {
        let (ok, out) = {
            let o = c.nodes[from].host.pods[0]
                .ns
                .run(&format!("ping -c 5 -i 0.2 -W 2 {}", pods[to]));
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
            )
        };
        assert!(
            ok,
            "{dataplanes:?}: ping {} → {}: {out}\n{}",
            from + 1,
            to + 1,
            c.logs()
        );
    }
    let arrived: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| marked_arrivals(&n.host.ns))
        .collect();
    eprintln!(
        "{dataplanes:?}: packets arriving with mark {MARK:#x} (from the GBP policy id): {arrived:?}"
    );
    for (i, n) in arrived.iter().enumerate() {
        assert!(
            *n >= 5,
            "{dataplanes:?}: host {} pod got {n} marked packets: the GBP policy id did not cross",
            i + 1
        );
    }
    for (i, dp) in dataplanes.iter().enumerate() {
        if *dp != "ebpf" {
            continue;
        }
        let host = u8::try_from(i + 1).unwrap();
        let counters = open_pinned(&pins.layout(host))
            .expect("open pinned maps")
            .counters()
            .expect("counters");
        let peer = c.nodes[1 - i].host.ip;
        let stats = counters.peers.get(&peer).copied().unwrap_or_default();
        eprintln!(
            "{dataplanes:?}: eBPF host {host}: peer {peer} {stats:?}, drops {:?}",
            counters.drops
        );
        // Our programs did the work: GBP headers encapsulated and decapsulated by them, none
        // refused for their flags.
        assert!(stats.tx_packets >= 5 && stats.rx_packets >= 5, "{stats:?}");
        assert_eq!(
            counters.drops["bad_flags"].packets, 0,
            "GBP-flagged VXLAN refused"
        );
    }
}

#[test]
fn gbp_flagged_vxlan_is_carried_between_ebpf_and_kernel_hosts() {
    if !require_root() {
        return;
    }
    gbp_is_carried(["ebpf", "kernel"]);
}

#[test]
fn gbp_flagged_vxlan_is_carried_between_kernel_hosts() {
    if !require_root() {
        return;
    }
    gbp_is_carried(["kernel", "kernel"]);
}

/// Two hosts running `dataplane`, `--ip-masq` off. Host 1 sends UDP from its underlay
/// address (outside its own pod subnet) to host 2's pod; every datagram must arrive.
fn foreign_source_is_carried(dataplane: &str) {
    let pins = BpfPins::new(&format!("foreign-{dataplane}"), 2);
    let mut c = Cluster::start_each(2, &net_conf(r#"{"Type":"vxlan"}"#), |i| {
        let mut args = vec![format!("--dataplane={dataplane}")];
        if dataplane == "ebpf" {
            args.push(pins.arg(i));
        }
        args
    });
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let (pod, port) = (c.nodes[1].host.pods[0].ip, 7788);
    let sock = c.nodes[1].host.pods[0]
        .ns
        .enter(move || UdpSocket::bind((pod, port)))
        .expect("bind in pod");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let src = c.nodes[0].host.ip;
    let before = (dataplane == "ebpf").then(|| foreign_passes(&pins, 2));
    let sent = 20;
    c.nodes[0].host.ns.enter(move || {
        let s = UdpSocket::bind((src, 0)).expect("bind to the underlay address");
        for i in 0..sent {
            s.send_to(format!("host {i}").as_bytes(), (pod, port))
                .expect("send");
        }
    });
    let mut got = 0;
    let mut buf = [0u8; 64];
    let mut from_addr = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            while let Ok((_, addr)) = sock.recv_from(&mut buf) {
                got += 1;
                from_addr = Some(addr.ip());
            }
            got >= sent
        }),
        "{dataplane}: {got} of {sent} datagrams from host 1's underlay address reached host 2's pod\n{}",
        c.logs()
    );
    assert_eq!(
        from_addr,
        Some(src.into()),
        "the inner source arrives as sent (not masqueraded)"
    );
    eprintln!(
        "{dataplane}: {got} of {sent} datagrams from {src} (outside 10.244.x of host 1) arrived"
    );
    if let Some(before) = before {
        let after = foreign_passes(&pins, 2);
        eprintln!(
            "{dataplane}: host 2 handed {} of them to its kernel device (foreign_source)",
            after - before
        );
        assert!(
            after - before >= sent,
            "foreign_source passes {before} → {after}"
        );
        let drops = open_pinned(&pins.layout(2))
            .unwrap()
            .counters()
            .unwrap()
            .drops;
        assert!(
            drops.values().all(|c| c.packets == 0),
            "nothing dropped: {drops:?}"
        );
    }
}

fn foreign_passes(pins: &BpfPins, host: u8) -> u64 {
    open_pinned(&pins.layout(host))
        .expect("open pinned maps")
        .counters()
        .expect("counters")
        .passes["foreign_source"]
        .packets
}

#[test]
fn host_traffic_from_outside_the_pod_subnet_is_carried_by_ebpf_hosts() {
    if !require_root() {
        return;
    }
    foreign_source_is_carried("ebpf");
}

#[test]
fn host_traffic_from_outside_the_pod_subnet_is_carried_by_kernel_hosts() {
    if !require_root() {
        return;
    }
    foreign_source_is_carried("kernel");
}

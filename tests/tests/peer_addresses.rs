//! The known-peer check knows every address a legitimate peer sends from (#12 item 3,
//! first bullet), end to end in kube mode against the in-test API server:
//!
//! * a peer whose published address (`public-ip`, here from `public-ip-overwrite`) is not
//!   the address its packets leave from — its node's InternalIP — is carried by an eBPF
//!   host, as by its kernel-mode twin with the nftables peer guard on
//!   (`--dataplane=kernel --vxlan-peer-check=true`): both allow-lists hold the lease's
//!   address and the node's published addresses;
//! * VXLAN from a stranger is dropped by the eBPF host, counted by source address in the
//!   `STRANGERS` map (read with bpftool) and logged once with the remedy; a host with
//!   `--vxlan-peer-check=false` hands it to the kernel device, which delivers it, as
//!   upstream's does.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use flannel_agent::backend::ebpf::PinLayout;
use flannel_e2e::{
    craft::{self, Inner, Shape},
    kube_cluster::{KubeAgent, KubeBench, P, kube_hosts, ping, start_kube_agents},
    netns::{NetNs, wait_until},
    require_root,
};

const OVERWRITE: &str = "198.18.0.22";

/// The MAC of `flannel.1` in `ns`.
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

/// The entries of a pinned hash map keyed by an IPv4 address, as bpftool prints them:
/// each key's address with the first 8 value bytes (a little-endian `u64`), summed over
/// CPUs for a per-CPU map.
fn dump_by_addr(pins: &std::path::Path, map: &str) -> Vec<(Ipv4Addr, u64)> {
    let path = PinLayout::new(pins).map(map);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let bytes = |x: &serde_json::Value| -> Vec<u8> {
        x.as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str())
            .map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).expect("hex byte"))
            .collect()
    };
    let first_u64 = |x: &serde_json::Value| {
        let b = bytes(x);
        u64::from_le_bytes(b[..8].try_into().expect("8-byte counter"))
    };
    v.as_array()
        .expect("bpftool prints an array")
        .iter()
        .map(|e| {
            let k = bytes(&e["key"]);
            let value = match e["values"].as_array() {
                Some(cpus) => cpus.iter().map(|c| first_u64(&c["value"])).sum(),
                None => first_u64(&e["value"]),
            };
            // 16-byte keys, IPv4 as IPv4-mapped.
            (Ipv4Addr::new(k[12], k[13], k[14], k[15]), value)
        })
        .collect()
}

/// Nodes h1 (`dataplane` on h1, with `extra` flags) and h2 (kernel VXLAN): h2 publishes
/// [`OVERWRITE`] (a second address of its uplink) through `public-ip-overwrite`, but its
/// VXLAN leaves from its interface address 198.18.0.2 — which the node object reports as
/// its InternalIP. Pods behind both must talk, and h1's allow-lists hold both addresses.
fn peer_sending_from_its_internal_ip(dataplane: &str, extra: &[&str]) {
    let mut bench = KubeBench::new();
    let [mut h1, mut h2] = kube_hosts(&mut bench);
    let api = &bench.api;
    api.set_addresses("h1", &[("InternalIP", "198.18.0.1"), ("Hostname", "h1")]);
    api.set_addresses("h2", &[("InternalIP", "198.18.0.2"), ("Hostname", "h2")]);
    api.annotate(
        "h2",
        &[(&format!("{P}public-ip-overwrite"), Some(OVERWRITE))],
    );
    h2.ns.sh(&format!("ip addr add {OVERWRITE}/15 dev eth0"));
    let [a1, a2] = start_kube_agents(api, [(&mut h1, dataplane, extra), (&mut h2, "kernel", &[])]);
    let published = wait_until(Duration::from_secs(10), || {
        api.annotations("h2")
            .get(&format!("{P}public-ip"))
            .map(String::as_str)
            == Some(OVERWRITE)
    });
    assert!(published, "h2 annotations: {:?}", api.annotations("h2"));
    let dev2 = h2.ns.sh("ip -d link show flannel.1");
    assert!(
        dev2.contains("local 198.18.0.2 "),
        "h2 sends from its own address: {dev2}"
    );

    let (p1, p2) = (&h1.pods[0], &h2.pods[0]);
    let t0 = std::time::Instant::now();
    let connected = wait_until(Duration::from_secs(15), || {
        ping(&p1.ns, p2.ip) && ping(&p2.ns, p1.ip)
    });
    assert!(
        connected,
        "{dataplane} {extra:?}: pods cannot talk across a peer sending from its InternalIP\n\
         --- h1:\n{}\n--- h2:\n{}",
        a1.log(),
        a2.log()
    );
    eprintln!("{dataplane} {extra:?}: pods talk after {:?}", t0.elapsed());

    // Both allow-lists on h1 hold the lease's address and the node's InternalIP.
    let set = h1.ns.sh("nft -j list set inet flannel-vxlan-guard peers");
    for ip in [OVERWRITE, "198.18.0.2"] {
        assert!(set.contains(ip), "nftables guard set without {ip}: {set}");
    }
    if dataplane == "ebpf" {
        let peers: Vec<Ipv4Addr> = dump_by_addr(&a1.pins.0, "PEERS")
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        for ip in [OVERWRITE, "198.18.0.2"] {
            assert!(
                peers.contains(&ip.parse().unwrap()),
                "PEERS map without {ip}: {peers:?}"
            );
        }
        assert!(
            !a1.log().contains("is not from a known peer"),
            "a legitimate peer was reported as a stranger\n{}",
            a1.log()
        );
    }

    // The node stops reporting the address: it leaves both allow-lists.
    api.set_addresses("h2", &[("Hostname", "h2")]);
    let gone = wait_until(Duration::from_secs(10), || {
        !h1.ns
            .sh("nft -j list set inet flannel-vxlan-guard peers")
            .contains("198.18.0.2\"")
    });
    assert!(
        gone,
        "{}",
        h1.ns.sh("nft list set inet flannel-vxlan-guard peers")
    );
    // h2 reads its own node back with the overwrite it was told to publish: no hijack.
    assert!(
        !a2.log().contains("own lease was"),
        "h2 took its public-ip-overwrite for a hijack\n{}",
        a2.log()
    );
    drop((a1, a2));
}

#[test]
fn ebpf_host_carries_a_kube_peer_sending_from_its_internal_ip() {
    if !require_root() {
        return;
    }
    peer_sending_from_its_internal_ip("ebpf", &[]);
}

#[test]
fn kernel_host_with_the_peer_guard_carries_a_kube_peer_sending_from_its_internal_ip() {
    if !require_root() {
        return;
    }
    peer_sending_from_its_internal_ip("kernel", &["--vxlan-peer-check=true"]);
}

/// Every payload that reaches `sock` until `quiet` passes without one.
fn received(sock: &UdpSocket, quiet: Duration) -> Vec<String> {
    sock.set_read_timeout(Some(quiet)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

fn strangers_logged(agent: &KubeAgent, src: Ipv4Addr) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains(&format!("VXLAN from {src} is not from a known peer")))
        .count()
}

#[test]
fn a_stranger_is_dropped_counted_by_source_and_named_once() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let [mut h1, mut h2] = kube_hosts(&mut bench);
    let [a1, a2] = start_kube_agents(
        &bench.api,
        [
            (&mut h1, "ebpf", &[]),
            (&mut h2, "ebpf", &["--vxlan-peer-check=false"]),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(15), || ping(
            &h1.pods[0].ns,
            h2.pods[0].ip
        )),
        "pods cannot talk\n{}",
        a1.log()
    );
    let stranger_ip = Ipv4Addr::new(198, 18, 0, 9);
    let stranger = bench.underlay.attach("x", stranger_ip, 1500);
    const PORT: u16 = 7777;
    let hosts = [&h1, &h2];
    let socks: Vec<UdpSocket> = hosts
        .iter()
        .map(|h| {
            let ip = h.pods[0].ip;
            h.pods[0]
                .ns
                .enter(move || UdpSocket::bind((ip, PORT)))
                .expect("bind in pod")
        })
        .collect();
    const ROUNDS: u64 = 5;
    for round in 0..ROUNDS {
        for (i, h) in hosts.iter().enumerate() {
            let inner = Inner {
                dst_mac: vtep_mac(&h.ns),
                src_mac: [0x02, 0, 0, 0, 0x66, 0x66],
                // Another host's pod: what a spoofer would pick.
                src: hosts[1 - i].pods[0].ip,
                dst: h.pods[0].ip,
                port: PORT,
                payload: format!("stranger {round}").into_bytes(),
            };
            let datagram = craft::vxlan_datagram(1, 8472, &inner);
            craft::send_raw(
                &stranger,
                h.ip,
                craft::ipv4_packets(stranger_ip, h.ip, &datagram, Shape::default()),
            );
        }
    }
    let got: Vec<Vec<String>> = socks
        .iter()
        .map(|s| received(s, Duration::from_millis(1500)))
        .collect();
    assert!(
        got[0].is_empty(),
        "stranger's VXLAN reached h1's pod: {:?}",
        got[0]
    );
    assert_eq!(
        got[1].len() as u64,
        ROUNDS,
        "--vxlan-peer-check=false: the kernel device takes the stranger's VXLAN, as upstream"
    );

    // Counted by source on h1, nothing on h2 (its check is off).
    let counted = wait_until(Duration::from_secs(5), || {
        dump_by_addr(&a1.pins.0, "STRANGERS").contains(&(stranger_ip, ROUNDS))
    });
    assert!(
        counted,
        "STRANGERS on h1: {:?}",
        dump_by_addr(&a1.pins.0, "STRANGERS")
    );
    assert!(dump_by_addr(&a2.pins.0, "STRANGERS").is_empty());
    // Named once, with the remedy, however many packets came.
    assert!(
        wait_until(Duration::from_secs(5), || strangers_logged(
            &a1,
            stranger_ip
        ) >= 1),
        "stranger not logged\n{}",
        a1.log()
    );
    let line = a1
        .log()
        .lines()
        .find(|l| l.contains("is not from a known peer"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        line.contains("public-ip-overwrite") && line.contains("--vxlan-peer-check=false"),
        "remedy missing: {line}"
    );
    eprintln!("h1 logged: {line}");
    // More packets later: still one line. A second stranger, named after them, shows the
    // agent has read the map since.
    let send_to_h1 = |from: &NetNs, src: Ipv4Addr| {
        let inner = Inner {
            dst_mac: vtep_mac(&h1.ns),
            src_mac: [0x02, 0, 0, 0, 0x66, 0x66],
            src: h2.pods[0].ip,
            dst: h1.pods[0].ip,
            port: PORT,
            payload: b"stranger again".to_vec(),
        };
        let datagram = craft::vxlan_datagram(1, 8472, &inner);
        craft::send_raw(
            from,
            h1.ip,
            craft::ipv4_packets(src, h1.ip, &datagram, Shape::default()),
        );
    };
    send_to_h1(&stranger, stranger_ip);
    assert!(wait_until(Duration::from_secs(5), || {
        dump_by_addr(&a1.pins.0, "STRANGERS").contains(&(stranger_ip, ROUNDS + 1))
    }));
    let other_ip = Ipv4Addr::new(198, 18, 0, 10);
    let other = bench.underlay.attach("y", other_ip, 1500);
    send_to_h1(&other, other_ip);
    assert!(
        wait_until(Duration::from_secs(5), || strangers_logged(&a1, other_ip)
            == 1),
        "second stranger not logged\n{}",
        a1.log()
    );
    assert_eq!(strangers_logged(&a1, stranger_ip), 1, "{}", a1.log());
    assert_eq!(strangers_logged(&a2, stranger_ip), 0);
    drop((a1, a2));
}

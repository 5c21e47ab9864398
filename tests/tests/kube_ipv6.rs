//! IPv6 in kube mode, end to end: three host namespaces on the underlay (IPv6
//! fd00:198::/64; IPv4 too for dual stack), the in-test API server, one
//! `flanneld --kube-subnet-mgr` per host, pods behind each (set up by
//! [`KubeCluster`]).
//!
//! * IPv6-only (`EnableIPv4: false`), kernel vxlan and host-gw: hosts without any IPv4
//!   address (the API server is reached over IPv6), node objects with an IPv6 pod CIDR
//!   only, pods with IPv6 only, `flannel-v6.1` and no `flannel.1`, upstream's
//!   four-line `subnet.env`, upstream's annotations on the Node objects; every pod pair
//!   pings, iperf3 ≥ 1 Gbit/s, ICMPv6 packet-too-big at the pod MTU.
//! * IPv6-only with the eBPF datapath (`auto` picks it, `ebpf` is accepted) on two hosts
//!   and the kernel device on the third: the programs on `flannel-v6.1` and the uplink,
//!   CONFIG without an IPv4 device, IPv6-only PEERS/ROUTES entries (also as bpftool
//!   dumps them), BPF counters moving both ways eBPF⇄eBPF and eBPF⇄kernel, iperf3,
//!   packet-too-big, the per-flow fast path, a stranger's VXLAN over IPv6 dropped and
//!   counted by source; repair of `flannel-v6.1`, its encap link and CONFIG.
//! * The IPv6 blackhole route (`--ip-blackhole-route`) of the own subnet: present,
//!   repaired after deletion, and traffic to an unassigned own address stays on the host.
//! * Dual stack: `spec.podCIDRs` with both families, one eBPF host and two kernel hosts,
//!   one host publishing a `public-ipv6-overwrite`; every pod pair pings over both
//!   families, and the annotations match upstream's byte for byte; packet-too-big at the
//!   pod MTU and iperf3 over IPv6, eBPF ⇄ kernel. Dual-stack host-gw: routes of both
//!   families via each peer's addresses, upstream's annotations, pings, iperf3.
//!
//! Needs root and a built agent: `cargo build --bins`, then
//! `cargo test -p flannel-e2e --test kube_ipv6`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, UdpSocket},
    time::Duration,
};

use flannel_e2e::{
    craft,
    kube_api::KubeApi,
    kube_cluster::{
        KubeAgent, KubeCluster, P, Stack, pod_subnet4, pod_subnet6 as subnet6, readyz,
        start_agent_with, wait_for_subnet_env,
    },
    netns::{Host, NetNs, host_ip, host_ip6, wait_until},
    require_root,
};

const V6_NETWORK: &str = "fd00:10:244::/56";

fn v6_only_conf(backend: &str) -> String {
    format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{V6_NETWORK}","Backend":{{"Type":"{backend}"}}}}"#
    )
}

fn v6_only_conf_nft(nftables: bool) -> String {
    format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{V6_NETWORK}","EnableNFTables":{nftables},"Backend":{{"Type":"vxlan"}}}}"#
    )
}

/// The MAC of `dev` in `ns`.
fn mac_of(ns: &NetNs, dev: &str) -> String {
    // `ip`, not /sys/class/net: sysfs shows the namespace it was mounted in.
    let out = ns.sh(&format!("ip -br link show dev {dev}"));
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"))
        .to_owned()
}

/// A MAC as `ip` prints it, as bytes.
fn mac_bytes(mac: &str) -> [u8; 6] {
    let v: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

fn has_link(ns: &NetNs, dev: &str) -> bool {
    ns.run(&format!("ip link show dev {dev}")).status.success()
}

/// The flannel annotations of `node` (default prefix), sorted.
fn flannel_annotations(api: &KubeApi, node: &str) -> BTreeMap<String, String> {
    api.annotations(node)
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(P)?.to_owned(), v)))
        .collect()
}

fn expect(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn logs(agents: &[&KubeAgent]) -> String {
    agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("--- agent {}:\n{}\n", i + 1, a.log()))
        .collect()
}

/// Every pod pings every pod over IPv6.
fn assert_all_pods_reach_each_other_v6(hosts: &[Host], agents: &[&KubeAgent]) {
    let pods: Vec<_> = hosts.iter().flat_map(|h| h.pods.iter()).collect();
    for from in &pods {
        for to in &pods {
            let to6 = to.ip6.expect("pod has an IPv6 address");
            let ok = wait_until(Duration::from_secs(15), || {
                from.ns
                    .run(&format!("ping -6 -c 1 -W 1 {to6}"))
                    .status
                    .success()
            });
            assert!(
                ok,
                "{} cannot reach {to6}\n{}",
                from.ns.name(),
                logs(agents)
            );
        }
    }
}

/// Every pod pings every pod over IPv4.
fn assert_all_pods_reach_each_other_v4(hosts: &[Host], agents: &[&KubeAgent]) {
    let pods: Vec<_> = hosts.iter().flat_map(|h| h.pods.iter()).collect();
    for from in &pods {
        for to in &pods {
            let ok = wait_until(Duration::from_secs(15), || {
                from.ns
                    .run(&format!("ping -c 1 -W 1 {}", to.ip))
                    .status
                    .success()
            });
            assert!(
                ok,
                "{} cannot reach {}\n{}",
                from.ns.name(),
                to.ip,
                logs(agents)
            );
        }
    }
}

/// Three IPv6-only hosts with net-conf `conf`: no IPv4 address anywhere (the API server
/// is reached over IPv6 too), every host on `--dataplane=kernel` with `extra` flags, two
/// IPv6-only pods each.
fn v6_only_cluster(conf: &str, extra: &[&str]) -> KubeCluster {
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    KubeCluster::start(3, Stack::Ipv6Only, conf, |_| "kernel", |_| extra.clone())
}

/// DF over IPv6 at the pod MTU, from host `from` to host `to` (1-based): a packet of
/// exactly the pod MTU (payload + 8 ICMPv6 + 40 IPv6) crosses; from a pod whose link
/// allows more, one byte more is answered by its host with ICMPv6 packet-too-big naming
/// the pod MTU (and the pod, having learnt it, fits again).
fn assert_packet_too_big_at_the_pod_mtu(c: &KubeCluster, from: u8, to: u8) {
    let (f, t) = (usize::from(from) - 1, usize::from(to) - 1);
    let mtu = c.agents[f].mtu();
    let fits = mtu - 48;
    let far6 = c.hosts[t].pods[0].ip6.unwrap();
    let small = &c.hosts[f].pods[0];
    small
        .ns
        .sh(&format!("ping -6 -c 1 -W 2 -M do -s {fits} {far6}"));
    // The second pod's link (and its host-side veth, `veth3`) at the uplink's 1500, so
    // the packet leaves the pod and meets the tunnel's MTU on its host.
    let big = &c.hosts[f].pods[1];
    big.ns.sh("ip link set eth0 mtu 1500");
    c.hosts[f].ns.sh("ip link set veth3 mtu 1500");
    let mut seen = String::new();
    let told = wait_until(Duration::from_secs(5), || {
        let out = big
            .ns
            .run(&format!("ping -6 -c 1 -W 1 -M do -s {} {far6}", fits + 1));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        seen.push_str(&text);
        !out.status.success()
            && [
                format!("mtu={mtu}"),
                format!("mtu = {mtu}"),
                format!("mtu: {mtu}"),
            ]
            .iter()
            .any(|m| text.contains(m.as_str()))
    });
    assert!(
        told && seen.contains("Packet too big"),
        "host {from} -> {to}: no packet-too-big with MTU {mtu}: {seen}"
    );
    big.ns
        .sh(&format!("ping -6 -c 1 -W 2 -M do -s {fits} {far6}"));
}

/// iperf3 over IPv6 from host `from`'s pod to host `to`'s, at least 1 Gbit/s (a floor
/// for correctness, not a benchmark).
fn assert_iperf6_gigabit(c: &KubeCluster, from: u8, to: u8, what: &str) {
    let seconds = 3;
    let bytes = c.iperf6(from, to, seconds);
    let gbit = bytes as f64 * 8.0 / f64::from(seconds) / 1e9;
    eprintln!("iperf3 over IPv6, {what} host {from} -> host {to}: {gbit:.2} Gbit/s");
    assert!(gbit >= 1.0, "{what}: {gbit:.2} Gbit/s\n{}", c.logs());
}

#[test]
fn kube_ipv6_only_vxlan_three_hosts_every_pod_pair_pings() {
    if !require_root() {
        return;
    }
    let c = v6_only_cluster(&v6_only_conf("vxlan"), &[]);
    let (hosts, agents, all) = (&c.hosts, &c.agents, c.agent_refs());
    for (i, (h, a)) in hosts.iter().zip(agents).enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        // Upstream's subnet.env with IPv4 off: no FLANNEL_NETWORK/FLANNEL_SUBNET.
        let env = std::fs::read_to_string(a.subnet_env()).unwrap();
        assert_eq!(
            env,
            format!(
                "FLANNEL_IPV6_NETWORK={V6_NETWORK}\nFLANNEL_IPV6_SUBNET=fd00:10:244:{n}::1/64\n\
                 FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
            )
        );
        // The IPv6 device only, over the IPv6 underlay.
        assert!(!has_link(&h.ns, "flannel.1"), "{}", h.ns.sh("ip link"));
        let link = h.ns.sh("ip -d link show flannel-v6.1");
        assert!(
            link.contains(&format!("local {}", host_ip6(n))) && link.contains("mtu 1430"),
            "{link}"
        );
        // Upstream's annotations, byte for byte: no backend-data/public-ip (a vxlan host
        // without an IPv4 VTEP writes neither).
        let want = expect(&[
            ("backend-type", "vxlan".into()),
            (
                "backend-v6-data",
                format!(
                    r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
                    mac_of(&h.ns, "flannel-v6.1")
                ),
            ),
            ("kube-subnet-manager", "true".into()),
            ("public-ipv6", host_ip6(n).to_string()),
        ]);
        let name = format!("h{n}");
        let ok = wait_until(Duration::from_secs(10), || {
            flannel_annotations(&c.bench.api, &name) == want
        });
        assert!(
            ok,
            "{name}: {:?}\nwant {want:?}",
            flannel_annotations(&c.bench.api, &name)
        );
        let ready = readyz(&h.ns);
        assert!(
            ready.contains("x-flannel-datapath: kernel") && !ready.contains("fallback"),
            "{ready}"
        );
    }

    assert_all_pods_reach_each_other_v6(hosts, &all);

    // The traffic crossed flannel-v6.1: its counters moved on both ends, and nothing
    // IPv4 was routed to a peer.
    let counter = |h: &Host, which: &str| -> u64 {
        let json = h.ns.sh("ip -j -s link show dev flannel-v6.1");
        let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j");
        v[0]["stats64"][which]["packets"]
            .as_u64()
            .expect("packet counter")
    };
    let (tx, rx) = (counter(&hosts[0], "tx"), counter(&hosts[2], "rx"));
    let far = hosts[2].pods[0].ip6.unwrap();
    hosts[0].pods[0]
        .ns
        .sh(&format!("ping -6 -c 5 -i 0.2 -W 1 {far}"));
    assert!(counter(&hosts[0], "tx") >= tx + 5);
    assert!(counter(&hosts[2], "rx") >= rx + 5);
    for h in hosts {
        let v4 = h.ns.sh("ip -4 route show proto 84");
        assert!(v4.trim().is_empty(), "IPv4 peer routes: {v4}");
    }

    assert_iperf6_gigabit(&c, 1, 2, "kernel vxlan");
    assert_packet_too_big_at_the_pod_mtu(&c, 1, 3);
}

#[test]
fn kube_ipv6_only_host_gw_three_hosts_every_pod_pair_pings() {
    if !require_root() {
        return;
    }
    // Host 1 asks for auto, which on host-gw needs no eBPF.
    let c = KubeCluster::start(
        3,
        Stack::Ipv6Only,
        &v6_only_conf("host-gw"),
        |i| if i == 1 { "auto" } else { "kernel" },
        |_| Vec::new(),
    );
    let (hosts, all) = (&c.hosts, c.agent_refs());
    for (i, (h, a)) in hosts.iter().zip(&c.agents).enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        assert_eq!(a.mtu(), 1500, "host-gw: the uplink MTU");
        for j in (1..=3u8).filter(|j| *j != n) {
            let want = format!("{} via {} dev eth0 proto 84", subnet6(j), host_ip6(j));
            let ok = wait_until(Duration::from_secs(10), || {
                h.ns.sh("ip -6 route show").contains(&want)
            });
            assert!(
                ok,
                "{}: no route {want:?}\n{}\n{}",
                h.ns.name(),
                h.ns.sh("ip -6 route show"),
                logs(&all)
            );
        }
        // Upstream writes backend-data/public-ip for a non-vxlan backend whatever the
        // families: `null` and its zero PublicIP.
        let want = expect(&[
            ("backend-data", "null".into()),
            ("backend-type", "host-gw".into()),
            ("backend-v6-data", "null".into()),
            ("kube-subnet-manager", "true".into()),
            ("public-ip", "0.0.0.0".into()),
            ("public-ipv6", host_ip6(n).to_string()),
        ]);
        let name = format!("h{n}");
        let ok = wait_until(Duration::from_secs(10), || {
            flannel_annotations(&c.bench.api, &name) == want
        });
        assert!(
            ok,
            "{name}: {:?}\nwant {want:?}",
            flannel_annotations(&c.bench.api, &name)
        );
        assert!(!has_link(&h.ns, "flannel.1") && !has_link(&h.ns, "flannel-v6.1"));
    }
    assert!(readyz(&hosts[0].ns).contains("x-flannel-datapath: host-gw"));
    assert!(!c.agents[0].pins.0.exists(), "host-gw pinned BPF objects");
    assert_all_pods_reach_each_other_v6(hosts, &all);
    // No tunnel: a DF packet of the pod MTU (the uplink's) crosses whole, and bulk TCP.
    let far6 = hosts[2].pods[0].ip6.unwrap();
    hosts[0].pods[0]
        .ns
        .sh(&format!("ping -6 -c 1 -W 2 -M do -s {} {far6}", 1500 - 48));
    assert_iperf6_gigabit(&c, 1, 3, "IPv6-only host-gw,");
}

/// The names of the programs attached (tcx) to `dev`'s `dir` (`ingress`, `egress`) in
/// `ns`.
fn tcx_programs(ns: &NetNs, dev: &'static str, dir: &str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let dir = if dir == "ingress" {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    ns.enter(move || {
        SchedClassifier::query_tcx(dev, dir)
            .expect("query tcx")
            .1
            .iter()
            .map(|p| p.name_as_str().unwrap_or_default().to_owned())
            .collect()
    })
}

/// The `Peer` entries of the pinned `PEERS` map as bpftool prints them: each key's
/// address.
fn bpftool_peer_keys(layout: &flannel_agent::backend::ebpf::PinLayout) -> Vec<IpAddr> {
    let path = layout.map(flannel_common::names::MAP_PEERS);
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
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    dump.as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["formatted"]["key"]["addr"]
                .as_array()
                .unwrap_or_else(|| panic!("no key address in {e}"))
                .iter()
                .map(|b| u8::try_from(b.as_u64().expect("byte")).expect("byte"))
                .collect();
            let bytes: [u8; 16] = bytes.try_into().expect("16-byte key");
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        })
        .collect()
}

/// The eBPF datapath on IPv6-only hosts: host 1 on `--dataplane=auto` and host 2 on
/// `ebpf` both run it, host 3 runs the kernel device. The encap program rides on
/// `flannel-v6.1` (there is no `flannel.1` link), CONFIG names no IPv4 device, the maps
/// hold each peer's IPv6 half only; IPv6 pod traffic is encapsulated and decapsulated by
/// BPF eBPF⇄eBPF and eBPF⇄kernel (per-peer counters), bulk TCP reaches 1 Gbit/s, the pod
/// MTU holds, and a stranger's VXLAN over IPv6 is dropped by BPF and counted by source
/// while a peer's arrives (and the kernel host, with upstream's default, takes both).
#[test]
fn kube_ipv6_only_ebpf_and_kernel_hosts_carry_ipv6_in_bpf() {
    if !require_root() {
        return;
    }
    let mut c = KubeCluster::start(
        3,
        Stack::Ipv6Only,
        &v6_only_conf("vxlan"),
        |i| match i {
            1 => "auto",
            2 => "ebpf",
            _ => "kernel",
        },
        |_| Vec::new(),
    );
    let open = |c: &KubeCluster, host: u8| {
        flannel_agent::backend::ebpf::open_pinned(&c.pin_layout(host)).expect("pinned maps")
    };
    for host in 1..=3u8 {
        let h = &c.hosts[usize::from(host) - 1];
        let ready = readyz(&h.ns);
        let want = if host < 3 { "ebpf" } else { "kernel" };
        assert!(
            ready.contains(&format!("x-flannel-datapath: {want}")) && !ready.contains("fallback"),
            "host {host}: {ready}\n{}",
            c.logs()
        );
        assert!(!has_link(&h.ns, "flannel.1"), "{}", h.ns.sh("ip link"));
    }
    for host in 1..=2u8 {
        let h = &c.hosts[usize::from(host) - 1];
        let layout = c.pin_layout(host);
        // The programs: encap on flannel-v6.1 egress, decap on the uplink; no encap link
        // for a flannel.1 that does not exist.
        assert!(layout.link("encap6").exists() && layout.link("decap").exists());
        assert!(!layout.link("encap").exists(), "an IPv4 encap link");
        for (dev, dir, prog) in [
            ("flannel-v6.1", "egress", flannel_common::names::PROG_ENCAP),
            ("eth0", "ingress", flannel_common::names::PROG_DECAP),
        ] {
            let attached = tcx_programs(&h.ns, dev, dir);
            assert_eq!(
                attached,
                vec![prog.to_owned()],
                "host {host}: tcx {dev} {dir}"
            );
        }
        // CONFIG: IPv6 source and device; the IPv4 device index 0 and no IPv4 source.
        let cfg = open(&c, host).config.get(&0, 0).expect("CONFIG");
        assert_eq!(
            (cfg.vxlan_ifindex, cfg.local_ip),
            (0, [0; 4]),
            "host {host}: {cfg:?}"
        );
        assert_eq!(cfg.vxlan6_ifindex, h.ns.ifindex("flannel-v6.1"), "{cfg:?}");
        assert_eq!(cfg.local_ip6, host_ip6(host).octets(), "{cfg:?}");
        assert_eq!(cfg.uplink_ifindex, h.ns.ifindex("eth0"), "{cfg:?}");
        // The maps: per peer its IPv6 subnet routed to its PublicIPv6 with its
        // flannel-v6.1 MAC, its PublicIPv6 on the allow-list; nothing IPv4.
        for peer in (1..=3u8).filter(|p| *p != host) {
            let (p6, under) = (subnet6(peer), host_ip6(peer));
            let mac = mac_bytes(&mac_of(&c.hosts[usize::from(peer) - 1].ns, "flannel-v6.1"));
            let ok = wait_until(Duration::from_secs(10), || {
                let dp = open(&c, host);
                let routes = dp.current_routes6().expect("routes");
                let peers = dp.current_peers6().expect("peers");
                routes
                    .get(&p6)
                    .is_some_and(|r| r.peer_ip == under.octets() && r.vtep_mac == mac)
                    && peers.get(&under).is_some_and(|p| {
                        flannel_agent::backend::ebpf::peer_subnet(p) == Some(p6.into())
                    })
            });
            let dp = open(&c, host);
            assert!(
                ok,
                "host {host}: peer {p6} via {under} not in the maps\n{:?}\n{:?}\n{}",
                dp.current_routes6(),
                dp.current_peers6(),
                c.logs()
            );
        }
        let dp = open(&c, host);
        assert!(dp.current_routes().expect("routes").is_empty());
        assert!(dp.current_peers().expect("peers").is_empty());
        let mut keys = bpftool_peer_keys(&layout);
        keys.sort();
        let want: Vec<IpAddr> = (1..=3u8)
            .filter(|p| *p != host)
            .map(|p| IpAddr::V6(host_ip6(p)))
            .collect();
        assert_eq!(keys, want, "host {host}: PEERS as bpftool dumps it");
    }

    assert_all_pods_reach_each_other_v6(&c.hosts, &c.agent_refs());

    // eBPF ⇄ eBPF and eBPF ⇄ kernel, each way: BPF encapsulates on the eBPF sender and
    // decapsulates on the eBPF receiver.
    let peer6 = |c: &KubeCluster, host: u8, peer: u8| {
        open(c, host)
            .counters()
            .expect("counters")
            .peers6
            .get(&host_ip6(peer))
            .copied()
            .unwrap_or_default()
    };
    for (a, b) in [(1u8, 2u8), (1, 3), (2, 3)] {
        let before = peer6(&c, a, b);
        let ping = |from: u8, to: u8| {
            let to6 = c.hosts[usize::from(to) - 1].pods[0].ip6.unwrap();
            c.hosts[usize::from(from) - 1].pods[0]
                .ns
                .sh(&format!("ping -6 -c 5 -i 0.2 -W 1 {to6}"))
        };
        ping(a, b);
        ping(b, a);
        let after = peer6(&c, a, b);
        assert!(
            after.tx_packets >= before.tx_packets + 10
                && after.rx_packets >= before.rx_packets + 10,
            "host {a}: IPv6 to/from host {b} not carried by BPF: {before:?} -> {after:?}\n{}",
            c.logs()
        );
    }

    // Bulk TCP between the eBPF hosts' pods is a verified pod flow: the per-flow fast path
    // (pod programs on every cni0 port, IPv6-only hosts too) carries it both ways.
    let path = |c: &KubeCluster, host: u8, which: &str| {
        open(c, host).counters().expect("counters").paths[which].packets
    };
    let (tx, rx) = (path(&c, 1, "fast_tx"), path(&c, 2, "fast_rx"));
    assert_iperf6_gigabit(&c, 1, 2, "eBPF");
    let (tx2, rx2) = (path(&c, 1, "fast_tx"), path(&c, 2, "fast_rx"));
    eprintln!(
        "fast path: host 1 fast_tx +{}, host 2 fast_rx +{}",
        tx2 - tx,
        rx2 - rx
    );
    assert!(
        tx2 > tx + 100 && rx2 > rx + 100,
        "the IPv6 flow stayed on the kernel path: fast_tx {tx} -> {tx2}, fast_rx {rx} -> {rx2}\n{}",
        c.logs()
    );
    assert_iperf6_gigabit(&c, 3, 2, "kernel -> eBPF");
    assert_packet_too_big_at_the_pod_mtu(&c, 1, 2);

    // A stranger's VXLAN over IPv6: dropped by BPF on the eBPF host and counted by
    // source, while a peer's identical probe arrives; the kernel host (upstream's
    // default, no peer check) takes the stranger's, which shows the probe is valid.
    let stranger6 = Ipv6Addr::new(0xfd00, 0x198, 0, 0, 0, 0, 0, 0x66);
    let stranger = c
        .bench
        .underlay
        .attach("x6", std::net::Ipv4Addr::new(198, 18, 1, 66), 1500);
    stranger.sh(&format!(
        "ip -4 addr flush dev eth0 && ip -6 addr add {stranger6}/64 dev eth0 nodad"
    ));
    const PORT: u16 = 7777;
    let sockets: Vec<UdpSocket> = [0usize, 2]
        .iter()
        .map(|&h| {
            let ip6 = c.hosts[h].pods[0].ip6.unwrap();
            c.hosts[h].pods[0]
                .ns
                .enter(move || UdpSocket::bind((ip6, PORT)))
                .expect("bind in pod")
        })
        .collect();
    let drops_before = open(&c, 1).counters().expect("counters").drops["unknown_peer"];
    let inner_src = c.hosts[1].pods[0].ip6.unwrap();
    let send = |from: &NetNs, src6: Ipv6Addr, to: usize, tag: &str| {
        let inner = craft::Inner6 {
            dst_mac: mac_bytes(&mac_of(&c.hosts[to].ns, "flannel-v6.1")),
            src_mac: [0x02, 0, 0, 0, 0x66, 0x66],
            src: inner_src,
            dst: c.hosts[to].pods[0].ip6.unwrap(),
            port: PORT,
            payload: tag.as_bytes().to_vec(),
        };
        let datagram = craft::vxlan_datagram6(1, 8472, &inner);
        let dst = host_ip6(u8::try_from(to + 1).unwrap());
        from.enter({
            // The VXLAN payload (the socket writes the UDP header and its checksum).
            let payload = datagram[8..].to_vec();
            move || {
                let s = UdpSocket::bind((src6, 0))?;
                s.send_to(&payload, (dst, 8472)).map(drop)
            }
        })
        .expect("send VXLAN over IPv6");
    };
    for to in [0, 2] {
        send(&stranger, stranger6, to, "stranger");
    }
    send(&c.hosts[1].ns, host_ip6(2), 0, "peer");
    let got: Vec<Vec<String>> = sockets
        .iter()
        .map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Ok(n) = s.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            got
        })
        .collect();
    eprintln!("arrived over IPv6 VXLAN: {got:?}");
    assert_eq!(
        got[0],
        vec!["peer".to_owned()],
        "eBPF host: only the peer's\n{}",
        c.logs()
    );
    assert_eq!(
        got[1],
        vec!["stranger".to_owned()],
        "upstream-default host takes anyone's"
    );
    let dp = open(&c, 1);
    let strangers = dp.strangers().expect("strangers");
    assert!(
        strangers
            .get(&IpAddr::V6(stranger6))
            .is_some_and(|n| n.packets >= 1),
        "stranger {stranger6} not counted by BPF: {strangers:?}"
    );
    let drops = dp.counters().expect("counters").drops["unknown_peer"];
    assert!(
        drops.packets > drops_before.packets,
        "unknown_peer drops {drops_before:?} -> {drops:?}"
    );
    drop(stranger);
}

/// Repair on an IPv6-only eBPF host: `flannel-v6.1` deleted under the agent comes back
/// with the encap program on its egress and CONFIG naming its new index (the IPv4 device
/// still 0), and a removed encap link pin is re-attached and pinned; after each, IPv6 pod
/// traffic to the kernel host is carried by BPF again (per-peer counters both ways).
#[test]
fn kube_ipv6_only_ebpf_host_repairs_its_device_link_and_config() {
    if !require_root() {
        return;
    }
    let c = KubeCluster::start(
        2,
        Stack::Ipv6Only,
        &v6_only_conf("vxlan"),
        |i| if i == 1 { "ebpf" } else { "kernel" },
        |_| Vec::new(),
    );
    assert_all_pods_reach_each_other_v6(&c.hosts, &c.agent_refs());
    let (h1, layout) = (&c.hosts[0].ns, c.pin_layout(1));
    let open = || flannel_agent::backend::ebpf::open_pinned(&layout).expect("pinned maps");
    let carried = |what: &str| {
        let to6 = c.hosts[1].pods[0].ip6.unwrap();
        let back = wait_until(Duration::from_secs(20), || {
            c.hosts[0].pods[0]
                .ns
                .run(&format!("ping -6 -c 1 -W 1 {to6}"))
                .status
                .success()
        });
        assert!(back, "{what}: no IPv6 traffic\n{}", c.logs());
        let peer = |dp: &flannel_agent::backend::ebpf::Datapath| {
            dp.counters().expect("counters").peers6[&host_ip6(2)]
        };
        let before = peer(&open());
        c.hosts[0].pods[0]
            .ns
            .sh(&format!("ping -6 -c 5 -i 0.2 -W 1 {to6}"));
        let after = peer(&open());
        assert!(
            after.tx_packets >= before.tx_packets + 5 && after.rx_packets >= before.rx_packets + 5,
            "{what}: not carried by BPF: {before:?} -> {after:?}\n{}",
            c.logs()
        );
    };
    carried("at start");

    let old = h1.ifindex("flannel-v6.1");
    h1.sh("ip link del flannel-v6.1");
    let repaired = wait_until(Duration::from_secs(20), || {
        has_link(h1, "flannel-v6.1") && {
            let now = h1.ifindex("flannel-v6.1");
            let cfg = open().config.get(&0, 0).expect("CONFIG");
            now != old
                && cfg.vxlan6_ifindex == now
                && cfg.vxlan_ifindex == 0
                && tcx_programs(h1, "flannel-v6.1", "egress")
                    == vec![flannel_common::names::PROG_ENCAP.to_owned()]
        }
    });
    assert!(
        repaired,
        "flannel-v6.1 not repaired with its program and CONFIG\n{}",
        c.agents[0].log()
    );
    carried("after flannel-v6.1 was re-created");

    std::fs::remove_file(layout.link("encap6")).expect("remove the encap6 link pin");
    let relinked = wait_until(Duration::from_secs(20), || {
        layout.link("encap6").exists()
            && tcx_programs(h1, "flannel-v6.1", "egress")
                == vec![flannel_common::names::PROG_ENCAP.to_owned()]
    });
    assert!(relinked, "encap6 not re-attached\n{}", c.agents[0].log());
    carried("after the encap6 link pin was removed");
}

/// `--ip-blackhole-route` on an IPv6-only host without a bridge for its subnet (as with
/// Canal): the agent keeps `blackhole <own IPv6 subnet>` (proto 84), puts it back after
/// it is deleted, and with a default route out of the host, traffic to an unassigned
/// address of the own subnet stays on the host while traffic to another address leaves
/// it (counted by the gateway).
#[test]
fn kube_ipv6_only_blackhole_route_is_kept_and_keeps_own_subnet_traffic_home() {
    if !require_root() {
        return;
    }
    let mut c = KubeCluster::hosts(2, Stack::Ipv6Only);
    // The default gateway, counting what reaches it for the pod network.
    let gw6 = Ipv6Addr::new(0xfd00, 0x198, 0, 0, 0, 0, 0, 0x200);
    let gw = c
        .bench
        .underlay
        .attach("gw", std::net::Ipv4Addr::new(198, 18, 1, 200), 1500);
    gw.sh(&format!(
        "ip -4 addr flush dev eth0 && ip -6 addr add {gw6}/64 dev eth0 nodad && \
         nft add table ip6 probe && nft add counter ip6 probe pods && \
         nft add chain ip6 probe pre '{{ type filter hook prerouting priority -300 ; }}' && \
         nft add rule ip6 probe pre ip6 daddr {V6_NETWORK} counter name pods"
    ));
    let reached_gw = || -> u64 {
        let json = gw.sh("nft -j list counter ip6 probe pods");
        let v: serde_json::Value = serde_json::from_str(&json).expect("nft -j");
        v["nftables"]
            .as_array()
            .and_then(|a| a.iter().find_map(|e| e["counter"]["packets"].as_u64()))
            .expect("counter packets")
    };
    let h1 = &c.hosts[0].ns;
    h1.sh(&format!("ip -6 route add default via {gw6}"));
    c.start_agents(
        &v6_only_conf("vxlan"),
        |_| "kernel",
        |_| vec!["--ip-blackhole-route".to_owned()],
    );
    let h1 = &c.hosts[0].ns;
    let own = subnet6(1);
    let blackhole = || {
        h1.sh("ip -6 route show type blackhole")
            .lines()
            .any(|l| l.starts_with(&format!("blackhole {own} ")) && l.contains("proto 84"))
    };
    assert!(
        wait_until(Duration::from_secs(10), blackhole),
        "no blackhole route for {own}:\n{}\n{}",
        h1.sh("ip -6 route show"),
        c.logs()
    );
    // Nothing else routes the own subnet (no cni0 on this host).
    let routes = h1.sh("ip -6 route show");
    assert!(
        !routes.lines().any(|l| l.starts_with(&format!("{own} "))),
        "{routes}"
    );

    // What leaves is seen: an unleased address of the network goes out the default route.
    let before = reached_gw();
    let _ = h1.run("ping -6 -c 3 -i 0.2 -W 1 fd00:10:244:ff::5");
    assert!(
        reached_gw() >= before + 3,
        "the gateway does not see what leaves h1"
    );

    let unassigned = "fd00:10:244:1::99";
    let stays = |what: &str| {
        let before = reached_gw();
        let out = h1.run(&format!("ping -6 -c 3 -i 0.2 -W 1 {unassigned}"));
        assert!(
            !out.status.success(),
            "{what}: {unassigned} answered: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            reached_gw(),
            before,
            "{what}: traffic to {unassigned} left the host"
        );
    };
    stays("at start");

    h1.sh(&format!("ip -6 route del blackhole {own}"));
    let back = wait_until(Duration::from_secs(15), blackhole);
    assert!(
        back,
        "blackhole route not put back:\n{}\n{}",
        h1.sh("ip -6 route show"),
        c.agents[0].log()
    );
    stays("after the repair");
    drop(gw);
}

#[test]
fn kube_dual_stack_ebpf_and_kernel_hosts_every_pod_pair_pings_over_both_families() {
    if !require_root() {
        return;
    }
    let mut c = KubeCluster::hosts(3, Stack::DualStack);
    // Host 3 tells its peers to tunnel IPv6 to a second address of its own (a NAT
    // address in real life).
    let overwrite6 = "fd00:198::103";
    c.hosts[2]
        .ns
        .sh(&format!("ip -6 addr add {overwrite6}/64 dev eth0 nodad"));
    c.bench.api.annotate(
        "h3",
        &[(&format!("{P}public-ipv6-overwrite"), Some(overwrite6))],
    );
    let conf = format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"{V6_NETWORK}","Backend":{{"Type":"vxlan"}}}}"#
    );
    c.start_agents(
        &conf,
        |i| if i == 1 { "ebpf" } else { "kernel" },
        |_| Vec::new(),
    );
    for (n, a) in (1u8..).zip(&c.agents) {
        let env = std::fs::read_to_string(a.subnet_env()).unwrap();
        assert_eq!(
            env,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{n}.1/24\n\
                 FLANNEL_IPV6_NETWORK={V6_NETWORK}\nFLANNEL_IPV6_SUBNET=fd00:10:244:{n}::1/64\n\
                 FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
            )
        );
    }
    c.add_pods(2);
    let (hosts, all, bench) = (&c.hosts, c.agent_refs(), &c.bench);
    assert!(readyz(&hosts[0].ns).contains("x-flannel-datapath: ebpf"));
    for (i, h) in hosts.iter().enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        let public6 = if n == 3 {
            overwrite6.to_owned()
        } else {
            host_ip6(n).to_string()
        };
        // Upstream's six annotations, byte for byte (and the user's overwrite kept).
        let mut want = expect(&[
            (
                "backend-data",
                format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, mac_of(&h.ns, "flannel.1")),
            ),
            ("backend-type", "vxlan".into()),
            (
                "backend-v6-data",
                format!(
                    r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
                    mac_of(&h.ns, "flannel-v6.1")
                ),
            ),
            ("kube-subnet-manager", "true".into()),
            ("public-ip", host_ip(n).to_string()),
            ("public-ipv6", public6.clone()),
        ]);
        if n == 3 {
            want.insert("public-ipv6-overwrite".into(), overwrite6.into());
        }
        let name = format!("h{n}");
        let ok = wait_until(Duration::from_secs(10), || {
            flannel_annotations(&bench.api, &name) == want
        });
        assert!(
            ok,
            "{name}: {:?}\nwant {want:?}",
            flannel_annotations(&bench.api, &name)
        );
        // Read back by the peers: their FDB sends this host's IPv6 VXLAN to public-ipv6.
        let mac6 = mac_of(&h.ns, "flannel-v6.1");
        for (j, peer) in hosts.iter().enumerate().filter(|(j, _)| *j != i) {
            let ok = wait_until(Duration::from_secs(10), || {
                peer.ns
                    .sh("bridge fdb show dev flannel-v6.1")
                    .contains(&format!("{mac6} dst {public6} self permanent"))
            });
            assert!(
                ok,
                "h{}: no FDB entry for {name}\n{}",
                j + 1,
                peer.ns.sh("bridge fdb show dev flannel-v6.1")
            );
        }
    }
    assert_all_pods_reach_each_other_v4(hosts, &all);
    assert_all_pods_reach_each_other_v6(hosts, &all);
    // IPv6 between hosts at full size and in bulk, eBPF ⇄ kernel.
    assert_packet_too_big_at_the_pod_mtu(&c, 1, 2);
    assert_iperf6_gigabit(&c, 1, 2, "dual-stack kube, eBPF ->");
    assert_iperf6_gigabit(&c, 3, 1, "dual-stack kube, kernel ->");
}

#[test]
fn kube_dual_stack_host_gw_routes_both_families() {
    if !require_root() {
        return;
    }
    let conf = format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"{V6_NETWORK}","Backend":{{"Type":"host-gw"}}}}"#
    );
    let c = KubeCluster::start(3, Stack::DualStack, &conf, |_| "kernel", |_| Vec::new());
    let (hosts, all) = (&c.hosts, c.agent_refs());
    for (i, (h, a)) in hosts.iter().zip(&c.agents).enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        assert_eq!(a.mtu(), 1500, "host-gw: the uplink MTU");
        for j in (1..=3u8).filter(|j| *j != n) {
            let want4 = format!("{} via {} dev eth0 proto 84", pod_subnet4(j), host_ip(j));
            let want6 = format!("{} via {} dev eth0 proto 84", subnet6(j), host_ip6(j));
            let ok = wait_until(Duration::from_secs(10), || {
                h.ns.sh("ip route show").contains(&want4)
                    && h.ns.sh("ip -6 route show").contains(&want6)
            });
            assert!(
                ok,
                "{}: no routes {want4:?} / {want6:?}\n{}{}\n{}",
                h.ns.name(),
                h.ns.sh("ip route show"),
                h.ns.sh("ip -6 route show"),
                logs(&all)
            );
        }
        // Upstream's annotations for a non-vxlan backend over both families.
        let want = expect(&[
            ("backend-data", "null".into()),
            ("backend-type", "host-gw".into()),
            ("backend-v6-data", "null".into()),
            ("kube-subnet-manager", "true".into()),
            ("public-ip", host_ip(n).to_string()),
            ("public-ipv6", host_ip6(n).to_string()),
        ]);
        let name = format!("h{n}");
        let ok = wait_until(Duration::from_secs(10), || {
            flannel_annotations(&c.bench.api, &name) == want
        });
        assert!(
            ok,
            "{name}: {:?}\nwant {want:?}",
            flannel_annotations(&c.bench.api, &name)
        );
        assert!(!has_link(&h.ns, "flannel.1") && !has_link(&h.ns, "flannel-v6.1"));
    }
    assert_all_pods_reach_each_other_v4(hosts, &all);
    assert_all_pods_reach_each_other_v6(hosts, &all);
    let far6 = hosts[2].pods[0].ip6.unwrap();
    hosts[0].pods[0]
        .ns
        .sh(&format!("ping -6 -c 1 -W 2 -M do -s {} {far6}", 1500 - 48));
    assert_iperf6_gigabit(&c, 1, 3, "dual-stack kube host-gw,");
}

/// The source address a TCP connection from `from` to `to` arrives with at `to`.
fn seen_source6(from: &NetNs, listen_ns: &NetNs, to: Ipv6Addr) -> IpAddr {
    let listener = listen_ns
        .enter(move || std::net::TcpListener::bind((to, 8080)))
        .unwrap_or_else(|e| panic!("bind [{to}]:8080: {e}"));
    let _conn = from
        .enter(move || {
            std::net::TcpStream::connect_timeout(&(to, 8080).into(), Duration::from_secs(3))
        })
        .unwrap_or_else(|e| panic!("connect [{to}]:8080: {e}"));
    let (_, peer) = listener.accept().expect("accept");
    peer.ip()
}

/// IPv6-only with `--ip-masq`: the IPv6 rules (ip6tables chains or the nft `ip6` table)
/// and no IPv4 ones; pod → outside leaves with the host's IPv6 address, pod → pod keeps
/// the pod's.
#[test]
fn kube_ipv6_only_ip_masq_installs_ipv6_rules_only() {
    if !require_root() {
        return;
    }
    for nftables in [false, true] {
        let mut c = v6_only_cluster(&v6_only_conf_nft(nftables), &["--ip-masq=true"]);
        let outside_ip6: Ipv6Addr = "fd00:198::200".parse().unwrap();
        let outside = c
            .bench
            .underlay
            .attach("out", "198.18.1.2".parse().unwrap(), 1500);
        let (hosts, all) = (&c.hosts, c.agent_refs());
        outside.sh(&format!("ip -6 addr add {outside_ip6}/64 dev eth0 nodad"));
        assert_all_pods_reach_each_other_v6(hosts, &all);
        let h1 = &hosts[0].ns;
        if nftables {
            let table = h1.sh("nft list table ip6 flannel-ipv6");
            assert!(
                table.contains("ip6 daddr != ff00::/8 masquerade fully-random")
                    && table.contains("chain forward"),
                "{table}"
            );
            assert!(
                !h1.run("nft list table ip flannel-ipv4").status.success(),
                "an IPv4 table on an IPv6-only host"
            );
        } else {
            let nat = h1.sh("ip6tables -t nat -S");
            assert!(
                nat.contains(&format!("-A FLANNEL-POSTRTG -s {V6_NETWORK} ! -d ff00::/8")),
                "{nat}"
            );
            assert!(
                h1.sh("ip6tables -t filter -S")
                    .contains(&format!("-A FLANNEL-FWD -s {V6_NETWORK}")),
                "{}",
                h1.sh("ip6tables -t filter -S")
            );
            let v4 = h1.sh("iptables -t nat -S; iptables -t filter -S");
            assert!(
                !v4.contains("FLANNEL"),
                "IPv4 rules on an IPv6-only host:\n{v4}"
            );
        }
        let (a, b) = (&hosts[0].pods[0], &hosts[1].pods[0]);
        assert_eq!(
            seen_source6(&a.ns, &outside, outside_ip6),
            IpAddr::V6(host_ip6(1)),
            "pod → outside not masqueraded (nftables {nftables})\n{}",
            logs(&all)
        );
        let b6 = b.ip6.unwrap();
        assert_eq!(
            seen_source6(&a.ns, &b.ns, b6),
            IpAddr::V6(a.ip6.unwrap()),
            "pod → pod masqueraded (nftables {nftables})"
        );
        drop(outside);
        drop(c);
    }
}

/// IPv6-only restart as after a reboot: the agent stops and `flannel-v6.1` goes; the new
/// agent re-creates it with the MAC its node's `backend-v6-data` names (read back from the
/// API server), so the annotations and every peer's NDP/FDB entries stay valid, and pods
/// reach each other again. No run logs own-lease tampering or a skipped node.
#[test]
fn kube_ipv6_only_restart_keeps_the_vtep_mac_and_traffic() {
    if !require_root() {
        return;
    }
    let conf = v6_only_conf("vxlan");
    let mut c = v6_only_cluster(&conf, &[]);
    assert_all_pods_reach_each_other_v6(&c.hosts, &c.agent_refs());
    let before = flannel_annotations(&c.bench.api, "h1");
    let mac = mac_of(&c.hosts[0].ns, "flannel-v6.1");
    assert!(
        before["backend-v6-data"].contains(&mac),
        "{before:?} vs {mac}"
    );
    let old = c.agents.remove(0);
    drop(old);
    c.hosts[0].ns.sh("ip link del flannel-v6.1");
    let restarted = start_agent_with(&c.hosts[0].ns, "h1", &c.bench.api, "kernel", &conf, &[]);
    c.agents.insert(0, restarted);
    let all = c.agent_refs();
    wait_for_subnet_env(&all);
    let back = wait_until(Duration::from_secs(10), || {
        has_link(&c.hosts[0].ns, "flannel-v6.1")
    });
    assert!(back, "flannel-v6.1 not re-created\n{}", c.agents[0].log());
    assert_eq!(
        mac_of(&c.hosts[0].ns, "flannel-v6.1"),
        mac,
        "the VTEP MAC changed"
    );
    assert_all_pods_reach_each_other_v6(&c.hosts, &all);
    assert_eq!(
        flannel_annotations(&c.bench.api, "h1"),
        before,
        "annotations churned"
    );
    // (A node seen before its agent annotated it is skipped at debug level: not counted.)
    for (i, a) in c.agents.iter().enumerate() {
        let log = a.log();
        let loud = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"));
        for line in loud {
            for bad in ["own lease was", "skipping node", "programming peer failed"] {
                assert!(!line.contains(bad), "agent {}: {line}\n{log}", i + 1);
            }
        }
    }
}

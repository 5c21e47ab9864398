//! Dual stack end to end in etcd mode: three host namespaces with IPv4 and IPv6 underlay
//! addresses, two pods each with both families, real etcd, one `flanneld` per host.
//! IPv6 rides `flannel-v6.1` over the IPv6 underlay (vxlan) or IPv6 routes via each
//! peer's `PublicIPv6` (host-gw); eBPF hosts carry both families in their programs
//! (IPv6 GSO aggregates on the kernel device, which alone can checksum each segment).
//!
//! Needs root and a built agent: `cargo build -p flannel-agent --bin flanneld`, then
//! `cargo test -p flannel-e2e --test dual_stack`.

use std::{
    net::{IpAddr, Ipv6Addr, UdpSocket},
    time::Duration,
};

use flannel_e2e::{
    cluster::{BpfPins, Cluster, PREFIX, SubnetEnv, dual_stack_net_conf},
    craft,
    netns::{NetNs, host_ip6, wait_until},
    require_root,
};

/// The MAC of `dev` in `ns`.
fn mac_of(ns: &NetNs, dev: &str) -> String {
    // `ip`, not /sys/class/net: sysfs shows the namespace it was mounted in.
    let out = ns.sh(&format!("ip -br link show dev {dev}"));
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"))
        .to_owned()
}

/// What etcd holds under `<prefix>/subnets/` for host `i` (1-based), found by the IPv4
/// subnet in `env`: its full key and value.
fn lease_of(c: &Cluster, env: &SubnetEnv) -> (String, String) {
    let sn6 = env.ipv6_subnet.expect("IPv6 subnet");
    let key = format!(
        "{PREFIX}/subnets/{}-{}&{}-{}",
        env.subnet.network(),
        env.subnet.prefix(),
        sn6.network(),
        sn6.prefix()
    );
    let value = c
        .etcd_get(&key)
        .unwrap_or_else(|| panic!("no lease at {key}\n{}", c.logs()));
    (key, value)
}

#[test]
fn dual_stack_vxlan_ebpf_and_kernel_hosts_connect_every_pod_over_both_families() {
    if !require_root() {
        return;
    }
    // Hosts 1–2 eBPF (IPv6 through the kernel device), host 3 kernel VXLAN only.
    let pins = BpfPins::new("ds", 3);
    let (c, envs) =
        Cluster::start_dual_stack(3, &dual_stack_net_conf(r#"{"Type":"vxlan"}"#), |i| {
            if i < 3 {
                vec!["--dataplane=ebpf".into(), pins.arg(i)]
            } else {
                vec!["--dataplane=kernel".into()]
            }
        });

    for (i, (n, env)) in c.nodes.iter().zip(&envs).enumerate() {
        let ns = &n.host.ns;
        // subnet.env: both families; the MTU fits the IPv6 tunnel (1500 − 70).
        assert_eq!(env.ipv6_network.unwrap().to_string(), "fd00:10:244::/56");
        let sn6 = env.ipv6_subnet.unwrap();
        assert_eq!(sn6.prefix(), 64);
        assert_eq!(env.mtu, 1430, "{env:?}");
        let text = std::fs::read_to_string(&n.subnet_file).unwrap();
        assert!(
            text.contains(&format!("FLANNEL_IPV6_SUBNET={}1/64\n", sn6.network())),
            "{text}"
        );
        // The lease: key with the IPv6 part, upstream's JSON byte for byte with this
        // host's addresses and both devices' MACs.
        let (key, value) = lease_of(&c, env);
        let want = format!(
            r#"{{"PublicIP":"198.18.0.{h}","PublicIPv6":"{v6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{m4}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{m6}"}}}}"#,
            h = i + 1,
            v6 = host_ip6(u8::try_from(i + 1).unwrap()),
            m4 = mac_of(ns, "flannel.1"),
            m6 = mac_of(ns, "flannel-v6.1"),
        );
        assert_eq!(value, want, "{key}");
        // flannel-v6.1: over the IPv6 underlay, IPv6 checksums on, the subnet base /128,
        // MTU 1430, no router adverts.
        let link = ns.sh("ip -d link show flannel-v6.1");
        assert!(
            link.contains(&format!("local {}", host_ip6(u8::try_from(i + 1).unwrap())))
                && link.contains("dstport 8472")
                && link.contains("mtu 1430")
                && link.contains(" udpcsum noudp6zerocsumtx noudp6zerocsumrx "),
            "{link}"
        );
        let addrs = ns.sh("ip -6 -o addr show dev flannel-v6.1 scope global");
        assert!(addrs.contains(&format!("{}/128", sn6.network())), "{addrs}");
        assert_eq!(
            ns.sh("cat /proc/sys/net/ipv6/conf/flannel-v6.1/accept_ra")
                .trim(),
            "0"
        );
        // Per peer: NDP neighbour, FDB entry to its IPv6 address, onlink route.
        for (j, peer) in envs.iter().enumerate().filter(|(j, _)| *j != i) {
            let p6 = peer.ipv6_subnet.unwrap();
            let base = p6.network();
            let pmac = mac_of(&c.nodes[j].host.ns, "flannel-v6.1");
            let ok = wait_until(Duration::from_secs(10), || {
                let state = ns.sh(
                    "ip -6 neigh show dev flannel-v6.1; bridge fdb show dev flannel-v6.1; ip -6 route show",
                );
                state.contains(&format!("{base} lladdr {pmac} PERMANENT"))
                    && state.contains(&format!(
                        "{pmac} dst {} self permanent",
                        host_ip6(u8::try_from(j + 1).unwrap())
                    ))
                    && state.contains(&format!(
                        "{p6} via {base} dev flannel-v6.1 proto 84 metric 1024 onlink"
                    ))
            });
            assert!(
                ok,
                "{}: peer {p6} not programmed\n{}\n{}",
                ns.name(),
                ns.sh("ip -6 neigh show dev flannel-v6.1; bridge fdb show dev flannel-v6.1; ip -6 route show"),
                c.logs()
            );
        }
    }

    c.assert_all_pods_reach_each_other();
    c.assert_all_pods_reach_each_other_v6();

    // MTU: a full-size IPv6 packet at the pod MTU (1382 + 8 ICMPv6 + 40 = 1430) crosses;
    // a pod with a larger MTU gets ICMPv6 packet-too-big from its host for anything above
    // the tunnel MTU, and then fits.
    let (p1, far) = (&c.nodes[0].host.pods[0], &c.nodes[2].host.pods[0]);
    let far6 = far.ip6.unwrap();
    p1.ns.sh(&format!("ping -6 -c 1 -W 2 -M do -s 1382 {far6}"));
    let big = &c.nodes[0].host.pods[1];
    big.ns.sh("ip link set eth0 mtu 1500");
    c.nodes[0].host.ns.sh("ip link set veth3 mtu 1500");
    let mut text = String::new();
    let told = wait_until(Duration::from_secs(5), || {
        let out = big
            .ns
            .run(&format!("ping -6 -c 1 -W 1 -M do -s 1452 {far6}"));
        text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        !out.status.success()
            && ["mtu=1430", "mtu = 1430", "mtu: 1430"]
                .iter()
                .any(|m| text.contains(m))
    });
    assert!(told, "no packet-too-big with MTU 1430: {text}");
    big.ns
        .sh(&format!("ping -6 -c 1 -W 2 -M do -s 1382 {far6}"));

    // IPv6 pod traffic crosses flannel-v6.1 (not some other path): the kernel host's
    // device counters move both ways (the eBPF host's traffic skips its device's counters:
    // see `dual_stack_ebpf_programs_carry_ipv6` for its own).
    let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[2].host.pods[0]);
    let counter = |n: usize, which: &str| -> u64 {
        let json = c.nodes[n].host.ns.sh("ip -j -s link show dev flannel-v6.1");
        let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j");
        v[0]["stats64"][which]["packets"]
            .as_u64()
            .expect("packet counter")
    };
    let (tx, rx) = (counter(2, "tx"), counter(2, "rx"));
    a.ns.sh(&format!("ping -6 -c 5 -i 0.2 -W 1 {}", b.ip6.unwrap()));
    assert!(
        counter(2, "tx") >= tx + 5,
        "host 3 flannel-v6.1 did not send"
    );
    assert!(
        counter(2, "rx") >= rx + 5,
        "host 3 flannel-v6.1 did not receive"
    );
}

/// A ClusterIP-style IPv6 Service address: inside the test underlay's on-link range but
/// owned by no host, so only the client host's DNAT makes it reachable.
const SERVICE_IP6: &str = "fd00:198::ffff:10";

/// kube-proxy-style IPv6 Services: DNAT on the client's host (ip6tables on one, an nft
/// `ip6` table on the other) to a pod on the other host, an eBPF host and a kernel-VXLAN
/// host; bulk data crosses in both directions, so the replies are un-NATed by the client
/// host's conntrack after crossing the tunnel.
#[test]
fn ipv6_services_dnat_to_a_pod_on_another_host_both_directions() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("ds-svc", 1);
    let (c, _envs) =
        Cluster::start_dual_stack(2, &dual_stack_net_conf(r#"{"Type":"vxlan"}"#), |i| {
            if i == 1 {
                vec!["--dataplane=ebpf".into(), pins.arg(1)]
            } else {
                vec!["--dataplane=kernel".into()]
            }
        });
    c.assert_all_pods_reach_each_other_v6();
    let service: Ipv6Addr = SERVICE_IP6.parse().unwrap();
    let pod = |h: usize| &c.nodes[h].host.pods[0];
    let dnat = [
        (
            0,
            format!(
                "ip6tables -t nat -A PREROUTING -d {SERVICE_IP6}/128 -p tcp --dport 5201 -j DNAT --to-destination [{}]:5201",
                pod(1).ip6.unwrap()
            ),
            "ip6tables -t nat -F PREROUTING".to_owned(),
        ),
        (
            1,
            format!(
                "nft 'add table ip6 svc; add chain ip6 svc pre {{ type nat hook prerouting priority dstnat; }}; add rule ip6 svc pre ip6 daddr {SERVICE_IP6} tcp dport 5201 dnat to [{}]:5201'",
                pod(0).ip6.unwrap()
            ),
            "nft delete table ip6 svc".to_owned(),
        ),
    ];
    for (client, add, remove) in dnat {
        let (from, to) = (pod(client), pod(1 - client));
        c.nodes[client].host.ns.sh(&add);
        for args in [&["-t", "1"][..], &["-t", "1", "-R"][..]] {
            let report = flannel_e2e::twohost::iperf(&from.ns, &to.ns, service, args);
            let bytes = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
            assert!(
                bytes > 5_000_000,
                "host {} IPv6 service, iperf3 {args:?}: only {bytes} bytes\n{}",
                client + 1,
                c.logs()
            );
        }
        c.nodes[client].host.ns.sh(&remove);
    }
}

/// `ping` from `from` to `to` every 50 ms until stopped; its summary is read at the end.
struct Pinger {
    guard: flannel_e2e::netns::ChildGuard,
    out: std::process::ChildStdout,
    what: String,
}

impl Pinger {
    fn start(from: &NetNs, to: std::net::Ipv4Addr) -> Self {
        let mut child = from
            .command("ping")
            .args(["-n", "-i", "0.05", "-W", "1", &to.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ping");
        let out = child.stdout.take().expect("ping stdout");
        Self {
            guard: flannel_e2e::netns::ChildGuard::new(child),
            out,
            what: format!("{} -> {to}", from.name()),
        }
    }

    /// Stops it (SIGINT: ping prints its summary) and returns (sent, received, output).
    fn finish(mut self) -> (u64, u64, String) {
        use std::io::Read;
        self.guard.stop(libc::SIGINT, Duration::from_secs(5));
        let mut text = String::new();
        self.out.read_to_string(&mut text).expect("ping output");
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("{}: no ping summary in {text}", self.what));
        let num = |word: &str| -> u64 {
            let before = &line[..line.find(word).expect("summary field")];
            before
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .expect("count")
        };
        (
            num(" packets transmitted"),
            num(" received"),
            format!("{}: {line}", self.what),
        )
    }
}

/// The upgrade an operator does: a running IPv4-only cluster (two eBPF hosts, one kernel
/// host) gets `EnableIPv6` in its etcd config and its agents are restarted one at a time.
/// Pods keep pinging each other over IPv4 throughout and lose nothing; each restarted host
/// keeps its IPv4 subnet, gains an IPv6 one, and in the end every pod pair talks over both.
#[test]
fn upgrading_ipv4_only_to_dual_stack_one_host_at_a_time_never_stops_ipv4() {
    if !require_root() {
        return;
    }
    let v4_conf = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
    let pins = BpfPins::new("ds-up", 3);
    let mut c = Cluster::prepare_each(3, v4_conf, |i| {
        if i < 3 {
            vec!["--dataplane=ebpf".into(), pins.arg(i)]
        } else {
            vec!["--dataplane=kernel".into()]
        }
    });
    // The hosts already have IPv6 underlay addresses (an operator enables dual stack on a
    // network that has it); the IPv4-only agents ignore them.
    c.add_ipv6_underlay();
    for n in &mut c.nodes {
        n.start();
    }
    let before = c.add_pods(1);
    assert!(before.iter().all(|e| e.ipv6_subnet.is_none()), "{before:?}");
    c.assert_all_pods_reach_each_other();

    let pingers: Vec<Pinger> = (0..3)
        .map(|i| {
            let (from, to) = (&c.nodes[i].host.pods[0], &c.nodes[(i + 1) % 3].host.pods[0]);
            Pinger::start(&from.ns, to.ip)
        })
        .collect();
    c.etcd_put(
        &format!("{PREFIX}/config"),
        &dual_stack_net_conf(r#"{"Type":"vxlan"}"#),
    );
    let mut after = Vec::new();
    for (i, (n, was)) in c.nodes.iter_mut().zip(&before).enumerate() {
        n.stop();
        n.start();
        let mut env = None;
        let upgraded = wait_until(Duration::from_secs(30), || {
            env = n.subnet_env().filter(|e| e.ipv6_subnet.is_some());
            env.is_some()
        });
        assert!(
            upgraded,
            "host {} wrote no dual-stack subnet.env\n{}",
            i + 1,
            n.log()
        );
        let env = env.unwrap();
        assert_eq!(
            env.subnet,
            was.subnet,
            "host {} changed its IPv4 subnet",
            i + 1
        );
        assert!(env.ipv6_subnet.is_some(), "host {}: {env:?}", i + 1);
        after.push(env);
    }
    // Everyone is upgraded: let the pings run a little longer over the final state.
    let all_v6 = wait_until(Duration::from_secs(15), || {
        (0..3).all(|i| {
            let sn6 = after[(i + 1) % 3].ipv6_subnet.unwrap();
            c.nodes[i]
                .host
                .ns
                .sh("ip -6 route show")
                .contains(&sn6.to_string())
        })
    });
    assert!(
        all_v6,
        "IPv6 routes missing after the upgrade\n{}\n{}",
        c.nodes
            .iter()
            .map(|n| n
                .host
                .ns
                .sh("ip -6 route show; ip -6 neigh show dev flannel-v6.1"))
            .collect::<Vec<_>>()
            .join("---\n"),
        c.logs()
    );
    let mut lost = Vec::new();
    for p in pingers {
        let (sent, received, line) = p.finish();
        assert!(sent > 20, "{line}");
        if received != sent {
            lost.push(line);
        }
    }
    assert!(
        lost.is_empty(),
        "IPv4 pings lost during the upgrade:\n{}\n{}",
        lost.join("\n"),
        c.logs()
    );
    c.add_pod_ipv6(&after);
    c.assert_all_pods_reach_each_other();
    c.assert_all_pods_reach_each_other_v6();
}

/// What the agent owns on `flannel-v6.1` is put back as soon as the kernel reports it gone
/// (netlink events for IPv6 routes, addresses, neighbours and the device), not only by the
/// periodic resync: the agent's log names the event that triggered each repair.
#[test]
fn ipv6_device_state_is_repaired_on_netlink_events() {
    if !require_root() {
        return;
    }
    let (c, envs) =
        Cluster::start_dual_stack(2, &dual_stack_net_conf(r#"{"Type":"vxlan"}"#), |_| {
            vec![
                "--dataplane=kernel".into(),
                "--log-level=flannel_agent::agent=debug,info".into(),
            ]
        });
    c.assert_all_pods_reach_each_other_v6();
    let ns = &c.nodes[0].host.ns;
    let peer6 = envs[1].ipv6_subnet.unwrap();
    let base = peer6.network();
    let programmed = || {
        let state = ns.run(
            "ip -6 route show dev flannel-v6.1; ip -6 neigh show dev flannel-v6.1; ip -6 addr show dev flannel-v6.1",
        );
        let text = String::from_utf8_lossy(&state.stdout);
        state.status.success()
            && text.contains(&format!("{peer6} via {base}"))
            && text.contains(&format!("{base} lladdr"))
            && text.contains(&format!("{}/128", envs[0].ipv6_subnet.unwrap().network()))
    };
    assert!(programmed(), "{}", c.logs());
    for (tamper, event) in [
        (
            format!("ip -6 route del {peer6} dev flannel-v6.1"),
            format!("route {peer6} deleted"),
        ),
        (
            format!("ip -6 neigh del {base} dev flannel-v6.1"),
            format!("neighbour {base} deleted"),
        ),
        (
            "ip -6 addr flush dev flannel-v6.1 scope global".to_owned(),
            "address deleted".to_owned(),
        ),
        (
            "ip link del flannel-v6.1".to_owned(),
            "link flannel-v6.1 deleted".to_owned(),
        ),
    ] {
        let t0 = std::time::Instant::now();
        ns.sh(&tamper);
        let back = wait_until(Duration::from_secs(15), programmed);
        assert!(back, "`{tamper}` not repaired\n{}", c.logs());
        eprintln!("repair time `{tamper}`: {:.2?}", t0.elapsed());
        let log = c.nodes[0].log();
        assert!(
            log.lines()
                .any(|l| l.contains("owned kernel state changed; resyncing") && l.contains(&event)),
            "no netlink-triggered resync for `{tamper}` (wanted {event:?}):\n{log}"
        );
    }
    c.assert_all_pods_reach_each_other_v6();
}

/// `Udp6InCsumErrors` of `ns`: datagrams its kernel dropped for a bad UDP checksum.
fn udp6_csum_errors(ns: &NetNs) -> u64 {
    ns.sh("cat /proc/net/snmp6")
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Udp6InCsumErrors in /proc/net/snmp6")
}

/// The eBPF programs carry IPv6 inner over the IPv6 underlay: the maps hold every peer's
/// IPv6 subnet, `PublicIPv6` and v6 VTEP MAC; pod pings over IPv6 between eBPF hosts and
/// between an eBPF and a kernel-VXLAN host are encapsulated and decapsulated by BPF (its
/// per-peer counters move); the kernel host accepts what BPF sends (valid outer UDP
/// checksums: its `Udp6InCsumErrors` stay put, also for TCP whose checksums are computed
/// in software); iperf3 over IPv6 between eBPF hosts and between eBPF and kernel hosts.
#[test]
fn dual_stack_ebpf_programs_carry_ipv6() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("ds6", 3);
    let (c, envs) =
        Cluster::start_dual_stack(3, &dual_stack_net_conf(r#"{"Type":"vxlan"}"#), |i| {
            if i < 3 {
                vec!["--dataplane=ebpf".into(), pins.arg(i)]
            } else {
                vec!["--dataplane=kernel".into()]
            }
        });
    let open = |host: u8| {
        flannel_agent::backend::ebpf::open_pinned(&pins.layout(host)).expect("pinned maps")
    };
    // The maps: per peer its IPv6 subnet routed to its PublicIPv6 with its v6 VTEP MAC,
    // and its PublicIPv6 on the allow-list with that subnet.
    for host in 1..=2u8 {
        let i = usize::from(host - 1);
        for (j, peer) in envs.iter().enumerate().filter(|(j, _)| *j != i) {
            let p6 = peer.ipv6_subnet.unwrap();
            let under = host_ip6(u8::try_from(j + 1).unwrap());
            let mac = mac_bytes(&mac_of(&c.nodes[j].host.ns, "flannel-v6.1"));
            let ok = wait_until(Duration::from_secs(10), || {
                let dp = open(host);
                let routes = dp.current_routes6().expect("routes");
                let peers = dp.current_peers6().expect("peers");
                routes
                    .get(&p6)
                    .is_some_and(|r| r.peer_ip == under.octets() && r.vtep_mac == mac)
                    && peers.get(&under).is_some_and(|p| {
                        flannel_agent::backend::ebpf::peer_subnet(p) == Some(p6.into())
                    })
            });
            let dp = open(host);
            assert!(
                ok,
                "host {host}: peer {p6} via {under} not in the maps
{:?}
{:?}
{}",
                dp.current_routes6(),
                dp.current_peers6(),
                c.logs()
            );
        }
    }
    c.assert_all_pods_reach_each_other_v6();

    let peer6 = |host: u8, peer: u8| {
        open(host)
            .counters()
            .expect("counters")
            .peers6
            .get(&host_ip6(peer))
            .copied()
            .unwrap_or_default()
    };
    let pod6 = |h: usize| c.nodes[h].host.pods[0].ip6.unwrap();
    let errors3 = udp6_csum_errors(&c.nodes[2].host.ns);
    // eBPF ⇄ eBPF and eBPF ⇄ kernel, each way: BPF encapsulates on the eBPF sender and
    // decapsulates on the eBPF receiver.
    for (a, b) in [(1u8, 2u8), (1, 3), (2, 3)] {
        let before = peer6(a, b);
        let ping = |from: u8, to: u8| {
            c.nodes[usize::from(from - 1)].host.pods[0].ns.sh(&format!(
                "ping -6 -c 5 -i 0.2 -W 1 {}",
                pod6(usize::from(to - 1))
            ))
        };
        ping(a, b);
        ping(b, a);
        let after = peer6(a, b);
        assert!(
            after.tx_packets >= before.tx_packets + 10
                && after.rx_packets >= before.rx_packets + 10,
            "host {a}: IPv6 to/from host {b} not carried by BPF: {before:?} -> {after:?}
{}",
            c.logs()
        );
    }
    assert_eq!(
        udp6_csum_errors(&c.nodes[2].host.ns),
        errors3,
        "the kernel host refused outer UDP checksums"
    );

    // iperf3 over IPv6 between the eBPF hosts (as a correctness floor, not a benchmark);
    // bulk segments are GSO aggregates, which the kernel device sends.
    let seconds = 3;
    let bytes = c.iperf6(0, 1, seconds);
    let gbit = bytes as f64 * 8.0 / f64::from(seconds) / 1e9;
    eprintln!("iperf3 over IPv6, eBPF host 1 -> eBPF host 2: {gbit:.2} Gbit/s");
    assert!(
        gbit >= 1.0,
        "{gbit:.2} Gbit/s
{}",
        c.logs()
    );
    let passes = open(1).counters().expect("counters").passes;
    assert!(
        passes["ipv6_gso"].packets > 0,
        "bulk IPv6 went to the kernel device as GSO aggregates: {passes:?}"
    );

    // eBPF ⇄ kernel with host 1's pod sending unaggregated segments and its uplink
    // checksumming in software: every TCP segment goes through BPF with its inner
    // checksum still to be filled (`CHECKSUM_PARTIAL`), filled in at the uplink's
    // transmit, and host 3's kernel verifies each outer UDP checksum in full.
    c.nodes[0].host.pods[0]
        .ns
        .sh("ethtool -K eth0 tso off gso off");
    c.nodes[0]
        .host
        .ns
        .sh("ethtool -K eth0 tx off tso off gso off");
    let before = peer6(1, 3);
    let errors3 = udp6_csum_errors(&c.nodes[2].host.ns);
    let to_kernel = c.iperf6(0, 2, 2);
    let from_kernel = c.iperf6(2, 0, 2);
    let after = peer6(1, 3);
    eprintln!(
        "iperf3 over IPv6 with software checksums: eBPF -> kernel {} MB, kernel -> eBPF {} MB; BPF tx {} rx {} packets",
        to_kernel / 1_000_000,
        from_kernel / 1_000_000,
        after.tx_packets - before.tx_packets,
        after.rx_packets - before.rx_packets
    );
    assert!(
        to_kernel > 1_000_000 && from_kernel > 1_000_000,
        "{}",
        c.logs()
    );
    // Every data segment to the kernel host went through BPF (1430-byte packets).
    assert!(
        after.tx_packets - before.tx_packets > to_kernel / 1500,
        "TCP to the kernel host not encapsulated by BPF: {before:?} -> {after:?}"
    );
    assert_eq!(
        udp6_csum_errors(&c.nodes[2].host.ns),
        errors3,
        "the kernel host refused outer UDP checksums of TCP"
    );
}

#[test]
fn dual_stack_hostgw_routes_both_families() {
    if !require_root() {
        return;
    }
    let (c, envs) =
        Cluster::start_dual_stack(3, &dual_stack_net_conf(r#"{"Type":"host-gw"}"#), |_| {
            Vec::new()
        });
    for (i, n) in c.nodes.iter().enumerate() {
        for (j, e) in envs.iter().enumerate().filter(|(j, _)| *j != i) {
            let want = format!(
                "{} via {} dev eth0 proto 84",
                e.ipv6_subnet.unwrap(),
                host_ip6(u8::try_from(j + 1).unwrap())
            );
            let ok = wait_until(Duration::from_secs(10), || {
                n.host.ns.sh("ip -6 route show").contains(&want)
            });
            assert!(
                ok,
                "{}: no route {want:?}\n{}\n{}",
                n.host.ns.name(),
                n.host.ns.sh("ip -6 route show"),
                c.logs()
            );
        }
    }
    c.assert_all_pods_reach_each_other();
    c.assert_all_pods_reach_each_other_v6();

    // No tunnel: the pod MTU is the uplink's, and a DF packet of that size crosses whole
    // (ICMPv6 echo: 40 + 8 bytes of headers); bulk TCP over IPv6 between hosts.
    let mtu = envs[0].mtu;
    assert_eq!(mtu, 1500, "host-gw pods get the uplink MTU");
    let far6 = c.nodes[2].host.pods[0].ip6.unwrap();
    c.nodes[0].host.pods[0]
        .ns
        .sh(&format!("ping -6 -c 1 -W 2 -M do -s {} {far6}", mtu - 48));
    let seconds = 2;
    let gbit = c.iperf6(0, 1, seconds) as f64 * 8.0 / f64::from(seconds) / 1e9;
    eprintln!("iperf3 over IPv6, host-gw host 1 -> host 2: {gbit:.2} Gbit/s");
    assert!(gbit >= 1.0, "{gbit:.2} Gbit/s\n{}", c.logs());
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

/// IPv6 masquerade in both rule modes: pod → outside leaves with the host's IPv6 address,
/// pod → pod keeps the pod's; the rules are upstream's `ip6` table / ip6tables chain.
#[test]
fn dual_stack_ip_masq_rewrites_ipv6_leaving_the_cluster() {
    if !require_root() {
        return;
    }
    for nftables in [true, false] {
        let conf = format!(
            r#"{{"Network":"10.244.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","EnableNFTables":{nftables},"Backend":{{"Type":"vxlan"}}}}"#
        );
        let (mut c, _) = Cluster::start_dual_stack(2, &conf, |_| {
            vec!["--dataplane=kernel".into(), "--ip-masq=true".into()]
        });
        let outside_ip6: Ipv6Addr = "fd00:198::100".parse().unwrap();
        let outside = c
            .underlay
            .attach("out", "198.18.1.1".parse().unwrap(), 1500);
        outside.sh(&format!("ip -6 addr add {outside_ip6}/64 dev eth0 nodad"));
        c.assert_all_pods_reach_each_other_v6();
        let h1 = &c.nodes[0].host.ns;
        if nftables {
            let table = h1.sh("nft list table ip6 flannel-ipv6");
            assert!(
                table.contains("ip6 daddr != ff00::/8 masquerade fully-random")
                    && table.contains("chain forward"),
                "{table}"
            );
        } else {
            let nat = h1.sh("ip6tables -t nat -S");
            assert!(
                nat.contains("-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8"),
                "{nat}"
            );
            let filter = h1.sh("ip6tables -t filter -S");
            assert!(
                filter.contains("-A FLANNEL-FWD -s fd00:10:244::/56"),
                "{filter}"
            );
        }
        let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[1].host.pods[0]);
        assert_eq!(
            seen_source6(&a.ns, &outside, outside_ip6),
            IpAddr::V6(host_ip6(1)),
            "pod → outside not masqueraded (nftables {nftables})\n{}",
            c.logs()
        );
        let b6 = b.ip6.unwrap();
        assert_eq!(
            seen_source6(&a.ns, &b.ns, b6),
            IpAddr::V6(a.ip6.unwrap()),
            "pod → pod masqueraded (nftables {nftables})"
        );
        drop(outside);
    }
}

/// VXLAN over IPv6 from a stranger: `flannel-v6.1` has no program in front of it, so on an
/// eBPF host (check on by default) the nftables guard drops it unless it comes from a
/// peer's `PublicIPv6`; a kernel host with upstream's default takes it (which shows the
/// probe arrives). The inner frame is IPv4 to the host's pod, which the kernel device
/// forwards like any decapsulated packet.
#[test]
fn stranger_vxlan_over_ipv6_is_dropped_by_the_guard_and_a_peers_arrives() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("ds-guard", 1);
    let (mut c, _envs) =
        Cluster::start_dual_stack(2, &dual_stack_net_conf(r#"{"Type":"vxlan"}"#), |i| {
            if i == 1 {
                vec!["--dataplane=ebpf".into(), pins.arg(1)]
            } else {
                vec!["--dataplane=kernel".into()]
            }
        });
    c.assert_all_pods_reach_each_other_v6();
    let stranger6 = Ipv6Addr::new(0xfd00, 0x198, 0, 0, 0, 0, 0, 0x66);
    let stranger = c
        .underlay
        .attach("x6", std::net::Ipv4Addr::new(198, 18, 1, 66), 1500);
    stranger.sh(&format!("ip -6 addr add {stranger6}/64 dev eth0 nodad"));
    const PORT: u16 = 7777;
    let pods: Vec<std::net::Ipv4Addr> = c.nodes.iter().map(|n| n.host.pods[0].ip).collect();
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
    // The guard on host 1 lists host 2's IPv6 address.
    let set6 = |c: &Cluster| {
        c.nodes[0]
            .host
            .ns
            .sh("nft -j list set inet flannel-vxlan-guard peers6")
    };
    assert!(
        wait_until(Duration::from_secs(10), || set6(&c)
            .contains(&host_ip6(2).to_string())),
        "{}",
        set6(&c)
    );
    let send = |from: &NetNs, src6: Ipv6Addr, to: usize, tag: &str| {
        let inner = craft::Inner {
            dst_mac: mac_bytes(&mac_of(&c.nodes[to].host.ns, "flannel-v6.1")),
            src_mac: [0x02, 0, 0, 0, 0x66, 0x66],
            src: pods[1 - to],
            dst: pods[to],
            port: PORT,
            payload: tag.as_bytes().to_vec(),
        };
        // The VXLAN payload of the datagram (its UDP header is the socket's).
        let datagram = craft::vxlan_datagram(1, 8472, &inner);
        let dst = host_ip6(u8::try_from(to + 1).unwrap());
        from.enter({
            let payload = datagram[8..].to_vec();
            move || {
                let s = UdpSocket::bind((src6, 0))?;
                s.send_to(&payload, (dst, 8472)).map(drop)
            }
        })
        .expect("send VXLAN over IPv6");
    };
    for to in 0..2 {
        send(&stranger, stranger6, to, "stranger");
    }
    send(&c.nodes[1].host.ns, host_ip6(2), 0, "peer");
    let got: Vec<Vec<String>> = socks
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
    // The eBPF host's program dropped the stranger's (before the guard) and counted it by
    // source.
    let strangers = flannel_agent::backend::ebpf::open_pinned(&pins.layout(1))
        .expect("pinned maps")
        .strangers()
        .expect("strangers");
    assert!(
        strangers
            .get(&IpAddr::V6(stranger6))
            .is_some_and(|n| n.packets >= 1),
        "stranger {stranger6} not counted by BPF: {strangers:?}"
    );
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
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let v: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    v.try_into().expect("6 bytes")
}

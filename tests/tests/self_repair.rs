//! The running agent repairs what it owns, without a restart: two hosts, A on the eBPF
//! datapath and B on the kernel VXLAN device, a pod behind each, real etcd. Each test
//! tampers with one thing the way an operator or a misbehaving tool would (`ip link del
//! flannel.1`, `ip route del`, `ip nexthop flush`, deleting a neighbour or FDB entry,
//! flushing the rule set, removing the eBPF pins), then waits for the repair: the state is back, pod-to-pod
//! traffic flows both ways and — on A — through the eBPF programs (their per-peer counters
//! move, which they don't when detached or pointed at a stale ifindex).
//!
//! Repair times are printed (`repair time <what>: …`); the deadline asserted is generous
//! ([`DEADLINE`]) because the point tested is "repaired at all, without a restart"; the
//! agent's target (a netlink event: well under a second; a removed pin: the 1 s pin poll; a
//! flushed or edited peer-guard chain: the 2 s chain poll; anything else: the periodic
//! resync, 10 s) is in the notes, not in a timed assertion.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    netns::{NetNs, wait_until},
    require_root,
};

const VXLAN: &str = r#"{"Type":"vxlan"}"#;

/// How long a repair may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(15);

const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Host A (eBPF) and host B (kernel VXLAN), `--ip-masq`, a pod each, connected.
fn mixed_cluster(pins: &BpfPins, net: &str) -> Cluster {
    let mut c = Cluster::start_each(2, net, |i| {
        let mut args = vec!["--ip-masq".to_owned()];
        if i == 1 {
            args.extend(["--dataplane=ebpf".to_owned(), pins.arg(1)]);
        } else {
            args.push("--dataplane=kernel".to_owned());
        }
        args
    });
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    c
}

/// One ping each way between the two pods.
fn pods_talk(c: &Cluster) -> bool {
    let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[1].host.pods[0]);
    a.ns.run(&format!("ping -c 1 -W 1 {}", b.ip))
        .status
        .success()
        && b.ns
            .run(&format!("ping -c 1 -W 1 {}", a.ip))
            .status
            .success()
}

/// A's eBPF counters for peer B: (tx, rx) packets; `None` while the maps can't be opened.
fn ebpf_counters(pins: &BpfPins) -> Option<(u64, u64)> {
    let counters = open_pinned(&pins.layout(1)).ok()?.counters().ok()?;
    let s = counters.peers.get(&B_IP)?;
    Some((s.tx_packets, s.rx_packets))
}

/// Pods talk both ways, and on A through the programs: both counters moved.
fn pods_talk_through_ebpf(c: &Cluster, pins: &BpfPins) -> bool {
    let Some((tx0, rx0)) = ebpf_counters(pins) else {
        return false;
    };
    pods_talk(c) && ebpf_counters(pins).is_some_and(|(tx, rx)| tx > tx0 && rx > rx0)
}

/// Run `tamper`, then wait until `repaired` holds; prints and returns the time it took.
fn repair_time(
    c: &Cluster,
    what: &str,
    tamper: impl FnOnce(),
    mut repaired: impl FnMut() -> bool,
) -> Duration {
    let t0 = Instant::now();
    tamper();
    let ok = wait_until(DEADLINE, &mut repaired);
    let took = t0.elapsed();
    assert!(ok, "{what}: not repaired within {DEADLINE:?}\n{}", c.logs());
    eprintln!("repair time {what}: {took:.2?}");
    took
}

fn ip_json(ns: &NetNs, cmd: &str) -> serde_json::Value {
    serde_json::from_str(&ns.sh(&format!("ip -j {cmd}"))).expect("ip JSON")
}

fn ifindex(ns: &NetNs, dev: &str) -> Option<u64> {
    let out = ns.run(&format!("ip -j link show {dev}"));
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["ifindex"].as_u64()
}

fn vtep_mac(ns: &NetNs) -> String {
    ip_json(ns, "link show flannel.1")[0]["address"]
        .as_str()
        .expect("address")
        .to_owned()
}

/// Whether `ns` routes `subnet` via flannel.1 and has its neighbour and FDB entries.
fn peer_programmed(ns: &NetNs, subnet: &str, base: &str, mac: &str, dst: Ipv4Addr) -> bool {
    let routes = ns.run("ip route show dev flannel.1");
    let neigh = ns.run("ip neigh show dev flannel.1");
    let fdb = ns.run("bridge fdb show dev flannel.1");
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    text(&routes).contains(subnet)
        && text(&neigh).contains(&format!("{base} lladdr {mac} PERMANENT"))
        && text(&fdb).contains(&format!("{mac} dst {dst}"))
}

#[test]
fn vxlan_and_ebpf_state_is_repaired_without_a_restart() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("repair", 2);
    let c = mixed_cluster(&pins, &net_conf(VXLAN));
    let (a, b) = (&c.nodes[0].host.ns, &c.nodes[1].host.ns);
    let envs: Vec<_> = c.nodes.iter().map(|n| n.subnet_env().unwrap()).collect();
    let (a_subnet, b_subnet) = (envs[0].subnet, envs[1].subnet);
    let (a_mac, b_mac) = (vtep_mac(a), vtep_mac(b));
    let pids: Vec<u32> = c
        .nodes
        .iter()
        .map(|n| n.agent.as_ref().unwrap().pid())
        .collect();
    let mut times = Vec::new();

    // Per host, the kernel state both backends own. `me` tampers; `peer` is who it routes.
    let hosts = [
        ("A(ebpf)", a, b_subnet, b_mac.clone(), B_IP),
        ("B(kernel)", b, a_subnet, a_mac.clone(), A_IP),
    ];
    for (name, ns, peer_subnet, peer_mac, peer_ip) in &hosts {
        let (subnet, base) = (peer_subnet.to_string(), peer_subnet.network().to_string());
        // The device as the agent set it up, the peer's entries, traffic (on A through the
        // programs).
        let healthy = || {
            // Until it is re-created, the device is not there to inspect.
            if ifindex(ns, "flannel.1").is_none() {
                return false;
            }
            let dev = &ip_json(ns, "link show flannel.1")[0];
            dev["mtu"].as_u64() == Some(1450)
                && dev["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "UP"))
                && ns.sh("ip -4 -o addr show dev flannel.1").contains("/32")
                && peer_programmed(ns, &subnet, &base, peer_mac, *peer_ip)
                && if *name == "A(ebpf)" {
                    pods_talk_through_ebpf(&c, &pins)
                } else {
                    pods_talk(&c)
                }
        };
        assert!(healthy(), "{name} not healthy before tampering");
        let own_mac = vtep_mac(ns);
        let old_index = ifindex(ns, "flannel.1");
        let tamperings = [
            "ip link del flannel.1".to_owned(),
            format!("ip route del {subnet}"),
            // The route names a nexthop object; deleting that takes the route silently
            // (and iproute2 6.1's `ip route flush` cannot delete such routes at all).
            "ip nexthop flush".to_owned(),
            format!("ip neigh del {base} dev flannel.1"),
            format!("bridge fdb del {peer_mac} dev flannel.1 dst {peer_ip} self"),
            "ip link set flannel.1 down".to_owned(),
            "ip link set flannel.1 mtu 1400".to_owned(),
            "ip addr flush dev flannel.1".to_owned(),
        ];
        for cmd in tamperings {
            let what = format!("{name} {cmd}");
            let took = repair_time(&c, &what, || drop(ns.sh(&cmd)), &healthy);
            times.push((what, took));
            if cmd == "ip link del flannel.1" {
                // Re-created under a new index with the MAC the peer already holds.
                assert_eq!(vtep_mac(ns), own_mac, "{name}: VTEP MAC changed");
                assert_ne!(ifindex(ns, "flannel.1"), old_index);
            }
        }
        // The masquerade table (nftables mode, the default), flushed with everything else.
        let what = format!("{name} nft flush ruleset");
        let took = repair_time(
            &c,
            &what,
            || drop(ns.sh("nft flush ruleset")),
            || {
                let table = ns.run("nft list table ip flannel-ipv4");
                let text = String::from_utf8_lossy(&table.stdout);
                table.status.success()
                    && text.contains("masquerade")
                    && text.contains("chain forward")
            },
        );
        times.push((what, took));
    }

    // eBPF only (the known-peer check's default): the nftables VXLAN peer guard, flushed
    // whole and one element of its peer set deleted. Repaired by the periodic resync.
    let guard_holds_b = || {
        let out = a.run("nft list table inet flannel-vxlan-guard");
        let text = String::from_utf8_lossy(&out.stdout);
        // The element, and the rule dropping everyone else (`counter dropped` also reads
        // "drop").
        out.status.success() && text.contains(&B_IP.to_string()) && text.contains("!= @peers")
    };
    // A's `nft flush ruleset` above took the guard too; the periodic resync puts it back.
    assert!(
        wait_until(DEADLINE, guard_holds_b),
        "A's guard lacks B before tampering\n{}",
        c.logs()
    );
    for cmd in [
        "nft flush table inet flannel-vxlan-guard".to_owned(),
        format!("nft delete element inet flannel-vxlan-guard peers {{ {B_IP} }}"),
    ] {
        let what = format!("A(ebpf) {cmd}");
        let took = repair_time(
            &c,
            &what,
            || drop(a.sh(&cmd)),
            || guard_holds_b() && pods_talk_through_ebpf(&c, &pins),
        );
        times.push((what, took));
    }

    // eBPF only: the pinned tcx links (removing them detaches the programs) and map pins.
    let layout = pins.layout(1);
    let links = [layout.link("encap"), layout.link("decap")];
    times.push((
        "A(ebpf) rm pinned links".to_owned(),
        repair_time(
            &c,
            "pinned links",
            || {
                for l in &links {
                    std::fs::remove_file(l).expect("remove link pin");
                }
            },
            || links.iter().all(|l| l.exists()) && pods_talk_through_ebpf(&c, &pins),
        ),
    ));
    let routes_pin = layout.map("ROUTES");
    times.push((
        "A(ebpf) rm pinned ROUTES map".to_owned(),
        repair_time(
            &c,
            "pinned map",
            || std::fs::remove_file(&routes_pin).expect("remove map pin"),
            || {
                routes_pin.exists()
                    && open_pinned(&layout)
                        .ok()
                        .and_then(|d| d.current_routes().ok())
                        .is_some_and(|r| r.contains_key(&b_subnet))
                    && pods_talk_through_ebpf(&c, &pins)
            },
        ),
    ));

    // Nothing was restarted, and each repair was logged once by name.
    let mut c = c;
    for (n, pid) in c.nodes.iter_mut().zip(&pids) {
        let agent = n.agent.as_mut().unwrap();
        assert!(agent.running() && agent.pid() == *pid, "agent restarted");
    }
    let (log_a, log_b) = (c.nodes[0].log(), c.nodes[1].log());
    for kind in [
        "repaired device",
        "repaired route",
        "repaired neighbour",
        "repaired fdb",
        "repaired device_settings",
        "repaired rules",
    ] {
        assert!(log_a.contains(kind), "A log lacks {kind:?}\n{log_a}");
        assert!(log_b.contains(kind), "B log lacks {kind:?}\n{log_b}");
    }
    for kind in [
        "repaired tcx_link",
        "repaired pinned_map",
        "repaired datapath_config",
    ] {
        assert!(log_a.contains(kind), "A log lacks {kind:?}\n{log_a}");
    }
    // The guard's repairs, named: the table, and the element that was missing.
    let guard_lines: Vec<&str> = log_a
        .lines()
        .filter(|l| l.contains("repaired peer_guard") && l.contains("flannel-vxlan-guard"))
        .collect();
    assert!(
        guard_lines.len() >= 2,
        "A log lacks the guard repairs\n{log_a}"
    );
    assert!(
        guard_lines.iter().any(|l| l.contains("rules changed")),
        "A log does not name the flushed rules\n{log_a}"
    );
    assert!(
        guard_lines
            .iter()
            .any(|l| l.contains(&format!("set peers lacked {B_IP}"))),
        "A log does not name the deleted element\n{log_a}"
    );
    for (name, log) in [("A", &log_a), ("B", &log_b)] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("repaired ")).collect();
        eprintln!("{name}: {} repair log lines", lines.len());
        for l in &lines {
            eprintln!("  {l}");
        }
        // One line per repair: the device was re-created once, not fought over.
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("repaired device:"))
                .count(),
            1,
            "{name}"
        );
    }
    eprintln!("repair times:");
    for (what, t) in &times {
        eprintln!("  {what:45} {t:.2?}");
    }
}

#[test]
fn iptables_rules_are_repaired_without_a_restart() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("repair-ipt", 2);
    let net = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableNFTables":false,"Backend":{"Type":"vxlan"}}"#;
    let c = mixed_cluster(&pins, net);
    for (name, node) in [("A(ebpf)", &c.nodes[0]), ("B(kernel)", &c.nodes[1])] {
        let ns = &node.host.ns;
        let masq_ok = || {
            let nat = ns.sh("iptables -t nat -S");
            nat.contains("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG")
                && nat.contains("-j MASQUERADE")
        };
        let fwd_ok = || {
            let filter = ns.sh("iptables -t filter -S");
            filter.contains("-j FLANNEL-FWD") && filter.contains("-A FLANNEL-FWD -s 10.244.0.0/16")
        };
        assert!(masq_ok() && fwd_ok(), "{name}: rules missing at start");
        repair_time(
            &c,
            &format!("{name} iptables -t nat -F FLANNEL-POSTRTG"),
            || drop(ns.sh("iptables -t nat -F FLANNEL-POSTRTG")),
            masq_ok,
        );
        repair_time(
            &c,
            &format!("{name} iptables -t nat -D POSTROUTING (jump)"),
            || {
                drop(ns.sh(
                    "iptables -t nat -D POSTROUTING -m comment --comment 'flanneld masq' -j FLANNEL-POSTRTG",
                ))
            },
            masq_ok,
        );
        repair_time(
            &c,
            &format!("{name} iptables -F FLANNEL-FWD"),
            || drop(ns.sh("iptables -t filter -F FLANNEL-FWD")),
            fwd_ok,
        );
        assert!(pods_talk(&c));
        assert!(node.log().contains("repaired rules"), "{}", node.log());
    }
}

#[test]
fn a_hijacked_or_deleted_own_lease_is_restored() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("repair-lease", 2);
    let c = mixed_cluster(&pins, &net_conf(VXLAN));
    for (victim, ip) in [(1, B_IP), (0, A_IP)] {
        let node = &c.nodes[victim];
        let subnet = node.subnet_env().expect("subnet.env").subnet;
        let key = Cluster::lease_key(subnet);
        let published = c.etcd_get(&key).expect("own lease");
        let restored = || {
            c.etcd_get(&key).as_deref() == Some(published.as_str())
                && pods_talk_through_ebpf(&c, &pins)
        };
        // Another PublicIP and VtepMAC: every other host would send this subnet elsewhere.
        let mac = published
            .split("\"VtepMAC\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("VtepMAC")
            .to_owned();
        let hijack = published
            .replace(&ip.to_string(), "198.18.0.99")
            .replace(&mac, "02:00:00:00:00:99");
        assert_ne!(hijack, published);
        repair_time(
            &c,
            &format!("host {} lease overwritten", victim + 1),
            || c.etcd_put(&key, &hijack),
            restored,
        );
        repair_time(
            &c,
            &format!("host {} lease deleted", victim + 1),
            || assert_eq!(c.etcd_delete(&key), 1),
            restored,
        );
        // Logged loudly, and as a repair once the store acknowledged the put.
        assert!(
            wait_until(Duration::from_secs(5), || {
                let log = node.log();
                log.contains("own lease was overwritten with PublicIP 198.18.0.99")
                    && log.contains("own lease was deleted")
                    && log.matches("repaired lease").count() >= 2
            }),
            "{}",
            node.log()
        );
    }
}

#[test]
fn vtep_mac_survives_agent_and_host_restarts() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("repair-mac", 2);
    let mut c = mixed_cluster(&pins, &net_conf(VXLAN));
    for i in 0..2 {
        let mac = vtep_mac(&c.nodes[i].host.ns);
        let key = Cluster::lease_key(c.nodes[i].subnet_env().expect("subnet.env").subnet);
        let published = c.etcd_get(&key).expect("lease");
        assert!(published.contains(&mac), "{published}");

        // Agent restart: the device stays, and so does its MAC.
        c.nodes[i].stop();
        c.nodes[i].start();
        c.nodes[i].wait_subnet_env(Duration::from_secs(30));
        assert_eq!(
            vtep_mac(&c.nodes[i].host.ns),
            mac,
            "host {}: agent restart",
            i + 1
        );

        // Host restart: the device, /run/flannel/subnet.env and the bpffs pins are gone;
        // the MAC comes back from the previous lease.
        c.nodes[i].stop();
        c.nodes[i].host.ns.sh("ip link del flannel.1");
        std::fs::remove_file(&c.nodes[i].subnet_file).expect("remove subnet.env");
        if i == 0 {
            std::fs::remove_dir_all(pins.root(1)).expect("remove pins");
        }
        c.nodes[i].start();
        c.nodes[i].wait_subnet_env(Duration::from_secs(30));
        assert_eq!(
            vtep_mac(&c.nodes[i].host.ns),
            mac,
            "host {}: host restart",
            i + 1
        );
        assert_eq!(c.etcd_get(&key).as_deref(), Some(published.as_str()));
        // Peers' entries stayed valid: traffic flows (through the programs on A).
        assert!(
            wait_until(DEADLINE, || pods_talk_through_ebpf(&c, &pins)),
            "host {} after restart\n{}",
            i + 1,
            c.logs()
        );
        assert!(
            c.nodes[i]
                .log()
                .contains("reusing the VTEP MAC of this host's previous lease"),
            "{}",
            c.nodes[i].log()
        );
    }
}

#[test]
fn hostgw_routes_and_the_blackhole_route_are_repaired() {
    if !require_root() {
        return;
    }
    // Hosts 1 and 2 carry pods over host-gw; host 3 (no pods, so no cni0 route owns its
    // subnet) keeps a blackhole route for its subnet.
    let mut c = Cluster::start_each(3, &net_conf(r#"{"Type":"host-gw"}"#), |i| {
        if i == 3 {
            vec!["--ip-blackhole-route".to_owned()]
        } else {
            Vec::new()
        }
    });
    let mut envs = Vec::new();
    for n in &mut c.nodes {
        envs.push(n.wait_subnet_env(Duration::from_secs(30)));
    }
    for (n, env) in c.nodes.iter_mut().zip(&envs).take(2) {
        n.host.add_pods(env.subnet, env.mtu, 1);
    }
    assert!(wait_until(DEADLINE, || pods_talk(&c)), "{}", c.logs());

    for (me, peer, peer_ip) in [(0, 1, B_IP), (1, 0, A_IP)] {
        let ns = &c.nodes[me].host.ns;
        let peer_subnet = envs[peer].subnet;
        let routed = || {
            ns.sh(&format!("ip route show {peer_subnet}"))
                .contains(&format!("via {peer_ip} dev eth0"))
                && pods_talk(&c)
        };
        assert!(routed());
        repair_time(
            &c,
            &format!("host {} host-gw route deleted", me + 1),
            || drop(ns.sh(&format!("ip route del {peer_subnet}"))),
            routed,
        );
        assert!(
            wait_until(Duration::from_secs(5), || c.nodes[me]
                .log()
                .contains("repaired route")),
            "{}",
            c.nodes[me].log()
        );
    }

    let (ns, own) = (&c.nodes[2].host.ns, envs[2].subnet);
    let blackhole = || {
        ns.sh("ip route show type blackhole")
            .contains(&own.to_string())
    };
    assert!(
        wait_until(DEADLINE, blackhole),
        "no blackhole route\n{}",
        c.logs()
    );
    repair_time(
        &c,
        "blackhole route deleted",
        || drop(ns.sh(&format!("ip route del blackhole {own}"))),
        blackhole,
    );
    assert!(
        wait_until(Duration::from_secs(5), || c.nodes[2]
            .log()
            .contains("repaired blackhole_route")),
        "{}",
        c.nodes[2].log()
    );
}

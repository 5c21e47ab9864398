//! Two real `flanneld --kube-subnet-mgr` processes, each in its own host namespace,
//! against the in-test Kubernetes API server (bound on the underlay, so both reach it):
//! they publish their leases as node annotations, learn each other through the node
//! watch, program their datapaths, and pods behind them talk. Deleting a node object
//! removes it from the other host's datapath.
//!
//! Needs the agent built first: `cargo build -p flannel-agent --bin flanneld`.

use std::time::Duration;

use flannel_e2e::{
    kube_cluster::{
        KubeBench, KubeCluster, P, Stack, kube_hosts, ping, start_agent, start_kube_agents,
    },
    netns::{ChildGuard, Host, wait_until},
    require_root,
};

#[test]
fn two_kube_agents_connect_their_pods_kernel_vxlan() {
    if !require_root() {
        return;
    }
    two_kube_agents("kernel");
}

#[test]
fn two_kube_agents_connect_their_pods_ebpf() {
    if !require_root() {
        return;
    }
    two_kube_agents("ebpf");
}

fn two_kube_agents(dataplane: &str) {
    let mut bench = KubeBench::new();
    let [mut h1, mut h2] = kube_hosts(&mut bench);
    let api = &bench.api;
    let [a1, a2] = start_kube_agents(api, [(&mut h1, dataplane, &[]), (&mut h2, dataplane, &[])]);
    let env1 = std::fs::read_to_string(a1.subnet_env()).unwrap();
    assert!(env1.contains("FLANNEL_SUBNET=10.244.1.1/24\n"), "{env1}");
    assert!(env1.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env1}");
    assert_eq!(a1.mtu(), 1450, "vxlan MTU is the uplink's minus 50");

    // Published with upstream's names through the API server.
    for (node, ip) in [("h1", "198.18.0.1"), ("h2", "198.18.0.2")] {
        let ok = wait_until(Duration::from_secs(10), || {
            let ann = api.annotations(node);
            ann.get(&format!("{P}kube-subnet-manager"))
                .map(String::as_str)
                == Some("true")
                && ann.get(&format!("{P}public-ip")).map(String::as_str) == Some(ip)
                && ann.get(&format!("{P}backend-type")).map(String::as_str) == Some("vxlan")
                && ann
                    .get(&format!("{P}backend-data"))
                    .is_some_and(|d| d.starts_with(r#"{"VNI":1,"VtepMAC":""#))
        });
        assert!(ok, "{node} annotations: {:?}", api.annotations(node));
        let cleared = wait_until(Duration::from_secs(10), || {
            api.node(node)
                .and_then(|n| n.status?.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
                })
        });
        assert!(cleared, "{node}: NetworkUnavailable not cleared");
    }

    let (p1, p2) = (&h1.pods[0], &h2.pods[0]);
    let connected = wait_until(Duration::from_secs(15), || ping(&p1.ns, p2.ip));
    assert!(
        connected,
        "pod {} cannot reach pod {}\n--- h1:\n{}\n--- h2:\n{}",
        p1.ip,
        p2.ip,
        a1.log(),
        a2.log()
    );
    assert!(
        ping(&p2.ns, p1.ip),
        "pod {} cannot reach pod {}",
        p2.ip,
        p1.ip
    );

    // The node object goes away: h1 forgets h2 (its route to h2's subnet is removed).
    api.delete_node("h2");
    let gone = wait_until(Duration::from_secs(10), || {
        h1.ns.sh("ip route show 10.244.2.0/24").trim().is_empty()
    });
    assert!(
        gone,
        "h1 still routes to deleted h2:\n{}",
        h1.ns.sh("ip route")
    );
    assert!(
        !ping(&p1.ns, p2.ip),
        "traffic to a deleted node still flows"
    );

    // Shown with --nocapture: what the agents did.
    eprintln!(
        "--- h1 flanneld:\n{}\n--- h2 flanneld:\n{}",
        a1.log(),
        a2.log()
    );
    drop((a1, a2));
}

/// The user-set annotations upstream's functional suite checks: `node-public-ip` picks
/// the address (and so the interface) a node tunnels from, `public-ip-overwrite` the
/// address peers are told to tunnel to (a NAT address in real life; here a second address
/// of the node).
#[test]
fn kube_agents_honour_public_ip_annotations() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let [mut h1, mut h2] = kube_hosts(&mut bench);
    let api = &bench.api;
    api.annotate(
        "h1",
        &[(&format!("{P}node-public-ip"), Some("198.18.0.11"))],
    );
    api.annotate(
        "h2",
        &[(&format!("{P}public-ip-overwrite"), Some("198.18.0.22"))],
    );
    h1.ns.sh("ip addr add 198.18.0.11/15 dev eth0");
    h2.ns.sh("ip addr add 198.18.0.22/15 dev eth0");
    let [a1, a2] = start_kube_agents(api, [(&mut h1, "kernel", &[]), (&mut h2, "kernel", &[])]);

    for (node, ip) in [("h1", "198.18.0.11"), ("h2", "198.18.0.22")] {
        let ok = wait_until(Duration::from_secs(10), || {
            api.annotations(node)
                .get(&format!("{P}public-ip"))
                .map(String::as_str)
                == Some(ip)
        });
        assert!(ok, "{node} annotations: {:?}", api.annotations(node));
    }
    // The overwrite changes only what peers are told: h2 still sends from its own address.
    let dev2 = h2.ns.sh("ip -d link show flannel.1");
    assert!(dev2.contains("local 198.18.0.2 "), "{dev2}");

    let (p1, p2) = (&h1.pods[0], &h2.pods[0]);
    let connected = wait_until(Duration::from_secs(15), || ping(&p1.ns, p2.ip));
    assert!(
        connected,
        "pods cannot talk\n--- h1:\n{}\n--- h2:\n{}",
        a1.log(),
        a2.log()
    );
    assert!(ping(&p2.ns, p1.ip));
    // Peers were programmed with the published addresses.
    let fdb1 = h1.ns.sh("bridge fdb show dev flannel.1");
    assert!(fdb1.contains("dst 198.18.0.22"), "{fdb1}");
    let fdb2 = h2.ns.sh("bridge fdb show dev flannel.1");
    assert!(fdb2.contains("dst 198.18.0.11"), "{fdb2}");
    drop((a1, a2));
}

/// Restarting flanneld is hitless and quiet: the kernel device (and so its VTEP MAC) is
/// reused, the node's annotations are already right so nothing but the
/// NetworkUnavailable condition is patched, and pods keep talking throughout.
#[test]
fn kube_agent_restart_keeps_lease_and_traffic() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let [mut h1, mut h2] = kube_hosts(&mut bench);
    let api = &bench.api;
    let [a1, a2] = start_kube_agents(api, [(&mut h1, "kernel", &[]), (&mut h2, "kernel", &[])]);
    let (p1, p2) = (&h1.pods[0], &h2.pods[0]);
    assert!(wait_until(Duration::from_secs(15), || ping(&p1.ns, p2.ip)));
    let annotations = api.annotations("h1");
    let patches_before = api.patches().len();

    // Stop h1's agent (SIGTERM): the datapath stays, traffic still flows.
    drop(a1);
    assert!(ping(&p1.ns, p2.ip), "traffic stopped with the agent");
    let a1 = start_agent(&h1.ns, "h1", api, "kernel", &[]);
    let up = wait_until(Duration::from_secs(30), || a1.subnet_env().exists());
    assert!(up, "restarted agent not up:\n{}", a1.log());
    assert!(
        ping(&p1.ns, p2.ip),
        "traffic broken after restart\n{}",
        a1.log()
    );
    assert_eq!(api.annotations("h1"), annotations, "annotations churned");
    let settled = wait_until(Duration::from_secs(10), || {
        api.patches().len() > patches_before
    });
    assert!(settled, "the restarted agent never patched its node status");
    let new: Vec<_> = api.patches().into_iter().skip(patches_before).collect();
    assert!(
        new.iter().all(|p| p.path == "nodes/h1/status"
            && p.body.get("metadata").is_none()
            && p.body["status"]["conditions"][0]["type"] == "NetworkUnavailable"),
        "unexpected patches after restart: {new:?}"
    );
    drop((a1, a2));
}

/// #12 items 5 and 7 with the real agent in kube mode: nodes whose leases must not be
/// routed (pod CIDR outside `Network`, public-ip 0.0.0.0 / 127.0.0.1 / 224.0.0.1) and one
/// with 1 MiB of garbage backend data are skipped with one warning each — not repeated on
/// a relist — quoting the value truncated; the agent keeps running and programs the valid
/// nodes that come before and after them.
#[test]
fn kube_agent_skips_invalid_nodes_once_and_programs_the_rest() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let api = &bench.api;
    let peer =
        |name: &str, cidr: &str, ip: &str, data: &str| api.add_flannel_node(name, cidr, ip, data);
    let data = r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:63"}"#;
    let garbage = "{".repeat(1 << 20);
    let bad = [
        ("bad-outside", "10.245.7.0/24", "198.18.0.97", data),
        ("bad-zero", "10.244.8.0/24", "0.0.0.0", data),
        ("bad-loopback", "10.244.9.0/24", "127.0.0.1", data),
        ("bad-multicast", "10.244.10.0/24", "224.0.0.1", data),
        (
            "bad-garbage",
            "10.244.11.0/24",
            "198.18.0.96",
            garbage.as_str(),
        ),
    ];
    api.add_node("h1", &["10.244.1.0/24"]);
    peer("good-1", "10.244.20.0/24", "198.18.0.99", data);
    for (name, cidr, ip, data) in bad {
        peer(name, cidr, ip, data);
    }
    let h1: Host = bench.underlay.add_host(1);
    let mut a1 = start_agent(&h1.ns, "h1", api, "kernel", &[]);
    let routed = |subnet: &str| {
        h1.ns
            .sh(&format!("ip route show {subnet}"))
            .contains("flannel.1")
    };
    assert!(
        wait_until(Duration::from_secs(30), || routed("10.244.20.0/24")),
        "valid node not programmed\n{}",
        a1.log()
    );

    // A relist (410 Gone) converts every node again: no new warnings, and a valid node
    // that joins afterwards is still programmed.
    api.expire_watches(|_| {});
    peer("good-2", "10.244.21.0/24", "198.18.0.98", data);
    assert!(
        wait_until(Duration::from_secs(30), || routed("10.244.21.0/24")),
        "valid node after the relist not programmed\n{}",
        a1.log()
    );
    assert!(a1.child.running(), "agent died\n{}", a1.log());
    for (name, cidr, _, _) in bad {
        assert!(!routed(cidr), "{name} ({cidr}) was routed");
    }
    let log = a1.log();
    for (name, _, _, _) in bad {
        let lines = log
            .lines()
            .filter(|l| l.contains("skipping node") && l.contains(&format!("node {name}:")))
            .count();
        assert_eq!(lines, 1, "{name} warned {lines} times\n{log:.4000}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("node bad-garbage:") && l.contains("(1048576 bytes)")),
        "garbage not quoted truncated"
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a {longest}-byte log line");
    drop(a1);
}

/// A peer Node whose IPv6 pod CIDR changes while its IPv4 one stays is swapped in place
/// on the other host: one `Added`, never `Removed` then `Added`. Its IPv4 route is never
/// deleted (a netlink route monitor in h1 says so) and IPv4 pod traffic, a ping every
/// 50 ms through the change, loses nothing. (A dual-stack network ignores Nodes without
/// an IPv6 pod CIDR, so the IPv6 half changing is how a known peer's lease changes
/// subnets under the same IPv4 one.)
#[test]
fn a_peer_whose_ipv6_pod_cidr_changes_keeps_its_ipv4_route_and_traffic() {
    if !require_root() {
        return;
    }
    let conf = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
    let c = KubeCluster::start(2, Stack::DualStack, conf, |_| "kernel", |_| Vec::new());
    let (api, agents) = (&c.bench.api, &c.agents);
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let (p1, p2) = (&h1.pods[0], &h2.pods[0]);
    assert!(
        wait_until(Duration::from_secs(15), || ping(&p1.ns, p2.ip)),
        "pods cannot talk\n{}",
        c.logs()
    );
    let routes6 = |net: &str| h1.ns.sh(&format!("ip -6 route show {net}"));
    assert!(routes6("fd00:10:244:2::/64").contains("flannel-v6.1"));

    // Every route change in h1 from now on, as netlink reports it.
    let seen = tempfile::NamedTempFile::new().unwrap();
    let mut monitor = ChildGuard::new(
        h1.ns
            .command("ip")
            .args(["-4", "monitor", "route"])
            .stdout(seen.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    // A marker route, added and deleted until the monitor reports it: then it listens.
    let listening = wait_until(Duration::from_secs(10), || {
        h1.ns.sh("ip route add blackhole 192.0.2.1/32 table 100 && \
             ip route del blackhole 192.0.2.1/32 table 100");
        std::fs::read_to_string(seen.path()).is_ok_and(|s| s.contains("192.0.2.1"))
    });
    assert!(listening, "ip monitor route reported nothing");

    // 200 pings, 50 ms apart (10 s), around the change.
    let (pod, to) = (p1.ns.path(), p2.ip);
    let pinging = std::thread::spawn(move || {
        std::process::Command::new("nsenter")
            .arg(format!("--net={pod}"))
            .args(["--", "ping", "-n", "-i", "0.05", "-c", "200", "-W", "1"])
            .arg(to.to_string())
            .output()
            .expect("spawn ping")
    });
    let mut node = api.node("h2").unwrap();
    let spec = node.spec.as_mut().unwrap();
    spec.pod_cidrs = Some(vec!["10.244.2.0/24".into(), "fd00:10:244:22::/64".into()]);
    api.put_node(&node);
    let moved = wait_until(Duration::from_secs(10), || {
        routes6("fd00:10:244:22::/64").contains("flannel-v6.1")
    });
    assert!(
        moved,
        "h1 never routed h2's new IPv6 subnet\n{}",
        agents[0].log()
    );
    assert!(
        !pinging.is_finished(),
        "the change took longer than the pings"
    );
    let out = pinging.join().unwrap();
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(
        stats.contains("200 packets transmitted, 200 received"),
        "IPv4 pings lost across the change:\n{stats}\n{}",
        agents[0].log()
    );
    monitor.kill();
    let routes = std::fs::read_to_string(seen.path()).unwrap();
    assert!(
        !routes
            .lines()
            .any(|l| l.starts_with("Deleted") && l.contains("10.244.2.0/24")),
        "h1 deleted its route to h2's IPv4 subnet:\n{routes}"
    );
    assert!(
        h1.ns
            .sh("ip route show 10.244.2.0/24")
            .contains("flannel.1"),
        "{}",
        h1.ns.sh("ip route")
    );
    // Each agent listed the nodes once (the watch's list): the acquisition reads only its
    // own Node.
    assert_eq!(api.list_count(), 2, "node lists");
}

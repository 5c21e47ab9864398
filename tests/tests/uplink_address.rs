//! A public IP change on the uplink is followed without a restart (#12 item 4, last
//! part): when host A's underlay address changes (`RTM_NEWADDR`/`RTM_DELADDR` on its
//! uplink) and no `--public-ip` was given, A's agent sends from the new address (the VXLAN
//! device's local address, the eBPF outer source) and publishes it in its lease; host B
//! re-programs A (FDB entry, eBPF maps, peer guard) from the lease event, and pods talk
//! again. Once with etcd (A on eBPF, B on the kernel device; a renewal afterwards keeps
//! the new address), once in kube mode (A on the kernel device, B on eBPF; A's node watch,
//! whose connection came from the lost address, still sees changes); each prints the
//! measured outage.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    kube_cluster::{KubeBench, P, ping, start_agent, wait_for_subnet_env},
    netns::{Host, NetNs, wait_until},
    require_root,
};

/// A's address after the change.
const NEW_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 31);

/// Move the uplink of `ns` from `old` to [`NEW_IP`]: the new address is added first (a
/// secondary, promoted when the old primary goes, as a DHCP renumbering does).
fn renumber(ns: &NetNs, old: Ipv4Addr) {
    ns.sh(&format!(
        "sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1 && \
         ip addr add {NEW_IP}/15 dev eth0 && ip addr del {old}/15 dev eth0"
    ));
}

fn pings_both_ways(a: &Host, b: &Host) -> bool {
    ping(&a.pods[0].ns, b.pods[0].ip) && ping(&b.pods[0].ns, a.pods[0].ip)
}

#[test]
fn etcd_host_follows_its_new_uplink_address() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("readdress", 1);
    let mut c = Cluster::start_each(2, &net_conf(r#"{"Type":"vxlan"}"#), |i| match i {
        // A short TTL, so a renewal happens during the test: it must renew the new lease.
        1 => vec![
            "--dataplane=ebpf".into(),
            pins.arg(1),
            "--subnet-lease-ttl=6".into(),
            "--log-level=flannel_agent=debug,info".into(),
        ],
        _ => vec!["--dataplane=kernel".into()],
    });
    let envs = c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let old = c.nodes[0].host.ip;
    let key = Cluster::lease_key(envs[0].subnet);

    renumber(&c.nodes[0].host.ns, old);
    let t0 = Instant::now();
    let published = wait_until(Duration::from_secs(20), || {
        c.etcd_get(&key)
            .is_some_and(|v| v.contains(&format!("\"PublicIP\":\"{NEW_IP}\"")))
    });
    let t_lease = t0.elapsed();
    assert!(
        published,
        "lease not updated: {:?}\n{}",
        c.etcd_get(&key),
        c.logs()
    );
    let back = wait_until(Duration::from_secs(20), || {
        pings_both_ways(&c.nodes[0].host, &c.nodes[1].host)
    });
    let t_pods = t0.elapsed();
    assert!(back, "pods do not talk after the renumbering\n{}", c.logs());
    eprintln!(
        "etcd: uplink {old} -> {NEW_IP}: lease updated after {t_lease:?}, pods talk again after {t_pods:?}"
    );

    // B programmed A's new address; A sends from it on both paths.
    let fdb = c.nodes[1].host.ns.sh("bridge fdb show dev flannel.1");
    assert!(fdb.contains(&format!("dst {NEW_IP} ")), "{fdb}");
    assert!(!fdb.contains(&format!("dst {old} ")), "{fdb}");
    let dev = c.nodes[0].host.ns.sh("ip -d link show flannel.1");
    assert!(dev.contains(&format!("local {NEW_IP} ")), "{dev}");
    let config = open_pinned(&pins.layout(1))
        .expect("open pinned maps")
        .config
        .get(&0, 0)
        .expect("CONFIG");
    assert_eq!(Ipv4Addr::from(config.local_ip), NEW_IP);
    assert_eq!(
        config.vxlan_ifindex,
        c.nodes[0].host.ns.ifindex("flannel.1"),
        "CONFIG names the (re-created) device"
    );
    let log = c.nodes[0].log();
    assert!(
        log.contains("uplink address changed; following it without a restart"),
        "{log}"
    );
    // The renewals that follow keep the new address (not the one the agent started with).
    let renewals = |c: &Cluster| c.nodes[0].log().matches("renewed lease").count();
    let before = renewals(&c);
    assert!(
        wait_until(Duration::from_secs(20), || renewals(&c) > before),
        "no renewal after the change\n{}",
        c.nodes[0].log()
    );
    let value = c.etcd_get(&key).unwrap_or_default();
    assert!(
        value.contains(&format!("\"PublicIP\":\"{NEW_IP}\"")),
        "a renewal wrote the old address back: {value}"
    );
    assert!(
        c.nodes[0].agent.as_mut().is_some_and(|a| a.running()),
        "agent restarted or died"
    );
}

#[test]
fn kube_host_follows_its_new_uplink_address() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let api = &bench.api;
    api.add_node("h1", &["10.244.1.0/24"]);
    api.add_node("h2", &["10.244.2.0/24"]);
    let mut h1: Host = bench.underlay.add_host(1);
    let mut h2: Host = bench.underlay.add_host(2);
    let mut a1 = start_agent(&h1.ns, "h1", api, "kernel", &[]);
    let a2 = start_agent(&h2.ns, "h2", api, "ebpf", &[]);
    wait_for_subnet_env(&[&a1, &a2]);
    h1.add_pods("10.244.1.0/24".parse().unwrap(), a1.mtu(), 1);
    h2.add_pods("10.244.2.0/24".parse().unwrap(), a2.mtu(), 1);
    assert!(
        wait_until(Duration::from_secs(15), || pings_both_ways(&h1, &h2)),
        "pods cannot talk\n{}",
        a1.log()
    );
    let old = h1.ip;

    renumber(&h1.ns, old);
    let t0 = Instant::now();
    let published = wait_until(Duration::from_secs(20), || {
        api.annotations("h1")
            .get(&format!("{P}public-ip"))
            .is_some_and(|ip| *ip == NEW_IP.to_string())
    });
    let t_lease = t0.elapsed();
    assert!(
        published,
        "annotation not updated: {:?}\n{}",
        api.annotations("h1"),
        a1.log()
    );
    let back = wait_until(Duration::from_secs(20), || pings_both_ways(&h1, &h2));
    let t_pods = t0.elapsed();
    assert!(
        back,
        "pods do not talk after the renumbering\n--- h1:\n{}\n--- h2:\n{}",
        a1.log(),
        a2.log()
    );
    eprintln!(
        "kube: uplink {old} -> {NEW_IP}: public-ip annotation updated after {t_lease:?}, pods talk again after {t_pods:?}"
    );

    // B's eBPF maps route A's subnet to the new address and accept VXLAN from it.
    let dp = open_pinned(&flannel_agent::backend::ebpf::PinLayout::new(&a2.pins.0))
        .expect("open h2's pinned maps");
    let routes = dp.current_routes().expect("routes");
    let route = routes[&"10.244.1.0/24".parse().unwrap()];
    assert_eq!(
        Ipv4Addr::from(flannel_common::wire::v4_unmapped(&route.peer_ip)),
        NEW_IP
    );
    let peers = dp.current_peers().expect("peers");
    assert!(peers.contains_key(&NEW_IP), "{peers:?}");
    let dev = h1.ns.sh("ip -d link show flannel.1");
    assert!(dev.contains(&format!("local {NEW_IP} ")), "{dev}");
    // Its connections from the lost address were ended, so its node watch runs from the
    // new one: a node that joins now is programmed (a dead watch would wait out the
    // client's read timeout, minutes).
    assert!(
        a1.log()
            .contains("closed our connections from the address the uplink lost"),
        "{}",
        a1.log()
    );
    api.add_flannel_node(
        "p3",
        "10.244.3.0/24",
        "198.18.0.93",
        r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:63"}"#,
    );
    assert!(
        wait_until(Duration::from_secs(10), || h1
            .ns
            .sh("ip route show 10.244.3.0/24")
            .contains("flannel.1")),
        "h1's node watch is dead after the renumbering\n{}",
        a1.log()
    );
    assert!(a1.child.running(), "agent died\n{}", a1.log());
    drop((a1, a2));
}

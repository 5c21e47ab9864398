//! Masquerade and forward rules (`--ip-masq`) in both modes: the rules land exactly as
//! upstream's golden listing, calls are idempotent, switching mode removes the other
//! implementation, teardown leaves nothing — and functionally, pod → outside arrives from
//! the host's IP while pod → pod keeps the pod's IP (kernel VXLAN between two hosts).

use std::net::{IpAddr, Ipv4Addr};

use flannel_agent::{
    backend::{Backend, ExternalInterface, vxlan::KernelVxlan},
    lease::Lease,
    net::masq::{self, MasqConfig},
    netconf::VxlanConfig,
};
use flannel_e2e::{
    netns::{Host, NetNs, Underlay, listen_in, seen_source},
    require_root,
};
use ipnetwork::Ipv4Network;

fn cfg(i: u8, nftables: bool) -> MasqConfig {
    MasqConfig {
        network: "10.244.0.0/16".parse().unwrap(),
        subnet: Ipv4Network::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap(),
        fully_random: true,
        nftables,
    }
}

fn apply(ns: &NetNs, c: MasqConfig) {
    ns.block_on(move || async move {
        masq::ensure_masq(&c).await.expect("ensure_masq");
        masq::ensure_forward(&c).await.expect("ensure_forward");
    });
}

fn teardown(ns: &NetNs) {
    ns.block_on(|| async { masq::teardown().await.expect("teardown") });
}

#[test]
fn masq_rules_match_upstream_and_switch_modes_cleanly() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("masq");

    // iptables mode, twice: same rules, one jump each.
    apply(&ns, cfg(1, false));
    apply(&ns, cfg(1, false));
    let nat = ns.sh("iptables -t nat -S");
    let m = r#"-m comment --comment "flanneld masq""#;
    let golden = [
        format!("-A POSTROUTING {m} -j FLANNEL-POSTRTG"),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 {m} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 {m} -j RETURN"),
        format!(
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {m} -j MASQUERADE --random-fully"
        ),
        format!(
            "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {m} -j MASQUERADE --random-fully"
        ),
    ];
    for rule in &golden {
        assert_eq!(
            nat.lines().filter(|l| l == rule).count(),
            1,
            "want exactly one {rule:?} in\n{nat}"
        );
    }
    assert_eq!(
        nat.lines()
            .filter(|l| l.starts_with("-A FLANNEL-POSTRTG"))
            .count(),
        6,
        "{nat}"
    );
    let filter = ns.sh("iptables -t filter -S");
    let f = r#"-m comment --comment "flanneld forward""#;
    for rule in [
        format!("-A FORWARD {f} -j FLANNEL-FWD"),
        format!("-A FLANNEL-FWD -s 10.244.0.0/16 {f} -j ACCEPT"),
        format!("-A FLANNEL-FWD -d 10.244.0.0/16 {f} -j ACCEPT"),
    ] {
        assert_eq!(
            filter.lines().filter(|l| *l == rule).count(),
            1,
            "want one {rule:?} in\n{filter}"
        );
    }

    // A changed subnet rewrites the chain (no leftovers of the old subnet).
    apply(&ns, cfg(2, false));
    let nat = ns.sh("iptables -t nat -S");
    assert!(
        !nat.contains("10.244.1.0/24") && nat.contains("10.244.2.0/24"),
        "{nat}"
    );

    // nftables mode: iptables objects gone, the table holds upstream's rules.
    apply(&ns, cfg(1, true));
    apply(&ns, cfg(1, true));
    assert!(!ns.sh("iptables -t nat -S").contains("FLANNEL"));
    assert!(!ns.sh("iptables -t filter -S").contains("FLANNEL"));
    let table = ns.sh("nft list table ip flannel-ipv4");
    for want in [
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark 0x00004000 return",
        "ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
        "ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return",
        "ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
        "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
        "type filter hook forward priority filter; policy accept;",
        "ip saddr 10.244.0.0/16 accept",
        "ip daddr 10.244.0.0/16 accept",
    ] {
        assert_eq!(
            table.matches(want).count(),
            1,
            "want one {want:?} in\n{table}"
        );
    }

    // Back to iptables: the nft table goes.
    apply(&ns, cfg(1, false));
    assert!(!ns.run("nft list table ip flannel-ipv4").status.success());

    teardown(&ns);
    assert!(!ns.sh("iptables -t nat -S").contains("FLANNEL"));
    assert!(!ns.sh("iptables -t filter -S").contains("FLANNEL"));
    assert!(!ns.run("nft list table ip flannel-ipv4").status.success());
}

fn ext_for(h: &Host) -> ExternalInterface {
    ExternalInterface {
        name: "eth0".into(),
        index: h.ns.ifindex("eth0"),
        iface_addr: h.ip,
        public_ip: h.ip,
        iface_addr6: None,
        public_ipv6: None,
        mtu: 1500,
    }
}

#[test]
fn masq_rewrites_pod_to_outside_but_not_pod_to_pod() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let mut hosts: Vec<Host> = (1..=2).map(|i| underlay.add_host(i)).collect();
    let outside_ip = Ipv4Addr::new(198, 18, 1, 1);
    let outside = underlay.attach("out", outside_ip, 1500);

    // Two hosts on kernel VXLAN.
    let mut leases = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let ext = ext_for(h);
        let attrs = h.ns.block_on(move || async move {
            let mut b = KernelVxlan::new(ext, VxlanConfig::default()).await.unwrap();
            b.prepare().await.unwrap()
        });
        leases.push(Lease {
            subnet: Some(cfg(u8::try_from(i).unwrap() + 1, false).subnet),
            ipv6_subnet: None,
            extra_senders: Vec::new(),
            attrs,
        });
    }
    for (i, h) in hosts.iter().enumerate() {
        let (ext, own, peer) = (ext_for(h), leases[i].clone(), leases[1 - i].clone());
        h.ns.block_on(move || async move {
            let mut b = KernelVxlan::new(ext, VxlanConfig::default()).await.unwrap();
            b.prepare().await.unwrap();
            b.register(&own).await.unwrap();
            b.reconcile(&[peer]).await.unwrap();
        });
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        h.add_pods(leases[i].subnet.unwrap(), 1450, 1);
    }
    let pod1 = &hosts[0].pods[0];
    let pod2 = &hosts[1].pods[0];
    let out_listener = listen_in(&outside, outside_ip, 8080);
    let pod_listener = listen_in(&pod2.ns, pod2.ip, 8080);

    for nftables in [false, true] {
        for (i, h) in hosts.iter().enumerate() {
            apply(&h.ns, cfg(u8::try_from(i).unwrap() + 1, nftables));
        }
        assert_eq!(
            seen_source(&pod1.ns, &out_listener, outside_ip, 8080),
            IpAddr::V4(hosts[0].ip),
            "pod → outside not masqueraded (nftables={nftables})"
        );
        assert_eq!(
            seen_source(&pod1.ns, &pod_listener, pod2.ip, 8080),
            IpAddr::V4(pod1.ip),
            "pod → pod was masqueraded (nftables={nftables})"
        );
    }
    for h in &hosts {
        teardown(&h.ns);
    }
}

/// `blackhole::ensure` twice in `ns`: whether each call added the route.
fn ensure_twice<N: flannel_agent::net::netlink::NlFamily>(ns: &NetNs, subnet: N) -> (bool, bool) {
    ns.block_on(move || async move {
        let nl = flannel_agent::net::netlink::Netlink::connect().unwrap();
        let first = flannel_agent::net::blackhole::ensure(&nl, subnet)
            .await
            .unwrap();
        let second = flannel_agent::net::blackhole::ensure(&nl, subnet)
            .await
            .unwrap();
        (first, second)
    })
}

#[test]
fn blackhole_route_is_added_once_and_never_replaces_a_connected_route() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("bh");
    let subnet: Ipv4Network = "10.244.1.0/24".parse().unwrap();
    assert_eq!(ensure_twice(&ns, subnet), (true, false));
    let routes = ns.sh("ip route show");
    assert_eq!(
        routes.matches("blackhole 10.244.1.0/24 proto 84").count(),
        1,
        "{routes}"
    );

    // With a bridge setup the connected cni0 route owns the subnet: left alone, no error.
    ns.sh(
        "ip link add cni0 type bridge && ip addr add 10.244.2.1/24 dev cni0 && ip link set cni0 up",
    );
    let added = ns.block_on(|| async {
        let nl = flannel_agent::net::netlink::Netlink::connect().unwrap();
        flannel_agent::net::blackhole::ensure(&nl, "10.244.2.0/24".parse::<Ipv4Network>().unwrap())
            .await
            .unwrap()
    });
    assert!(!added);
    let routes = ns.sh("ip route show");
    assert!(
        routes.contains("10.244.2.0/24 dev cni0 proto kernel"),
        "{routes}"
    );
    assert!(!routes.contains("blackhole 10.244.2.0/24"), "{routes}");
}

#[test]
fn ipv6_blackhole_route_is_added_once() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("bh6");
    ns.sh("ip link set lo up");
    let subnet: ipnetwork::Ipv6Network = "fd00:10:244:1::/64".parse().unwrap();
    assert_eq!(ensure_twice(&ns, subnet), (true, false));
    let routes = ns.sh("ip -6 route show");
    assert_eq!(
        routes
            .matches("blackhole fd00:10:244:1::/64 dev lo proto 84")
            .count(),
        1,
        "{routes}"
    );
}

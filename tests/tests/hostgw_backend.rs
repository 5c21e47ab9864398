//! The host-gw backend driven directly through the `Backend` trait: three hosts on one
//! underlay, routes via peers' public IPs, pod traffic, refusal behind NAT, a clear error
//! for off-link peers, and reconcile touching only the routes it owns.

use std::net::Ipv4Addr;

use flannel_agent::{
    backend::{Backend, ExternalInterface, hostgw::HostGw},
    lease::{BackendAttrs, Lease, LeaseAttrs},
};
use flannel_e2e::{
    netns::{Host, NetNs, Underlay},
    require_root,
};
use ipnetwork::Ipv4Network;

fn ext_for(ns: &NetNs, ip: Ipv4Addr) -> ExternalInterface {
    ExternalInterface {
        name: "eth0".into(),
        index: ns.ifindex("eth0"),
        iface_addr: ip,
        public_ip: ip,
        iface_addr6: None,
        public_ipv6: None,
        mtu: 1500,
    }
}

fn lease(i: u8, public_ip: Ipv4Addr, backend_type: &str) -> Lease {
    Lease {
        subnet: Some(Ipv4Network::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap()),
        ipv6_subnet: None,
        extra_senders: Vec::new(),
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend: BackendAttrs::parse(backend_type, None, None).unwrap(),
        },
    }
}

/// Start the backend on `host` and reconcile to `peers`; returns (reconcile result, MTU).
fn run(host: &Host, own: Lease, peers: Vec<Lease>) -> (Result<(), String>, u32) {
    let ext = ext_for(&host.ns, host.ip);
    host.ns.block_on(move || async move {
        let mut b = HostGw::new(ext).await.expect("HostGw::new");
        let attrs = b.prepare().await.expect("prepare");
        assert_eq!(attrs.backend_type(), "host-gw");
        assert_eq!(attrs.backend.data_json(), None);
        b.register(&own).await.expect("register");
        (
            b.reconcile(&peers).await.map_err(|e| e.to_string()),
            b.mtu(),
        )
    })
}

#[test]
fn hostgw_routes_pods_and_reconciles_only_its_routes() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let mut hosts: Vec<Host> = (1..=3).map(|i| underlay.add_host(i)).collect();
    let leases: Vec<Lease> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| lease(u8::try_from(i).unwrap() + 1, h.ip, "host-gw"))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let peers = leases
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, l)| l.clone())
            .collect();
        let (res, mtu) = run(h, leases[i].clone(), peers);
        res.expect("reconcile");
        assert_eq!(mtu, 1500);
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        h.add_pods(leases[i].subnet.unwrap(), 1500, 2);
    }
    let routes = hosts[0].ns.sh("ip route show");
    assert!(
        routes.contains("10.244.2.0/24 via 198.18.0.2 dev eth0 proto 84"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.3.0/24 via 198.18.0.3 dev eth0 proto 84"),
        "{routes}"
    );
    let pods: Vec<(&NetNs, Ipv4Addr)> = hosts
        .iter()
        .flat_map(|h| h.pods.iter().map(|p| (&p.ns, p.ip)))
        .collect();
    for (a, _) in &pods {
        for (_, ip) in &pods {
            a.sh(&format!("ping -c 1 -W 2 {ip}"));
        }
    }
    let server = &hosts[2].pods[0];
    let _srv = server
        .ns
        .spawn_server("iperf3", &["-s", "-1", "-B", &server.ip.to_string()], 5201);
    let out = hosts[0].pods[0].ns.sh(&format!(
        "iperf3 -c {} -t 2 -J --connect-timeout 3000",
        server.ip
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes >= 10 * 1024 * 1024, "only {bytes} bytes crossed");

    // Restart is a no-op.
    let before = hosts[0].ns.sh("ip route show");
    let peers = vec![leases[1].clone(), leases[2].clone()];
    run(&hosts[0], leases[0].clone(), peers)
        .0
        .expect("reconcile");
    assert_eq!(hosts[0].ns.sh("ip route show"), before);

    // Host 3 leaves; a stale route of ours goes, a foreign one (same shape, no marker)
    // stays; a peer of another backend is skipped.
    hosts[0]
        .ns
        .sh("ip route add 10.244.9.0/24 via 198.18.0.2 proto 84 && \
         ip route add 10.244.8.0/24 via 198.18.0.2");
    let mut other = lease(4, Ipv4Addr::new(198, 18, 0, 2), "vxlan");
    other.subnet = Some("10.244.4.0/24".parse().unwrap());
    run(&hosts[0], leases[0].clone(), vec![leases[1].clone(), other])
        .0
        .expect("reconcile");
    let routes = hosts[0].ns.sh("ip route show");
    assert!(!routes.contains("10.244.3.0/24"), "{routes}");
    assert!(!routes.contains("10.244.9.0/24"), "{routes}");
    assert!(!routes.contains("10.244.4.0/24"), "{routes}");
    assert!(
        routes.contains("10.244.8.0/24 via 198.18.0.2 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.2.0/24 via 198.18.0.2 dev eth0 proto 84"),
        "{routes}"
    );
    hosts[0].pods[0]
        .ns
        .sh(&format!("ping -c 1 -W 2 {}", hosts[1].pods[0].ip));

    // A peer behind a router is an error naming it, and other peers are still programmed.
    hosts[0]
        .ns
        .sh("ip route add 198.19.250.0/24 via 198.18.0.2");
    let far = lease(5, Ipv4Addr::new(198, 19, 250, 1), "host-gw");
    let (res, _) = run(&hosts[0], leases[0].clone(), vec![far, leases[1].clone()]);
    let err = res.expect_err("off-link peer accepted");
    assert!(
        err.contains("10.244.5.0/24")
            && err.contains("198.19.250.1")
            && err.contains("not directly connected"),
        "{err}"
    );
    assert!(
        hosts[0]
            .ns
            .sh("ip route show")
            .contains("10.244.2.0/24 via 198.18.0.2")
    );
}

/// Lease events cost their own route requests, never a table read: 200 peers in one
/// reconcile (two dumps: compare, then sweep), then an add, a move to another gateway and
/// removals (a recorded one, one never programmed, one already deleted by hand) with no
/// dump at all, and exactly the expected routes left.
#[test]
fn hostgw_events_do_not_read_the_table() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    let ext = ext_for(&host.ns, host.ip);
    // Peers anywhere on the /15 underlay are on-link, whether or not a host answers.
    let peer = |i: u16| {
        let mut l = lease(0, Ipv4Addr::new(198, 18, 2, 0), "host-gw");
        let [hi, lo] = i.to_be_bytes();
        l.subnet = Some(Ipv4Network::new(Ipv4Addr::new(10, 244, lo, 0), 24).unwrap());
        l.attrs.public_ip = Ipv4Addr::new(198, 18, 2 + hi, lo);
        l
    };
    let own = peer(1);
    let ns_path = host.ns.path();
    host.ns.block_on(move || async move {
        let mut b = HostGw::new(ext).await.expect("HostGw::new");
        b.prepare().await.expect("prepare");
        b.register(&own).await.expect("register");
        let peers: Vec<Lease> = (2..=201).map(peer).collect();
        let before = b.netlink().dump_count();
        b.reconcile(&peers).await.expect("reconcile");
        assert_eq!(b.programmed_peers(), 200);
        assert_eq!(
            b.netlink().dump_count() - before,
            2,
            "two dumps per reconcile"
        );

        let dumps = b.netlink().dump_count();
        b.add_peer(&peer(202)).await.expect("add");
        let mut moved = peer(3);
        moved.attrs.public_ip = Ipv4Addr::new(198, 18, 3, 3);
        b.add_peer(&moved).await.expect("new gateway");
        b.remove_peer(&peer(4)).await.expect("remove");
        b.remove_peer(&peer(250)).await.expect("remove unknown");
        let st = std::process::Command::new("nsenter")
            .args([format!("--net={ns_path}").as_str(), "--"])
            .args(["ip", "route", "del", "10.244.5.0/24"])
            .status()
            .expect("spawn ip route del");
        assert!(st.success(), "ip route del failed");
        b.remove_peer(&peer(5)).await.expect("remove already gone");
        assert_eq!(
            b.netlink().dump_count(),
            dumps,
            "a peer event dumped the routing table"
        );
        assert_eq!(b.programmed_peers(), 199);
    });
    let routes = host.ns.sh("ip route show proto 84");
    assert_eq!(routes.lines().count(), 199, "{routes}");
    assert!(
        routes.contains("10.244.3.0/24 via 198.18.3.3 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.202.0/24 via 198.18.2.202 dev eth0"),
        "{routes}"
    );
    assert!(
        !routes.contains("10.244.4.0/24") && !routes.contains("10.244.5.0/24"),
        "{routes}"
    );
}

#[test]
fn hostgw_refuses_nat() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    let mut ext = ext_for(&host.ns, host.ip);
    ext.public_ip = Ipv4Addr::new(198, 18, 9, 9);
    let err = host
        .ns
        .block_on(move || async move { HostGw::new(ext).await.err().map(|e| e.to_string()) })
        .expect("NAT accepted");
    assert!(err.contains("NAT") && err.contains("198.18.9.9"), "{err}");
}

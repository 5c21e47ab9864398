//! The kernel VXLAN backend driven directly through the `Backend` trait (no agent, no
//! etcd): three host namespaces on one underlay, two pods each. Asserts the kernel state
//! it programs (as `ip`/`bridge` print it), that pod traffic crosses, that a restart is a
//! no-op, that removals and reconcile leave exactly the peer set, and that it adopts or
//! recreates an existing device.

use std::net::Ipv4Addr;

use flannel_agent::{
    backend::{Backend, ExternalInterface, Touched, vxlan::KernelVxlan},
    lease::{BackendAttrs, Lease, LeaseAttrs, MacAddr},
    netconf::VxlanConfig,
};
use flannel_e2e::{
    netns::{Host, NetNs, Underlay, kernel_state},
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

/// The nexthop object the agent's route to `10.244.<i>.0/24` names (its base address).
fn nexthop_id(i: usize) -> u32 {
    u32::from(Ipv4Addr::new(10, 244, u8::try_from(i).unwrap(), 0))
}

fn subnet(i: u8) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap()
}

/// Start (or restart) the backend on `host`: new → prepare → register → reconcile, as the
/// agent does. Returns the published attributes and the MTU.
fn run_backend(
    host: &Host,
    config: &VxlanConfig,
    own: Option<Lease>,
    peers: Vec<Lease>,
) -> (LeaseAttrs, u32) {
    let ext = ext_for(&host.ns, host.ip);
    let config = config.clone();
    host.ns.block_on(move || async move {
        let mut b = KernelVxlan::new(ext, config)
            .await
            .expect("KernelVxlan::new");
        let attrs = b.prepare().await.expect("prepare");
        if let Some(own) = own {
            b.register(&own).await.expect("register");
            b.reconcile(&peers).await.expect("reconcile");
        }
        (attrs, b.mtu())
    })
}

/// Apply one operation to `host`'s backend after a (no-op) start-up.
fn with_backend<F>(host: &Host, config: &VxlanConfig, own: Lease, op: F)
where
    F: for<'a> FnOnce(
            &'a mut KernelVxlan,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>
        + Send
        + 'static,
{
    let ext = ext_for(&host.ns, host.ip);
    let config = config.clone();
    host.ns.block_on(move || async move {
        let mut b = started(ext, config, &own).await;
        op(&mut b).await;
    });
}

/// The backend after start-up with `own` as this host's lease and no peers yet.
async fn started(ext: ExternalInterface, config: VxlanConfig, own: &Lease) -> KernelVxlan {
    let mut b = KernelVxlan::new(ext, config)
        .await
        .expect("KernelVxlan::new");
    b.prepare().await.expect("prepare");
    b.register(own).await.expect("register");
    b
}

fn mac_of(attrs: &LeaseAttrs) -> String {
    attrs.backend.vxlan_v4().unwrap().vtep_mac.to_string()
}

#[track_caller]
fn ping(from: &NetNs, to: Ipv4Addr) {
    from.sh(&format!("ping -c 1 -W 2 {to}"));
}

fn iperf_bytes(server: &NetNs, server_ip: Ipv4Addr, client: &NetNs) -> u64 {
    let _srv = server.spawn_server("iperf3", &["-s", "-1", "-B", &server_ip.to_string()], 5201);
    // Time-bound rather than `-n`: with `-n` the server stops counting when the control
    // channel says "done", which can overtake data still in flight.
    let out = client.sh(&format!(
        "iperf3 -c {server_ip} -t 2 -J --connect-timeout 3000"
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0)
}

#[test]
fn vxlan_backend_programs_peers_carries_traffic_and_reconciles() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let mut hosts: Vec<Host> = (1..=3).map(|i| underlay.add_host(i)).collect();
    let config = VxlanConfig::default();

    // Prepare each host (creates flannel.1) and build the leases it would publish.
    let mut leases = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let (attrs, mtu) = run_backend(h, &config, None, vec![]);
        assert_eq!(mtu, 1450);
        assert_eq!(attrs.backend_type(), "vxlan");
        let data = attrs.backend.data_json().unwrap();
        assert!(
            data.starts_with(r#"{"VNI":1,"VtepMAC":""#)
                && data.len() == r#"{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}"#.len(),
            "{data}"
        );
        leases.push(Lease {
            subnet: Some(subnet(u8::try_from(i).unwrap() + 1)),
            ipv6_subnet: None,
            extra_senders: Vec::new(),
            attrs,
        });
    }
    let peers_of = |i: usize, leases: &[Lease]| -> Vec<Lease> {
        leases
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, l)| l.clone())
            .collect()
    };
    for (i, h) in hosts.iter().enumerate() {
        run_backend(h, &config, Some(leases[i].clone()), peers_of(i, &leases));
    }

    for (i, h) in hosts.iter_mut().enumerate() {
        h.add_pods(subnet(u8::try_from(i).unwrap() + 1), 1450, 2);
    }
    // The device and per-peer entries, exactly as upstream programs them.
    let h1 = &hosts[0].ns;
    let link = h1.sh("ip -d link show flannel.1");
    for want in [
        "mtu 1450",
        "vxlan id 1 local 198.18.0.1 dev eth0",
        "dstport 8472",
        "nolearning",
        "ttl auto",
    ] {
        assert!(link.contains(want), "missing {want:?} in {link}");
    }
    assert!(
        link.contains(&format!("link/ether {}", mac_of(&leases[0].attrs))),
        "{link}"
    );
    assert_eq!(
        h1.sh("ip -o -4 addr show dev flannel.1 | awk '{print $4}'")
            .trim(),
        "10.244.1.0/32"
    );
    let neigh = h1.sh("ip neigh show dev flannel.1");
    let fdb = h1.sh("bridge fdb show dev flannel.1");
    let routes = h1.sh("ip route show");
    for (j, l) in leases.iter().enumerate().skip(1) {
        let n = j + 1;
        let mac = mac_of(&l.attrs);
        assert!(
            neigh.contains(&format!("10.244.{n}.0 lladdr {mac} PERMANENT")),
            "{neigh}"
        );
        assert!(
            fdb.contains(&format!("{mac} dst 198.18.0.{n} self permanent")),
            "{fdb}"
        );
        assert!(
            routes.contains(&format!(
                "10.244.{n}.0/24 nhid {} via 10.244.{n}.0 dev flannel.1 proto 84 onlink",
                nexthop_id(n)
            )),
            "{routes}"
        );
    }
    assert_eq!(neigh.lines().count(), 2, "{neigh}");
    assert_eq!(
        fdb.lines().filter(|l| l.contains(" dst ")).count(),
        2,
        "{fdb}"
    );

    // Pods: every pod reaches every other pod.
    let pods: Vec<(&NetNs, Ipv4Addr)> = hosts
        .iter()
        .flat_map(|h| h.pods.iter().map(|p| (&p.ns, p.ip)))
        .collect();
    for (a, _) in &pods {
        for (_, ip) in &pods {
            ping(a, *ip);
        }
    }
    // Bulk TCP across hosts (TSO-sized segments through the tunnel).
    let bytes = iperf_bytes(
        &hosts[2].pods[0].ns,
        hosts[2].pods[0].ip,
        &hosts[0].pods[0].ns,
    );
    assert!(
        bytes >= 10 * 1024 * 1024,
        "iperf3 received only {bytes} bytes in 2 s"
    );

    // MTU: a DF packet filling the pod MTU crosses; one larger than the tunnel allows is
    // refused by the host with frag-needed (pod MTU raised to 1500 to let it leave the pod).
    hosts[0].pods[0].ns.sh(&format!(
        "ping -c 1 -W 2 -M do -s 1422 {}",
        hosts[1].pods[0].ip
    ));
    let big = &hosts[0].pods[1];
    big.ns.sh("ip link set eth0 mtu 1500");
    hosts[0].ns.sh("ip link set veth3 mtu 1500");
    let out = big.ns.run(&format!(
        "ping -c 1 -W 2 -M do -s 1472 {}",
        hosts[1].pods[0].ip
    ));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "oversized DF ping crossed: {text}");
    assert!(
        text.contains("mtu = 1450") || text.contains("mtu=1450"),
        "no frag-needed: {text}"
    );

    // Restart: a second start-up with the same leases changes nothing, MAC included.
    let before: Vec<String> = hosts
        .iter()
        .map(|h| kernel_state(&h.ns, "flannel.1"))
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let (attrs, _) = run_backend(h, &config, Some(leases[i].clone()), peers_of(i, &leases));
        assert_eq!(
            attrs, leases[i].attrs,
            "restart changed the advertised attributes"
        );
    }
    let after: Vec<String> = hosts
        .iter()
        .map(|h| kernel_state(&h.ns, "flannel.1"))
        .collect();
    assert_eq!(before, after, "restart changed kernel state");

    // Host 3 leaves: a removal carries only the subnet (etcd delete events have no value).
    let gone = Lease::bare(Some(subnet(3)), None);
    let mac3 = mac_of(&leases[2].attrs);
    for h in &hosts[..2] {
        let g = gone.clone();
        let own = leases[usize::from(h.ip.octets()[3]) - 1].clone();
        with_backend(h, &config, own, move |b| {
            Box::pin(async move { b.remove_peer(&g).await.expect("remove_peer") })
        });
        let state = kernel_state(&h.ns, "flannel.1");
        for stale in ["10.244.3.0", mac3.as_str(), "198.18.0.3"] {
            assert!(
                !state.contains(stale),
                "{stale} left after removal:\n{state}"
            );
        }
    }
    ping(&hosts[0].pods[0].ns, hosts[1].pods[0].ip);
    let clean = kernel_state(h1, "flannel.1");

    // Reconcile: stale and duplicate entries on flannel.1 go, routes we don't own stay,
    // malformed peers are skipped.
    let mac2 = mac_of(&leases[1].attrs);
    h1.sh(&format!(
        "ip neigh replace 10.244.9.0 lladdr 0e:00:00:00:00:09 dev flannel.1 nud permanent && \
         bridge fdb append 0e:00:00:00:00:09 dev flannel.1 dst 198.18.0.9 self permanent && \
         bridge fdb append {mac2} dev flannel.1 dst 198.18.0.99 self permanent && \
         ip route add 10.244.9.0/24 via 10.244.9.0 dev flannel.1 onlink && \
         ip route add 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink metric 5 && \
         ip route add 10.244.8.0/24 via 198.18.0.2 proto 84 && \
         ip route add 10.99.0.0/16 via 198.18.0.2"
    ));
    let mut bad_type = leases[1].clone();
    bad_type.subnet = Some(subnet(20));
    bad_type.attrs.backend = BackendAttrs::HostGw;
    // (A malformed VtepMAC no longer reaches a backend: the lease codec refuses it.)
    let mut no_data = leases[1].clone();
    no_data.subnet = Some(subnet(22));
    no_data.attrs.backend = BackendAttrs::Vxlan { v4: None, v6: None };
    let peers = vec![leases[1].clone(), bad_type, no_data];
    with_backend(&hosts[0], &config, leases[0].clone(), move |b| {
        Box::pin(async move { b.reconcile(&peers).await.expect("reconcile") })
    });
    let state = kernel_state(h1, "flannel.1");
    assert!(
        state.contains("10.99.0.0/16 via 198.18.0.2 dev eth0"),
        "foreign route removed:\n{state}"
    );
    let without_foreign: String = state
        .lines()
        .filter(|l| !l.starts_with("10.99.0.0/16"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        without_foreign, clean,
        "reconcile did not restore the exact state"
    );
    ping(&hosts[0].pods[0].ns, hosts[1].pods[1].ip);
}

#[test]
fn vxlan_device_is_adopted_when_compatible_and_recreated_otherwise() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    let config = VxlanConfig::default();

    // Compatible leftover (e.g. from upstream flannel): reused, MAC kept, MTU fixed.
    host.ns.sh(
        "ip link add flannel.1 address 0e:11:22:33:44:55 mtu 1400 type vxlan id 1 \
         local 198.18.0.1 dev eth0 dstport 8472 nolearning",
    );
    let idx = host.ns.ifindex("flannel.1");
    let (attrs, _) = run_backend(&host, &config, None, vec![]);
    assert_eq!(mac_of(&attrs), "0e:11:22:33:44:55");
    assert_eq!(
        host.ns.ifindex("flannel.1"),
        idx,
        "compatible device was recreated"
    );
    assert!(host.ns.sh("ip link show flannel.1").contains("mtu 1450"));

    // Incompatible (wrong port): replaced by a correct device with a fresh MAC.
    host.ns.sh("ip link del flannel.1");
    host.ns.sh(
        "ip link add flannel.1 address 0e:11:22:33:44:55 type vxlan id 1 \
         local 198.18.0.1 dev eth0 dstport 4789",
    );
    let (attrs, _) = run_backend(&host, &config, None, vec![]);
    let mac = mac_of(&attrs);
    assert_ne!(mac, "0e:11:22:33:44:55");
    let link = host.ns.sh("ip -d link show flannel.1");
    assert!(
        link.contains("dstport 8472") && link.contains(&format!("link/ether {mac}")),
        "{link}"
    );

    // Configured VNI, port, GBP and MTU reach the kernel; MAC is locally administered.
    let custom = VxlanConfig {
        vni: 7,
        port: 4790,
        gbp: true,
        mtu: Some(1400),
        ..VxlanConfig::default()
    };
    let (attrs, mtu) = run_backend(&host, &custom, None, vec![]);
    assert_eq!(mtu, 1350);
    let link = host.ns.sh("ip -d link show flannel.7");
    for want in ["vxlan id 7", "dstport 4790", "gbp", "mtu 1350"] {
        assert!(link.contains(want), "missing {want:?}: {link}");
    }
    let first = u8::from_str_radix(&mac_of(&attrs)[..2], 16).unwrap();
    assert_eq!(first & 0x03, 0x02, "MAC not locally administered unicast");
    assert!(
        attrs
            .backend
            .data_json()
            .unwrap()
            .starts_with(r#"{"VNI":7,"#)
    );
}

#[test]
fn vxlan_direct_routing_uses_plain_routes_to_on_link_peers() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let mut hosts: Vec<Host> = (1..=2).map(|i| underlay.add_host(i)).collect();
    let config = VxlanConfig {
        direct_routing: true,
        ..VxlanConfig::default()
    };
    let mut leases = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let (attrs, _) = run_backend(h, &config, None, vec![]);
        leases.push(Lease {
            subnet: Some(subnet(u8::try_from(i).unwrap() + 1)),
            ipv6_subnet: None,
            extra_senders: Vec::new(),
            attrs,
        });
    }
    for (i, h) in hosts.iter().enumerate() {
        let peers = vec![leases[1 - i].clone()];
        run_backend(h, &config, Some(leases[i].clone()), peers);
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        h.add_pods(subnet(u8::try_from(i).unwrap() + 1), 1450, 1);
    }
    let h1 = &hosts[0].ns;
    let routes = h1.sh("ip route show");
    assert!(
        // Plain (no nexthop object): the uplink is the host's, and its tools must be able
        // to flush it.
        routes.contains("10.244.2.0/24 via 198.18.0.2 dev eth0 proto 84 \n"),
        "{routes}"
    );
    assert!(h1.sh("ip neigh show dev flannel.1").trim().is_empty());
    assert!(!h1.sh("bridge fdb show dev flannel.1").contains(" dst "));
    ping(&hosts[0].pods[0].ns, hosts[1].pods[0].ip);

    // The peer leaves: its direct route goes (it is ours by protocol).
    with_backend(&hosts[0], &config, leases[0].clone(), |b| {
        Box::pin(async move { b.reconcile(&[]).await.expect("reconcile") })
    });
    assert!(!hosts[0].ns.sh("ip route show").contains("10.244.2.0/24"));
    let nexthops = hosts[0].ns.sh("ip nexthop show");
    assert!(!nexthops.contains("198.18.0.2"), "{nexthops}");
}

#[test]
fn vxlan_reconcile_recreates_a_deleted_device_with_the_advertised_mac() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let hosts: Vec<Host> = (1..=2).map(|i| underlay.add_host(i)).collect();
    let config = VxlanConfig::default();
    let (peer_attrs, _) = run_backend(&hosts[1], &config, None, vec![]);
    let peer = Lease {
        subnet: Some(subnet(2)),
        ipv6_subnet: None,
        extra_senders: Vec::new(),
        attrs: peer_attrs,
    };
    let own = Lease {
        subnet: Some(subnet(1)),
        ipv6_subnet: None,
        extra_senders: Vec::new(),
        attrs: run_backend(&hosts[0], &config, None, vec![]).0,
    };
    let ext = ext_for(&hosts[0].ns, hosts[0].ip);
    let (mac_before, mac_after) = hosts[0].ns.block_on(move || async move {
        let mut b = KernelVxlan::new(ext, config).await.unwrap();
        b.prepare().await.unwrap();
        b.register(&own).await.unwrap();
        b.reconcile(std::slice::from_ref(&peer)).await.unwrap();
        let before = b.vtep_mac().expect("an IPv4 device");
        // This thread is inside the host namespace, so `ip` runs there too.
        let st = std::process::Command::new("ip")
            .args(["link", "del", "flannel.1"])
            .status()
            .unwrap();
        assert!(st.success());
        b.reconcile(std::slice::from_ref(&peer)).await.unwrap();
        (before, b.vtep_mac().expect("an IPv4 device"))
    });
    assert_eq!(mac_before, mac_after);
    let state = kernel_state(&hosts[0].ns, "flannel.1");
    assert!(
        state.contains(&format!("link/ether {}", MacAddr(mac_before))),
        "{state}"
    );
    assert!(state.contains("inet 10.244.1.0/32"), "{state}");
    assert!(
        state.contains(&format!(
            "10.244.2.0/24 nhid {} via 10.244.2.0 dev flannel.1 proto 84 onlink",
            nexthop_id(2)
        )),
        "{state}"
    );
    assert!(state.contains("dst 198.18.0.2 self permanent"), "{state}");
}

#[test]
fn vxlan_behind_nat_sends_from_the_interface_and_publishes_the_public_ip() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    let mut ext = ext_for(&host.ns, host.ip);
    ext.public_ip = Ipv4Addr::new(198, 18, 9, 9);
    let attrs = host.ns.block_on(move || async move {
        let mut b = KernelVxlan::new(ext, VxlanConfig::default()).await.unwrap();
        b.prepare().await.unwrap()
    });
    assert_eq!(attrs.public_ip, Ipv4Addr::new(198, 18, 9, 9));
    let link = host.ns.sh("ip -d link show flannel.1");
    assert!(link.contains("local 198.18.0.1 dev eth0"), "{link}");
}

#[test]
fn vxlan_changed_peer_mac_replaces_its_entries() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let mut hosts: Vec<Host> = (1..=2).map(|i| underlay.add_host(i)).collect();
    let config = VxlanConfig::default();
    let mut leases: Vec<Lease> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Lease {
            subnet: Some(subnet(u8::try_from(i).unwrap() + 1)),
            ipv6_subnet: None,
            extra_senders: Vec::new(),
            attrs: run_backend(h, &config, None, vec![]).0,
        })
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        run_backend(
            h,
            &config,
            Some(leases[i].clone()),
            vec![leases[1 - i].clone()],
        );
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        h.add_pods(subnet(u8::try_from(i).unwrap() + 1), 1450, 1);
    }
    ping(&hosts[0].pods[0].ns, hosts[1].pods[0].ip);
    let old_mac = mac_of(&leases[1].attrs);

    // Host 2's device is recreated (new MAC) and its lease republished.
    hosts[1].ns.sh("ip link del flannel.1");
    leases[1].attrs = run_backend(
        &hosts[1],
        &config,
        Some(leases[1].clone()),
        vec![leases[0].clone()],
    )
    .0;
    let new_mac = mac_of(&leases[1].attrs);
    assert_ne!(old_mac, new_mac);
    let changed = leases[1].clone();
    with_backend(&hosts[0], &config, leases[0].clone(), move |b| {
        Box::pin(async move { b.add_peer(&changed).await.expect("add_peer") })
    });
    let state = kernel_state(&hosts[0].ns, "flannel.1");
    assert!(!state.contains(&old_mac), "old MAC left:\n{state}");
    assert!(
        state.contains(&format!("10.244.2.0 lladdr {new_mac} PERMANENT")),
        "{state}"
    );
    assert!(
        state.contains(&format!("{new_mac} dst 198.18.0.2 self permanent")),
        "{state}"
    );
    ping(&hosts[0].pods[0].ns, hosts[1].pods[0].ip);
}

/// A VXLAN peer lease for subnet `10.244.<i>.0/24` on `198.18.1.<i>` with MAC `0e:00:00:00:<m>:<i>`.
fn vxlan_peer(i: u8, m: u8) -> Lease {
    Lease {
        subnet: Some(subnet(i)),
        ipv6_subnet: None,
        extra_senders: Vec::new(),
        attrs: LeaseAttrs::vxlan(
            Ipv4Addr::new(198, 18, 1, i),
            flannel_agent::lease::VxlanBackendData {
                vni: 1,
                vtep_mac: MacAddr([0x0e, 0, 0, 0, m, i]),
            },
        ),
    }
}

/// Run `cmd` with `sh -c` on this thread (inside the namespace it entered).
fn sh_here(cmd: &str) {
    let st = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
fn peer_routes_name_nexthop_objects_and_leave_foreign_ones_alone() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    let ext = ext_for(&host.ns, host.ip);
    let own = vxlan_peer(1, 0);
    host.ns.block_on(move || async move {
        let mut b = started(ext, VxlanConfig::default(), &own).await;
        b.reconcile(&[]).await.expect("reconcile");
        // Another owner's nexthop holds the id 10.244.2.0/24's route would use; one of
        // ours is left from a peer that is gone.
        sh_here(&format!(
            "ip nexthop add id {} via 198.18.0.9 dev eth0 proto static && \
             ip nexthop add id {} via 10.244.9.0 dev flannel.1 onlink proto 84",
            nexthop_id(2),
            nexthop_id(9)
        ));
        b.reconcile(&[vxlan_peer(2, 0), vxlan_peer(3, 0)])
            .await
            .expect("reconcile");
        assert_eq!(b.programmed_peers(), 2);
    });
    let routes = host.ns.sh("ip route show dev flannel.1");
    let nexthops = host.ns.sh("ip nexthop show");
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 proto 84 onlink"),
        "the subnet whose id is taken has no plain route:\n{routes}"
    );
    assert!(
        routes.contains(&format!(
            "10.244.3.0/24 nhid {} via 10.244.3.0 proto 84 onlink",
            nexthop_id(3)
        )),
        "{routes}"
    );
    assert!(
        nexthops.contains(&format!(
            "id {} via 198.18.0.9 dev eth0 scope link proto static",
            nexthop_id(2)
        )),
        "the foreign nexthop was touched:\n{nexthops}"
    );
    assert!(
        nexthops.contains(&format!(
            "id {} via 10.244.3.0 dev flannel.1 scope link proto 84 onlink",
            nexthop_id(3)
        )),
        "{nexthops}"
    );
    assert!(
        !nexthops.contains("10.244.9.0"),
        "the stale nexthop was left:\n{nexthops}"
    );
}

#[test]
fn peer_events_after_a_reconcile_read_no_table() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    let ext = ext_for(&host.ns, host.ip);
    let own = Lease {
        subnet: Some(subnet(1)),
        ipv6_subnet: None,
        extra_senders: Vec::new(),
        attrs: vxlan_peer(1, 0).attrs,
    };
    host.ns.block_on(move || async move {
        let mut b = started(ext, VxlanConfig::default(), &own).await;
        // 200 peers in one reconcile: batched requests, one dump per table (the device's
        // addresses, neighbours, FDB, routes, nexthop objects).
        let peers: Vec<Lease> = (2..=201).map(|i| vxlan_peer(i, 0)).collect();
        let before = b.netlink().dump_count();
        b.reconcile(&peers).await.expect("reconcile");
        assert_eq!(b.programmed_peers(), 200);
        assert_eq!(b.netlink().dump_count() - before, 5, "one dump per table");

        // Events: a new peer, a new MAC, a new address, a removal — no dump at all.
        let dumps = b.netlink().dump_count();
        b.add_peer(&vxlan_peer(202, 0)).await.expect("add");
        b.add_peer(&vxlan_peer(2, 1)).await.expect("new MAC");
        let mut moved = vxlan_peer(3, 0);
        moved.attrs.public_ip = Ipv4Addr::new(198, 18, 2, 3);
        b.add_peer(&moved).await.expect("new address");
        b.remove_peer(&vxlan_peer(4, 0)).await.expect("remove");
        assert_eq!(
            b.netlink().dump_count(),
            dumps,
            "a peer event dumped a table"
        );
        assert_eq!(b.programmed_peers(), 200);
    });
    let neigh = host.ns.sh("ip neigh show dev flannel.1");
    let fdb = host.ns.sh("bridge fdb show dev flannel.1");
    let routes = host.ns.sh("ip route show dev flannel.1");
    assert_eq!(neigh.lines().count(), 200, "{neigh}");
    assert_eq!(fdb.lines().filter(|l| l.contains(" dst ")).count(), 200);
    assert_eq!(routes.lines().count(), 200);
    // One nexthop object per route; the removed peer's went with it.
    let nexthops = host.ns.sh("ip nexthop show");
    assert_eq!(nexthops.lines().count(), 200, "{nexthops}");
    assert!(!nexthops.contains("via 10.244.4.0 "), "{nexthops}");
    assert!(neigh.contains("10.244.202.0 lladdr 0e:00:00:00:00:ca PERMANENT"));
    assert!(neigh.contains("10.244.2.0 lladdr 0e:00:00:00:01:02 PERMANENT"));
    assert!(fdb.contains("0e:00:00:00:01:02 dst 198.18.1.2 self permanent"));
    assert!(
        !fdb.contains("0e:00:00:00:00:02 "),
        "old MAC's FDB entry left:\n{fdb}"
    );
    assert!(fdb.contains("0e:00:00:00:00:03 dst 198.18.2.3 self permanent"));
    assert!(!fdb.contains("dst 198.18.1.3 "), "old address left:\n{fdb}");
    assert!(!neigh.contains("10.244.4.0 "), "{neigh}");
    assert!(!routes.contains("10.244.4.0/24"), "{routes}");
}

/// A resync reads the tables while lease events go on: the comparison afterwards repairs
/// what was wrong when it read (a neighbour deleted by hand before the read) and leaves
/// the subnets events changed since (an add, a removal, a new MAC) as the events made
/// them — the stale read must neither re-program nor report them.
#[test]
fn a_resync_read_leaves_subnets_events_touched_since() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    let ext = ext_for(&host.ns, host.ip);
    let own = Lease {
        subnet: Some(subnet(1)),
        ipv6_subnet: None,
        extra_senders: Vec::new(),
        attrs: vxlan_peer(1, 0).attrs,
    };
    let ns_path = host.ns.path();
    host.ns.block_on(move || async move {
        let mut b = started(ext, VxlanConfig::default(), &own).await;
        let peers: Vec<Lease> = (2..=21).map(|i| vxlan_peer(i, 0)).collect();
        b.reconcile(&peers).await.expect("reconcile");
        let st = std::process::Command::new("nsenter")
            .args([format!("--net={ns_path}").as_str(), "--"])
            .args(["ip", "neigh", "del", "10.244.6.0", "dev", "flannel.1"])
            .status()
            .expect("spawn ip neigh del");
        assert!(st.success(), "ip neigh del failed");

        let tables = b.tables_reader().await.expect("read tables");
        let mut touched = Touched::default();
        for (event, add) in [
            (vxlan_peer(22, 0), true),
            (vxlan_peer(3, 0), false),
            (vxlan_peer(4, 1), true),
        ] {
            touched.add(&event);
            if add {
                b.add_peer(&event).await.expect("add");
            } else {
                b.remove_peer(&event).await.expect("remove");
            }
        }
        let now: Vec<Lease> = (2..=22)
            .filter(|i| *i != 3)
            .map(|i| vxlan_peer(i, u8::from(i == 4)))
            .collect();
        let fixes = b
            .check_with(&now, Some(tables), &touched)
            .await
            .expect("check");
        let details: Vec<&str> = fixes.iter().map(|(_, d)| d.as_str()).collect();
        assert_eq!(
            details,
            ["neighbour 10.244.6.0 lladdr 0e:00:00:00:00:06 dev flannel.1"],
            "{fixes:?}"
        );
        assert_eq!(b.programmed_peers(), 20);
    });
    let neigh = host.ns.sh("ip neigh show dev flannel.1");
    let fdb = host.ns.sh("bridge fdb show dev flannel.1");
    let routes = host.ns.sh("ip route show dev flannel.1");
    assert_eq!(neigh.lines().count(), 20, "{neigh}");
    assert_eq!(fdb.lines().filter(|l| l.contains(" dst ")).count(), 20);
    assert_eq!(routes.lines().count(), 20, "{routes}");
    assert!(neigh.contains("10.244.6.0 lladdr 0e:00:00:00:00:06 PERMANENT"));
    assert!(neigh.contains("10.244.4.0 lladdr 0e:00:00:00:01:04 PERMANENT"));
    assert!(neigh.contains("10.244.22.0 lladdr 0e:00:00:00:00:16 PERMANENT"));
    assert!(!routes.contains("10.244.3.0/24"), "{routes}");
    assert!(
        !fdb.contains("0e:00:00:00:00:04 "),
        "old MAC's FDB entry left:\n{fdb}"
    );
}

/// `peer`'s dual-stack lease: IPv6 subnet `fd00:10:244:<i>::/64`, PublicIPv6
/// `fd00:198::1:<i>`, the same MAC for both devices (what matters is that each is set).
fn dual_peer(i: u8) -> Lease {
    let mut l = vxlan_peer(i, 0);
    let data = flannel_agent::lease::VxlanBackendData {
        vni: 1,
        vtep_mac: MacAddr([0x0e, 6, 0, 0, 0, i]),
    };
    l.ipv6_subnet = Some(format!("fd00:10:244:{i:x}::/64").parse().unwrap());
    l.attrs.public_ipv6 = Some(format!("fd00:198::1:{i:x}").parse().unwrap());
    if let BackendAttrs::Vxlan { v6, .. } = &mut l.attrs.backend {
        *v6 = Some(data);
    }
    l
}

/// The kernel reports an IPv6 route written without a metric at metric 1024: a resync must
/// see it as ours and right. (It once took 1024 for "someone changed it", rewrote the route
/// and then deleted it as stale, so every IPv6 peer lost its route at the first resync.)
#[test]
fn ipv6_peers_are_left_alone_by_a_resync() {
    if !require_root() {
        return;
    }
    let mut underlay = Underlay::new();
    let host = underlay.add_host(1);
    host.ns.sh("ip -6 addr add fd00:198::1:1/64 dev eth0 nodad");
    let mut ext = ext_for(&host.ns, host.ip);
    ext.iface_addr6 = Some("fd00:198::1:1".parse().unwrap());
    ext.public_ipv6 = ext.iface_addr6;
    let own = dual_peer(1);
    host.ns.block_on(move || async move {
        let mut b = started(ext, VxlanConfig::default(), &own).await;
        let peers: Vec<Lease> = (2..=5).map(dual_peer).collect();
        b.reconcile(&peers).await.expect("reconcile");
        let fixes = b
            .check_with(&peers, None, &Touched::default())
            .await
            .expect("check");
        assert!(
            fixes.is_empty(),
            "a resync changed correct entries: {fixes:?}"
        );
    });
    let routes = host.ns.sh("ip -6 route show dev flannel-v6.1 proto 84");
    assert_eq!(routes.lines().count(), 4, "{routes}");
    assert!(
        routes.contains("fd00:10:244:5::/64 via fd00:10:244:5:: metric 1024 onlink"),
        "{routes}"
    );
}

//! End to end with real agents on the kernel VXLAN datapath (`--dataplane=kernel`): three
//! host namespaces on a shared underlay, two pods each, one `flanneld` per host, real etcd.
//!
//! Needs root and a built agent: `cargo build -p flannel-agent --bin flanneld`, then
//! `cargo test -p flannel-e2e --test kernel_vxlan`.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use flannel_e2e::{
    cluster::{Cluster, net_conf},
    netns::{NetNs, connect_from, kernel_state, listen_in, seen_source, wait_until},
    require_root,
};

const VXLAN: &str = r#"{"Type":"vxlan"}"#;

#[test]
fn kernel_vxlan_agents_connect_every_pod_and_forget_departed_hosts() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(3, &net_conf(VXLAN), &["--dataplane=kernel"]);
    let envs = c.add_pods(2);
    for e in &envs {
        assert_eq!(e.mtu, 1450);
        assert_eq!(e.network.to_string(), "10.244.0.0/16");
    }
    c.assert_all_pods_reach_each_other();

    // Bulk TCP across hosts.
    let bytes = c.iperf(0, 2, 2);
    assert!(bytes >= 10 * 1024 * 1024, "only {bytes} bytes crossed");

    // MTU: 1422 bytes of ICMP payload + 28 = the pod MTU, DF, crosses; a pod with a larger
    // MTU gets frag-needed from its host for anything above the tunnel MTU.
    let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[1].host.pods[0]);
    a.ns.sh(&format!("ping -c 1 -W 2 -M do -s 1422 {}", b.ip));
    let big = &c.nodes[0].host.pods[1];
    big.ns.sh("ip link set eth0 mtu 1500");
    c.nodes[0].host.ns.sh("ip link set veth3 mtu 1500");
    let out = big
        .ns
        .run(&format!("ping -c 1 -W 2 -M do -s 1472 {}", b.ip));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && (text.contains("mtu = 1450") || text.contains("mtu=1450")),
        "{text}"
    );

    // Host 3 leaves: agent stopped, lease deleted. Everyone else forgets it within seconds.
    let gone = envs[2].subnet;
    let vtep3 = c.nodes[2].host.ns.sh("ip -o link show flannel.1");
    let mac3 = vtep3
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("host 3 VTEP MAC")
        .to_owned();
    c.nodes[2].stop();
    assert_eq!(c.etcd_delete(&Cluster::lease_key(gone)), 1);
    let base = gone.network().to_string();
    for n in &c.nodes[..2] {
        let ok = wait_until(Duration::from_secs(5), || {
            let s = kernel_state(&n.host.ns, "flannel.1");
            !s.contains(&base) && !s.contains(&mac3) && !s.contains("198.18.0.3")
        });
        assert!(
            ok,
            "{} still has host 3:\n{}\n{}",
            n.host.ns.name(),
            kernel_state(&n.host.ns, "flannel.1"),
            c.logs()
        );
    }
    c.nodes[0].host.pods[0]
        .ns
        .sh(&format!("ping -c 1 -W 2 {}", c.nodes[1].host.pods[1].ip));
}

#[test]
fn kernel_vxlan_agent_restart_keeps_connections_and_kernel_state() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(2, &net_conf(VXLAN), &["--dataplane=kernel"]);
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[1].host.pods[0]);
    let listener = listen_in(&b.ns, b.ip, 9000);
    let mut client = connect_from(&a.ns, b.ip, 9000).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let exchange =
        |client: &mut std::net::TcpStream, server: &mut std::net::TcpStream, msg: &[u8]| {
            client.write_all(msg).expect("send");
            let mut buf = vec![0u8; msg.len()];
            server.read_exact(&mut buf).expect("receive");
            assert_eq!(buf, msg);
        };
    exchange(&mut client, &mut server, b"before");

    let before: Vec<String> = c
        .nodes
        .iter()
        .map(|n| kernel_state(&n.host.ns, "flannel.1"))
        .collect();
    c.nodes[0].kill();
    exchange(&mut client, &mut server, b"while the agent is down");
    std::fs::remove_file(&c.nodes[0].subnet_file).expect("remove subnet.env");
    c.nodes[0].start();
    c.nodes[0].wait_subnet_env(Duration::from_secs(30));
    // Give the restarted agent time to reconcile its first snapshot.
    std::thread::sleep(Duration::from_secs(2));
    exchange(&mut client, &mut server, b"after the restart");
    let after: Vec<String> = c
        .nodes
        .iter()
        .map(|n| kernel_state(&n.host.ns, "flannel.1"))
        .collect();
    assert_eq!(before, after, "restart changed kernel state\n{}", c.logs());
}

#[test]
fn kernel_vxlan_ip_masq_rewrites_only_traffic_leaving_the_cluster() {
    if !require_root() {
        return;
    }
    // The legacy iptables mode, chosen explicitly (nftables is the default).
    let conf = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableNFTables":false,"Backend":{"Type":"vxlan"}}"#;
    let mut c = Cluster::start(2, conf, &["--dataplane=kernel", "--ip-masq=true"]);
    let outside_ip = Ipv4Addr::new(198, 18, 1, 1);
    let outside = c.underlay.attach("out", outside_ip, 1500);
    let envs = c.add_pods(1);
    assert!(envs.iter().all(|e| e.ipmasq), "FLANNEL_IPMASQ not true");
    c.assert_all_pods_reach_each_other();
    let nat = c.nodes[0].host.ns.sh("iptables -t nat -S");
    assert!(
        nat.contains("-A FLANNEL-POSTRTG"),
        "iptables mode installs upstream's chain: {nat}"
    );
    assert_only_traffic_leaving_the_cluster_is_masqueraded(&c, &outside, outside_ip);
}

#[test]
fn kernel_vxlan_ip_masq_with_nftables() {
    if !require_root() {
        return;
    }
    // No EnableNFTables key: nftables is the default.
    let mut c = Cluster::start(
        2,
        &net_conf(VXLAN),
        &["--dataplane=kernel", "--ip-masq=true"],
    );
    let outside_ip = Ipv4Addr::new(198, 18, 1, 1);
    let outside = c.underlay.attach("out", outside_ip, 1500);
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let h1 = &c.nodes[0].host.ns;
    let table = h1.sh("nft list table ip flannel-ipv4");
    assert!(
        table.contains("masquerade fully-random") && table.contains("chain forward"),
        "{table}"
    );
    assert!(
        !h1.sh("iptables -t nat -S").contains("FLANNEL"),
        "iptables rules in nftables mode"
    );
    assert_only_traffic_leaving_the_cluster_is_masqueraded(&c, &outside, outside_ip);
}

/// Host 1's pod reaches `outside` from host 1's address, and host 2's pod from its own.
fn assert_only_traffic_leaving_the_cluster_is_masqueraded(
    c: &Cluster,
    outside: &NetNs,
    outside_ip: Ipv4Addr,
) {
    let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[1].host.pods[0]);
    let out_listener = listen_in(outside, outside_ip, 8080);
    let pod_listener = listen_in(&b.ns, b.ip, 8080);
    assert_eq!(
        seen_source(&a.ns, &out_listener, outside_ip, 8080),
        IpAddr::V4(c.nodes[0].host.ip),
        "pod → outside not masqueraded\n{}",
        c.logs()
    );
    assert_eq!(
        seen_source(&a.ns, &pod_listener, b.ip, 8080),
        IpAddr::V4(a.ip),
        "pod → pod masqueraded"
    );
}

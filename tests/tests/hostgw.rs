//! End to end with real agents on the host-gw backend: three host namespaces on one L2
//! underlay, two pods each, one `flanneld` per host, real etcd.
//!
//! Needs root and a built agent: `cargo build -p flannel-agent --bin flanneld`, then
//! `cargo test -p flannel-e2e --test hostgw`.

use std::{
    io::{Read, Write},
    time::Duration,
};

use flannel_e2e::{
    cluster::{Cluster, net_conf},
    netns::{connect_from, listen_in, wait_until},
    require_root,
};

#[test]
fn hostgw_agents_route_every_pod_and_forget_departed_hosts() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(3, &net_conf(r#"{"Type":"host-gw"}"#), &[]);
    let envs = c.add_pods(2);
    assert!(envs.iter().all(|e| e.mtu == 1500), "{envs:?}");

    // Routes via each peer's public IP, marked as ours.
    for (i, n) in c.nodes.iter().enumerate() {
        for (j, e) in envs.iter().enumerate().filter(|(j, _)| *j != i) {
            let want = format!("{} via 198.18.0.{} dev eth0 proto 84", e.subnet, j + 1);
            let ok = wait_until(Duration::from_secs(10), || {
                n.host.ns.sh("ip route show").contains(&want)
            });
            assert!(
                ok,
                "{}: no route {want:?}\n{}\n{}",
                n.host.ns.name(),
                n.host.ns.sh("ip route show"),
                c.logs()
            );
        }
    }
    let pods: Vec<_> = c.nodes.iter().flat_map(|n| n.host.pods.iter()).collect();
    for a in &pods {
        for b in &pods {
            a.ns.sh(&format!("ping -c 1 -W 2 {}", b.ip));
        }
    }
    let server = &c.nodes[1].host.pods[1];
    let _srv = server
        .ns
        .spawn_server("iperf3", &["-s", "-1", "-B", &server.ip.to_string()], 5201);
    let out = c.nodes[0].host.pods[0].ns.sh(&format!(
        "iperf3 -c {} -t 2 -J --connect-timeout 3000",
        server.ip
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    let bytes = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(bytes >= 10 * 1024 * 1024, "only {bytes} bytes crossed");

    // A crashed and restarted agent leaves the routes exactly as they were.
    // … and an open TCP connection across that crash keeps working.
    let (a, b) = (&c.nodes[0].host.pods[0], &c.nodes[1].host.pods[0]);
    let listener = listen_in(&b.ns, b.ip, 9000);
    let mut client = connect_from(&a.ns, b.ip, 9000).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut exchange = |msg: &[u8]| {
        client.write_all(msg).expect("send");
        let mut buf = vec![0u8; msg.len()];
        server.read_exact(&mut buf).expect("receive");
        assert_eq!(buf, msg);
    };
    exchange(b"before the crash");
    let before = c.nodes[0].host.ns.sh("ip route show");
    c.nodes[0].kill();
    exchange(b"while the agent is down");
    std::fs::remove_file(&c.nodes[0].subnet_file).expect("remove subnet.env");
    c.nodes[0].start();
    c.nodes[0].wait_subnet_env(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.nodes[0].host.ns.sh("ip route show"),
        before,
        "{}",
        c.logs()
    );
    exchange(b"after the restart");

    // Host 3 leaves.
    c.nodes[2].stop();
    assert_eq!(c.etcd_delete(&Cluster::lease_key(envs[2].subnet)), 1);
    let gone = envs[2].subnet.to_string();
    for n in &c.nodes[..2] {
        let ok = wait_until(Duration::from_secs(5), || {
            !n.host.ns.sh("ip route show").contains(&gone)
        });
        assert!(ok, "{} still routes {gone}\n{}", n.host.ns.name(), c.logs());
    }
}

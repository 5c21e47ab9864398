//! The real `flanneld` against a real etcd, one agent per host namespace, on the kernel
//! VXLAN datapath: what lands in etcd and `subnet.env` (wire format), readiness, renewal
//! with a short TTL, lease loss, SIGTERM semantics (nothing torn down) and subnet reuse
//! across restarts. Pod-to-pod traffic is covered by `kernel_vxlan.rs`.
//!
//! Needs root and a built agent: `cargo build -p flannel-agent --bin flanneld`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::unix::fs::MetadataExt,
    time::Duration,
};

use flannel_e2e::{
    cluster::{BpfPins, Cluster, Node, net_conf},
    netns::{NetNs, host_ip, wait_until},
    require_root,
};
use ipnetwork::Ipv4Network;

const VXLAN: &str = r#"{"Type":"vxlan"}"#;
const HEALTHZ: u16 = 9464;

fn vtep_mac(ns: &NetNs) -> String {
    let out = ns.sh("ip -br link show flannel.1");
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"))
        .to_owned()
}

fn readyz(ns: &NetNs) -> String {
    ns.enter(|| {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, HEALTHZ))?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        std::io::Result::Ok(out)
    })
    .unwrap_or_else(|e| format!("error: {e}"))
}

fn has_route(node: &Node, subnet: Ipv4Network) -> bool {
    node.host
        .ns
        .sh(&format!("ip route show {subnet}"))
        .contains("flannel.1")
}

fn running(node: &mut Node) -> bool {
    node.agent.as_mut().is_some_and(|a| a.running())
}

#[test]
fn agents_publish_upstream_leases_write_subnet_env_and_renew() {
    if !require_root() {
        return;
    }
    let healthz = format!("--healthz-port={HEALTHZ}");
    let mut c = Cluster::start(
        2,
        &net_conf(VXLAN),
        &[
            "--dataplane=kernel",
            "--healthz-ip=127.0.0.1",
            &healthz,
            "--subnet-lease-ttl=4",
        ],
    );
    let mut subnets = Vec::new();
    for i in 0..c.nodes.len() {
        let env = c.nodes[i].wait_subnet_env(Duration::from_secs(30));
        let node = &c.nodes[i];
        subnets.push(env.subnet);

        // subnet.env: upstream's exact lines and order, mode 0644.
        let text = std::fs::read_to_string(&node.subnet_file).unwrap();
        let gw = Ipv4Addr::from(u32::from(env.subnet.ip()) + 1);
        assert_eq!(
            text,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={gw}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
            )
        );
        let mode = std::fs::metadata(&node.subnet_file).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o644);

        // The etcd value is byte-for-byte what upstream writes, with this host's device MAC.
        let value = c
            .etcd_get(&Cluster::lease_key(env.subnet))
            .expect("lease key in etcd");
        let expected = format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            host_ip(i as u8 + 1),
            vtep_mac(&node.host.ns)
        );
        assert_eq!(value, expected);

        let ready = readyz(&node.host.ns);
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.ends_with("flanneld is ready"),
            "{ready}"
        );
    }
    assert_ne!(subnets[0], subnets[1]);
    assert!(
        wait_until(Duration::from_secs(10), || has_route(
            &c.nodes[0],
            subnets[1]
        ) && has_route(
            &c.nodes[1],
            subnets[0]
        )),
        "peers not programmed\n{}",
        c.logs()
    );

    // A 4 s TTL renewed every 2 s: after three TTLs both leases and routes are still there.
    std::thread::sleep(Duration::from_secs(12));
    for sn in &subnets {
        assert!(
            c.etcd_get(&Cluster::lease_key(*sn)).is_some(),
            "lease {sn} expired despite renewal\n{}",
            c.logs()
        );
    }
    assert!(has_route(&c.nodes[0], subnets[1]) && has_route(&c.nodes[1], subnets[0]));
}

#[test]
fn sigterm_keeps_state_restart_reuses_subnet_and_a_deleted_lease_is_restored() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(2, &net_conf(VXLAN), &["--dataplane=kernel"]);
    let first = c.nodes[0].wait_subnet_env(Duration::from_secs(30)).subnet;
    let peer = c.nodes[1].wait_subnet_env(Duration::from_secs(30)).subnet;
    assert!(wait_until(Duration::from_secs(10), || has_route(
        &c.nodes[0],
        peer
    )));

    // SIGTERM: clean exit, nothing torn down (lease key, device, peer route all stay).
    c.nodes[0].stop();
    assert!(
        c.nodes[0].log().contains("Exiting cleanly"),
        "{}",
        c.nodes[0].log()
    );
    assert!(
        c.etcd_get(&Cluster::lease_key(first)).is_some(),
        "lease deleted on shutdown"
    );
    assert!(
        has_route(&c.nodes[0], peer),
        "peer route torn down on shutdown"
    );

    // Restart: same public IP → same subnet.
    std::fs::remove_file(&c.nodes[0].subnet_file).unwrap();
    c.nodes[0].start();
    assert_eq!(
        c.nodes[0].wait_subnet_env(Duration::from_secs(30)).subnet,
        first
    );

    // Lease gone while stopped (expired): subnet.env remembers it and it is taken again.
    c.nodes[0].stop();
    assert_eq!(c.etcd_delete(&Cluster::lease_key(first)), 1);
    c.nodes[0].start();
    let deadline_ok = wait_until(Duration::from_secs(30), || {
        c.etcd_get(&Cluster::lease_key(first)).is_some()
    });
    assert!(deadline_ok, "subnet not re-acquired\n{}", c.logs());

    // Lease deleted while running: the agent notices, puts it back (no restart), and its
    // peer keeps routing the subnet to it.
    assert!(wait_until(Duration::from_secs(10), || has_route(
        &c.nodes[0],
        peer
    )));
    let key = Cluster::lease_key(peer);
    let published = c.etcd_get(&key).expect("lease");
    assert_eq!(c.etcd_delete(&key), 1);
    assert!(
        wait_until(Duration::from_secs(15), || c.etcd_get(&key).as_deref()
            == Some(published.as_str())),
        "lease not restored\n{}",
        c.logs()
    );
    let node1 = &mut c.nodes[1];
    assert!(running(node1), "agent stopped\n{}", node1.log());
    // The repair is logged once the store acknowledged the put, just after the test sees it.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let log = node1.log();
            log.contains("own lease was deleted") && log.contains("repaired lease")
        }),
        "{}",
        node1.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || has_route(&c.nodes[0], peer)),
        "route to the restored host lost\n{}",
        c.logs()
    );
}

/// A bpffs directory for one test's pins, removed on drop (the agent deliberately leaves
/// its pins behind on exit, like every other piece of kernel state).
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dataplane_auto_comes_up_either_way() {
    if !require_root() {
        return;
    }
    let pins = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}-auto",
        flannel_e2e::netns::unique_tag()
    )));
    let pin_arg = format!("--bpf-pin-path={}", pins.0.display());
    // Declared after `pins`: the cluster (agents, namespaces) goes first, then the pins.
    let mut c = Cluster::start(1, &net_conf(VXLAN), &[&pin_arg]);
    let env = c.nodes[0].wait_subnet_env(Duration::from_secs(30));
    assert!(c.etcd_get(&Cluster::lease_key(env.subnet)).is_some());
    let log = c.nodes[0].log();
    if let Some(line) = log.lines().find(|l| l.contains("VXLAN datapath")) {
        eprintln!("datapath chosen: {line}");
    }
    assert!(
        log.contains("using the eBPF VXLAN datapath")
            || log.contains("falling back to the kernel VXLAN datapath"),
        "{log}"
    );
    c.nodes[0].stop();
}

#[test]
fn etcd_outage_keeps_datapath_and_watch_resumes() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(2, &net_conf(VXLAN), &["--dataplane=kernel"]);
    let a = c.nodes[0].wait_subnet_env(Duration::from_secs(30)).subnet;
    let b = c.nodes[1].wait_subnet_env(Duration::from_secs(30)).subnet;
    assert!(wait_until(Duration::from_secs(10), || has_route(
        &c.nodes[0],
        b
    ) && has_route(
        &c.nodes[1],
        a
    )));

    // etcd down: agents keep running, kernel state untouched.
    c.etcd.stop();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        running(&mut c.nodes[0]) && running(&mut c.nodes[1]),
        "{}",
        c.logs()
    );
    assert!(has_route(&c.nodes[0], b) && has_route(&c.nodes[1], a));

    // etcd back: the lease watch reconnects (resync), so a change made now is seen: a new
    // host's lease is routed, and a deleted own lease is put back by its host.
    c.etcd.restart().expect("restart etcd");
    let newcomer: Ipv4Network = "10.244.250.0/24".parse().unwrap();
    c.etcd_put(
        &Cluster::lease_key(newcomer),
        r#"{"PublicIP":"198.18.0.9","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:09"}}"#,
    );
    assert!(
        wait_until(Duration::from_secs(20), || has_route(&c.nodes[0], newcomer)),
        "watch did not resume after the outage\n{}",
        c.logs()
    );
    let key = Cluster::lease_key(b);
    let published = c.etcd_get(&key).expect("lease of b");
    assert_eq!(c.etcd_delete(&key), 1);
    assert!(
        wait_until(Duration::from_secs(20), || c.etcd_get(&key).as_deref()
            == Some(published.as_str())),
        "own lease not restored after the outage\n{}",
        c.logs()
    );
    assert!(running(&mut c.nodes[1]), "{}", c.nodes[1].log());
    assert!(running(&mut c.nodes[0]), "{}", c.logs());
}

/// #12 items 5 and 7: leases that must not be routed (outside `Network`, host bits set,
/// PublicIP 0.0.0.0 / 127.0.0.1 / 224.0.0.1) and a 1 MiB garbage value are skipped and
/// logged once each — not again when the same value is re-put, nor on the resync after an
/// etcd restart — with the value truncated; the agent keeps running and programs the valid
/// peers that arrive around them.
#[test]
fn invalid_leases_are_skipped_logged_once_truncated_and_the_rest_programmed() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start(1, &net_conf(VXLAN), &["--dataplane=kernel"]);
    let own = c.nodes[0].wait_subnet_env(Duration::from_secs(30)).subnet;
    let value = |ip: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:2a:00:00:00:63"}}}}"#
        )
    };
    // Third octets for the test's own keys, never the agent's own subnet.
    let mut octets = (200u8..=254).filter(|o| *o != own.ip().octets()[2]);
    let mut key = || format!("10.244.{}.0-24", octets.next().unwrap());
    let garbage = "{".repeat(1 << 20);
    let host_bits = format!(
        "10.244.{}.7-24",
        117 + u8::from(own.ip().octets()[2] == 117)
    );
    let bad: Vec<(String, String)> = vec![
        ("10.245.1.0-24".into(), value("198.18.0.99")),
        (host_bits, value("198.18.0.99")),
        (key(), value("0.0.0.0")),
        (key(), value("127.0.0.1")),
        (key(), value("224.0.0.1")),
        (key(), garbage),
    ];
    let prefix = Cluster::lease_key(own);
    let prefix = &prefix[..prefix.rfind('/').unwrap() + 1];
    for _ in 0..2 {
        for (k, v) in &bad {
            c.etcd_put(&format!("{prefix}{k}"), v);
        }
    }
    let first_good = key();
    c.etcd_put(&format!("{prefix}{first_good}"), &value("198.18.0.99"));
    let routed = |node: &Node, key: &str| {
        let subnet: Ipv4Network = key.replace('-', "/").parse().unwrap();
        has_route(node, flannel_agent::wire::cidr::masked(subnet))
    };
    assert!(
        wait_until(Duration::from_secs(10), || routed(&c.nodes[0], &first_good)),
        "valid peer not programmed next to invalid ones\n{}",
        c.nodes[0].log()
    );

    // A resync (etcd restart) lists every bad record again: still no new warning.
    c.etcd.stop();
    c.etcd.restart().expect("restart etcd");
    let second_good = key();
    c.etcd_put(&format!("{prefix}{second_good}"), &value("198.18.0.98"));
    assert!(
        wait_until(Duration::from_secs(20), || routed(
            &c.nodes[0],
            &second_good
        )),
        "valid peer after the resync not programmed\n{}",
        c.nodes[0].log()
    );
    assert!(running(&mut c.nodes[0]), "{}", c.nodes[0].log());
    for (k, _) in &bad {
        assert!(!routed(&c.nodes[0], k), "{k} was routed");
    }

    let log = c.nodes[0].log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ignoring malformed or invalid lease"))
        .collect();
    assert_eq!(
        warnings.len(),
        bad.len(),
        "each bad record once:\n{}",
        warnings.join("\n")
    );
    for (needle, why) in [
        ("outside the cluster network", "outside Network"),
        ("host bits set", "host bits"),
        ("PublicIP 0.0.0.0", "unspecified"),
        ("PublicIP 127.0.0.1", "loopback"),
        ("PublicIP 224.0.0.1", "multicast"),
        ("(1048576 bytes)", "garbage, truncated"),
    ] {
        assert!(
            warnings.iter().any(|w| w.contains(needle)),
            "no warning for {why}:\n{}",
            warnings.join("\n")
        );
    }
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a {longest}-byte log line");
}

/// #10: a configuration that is refused (here `EnableIPv4: false` in etcd mode with
/// `--dataplane=ebpf`, `--dataplane=ebpf` or `--ebpf-fast-path` with host-gw, and the fast
/// path with `--dataplane=kernel`) exits non-zero naming the field or flag, and creates
/// nothing on the host first: no `flannel.1`, no pins under `--bpf-pin-path`, no
/// `subnet.env`.
#[test]
fn refused_configs_exit_naming_the_field_and_leave_the_host_untouched() {
    if !require_root() {
        return;
    }
    let v6_only = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
    let host_gw = net_conf(r#"{"Type":"host-gw"}"#);
    let cases: [(String, &[&str], &str); 4] = [
        (v6_only.to_owned(), &["--dataplane=ebpf"], "EnableIPv4"),
        (host_gw.clone(), &["--dataplane=ebpf"], "--dataplane=ebpf"),
        (host_gw, &["--ebpf-fast-path"], "--ebpf-fast-path"),
        (
            net_conf(VXLAN),
            &["--ebpf-fast-path", "--dataplane=kernel"],
            "--ebpf-fast-path",
        ),
    ];
    for (conf, args, needle) in cases {
        // Declared before the cluster, so the agent is gone before the pins are removed.
        let pins = BpfPins::new("refused", 1);
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.push(pins.arg(1));
        let mut c = Cluster::start_each(1, &conf, |_| all.clone());
        let node = &mut c.nodes[0];
        assert!(
            wait_until(Duration::from_secs(20), || !running(node)),
            "{args:?}: agent kept running\n{}",
            node.log()
        );
        let status = node.agent.as_mut().and_then(|a| a.exit_status());
        assert!(
            status.is_some_and(|s| !s.success()),
            "{args:?}: exit status {status:?}\n{}",
            node.log()
        );
        let log = node.log();
        assert!(log.contains(needle), "{args:?}: {needle} not named:\n{log}");
        let link = node.host.ns.run("ip link show flannel.1");
        assert!(
            !link.status.success(),
            "{args:?}: flannel.1 was created:\n{}",
            String::from_utf8_lossy(&link.stdout)
        );
        let pinned: Vec<_> = std::fs::read_dir(pins.root(1))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(pinned.is_empty(), "{args:?}: pins left: {pinned:?}");
        assert!(
            !node.subnet_file.exists(),
            "{args:?}: subnet.env was written"
        );
    }
}

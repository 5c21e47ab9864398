//! `flanneld cleanup` leaves a host exactly as it was before flanneld first ran: full
//! link/address/route/neighbour/FDB, nftables, iptables, BPF attachment (`bpftool net`)
//! and bpffs state compared before the agent started and after cleanup, with look-alikes
//! of flanneld's state that are not its own in place (a VXLAN device, a static route, an
//! nftables table, an iptables chain), which must survive; a second cleanup finds nothing
//! and succeeds.

use std::{path::Path, time::Duration};

use flannel_e2e::{
    cluster::{BpfPins, Cluster, Node, flanneld_bin, net_conf},
    netns::{NetNs, wait_until},
    require_root,
};

/// Everything flanneld could touch in `ns`, plus the pins under `pin_root`. IPv4
/// addresses only: the kernel's IPv6 link-local address flips "tentative" during DAD.
/// iptables-save without its timestamped comments, nftables without counters (packets the
/// host sends meanwhile count on the look-alike rules). `bpftool net` catches XDP and tc
/// (clsact) programs left on a device; Debian 12's bpftool 7.1 does not list tcx
/// attachments, but flanneld's tcx links are pinned, so the pins stand for them.
fn snapshot(ns: &NetNs, pin_root: &Path) -> String {
    let mut s = ns.sh(
        "ip -d link show; ip -d -4 addr show; ip -d route show table all; \
         ip -d -6 route show table all; ip neigh show; bridge fdb show; \
         nft -s list ruleset; iptables-save | grep -v '^#' || true; bpftool net show",
    );
    let pins = std::process::Command::new("find")
        .arg(pin_root)
        .output()
        .expect("find");
    s.push_str(&String::from_utf8_lossy(&pins.stdout));
    s
}

/// `flanneld cleanup <the node's flags>` in the node's namespace: stdout.
fn cleanup(node: &Node) -> String {
    let out = node
        .host
        .ns
        .command(&flanneld_bin().to_string_lossy())
        .arg("cleanup")
        .args(node.args())
        .output()
        .expect("run flanneld cleanup");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flanneld cleanup failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn check(conf: &str, extra: &[&str]) {
    let pins = BpfPins::new("cleanup", 2);
    let mut c = Cluster::prepare_each(2, conf, |i| {
        let mut a = vec![
            pins.arg(i),
            "--ip-masq".to_owned(),
            "--ip-blackhole-route".to_owned(),
            "--iptables-resync=1".to_owned(),
        ];
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    });
    // Someone else's state, shaped like flanneld's: cleanup must not touch it.
    c.nodes[0].host.ns.sh(
        "ip link add vxlan-other type vxlan id 42 dstport 4789 dev eth0 && \
         ip link set vxlan-other up && \
         ip route add 198.19.200.0/24 dev eth0 proto static && \
         nft add table ip other-ipv4 && \
         nft add chain ip other-ipv4 post '{ type nat hook postrouting priority 100; }' && \
         iptables -t nat -N OTHER-POSTRTG && iptables -t nat -A POSTROUTING -j OTHER-POSTRTG",
    );
    // The kernel adds IPv6 link-local routes when DAD ends: let it end first.
    let settled = wait_until(Duration::from_secs(10), || {
        c.nodes[0]
            .host
            .ns
            .sh("ip -6 addr show tentative")
            .trim()
            .is_empty()
    });
    assert!(settled, "IPv6 DAD never finished");
    let before = snapshot(&c.nodes[0].host.ns, pins.root(1));
    for n in &mut c.nodes {
        n.start();
    }
    c.nodes[0].wait_subnet_env(Duration::from_secs(30));
    let peer = c.nodes[1].wait_subnet_env(Duration::from_secs(30)).subnet;
    // Wait for everything flanneld makes: the peer's route and the blackhole route.
    let ns = &c.nodes[0].host.ns;
    let programmed = wait_until(Duration::from_secs(20), || {
        let routes = ns.sh("ip route show proto 84");
        routes.contains(&peer.to_string()) && routes.contains("blackhole")
    });
    assert!(programmed, "{}\n{}", ns.sh("ip route"), c.logs());
    let running = snapshot(ns, pins.root(1));
    assert_ne!(before, running, "the agent changed nothing?");
    c.nodes[0].stop();

    let first = cleanup(&c.nodes[0]);
    assert!(first.contains("removed"), "{first}");
    let after = snapshot(&c.nodes[0].host.ns, pins.root(1));
    assert_eq!(before, after, "cleanup said:\n{first}");
    assert!(!c.nodes[0].subnet_file.exists());

    let second = cleanup(&c.nodes[0]);
    assert_eq!(second.trim(), "nothing of flanneld's left on this host");
    assert_eq!(before, snapshot(&c.nodes[0].host.ns, pins.root(1)));
}

#[test]
fn cleanup_after_ebpf_vxlan_restores_the_host() {
    if !require_root() {
        return;
    }
    check(&net_conf(r#"{"Type":"vxlan"}"#), &["--dataplane=ebpf"]);
}

#[test]
fn cleanup_after_host_gw_with_iptables_rules_restores_the_host() {
    if !require_root() {
        return;
    }
    // EnableNFTables false: the iptables implementation of the rules.
    let conf = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"EnableNFTables":false,"Backend":{"Type":"host-gw"}}"#;
    check(conf, &[]);
}

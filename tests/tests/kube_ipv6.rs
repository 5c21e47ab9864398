//! IPv6 in kube mode, end to end: three host namespaces on the underlay (IPv6
//! fd00:198::/64; IPv4 too for dual stack), the in-test API server, one
//! `flanneld --kube-subnet-mgr` per host, pods behind each.
//!
//! * IPv6-only (`EnableIPv4: false`), kernel vxlan and host-gw: hosts without any IPv4
//!   address (the API server is reached over IPv6), node objects with an IPv6 pod CIDR
//!   only, pods with IPv6 only, `flannel-v6.1` and no `flannel.1`, upstream's
//!   four-line `subnet.env`, upstream's annotations on the Node objects; every pod pair
//!   pings. `--dataplane=auto` falls back to the kernel device with the typed reason
//!   `ipv6_only`; `--dataplane=ebpf` is refused before anything is created.
//! * Dual stack: `spec.podCIDRs` with both families, one eBPF host and two kernel hosts,
//!   one host publishing a `public-ipv6-overwrite`; every pod pair pings over both
//!   families, and the annotations match upstream's byte for byte.
//!
//! Needs root and a built agent: `cargo build --bins`, then
//! `cargo test -p flannel-e2e --test kube_ipv6`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use flannel_e2e::{
    kube_api::KubeApi,
    kube_cluster::{
        HEALTHZ, KubeAgent, KubeBench, P, readyz, start_agent_with, wait_for_subnet_env,
    },
    netns::{Host, NetNs, host_ip, host_ip6, wait_until},
    require_root,
};
use ipnetwork::{Ipv4Network, Ipv6Network};

const V6_NETWORK: &str = "fd00:10:244::/56";

fn v6_only_conf(backend: &str) -> String {
    format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{V6_NETWORK}","Backend":{{"Type":"{backend}"}}}}"#
    )
}

fn v6_only_conf_nft(nftables: bool) -> String {
    format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{V6_NETWORK}","EnableNFTables":{nftables},"Backend":{{"Type":"vxlan"}}}}"#
    )
}

fn subnet6(i: u8) -> Ipv6Network {
    format!("fd00:10:244:{i}::/64").parse().unwrap()
}

fn subnet4(i: u8) -> Ipv4Network {
    format!("10.244.{i}.0/24").parse().unwrap()
}

/// The MAC of `dev` in `ns`.
fn mac_of(ns: &NetNs, dev: &str) -> String {
    // `ip`, not /sys/class/net: sysfs shows the namespace it was mounted in.
    let out = ns.sh(&format!("ip -br link show dev {dev}"));
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {out:?}"))
        .to_owned()
}

fn has_link(ns: &NetNs, dev: &str) -> bool {
    ns.run(&format!("ip link show dev {dev}")).status.success()
}

/// The flannel annotations of `node` (default prefix), sorted.
fn flannel_annotations(api: &KubeApi, node: &str) -> BTreeMap<String, String> {
    api.annotations(node)
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(P)?.to_owned(), v)))
        .collect()
}

fn expect(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn logs(agents: &[&KubeAgent]) -> String {
    agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("--- agent {}:\n{}\n", i + 1, a.log()))
        .collect()
}

/// Every pod pings every pod over IPv6.
fn assert_all_pods_reach_each_other_v6(hosts: &[Host], agents: &[&KubeAgent]) {
    let pods: Vec<_> = hosts.iter().flat_map(|h| h.pods.iter()).collect();
    for from in &pods {
        for to in &pods {
            let to6 = to.ip6.expect("pod has an IPv6 address");
            let ok = wait_until(Duration::from_secs(15), || {
                from.ns
                    .run(&format!("ping -6 -c 1 -W 1 {to6}"))
                    .status
                    .success()
            });
            assert!(
                ok,
                "{} cannot reach {to6}\n{}",
                from.ns.name(),
                logs(agents)
            );
        }
    }
}

/// Every pod pings every pod over IPv4.
fn assert_all_pods_reach_each_other_v4(hosts: &[Host], agents: &[&KubeAgent]) {
    let pods: Vec<_> = hosts.iter().flat_map(|h| h.pods.iter()).collect();
    for from in &pods {
        for to in &pods {
            let ok = wait_until(Duration::from_secs(15), || {
                from.ns
                    .run(&format!("ping -c 1 -W 1 {}", to.ip))
                    .status
                    .success()
            });
            assert!(
                ok,
                "{} cannot reach {}\n{}",
                from.ns.name(),
                to.ip,
                logs(agents)
            );
        }
    }
}

/// Three IPv6-only hosts with net-conf `conf`: no IPv4 address anywhere (the API server
/// is reached over IPv6 too). Host 1 runs `--dataplane=auto`, the others `kernel`, all
/// with `extra` flags. Returns the bench, hosts (two IPv6-only pods each) and agents.
fn v6_only_cluster(conf: &str, extra: &[&str]) -> (KubeBench, Vec<Host>, Vec<KubeAgent>) {
    let mut bench = KubeBench::new_ipv6();
    let mut hosts = Vec::new();
    let mut agents = Vec::new();
    for i in 1..=3u8 {
        bench
            .api
            .add_node(&format!("h{i}"), &[&subnet6(i).to_string()]);
        // What the kubelet reports: the node's IPv6 address.
        bench.api.set_addresses(
            &format!("h{i}"),
            &[("InternalIP", &host_ip6(i).to_string())],
        );
        let mut h = bench.underlay.add_host(i);
        h.add_ipv6(i);
        h.ns.sh("ip -4 addr flush dev eth0");
        assert!(h.ns.sh("ip -4 -o addr show scope global").trim().is_empty());
        hosts.push(h);
    }
    let args: Vec<&str> = HEALTHZ
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        let dataplane = if i == 0 { "auto" } else { "kernel" };
        agents.push(start_agent_with(
            &h.ns,
            &format!("h{}", i + 1),
            &bench.api,
            dataplane,
            conf,
            &args,
        ));
    }
    wait_for_subnet_env(&agents.iter().collect::<Vec<_>>());
    for (i, (h, a)) in hosts.iter_mut().zip(&agents).enumerate() {
        h.add_pods_v6_only(subnet6(u8::try_from(i + 1).unwrap()), a.mtu(), 2);
    }
    (bench, hosts, agents)
}

#[test]
fn kube_ipv6_only_vxlan_three_hosts_every_pod_pair_pings() {
    if !require_root() {
        return;
    }
    let (bench, hosts, agents) = v6_only_cluster(&v6_only_conf("vxlan"), &[]);
    let all: Vec<&KubeAgent> = agents.iter().collect();
    for (i, (h, a)) in hosts.iter().zip(&agents).enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        // Upstream's subnet.env with IPv4 off: no FLANNEL_NETWORK/FLANNEL_SUBNET.
        let env = std::fs::read_to_string(a.subnet_env()).unwrap();
        assert_eq!(
            env,
            format!(
                "FLANNEL_IPV6_NETWORK={V6_NETWORK}\nFLANNEL_IPV6_SUBNET=fd00:10:244:{n}::1/64\n\
                 FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
            )
        );
        // The IPv6 device only, over the IPv6 underlay.
        assert!(!has_link(&h.ns, "flannel.1"), "{}", h.ns.sh("ip link"));
        let link = h.ns.sh("ip -d link show flannel-v6.1");
        assert!(
            link.contains(&format!("local {}", host_ip6(n))) && link.contains("mtu 1430"),
            "{link}"
        );
        // Upstream's annotations, byte for byte: no backend-data/public-ip (a vxlan host
        // without an IPv4 VTEP writes neither).
        let want = expect(&[
            ("backend-type", "vxlan".into()),
            (
                "backend-v6-data",
                format!(
                    r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
                    mac_of(&h.ns, "flannel-v6.1")
                ),
            ),
            ("kube-subnet-manager", "true".into()),
            ("public-ipv6", host_ip6(n).to_string()),
        ]);
        let name = format!("h{n}");
        let ok = wait_until(Duration::from_secs(10), || {
            flannel_annotations(&bench.api, &name) == want
        });
        assert!(
            ok,
            "{name}: {:?}\nwant {want:?}",
            flannel_annotations(&bench.api, &name)
        );
    }
    // Host 1 asked for auto: the kernel device, with the reason typed.
    let ready = readyz(&hosts[0].ns);
    assert!(
        ready.contains("x-flannel-datapath: kernel-fallback:ipv6_only"),
        "{ready}"
    );
    assert!(
        agents[0].log().contains("fallback=\"ipv6_only\""),
        "{}",
        agents[0].log()
    );
    assert!(readyz(&hosts[1].ns).contains("x-flannel-datapath: kernel"));

    assert_all_pods_reach_each_other_v6(&hosts, &all);

    // The traffic crossed flannel-v6.1: its counters moved on both ends, and nothing
    // IPv4 was routed to a peer.
    let counter = |h: &Host, which: &str| -> u64 {
        let json = h.ns.sh("ip -j -s link show dev flannel-v6.1");
        let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j");
        v[0]["stats64"][which]["packets"]
            .as_u64()
            .expect("packet counter")
    };
    let (tx, rx) = (counter(&hosts[0], "tx"), counter(&hosts[2], "rx"));
    let far = hosts[2].pods[0].ip6.unwrap();
    hosts[0].pods[0]
        .ns
        .sh(&format!("ping -6 -c 5 -i 0.2 -W 1 {far}"));
    assert!(counter(&hosts[0], "tx") >= tx + 5);
    assert!(counter(&hosts[2], "rx") >= rx + 5);
    for h in &hosts {
        let v4 = h.ns.sh("ip -4 route show proto 84");
        assert!(v4.trim().is_empty(), "IPv4 peer routes: {v4}");
    }
}

#[test]
fn kube_ipv6_only_host_gw_three_hosts_every_pod_pair_pings() {
    if !require_root() {
        return;
    }
    let (bench, hosts, agents) = v6_only_cluster(&v6_only_conf("host-gw"), &[]);
    let all: Vec<&KubeAgent> = agents.iter().collect();
    for (i, (h, a)) in hosts.iter().zip(&agents).enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        assert_eq!(a.mtu(), 1500, "host-gw: the uplink MTU");
        for j in (1..=3u8).filter(|j| *j != n) {
            let want = format!("{} via {} dev eth0 proto 84", subnet6(j), host_ip6(j));
            let ok = wait_until(Duration::from_secs(10), || {
                h.ns.sh("ip -6 route show").contains(&want)
            });
            assert!(
                ok,
                "{}: no route {want:?}\n{}\n{}",
                h.ns.name(),
                h.ns.sh("ip -6 route show"),
                logs(&all)
            );
        }
        // Upstream writes backend-data/public-ip for a non-vxlan backend whatever the
        // families: `null` and its zero PublicIP.
        let want = expect(&[
            ("backend-data", "null".into()),
            ("backend-type", "host-gw".into()),
            ("backend-v6-data", "null".into()),
            ("kube-subnet-manager", "true".into()),
            ("public-ip", "0.0.0.0".into()),
            ("public-ipv6", host_ip6(n).to_string()),
        ]);
        let name = format!("h{n}");
        let ok = wait_until(Duration::from_secs(10), || {
            flannel_annotations(&bench.api, &name) == want
        });
        assert!(
            ok,
            "{name}: {:?}\nwant {want:?}",
            flannel_annotations(&bench.api, &name)
        );
        assert!(!has_link(&h.ns, "flannel.1") && !has_link(&h.ns, "flannel-v6.1"));
    }
    // host-gw needs no eBPF: auto is host-gw.
    assert!(readyz(&hosts[0].ns).contains("x-flannel-datapath: host-gw"));
    assert_all_pods_reach_each_other_v6(&hosts, &all);
}

#[test]
fn kube_ipv6_only_with_dataplane_ebpf_is_refused_before_anything_is_created() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    bench.api.add_node("h1", &[&subnet6(1).to_string()]);
    let mut h = bench.underlay.add_host(1);
    h.add_ipv6(1);
    let mut a = start_agent_with(&h.ns, "h1", &bench.api, "ebpf", &v6_only_conf("vxlan"), &[]);
    let exited = wait_until(Duration::from_secs(20), || !a.child.running());
    assert!(exited, "flanneld kept running:\n{}", a.log());
    assert!(
        !a.child.exit_status().expect("exited").success(),
        "{}",
        a.log()
    );
    let log = a.log();
    assert!(
        log.contains("--dataplane=ebpf") && log.contains("IPv6-only"),
        "{log}"
    );
    // Nothing was created: no device, no pins, no subnet.env, no annotations.
    assert!(!has_link(&h.ns, "flannel.1") && !has_link(&h.ns, "flannel-v6.1"));
    assert!(!a.pins.0.exists(), "pins at {}", a.pins.0.display());
    assert!(!a.subnet_env().exists());
    assert!(flannel_annotations(&bench.api, "h1").is_empty());
}

#[test]
fn kube_dual_stack_ebpf_and_kernel_hosts_every_pod_pair_pings_over_both_families() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        let name = format!("h{i}");
        bench
            .api
            .add_node(&name, &[&subnet4(i).to_string(), &subnet6(i).to_string()]);
        bench.api.set_addresses(
            &name,
            &[
                ("InternalIP", &host_ip(i).to_string()),
                ("InternalIP", &host_ip6(i).to_string()),
            ],
        );
        let mut h = bench.underlay.add_host(i);
        h.add_ipv6(i);
        hosts.push(h);
    }
    // Host 3 tells its peers to tunnel IPv6 to a second address of its own (a NAT
    // address in real life).
    let overwrite6 = "fd00:198::103";
    hosts[2]
        .ns
        .sh(&format!("ip -6 addr add {overwrite6}/64 dev eth0 nodad"));
    bench.api.annotate(
        "h3",
        &[(&format!("{P}public-ipv6-overwrite"), Some(overwrite6))],
    );
    let conf = format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"{V6_NETWORK}","Backend":{{"Type":"vxlan"}}}}"#
    );
    let agents: Vec<KubeAgent> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let dataplane = if i == 0 { "ebpf" } else { "kernel" };
            start_agent_with(
                &h.ns,
                &format!("h{}", i + 1),
                &bench.api,
                dataplane,
                &conf,
                &HEALTHZ,
            )
        })
        .collect();
    let all: Vec<&KubeAgent> = agents.iter().collect();
    wait_for_subnet_env(&all);
    for (i, (h, a)) in hosts.iter_mut().zip(&agents).enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        let env = std::fs::read_to_string(a.subnet_env()).unwrap();
        assert_eq!(
            env,
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{n}.1/24\n\
                 FLANNEL_IPV6_NETWORK={V6_NETWORK}\nFLANNEL_IPV6_SUBNET=fd00:10:244:{n}::1/64\n\
                 FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
            )
        );
        h.add_pods(subnet4(n), a.mtu(), 2);
        h.add_pod_ipv6(subnet6(n));
    }
    assert!(readyz(&hosts[0].ns).contains("x-flannel-datapath: ebpf"));
    for (i, h) in hosts.iter().enumerate() {
        let n = u8::try_from(i + 1).unwrap();
        let public6 = if n == 3 {
            overwrite6.to_owned()
        } else {
            host_ip6(n).to_string()
        };
        // Upstream's six annotations, byte for byte (and the user's overwrite kept).
        let mut want = expect(&[
            (
                "backend-data",
                format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, mac_of(&h.ns, "flannel.1")),
            ),
            ("backend-type", "vxlan".into()),
            (
                "backend-v6-data",
                format!(
                    r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
                    mac_of(&h.ns, "flannel-v6.1")
                ),
            ),
            ("kube-subnet-manager", "true".into()),
            ("public-ip", host_ip(n).to_string()),
            ("public-ipv6", public6.clone()),
        ]);
        if n == 3 {
            want.insert("public-ipv6-overwrite".into(), overwrite6.into());
        }
        let name = format!("h{n}");
        let ok = wait_until(Duration::from_secs(10), || {
            flannel_annotations(&bench.api, &name) == want
        });
        assert!(
            ok,
            "{name}: {:?}\nwant {want:?}",
            flannel_annotations(&bench.api, &name)
        );
        // Read back by the peers: their FDB sends this host's IPv6 VXLAN to public-ipv6.
        let mac6 = mac_of(&h.ns, "flannel-v6.1");
        for (j, peer) in hosts.iter().enumerate().filter(|(j, _)| *j != i) {
            let ok = wait_until(Duration::from_secs(10), || {
                peer.ns
                    .sh("bridge fdb show dev flannel-v6.1")
                    .contains(&format!("{mac6} dst {public6} self permanent"))
            });
            assert!(
                ok,
                "h{}: no FDB entry for {name}\n{}",
                j + 1,
                peer.ns.sh("bridge fdb show dev flannel-v6.1")
            );
        }
    }
    assert_all_pods_reach_each_other_v4(&hosts, &all);
    assert_all_pods_reach_each_other_v6(&hosts, &all);
}

/// The source address a TCP connection from `from` to `to` arrives with at `to`.
fn seen_source6(from: &NetNs, listen_ns: &NetNs, to: Ipv6Addr) -> IpAddr {
    let listener = listen_ns
        .enter(move || std::net::TcpListener::bind((to, 8080)))
        .unwrap_or_else(|e| panic!("bind [{to}]:8080: {e}"));
    let _conn = from
        .enter(move || {
            std::net::TcpStream::connect_timeout(&(to, 8080).into(), Duration::from_secs(3))
        })
        .unwrap_or_else(|e| panic!("connect [{to}]:8080: {e}"));
    let (_, peer) = listener.accept().expect("accept");
    peer.ip()
}

/// IPv6-only with `--ip-masq`: the IPv6 rules (ip6tables chains or the nft `ip6` table)
/// and no IPv4 ones; pod → outside leaves with the host's IPv6 address, pod → pod keeps
/// the pod's.
#[test]
fn kube_ipv6_only_ip_masq_installs_ipv6_rules_only() {
    if !require_root() {
        return;
    }
    for nftables in [false, true] {
        let (mut bench, hosts, agents) =
            v6_only_cluster(&v6_only_conf_nft(nftables), &["--ip-masq=true"]);
        let all: Vec<&KubeAgent> = agents.iter().collect();
        let outside_ip6: Ipv6Addr = "fd00:198::200".parse().unwrap();
        let outside = bench
            .underlay
            .attach("out", "198.18.1.2".parse().unwrap(), 1500);
        outside.sh(&format!("ip -6 addr add {outside_ip6}/64 dev eth0 nodad"));
        assert_all_pods_reach_each_other_v6(&hosts, &all);
        let h1 = &hosts[0].ns;
        if nftables {
            let table = h1.sh("nft list table ip6 flannel-ipv6");
            assert!(
                table.contains("ip6 daddr != ff00::/8 masquerade fully-random")
                    && table.contains("chain forward"),
                "{table}"
            );
            assert!(
                !h1.run("nft list table ip flannel-ipv4").status.success(),
                "an IPv4 table on an IPv6-only host"
            );
        } else {
            let nat = h1.sh("ip6tables -t nat -S");
            assert!(
                nat.contains(&format!("-A FLANNEL-POSTRTG -s {V6_NETWORK} ! -d ff00::/8")),
                "{nat}"
            );
            assert!(
                h1.sh("ip6tables -t filter -S")
                    .contains(&format!("-A FLANNEL-FWD -s {V6_NETWORK}")),
                "{}",
                h1.sh("ip6tables -t filter -S")
            );
            let v4 = h1.sh("iptables -t nat -S; iptables -t filter -S");
            assert!(
                !v4.contains("FLANNEL"),
                "IPv4 rules on an IPv6-only host:\n{v4}"
            );
        }
        let (a, b) = (&hosts[0].pods[0], &hosts[1].pods[0]);
        assert_eq!(
            seen_source6(&a.ns, &outside, outside_ip6),
            IpAddr::V6(host_ip6(1)),
            "pod → outside not masqueraded (nftables {nftables})\n{}",
            logs(&all)
        );
        let b6 = b.ip6.unwrap();
        assert_eq!(
            seen_source6(&a.ns, &b.ns, b6),
            IpAddr::V6(a.ip6.unwrap()),
            "pod → pod masqueraded (nftables {nftables})"
        );
        drop(outside);
        drop((agents, hosts, bench));
    }
}

/// IPv6-only restart as after a reboot: the agent stops and `flannel-v6.1` goes; the new
/// agent re-creates it with the MAC its node's `backend-v6-data` names (read back from the
/// API server), so the annotations and every peer's NDP/FDB entries stay valid, and pods
/// reach each other again. No run logs own-lease tampering or a skipped node.
#[test]
fn kube_ipv6_only_restart_keeps_the_vtep_mac_and_traffic() {
    if !require_root() {
        return;
    }
    let conf = v6_only_conf("vxlan");
    let (bench, hosts, mut agents) = v6_only_cluster(&conf, &[]);
    {
        let all: Vec<&KubeAgent> = agents.iter().collect();
        assert_all_pods_reach_each_other_v6(&hosts, &all);
    }
    let before = flannel_annotations(&bench.api, "h1");
    let mac = mac_of(&hosts[0].ns, "flannel-v6.1");
    assert!(
        before["backend-v6-data"].contains(&mac),
        "{before:?} vs {mac}"
    );
    let old = agents.remove(0);
    drop(old);
    hosts[0].ns.sh("ip link del flannel-v6.1");
    agents.insert(
        0,
        start_agent_with(&hosts[0].ns, "h1", &bench.api, "kernel", &conf, &[]),
    );
    let all: Vec<&KubeAgent> = agents.iter().collect();
    wait_for_subnet_env(&all);
    let back = wait_until(Duration::from_secs(10), || {
        has_link(&hosts[0].ns, "flannel-v6.1")
    });
    assert!(back, "flannel-v6.1 not re-created\n{}", agents[0].log());
    assert_eq!(
        mac_of(&hosts[0].ns, "flannel-v6.1"),
        mac,
        "the VTEP MAC changed"
    );
    assert_all_pods_reach_each_other_v6(&hosts, &all);
    assert_eq!(
        flannel_annotations(&bench.api, "h1"),
        before,
        "annotations churned"
    );
    // (A node seen before its agent annotated it is skipped at debug level: not counted.)
    for (i, a) in agents.iter().enumerate() {
        let log = a.log();
        let loud = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"));
        for line in loud {
            for bad in ["own lease was", "skipping node", "programming peer failed"] {
                assert!(!line.contains(bad), "agent {}: {line}\n{log}", i + 1);
            }
        }
    }
}

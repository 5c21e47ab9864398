//! Datastore faults with a 3-member etcd cluster: the members are killed one at a time
//! (so whichever one carries an agent's lease watch and renewals is among them), and the
//! agent carries on through the others listed in `--etcd-endpoints` — a lease written after
//! each kill is programmed within seconds (the figures are printed), its own lease is
//! renewed before it expires, readiness stays up and pod traffic never stops.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    netns::{NetNs, wait_until},
    require_root,
};
use ipnetwork::Ipv4Network;

const TTL_SECS: u64 = 6;

/// The etcd client ports `ns` holds established connections to.
fn connected_ports(ns: &NetNs, ports: &[u16]) -> BTreeSet<u16> {
    let out = ns.sh("ss -Htn state established");
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|peer| peer.rsplit(':').next()?.parse::<u16>().ok())
        .filter(|p| ports.contains(p))
        .collect()
}

fn has_route(ns: &NetNs, net: Ipv4Network) -> bool {
    !ns.sh(&format!("ip route show {net}")).trim().is_empty()
}

fn readyz(ns: &NetNs, port: u16) -> String {
    ns.enter(move || {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        std::io::Result::Ok(out)
    })
    .unwrap_or_else(|e| format!("error: {e}"))
}

fn member(c: &mut Cluster, i: usize) -> &mut flannel_e2e::etcd::EtcdServer {
    if i == 0 {
        &mut c.etcd
    } else {
        &mut c.etcd_others[i - 1]
    }
}

#[test]
fn killing_the_etcd_member_an_agent_uses_fails_over_within_seconds() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("etcdha", 2);
    let mut c = Cluster::start_with_etcd(2, 3, &net_conf(r#"{"Type":"vxlan"}"#), |i| {
        vec![
            "--dataplane=ebpf".into(),
            pins.arg(i),
            format!("--subnet-lease-ttl={TTL_SECS}"),
            "--healthz-ip=127.0.0.1".into(),
            "--healthz-port=18081".into(),
        ]
    });
    let envs = c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let ports: Vec<u16> = std::iter::once(&c.etcd)
        .chain(&c.etcd_others)
        .map(|m| m.client_port())
        .collect();
    let used = connected_ports(&c.nodes[0].host.ns, &ports);
    eprintln!("member ports {ports:?}; host 1's agent is connected to {used:?}");
    assert!(!used.is_empty(), "the agent holds no etcd connection");

    // Pod traffic across all three outages: 0.2 s apart, for the whole test.
    let pinger = {
        let ns = c.nodes[0].host.pods[0].ns.path();
        let to = c.nodes[1].host.pods[0].ip;
        std::thread::spawn(move || {
            std::process::Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .args(["ping", "-q", "-c", "150", "-i", "0.2", "-W", "1"])
                .arg(to.to_string())
                .output()
                .expect("ping")
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    let taken: Vec<u8> = envs.iter().map(|e| e.subnet.ip().octets()[2]).collect();
    let mut octets = (200u8..=254).filter(|o| !taken.contains(o));
    let mut figures = Vec::new();
    for (victim, port) in ports.iter().enumerate() {
        let killed_at = Instant::now();
        member(&mut c, victim).stop();
        // A peer joins right after the kill, written through a surviving member (retried
        // while the survivors elect a new leader).
        let newcomer =
            Ipv4Network::new(Ipv4Addr::new(10, 244, octets.next().unwrap(), 0), 24).unwrap();
        let value = format!(
            r#"{{"PublicIP":"198.18.0.{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:2a:00:00:00:50"}}}}"#,
            50 + victim
        );
        assert!(
            wait_until(Duration::from_secs(10), || c
                .try_etcd_put(&Cluster::lease_key(newcomer), &value)),
            "no surviving member accepted a put"
        );
        // The agent's figure counts from when the lease exists (the put is retried while
        // the survivors elect a leader).
        let put_took = killed_at.elapsed();
        let written_at = Instant::now();
        let programmed = wait_until(Duration::from_secs(15), || {
            has_route(&c.nodes[0].host.ns, newcomer)
        });
        let failover = written_at.elapsed();
        let total = killed_at.elapsed();
        assert!(
            programmed,
            "a lease written after killing member {victim} never reached host 1\n{}",
            c.logs()
        );
        eprintln!(
            "failover: member {victim} (:{}) killed; the test's put took {put_took:?}; the lease was programmed on host 1 {failover:?} after it was written, {total:?} after the kill",
            port
        );
        figures.push(total);
        assert!(total < Duration::from_secs(10), "failover took {total:?}");
        // The kernel entries go in before the map entries: wait for the map too.
        let in_map = || {
            open_pinned(&pins.layout(1))
                .unwrap()
                .current_routes()
                .unwrap()
                .contains_key(&newcomer)
        };
        assert!(
            wait_until(Duration::from_secs(5), in_map),
            "eBPF routes lack {newcomer}"
        );

        // Two TTLs later both agents' leases are still there: renewed via the survivors.
        std::thread::sleep(Duration::from_secs(2 * TTL_SECS).saturating_sub(killed_at.elapsed()));
        for env in &envs {
            assert!(
                c.etcd_get(&Cluster::lease_key(env.subnet)).is_some(),
                "lease {} expired: not renewed with member {victim} down\n{}",
                env.subnet,
                c.logs()
            );
        }
        for n in &c.nodes {
            let r = readyz(&n.host.ns, 18081);
            assert!(r.starts_with("HTTP/1.1 200"), "readyz: {r}");
        }
        member(&mut c, victim).restart().expect("restart member");
    }
    eprintln!("failover figures (kill → lease written meanwhile is programmed): {figures:?}");
    let log = c.nodes[0].log();
    assert!(
        log.contains("etcd endpoint unreachable; sending requests to the other endpoints")
            && log.contains("etcd endpoint answers again; using it"),
        "{log}"
    );
    let out = pinger.join().expect("ping thread");
    let text = String::from_utf8_lossy(&out.stdout);
    let received: u32 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received")?.parse().ok())
        .unwrap_or(0);
    eprintln!("pings across the failovers: {received}/150 answered");
    assert!(received >= 148, "pod traffic stopped: {text}");
    for n in &mut c.nodes {
        assert!(n.agent.as_mut().is_some_and(|a| a.running()), "{}", n.log());
    }
}

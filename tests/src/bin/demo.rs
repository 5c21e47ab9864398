//! `cargo xtask demo`: a three-host flannel cluster in network namespaces on this machine.
//!
//! A local etcd holds the network config and the leases; hosts 1 and 2 run `flanneld`
//! on the eBPF datapath, host 3 on the kernel VXLAN fallback, two pods behind each. The
//! demo prints who reaches whom, pushes some traffic, then shows each eBPF host's peers
//! with their counters as the pinned maps have them. Everything (namespaces, pins,
//! processes) is removed on exit and on Ctrl-C.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use flannel_agent::backend::ebpf::open_pinned;
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    netns::wait_until,
};

const HOSTS: u8 = 3;

fn main() {
    let wait = !std::env::args().any(|a| a == "--no-wait");
    assert!(
        flannel_e2e::require_root(),
        "the demo needs root (namespaces, eBPF)"
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).expect("Ctrl-C handler");
    }

    let pins = BpfPins::new("demo", HOSTS);
    let dataplane = |i: u8| if i < HOSTS { "ebpf" } else { "kernel" };
    println!(
        "starting etcd and {HOSTS} hosts (198.18.0.1-{HOSTS}); hosts 1-2 eBPF, host 3 kernel VXLAN …"
    );
    let mut c = Cluster::start_each(HOSTS, &net_conf(r#"{"Type":"vxlan"}"#), |i| {
        let mut args = vec![format!("--dataplane={}", dataplane(i))];
        if dataplane(i) == "ebpf" {
            args.push(pins.arg(i));
        }
        args
    });
    let envs = c.add_pods(2);
    println!();
    for (i, (n, e)) in c.nodes.iter().zip(&envs).enumerate() {
        println!(
            "host {} ({}): datapath {:<6} subnet {} pod MTU {}  pods {}",
            i + 1,
            n.host.ip,
            dataplane(i as u8 + 1),
            e.subnet,
            e.mtu,
            n.host
                .pods
                .iter()
                .map(|p| p.ip.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let pods: Vec<_> = c
        .nodes
        .iter()
        .flat_map(|n| n.host.pods.iter().map(|p| (&p.ns, p.ip)))
        .collect();
    // Agents program peers as leases appear: give them a moment before judging.
    let (first, last) = (pods[0], pods[pods.len() - 1]);
    wait_until(Duration::from_secs(15), || {
        first
            .0
            .run(&format!("ping -c 1 -W 1 {}", last.1))
            .status
            .success()
    });
    println!("\nconnectivity (ping from row to column):\n");
    print!("{:>14}", "");
    for (_, ip) in &pods {
        print!("{:>13}", ip.to_string());
    }
    println!();
    let mut failures = 0;
    for (from, from_ip) in &pods {
        print!("{:>14}", from_ip.to_string());
        for (_, to) in &pods {
            let ok = from.run(&format!("ping -c 1 -W 2 {to}")).status.success();
            failures += usize::from(!ok);
            print!("{:>13}", if ok { "ok" } else { "FAIL" });
        }
        println!();
    }

    // Some bulk traffic so the counters have something to say.
    for (a, b) in [(0usize, 1usize), (0, 2), (2, 1)] {
        let server = &c.nodes[b].host.pods[0];
        let _srv =
            server
                .ns
                .spawn_server("iperf3", &["-s", "-1", "-B", &server.ip.to_string()], 5201);
        let out = c.nodes[a].host.pods[0]
            .ns
            .run(&format!("iperf3 -c {} -t 1 -J", server.ip));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let gbit = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9;
        println!(
            "iperf3 host {} pod → host {} pod: {gbit:.2} Gbit/s",
            a + 1,
            b + 1
        );
    }

    for i in 1..HOSTS {
        let layout = pins.layout(i);
        println!("\nhost {i} eBPF peers ({}):", layout.versioned().display());
        match open_pinned(&layout).map(|d| {
            (
                d.current_routes().map_err(|e| e.to_string()),
                d.counters().map_err(|e| e.to_string()),
            )
        }) {
            Ok((Ok(routes), Ok(counters))) => {
                for (subnet, r) in routes {
                    let ip =
                        std::net::Ipv4Addr::from(flannel_common::wire::v4_unmapped(&r.peer_ip));
                    let s = counters.peers.get(&ip).copied().unwrap_or_default();
                    println!(
                        "  {subnet:<16} via {ip:<12} vtep {}  tx {} pkts / {} B  rx {} pkts / {} B",
                        r.vtep_mac
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                        s.tx_packets,
                        s.tx_bytes,
                        s.rx_packets,
                        s.rx_bytes
                    );
                }
                let drops: Vec<_> = counters
                    .drops
                    .iter()
                    .filter(|(_, v)| v.packets > 0)
                    .collect();
                let passes: Vec<_> = counters
                    .passes
                    .iter()
                    .filter(|(_, v)| v.packets > 0)
                    .map(|(k, v)| format!("{k}={}", v.packets))
                    .collect();
                println!(
                    "  drops: {drops:?}  handed to the kernel path: {}",
                    passes.join(" ")
                );
            }
            other => println!("  cannot read the maps: {other:?}"),
        }
    }
    println!(
        "\n{} of {} pod pairs connected.",
        pods.len() * pods.len() - failures,
        pods.len() * pods.len()
    );
    if wait {
        println!(
            "\nThe cluster stays up; explore it, e.g.\n  nsenter --net={} ip route\n  bpftool map dump pinned {}\nPress Ctrl-C to tear everything down.",
            c.nodes[0].host.ns.path(),
            pins.layout(1).map("ROUTES").display()
        );
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("tearing down …");
    drop(c);
    drop(pins);
    if failures > 0 {
        std::process::exit(1);
    }
}

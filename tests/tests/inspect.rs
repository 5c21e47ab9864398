//! `flanneld inspect` on a real two-host eBPF cluster: the JSON report's peers, VTEP MACs
//! and counters, and its fast-path counts, equal what bpftool reads from the pinned maps,
//! the table shows the same, and it keeps working after the agent stopped.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, process::Command};

use flannel_e2e::{
    cluster::{BpfPins, Cluster, Node, flanneld_bin, net_conf},
    require_root,
};

const VXLAN: &str = r#"{"Type":"vxlan"}"#;

/// `flanneld inspect <extra> <the node's flags>` inside the node's namespace.
fn inspect(node: &Node, extra: &[&str]) -> String {
    let out = node
        .host
        .ns
        .command(&flanneld_bin().to_string_lossy())
        .arg("inspect")
        .args(extra)
        .args(node.args())
        .output()
        .expect("run flanneld inspect");
    assert!(
        out.status.success(),
        "flanneld inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn bpftool(map: &Path) -> serde_json::Value {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(map)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

fn bytes(v: &serde_json::Value) -> Vec<u8> {
    v.as_array()
        .expect("byte array")
        .iter()
        .map(|b| u8::try_from(b.as_u64().expect("byte")).expect("u8"))
        .collect()
}

/// What bpftool says about each peer: underlay → (VTEP MAC, tx/rx packets and bytes).
fn peers_per_bpftool(pins: &BpfPins, host: u8) -> BTreeMap<Ipv4Addr, (String, [u64; 4])> {
    let layout = pins.layout(host);
    let routes = bpftool(&layout.map("ROUTES"));
    let stats = bpftool(&layout.map("PEER_STATS"));
    let mut out = BTreeMap::new();
    for r in routes.as_array().expect("routes") {
        let v = &r["formatted"]["value"];
        let ip = bytes(&v["peer_ip"]);
        let mac: Vec<String> = bytes(&v["vtep_mac"])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let slot = v["peer_slot"].as_u64().expect("slot");
        let entry = stats
            .as_array()
            .expect("stats")
            .iter()
            .find(|e| e["formatted"]["key"].as_u64() == Some(slot))
            .unwrap_or_else(|| panic!("slot {slot} in {stats}"));
        let mut sum = [0u64; 4];
        for cpu in entry["formatted"]["values"].as_array().expect("per-CPU") {
            for (i, f) in ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes"]
                .iter()
                .enumerate()
            {
                sum[i] += cpu["value"][f].as_u64().expect("counter");
            }
        }
        out.insert(
            // 16 bytes, IPv4-mapped.
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            (mac.join(":"), sum),
        );
    }
    out
}

/// bpftool's PATHS, summed over CPUs: index → (packets, bytes).
fn paths_per_bpftool(pins: &BpfPins, host: u8) -> BTreeMap<u64, (u64, u64)> {
    let dump = bpftool(&pins.layout(host).map("PATHS"));
    let mut out = BTreeMap::new();
    for e in dump.as_array().expect("paths") {
        let index = e["formatted"]["key"].as_u64().expect("index");
        let mut sum = (0, 0);
        for cpu in e["formatted"]["values"].as_array().expect("per-CPU") {
            sum.0 += cpu["value"]["packets"].as_u64().expect("packets");
            sum.1 += cpu["value"]["bytes"].as_u64().expect("bytes");
        }
        out.insert(index, sum);
    }
    out
}

#[test]
fn inspect_matches_the_maps_while_running_and_after_stop() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("inspect", 2);
    let mut c = Cluster::start_each(2, &net_conf(VXLAN), |i| {
        vec!["--dataplane=ebpf".into(), pins.arg(i)]
    });
    let envs = c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    assert!(c.iperf(0, 1, 1) > 0);

    for running in [true, false] {
        let json: serde_json::Value =
            serde_json::from_str(&inspect(&c.nodes[0], &["--json"])).expect("inspect JSON");
        let want = peers_per_bpftool(&pins, 1);
        assert_eq!(
            json["lease"]["subnet"],
            envs[0].subnet.to_string(),
            "{json}"
        );
        assert_eq!(json["lease"]["in_datastore"], true, "{json}");
        assert_eq!(json["datapath"]["mode"], "ebpf-vxlan", "{json}");
        let peers = json["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), 1, "{json}");
        let p = &peers[0];
        assert_eq!(p["subnet"], envs[1].subnet.to_string());
        assert_eq!(p["datapath"], "ebpf");
        let ip: Ipv4Addr = p["public_ip"].as_str().unwrap().parse().unwrap();
        let (mac, counters) = &want[&ip];
        assert_eq!(p["vtep_mac"], mac.as_str(), "{json}");
        let got: Vec<u64> = ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes"]
            .iter()
            .map(|f| p["counters"][f].as_u64().expect("counter"))
            .collect();
        assert_eq!(got, counters.to_vec(), "running={running}: {json}");
        assert!(counters[1] > 0, "iperf3 traffic counted: {json}");
        let reasons: Vec<&str> = json["drops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["reason"].as_str().unwrap())
            .collect();
        assert!(reasons.contains(&"unknown_peer"), "{json}");
        // Fast vs kernel path: the pod traffic has stopped, so the fast-path rows are stable
        // and equal bpftool's (indices as in flannel_common::PathReason).
        let paths = paths_per_bpftool(&pins, 1);
        for (index, name) in [(0, "fast_tx"), (1, "fast_rx")] {
            let row = json["paths"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["reason"] == name)
                .unwrap_or_else(|| panic!("no {name} in {json}"));
            let got = (
                row["packets"].as_u64().unwrap(),
                row["bytes"].as_u64().unwrap(),
            );
            assert_eq!(got, paths[&index], "{name}: {json}");
            assert!(got.0 > 0, "iperf3's flow never went fast: {json}");
        }

        let table = inspect(&c.nodes[0], &[]);
        assert!(
            table.contains(&format!("Lease:    {}", envs[0].subnet)),
            "{table}"
        );
        let row = table
            .lines()
            .find(|l| l.starts_with(&envs[1].subnet.to_string()))
            .unwrap_or_else(|| panic!("no peer row in\n{table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells[1..4],
            [ip.to_string().as_str(), mac.as_str(), "ebpf"],
            "{table}"
        );
        assert_eq!(cells[5], counters[1].to_string(), "{table}");
        let fast_tx = table
            .lines()
            .skip_while(|l| *l != "Pod packets by path:")
            .find(|l| l.starts_with("fast_tx "))
            .unwrap_or_else(|| panic!("no fast_tx row in\n{table}"));
        assert_eq!(
            fast_tx.split_whitespace().nth(1),
            Some(paths[&0].0.to_string().as_str()),
            "{table}"
        );
        eprintln!("{table}");

        if running {
            c.nodes[0].stop();
        }
    }
}

//! `/metrics`: a real Prometheus (Debian's package) scrapes a running agent on the eBPF
//! datapath, and a PromQL query through its HTTP API returns the per-peer byte counter of
//! a peer that just carried iperf3 traffic, equal to what the pinned map says, and the
//! fast-path and kernel-path counts equal to the PATHS map's; `promtool check metrics`
//! accepts the output; and a scrape of a datapath holding the maximum number of peers is
//! timed.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use flannel_agent::backend::ebpf::{PinLayout, load_sized, open_pinned};
use flannel_common::{Peer, PeerKey};
use flannel_e2e::{
    cluster::{BpfPins, Cluster, net_conf},
    netns::{NetNs, wait_until},
    require_root, twohost,
};

const VXLAN: &str = r#"{"Type":"vxlan"}"#;
const AGENT_PORT: u16 = 9810;
const PROMETHEUS_PORT: u16 = 9090;

/// `GET path` from `127.0.0.1:port` inside `ns`; the body, if the answer was 200.
fn http_get(ns: &NetNs, port: u16, path: &str) -> Option<String> {
    let path = path.to_owned();
    ns.enter(move || {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200")
            .then(|| body.to_owned())
            .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
    })
}

/// Percent-encode a PromQL expression for a query string.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of the single series `query` returns, if exactly one.
fn promql(ns: &NetNs, query: &str) -> Option<f64> {
    let body = http_get(
        ns,
        PROMETHEUS_PORT,
        &format!("/api/v1/query?query={}", urlencode(query)),
    )?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_per_peer_bytes_after_iperf3() {
    if !require_root() {
        return;
    }
    let pins = BpfPins::new("metrics", 2);
    let mut c = Cluster::start_each(2, &net_conf(VXLAN), |i| {
        vec![
            "--dataplane=ebpf".into(),
            pins.arg(i),
            "--healthz-ip=127.0.0.1".into(),
            format!("--healthz-port={AGENT_PORT}"),
        ]
    });
    c.add_pods(1);
    c.assert_all_pods_reach_each_other();
    let ns = &c.nodes[0].host.ns;

    // Prometheus inside host 1's namespace, scraping its agent every second.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: flannel\n    static_configs:\n      \
             - targets: ['127.0.0.1:{AGENT_PORT}']\n"
        ),
    )
    .expect("prometheus config");
    let _prometheus = ns.spawn(
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            &format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"),
            "--log.level=warn",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || promql(
            ns,
            r#"up{job="flannel"} == 1"#
        )
        .is_some()),
        "Prometheus never scraped the agent successfully\n{}",
        c.logs()
    );

    let bytes = c.iperf(0, 1, 2);
    assert!(bytes > 1024 * 1024, "iperf3 moved only {bytes} bytes");
    let peer = Ipv4Addr::new(198, 18, 0, 2);
    let in_map = || {
        open_pinned(&pins.layout(1))
            .expect("open pinned maps")
            .counters()
            .expect("counters")
            .peers[&peer]
            .tx_bytes
    };
    let query = format!(r#"flannel_peer_tx_bytes_total{{peer="{peer}"}}"#);
    // Traffic has stopped, so the map is stable; Prometheus catches up within a scrape.
    let (mut seen, mut want) = (None, 0);
    let matched = wait_until(Duration::from_secs(20), || {
        want = in_map();
        seen = promql(ns, &query);
        seen.is_some_and(|v| v > 0.0 && (v - want as f64).abs() <= want as f64 * 0.01)
    });
    assert!(
        matched,
        "PromQL {query} = {seen:?}, map says {want} (iperf3 received {bytes})"
    );
    assert!(
        want >= bytes,
        "the map counted {want} inner bytes towards {peer}, iperf3 received {bytes}"
    );

    // Where the pod traffic went (the PATHS map, summed at scrape time): iperf3's flow left
    // the kernel path once verified and went fast; Prometheus holds the map's sums.
    let paths = || {
        open_pinned(&pins.layout(1))
            .expect("open pinned maps")
            .counters()
            .expect("counters")
            .paths
    };
    for (path, field) in [
        ("fast_tx", "packets"),
        ("fast_tx", "bytes"),
        ("fast_rx", "packets"),
    ] {
        let query = format!(r#"flannel_datapath_{field}_total{{path="{path}"}}"#);
        let (mut seen, mut want) = (None, 0);
        let matched = wait_until(Duration::from_secs(20), || {
            let c = paths()[path];
            want = if field == "bytes" { c.bytes } else { c.packets };
            seen = promql(ns, &query);
            seen.is_some_and(|v| v > 0.0 && v == want as f64)
        });
        assert!(matched, "PromQL {query} = {seen:?}, PATHS says {want}");
    }
    // The flow's first packets took the kernel path until netfilter had seen both ways.
    assert!(
        promql(
            ns,
            r#"flannel_datapath_packets_total{path="kernel",reason="unverified"} > 0"#
        )
        .is_some(),
        "no kernel-path packets counted as unverified: {:?}",
        paths()
    );
    assert_eq!(
        promql(
            ns,
            "count(count by (path) (flannel_datapath_packets_total))"
        ),
        Some(3.0),
        "paths other than fast_tx, fast_rx and kernel"
    );

    // The agent's own view of the datapath, through Prometheus too.
    assert_eq!(
        promql(ns, r#"flannel_datapath_info{mode="ebpf-vxlan"}"#),
        Some(1.0)
    );
    assert_eq!(promql(ns, "flannel_peers_programmed"), Some(1.0));
    assert_eq!(promql(ns, "flannel_peers_known"), Some(1.0));

    // promtool lints the exposition exactly as served.
    let text = http_get(ns, AGENT_PORT, "/metrics").expect("/metrics");
    let lint = promtool_check(&text);
    assert!(lint.0, "promtool check metrics failed:\n{}\n{text}", lint.1);

    // Every metric the Grafana dashboard queries exists in the real output.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json"),
    )
    .expect("dashboard");
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let names = regex_lite_names(&dashboard);
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "dashboard queries {name}, which /metrics does not export"
        );
    }
}

/// Every `flannel_…` identifier in `text`.
fn regex_lite_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("flannel_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Run `promtool check metrics` on `text`: success and its output.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let mut msg = String::from_utf8_lossy(&out.stdout).into_owned();
    msg.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), msg)
}

/// A scrape reads every peer's per-CPU slot: time it with 5,000 peers in the maps.
#[test]
fn scrape_cost_with_5000_peers() {
    if !require_root() {
        return;
    }
    let (a, _b) = twohost::two_hosts();
    let pins = BpfPins::new("metrics-scale", 1);
    let layout = PinLayout::new(pins.root(1));
    // The size the issue asks about; the agent sizes its maps to the cluster.
    let peers: u32 = 5000;
    let l = layout.clone();
    a.ns.enter(move || {
        let mut dp = load_sized(
            &l,
            flannel_agent::backend::ebpf::Devices {
                vxlan: Some("flannel.1"),
                vxlan6: None,
                uplink: "eth0",
            },
            Some(peers),
            &tokio_util::sync::CancellationToken::new(),
        )
        .expect("load");
        // Written directly, one slot per peer: what the agent's reconcile leaves behind.
        for i in 0..peers {
            let underlay = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
            let subnet = Ipv4Addr::from(0x0a00_0000 + (i << 8));
            let peer = Peer {
                slot: i,
                subnet: flannel_common::wire::v4_mapped(subnet.octets()),
                prefix_len: flannel_common::wire::V4_MAPPED_PREFIX + 24,
            };
            let key = PeerKey {
                addr: flannel_common::wire::v4_mapped(underlay.octets()),
            };
            dp.peers.insert(key, peer, 0).expect("peer");
        }
    });
    let m = flannel_agent::metrics::get();
    m.set_datapath("ebpf-vxlan", "", Some(layout));
    let mut times = Vec::new();
    let mut text = String::new();
    for _ in 0..5 {
        let start = Instant::now();
        text = m.encode();
        times.push(start.elapsed());
    }
    times.sort();
    let start = Instant::now();
    let dp = open_pinned(&pins.layout(1)).expect("open");
    let read = flannel_agent::metrics::read_map_counters(&dp).expect("read the maps");
    let map_read = start.elapsed();
    assert_eq!(read.peers.len(), peers as usize);
    let series = text
        .lines()
        .filter(|l| l.starts_with("flannel_peer_rx_bytes_total{"))
        .count();
    assert_eq!(series, peers as usize, "one rx-bytes series per peer");
    eprintln!(
        "scrape with {peers} peers: median {:?}, min {:?}, max {:?}, {} bytes; of which reading the maps {map_read:?}",
        times[2],
        times[0],
        times[4],
        text.len()
    );
    let lint = promtool_check(&text);
    assert!(lint.0, "promtool check metrics failed:\n{}", lint.1);
    m.set_datapath("ebpf-vxlan", "", None);
}

//! `flanneld inspect [--json] [agent flags]`: what this host's flannel is doing, read from
//! the same places the agent uses (the pinned eBPF maps, `subnet.env`, and the datastore
//! named by the usual flags and `FLANNELD_*` variables), so it works while the agent runs
//! and after it stopped. Nothing is changed.
//!
//! The report: this host's lease; every peer with its underlay address, VTEP MAC, which
//! datapath carries it (`ebpf` when the maps route its subnet, else `kernel`) and the eBPF
//! counters; packets dropped and handed to the kernel, by reason; the datapath mode and
//! why. An aligned table for people, `--json` for scripts.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use serde::Serialize;

use crate::{
    backend::{
        ebpf::{Datapath, PinLayout, open_pinned},
        vxlan::peer_vtep_mac,
    },
    config::{Config, ManagerConfig},
    lease::{Lease, LeaseEvent},
    metrics::read_map_counters,
    subnet::{SubnetManager, env_file},
    wire::mac::MacAddr,
};

fn display<S: serde::Serializer>(v: &Ipv4Network, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_opt<S: serde::Serializer>(v: &Option<Ipv4Network>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// How long the datastore gets to answer before the report goes on without it.
const DATASTORE_TIMEOUT: Duration = Duration::from_secs(5);

/// This host's lease as `subnet.env` and the datastore tell it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct OwnLease {
    /// `FLANNEL_SUBNET` (network address).
    #[serde(serialize_with = "display_opt")]
    pub subnet: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_SUBNET`.
    pub ipv6_subnet: Option<String>,
    /// `FLANNEL_NETWORK`.
    #[serde(serialize_with = "display_opt")]
    pub network: Option<Ipv4Network>,
    /// The address published to peers (from the datastore).
    pub public_ip: Option<Ipv4Addr>,
    /// The lease's backend type (from the datastore).
    pub backend: Option<String>,
    /// Whether the datastore holds the lease (`None`: the datastore was not reachable).
    pub in_datastore: Option<bool>,
}

/// One peer.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PeerRow {
    /// Its pod subnet.
    #[serde(serialize_with = "display")]
    pub subnet: Ipv4Network,
    /// Its underlay address.
    pub public_ip: Option<Ipv4Addr>,
    /// Its VTEP MAC (`aa:bb:…`), for VXLAN peers.
    pub vtep_mac: Option<String>,
    /// Its lease's backend type.
    pub backend: Option<String>,
    /// `ebpf` when the eBPF maps route its subnet, else `kernel`.
    pub datapath: &'static str,
    /// Whether the datastore holds its lease (`None`: not reachable).
    pub in_datastore: Option<bool>,
    /// eBPF counters (`None` on the kernel path).
    pub counters: Option<PeerCounters>,
}

/// A peer's eBPF counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct PeerCounters {
    /// Packets encapsulated towards it.
    pub tx_packets: u64,
    /// Their inner bytes.
    pub tx_bytes: u64,
    /// Packets from it decapsulated.
    pub rx_packets: u64,
    /// Their inner bytes.
    pub rx_bytes: u64,
}

/// Packets and bytes for one reason.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ReasonRow {
    /// The reason's stable name (as in the metrics).
    pub reason: &'static str,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// The datapath mode and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DatapathReport {
    /// `ebpf-vxlan` when the programs are attached and enabled, else `kernel`.
    pub mode: &'static str,
    /// Why.
    pub reason: String,
    /// The pin path looked at.
    pub pin_path: PathBuf,
    /// The opt-in fast path flag in the datapath's configuration.
    pub fast_path: bool,
}

/// Everything `inspect` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// This host's lease.
    pub lease: OwnLease,
    /// The datapath.
    pub datapath: DatapathReport,
    /// Other hosts, by subnet.
    pub peers: Vec<PeerRow>,
    /// Drops by reason (eBPF datapath only).
    pub drops: Vec<ReasonRow>,
    /// Hand-offs to the kernel path by reason (eBPF datapath only).
    pub kernel_handoffs: Vec<ReasonRow>,
    /// Pod packets by the path they took under the per-flow fast path: `fast_tx`,
    /// `fast_rx`, or `kernel_<reason>` (eBPF datapath only).
    pub paths: Vec<ReasonRow>,
    /// Why the datastore could not be read, if it could not.
    pub datastore_error: Option<String>,
}

/// Runs `flanneld inspect`: the report as text or JSON.
pub async fn run(config: &Config, json: bool) -> Result<String, String> {
    let leases = tokio::time::timeout(DATASTORE_TIMEOUT, datastore_leases(config))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {DATASTORE_TIMEOUT:?}")));
    let report = build(&config.subnet_file, &config.ebpf.pin_root, leases);
    if json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())
    } else {
        Ok(render(&report))
    }
}

/// Every lease in the datastore the flags name (the watch's first snapshot).
async fn datastore_leases(config: &Config) -> Result<Vec<Lease>, String> {
    match &config.manager {
        ManagerConfig::Kube(kube) => {
            let mgr = crate::subnet::kube::KubeSubnetManager::from_flags(
                &kube.client,
                &kube.net_config_path,
                &kube.annotation_prefix,
            )
            .await
            .map_err(|e| e.to_string())?;
            first_snapshot(&mgr).await
        }
        ManagerConfig::Etcd(opts) => {
            let mgr = crate::subnet::etcd::EtcdSubnetManager::connect(opts.clone())
                .await
                .map_err(|e| e.to_string())?;
            first_snapshot(&mgr).await
        }
    }
}

async fn first_snapshot<M: SubnetManager>(mgr: &M) -> Result<Vec<Lease>, String> {
    let mut events = mgr.watch_leases();
    loop {
        match events.next().await {
            Some(Ok(LeaseEvent::Snapshot(leases))) => return Ok(leases),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the lease watch ended".into()),
        }
    }
}

/// Assemble the report from `subnet.env`, the pinned maps under `pin_root` and the
/// datastore's leases.
pub fn build(subnet_file: &Path, pin_root: &Path, leases: Result<Vec<Lease>, String>) -> Report {
    let prev = env_file::read_previous(subnet_file);
    let layout = PinLayout::new(pin_root);
    let (datapath, maps) = datapath_state(&layout, pin_root);
    let (leases, datastore_error) = match leases {
        Ok(l) => (Some(l), None),
        Err(e) => (None, Some(e)),
    };
    let known = leases.is_some();
    let own = leases
        .iter()
        .flatten()
        .find(|l| l.subnet.is_some() && l.subnet == prev.subnet);
    let lease = OwnLease {
        subnet: prev.subnet,
        ipv6_subnet: prev.ipv6_subnet.map(|s| s.to_string()),
        network: prev.network,
        public_ip: own.map(|l| l.attrs.public_ip),
        backend: own.map(|l| l.attrs.backend_type().to_owned()),
        in_datastore: known.then_some(own.is_some()),
    };

    let mut peers: BTreeMap<Ipv4Network, PeerRow> = BTreeMap::new();
    for l in leases.iter().flatten() {
        // The table is by IPv4 subnet, as the eBPF maps are (etcd leases always have one).
        let Some(subnet) = l.subnet.filter(|s| Some(*s) != prev.subnet) else {
            continue;
        };
        peers.insert(
            subnet,
            PeerRow {
                subnet,
                public_ip: Some(l.attrs.public_ip),
                vtep_mac: peer_vtep_mac(l).map(|m| MacAddr(m).to_string()),
                backend: Some(l.attrs.backend_type().to_owned()),
                datapath: "kernel",
                in_datastore: Some(true),
                counters: None,
            },
        );
    }
    let (mut drops, mut kernel_handoffs, mut paths) = (Vec::new(), Vec::new(), Vec::new());
    if let Some(m) = maps {
        for (subnet, route, counters) in m.routes {
            let row = peers.entry(subnet).or_insert_with(|| PeerRow {
                subnet,
                public_ip: None,
                vtep_mac: None,
                backend: None,
                datapath: "kernel",
                in_datastore: known.then_some(false),
                counters: None,
            });
            // The maps are what the packets see: they win over the lease for these.
            row.public_ip = match crate::backend::ebpf::addr_of(route.peer_ip) {
                std::net::IpAddr::V4(a) => Some(a),
                std::net::IpAddr::V6(_) => None,
            };
            row.vtep_mac = Some(MacAddr(route.vtep_mac).to_string());
            row.datapath = "ebpf";
            row.counters = counters;
        }
        drops = m.drops;
        kernel_handoffs = m.passes;
        paths = m.paths;
    }
    Report {
        lease,
        datapath,
        peers: peers.into_values().collect(),
        drops,
        kernel_handoffs,
        paths,
        datastore_error,
    }
}

/// What the pinned maps hold: routes with their peers' counters, and the reason counters.
struct MapState {
    routes: Vec<(Ipv4Network, flannel_common::Route, Option<PeerCounters>)>,
    drops: Vec<ReasonRow>,
    passes: Vec<ReasonRow>,
    paths: Vec<ReasonRow>,
}

fn datapath_state(layout: &PinLayout, pin_root: &Path) -> (DatapathReport, Option<MapState>) {
    let pin_path = layout.versioned();
    let report = |mode, reason: String, fast_path| DatapathReport {
        mode,
        reason,
        pin_path: pin_path.clone(),
        fast_path,
    };
    if !layout.map(flannel_common::names::MAP_CONFIG).exists() {
        let why = match crate::backend::ebpf::probe(pin_root) {
            Err(reason) => format!("eBPF unavailable on this host: {reason}"),
            Ok(()) => format!(
                "no eBPF datapath pinned under {} (the agent runs the kernel VXLAN or host-gw \
                 backend, or never started)",
                pin_path.display()
            ),
        };
        return (report("kernel", why, false), None);
    }
    let dp = match open_pinned(layout) {
        Ok(dp) => dp,
        Err(e) => {
            return (
                report("kernel", format!("pinned maps unreadable: {e}"), false),
                None,
            );
        }
    };
    let state = match read_state(&dp) {
        Ok(s) => s,
        Err(e) => {
            return (
                report("kernel", format!("pinned maps unreadable: {e}"), false),
                None,
            );
        }
    };
    let cfg = dp.config.get(&0, 0).unwrap_or_default();
    let enabled = cfg.flags & flannel_common::maps::CONFIG_F_ENABLED != 0;
    let fast = cfg.flags & flannel_common::maps::CONFIG_F_FAST_INGRESS != 0;
    let links: Vec<&str> = ["encap", "decap"]
        .into_iter()
        .filter(|l| !layout.link(l).exists())
        .collect();
    let (mode, why) = if !links.is_empty() {
        (
            "kernel",
            format!(
                "maps pinned but the {} link(s) are not: the programs are detached",
                links.join(" and ")
            ),
        )
    } else if !enabled {
        (
            "kernel",
            "programs attached but not enabled yet (the agent enables them once it holds a lease)"
                .to_owned(),
        )
    } else {
        (
            "ebpf-vxlan",
            format!(
                "programs attached with pinned tcx links and enabled (VNI {}, port {})",
                cfg.vni, cfg.port
            ),
        )
    };
    (report(mode, why, fast), Some(state))
}

fn read_state(dp: &Datapath) -> Result<MapState, aya::maps::MapError> {
    let counters = read_map_counters(dp)?;
    let by_peer: BTreeMap<std::net::IpAddr, PeerCounters> = counters
        .peers
        .iter()
        .map(|(addr, _, s)| {
            (
                *addr,
                PeerCounters {
                    tx_packets: s.tx_packets,
                    tx_bytes: s.tx_bytes,
                    rx_packets: s.rx_packets,
                    rx_bytes: s.rx_bytes,
                },
            )
        })
        .collect();
    let routes = dp
        .current_routes()?
        .into_iter()
        .map(|(net, r)| {
            let counters = by_peer
                .get(&crate::backend::ebpf::addr_of(r.peer_ip))
                .copied();
            (net, r, counters)
        })
        .collect();
    let rows = |v: Vec<(&'static str, u64, u64)>| {
        v.into_iter()
            .map(|(reason, packets, bytes)| ReasonRow {
                reason,
                packets,
                bytes,
            })
            .collect()
    };
    Ok(MapState {
        routes,
        drops: rows(counters.drops),
        passes: rows(counters.passes),
        paths: rows(counters.paths),
    })
}

/// Columns padded to their widest cell.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let l = &r.lease;
    let _ = writeln!(
        out,
        "Lease:    {} (network {}, public IP {}, backend {}{})",
        opt(&l.subnet),
        opt(&l.network),
        opt(&l.public_ip),
        opt(&l.backend),
        match l.in_datastore {
            Some(false) => ", NOT in the datastore",
            _ => "",
        }
    );
    if let Some(v6) = &l.ipv6_subnet {
        let _ = writeln!(out, "IPv6:     {v6}");
    }
    let _ = writeln!(
        out,
        "Datapath: {}{}: {}",
        r.datapath.mode,
        if r.datapath.fast_path {
            " (fast path on)"
        } else {
            ""
        },
        r.datapath.reason
    );
    if let Some(e) = &r.datastore_error {
        let _ = writeln!(
            out,
            "Datastore: unreachable ({e}); peers from the maps only"
        );
    }
    let _ = writeln!(out, "\nPeers ({}):", r.peers.len());
    let rows: Vec<Vec<String>> = r
        .peers
        .iter()
        .map(|p| {
            let c = |f: fn(&PeerCounters) -> u64| p.counters.as_ref().map(f);
            vec![
                p.subnet.to_string(),
                opt(&p.public_ip),
                opt(&p.vtep_mac),
                p.datapath.to_owned(),
                opt(&c(|c| c.tx_packets)),
                opt(&c(|c| c.tx_bytes)),
                opt(&c(|c| c.rx_packets)),
                opt(&c(|c| c.rx_bytes)),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "SUBNET",
            "PUBLIC-IP",
            "VTEP-MAC",
            "DATAPATH",
            "TX-PKTS",
            "TX-BYTES",
            "RX-PKTS",
            "RX-BYTES",
        ],
        &rows,
    );
    for (title, first, rows) in [
        ("Drops", "REASON", &r.drops),
        ("Handed to the kernel", "REASON", &r.kernel_handoffs),
        ("Pod packets by path", "PATH", &r.paths),
    ] {
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{title}:");
        let rows: Vec<Vec<String>> = rows
            .iter()
            .map(|x| {
                vec![
                    x.reason.to_owned(),
                    x.packets.to_string(),
                    x.bytes.to_string(),
                ]
            })
            .collect();
        table(&mut out, &[first, "PACKETS", "BYTES"], &rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_pins_or_datastore_the_report_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("subnet.env");
        std::fs::write(
            &env,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let r = build(&env, &dir.path().join("pins"), Err("refused".into()));
        assert_eq!(r.lease.subnet, Some("10.244.7.0/24".parse().unwrap()));
        assert_eq!(r.datapath.mode, "kernel");
        assert!(r.peers.is_empty());
        let text = render(&r);
        assert!(text.contains("Lease:    10.244.7.0/24"), "{text}");
        assert!(text.contains("Datastore: unreachable (refused)"), "{text}");
        assert!(text.contains("Datapath: kernel: "), "{text}");
    }

    #[test]
    fn tables_align() {
        let mut out = String::new();
        table(
            &mut out,
            &["A", "BB"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(out, "A    BB\nxxx  1\ny    22\n");
    }
}

//! Prometheus metrics, served as `/metrics` on the health listener.
//!
//! One process-wide, typed registry: every metric is a named field of [`Metrics`], so a
//! module records with `metrics::get().lease_renewals.inc()` and needs no handle threaded
//! through constructors. Adding a metric means adding a field and one `register` line in
//! [`Metrics::new`]; its name, help and labels are then in this file and nowhere else
//! (the README's metrics list and `deploy/grafana-dashboard.json` use these names).
//!
//! Naming follows Prometheus conventions: `flannel_` prefix, base units (`_bytes`,
//! `_seconds`), counters end in `_total` (added by the encoder), `_info` gauges carry
//! state as labels with value 1.
//!
//! The eBPF datapath's counters are not copied into the registry: the programs keep them
//! in per-CPU maps, and [`BpfCollector`] reads and sums the pinned maps at scrape time, so
//! a scrape always shows what the kernel counted, and the agent does no work between
//! scrapes.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{LazyLock, Mutex, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use flannel_common::{DropReason, PassReason, PathReason, PeerStats};
use ipnetwork::{IpNetwork, Ipv4Network};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::backend::ebpf::{Datapath, PinLayout, open_pinned};

/// `Content-Type` of [`encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels of `flannel_lease_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    /// The IPv4 subnet, e.g. `10.244.7.0/24`.
    pub subnet: String,
    /// The IPv6 subnet, empty without IPv6.
    pub ipv6_subnet: String,
    /// The address published to peers.
    pub public_ip: String,
}

/// A `subnet` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubnetLabel {
    /// The subnet, e.g. `10.244.7.0/24`.
    pub subnet: String,
}

/// Labels of `flannel_datapath_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatapathLabels {
    /// `ebpf-vxlan`, `vxlan` (kernel device) or `host-gw`.
    pub mode: String,
    /// Why the eBPF datapath is not in use (a [`crate::backend::ebpf::FallbackReason`]
    /// kind), empty when it is or was not asked for.
    pub fallback_reason: String,
}

/// An `op` label: which datastore request failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `get_network_config`, `acquire_lease`, `renew_lease`, `watch_leases`, …
    pub op: &'static str,
}

/// A `result` label: `ok` or `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// A `kind` label (what was repaired, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: &'static str,
}

/// The `op` values of `flannel_datastore_request_errors_total`.
pub const DATASTORE_OPS: [&str; 6] = [
    "get_network_config",
    "acquire_lease",
    "get_lease",
    "renew_lease",
    "list_leases",
    "watch_leases",
];

/// A gauge holding a float (timestamps).
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `flannel_lease_info{subnet,ipv6_subnet,public_ip}`: 1 for the lease this host holds.
    pub lease_info: Family<LeaseLabels, Gauge>,
    /// `flannel_lease_expiry_timestamp_seconds{subnet}`: when the lease expires unless
    /// renewed (etcd; kube leases do not expire).
    pub lease_expiry: Family<SubnetLabel, FloatGauge>,
    /// `flannel_lease_renewals_total`.
    pub lease_renewals: Counter,
    /// `flannel_lease_acquisition_failures_total`: attempts to take a lease that failed.
    pub lease_acquisition_failures: Counter,
    /// `flannel_peers_known`: other hosts' leases the agent knows.
    pub peers_known: Gauge,
    /// `flannel_peers_programmed`: of those, the ones the backend programmed successfully.
    pub peers_programmed: Gauge,
    /// `flannel_datapath_info{mode,fallback_reason}`: 1 for the datapath in use.
    pub datapath_info: Family<DatapathLabels, Gauge>,
    /// `flannel_datastore_request_errors_total{op}`: failed etcd / Kubernetes API requests.
    pub datastore_errors: Family<OpLabel, Counter>,
    /// `flannel_lease_watch_restarts_total`: the lease watch started over from a fresh
    /// snapshot (disconnect, compaction, relist).
    pub watch_restarts: Counter,
    /// `flannel_reconcile_runs_total{result}`: full reconciles of the backend.
    pub reconcile_runs: Family<ResultLabel, Counter>,
    /// `flannel_reconcile_duration_seconds`: how long a full reconcile took.
    pub reconcile_duration: Histogram,
    /// `flannel_lease_event_to_programmed_seconds`: from a lease event reaching the agent
    /// to the backend having programmed it (maps and kernel state written).
    pub event_to_programmed: Histogram,
    /// `flannel_repairs_total{kind}`: state the agent programmed, found changed or deleted,
    /// and put back.
    pub repairs: Family<KindLabel, Counter>,
    /// The pinned maps [`BpfCollector`] reads, once the eBPF datapath is up.
    bpf: &'static BpfCollector,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
static BPF: BpfCollector = BpfCollector {
    layout: Mutex::new(None),
};

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Buckets from 100 µs to ~26 s (×2): netlink and map writes take well under a
/// millisecond per peer, a reconcile of thousands of peers seconds.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("flannel");
        let m = Self {
            registry: Registry::default(),
            lease_info: Family::default(),
            lease_expiry: Family::default(),
            lease_renewals: Counter::default(),
            lease_acquisition_failures: Counter::default(),
            peers_known: Gauge::default(),
            peers_programmed: Gauge::default(),
            datapath_info: Family::default(),
            datastore_errors: Family::default(),
            watch_restarts: Counter::default(),
            reconcile_runs: Family::default(),
            reconcile_duration: latency_buckets(),
            event_to_programmed: latency_buckets(),
            repairs: Family::default(),
            bpf: &BPF,
        };
        let r = &mut registry;
        r.register(
            "lease_info",
            "The lease this host holds (value 1)",
            m.lease_info.clone(),
        );
        r.register(
            "lease_expiry_timestamp_seconds",
            "Unix time the lease expires unless renewed (etcd only)",
            m.lease_expiry.clone(),
        );
        r.register("lease_renewals", "Lease renewals", m.lease_renewals.clone());
        r.register(
            "lease_acquisition_failures",
            "Failed attempts to acquire a lease",
            m.lease_acquisition_failures.clone(),
        );
        r.register(
            "peers_known",
            "Other hosts' leases known",
            m.peers_known.clone(),
        );
        r.register(
            "peers_programmed",
            "Known peers the backend programmed successfully",
            m.peers_programmed.clone(),
        );
        r.register(
            "datapath_info",
            "The datapath in use (value 1) and, after a fallback from eBPF, why",
            m.datapath_info.clone(),
        );
        r.register(
            "datastore_request_errors",
            "Failed etcd or Kubernetes API requests, by operation",
            m.datastore_errors.clone(),
        );
        r.register(
            "lease_watch_restarts",
            "Times the lease watch started over from a fresh snapshot",
            m.watch_restarts.clone(),
        );
        r.register(
            "reconcile_runs",
            "Full reconciles of the backend against the lease set, by result",
            m.reconcile_runs.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Duration of full reconciles",
            Unit::Seconds,
            m.reconcile_duration.clone(),
        );
        r.register_with_unit(
            "lease_event_to_programmed",
            "Time from a lease event reaching the agent to the datapath programmed",
            Unit::Seconds,
            m.event_to_programmed.clone(),
        );
        r.register(
            "repairs",
            "Programmed state found changed or deleted and restored, by kind",
            m.repairs.clone(),
        );
        // Known label values start at 0, so dashboards and alerts see the series before the
        // first error.
        for op in DATASTORE_OPS {
            let _ = m.datastore_errors.get_or_create(&OpLabel { op });
        }
        for result in ["ok", "error"] {
            let _ = m.reconcile_runs.get_or_create(&ResultLabel { result });
        }
        registry.register_collector(Box::new(&BPF));
        Self { registry, ..m }
    }

    /// Count a failed datastore request.
    pub fn datastore_error(&self, op: &'static str) {
        self.datastore_errors.get_or_create(&OpLabel { op }).inc();
    }

    /// Record the lease this host holds.
    pub fn set_lease(
        &self,
        subnet: Option<Ipv4Network>,
        ipv6_subnet: Option<String>,
        public_ip: Ipv4Addr,
    ) {
        self.lease_info.clear();
        self.lease_info
            .get_or_create(&LeaseLabels {
                // Empty on an IPv6-only network, like `ipv6_subnet` without IPv6.
                subnet: subnet.map(|s| s.to_string()).unwrap_or_default(),
                ipv6_subnet: ipv6_subnet.unwrap_or_default(),
                public_ip: public_ip.to_string(),
            })
            .set(1);
    }

    /// Record that the lease on `subnet` expires `left` from now.
    pub fn set_lease_expiry(&self, subnet: Ipv4Network, left: Duration) {
        let at = SystemTime::now() + left;
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.lease_expiry
            .get_or_create(&SubnetLabel {
                subnet: subnet.to_string(),
            })
            .set(secs);
    }

    /// Record the datapath in use. `bpf_maps` is the eBPF datapath's pin layout, whose
    /// counters every scrape then reads.
    pub fn set_datapath(&self, mode: &str, fallback_reason: &str, bpf_maps: Option<PinLayout>) {
        self.datapath_info.clear();
        self.datapath_info
            .get_or_create(&DatapathLabels {
                mode: mode.to_owned(),
                fallback_reason: fallback_reason.to_owned(),
            })
            .set(1);
        *self.bpf.layout.lock().unwrap_or_else(|p| p.into_inner()) = bpf_maps;
    }

    /// Record one full reconcile (fed by [`crate::backend::Stats`]).
    pub fn observe_reconcile(&self, ok: bool, took: Duration) {
        self.reconcile_runs
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// The peer set has `known` peers; `all_programmed` when the backend has applied all
    /// of them (otherwise the programmed count keeps its last value, at most `known`).
    pub fn set_peers(&self, known: usize, all_programmed: bool) {
        let known = i64::try_from(known).unwrap_or(i64::MAX);
        self.peers_known.set(known);
        if all_programmed || self.peers_programmed.get() > known {
            self.peers_programmed.set(known);
        }
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; the collector never returns an error.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the eBPF datapath's pinned per-CPU maps at scrape time and exports their sums.
#[derive(Debug)]
pub struct BpfCollector {
    layout: Mutex<Option<PinLayout>>,
}

/// Labels of the per-peer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    /// The peer's underlay address.
    peer: String,
    /// The peer's pod subnet.
    subnet: String,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Labels of `flannel_datapath_packets_total` / `flannel_datapath_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    /// `fast_tx`, `fast_rx` or `kernel`.
    path: &'static str,
    /// Why the kernel path (`unverified`, `tcp_control`, …); empty on the fast path.
    reason: &'static str,
}

/// The `path` and `reason` labels of a [`PathReason`]: its name is `fast_tx`, `fast_rx` or
/// `kernel_<reason>`.
fn path_labels(name: &'static str) -> PathLabels {
    match name.strip_prefix("kernel_") {
        Some(reason) => PathLabels {
            path: "kernel",
            reason,
        },
        None => PathLabels {
            path: name,
            reason: "",
        },
    }
}

/// What one scrape read from the maps.
#[derive(Debug, Default)]
pub struct MapCounters {
    /// Per peer: underlay, subnet, counters summed over CPUs.
    pub peers: Vec<(IpAddr, IpNetwork, PeerStats)>,
    /// Per drop reason: packets, bytes.
    pub drops: Vec<(&'static str, u64, u64)>,
    /// Per hand-off-to-kernel reason: packets, bytes.
    pub passes: Vec<(&'static str, u64, u64)>,
    /// Per path a pod's packet took under the per-flow fast path (a [`PathReason`] name):
    /// packets, bytes.
    pub paths: Vec<(&'static str, u64, u64)>,
}

/// Read and sum every counter map: one lookup per peer and per reason.
pub fn read_map_counters(dp: &Datapath) -> Result<MapCounters, aya::maps::MapError> {
    let mut out = MapCounters::default();
    for (addr, peer) in dp.all_peers()? {
        let Some(subnet) = crate::backend::ebpf::peer_subnet(&peer) else {
            continue;
        };
        let sum = dp
            .peer_stats
            .get(&peer.slot, 0)?
            .iter()
            .fold(PeerStats::default(), |a, s| PeerStats {
                tx_packets: a.tx_packets + s.tx_packets,
                tx_bytes: a.tx_bytes + s.tx_bytes,
                rx_packets: a.rx_packets + s.rx_packets,
                rx_bytes: a.rx_bytes + s.rx_bytes,
            });
        out.peers.push((addr, subnet, sum));
    }
    let sum = |v: aya::maps::PerCpuValues<flannel_common::Counter>| {
        v.iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    };
    for reason in DropReason::ALL {
        let (p, b) = sum(dp.drops.get(&(reason as u32), 0)?);
        out.drops.push((reason.as_str(), p, b));
    }
    for reason in PassReason::ALL {
        let (p, b) = sum(dp.passes.get(&(reason as u32), 0)?);
        out.passes.push((reason.as_str(), p, b));
    }
    for reason in PathReason::ALL {
        let (p, b) = sum(dp.paths.get(&(reason as u32), 0)?);
        out.paths.push((reason.as_str(), p, b));
    }
    Ok(out)
}

fn counter_family<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl Iterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for &'static BpfCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(layout) = self
            .layout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let read = open_pinned(&layout)
            .map_err(|e| e.to_string())
            .and_then(|dp| read_map_counters(&dp).map_err(|e| e.to_string()));
        let up = ConstGauge::new(i64::from(read.is_ok()));
        up.encode(encoder.encode_descriptor(
            "ebpf_maps_up",
            "Whether the last scrape could read the eBPF datapath's pinned maps",
            None,
            MetricType::Gauge,
        )?)?;
        let c = match read {
            Ok(c) => c,
            Err(error) => {
                tracing::debug!(%error, "metrics: reading the pinned maps failed");
                return Ok(());
            }
        };
        let peer = |(addr, subnet, _): &(IpAddr, IpNetwork, PeerStats)| PeerLabels {
            peer: addr.to_string(),
            subnet: subnet.to_string(),
        };
        type Field = fn(&PeerStats) -> u64;
        let per_peer: [(&str, &str, Option<Unit>, Field); 4] = [
            (
                "peer_tx_packets",
                "Packets the eBPF datapath encapsulated towards the peer (a GSO aggregate counts once)",
                None,
                |s| s.tx_packets,
            ),
            (
                "peer_tx",
                "Inner bytes the eBPF datapath encapsulated towards the peer",
                Some(Unit::Bytes),
                |s| s.tx_bytes,
            ),
            (
                "peer_rx_packets",
                "Packets from the peer the eBPF datapath decapsulated",
                None,
                |s| s.rx_packets,
            ),
            (
                "peer_rx",
                "Inner bytes from the peer the eBPF datapath decapsulated",
                Some(Unit::Bytes),
                |s| s.rx_bytes,
            ),
        ];
        for (name, help, unit, field) in &per_peer {
            counter_family(
                &mut encoder,
                name,
                help,
                unit.as_ref(),
                c.peers.iter().map(|p| (peer(p), field(&p.2))),
            )?;
        }
        let reasons = [
            (
                "datapath_drops",
                "datapath_dropped",
                "Packets the eBPF datapath dropped, by reason",
                "Bytes of the packets the eBPF datapath dropped, by reason",
                &c.drops,
            ),
            (
                "datapath_kernel_handoffs",
                "datapath_kernel_handoff",
                "Packets the eBPF datapath handed to the kernel path, by reason",
                "Bytes of the packets the eBPF datapath handed to the kernel path, by reason",
                &c.passes,
            ),
        ];
        for (packets, bytes, help, bytes_help, rows) in reasons {
            counter_family(
                &mut encoder,
                packets,
                help,
                None,
                rows.iter().map(|(r, p, _)| (ReasonLabel { reason: r }, *p)),
            )?;
            counter_family(
                &mut encoder,
                bytes,
                bytes_help,
                Some(&Unit::Bytes),
                rows.iter().map(|(r, _, b)| (ReasonLabel { reason: r }, *b)),
            )?;
        }
        counter_family(
            &mut encoder,
            "datapath_packets",
            "Pod packets by the path they took: the per-flow fast path (fast_tx, fast_rx) or \
             the kernel path, and why",
            None,
            c.paths.iter().map(|(r, p, _)| (path_labels(r), *p)),
        )?;
        counter_family(
            &mut encoder,
            "datapath",
            "Bytes of pod packets by the path they took (see flannel_datapath_packets_total)",
            Some(&Unit::Bytes),
            c.paths.iter().map(|(r, _, b)| (path_labels(r), *b)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = get();
        m.set_lease(
            Some("10.244.7.0/24".parse().unwrap()),
            None,
            Ipv4Addr::new(198, 18, 0, 7),
        );
        m.lease_renewals.inc();
        m.datastore_error("renew_lease");
        m.set_datapath("vxlan", "no_btf", None);
        m.observe_reconcile(true, Duration::from_millis(3));
        let text = m.encode();
        for line in [
            r#"flannel_lease_info{subnet="10.244.7.0/24",ipv6_subnet="",public_ip="198.18.0.7"} 1"#,
            "# TYPE flannel_lease_renewals_total counter",
            r#"flannel_datastore_request_errors_total{op="renew_lease"} 1"#,
            r#"flannel_datapath_info{mode="vxlan",fallback_reason="no_btf"} 1"#,
            "# TYPE flannel_reconcile_duration_seconds histogram",
            "# TYPE flannel_lease_event_to_programmed_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        // Other tests in this process reconcile too: at least this one is counted.
        assert!(
            text.lines()
                .any(|l| l.starts_with(r#"flannel_reconcile_runs_total{result="ok"} "#)),
            "{text}"
        );
        // No eBPF datapath: no map series, and no error.
        assert!(!text.contains("flannel_peer_"), "{text}");
    }

    #[test]
    fn path_reasons_split_into_path_and_reason() {
        let labels: Vec<(&str, &str)> = PathReason::ALL
            .iter()
            .map(|r| {
                let l = path_labels(r.as_str());
                (l.path, l.reason)
            })
            .collect();
        assert_eq!(labels[0], ("fast_tx", ""));
        assert_eq!(labels[1], ("fast_rx", ""));
        assert!(labels.contains(&("kernel", "unverified")));
        assert!(labels.contains(&("kernel", "tcp_control")));
        assert!(
            labels[2..]
                .iter()
                .all(|(p, r)| *p == "kernel" && !r.is_empty()),
            "{labels:?}"
        );
    }
}

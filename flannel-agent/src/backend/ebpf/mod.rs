//! `ebpf-vxlan`: our TC programs carry VXLAN, the kernel device stays as the fallback.
//!
//! Everything the kernel `vxlan` backend programs (devices `flannel.<VNI>` and, with IPv6,
//! `flannel-v6.<VNI>`, and per peer a neighbour, an FDB entry and an onlink route) is
//! programmed here too, first, exactly as upstream. The programs are a bypass on top of
//! it: they encapsulate what the kernel routed into either device and decapsulate VXLAN
//! arriving on the uplink, and hand back
//! to the kernel path anything they don't handle (fragments, ARP, GSO aggregates on
//! ingress, route misses). So a detached program, a stopped agent or an unknown case
//! degrades to upstream's behaviour, never to loss, and peers running the kernel VXLAN
//! backend (ours or upstream's) interoperate by construction.
//!
//! Order of updates, so the kernel path always backs the BPF path: a peer's kernel entries
//! go in before its map entries, and its map entries come out before its kernel entries.

mod endpoints;
mod flows;
mod loader;
mod pods;
mod probe;
mod slots;
mod strangers;
mod tables;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use flannel_common::{
    DatapathConfig,
    maps::{
        CONFIG_F_ANY_PEER, CONFIG_F_DECAP_L4_UDP, CONFIG_F_ENABLED, CONFIG_F_FAST_INGRESS,
        CONFIG_F_FLOW_CACHE, CONFIG_F_GBP,
    },
};
use ipnetwork::{IpNetwork, Ipv6Network};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use flows::serve_flow_events;
pub use loader::{
    Datapath, Devices, OBJECT, PinLayout, PodPrograms, load, load_sized, open_pinned,
    probe_decap_l4_udp,
};
pub use probe::{FallbackReason, probe};
pub use tables::{
    Counters, MapContents, PeerEntry, PeerMapsReader, Placement, addr_of, peer_subnet,
};

use crate::{
    backend::{
        Backend, Error, ExternalInterface, Result, Touched,
        vxlan::{Fixes, KernelTables, KernelVxlan, VtepMacs},
    },
    lease::{Lease, LeaseAttrs},
    netconf::VxlanConfig,
    repair::{self, RepairKind},
};

/// How the eBPF datapath is set up (from `--bpf-pin-path`, `--ebpf-fast-path`,
/// `--ebpf-flow-cache`, `--ebpf-flow-refresh-ms`, `--ebpf-max-peers` and the network
/// config).
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    /// bpffs directory for this agent's pins.
    pub pin_root: PathBuf,
    /// Opt-in: deliver decapsulated traffic for local pods straight into their namespace,
    /// whatever the flow (netfilter bypassed).
    pub fast_path: bool,
    /// The per-flow fast path (default on): verified un-NATed pod-to-pod flows skip the
    /// bridge, routing, netfilter and the VXLAN device.
    pub flow_cache: bool,
    /// How often a fast flow's direction is re-checked on the kernel path.
    pub flow_refresh_ms: u32,
    /// Accept VXLAN only from known peers (`--vxlan-peer-check`, on unless set false).
    pub peer_check: bool,
    /// Peers the maps hold: `--ebpf-max-peers`, which the agent resolves with
    /// [`peer_capacity`] before building the backend; `None` keeps the pinned size (or the
    /// compiled default).
    pub max_peers: Option<u32>,
    /// The VTEP MACs this host published before, to create `flannel.<VNI>` (and
    /// `flannel-v6.<VNI>`) with (found by the agent in its previous lease; none in the
    /// configuration).
    pub vtep_macs: VtepMacs,
}

/// The most peers sized for automatically: 262,144 slots of per-CPU counters already cost
/// 8 MiB of kernel memory per CPU; beyond that `--ebpf-max-peers` says so explicitly.
pub const AUTO_MAX_PEERS: u32 = 1 << 18;

/// The peer capacity for a cluster network: `--ebpf-max-peers` when given, else the
/// number of subnets the network holds (every peer has one), at least the compiled
/// default and at most [`AUTO_MAX_PEERS`]. Leases beyond it (leases outside the network,
/// a smaller flag) are carried by the kernel device.
pub fn peer_capacity(flag: Option<u32>, network_prefix: u8, subnet_len: u8) -> u32 {
    if let Some(n) = flag {
        return n.max(1);
    }
    let bits = u32::from(subnet_len.saturating_sub(network_prefix)).min(31);
    (1u32 << bits).clamp(flannel_common::names::DEFAULT_PEER_CAPACITY, AUTO_MAX_PEERS)
}

/// The eBPF VXLAN backend.
pub struct EbpfVxlan {
    kernel: KernelVxlan,
    datapath: Datapath,
    layout: PinLayout,
    options: EbpfOptions,
    cancel: CancellationToken,
    /// Whether `register` has run: from then on CONFIG must hold [`Self::datapath_config`].
    registered: bool,
}

impl EbpfVxlan {
    /// Set up the kernel device, load and attach the programs. Any failure is a
    /// [`FallbackReason`] inside the error, for the agent to log before it falls back to
    /// the kernel backend (`--dataplane=auto`) or exits (`--dataplane=ebpf`).
    /// Its background tasks (log forwarder, pod watcher, flow event server) end with
    /// `cancel`.
    pub async fn new(
        ext: ExternalInterface,
        config: VxlanConfig,
        options: EbpfOptions,
        cancel: CancellationToken,
    ) -> Result<Self> {
        Self::try_new(ext, config, options, cancel)
            .await
            .map_err(Error::Ebpf)
    }

    async fn try_new(
        ext: ExternalInterface,
        config: VxlanConfig,
        options: EbpfOptions,
        cancel: CancellationToken,
    ) -> std::result::Result<Self, FallbackReason> {
        probe::probe(&options.pin_root)?;
        // The programs ride on the devices, which `KernelVxlan::new` creates (or adopts):
        // `flannel.<VNI>` unless IPv6-only, `flannel-v6.<VNI>` with IPv6.
        let mut kernel = KernelVxlan::with_vtep_macs(ext, config, options.vtep_macs)
            .await
            .map_err(|e| FallbackReason::Device(e.to_string()))?;
        if options.peer_check {
            // The kernel device takes whatever the programs hand it, and everything when
            // they are detached: it must not accept what the programs would drop.
            kernel.enable_peer_guard();
        }
        let layout = PinLayout::new(options.pin_root.clone());
        let devices = devices(&kernel);
        let datapath = loader::load_sized(&layout, devices, options.max_peers, &cancel)?;
        info!(device = devices.vxlan, device6 = devices.vxlan6, uplink = devices.uplink, pins = %layout.versioned().display(), max_peers = datapath.capacity(),
              kernel_has_decap_l4_udp = datapath.decap_l4_udp, "eBPF VXLAN datapath attached");
        Ok(Self {
            kernel,
            datapath,
            layout,
            options,
            cancel,
            registered: false,
        })
    }

    /// With the nftables peer guard on: whether it guards VXLAN over IPv6 too.
    pub fn peer_guard(&self) -> Option<bool> {
        self.kernel.peer_guard()
    }

    /// The datapath's pinned maps and links (bpffs paths).
    pub fn pin_paths(&self) -> Vec<PathBuf> {
        self.datapath.pin_paths(&self.layout)
    }

    /// The kernel VXLAN devices under the programs (the fallback path, and IPv6).
    pub fn kernel(&self) -> &KernelVxlan {
        &self.kernel
    }

    fn datapath_config(&self) -> DatapathConfig {
        let (sport_min, sport_max) = local_port_range();
        let (config, ext) = (self.kernel.config(), self.kernel.ext());
        let mut flags = CONFIG_F_ENABLED;
        for (on, flag) in [
            (self.options.fast_path, CONFIG_F_FAST_INGRESS),
            (!self.options.peer_check, CONFIG_F_ANY_PEER),
            (config.gbp, CONFIG_F_GBP),
            (self.flow_cache(), CONFIG_F_FLOW_CACHE),
            (self.datapath.decap_l4_udp, CONFIG_F_DECAP_L4_UDP),
        ] {
            if on {
                flags |= flag;
            }
        }
        let (vxlan6_ifindex, vtep_mac6, local_ip6) = self
            .kernel
            .v6_vtep()
            .map_or((0, [0; 6], [0; 16]), |(i, m, a)| (i, m, a.octets()));
        DatapathConfig {
            flags,
            vni: config.vni,
            port: config.port,
            sport_min,
            sport_max,
            // The VXLAN local address is the interface address, as upstream's device uses
            // (`--public-ip` is only what peers are told; behind NAT it isn't local).
            // 0.0.0.0 on an IPv6-only host.
            local_ip: ext.iface_addr.octets(),
            // An IPv6-only host has no `flannel.<VNI>`: index 0 tells the programs' IPv4
            // halves to leave everything to the kernel (which has no IPv4 VXLAN socket
            // there either), as `vxlan6_ifindex` 0 does for IPv6.
            vtep_mac: self.kernel.vtep_mac().unwrap_or_default(),
            uplink_ifindex: ext.index,
            vxlan_ifindex: self.kernel.vxlan_ifindex().unwrap_or_default(),
            ttl: 64,
            // What `flannel.<VNI>` carries: the fast path sends nothing it wouldn't.
            mtu: u16::try_from(self.kernel.v4_mtu().unwrap_or_default()).unwrap_or(u16::MAX),
            mtu6: u16::try_from(self.kernel.v6_mtu().unwrap_or_default()).unwrap_or(u16::MAX),
            flow_refresh_ms: self.options.flow_refresh_ms,
            local_ip6,
            vtep_mac6,
            vxlan6_ifindex,
            ..Default::default()
        }
    }

    /// Whether the per-flow fast path runs: asked for, and no GBP (whose policy ids ride in
    /// skb marks, which the fast path would not carry).
    fn flow_cache(&self) -> bool {
        self.options.flow_cache && !self.kernel.config().gbp
    }

    fn map_err(what: &str, e: aya::maps::MapError) -> Error {
        Error::Other(format!("eBPF maps: {what}: {e}"))
    }

    /// Compare everything this backend owns with the kernel and put back what differs, in
    /// dependency order: the kernel device and its entries (the programs ride on the
    /// device), then map pins and tcx links (a re-created device lost its encap link),
    /// then CONFIG (a re-created device has a new ifindex), then the peer maps. Returns
    /// what had to be written, peer-map entries aside.
    async fn check(&mut self, peers: &[Lease]) -> Result<Fixes> {
        self.check_with(peers, None, &Touched::default()).await
    }

    /// What a resync compares with, read without borrowing the backend: the kernel
    /// device's tables (see [`KernelVxlan::tables_reader`]), then the peer-keyed maps on
    /// a blocking thread through descriptors of their own. At 5,000 peers the maps are
    /// ~10,000 lookups, which must not hold up lease events.
    pub fn resync_reader(
        &self,
    ) -> impl std::future::Future<Output = Result<ResyncTables>> + Send + 'static {
        let kernel = self.kernel.tables_reader();
        let maps = self.datapath.peer_maps_reader();
        async move {
            let kernel = kernel.await?;
            let maps = match maps {
                Ok(reader) => match tokio::task::spawn_blocking(move || reader.read()).await {
                    Ok(Ok(read)) => Some(read),
                    Ok(Err(e)) => return Err(Self::map_err("resync read", e)),
                    Err(e) => {
                        return Err(Error::Other(format!("eBPF maps: resync read task: {e}")));
                    }
                },
                // No second descriptor: the comparison reads the maps itself.
                Err(error) => {
                    warn!(%error, "eBPF maps: resync reads them on the event path");
                    None
                }
            };
            Ok(ResyncTables { kernel, maps })
        }
    }

    /// [`check`](Self::check) against `tables` read earlier by
    /// [`resync_reader`](Self::resync_reader); the subnets in `touched` were changed by
    /// lease events since and are left as those made them (kernel entries and map
    /// entries alike).
    pub async fn check_with(
        &mut self,
        peers: &[Lease],
        tables: Option<ResyncTables>,
        touched: &Touched,
    ) -> Result<Fixes> {
        let (kernel, maps) = tables.map_or((None, None), |t| (Some(t.kernel), t.maps));
        let mut fixes = self.kernel.check_with(peers, kernel, touched).await?;
        fixes.extend(
            self.datapath
                .repair_pins(&self.layout, devices(&self.kernel))
                .map_err(|e| Error::Other(format!("eBPF datapath: {e}")))?,
        );
        if self.registered {
            fixes.extend(self.check_config()?);
        }
        let desired: Vec<PeerEntry> = peers.iter().flat_map(peer_entries).collect();
        // Reading and rewriting maps of many thousand entries is a burst of syscalls:
        // keep it off the reactor thread.
        let datapath = &mut self.datapath;
        // One record for both families: the subnets events touched, of either.
        let touched_nets: std::collections::BTreeSet<IpNetwork> = touched
            .v4
            .iter()
            .map(|n| IpNetwork::V4(*n))
            .chain(touched.v6.iter().map(|n| IpNetwork::V6(*n)))
            .collect();
        blocking(|| match maps {
            Some(read) => datapath.reconcile_with(&desired, read, &touched_nets),
            None => datapath.reconcile(&desired),
        })
        .map_err(|e| Self::map_err("reconcile", e))?;
        Ok(fixes)
    }

    /// CONFIG must describe the current devices: it names `flannel.<VNI>` and
    /// `flannel-v6.<VNI>` by ifindex, which changes whenever a device is re-created.
    fn check_config(&mut self) -> Result<Fixes> {
        let want = self.datapath_config();
        let have = self.datapath.config.get(&0, 0).ok();
        if have == Some(want) {
            return Ok(Fixes::new());
        }
        self.datapath
            .set_config(&want)
            .map_err(|e| Self::map_err("CONFIG", e))?;
        let detail = match have {
            Some(h) if h.vxlan_ifindex != want.vxlan_ifindex => format!(
                "CONFIG vxlan_ifindex {} -> {}",
                h.vxlan_ifindex, want.vxlan_ifindex
            ),
            Some(h) if h.vxlan6_ifindex != want.vxlan6_ifindex => format!(
                "CONFIG vxlan6_ifindex {} -> {}",
                h.vxlan6_ifindex, want.vxlan6_ifindex
            ),
            Some(h) if h.uplink_ifindex != want.uplink_ifindex => format!(
                "CONFIG uplink_ifindex {} -> {}",
                h.uplink_ifindex, want.uplink_ifindex
            ),
            _ => "CONFIG rewritten".to_owned(),
        };
        Ok(vec![(RepairKind::DatapathConfig, detail)])
    }
}

/// A resync's reads for the eBPF backend (see [`EbpfVxlan::resync_reader`]).
pub struct ResyncTables {
    kernel: KernelTables,
    /// `None` when the maps could not be opened a second time: read at comparison.
    maps: Option<MapContents>,
}

/// Run [`serve_flow_events`] on a blocking thread until `cancel`.
fn spawn_flow_event_server(layout: PinLayout, cancel: CancellationToken) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        cancel.cancelled().await;
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    tokio::task::spawn_blocking(move || {
        if let Err(error) = serve_flow_events(&layout, &stop) {
            warn!(%error, "flow events: TCP flows stay on the kernel path");
        }
    });
}

/// The devices the programs ride on.
fn devices(kernel: &KernelVxlan) -> Devices<'_> {
    Devices {
        vxlan: kernel.v4_device_name(),
        vxlan6: kernel.v6_device_name(),
        uplink: &kernel.ext().name,
    }
}

/// What the maps need from a lease: one entry per family it has a VXLAN half for (its
/// IPv4 subnet behind `PublicIP` with `BackendData`'s MAC, its IPv6 subnet behind
/// `PublicIPv6` with `BackendV6Data`'s), none (logged) for leases the datapath can't use.
fn peer_entries(peer: &Lease) -> Vec<PeerEntry> {
    if !matches!(peer.attrs.backend, crate::lease::BackendAttrs::Vxlan { .. }) {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(2);
    // An IPv6-only lease (kube mode) has no IPv4 half.
    if let Some(subnet) = peer.subnet
        && let Some(mac) = crate::backend::vxlan::peer_vtep_mac(peer)
    {
        // Every address the peer may send from is on the allow-list, the same list the
        // nftables guard holds (`sender_addresses`).
        let aliases = crate::backend::vxlan::sender_addresses(peer)
            .into_iter()
            .filter(|a| *a != peer.attrs.public_ip)
            .map(IpAddr::from)
            .collect();
        out.push(PeerEntry {
            underlay: peer.attrs.public_ip.into(),
            subnet: subnet.into(),
            vtep_mac: mac,
            aliases,
        });
    }
    // An IPv6 half without `PublicIPv6` or `BackendV6Data` is a host without an IPv6 VTEP
    // (upstream accepts it): nothing to route over IPv6.
    if let Ok(Some(v6)) = crate::backend::vxlan::parse_peer::<Ipv6Network>(peer) {
        let aliases = peer
            .senders6()
            .into_iter()
            .filter(|a| *a != v6.public_ip)
            .map(IpAddr::from)
            .collect();
        out.push(PeerEntry {
            underlay: v6.public_ip.into(),
            subnet: v6.subnet.into(),
            vtep_mac: v6.vtep_mac,
            aliases,
        });
    }
    out
}

/// Run a burst of synchronous work without stalling other tasks on this worker thread
/// (multi-threaded runtime; a current-thread runtime, as in tests, just runs it).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The kernel's ephemeral port range, which its VXLAN driver uses for outer source ports.
fn local_port_range() -> (u16, u16) {
    let parsed = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        });
    match parsed {
        // The kernel picks in [min, max): its formula excludes max.
        Some((min, max)) if min < max => (min, max),
        _ => (32768, 60999),
    }
}

impl Backend for EbpfVxlan {
    async fn prepare(&mut self) -> Result<LeaseAttrs> {
        self.kernel.prepare().await
    }

    async fn register(&mut self, own: &Lease) -> Result<()> {
        self.kernel.register(own).await?;
        let cfg = self.datapath_config();
        self.datapath
            .set_config(&cfg)
            .map_err(|e| Self::map_err("CONFIG", e))?;
        self.registered = true;
        let o = &self.options;
        let flow_cache = self.flow_cache();
        info!(vni = cfg.vni, port = cfg.port, local = %Ipv4Addr::from(cfg.local_ip), local6 = %std::net::Ipv6Addr::from(cfg.local_ip6), flow_cache, flow_refresh_ms = o.flow_refresh_ms, all_flows_fast_path = o.fast_path, peer_check = o.peer_check, "eBPF datapath enabled");
        if !o.peer_check {
            warn!(
                "--vxlan-peer-check=false: VXLAN from any address reaches the kernel VXLAN device, as with upstream flannel"
            );
        }
        if o.flow_cache && !flow_cache {
            warn!(
                "per-flow fast path off: the network uses VXLAN GBP, whose policy ids ride in skb marks the fast path would skip"
            );
        }
        if o.fast_path {
            warn!(
                "eBPF all-flows fast path on: traffic to local pods bypasses this host's routing and netfilter (kube-proxy, NetworkPolicy)"
            );
        }
        if flow_cache || o.fast_path {
            // The per-pod programs carry both families, so an IPv6-only host gets them
            // too; the all-flows fast path's endpoints are IPv4 pods only.
            tokio::spawn(pods::watch(
                pods::PodWatch {
                    layout: self.layout.clone(),
                    bridge: endpoints::BRIDGE.to_owned(),
                    endpoints: own.subnet.filter(|_| o.fast_path),
                },
                self.cancel.child_token(),
            ));
        }
        if flow_cache {
            spawn_flow_event_server(self.layout.clone(), self.cancel.child_token());
        }
        if o.peer_check {
            tokio::spawn(strangers::watch(
                self.layout.clone(),
                self.cancel.child_token(),
            ));
        }
        if !o.fast_path {
            // A previous run with the fast path may have left entries: they are inert
            // without the flag, but the map should say what is in effect.
            self.datapath
                .set_endpoints(&Default::default())
                .map_err(|e| Self::map_err("ENDPOINTS", e))?;
        }
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        self.kernel.add_peer(peer).await?;
        let entries = peer_entries(peer);
        if entries.is_empty() {
            warn!(subnet = %peer.subnets(), "peer not usable by the eBPF datapath; kernel path only");
        }
        // A family the lease no longer has a VXLAN half for (BackendV6Data gone) leaves
        // the maps, as it leaves the kernel device.
        if let Some(sn6) = peer.ipv6_subnet
            && !entries.iter().any(|e| e.subnet == IpNetwork::V6(sn6))
        {
            self.datapath
                .remove_peer(sn6.into())
                .map_err(|e| Self::map_err("remove peer", e))?;
        }
        for entry in &entries {
            self.datapath
                .upsert_peer(entry)
                .map_err(|e| Self::map_err("upsert peer", e))?;
        }
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<()> {
        // By subnet: etcd delete events carry no value, so the lease may lack the address.
        let subnets = peer
            .subnet
            .map(IpNetwork::from)
            .into_iter()
            .chain(peer.ipv6_subnet.map(IpNetwork::from));
        for subnet in subnets {
            self.datapath
                .remove_peer(subnet)
                .map_err(|e| Self::map_err("remove peer", e))?;
        }
        self.kernel.remove_peer(peer).await
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<()> {
        let fixes = self.check(peers).await?;
        debug!(
            peers = peers.len(),
            written = fixes.len(),
            "eBPF VXLAN state reconciled"
        );
        Ok(())
    }

    async fn resync(&mut self, peers: &[Lease]) -> Result<()> {
        for (kind, detail) in self.check(peers).await? {
            repair::record(kind, detail);
        }
        Ok(())
    }

    async fn readdress(&mut self, ext: &ExternalInterface, peers: &[Lease]) -> Result<()> {
        // The device first (re-created with its new local address), then CONFIG, whose
        // outer source address and device index come from it.
        self.kernel.set_external(ext);
        let fixes = self.check(peers).await?;
        debug!(written = fixes.len(), local = %ext.iface_addr, "eBPF datapath follows the new uplink address");
        Ok(())
    }

    fn mtu(&self) -> u32 {
        // Same as the kernel device: pods keep MTU − 50 so encapsulated TSO segments fit
        // the uplink (the programs use FIXED_GSO).
        self.kernel.mtu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::BackendAttrs;

    fn lease(v4: bool, v6_data: bool) -> Lease {
        Lease {
            subnet: v4.then(|| "10.244.2.0/24".parse().unwrap()),
            ipv6_subnet: Some("fd00:10:244:2::/64".parse().unwrap()),
            extra_senders: vec!["fd00:198::22".parse().unwrap()],
            attrs: crate::lease::LeaseAttrs {
                public_ip: "198.18.0.2".parse().unwrap(),
                public_ipv6: Some("fd00:198::2".parse().unwrap()),
                backend: BackendAttrs::parse(
                    "vxlan",
                    v4.then_some(r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:04"}"#),
                    v6_data.then_some(r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:06"}"#),
                )
                .unwrap(),
            },
        }
    }

    #[test]
    fn a_lease_gives_one_map_entry_per_family_it_has_a_vtep_for() {
        let dual = peer_entries(&lease(true, true));
        assert_eq!(dual.len(), 2, "{dual:?}");
        assert_eq!(dual[0].subnet.to_string(), "10.244.2.0/24");
        assert_eq!(dual[0].underlay.to_string(), "198.18.0.2");
        assert_eq!(dual[0].vtep_mac[5], 4);
        assert!(
            dual[0].aliases.is_empty(),
            "IPv6 senders are no IPv4 aliases"
        );
        assert_eq!(dual[1].subnet.to_string(), "fd00:10:244:2::/64");
        assert_eq!(dual[1].underlay.to_string(), "fd00:198::2");
        assert_eq!(dual[1].vtep_mac[5], 6);
        assert_eq!(
            dual[1].aliases,
            vec!["fd00:198::22".parse::<IpAddr>().unwrap()]
        );
        // An IPv6 subnet without BackendV6Data: a host without an IPv6 VTEP.
        assert_eq!(peer_entries(&lease(true, false)).len(), 1);
        // IPv6-only (kube mode): the IPv6 entry alone.
        let v6 = peer_entries(&lease(false, true));
        assert_eq!(v6.len(), 1, "{v6:?}");
        assert_eq!(v6[0].underlay.to_string(), "fd00:198::2");
    }

    #[test]
    fn peer_capacity_covers_every_subnet_of_the_network() {
        // 10.0.0.0/8 in /24s: 65,536 subnets.
        assert_eq!(peer_capacity(None, 8, 24), 65_536);
        // 10.244.0.0/16 in /24s has 256: the compiled default is the floor.
        assert_eq!(peer_capacity(None, 16, 24), 4096);
        // 10.0.0.0/8 in /28s would be a million: capped, the flag can go further.
        assert_eq!(peer_capacity(None, 8, 28), AUTO_MAX_PEERS);
        assert_eq!(peer_capacity(Some(1_000_000), 8, 28), 1_000_000);
        assert_eq!(peer_capacity(Some(10), 8, 24), 10);
    }
}

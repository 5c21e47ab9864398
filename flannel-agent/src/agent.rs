//! The start-up sequence and main loop of flanneld (upstream `main.go` `main()`):
//! subnet manager → network config → external interface → backend → lease → rules →
//! `subnet.env` → ready → watch peers and keep the lease alive until a signal.
//!
//! The command line becomes a checked [`Config`] before anything happens, and the network
//! configuration is checked against it ([`Config::plan`]) before the interface is chosen
//! or any device, pin or file is created: a refused configuration exits naming the flag or
//! field and leaves the host as it was. Later errors before the lease is taken end the
//! process too. On SIGINT/SIGTERM nothing is torn down (upstream semantics: a
//! restart is hitless because routes, neighbours and FDB entries stay).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    backend::{self, AnyBackend, Backend, ExternalInterface, Touched, vxlan::VtepMacs},
    cli::Cli,
    config::{self, Config, ManagerConfig, Plan},
    lease::{BackendAttrs, Lease, LeaseEvent, PeerChange, PeerSet},
    metrics,
    net::{blackhole::Blackholes, iface, masq, monitor, sockets, vxlan_guard},
    netconf::NetworkConfig,
    repair::{self, RepairKind},
    server::{self, DatapathStatus, Readiness},
    subnet::{
        self, SubnetManager,
        env_file::{self, SubnetEnv},
        etcd::{EtcdOptions, EtcdSubnetManager},
    },
};

/// Why flanneld stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The subnet manager could not be built or failed fatally.
    #[error("subnet manager: {0}")]
    Subnet(#[from] subnet::Error),
    /// The configuration (flags, or flags and net-conf together) is refused.
    #[error("invalid configuration: {0}")]
    Config(#[from] config::Error),
    /// No external interface.
    #[error("choosing the external interface: {0}")]
    Iface(#[from] iface::Error),
    /// The backend failed to start.
    #[error("backend {backend}: {source}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// Its error.
        source: backend::Error,
    },
    /// The health server could not listen.
    #[error(transparent)]
    Server(#[from] server::Error),
    /// Installing signal handlers failed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// Installing masquerade/forward rules failed.
    #[error("installing masquerade/forward rules: {0}")]
    Rules(#[from] masq::Error),
    /// The lease watch ended, which the managers never do on their own.
    #[error("the lease watch ended unexpectedly")]
    WatchEnded,
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Address-family and masquerade facts the rule installer needs; kept as plain data so the
/// traffic-rule implementation (iptables/nftables) is independent of the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficRules {
    /// Cluster IPv4 network.
    pub network: Option<ipnetwork::Ipv4Network>,
    /// Own IPv4 subnet.
    pub subnet: Option<ipnetwork::Ipv4Network>,
    /// Cluster IPv6 network.
    pub ipv6_network: Option<ipnetwork::Ipv6Network>,
    /// Own IPv6 subnet.
    pub ipv6_subnet: Option<ipnetwork::Ipv6Network>,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--ip-masq-fully-random-disable`.
    pub fully_random_disable: bool,
    /// `--iptables-forward-rules`.
    pub forward_rules: bool,
    /// `EnableNFTables`.
    pub nftables: bool,
    /// `--iptables-resync`.
    pub resync: Duration,
    /// `--ip-blackhole-route`.
    pub blackhole_route: bool,
    /// Previous run's network (for recycling stale masquerade rules).
    pub previous_network: Option<ipnetwork::Ipv4Network>,
}

/// Installs the masquerade/forward rules (`crate::net::masq`) of each enabled family and
/// keeps them in place in the background. Upstream exits when the first installation
/// fails, and so do we.
async fn install_traffic_rules(rules: &TrafficRules, cancel: &CancellationToken) -> Result<()> {
    if !rules.ip_masq && !rules.forward_rules {
        return Ok(());
    }
    if let (Some(network), Some(subnet)) = (rules.network, rules.subnet) {
        install_family_rules(rules, network, subnet, cancel).await?;
    }
    if let (Some(network), Some(subnet)) = (rules.ipv6_network, rules.ipv6_subnet) {
        install_family_rules(rules, network, subnet, cancel).await?;
    }
    Ok(())
}

async fn install_family_rules<N: masq::RuleFamily>(
    rules: &TrafficRules,
    network: N,
    subnet: N,
    cancel: &CancellationToken,
) -> Result<()> {
    let cfg = masq::MasqConfig {
        network,
        subnet,
        fully_random: !rules.fully_random_disable,
        nftables: rules.nftables,
    };
    masq::install(&cfg, rules.ip_masq, rules.forward_rules).await?;
    tokio::spawn(masq::resync_loop(
        cfg,
        rules.ip_masq,
        rules.forward_rules,
        rules.resync,
        cancel.child_token(),
    ));
    Ok(())
}

/// Runs flanneld until a signal (Ok) or a fatal error. The command line is checked into a
/// [`Config`] first, before anything else happens.
pub async fn run(cli: Cli) -> Result<()> {
    let config = Config::from_cli(&cli, env_file::read_previous(&cli.subnet_file))?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        subnet_manager = config.manager_name(),
        dataplane = ?config.dataplane,
        "starting flanneld"
    );
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone())?;
    let ready = Readiness::default();
    let server = match config.healthz {
        Some(addr) => Some(server::start(addr, ready.clone(), cancel.child_token()).await?),
        None => None,
    };
    let result = match &config.manager {
        ManagerConfig::Kube(kube) => run_kube(&config, kube, &ready, &cancel).await,
        ManagerConfig::Etcd(etcd) => run_etcd(&config, etcd, &ready, &cancel).await,
    };
    cancel.cancel();
    if let Some((_, task)) = server {
        // Upstream gives the health server a 3 s grace period.
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    if result.is_ok() {
        info!("Exiting cleanly...");
    }
    result
}

async fn run_etcd(
    config: &Config,
    opts: &EtcdOptions,
    ready: &Readiness,
    cancel: &CancellationToken,
) -> Result<()> {
    // Upstream's client blocks while etcd is unreachable; retry likewise (with auth, the
    // client authenticates while connecting, so an outage shows up here).
    let mgr = loop {
        let res = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = EtcdSubnetManager::connect(opts.clone()) => r,
        };
        match res {
            Ok(m) => break m,
            Err(e) if e.is_transient() => {
                warn!(error = %e, "connecting to etcd failed; retrying in 1s");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => return Err(subnet::Error::from(e).into()),
        }
    };
    let public = (config.interface.public_ip, config.interface.public_ipv6);
    run_with(&mgr, config, public, ready, cancel).await
}

async fn run_kube(
    config: &Config,
    kube: &config::KubeConfig,
    ready: &Readiness,
    cancel: &CancellationToken,
) -> Result<()> {
    use crate::subnet::kube::KubeSubnetManager;
    let mgr = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        m = KubeSubnetManager::from_flags(&kube.client, &kube.net_config_path, &kube.annotation_prefix) => {
            m.map_err(subnet::Error::from)?
        }
    }
    .set_node_network_unavailable(kube.set_node_network_unavailable);
    // The node-public-ip(v6) annotations replace the flags (upstream).
    let public = (
        mgr.node_public_ip().or(config.interface.public_ip),
        mgr.node_public_ipv6().or(config.interface.public_ipv6),
    );
    run_with(&mgr, config, public, ready, cancel).await
}

/// Fetches the network config, retrying every second while the store is unreachable or the
/// config is absent (upstream blocks the same way); an invalid config is fatal.
async fn fetch_config<M: SubnetManager>(
    mgr: &M,
    cancel: &CancellationToken,
) -> Result<Option<NetworkConfig>> {
    loop {
        let res = tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            r = mgr.network_config() => r,
        };
        match res {
            Ok(cfg) => return Ok(Some(cfg)),
            Err(e) if e.is_transient() => {
                metrics::get().datastore_error("get_network_config");
                warn!(error = %e, "could not fetch the network config; retrying in 1s");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Builds the planned backend.
async fn build_backend(
    plan: Plan,
    ext: &ExternalInterface,
    config: &Config,
    net: &NetworkConfig,
    ready: &Readiness,
    cancel: &CancellationToken,
    vtep_macs: VtepMacs,
) -> Result<AnyBackend> {
    let err = |backend| move |source| Error::Backend { backend, source };
    let mut pins = config.ebpf.clone();
    pins.vtep_macs = vtep_macs;
    // The maps hold every subnet the network has room for, unless the flag says otherwise;
    // with dual stack each peer has an entry per family.
    pins.max_peers = Some(match config.ebpf.max_peers {
        Some(n) => n.max(1),
        None => {
            let v4 = net.network.filter(|_| net.enable_ipv4).map_or(0, |n| {
                backend::ebpf::peer_capacity(None, n.prefix(), net.subnet_len)
            });
            let v6 = net.ipv6_network.filter(|_| net.enable_ipv6).map_or(0, |n| {
                backend::ebpf::peer_capacity(None, n.prefix(), net.ipv6_subnet_len)
            });
            (v4 + v6).max(flannel_common::names::DEFAULT_PEER_CAPACITY)
        }
    });
    // The kernel datapath keeps upstream's behaviour (VXLAN from anyone) unless asked.
    let kernel_vxlan = |vx| async move {
        let mut b = backend::vxlan::KernelVxlan::with_vtep_macs(ext.clone(), vx, vtep_macs).await?;
        if config.vxlan_peer_check == Some(true) {
            b.enable_peer_guard();
        }
        Ok::<_, backend::Error>(b)
    };
    let (backend, status) = match plan {
        Plan::HostGw => (
            AnyBackend::HostGw(
                backend::hostgw::HostGw::new(ext.clone())
                    .await
                    .map_err(err("host-gw"))?,
            ),
            DatapathStatus::HostGw,
        ),
        Plan::Kernel(vx) => (
            AnyBackend::Vxlan(Box::new(kernel_vxlan(vx).await.map_err(err("vxlan"))?)),
            DatapathStatus::Kernel,
        ),
        Plan::Ebpf(vx) => (
            AnyBackend::Ebpf(Box::new(
                backend::ebpf::EbpfVxlan::new(ext.clone(), vx, pins, cancel.child_token())
                    .await
                    .map_err(err("ebpf-vxlan"))?,
            )),
            DatapathStatus::Ebpf,
        ),
        Plan::EbpfOrKernel(vx) => {
            match backend::ebpf::EbpfVxlan::new(ext.clone(), vx.clone(), pins, cancel.child_token())
                .await
            {
                Ok(b) => {
                    info!("using the eBPF VXLAN datapath");
                    (AnyBackend::Ebpf(Box::new(b)), DatapathStatus::Ebpf)
                }
                Err(backend::Error::Ebpf(reason)) => {
                    warn!(%reason, fallback = reason.kind(),
                          "eBPF VXLAN datapath unavailable; falling back to the kernel VXLAN datapath");
                    let kernel = kernel_vxlan(vx).await.map_err(err("vxlan"))?;
                    (
                        AnyBackend::Vxlan(Box::new(kernel)),
                        DatapathStatus::KernelFallback(reason),
                    )
                }
                Err(other) => return Err(err("ebpf-vxlan")(other)),
            }
        }
    };
    let (mode, fallback, maps) = match &status {
        DatapathStatus::Ebpf => (
            "ebpf-vxlan",
            "",
            Some(backend::ebpf::PinLayout::new(&config.ebpf.pin_root)),
        ),
        DatapathStatus::Kernel => ("vxlan", "", None),
        DatapathStatus::KernelFallback(reason) => ("vxlan", reason.kind(), None),
        DatapathStatus::HostGw => ("host-gw", "", None),
    };
    metrics::get().set_datapath(mode, fallback, maps);
    ready.set_datapath(status);
    Ok(backend)
}

/// The VTEP MAC of the lease this host published before (found by its public IP), so a
/// re-created `flannel.<VNI>` — after a reboot, or deleted while the agent was down — keeps
/// the MAC every peer holds. Best effort: without it (first start, store unreachable) the
/// device keeps its own MAC or gets a random one.
async fn previous_vtep_macs<M: SubnetManager>(mgr: &M, public_ip: Ipv4Addr) -> VtepMacs {
    let found = tokio::time::timeout(Duration::from_secs(5), mgr.previous_lease(public_ip)).await;
    let lease = match found {
        Ok(Ok(Some(lease))) => lease,
        Ok(Ok(None)) => return VtepMacs::default(),
        Ok(Err(error)) => {
            warn!(%error, "could not read this host's previous lease; the VTEP MAC may change");
            return VtepMacs::default();
        }
        Err(_) => {
            warn!("reading this host's previous lease timed out; the VTEP MAC may change");
            return VtepMacs::default();
        }
    };
    match &lease.attrs.backend {
        BackendAttrs::Vxlan { v4, v6 } => {
            let macs = VtepMacs {
                v4: v4.map(|d| d.vtep_mac),
                v6: v6.map(|d| d.vtep_mac),
            };
            info!(subnet = %lease.subnets(), ?macs, "reusing the VTEP MAC of this host's previous lease");
            macs
        }
        _ => VtepMacs::default(),
    }
}

/// Acquires the lease, retrying transient store errors every second.
async fn acquire<M: SubnetManager>(
    mgr: &M,
    attrs: &crate::lease::LeaseAttrs,
    cancel: &CancellationToken,
) -> Result<Option<Lease>> {
    loop {
        let res = tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            r = mgr.acquire_lease(attrs) => r,
        };
        match res {
            Ok(lease) => return Ok(Some(lease)),
            Err(e) if e.is_transient() => {
                metrics::get().lease_acquisition_failures.inc();
                metrics::get().datastore_error("acquire_lease");
                warn!(error = %e, "acquiring a lease failed; retrying in 1s")
            }
            Err(e) => {
                metrics::get().lease_acquisition_failures.inc();
                return Err(e.into());
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn warn_without_br_netfilter(cfg: &NetworkConfig) {
    if cfg.enable_nftables {
        return;
    }
    let checks = [
        (
            cfg.enable_ipv4,
            "/proc/sys/net/bridge/bridge-nf-call-iptables",
        ),
        (
            cfg.enable_ipv6,
            "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
        ),
    ];
    for (enabled, path) in checks {
        if enabled && !Path::new(path).exists() {
            warn!(%path, "br_netfilter is not loaded; bridged pod traffic bypasses iptables (upstream refuses to start here)");
        }
    }
}

/// Everything after the subnet manager exists.
async fn run_with<M: SubnetManager>(
    mgr: &M,
    config: &Config,
    public: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    ready: &Readiness,
    cancel: &CancellationToken,
) -> Result<()> {
    let Some(cfg) = fetch_config(mgr, cancel).await? else {
        return Ok(());
    };
    // Everything is checked before the first side effect (interface lookup is read-only;
    // the backend creates devices and pins).
    let plan = config.plan(&cfg)?;
    info!(network = ?cfg.network, ipv6_network = ?cfg.ipv6_network, backend = cfg.backend.type_name(), "network config");
    warn_without_br_netfilter(&cfg);

    let selector = iface::Selector {
        public_ip: public.0,
        public_ipv6: public.1,
        ipv4: cfg.enable_ipv4,
        ipv6: cfg.enable_ipv6,
        ..config.interface.clone()
    };
    let ext = iface::lookup(&selector).await?;
    let vtep_macs = previous_vtep_macs(mgr, ext.public_ip).await;
    let mut backend = build_backend(plan, &ext, config, &cfg, ready, cancel, vtep_macs).await?;
    if let Some(ipv6) = backend.peer_guard() {
        // What the guard drops is named by source, once, like the eBPF check's strangers.
        tokio::spawn(vxlan_guard::name_strangers(ipv6, cancel.child_token()));
    }
    let backend_name = cfg.backend.type_name();
    let attrs = backend.prepare().await.map_err(|source| Error::Backend {
        backend: backend_name,
        source,
    })?;
    let Some(lease) = acquire(mgr, &attrs, cancel).await? else {
        return Ok(());
    };
    metrics::get().set_lease(
        lease.subnet,
        lease.ipv6_subnet.map(|s| s.to_string()),
        lease.attrs.public_ip,
    );
    backend
        .register(&lease)
        .await
        .map_err(|source| Error::Backend {
            backend: backend_name,
            source,
        })?;

    let previous = env_file::read_previous(&config.subnet_file);
    let rules = TrafficRules {
        network: cfg.network.filter(|_| cfg.enable_ipv4),
        subnet: lease.subnet.filter(|_| cfg.enable_ipv4),
        ipv6_network: cfg.ipv6_network.filter(|_| cfg.enable_ipv6),
        ipv6_subnet: lease.ipv6_subnet.filter(|_| cfg.enable_ipv6),
        ip_masq: config.traffic.ip_masq,
        fully_random_disable: config.traffic.fully_random_disable,
        forward_rules: config.traffic.forward_rules,
        nftables: cfg.enable_nftables,
        resync: config.traffic.resync,
        blackhole_route: config.traffic.blackhole_route,
        previous_network: previous.network,
    };
    install_traffic_rules(&rules, cancel).await?;
    let blackhole = (
        rules.subnet.filter(|_| rules.blackhole_route),
        rules.ipv6_subnet.filter(|_| rules.blackhole_route),
    );

    let env = SubnetEnv {
        networks: rules.network.into_iter().collect(),
        subnet: rules.subnet,
        ipv6_networks: rules.ipv6_network.into_iter().collect(),
        ipv6_subnet: rules.ipv6_subnet,
        mtu: Some(backend.mtu()),
        ip_masq: Some(config.traffic.ip_masq),
    };
    match env_file::write(&config.subnet_file, &env) {
        Ok(()) => {
            info!(path = %config.subnet_file.display(), subnet = %lease.subnets(), mtu = backend.mtu(), "wrote subnet.env");
            ready.mark_ready();
            sd_notify_ready();
        }
        // Upstream keeps running but never becomes ready.
        Err(error) => error!(%error, "failed to write subnet.env; staying not ready"),
    }

    // What the control plane spends on the datapath (reconciles, per-event latency).
    let stats = backend::Stats::default();
    // The lease as published now: it changes when the uplink's address does (see
    // `Uplink`), and the renewal must then keep the new one alive, not the old.
    let (own_tx, mut own_rx) = tokio::sync::watch::channel(lease.clone());
    let uplink = Uplink {
        // Upstream semantics: without --public-ip (or node-public-ip), the public IP is
        // the interface's address, whatever it is now.
        follow: public.0.is_none(),
        selector,
        ext,
        own_tx,
    };
    let peers = watch_peers(mgr, &mut backend, lease, uplink, blackhole, &stats, cancel);
    tokio::pin!(peers);
    loop {
        let current = own_rx.borrow_and_update().clone();
        let renewal = cancel.child_token();
        let ended = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            r = mgr.complete_lease(&current, renewal.clone()) => Some(r),
            r = &mut peers => return r,
            Ok(()) = own_rx.changed() => None,
        };
        renewal.cancel();
        match ended {
            // The lease changed: keep the new one alive from now on.
            None => continue,
            Some(Ok(())) => return Ok(()),
            Some(Err(error)) => {
                // Upstream: "Lease has been revoked. Shutting down daemon." and exit 0, so a
                // restart re-acquires (preferring the same subnet via subnet.env).
                error!(%error, "lease lost; shutting down");
                return Ok(());
            }
        }
    }
}

/// The uplink as the main loop follows it: how to look it up again, what it was last
/// time, and where a lease changed by a new address is announced.
struct Uplink {
    /// Whether the published address follows the interface's (no explicit public IP).
    follow: bool,
    selector: iface::Selector,
    ext: ExternalInterface,
    own_tx: tokio::sync::watch::Sender<Lease>,
}

impl Uplink {
    /// The uplink now, when its addresses differ from what the agent uses (and it is
    /// still the same interface); `None` when nothing is to be done.
    async fn moved(&self) -> Option<ExternalInterface> {
        if !self.follow {
            return None;
        }
        let now = match iface::lookup_quiet(&self.selector).await {
            Ok(now) => now,
            Err(error) => {
                // Between the old address going and the new one coming, say.
                debug!(%error, uplink = %self.ext.name, "uplink has no usable address right now; keeping the current one");
                return None;
            }
        };
        if now.index != self.ext.index {
            warn!(uplink = %self.ext.name, now = %now.name, "another interface matches the uplink selection now; restart flanneld to move to it");
            return None;
        }
        let addrs =
            |e: &ExternalInterface| (e.iface_addr, e.public_ip, e.iface_addr6, e.public_ipv6);
        (addrs(&now) != addrs(&self.ext)).then_some(now)
    }
}

/// How long after a failed backend operation the full peer set is resynced again.
const REPAIR_DELAY: Duration = Duration::from_secs(5);

/// How often everything the agent owns is compared with the kernel even without a
/// netlink event (upstream re-checks host-gw routes and re-creates the vxlan device on
/// this period too). Catches what the monitor does not report: replaced (not deleted)
/// entries, removed eBPF pins and links, a missed burst of events.
const RESYNC_PERIOD: Duration = Duration::from_secs(10);

/// How long a netlink event waits for the rest of its burst (`ip link del flannel.1`
/// reports the link, its address, routes and neighbours at once): one resync for all.
const RESYNC_DEBOUNCE: Duration = Duration::from_millis(100);

/// Feeds lease events through a [`PeerSet`] into the backend, and keeps what the agent
/// owns in place: a resync of the backend (and the blackhole route) runs when the netlink
/// monitor reports a change to owned state, every [`RESYNC_PERIOD`], and
/// [`REPAIR_DELAY`] after a failed backend operation, until it succeeds. A backend error
/// for one peer is logged and does not stop the loop.
async fn watch_peers<M: SubnetManager>(
    mgr: &M,
    backend: &mut AnyBackend,
    mut own: Lease,
    mut uplink: Uplink,
    blackhole: (
        Option<ipnetwork::Ipv4Network>,
        Option<ipnetwork::Ipv6Network>,
    ),
    stats: &backend::Stats,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut peers = PeerSet::new(own.id());
    let mut events = mgr.watch_leases();
    let (trigger_tx, mut triggers) = tokio::sync::mpsc::channel(16);
    let pins = backend.pin_paths();
    if !pins.is_empty() {
        tokio::spawn(monitor::watch_pins(
            pins,
            trigger_tx.clone(),
            cancel.child_token(),
        ));
    }
    if backend.peer_guard().is_some() {
        tokio::spawn(vxlan_guard::watch_chain(
            trigger_tx.clone(),
            cancel.child_token(),
        ));
    }
    tokio::spawn(monitor::run(
        monitor::Watched {
            devices: backend.device_names(),
            uplink: uplink.ext.index,
        },
        trigger_tx,
        cancel.child_token(),
    ));
    let blackhole = match Blackholes::new(blackhole.0, blackhole.1) {
        Ok(Some(b)) => {
            for (subnet, r) in b.ensure_all().await {
                if let Err(error) = r {
                    warn!(%subnet, %error, "adding the blackhole route failed; retrying on resync");
                }
            }
            Some(b)
        }
        Ok(None) => None,
        Err(error) => {
            warn!(%error, "blackhole route: no netlink");
            None
        }
    };
    let start = tokio::time::Instant::now();
    let mut periodic = tokio::time::interval_at(start + RESYNC_PERIOD, RESYNC_PERIOD);
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync_at: Option<tokio::time::Instant> = None;
    // Set while our own lease is known to be wrong in the store and restoring it failed:
    // retried with every resync.
    let mut restore_pending = false;
    // Set by an address event on the uplink: the next resync first checks whether the
    // address the agent sends from and publishes has to follow.
    let mut uplink_changed = false;
    let mut snapshots = 0u64;
    // A resync whose kernel reads run as their own task (see `Reading`).
    let mut reading: Option<Reading> = None;
    let schedule = |at: &mut Option<tokio::time::Instant>, delay: Duration| {
        let when = tokio::time::Instant::now() + delay;
        *at = Some(at.map_or(when, |t| t.min(when)));
    };
    loop {
        let event = tokio::select! {
            ev = events.next() => match ev {
                None => return Err(Error::WatchEnded),
                Some(Err(error)) => {
                    metrics::get().datastore_error("watch_leases");
                    warn!(%error, "lease watch error");
                    continue;
                }
                Some(Ok(e)) => e,
            },
            Some(trigger) = triggers.recv() => {
                match trigger {
                    monitor::Trigger::Kernel(why) => debug!(%why, "owned kernel state changed; resyncing"),
                    monitor::Trigger::UplinkAddress => {
                        debug!(uplink = %uplink.ext.name, "uplink addresses changed");
                        uplink_changed = true;
                    }
                }
                schedule(&mut resync_at, RESYNC_DEBOUNCE);
                continue;
            }
            _ = periodic.tick() => {
                schedule(&mut resync_at, Duration::ZERO);
                continue;
            }
            () = sleep_until_opt(resync_at), if reading.is_none() => {
                resync_at = None;
                if std::mem::take(&mut uplink_changed)
                    && let Some(now) = uplink.moved().await
                {
                    restore_pending |= !follow_uplink(mgr, backend, &peers, &mut uplink, &mut own, now).await;
                }
                if restore_pending {
                    restore_pending = !restore_own_lease(mgr, &mut own).await;
                }
                match backend.resync_reader() {
                    Some(read) => {
                        reading = Some(Reading {
                            task: tokio::spawn(read),
                            touched: Touched::default(),
                            started: std::time::Instant::now(),
                        });
                    }
                    None => {
                        if let Err(error) = resync(backend, &peers, blackhole.as_ref(), stats).await {
                            warn!(%error, retry_in = ?REPAIR_DELAY, "resync failed");
                            schedule(&mut resync_at, REPAIR_DELAY);
                        }
                    }
                }
                if restore_pending {
                    schedule(&mut resync_at, REPAIR_DELAY);
                }
                continue;
            }
            read = async { (&mut reading.as_mut().expect("branch enabled only while reading").task).await },
                if reading.is_some() =>
            {
                let Reading { touched, started, .. } = reading.take().expect("branch enabled only while reading");
                let read = read
                    .map_err(|e| backend::Error::Other(format!("resync read task: {e}")))
                    .and_then(|r| r);
                if let Err(error) = finish_resync(backend, &peers, read, &touched, started, blackhole.as_ref(), stats).await {
                    warn!(%error, retry_in = ?REPAIR_DELAY, "resync failed");
                    schedule(&mut resync_at, REPAIR_DELAY);
                }
                continue;
            }
        };
        if let Some(what) = own_lease_tampering(&event, &own) {
            error!(subnet = %own.subnets(), public_ip = %own.attrs.public_ip, public_ipv6 = ?own.attrs.public_ipv6,
                   "own lease was {what}; every host would route this subnet elsewhere; restoring it");
            restore_pending = !restore_own_lease(mgr, &mut own).await;
            if restore_pending {
                schedule(&mut resync_at, REPAIR_DELAY);
            }
        }
        if matches!(event, LeaseEvent::Snapshot(_)) {
            // Every snapshot after the first is the watch starting over.
            if snapshots > 0 {
                metrics::get().watch_restarts.inc();
            }
            snapshots += 1;
        }
        let snapshot = matches!(event, LeaseEvent::Snapshot(_));
        let failed = apply_event(
            &mut peers,
            backend,
            event,
            stats,
            reading.as_mut().map(|r| &mut r.touched),
        )
        .await;
        if snapshot && let Some(r) = reading.take() {
            // The reconcile compared everything itself; the reads predate it. Resync
            // afterwards all the same, so nothing a resync would repair waits a period.
            r.task.abort();
            schedule(&mut resync_at, Duration::ZERO);
        }
        stats.set_peers(peers.len());
        // While a repair is pending the programmed count keeps its last value.
        metrics::get().set_peers(peers.len(), !failed && resync_at.is_none());
        if failed {
            schedule(&mut resync_at, REPAIR_DELAY);
        }
        debug!(peers = peers.len(), "peer set updated");
    }
}

/// The uplink's address changed to `now`'s: the backend sends from it (VXLAN local
/// address, eBPF outer source), and the lease names it, published at once and kept alive
/// from now on. `false` when publishing failed (retried with the next resyncs).
async fn follow_uplink<M: SubnetManager>(
    mgr: &M,
    backend: &mut AnyBackend,
    peers: &PeerSet,
    uplink: &mut Uplink,
    own: &mut Lease,
    now: ExternalInterface,
) -> bool {
    let started = std::time::Instant::now();
    info!(uplink = %now.name, from = %uplink.ext.iface_addr, to = %now.iface_addr,
          public_ip = %now.public_ip, "uplink address changed; following it without a restart");
    if let Err(error) = backend.readdress(&now, &peers.peers()).await {
        // The periodic resync retries the devices; the lease must follow regardless.
        warn!(%error, "moving the datapath to the new uplink address failed; retrying on resync");
    }
    // Our connections from the old address (API server, etcd) are dead without knowing
    // it: end them, so the lease update below and every watch go out from the new one.
    for (old, new) in [
        (
            IpAddr::from(uplink.ext.iface_addr),
            IpAddr::from(now.iface_addr),
        ),
        (
            uplink
                .ext
                .iface_addr6
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::from),
            now.iface_addr6
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::from),
        ),
    ] {
        if old != new && !old.is_unspecified() {
            sockets::shut_down_tcp_from(old);
        }
    }
    own.attrs.public_ip = now.public_ip;
    if own.attrs.public_ipv6.is_some() {
        own.attrs.public_ipv6 = now.public_ipv6;
    }
    uplink.ext = now;
    let published = match mgr.restore_lease(own).await {
        Ok(published) => {
            // As peers read it (a kube node's public-ip-overwrite still applies).
            *own = published;
            info!(subnet = %own.subnets(), public_ip = %own.attrs.public_ip, public_ipv6 = ?own.attrs.public_ipv6, took = ?started.elapsed(),
                  "lease now names the new address");
            true
        }
        Err(error) => {
            warn!(subnet = %own.subnets(), %error, retry_in = ?REPAIR_DELAY, "publishing the new address failed");
            false
        }
    };
    uplink.own_tx.send_replace(own.clone());
    metrics::get().set_lease(
        own.subnet,
        own.ipv6_subnet.map(|s| s.to_string()),
        own.attrs.public_ip,
    );
    published
}

/// How `event` shows this host's own lease changed by someone else, if it does: deleted
/// (or expired), missing from a snapshot, or overwritten with other attributes (another
/// `PublicIP` or `VtepMAC`: a hijack, or another host misconfigured onto our subnet).
fn own_lease_tampering(event: &LeaseEvent, own: &Lease) -> Option<String> {
    let overwritten = |l: &Lease| {
        (l.attrs != own.attrs).then(|| {
            format!(
                "overwritten with PublicIP {} ({})",
                l.attrs.public_ip,
                truncated(&l.attrs.to_json(), 160)
            )
        })
    };
    match event {
        LeaseEvent::Added(l) if l.same_subnet(own) => overwritten(l),
        LeaseEvent::Removed(l) if l.same_subnet(own) => Some("deleted".into()),
        LeaseEvent::Snapshot(all) => match all.iter().find(|l| l.same_subnet(own)) {
            Some(l) => overwritten(l),
            None => Some("missing from the store".into()),
        },
        _ => None,
    }
}

/// At most `max` characters of `s`, marked when cut (other hosts' data goes into our log).
fn truncated(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} bytes)", &s[..i], s.len()),
        None => s.to_owned(),
    }
}

/// Put our lease back in the store (`own` becomes the lease as published); whether it
/// worked (a failure is retried on resync).
async fn restore_own_lease<M: SubnetManager>(mgr: &M, own: &mut Lease) -> bool {
    match mgr.restore_lease(own).await {
        Ok(published) => {
            *own = published;
            repair::record(
                RepairKind::Lease,
                format!(
                    "own lease {} restored (PublicIP {})",
                    own.subnets(),
                    own.attrs.public_ip
                ),
            );
            true
        }
        Err(error) => {
            error!(subnet = %own.subnets(), %error, retry_in = ?REPAIR_DELAY, "restoring own lease failed");
            false
        }
    }
}

/// A resync whose kernel reads (thousands of neighbours, FDB entries, routes at cluster
/// scale) run as their own task: lease events are applied meanwhile instead of waiting,
/// and the subnets they touch are left alone by the comparison that follows, since the
/// reads may predate them (the next resync checks them).
struct Reading {
    task: tokio::task::JoinHandle<backend::Result<backend::ResyncRead>>,
    touched: Touched,
    started: std::time::Instant,
}

/// One resync: the backend checks and repairs everything it owns, then the blackhole route.
async fn resync(
    backend: &mut AnyBackend,
    peers: &PeerSet,
    blackhole: Option<&Blackholes>,
    stats: &backend::Stats,
) -> std::result::Result<(), String> {
    let started = std::time::Instant::now();
    let result = backend.resync(&peers.peers()).await;
    resynced(result, started, peers, blackhole, stats).await
}

/// The second half of a resync begun with [`AnyBackend::resync_reader`]: compare with what
/// was read and repair, then the blackhole route.
async fn finish_resync(
    backend: &mut AnyBackend,
    peers: &PeerSet,
    read: backend::Result<backend::ResyncRead>,
    touched: &Touched,
    started: std::time::Instant,
    blackhole: Option<&Blackholes>,
    stats: &backend::Stats,
) -> std::result::Result<(), String> {
    let result = match read {
        Ok(read) => backend.resync_with(&peers.peers(), read, touched).await,
        Err(e) => Err(e),
    };
    resynced(result, started, peers, blackhole, stats).await
}

/// What every resync ends with: its duration in the stats, then the blackhole route.
async fn resynced(
    result: backend::Result<()>,
    started: std::time::Instant,
    peers: &PeerSet,
    blackhole: Option<&Blackholes>,
    stats: &backend::Stats,
) -> std::result::Result<(), String> {
    let result = result.map_err(|e| e.to_string());
    stats.reconciled(started.elapsed(), result.is_ok());
    for (subnet, r) in match blackhole {
        Some(b) => b.ensure_all().await,
        None => Vec::new(),
    } {
        match r {
            Ok(true) => repair::record(RepairKind::BlackholeRoute, format!("blackhole {subnet}")),
            Ok(false) => {}
            Err(error) => warn!(%subnet, %error, "ensuring the blackhole route failed"),
        }
    }
    debug!(peers = peers.len(), took = ?started.elapsed(), "resync done");
    result
}

/// Sleeps until `at`, or forever when there is nothing scheduled.
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Applies one lease event to the peer set and the backend; `true` if the backend failed.
/// A snapshot reconciles the whole set; every other event is applied as its difference.
/// With a resync reading, the subnets changed go into `touched`.
async fn apply_event(
    peers: &mut PeerSet,
    backend: &mut AnyBackend,
    event: LeaseEvent,
    stats: &backend::Stats,
    touched: Option<&mut Touched>,
) -> bool {
    let started = std::time::Instant::now();
    let snapshot = matches!(event, LeaseEvent::Snapshot(_));
    let changes = peers.apply(event);
    if snapshot {
        info!(
            peers = peers.len(),
            changed = changes.len(),
            "lease snapshot; reconciling"
        );
        let result = backend.reconcile(&peers.peers()).await;
        stats.reconciled(started.elapsed(), result.is_ok());
        info!(peers = peers.len(), took = ?started.elapsed(), ok = result.is_ok(), "peers reconciled");
        return match result {
            Ok(()) => false,
            Err(error) => {
                warn!(%error, "reconciling peers failed");
                true
            }
        };
    }
    if changes.is_empty() {
        return false;
    }
    if let Some(touched) = touched {
        for change in &changes {
            let (PeerChange::Add(l) | PeerChange::Remove(l)) = change;
            touched.add(l);
        }
    }
    let failed = apply_changes(backend, changes).await;
    stats.event(started.elapsed(), !failed);
    failed
}

/// Applies single peer changes; `true` if any failed.
async fn apply_changes(backend: &mut AnyBackend, changes: Vec<PeerChange>) -> bool {
    let mut failed = false;
    for change in changes {
        match change {
            PeerChange::Add(l) => {
                info!(subnet = %l.subnets(), public_ip = %l.attrs.public_ip, public_ipv6 = ?l.attrs.public_ipv6, "peer added");
                if let Err(error) = backend.add_peer(&l).await {
                    warn!(subnet = %l.subnets(), %error, "programming peer failed");
                    failed = true;
                }
            }
            PeerChange::Remove(l) => {
                info!(subnet = %l.subnets(), public_ip = %l.attrs.public_ip, public_ipv6 = ?l.attrs.public_ipv6, "peer removed");
                if let Err(error) = backend.remove_peer(&l).await {
                    warn!(subnet = %l.subnets(), %error, "removing peer failed");
                    failed = true;
                }
            }
        }
    }
    failed
}

fn spawn_signal_handler(cancel: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => info!("received SIGINT; shutting down"),
            _ = term.recv() => info!("received SIGTERM; shutting down"),
        }
        cancel.cancel();
    });
    Ok(())
}

/// Tells systemd the service is up (`Type=notify` units; upstream's `sd_notify READY=1`).
/// Best effort: no `NOTIFY_SOCKET`, no message.
fn sd_notify_ready() {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        sd_notify_to(path.as_ref());
    }
}

/// Sends `READY=1` to a notify socket path (`@name` = abstract namespace).
fn sd_notify_to(path: &std::path::Path) {
    use std::os::{linux::net::SocketAddrExt, unix::net::UnixDatagram};
    let sent = UnixDatagram::unbound().and_then(|sock| {
        match path.as_os_str().as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(b"READY=1", &addr)
            }
            None => sock.send_to(b"READY=1", path),
        }
    });
    if let Err(error) = sent {
        warn!(path = %path.display(), %error, "sd_notify READY=1 failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_notify_sends_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sd_notify_to(&path);
        let mut buf = [0u8; 16];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}

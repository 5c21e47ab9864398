//! Backends: how pod traffic reaches other hosts. One trait, three implementations:
//! `ebpf-vxlan` (our programs on top of a fully programmed kernel VXLAN device), `vxlan`
//! (the kernel device alone, exactly like upstream) and `host-gw` (plain routes).

use std::{
    collections::BTreeSet,
    future::Future,
    net::{Ipv4Addr, Ipv6Addr},
    pin::Pin,
};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::{
    lease::{Lease, LeaseAttrs},
    repair,
};

pub mod ebpf;
pub mod hostgw;
pub mod stats;
pub mod vxlan;

pub use stats::Stats;

/// The interface pod traffic leaves the host through, and the addresses peers use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalInterface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// The interface's IPv4 address (VXLAN local address).
    pub iface_addr: Ipv4Addr,
    /// The IPv4 address published to peers (`--public-ip`, else `iface_addr`).
    pub public_ip: Ipv4Addr,
    /// The interface's IPv6 address, when IPv6 is enabled.
    pub iface_addr6: Option<Ipv6Addr>,
    /// The IPv6 address published to peers.
    pub public_ipv6: Option<Ipv6Addr>,
    /// Interface MTU.
    pub mtu: u32,
}

impl ExternalInterface {
    /// The uplink's own address of family `N` (the VXLAN local address).
    pub fn local<N: crate::net::netlink::NlFamily>(&self) -> Option<N::Addr> {
        // 0.0.0.0: IPv4 is not in use (an IPv6-only network).
        let v4 = Some(self.iface_addr).filter(|a| !a.is_unspecified());
        v4.and_then(|a| N::of_ip(a.into()))
            .or_else(|| self.iface_addr6.and_then(|a| N::of_ip(a.into())))
    }
}

/// Errors of the backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
    /// The kernel VXLAN backend failed.
    #[error(transparent)]
    Vxlan(#[from] vxlan::Error),
    /// The host-gw backend failed.
    #[error(transparent)]
    HostGw(#[from] hostgw::Error),
    /// The eBPF datapath cannot run here (the agent falls back or exits on it).
    #[error("eBPF datapath unavailable: {0}")]
    Ebpf(ebpf::FallbackReason),
}

/// Result of backend operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A datapath that carries pod traffic to peers. Every method is idempotent: the agent may
/// call any of them again after a restart or a missed event, and the kernel state must end
/// up the same.
pub trait Backend: Send {
    /// Create what must exist before leasing (devices) and return the attributes to publish
    /// (backend type and data, public IPs).
    fn prepare(&mut self) -> impl Future<Output = Result<LeaseAttrs>> + Send;

    /// Finish set-up once this host's lease is known (device addresses).
    fn register(&mut self, own: &Lease) -> impl Future<Output = Result<()>> + Send;

    /// Program one peer (added or changed).
    fn add_peer(&mut self, peer: &Lease) -> impl Future<Output = Result<()>> + Send;

    /// Remove one peer.
    fn remove_peer(&mut self, peer: &Lease) -> impl Future<Output = Result<()>> + Send;

    /// Make the datapath equal the full peer set (own lease excluded): add what is missing,
    /// fix what differs, remove what this agent programmed for hosts no longer present, and
    /// touch nothing else.
    fn reconcile(&mut self, peers: &[Lease]) -> impl Future<Output = Result<()>> + Send;

    /// Check everything this backend owns against the kernel and put back what someone
    /// deleted or changed (devices and their settings, per-peer entries, eBPF links, pins
    /// and configuration), recording each fix with [`crate::repair::record`]. Called when
    /// the netlink monitor reports a change to owned state, and periodically.
    fn resync(&mut self, peers: &[Lease]) -> impl Future<Output = Result<()>> + Send;

    /// The uplink's address changed (and with it the public IP, when that was not set
    /// explicitly): send from `ext`'s addresses from now on — the VXLAN devices' local
    /// address (a device whose local address changed is re-created with the same MAC),
    /// the eBPF outer source — and re-program `peers` on the result.
    fn readdress(
        &mut self,
        ext: &ExternalInterface,
        peers: &[Lease],
    ) -> impl Future<Output = Result<()>> + Send;

    /// The MTU pods must use (written to `subnet.env`).
    fn mtu(&self) -> u32;
}

/// The peer subnets (both families) lease events changed while a resync was reading the
/// kernel: the read may predate those changes, so the resync leaves them alone.
#[derive(Debug, Default)]
pub struct Touched {
    /// IPv4 subnets.
    pub v4: BTreeSet<Ipv4Network>,
    /// IPv6 subnets.
    pub v6: BTreeSet<Ipv6Network>,
}

impl Touched {
    /// An event added, changed or removed `lease`.
    pub fn add(&mut self, lease: &Lease) {
        self.v4.extend(lease.subnet);
        self.v6.extend(lease.ipv6_subnet);
    }
}

/// What a resync compares with, read off the event path (see
/// [`AnyBackend::resync_reader`]).
pub enum ResyncRead {
    /// The kernel VXLAN devices' neighbour, FDB and route tables.
    Vxlan(vxlan::KernelTables),
    /// The eBPF backend's: its kernel device's tables and the peer-keyed maps.
    Ebpf(ebpf::ResyncTables),
}

/// A resync's read, running without a borrow of the backend.
pub type ResyncReader = Pin<Box<dyn Future<Output = Result<ResyncRead>> + Send>>;

/// The backend this host runs, chosen once at start-up (a closed set: no registry).
pub enum AnyBackend {
    /// eBPF VXLAN on top of the kernel VXLAN device (boxed: it carries the loaded maps).
    Ebpf(Box<ebpf::EbpfVxlan>),
    /// Kernel VXLAN devices only (boxed: one per family).
    Vxlan(Box<vxlan::KernelVxlan>),
    /// Plain routes via peers' public IPs.
    HostGw(hostgw::HostGw),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Ebpf($b) => $e,
            AnyBackend::Vxlan($b) => $e,
            AnyBackend::HostGw($b) => $e,
        }
    };
}

impl AnyBackend {
    /// Every VXLAN device this backend owns: `flannel.<VNI>` and, with IPv6,
    /// `flannel-v6.<VNI>` (none for host-gw): what the netlink monitor watches besides the
    /// agent's routes.
    pub fn device_names(&self) -> Vec<String> {
        let kernel = match self {
            Self::Ebpf(b) => b.kernel(),
            Self::Vxlan(b) => b,
            Self::HostGw(_) => return Vec::new(),
        };
        kernel.device_names()
    }

    /// The pinned maps and links the eBPF datapath keeps (none for the other backends):
    /// what the agent watches for removal, since no netlink event reports it.
    pub fn pin_paths(&self) -> Vec<std::path::PathBuf> {
        match self {
            Self::Ebpf(b) => b.pin_paths(),
            Self::Vxlan(_) | Self::HostGw(_) => Vec::new(),
        }
    }

    /// With the nftables VXLAN peer guard on: whether it guards VXLAN over IPv6 too.
    pub fn peer_guard(&self) -> Option<bool> {
        match self {
            Self::Ebpf(b) => b.peer_guard(),
            Self::Vxlan(b) => b.peer_guard(),
            Self::HostGw(_) => None,
        }
    }

    /// The kernel reads of a resync as a future that borrows nothing, for backends whose
    /// resync reads big tables (thousands of neighbours, FDB entries, routes and map
    /// entries): the agent runs it as its own task while lease events go on, then calls
    /// [`resync_with`](Self::resync_with). `None`: this backend resyncs in one go.
    pub fn resync_reader(&self) -> Option<ResyncReader> {
        match self {
            Self::Ebpf(b) => {
                let tables = b.resync_reader();
                Some(Box::pin(async move { Ok(ResyncRead::Ebpf(tables.await?)) }))
            }
            Self::Vxlan(b) => {
                let tables = b.tables_reader();
                Some(Box::pin(
                    async move { Ok(ResyncRead::Vxlan(tables.await?)) },
                ))
            }
            Self::HostGw(_) => None,
        }
    }

    /// The rest of a resync: compare with `read` and put back what differs, leaving the
    /// subnets in `touched` (changed by events since the read began) as they are.
    pub async fn resync_with(
        &mut self,
        peers: &[Lease],
        read: ResyncRead,
        touched: &Touched,
    ) -> Result<()> {
        let fixes = match (self, read) {
            (Self::Ebpf(b), ResyncRead::Ebpf(tables)) => {
                b.check_with(peers, Some(tables), touched).await?
            }
            (Self::Vxlan(b), ResyncRead::Vxlan(tables)) => {
                b.check_with(peers, Some(tables), touched).await?
            }
            // Another backend's read (cannot happen: the backend is chosen once): read now.
            (Self::Ebpf(b), ResyncRead::Vxlan(_)) => b.check_with(peers, None, touched).await?,
            (Self::Vxlan(b), ResyncRead::Ebpf(_)) => b.check_with(peers, None, touched).await?,
            (Self::HostGw(b), _) => return b.resync(peers).await,
        };
        for (kind, detail) in fixes {
            repair::record(kind, detail);
        }
        Ok(())
    }
}

impl Backend for AnyBackend {
    async fn prepare(&mut self) -> Result<LeaseAttrs> {
        dispatch!(self, b => b.prepare().await)
    }
    async fn register(&mut self, own: &Lease) -> Result<()> {
        dispatch!(self, b => b.register(own).await)
    }
    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        dispatch!(self, b => b.add_peer(peer).await)
    }
    async fn remove_peer(&mut self, peer: &Lease) -> Result<()> {
        dispatch!(self, b => b.remove_peer(peer).await)
    }
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<()> {
        dispatch!(self, b => b.reconcile(peers).await)
    }
    async fn resync(&mut self, peers: &[Lease]) -> Result<()> {
        dispatch!(self, b => b.resync(peers).await)
    }
    async fn readdress(&mut self, ext: &ExternalInterface, peers: &[Lease]) -> Result<()> {
        dispatch!(self, b => b.readdress(ext, peers).await)
    }
    fn mtu(&self) -> u32 {
        dispatch!(self, b => b.mtu())
    }
}

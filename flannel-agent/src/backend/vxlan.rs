//! `vxlan`: the kernel VXLAN device alone, programmed exactly like upstream flannel.
//!
//! Device: `flannel.<VNI>` (VNI, UDP port — always sent, 8472 by default rather than relying
//! on the module parameter —, local = the uplink's own address, link = the uplink, TTL 0, learning off
//! unless configured, GBP if configured, no group/remote so nothing is flooded), MTU = uplink
//! MTU (or the configured `MTU`) − 50, a random locally-administered MAC. An existing device
//! with compatible VNI/link/local/port/GBP is reused with its MAC (so peers' entries stay
//! right across restarts); anything else by that name is deleted and recreated.
//!
//! The local address is the interface address (`IfaceAddr`), as upstream's
//! `vxlanDeviceAttrs{vtepAddr: be.extIface.IfaceAddr}` in every release; the *published*
//! `PublicIP` is `--public-ip` (`ExtAddr`). They differ only behind NAT, where the kernel
//! could not send from the public address (it is not local). The reference spec says
//! "local = public IP"; upstream's code says otherwise, and the code is what peers see.
//!
//! Per peer, in this order (so the kernel never ARPs for the gateway):
//! 1. permanent neighbour `<peer subnet base> lladdr <peer VtepMAC> dev flannel.N`;
//! 2. permanent FDB entry `<peer VtepMAC> dst <peer PublicIP> self dev flannel.N`;
//! 3. route `<peer subnet> via <peer subnet base> dev flannel.N onlink`; over IPv4 the
//!    route names a nexthop object with that gateway (`nhid <subnet base as a number>`),
//!    which spares the kernel a quadratic insert (see [`crate::net::nexthop`]).
//!
//! With `DirectRouting`, a peer whose PublicIP is directly connected (the kernel's route to
//! it has no gateway) gets only `<peer subnet> via <PublicIP> dev <uplink>` instead.
//!
//! Ownership, so reconcile removes what is stale and touches nothing else: every neighbour,
//! FDB entry and non-kernel route on `flannel.N` is ours (the device is); routes elsewhere
//! (direct routes) are ours only when they carry [`RTPROT_FLANNEL`]. Routes we create on the
//! device carry it too, so `ip route show proto 84` lists everything this agent programmed.
//!
//! Restart: nothing is torn down on exit; on start the device is reused and reconcile only
//! writes entries that differ, so a restarted agent leaves the kernel state as it was.
//! Reconcile also recreates a deleted device with the MAC already advertised (upstream
//! picks a fresh one without republishing it, leaving peers with a stale MAC).
//!
//! Addresses: the device carries exactly `<own subnet base>/32`; any other IPv4 address on
//! it (a previous lease's, or one added by hand) is removed, since the device is ours.
//!
//! IPv6 (`EnableIPv6`): a second device `flannel-v6.<VNI>` over the uplink's IPv6 address,
//! programmed the same way from each lease's IPv6 half (`IPv6Subnet`, `PublicIPv6`,
//! `BackendV6Data`): NDP neighbour, FDB entry with an IPv6 remote, onlink route; address
//! `<own IPv6 subnet base>/128` (link-local addresses are left alone); outer UDP checksum
//! computed on send and required on receive (`UDP_ZERO_CSUM6_TX/RX` off), as upstream;
//! `accept_ra` off. Both devices are one generic [`VxlanDevice`]; [`KernelVxlan`] holds
//! one per enabled family. Its MTU is the uplink MTU − 70 (the real IPv6 overhead), where
//! upstream subtracts 50 for both devices.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_route::{
    AddressFamily,
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType},
};
use tracing::{debug, info, warn};

use super::{Backend, ExternalInterface, Result, Touched};
use crate::{
    lease::{
        BackendAttrs, Lease, LeaseAttrs, LeaseFamily, MacAddr, SubnetId, VxlanBackendData,
        same_subnet,
    },
    net::nexthop::Nexthop,
    net::{
        netlink::{self, Netlink, NlFamily},
        vxlan_guard::{GuardRead, PeerGuard},
    },
    netconf::VxlanConfig,
    repair::{self, RepairKind},
    wire::cidr::{self, Cidr},
};

pub use crate::net::netlink::RTPROT_FLANNEL;

/// VXLAN encapsulation overhead over IPv4 (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet
/// 14), subtracted from the uplink MTU for the device and the pods.
pub const VXLAN_OVERHEAD: u32 = flannel_common::wire::VXLAN_OVERHEAD as u32;

/// The same over IPv6: the outer header is 40 bytes instead of 20.
pub const VXLAN6_OVERHEAD: u32 = VXLAN_OVERHEAD + 20;

/// Errors of the kernel VXLAN backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] netlink::Error),
    /// The MTU left after the VXLAN overhead is unusable.
    #[error("Backend.MTU {mtu}: too small for VXLAN (device MTU would be below 68)")]
    MtuTooSmall {
        /// The uplink (or configured) MTU.
        mtu: u32,
    },
    /// The device vanished or came back without what we need.
    #[error("device {device}: {reason}")]
    Device {
        /// Device name.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// The nftables peer guard could not be written.
    #[error("VXLAN peer guard: {0}")]
    Guard(#[from] crate::net::masq::Error),
    /// `register` was called with a lease that has no usable subnet.
    #[error("own lease {subnet}: {reason}")]
    OwnLease {
        /// The lease's subnet.
        subnet: String,
        /// What is wrong.
        reason: String,
    },
}

/// Why a peer's lease can't be programmed by a VXLAN backend (logged and skipped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    /// The peer runs another backend.
    #[error("lease {subnet}: BackendType {found:?} is not \"vxlan\"")]
    WrongBackend {
        /// The peer's subnet.
        subnet: String,
        /// Its backend type.
        found: String,
    },
    /// No `BackendData`.
    #[error("lease {subnet}: BackendData is missing")]
    MissingData {
        /// The peer's subnet.
        subnet: String,
    },
}

/// What a VXLAN peer's lease says about one family, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanPeer<N: Cidr> {
    /// The peer's pod subnet.
    pub subnet: N,
    /// Where to send its VXLAN packets.
    pub public_ip: N::Addr,
    /// Its VTEP (device) MAC: the inner destination MAC its kernel accepts.
    pub vtep_mac: [u8; 6],
}

/// A peer's lease as a VXLAN peer of family `N`: `BackendType` must be `vxlan` (the lease
/// was parsed and validated by the subnet manager; the `VNI` is informational upstream
/// and ignored here too). `Ok(None)`: the lease has no such half to program (an IPv6
/// subnet without `PublicIPv6` or `BackendV6Data` is a host that runs no IPv6 VTEP, which
/// upstream accepts); an IPv4 lease without `BackendData` is an error.
pub fn parse_peer<N: LeaseFamily>(lease: &Lease) -> Result<Option<VxlanPeer<N>>, PeerError> {
    let Some(subnet) = N::subnet(lease) else {
        return Ok(None);
    };
    if !matches!(lease.attrs.backend, BackendAttrs::Vxlan { .. }) {
        return Err(PeerError::WrongBackend {
            subnet: subnet.to_string(),
            found: lease.attrs.backend.type_name().to_owned(),
        });
    }
    let data = N::vxlan_data(&lease.attrs.backend);
    match (data, N::public_ip(&lease.attrs)) {
        (Some(data), Some(public_ip)) => Ok(Some(VxlanPeer {
            subnet,
            public_ip,
            vtep_mac: data.vtep_mac.octets(),
        })),
        _ if N::BITS == 32 => Err(PeerError::MissingData {
            subnet: subnet.to_string(),
        }),
        _ => Ok(None),
    }
}

/// The peer's IPv4 VTEP MAC, or `None` with a warning naming the lease and field.
pub fn peer_vtep_mac(peer: &Lease) -> Option<[u8; 6]> {
    match parse_peer::<Ipv4Network>(peer) {
        Ok(p) => p.map(|p| p.vtep_mac),
        Err(e) => {
            warn!(subnet = %peer.subnets(), error = %e, "skipping peer");
            None
        }
    }
}

/// A random locally-administered unicast MAC (upstream `pkg/mac`).
fn random_mac() -> [u8; 6] {
    MacAddr::random_local().octets()
}

/// How one peer subnet is reached (`A`: the family's address type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target<A> {
    /// Through the VXLAN device.
    Vxlan { vtep_mac: [u8; 6], public_ip: A },
    /// A plain route via the peer's public IP on the uplink (DirectRouting).
    Direct { gateway: A, oif: u32 },
}

impl<A: std::fmt::Display> std::fmt::Display for Target<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vxlan { public_ip, .. } => write!(f, "VXLAN to {public_ip}"),
            Self::Direct { gateway, oif } => write!(f, "direct via {gateway} dev #{oif}"),
        }
    }
}

/// What a check found wrong and put right: the kind and a description, for
/// [`crate::repair::record`] when the check was a resync.
pub type Fixes = Vec<(RepairKind, String)>;

/// What a VXLAN device can be built for: a family with netlink addresses and a lease half.
pub trait VxlanFamily: NlFamily + LeaseFamily {}
impl<N: NlFamily + LeaseFamily> VxlanFamily for N {}

/// One kernel VXLAN device and its per-peer entries, for family `N` (`flannel.<VNI>` over
/// the uplink's IPv4 address, or `flannel-v6.<VNI>` over its IPv6 address).
pub struct VxlanDevice<N: VxlanFamily> {
    nl: Netlink,
    ext: ExternalInterface,
    /// The uplink address the device sends from.
    local: N::Addr,
    config: VxlanConfig,
    name: String,
    ifindex: u32,
    mac: [u8; 6],
    mtu: u32,
    own: Option<N>,
    /// What is programmed per peer subnet, as far as this device knows: read from the
    /// kernel by the first peer event or reconcile, rebuilt by every reconcile, kept in
    /// step by every peer event, so an event is turned into the difference without
    /// reading any table.
    programmed: Option<BTreeMap<N, Target<N::Addr>>>,
    /// Which nexthop objects peer routes may name (read at start and by every resync).
    nexthops: NexthopIds,
}

/// Whether this device's peer routes name nexthop objects ([`NlFamily::nexthop_id`]; see
/// [`crate::net::nexthop`] for why), and which of those ids another owner holds: a subnet
/// whose id is taken gets a plain route and the other owner's object is left alone.
#[derive(Clone, Debug, Default)]
struct NexthopIds {
    /// The kernel has nexthop objects (and this family uses them).
    usable: bool,
    /// Ids held by nexthops that are not ours (another protocol).
    foreign: BTreeSet<u32>,
}

impl NexthopIds {
    /// From a dump (`None`: the kernel has no nexthop objects).
    fn from_dump<N: NlFamily>(dump: Option<&[Nexthop]>) -> Self {
        match dump {
            Some(all) if N::NEXTHOP_OBJECTS => Self {
                usable: true,
                foreign: all
                    .iter()
                    .filter(|nh| nh.protocol != RTPROT_FLANNEL)
                    .map(|nh| nh.id)
                    .collect(),
            },
            _ => Self::default(),
        }
    }

    /// The id the route to `subnet` for `target` names, or `None` for a plain route. Only
    /// routes on the VXLAN device name one: there are thousands of them, and the device is
    /// ours alone. A DirectRouting route on the uplink stays plain, because tools that
    /// delete routes by echoing a dump back (iproute2 6.1's `ip route flush`) are refused by
    /// the kernel for a route that names a nexthop, and the uplink is the host's.
    fn for_route<N: NlFamily>(&self, subnet: N, target: Target<N::Addr>) -> Option<u32> {
        matches!(target, Target::Vxlan { .. })
            .then(|| N::nexthop_id(subnet))
            .flatten()
            .filter(|id| self.usable && !self.foreign.contains(id))
    }
}

/// The underlay addresses a VXLAN peer may send from: where its packets to us come from.
/// The one allow-list both known-peer checks hold — the nftables guard's set and the eBPF
/// `PEERS` map (the lease's `PublicIP` and, in kube mode, the node's published addresses
/// and public-ip annotations; see [`Lease::senders`]).
pub fn sender_addresses(lease: &Lease) -> Vec<Ipv4Addr> {
    lease.senders()
}

/// What the nftables guard lets send VXLAN: [`sender_addresses`] over IPv4 and the
/// peer's IPv6 senders (`PublicIPv6`, in kube mode its node's IPv6 addresses) over IPv6
/// (the guard keeps the IPv6 ones only when this host has `flannel-v6.<VNI>`).
fn guarded_senders(lease: &Lease) -> Vec<IpAddr> {
    sender_addresses(lease)
        .into_iter()
        .map(IpAddr::from)
        .chain(lease.senders6().into_iter().map(IpAddr::from))
        .collect()
}

/// Netlink requests in flight at once while reconciling (pipelined on one socket; the
/// bound keeps the socket's receive buffer from overflowing with acknowledgements).
const NETLINK_BATCH: usize = 64;

impl<N: VxlanFamily> VxlanDevice<N> {
    /// Build the device for this host: opens netlink and creates (or adopts) it, so
    /// [`vxlan_ifindex`](Self::vxlan_ifindex) and [`vtep_mac`](Self::vtep_mac) are valid
    /// from here on. `vtep_mac` is the MAC this host published before (its previous lease,
    /// read back from the store): the device is created with it, or an existing device is
    /// given it, so peers' neighbour and FDB entries stay valid across a reboot (upstream
    /// reads it back from the lease / node annotation too).
    pub async fn new(
        ext: ExternalInterface,
        config: VxlanConfig,
        vtep_mac: Option<MacAddr>,
    ) -> Result<Self> {
        let (prefix, overhead) = if N::BITS == 32 {
            ("flannel", VXLAN_OVERHEAD)
        } else {
            ("flannel-v6", VXLAN6_OVERHEAD)
        };
        let local = ext.local::<N>().ok_or_else(|| Error::Device {
            device: format!("{prefix}.{}", config.vni),
            reason: format!("uplink {} has no {} address", ext.name, N::FAMILY),
        })?;
        let base = config.mtu.unwrap_or(ext.mtu);
        let mtu = base
            .checked_sub(overhead)
            .filter(|m| *m >= if N::BITS == 32 { 68 } else { 1280 })
            .ok_or(Error::MtuTooSmall { mtu: base })?;
        let nl = Netlink::connect().map_err(Error::from)?;
        let mut this = Self {
            nl,
            name: format!("{prefix}.{}", config.vni),
            ext,
            local,
            config,
            ifindex: 0,
            mac: vtep_mac.map_or([0; 6], MacAddr::octets),
            mtu,
            own: None,
            programmed: None,
            nexthops: NexthopIds::default(),
        };
        this.ensure_device().await?;
        this.nexthops = NexthopIds::from_dump::<N>(read_nexthops::<N>(&this.nl).await?.as_deref());
        if N::NEXTHOP_OBJECTS && !this.nexthops.usable {
            info!(device = %this.name, "the kernel has no nexthop objects; peer routes name their gateways");
        }
        Ok(this)
    }

    /// The device MTU (uplink or configured MTU minus this family's VXLAN overhead).
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// Send from `ext`'s address of this family from now on (kept when `ext` has none).
    /// The device itself is fixed by the next [`check`](Self::check), which re-creates
    /// it (same MAC) when its local address no longer matches.
    fn set_external(&mut self, ext: &ExternalInterface) {
        if let Some(local) = ext.local::<N>() {
            if local != self.local {
                info!(device = %self.name, from = %self.local, to = %local, "uplink address changed; the VXLAN device follows");
            }
            self.local = local;
        }
        self.ext = ext.clone();
    }

    /// Index of the device.
    pub fn vxlan_ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The device's MAC, as advertised in `BackendData.VtepMAC`.
    pub fn vtep_mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The uplink this backend sends through.
    pub fn ext(&self) -> &ExternalInterface {
        &self.ext
    }

    /// The device name (`flannel.<VNI>` or `flannel-v6.<VNI>`).
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The backend options the device was built with.
    pub fn config(&self) -> &VxlanConfig {
        &self.config
    }

    /// The netlink connection (its request counters show what steady state costs).
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    /// Peer subnets this backend has programmed.
    pub fn programmed_peers(&self) -> usize {
        self.programmed.as_ref().map_or(0, BTreeMap::len)
    }

    /// The record of what is programmed, read from the kernel if there is none yet.
    async fn record(&mut self) -> Result<&mut BTreeMap<N, Target<N::Addr>>, Error> {
        if self.programmed.is_none() {
            self.programmed = Some(self.read_programmed().await?);
        }
        Ok(self.programmed.get_or_insert_default())
    }

    /// What the kernel holds of ours, per peer subnet: VXLAN peers (route via the subnet
    /// base on the device, its neighbour's MAC, that MAC's FDB destination) and direct
    /// routes. Three dumps; used when there is no record yet.
    async fn read_programmed(&self) -> Result<BTreeMap<N, Target<N::Addr>>, Error> {
        let mac_of: BTreeMap<N::Addr, [u8; 6]> = self
            .nl
            .neighbours(N::AF, self.ifindex)
            .await?
            .iter()
            .filter(|n| n.header.state == NeighbourState::Permanent)
            .filter_map(|n| Some((N::of_ip(netlink::neigh_dst(n)?)?, netlink::neigh_lladdr(n)?)))
            .collect();
        let dst_of: BTreeMap<[u8; 6], N::Addr> = self
            .nl
            .neighbours(AddressFamily::Bridge, self.ifindex)
            .await?
            .iter()
            .filter_map(|n| Some((netlink::neigh_lladdr(n)?, N::of_ip(netlink::neigh_dst(n)?)?)))
            .collect();
        let mut out = BTreeMap::new();
        for r in self.nl.routes::<N>().await? {
            if !self.owns_route(&r) {
                continue;
            }
            let (Some(dst), Some(gw), Some(oif)) = (
                netlink::route_dst::<N>(&r),
                netlink::route_gateway::<N>(&r),
                netlink::route_oif(&r),
            ) else {
                continue;
            };
            if oif == self.ifindex {
                if let Some(&vtep_mac) = mac_of.get(&gw)
                    && let Some(&public_ip) = dst_of.get(&vtep_mac)
                {
                    out.insert(
                        dst,
                        Target::Vxlan {
                            vtep_mac,
                            public_ip,
                        },
                    );
                }
            } else {
                out.insert(dst, Target::Direct { gateway: gw, oif });
            }
        }
        Ok(out)
    }

    /// Create the device, or adopt a compatible one (keeping its MAC), or replace an
    /// incompatible one. Returns what had to be fixed on an adopted device.
    async fn ensure_device(&mut self) -> Result<Fixes, Error> {
        if let Some(link) = self.nl.link_by_name(&self.name).await? {
            match self.incompatibility(&link) {
                None => return self.adopt(&link).await,
                Some(why) => {
                    warn!(device = %self.name, reason = %why, "existing device is incompatible; recreating it");
                    self.nl.link_del(link.header.index).await?;
                }
            }
        }
        // Recreating a device that vanished under us: keep the MAC peers already hold.
        let mac = if self.mac == [0; 6] {
            random_mac()
        } else {
            self.mac
        };
        let msg = self.device_message(mac);
        match self.nl.link_add(msg).await {
            Ok(()) => {}
            // Raced with another creator (or a leftover we could not see): adopt it.
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(e.into()),
        }
        let link = self
            .nl
            .link_by_name(&self.name)
            .await?
            .ok_or_else(|| Error::Device {
                device: self.name.clone(),
                reason: "missing right after creation".into(),
            })?;
        info!(device = %self.name, vni = self.config.vni, port = self.config.port,
              local = %self.local, uplink = %self.ext.name, mtu = self.mtu,
              mac = %MacAddr(mac), "created VXLAN device");
        self.adopt(&link).await
    }

    fn device_message(&self, mac: [u8; 6]) -> LinkMessage {
        let b = rtnetlink::LinkVxlan::new(&self.name, self.config.vni).dev(self.ext.index);
        let mut b = match self.local.into() {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        }
        .port(self.config.port)
        .ttl(0)
        .tos(0)
        .learning(self.config.learning)
        .proxy(false)
        .rsc(false)
        .l2miss(false)
        .l3miss(false)
        .udp_zero_csum6_tx(false)
        .udp_zero_csum6_rx(false)
        .mtu(self.mtu)
        .address(mac.to_vec());
        if self.config.gbp {
            b = b.gbp();
        }
        b.build()
    }

    /// Why an existing link can't be reused, or `None` when it can. Zero values on the
    /// device count as "don't care", as upstream's `vxlanLinksIncompat`.
    fn incompatibility(&self, link: &LinkMessage) -> Option<String> {
        let infos = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i),
            _ => None,
        });
        let Some(infos) = infos else {
            return Some("no link info".into());
        };
        if !infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
        {
            return Some("not a vxlan device".into());
        }
        let data = infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
            _ => None,
        });
        let Some(data) = data else {
            return Some("no vxlan attributes".into());
        };
        let mut gbp = false;
        for attr in data {
            match *attr {
                InfoVxlan::Id(id) if id != self.config.vni => return Some(format!("VNI {id}")),
                InfoVxlan::Link(l) if l != 0 && l != self.ext.index => {
                    return Some(format!("link #{l}"));
                }
                InfoVxlan::Local(ip)
                    if !ip.is_unspecified() && N::of_ip(ip.into()) != Some(self.local) =>
                {
                    return Some(format!("local {ip}"));
                }
                InfoVxlan::Local6(ip)
                    if !ip.is_unspecified() && N::of_ip(ip.into()) != Some(self.local) =>
                {
                    return Some(format!("local {ip}"));
                }
                InfoVxlan::Group(ip) if !ip.is_unspecified() => {
                    return Some(format!("group {ip}"));
                }
                InfoVxlan::L2Miss(true) => return Some("l2miss".into()),
                InfoVxlan::Port(p) if p != 0 && p != self.config.port => {
                    return Some(format!("port {p}"));
                }
                InfoVxlan::Gbp => gbp = true,
                InfoVxlan::CollectMetadata(true) => return Some("external".into()),
                _ => {}
            }
        }
        (gbp != self.config.gbp).then(|| format!("gbp {gbp}"))
    }

    /// Take over an existing compatible device: its index and MAC, our MTU.
    /// Take `link` as our device. Once a MAC has been advertised (or preferred from the
    /// previous lease), the device is made to carry it; before that, the device's own MAC
    /// is kept (a restart reuses what peers already hold). Returns what had to be fixed.
    async fn adopt(&mut self, link: &LinkMessage) -> Result<Fixes, Error> {
        let mut fixes = Fixes::new();
        self.ifindex = link.header.index;
        let found = netlink::link_mac(link).filter(|m| *m != [0; 6]);
        if self.mac == [0; 6] {
            self.mac = found.unwrap_or_else(random_mac);
        }
        if found != Some(self.mac) {
            self.set_mac(self.mac).await?;
            fixes.push((
                RepairKind::DeviceSettings,
                format!(
                    "{} MAC {} -> {}",
                    self.name,
                    found.map_or_else(|| "none".into(), |m| MacAddr(m).to_string()),
                    MacAddr(self.mac)
                ),
            ));
        }
        if let Some(found) = netlink::link_mtu(link).filter(|m| *m != self.mtu) {
            let mut msg = LinkMessage::default();
            msg.header.index = self.ifindex;
            msg.attributes.push(LinkAttribute::Mtu(self.mtu));
            self.nl.link_set(msg).await?;
            info!(device = %self.name, mtu = self.mtu, "set device MTU");
            fixes.push((
                RepairKind::DeviceSettings,
                format!("{} MTU {found} -> {}", self.name, self.mtu),
            ));
        }
        debug!(device = %self.name, ifindex = self.ifindex, mac = %MacAddr(self.mac), "using VXLAN device");
        Ok(fixes)
    }

    async fn set_mac(&self, mac: [u8; 6]) -> Result<(), Error> {
        let mut msg = LinkMessage::default();
        msg.header.index = self.ifindex;
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.nl.link_set(msg).await?;
        Ok(())
    }

    /// Put back our address and MAC and bring the device up (idempotent). Returns what had
    /// to be fixed.
    async fn ensure_registered(&mut self, own: N) -> Result<Fixes, Error> {
        let mut fixes = Fixes::new();
        let want = cidr::base(own);
        let mut present = false;
        for (addr, len) in self.nl.addresses::<N>(self.ifindex).await? {
            // The kernel's own IPv6 link-local address stays (upstream keeps it too).
            if matches!(addr.into(), IpAddr::V6(a) if a.is_unicast_link_local()) {
                continue;
            }
            if (addr, len) == (want, N::BITS) {
                present = true;
            } else {
                info!(device = %self.name, address = %format!("{addr}/{len}"), "removing stale address");
                self.nl.addr_del::<N>(self.ifindex, addr, len).await?;
            }
        }
        if !present {
            self.nl
                .addr_replace::<N>(self.ifindex, want, N::BITS)
                .await?;
            fixes.push((
                RepairKind::DeviceSettings,
                format!("{} address {want}/{}", self.name, N::BITS),
            ));
        }
        let link = self
            .nl
            .link_by_index(self.ifindex)
            .await?
            .ok_or_else(|| Error::Device {
                device: self.name.clone(),
                reason: "vanished".into(),
            })?;
        if netlink::link_mac(&link) != Some(self.mac) {
            // Something (udev's MACAddressPolicy, NetworkManager) rewrote it; peers hold the
            // advertised one, so put it back.
            self.set_mac(self.mac).await?;
            fixes.push((
                RepairKind::DeviceSettings,
                format!("{} MAC -> advertised {}", self.name, MacAddr(self.mac)),
            ));
        }
        if !link.header.flags.contains(LinkFlags::Up) {
            let mut msg = LinkMessage::default();
            msg.header.index = self.ifindex;
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
            self.nl.link_set(msg).await?;
            fixes.push((RepairKind::DeviceSettings, format!("{} up", self.name)));
        }
        Ok(fixes)
    }

    /// The desired target of one lease's half of this family, with its subnet, or `None`
    /// (logged when it is an error) when there is nothing to program.
    async fn target(&self, lease: &Lease) -> Result<Option<(N, Target<N::Addr>)>, Error> {
        let peer = match parse_peer::<N>(lease) {
            Ok(Some(p)) if Some(p.subnet) != self.own => p,
            Ok(_) => return Ok(None),
            Err(e) => {
                warn!(device = %self.name, error = %e, "skipping peer");
                return Ok(None);
            }
        };
        if self.config.direct_routing
            && let Some(oif) = self.on_link(peer.public_ip).await?
        {
            let direct = Target::Direct {
                gateway: peer.public_ip,
                oif,
            };
            return Ok(Some((peer.subnet, direct)));
        }
        let vxlan = Target::Vxlan {
            vtep_mac: peer.vtep_mac,
            public_ip: peer.public_ip,
        };
        Ok(Some((peer.subnet, vxlan)))
    }

    /// The output interface when `ip` is directly connected (its route has no gateway).
    async fn on_link(&self, ip: N::Addr) -> Result<Option<u32>, Error> {
        let route = match self.nl.route_get::<N>(ip).await {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = %ip, error = %e, "no route to peer; not using direct routing");
                return Ok(None);
            }
        };
        if netlink::route_gateway::<N>(&route).is_some() {
            return Ok(None);
        }
        Ok(netlink::route_oif(&route))
    }

    /// Program one subnet (neighbour, FDB, route for VXLAN; one route for direct), undoing
    /// the earlier steps when a later one fails, as upstream.
    async fn program(&self, subnet: N, target: Target<N::Addr>) -> Result<(), Error> {
        match target {
            Target::Vxlan {
                vtep_mac,
                public_ip,
            } => {
                let base = cidr::base(subnet);
                self.nl
                    .neigh_replace(arp_entry::<N>(self.ifindex, base, vtep_mac))
                    .await?;
                if let Err(e) = self
                    .nl
                    .neigh_replace(fdb_entry::<N>(self.ifindex, vtep_mac, public_ip))
                    .await
                {
                    let _ = self
                        .nl
                        .neigh_del(arp_entry::<N>(self.ifindex, base, vtep_mac))
                        .await;
                    return Err(e.into());
                }
                if let Err(e) = self.write_route(subnet, target).await {
                    let _ = self
                        .nl
                        .neigh_del(fdb_entry::<N>(self.ifindex, vtep_mac, public_ip))
                        .await;
                    let _ = self
                        .nl
                        .neigh_del(arp_entry::<N>(self.ifindex, base, vtep_mac))
                        .await;
                    return Err(e);
                }
            }
            Target::Direct { .. } => self.write_route(subnet, target).await?,
        }
        Ok(())
    }

    /// The route to `subnet` for `target`, after the nexthop object it names (if any).
    async fn write_route(&self, subnet: N, target: Target<N::Addr>) -> Result<(), Error> {
        let (gw, oif) = self.route_target(subnet, target);
        if let Some(id) = self.nexthops.for_route(subnet, target) {
            self.nl
                .nexthop_replace(Nexthop::onlink(id, gw.into(), oif, RTPROT_FLANNEL))
                .await?;
        }
        self.nl
            .route_replace(self.peer_route(subnet, target))
            .await?;
        Ok(())
    }

    /// The route to `subnet` for `target`: naming its nexthop object, or (without one)
    /// `via <gateway> dev <oif>`, onlink on the VXLAN device.
    fn peer_route(&self, subnet: N, target: Target<N::Addr>) -> RouteMessage {
        if let Some(id) = self.nexthops.for_route(subnet, target) {
            let mut r = netlink::route_base(subnet);
            r.attributes.push(RouteAttribute::NhId(id));
            return r;
        }
        let (gw, oif) = self.route_target(subnet, target);
        let mut r = netlink::gateway_route(subnet, gw, oif);
        if matches!(target, Target::Vxlan { .. }) {
            r.header.flags = RouteFlags::Onlink;
        }
        r
    }

    /// Whether a dumped route is one this backend owns.
    fn owns_route(&self, r: &RouteMessage) -> bool {
        let proto = u8::from(r.header.protocol);
        // The blackhole route for our own subnet carries our protocol too, but belongs to
        // `net::blackhole`, not to the peer set.
        r.header.kind != RouteType::BlackHole
            && (proto == RTPROT_FLANNEL
                || (netlink::route_oif(r) == Some(self.ifindex)
                    && r.header.protocol != RouteProtocol::Kernel))
    }

    /// Whether a dumped route is exactly what `target` wants for `subnet` (its gateway and
    /// device are reported for a route naming a nexthop too).
    fn route_matches(&self, r: &RouteMessage, subnet: N, target: Target<N::Addr>) -> bool {
        let (gw, oif) = self.route_target(subnet, target);
        netlink::route_dst::<N>(r) == Some(subnet)
            && netlink::route_gateway::<N>(r) == Some(gw)
            && netlink::route_oif(r) == Some(oif)
            && netlink::route_nexthop_id(r) == self.nexthops.for_route(subnet, target)
            && self.is_exact_flannel_route(r)
    }

    /// A future that reads this device's tables without borrowing the device, so lease
    /// events can go on while a resync reads thousands of entries.
    fn tables_reader(
        &self,
    ) -> impl Future<Output = Result<DeviceTables<N>, Error>> + Send + 'static {
        let (nl, ifindex) = (self.nl.clone(), self.ifindex);
        async move { read_tables::<N>(&nl, ifindex).await }
    }

    /// Make the kernel equal `desired` for every entry this backend owns, comparing with
    /// the neighbour, FDB, route and nexthop tables read once: program what is missing or
    /// differs and remove what is stale, many requests in flight at once. Returns the
    /// subnets that are now programmed as desired, and what was missing or wrong and had
    /// to be written. Subnets in `touched` were changed by lease events after the read
    /// began: the tables may predate those changes, so their entries are left as the
    /// events made them (and as the record says); the next resync checks them.
    async fn converge_with(
        &self,
        tables: DeviceTables<N>,
        desired: &BTreeMap<N, Target<N::Addr>>,
        touched: &BTreeSet<N>,
    ) -> Result<Converged<N>, Error> {
        use futures::{StreamExt, stream};
        let DeviceTables {
            neighs,
            fdb,
            routes,
            nexthops,
            ..
        } = tables;
        let mut failed = None;

        // 1. Add or fix what differs (entries already right are not rewritten).
        let routed: BTreeSet<(N, N::Addr, u32, Option<u32>)> = routes
            .iter()
            .filter(|r| self.is_exact_flannel_route(r))
            .filter_map(|r| {
                Some((
                    netlink::route_dst::<N>(r)?,
                    netlink::route_gateway::<N>(r)?,
                    netlink::route_oif(r)?,
                    netlink::route_nexthop_id(r),
                ))
            })
            .collect();
        let neigh_set: BTreeSet<(N::Addr, [u8; 6])> = neighs
            .iter()
            .filter(|n| n.header.state == NeighbourState::Permanent)
            .filter_map(|n| Some((N::of_ip(netlink::neigh_dst(n)?)?, netlink::neigh_lladdr(n)?)))
            .collect();
        let fdb_set: BTreeSet<([u8; 6], N::Addr)> = fdb
            .iter()
            .filter_map(|n| Some((netlink::neigh_lladdr(n)?, N::of_ip(netlink::neigh_dst(n)?)?)))
            .collect();
        let mut to_program: Vec<(N, Target<N::Addr>)> = Vec::new();
        let mut missing: BTreeMap<N, Fixes> = BTreeMap::new();
        for (subnet, target) in desired {
            if touched.contains(subnet) {
                continue;
            }
            let (gw, oif) = self.route_target(*subnet, *target);
            let nh = self.nexthops.for_route(*subnet, *target);
            let mut wrong = Fixes::new();
            if !routed.contains(&(*subnet, gw, oif, nh)) {
                wrong.push((RepairKind::Route, format!("route {subnet} ({target})")));
            }
            if let Target::Vxlan {
                vtep_mac,
                public_ip,
            } = *target
            {
                if !neigh_set.contains(&(cidr::base(*subnet), vtep_mac)) {
                    wrong.push((
                        RepairKind::Neighbour,
                        format!(
                            "neighbour {} lladdr {} dev {}",
                            cidr::base(*subnet),
                            MacAddr(vtep_mac),
                            self.name
                        ),
                    ));
                }
                if !fdb_set.contains(&(vtep_mac, public_ip)) {
                    wrong.push((
                        RepairKind::Fdb,
                        format!(
                            "FDB {} dst {public_ip} dev {}",
                            MacAddr(vtep_mac),
                            self.name
                        ),
                    ));
                }
            }
            if !wrong.is_empty() {
                to_program.push((*subnet, *target));
                missing.insert(*subnet, wrong);
            }
        }
        let mut done: BTreeMap<N, Target<N::Addr>> = desired.clone();
        for subnet in touched {
            match self.programmed.as_ref().and_then(|p| p.get(subnet)) {
                Some(t) => done.insert(*subnet, *t),
                None => done.remove(subnet),
            };
        }
        let touched_bases: BTreeSet<N::Addr> = touched.iter().map(|s| cidr::base(*s)).collect();
        let mut fixes = Fixes::new();
        let results: Vec<(N, Result<(), Error>)> = stream::iter(to_program)
            .map(|(subnet, target)| async move {
                debug!(%subnet, ?target, "programming peer");
                (subnet, self.program(subnet, target).await)
            })
            .buffer_unordered(NETLINK_BATCH)
            .collect()
            .await;
        for (subnet, r) in results {
            if r.is_ok() {
                fixes.extend(missing.remove(&subnet).unwrap_or_default());
            }
            if let Err(e) = r {
                warn!(%subnet, error = %e, "programming peer failed");
                done.remove(&subnet);
                failed = Some(e);
            }
        }

        // 2. Remove what is ours and not desired (from the same dumps: what step 1 wrote
        // is desired by definition).
        let want_neigh: BTreeSet<(N::Addr, [u8; 6])> = desired
            .iter()
            .filter_map(|(s, t)| match t {
                Target::Vxlan { vtep_mac, .. } => Some((cidr::base(*s), *vtep_mac)),
                Target::Direct { .. } => None,
            })
            .collect();
        let want_fdb: BTreeSet<([u8; 6], N::Addr)> = desired
            .values()
            .filter_map(|t| match t {
                Target::Vxlan {
                    vtep_mac,
                    public_ip,
                } => Some((*vtep_mac, *public_ip)),
                Target::Direct { .. } => None,
            })
            .collect();
        let mut deletions: Vec<Deletion> = Vec::new();
        let mut kept = BTreeSet::new();
        for r in &routes {
            if !self.owns_route(r) {
                continue;
            }
            let Some(dst) = netlink::route_dst::<N>(r) else {
                continue;
            };
            if touched.contains(&dst) {
                continue;
            }
            let wanted = desired
                .get(&dst)
                .is_some_and(|t| self.route_matches(r, dst, *t));
            if wanted && kept.insert(dst) {
                continue;
            }
            info!(route = %dst, "removing stale route");
            deletions.push(Deletion::Route(netlink::route_del_from(r)));
        }
        for n in &neighs {
            let Some(ip) = netlink::neigh_dst(n).and_then(N::of_ip) else {
                continue;
            };
            if touched_bases.contains(&ip) {
                continue;
            }
            let keep = netlink::neigh_lladdr(n).is_some_and(|mac| want_neigh.contains(&(ip, mac)))
                && n.header.state == NeighbourState::Permanent;
            if !keep {
                info!(device = %self.name, neighbour = %ip, "removing stale neighbour entry");
                deletions.push(Deletion::Neigh(arp_del::<N>(self.ifindex, ip)));
            }
        }
        // FDB entries are keyed by MAC, not subnet: one wanted by nobody now is stale even
        // if an event touched its peer meanwhile (deleting it twice is harmless).
        for n in &fdb {
            // Only VXLAN remote entries (they have a destination); others are the kernel's.
            let (Some(dst), Some(mac)) = (
                netlink::neigh_dst(n).and_then(N::of_ip),
                netlink::neigh_lladdr(n),
            ) else {
                continue;
            };
            if !want_fdb.contains(&(mac, dst)) {
                info!(device = %self.name, mac = %MacAddr(mac), dst = %dst, "removing stale FDB entry");
                deletions.push(Deletion::Neigh(fdb_entry::<N>(self.ifindex, mac, dst)));
            }
        }
        // Our nexthop objects no route of a desired peer names (after the routes, which
        // the kernel would otherwise delete with them, unannounced).
        let want_nh: BTreeSet<u32> = desired
            .iter()
            .filter_map(|(s, t)| self.nexthops.for_route(*s, *t))
            .chain(touched.iter().filter_map(|s| N::nexthop_id(*s)))
            .collect();
        for nh in nexthops.iter().flatten() {
            if nh.protocol == RTPROT_FLANNEL
                && nh.family == u8::from(N::AF)
                && !want_nh.contains(&nh.id)
            {
                info!(id = nh.id, gateway = ?nh.gateway, "removing stale nexthop");
                deletions.push(Deletion::Nexthop(nh.id));
            }
        }
        // Routes first (the order above), so nothing is sent to a half-removed peer; the
        // batches keep that order between kinds because routes are queued first.
        let results: Vec<Result<bool, netlink::Error>> = stream::iter(deletions)
            .map(|d| async move {
                match d {
                    Deletion::Route(r) => self.nl.route_del(r).await,
                    Deletion::Neigh(n) => self.nl.neigh_del(n).await,
                    Deletion::Nexthop(id) => self.nl.nexthop_del(id).await,
                }
            })
            .buffered(NETLINK_BATCH)
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(Converged {
            done,
            failed,
            fixes,
        })
    }

    /// The gateway and output interface of the route `target` wants for `subnet`.
    fn route_target(&self, subnet: N, target: Target<N::Addr>) -> (N::Addr, u32) {
        match target {
            Target::Vxlan { .. } => (cidr::base(subnet), self.ifindex),
            Target::Direct { gateway, oif } => (gateway, oif),
        }
    }

    /// Whether a dumped route has exactly the shape this backend writes (any target).
    fn is_exact_flannel_route(&self, r: &RouteMessage) -> bool {
        u8::from(r.header.protocol) == RTPROT_FLANNEL
            && r.header.tos == 0
            && !r
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Priority(p) if *p != N::DEFAULT_METRIC))
    }

    /// The desired state for `peers`, skipping (with a warning) leases we can't program.
    async fn desired(&self, peers: &[Lease]) -> Result<BTreeMap<N, Target<N::Addr>>, Error> {
        let mut desired = BTreeMap::new();
        for lease in peers {
            if let Some((subnet, t)) = self.target(lease).await? {
                desired.insert(subnet, t);
            }
        }
        Ok(desired)
    }

    /// Remove what was programmed for `subnet` as `target`, routes first, so nothing is
    /// sent to a half-removed peer. Entries already gone are fine.
    async fn unprogram(&self, subnet: N, target: Target<N::Addr>) -> Result<(), Error> {
        match target {
            Target::Vxlan {
                vtep_mac,
                public_ip,
            } => {
                self.delete_route(subnet, target).await?;
                self.nl
                    .neigh_del(fdb_entry::<N>(self.ifindex, vtep_mac, public_ip))
                    .await?;
                self.nl
                    .neigh_del(arp_del::<N>(self.ifindex, cidr::base(subnet)))
                    .await?;
            }
            Target::Direct { .. } => self.delete_route(subnet, target).await?,
        }
        Ok(())
    }

    /// The route to `subnet`, then the nexthop object it named.
    async fn delete_route(&self, subnet: N, target: Target<N::Addr>) -> Result<(), Error> {
        self.nl.route_del(self.peer_route(subnet, target)).await?;
        if let Some(id) = self.nexthops.for_route(subnet, target) {
            self.nl.nexthop_del(id).await?;
        }
        Ok(())
    }
}

/// One device's neighbour, FDB and route tables, as a resync read them.
pub struct DeviceTables<N> {
    /// The device they were read for (a device re-created since makes them useless).
    ifindex: u32,
    neighs: Vec<NeighbourMessage>,
    fdb: Vec<NeighbourMessage>,
    routes: Vec<RouteMessage>,
    /// Every nexthop object of family `N` (`None`: the kernel has none, or `N` uses none).
    nexthops: Option<Vec<Nexthop>>,
    family: std::marker::PhantomData<N>,
}

/// Read the device's neighbours, FDB entries and family-`N` routes: three dumps.
async fn read_tables<N: VxlanFamily>(nl: &Netlink, ifindex: u32) -> Result<DeviceTables<N>, Error> {
    Ok(DeviceTables {
        ifindex,
        neighs: nl.neighbours(N::AF, ifindex).await?,
        fdb: nl.neighbours(AddressFamily::Bridge, ifindex).await?,
        routes: nl.routes::<N>().await?,
        nexthops: read_nexthops::<N>(nl).await?,
        family: std::marker::PhantomData,
    })
}

/// The kernel's nexthop objects of family `N`, for a family whose routes name them.
async fn read_nexthops<N: VxlanFamily>(nl: &Netlink) -> Result<Option<Vec<Nexthop>>, Error> {
    if !N::NEXTHOP_OBJECTS {
        return Ok(None);
    }
    Ok(nl.nexthops().await?.map(|all| {
        all.into_iter()
            .filter(|nh| nh.family == u8::from(N::AF))
            .collect()
    }))
}

/// Both devices' tables, read by [`KernelVxlan::tables_reader`].
pub struct KernelTables {
    v4: Option<DeviceTables<Ipv4Network>>,
    v6: Option<DeviceTables<Ipv6Network>>,
    /// The peer guard's nftables listing (with the guard on and written).
    guard: Option<GuardRead>,
}

/// A stale entry to delete.
enum Deletion {
    Route(RouteMessage),
    Neigh(NeighbourMessage),
    Nexthop(u32),
}

/// What [`VxlanDevice::converge_with`] achieved.
struct Converged<N: VxlanFamily> {
    /// The subnets now programmed as desired.
    done: BTreeMap<N, Target<N::Addr>>,
    /// The last programming error, if any peer failed.
    failed: Option<Error>,
    /// What was missing or wrong and was written.
    fixes: Fixes,
}

impl<N: VxlanFamily> VxlanDevice<N> {
    /// Compare everything this backend owns with the kernel and put back what differs:
    /// the device (re-created with the advertised MAC when gone, taken over again when
    /// replaced), its MTU, MAC, address and up flag, and every peer's neighbour, FDB entry
    /// and route. Returns what had to be written.
    pub async fn check(&mut self, peers: &[Lease]) -> Result<Fixes, Error> {
        self.check_with(peers, None, &BTreeSet::new()).await
    }

    /// [`check`](Self::check), comparing the per-peer entries with `tables` when they were
    /// read for the device as it still is (else read now); see
    /// [`converge_with`](Self::converge_with) for `touched`.
    async fn check_with(
        &mut self,
        peers: &[Lease],
        tables: Option<DeviceTables<N>>,
        touched: &BTreeSet<N>,
    ) -> Result<Fixes, Error> {
        let mut fixes = self.check_device().await?;
        if let Some(own) = self.own {
            fixes.extend(self.ensure_registered(own).await?);
        }
        let desired = self.desired(peers).await?;
        let tables = match tables.filter(|t| t.ifindex == self.ifindex) {
            Some(t) => t,
            None => read_tables::<N>(&self.nl, self.ifindex).await?,
        };
        self.nexthops = NexthopIds::from_dump::<N>(tables.nexthops.as_deref());
        let converged = self.converge_with(tables, &desired, touched).await?;
        self.programmed = Some(converged.done);
        fixes.extend(converged.fixes);
        converged.failed.map_or(Ok(fixes), Err)
    }

    /// The device itself: still there under the same index and compatible (then only its
    /// MTU and MAC are checked), or re-created / re-adopted.
    async fn check_device(&mut self) -> Result<Fixes, Error> {
        let old = self.ifindex;
        let found = self.nl.link_by_name(&self.name).await?;
        if let Some(link) = &found
            && link.header.index == old
            && self.incompatibility(link).is_none()
        {
            return self.adopt(link).await;
        }
        let what = if found.is_some() {
            "replaced by another device"
        } else {
            "missing"
        };
        let mut fixes = self.ensure_device().await?;
        fixes.insert(
            0,
            (
                RepairKind::Device,
                format!(
                    "{} was {what}; now #{} (was #{old}) with the advertised MAC {}",
                    self.name,
                    self.ifindex,
                    MacAddr(self.mac)
                ),
            ),
        );
        Ok(fixes)
    }
}

/// The device's side of the [`Backend`] operations, for one family.
impl<N: VxlanFamily> VxlanDevice<N> {
    /// Make sure the device exists and return the VTEP data to publish for it.
    async fn prepare(&mut self) -> Result<VxlanBackendData, Error> {
        self.ensure_device().await?;
        Ok(VxlanBackendData {
            vni: self.config.vni,
            vtep_mac: MacAddr(self.mac),
        })
    }

    /// Give the device this host's subnet (`<base>/32` or `/128`) and bring it up.
    async fn register(&mut self, own: N) -> Result<(), Error> {
        self.own = Some(own);
        if own.prefix_len() >= N::BITS {
            return Err(Error::OwnLease {
                subnet: own.to_string(),
                reason: "a single-address subnet leaves no pod addresses".into(),
            });
        }
        if N::BITS == 128 {
            // As upstream: a VXLAN device must not configure itself from router adverts.
            let path = format!("/proc/sys/net/ipv6/conf/{}/accept_ra", self.name);
            if let Err(error) = std::fs::write(&path, "0") {
                debug!(%path, %error, "could not turn accept_ra off");
            }
        }
        self.ensure_registered(own).await?;
        info!(device = %self.name, address = %format!("{}/{}", cidr::base(own), N::BITS), "VXLAN device registered");
        Ok(())
    }

    /// Program this family's half of `peer`, when it has one; returns whether it did.
    async fn add_peer(&mut self, peer: &Lease) -> Result<bool, Error> {
        let Some((subnet, target)) = self.target(peer).await? else {
            return Ok(false);
        };
        let old = self.record().await?.remove(&subnet);
        match old {
            // Same kind: the neighbour and route are replaced in place; only an FDB entry
            // for a MAC or address the lease no longer has must go (after, so the subnet is
            // never without a route).
            Some(Target::Vxlan { .. }) | None if matches!(target, Target::Vxlan { .. }) => {}
            Some(Target::Direct { .. }) if matches!(target, Target::Direct { .. }) => {}
            // Between VXLAN and direct routing the old route has another gateway or
            // device: everything of the subnet goes first.
            Some(old) => self.unprogram(subnet, old).await?,
            None => {}
        }
        self.program(subnet, target).await?;
        if let (
            Some(Target::Vxlan {
                vtep_mac: old_mac,
                public_ip: old_ip,
            }),
            Target::Vxlan {
                vtep_mac,
                public_ip,
            },
        ) = (old, target)
            && (old_mac, old_ip) != (vtep_mac, public_ip)
        {
            self.nl
                .neigh_del(fdb_entry::<N>(self.ifindex, old_mac, old_ip))
                .await?;
        }
        self.record().await?.insert(subnet, target);
        info!(device = %self.name, %subnet, %target, "peer programmed");
        Ok(true)
    }

    /// Remove what was programmed for this family's half of `peer`.
    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), Error> {
        let Some(subnet) = N::subnet(peer).filter(|s| Some(*s) != self.own) else {
            return Ok(());
        };
        // Only what the record says was programmed: entries nobody recorded are stale
        // state, which the next reconcile removes.
        match self.record().await?.get(&subnet).copied() {
            Some(target) => {
                self.unprogram(subnet, target).await?;
                self.record().await?.remove(&subnet);
                info!(device = %self.name, %subnet, "peer removed");
            }
            None => debug!(%subnet, "peer was not programmed; nothing to remove"),
        }
        Ok(())
    }
}

/// The kernel VXLAN backend: `flannel.<VNI>` and, with IPv6 enabled (the uplink has an
/// IPv6 address in [`ExternalInterface`]), `flannel-v6.<VNI>`.
pub struct KernelVxlan {
    /// `flannel.<VNI>`, unless the network is IPv6-only.
    v4: Option<VxlanDevice<Ipv4Network>>,
    /// `flannel-v6.<VNI>`, when IPv6 is enabled.
    v6: Option<VxlanDevice<Ipv6Network>>,
    /// The uplink, as the devices send through it.
    ext: ExternalInterface,
    config: VxlanConfig,
    /// The first device's name and netlink connection (IPv4, else IPv6): what the agent's
    /// monitor watches and what tests count requests on.
    device: String,
    nl: Netlink,
    /// The nftables peer guard, when VXLAN is accepted only from known peers (over IPv6
    /// too when `flannel-v6.<VNI>` exists).
    guard: Option<PeerGuard>,
    /// Our own lease's subnet(s), once registered.
    own: Option<SubnetId>,
}

/// Whether `lease` is our own (`own`, once registered).
fn is_own(own: Option<SubnetId>, lease: &Lease) -> bool {
    own.is_some_and(|o| same_subnet(o, lease.id()))
}

/// Whether the guard accepts `lease`'s VXLAN: it is a vxlan peer with a VTEP of either
/// family.
fn guarded(lease: &Lease) -> bool {
    matches!(parse_peer::<Ipv4Network>(lease), Ok(Some(_)))
        || matches!(parse_peer::<Ipv6Network>(lease), Ok(Some(_)))
}

impl KernelVxlan {
    /// Build the backend for this host: creates (or adopts) the devices, so
    /// [`vxlan_ifindex`](Self::vxlan_ifindex) and [`vtep_mac`](Self::vtep_mac) are valid
    /// from here on.
    pub async fn new(ext: ExternalInterface, config: VxlanConfig) -> Result<Self> {
        Self::with_vtep_macs(ext, config, VtepMacs::default()).await
    }

    /// Like [`new`](Self::new), with the VTEP MACs this host published before, which the
    /// devices are created with or given (see [`VxlanDevice::new`]).
    pub async fn with_vtep_macs(
        ext: ExternalInterface,
        config: VxlanConfig,
        macs: VtepMacs,
    ) -> Result<Self> {
        // One device per family the uplink has an address of, i.e. per enabled family
        // (`iface::lookup` leaves a disabled family's address out).
        let v4 = match ext.local::<Ipv4Network>() {
            Some(_) => Some(VxlanDevice::new(ext.clone(), config.clone(), macs.v4).await?),
            None => None,
        };
        let v6 = match ext.local::<Ipv6Network>() {
            Some(_) => Some(VxlanDevice::new(ext.clone(), config.clone(), macs.v6).await?),
            None => None,
        };
        let (device, nl) = match (&v4, &v6) {
            (Some(d), _) => (d.name.clone(), d.nl.clone()),
            (None, Some(d)) => (d.name.clone(), d.nl.clone()),
            (None, None) => {
                return Err(Error::Device {
                    device: format!("flannel.{}", config.vni),
                    reason: format!("uplink {} has no address of an enabled family", ext.name),
                }
                .into());
            }
        };
        Ok(Self {
            v4,
            v6,
            ext,
            config,
            device,
            nl,
            guard: None,
            own: None,
        })
    }

    /// Accept VXLAN only from known peers on the kernel path too: keep the nftables guard
    /// ([`crate::net::vxlan_guard`]) equal to the peer set from now on.
    pub fn enable_peer_guard(&mut self) {
        self.guard = Some(PeerGuard::new(self.config.port, self.v6.is_some()));
    }

    /// Index of `flannel.<VNI>` (`None` on an IPv6-only host).
    pub fn vxlan_ifindex(&self) -> Option<u32> {
        self.v4.as_ref().map(|d| d.ifindex)
    }

    /// With the nftables peer guard on: whether it guards VXLAN over IPv6 too.
    pub fn peer_guard(&self) -> Option<bool> {
        self.guard.as_ref().map(PeerGuard::ipv6)
    }

    /// The MAC of `flannel.<VNI>`, as advertised in `BackendData.VtepMAC`.
    pub fn vtep_mac(&self) -> Option<[u8; 6]> {
        self.v4.as_ref().map(|d| d.mac)
    }

    /// The MAC of `flannel-v6.<VNI>`, as advertised in `BackendV6Data.VtepMAC`.
    pub fn vtep_mac6(&self) -> Option<[u8; 6]> {
        self.v6.as_ref().map(|d| d.mac)
    }

    /// The MTU of `flannel.<VNI>`.
    pub fn v4_mtu(&self) -> Option<u32> {
        self.v4.as_ref().map(|d| d.mtu)
    }

    /// The MTU of `flannel-v6.<VNI>`, if there is one.
    pub fn v6_mtu(&self) -> Option<u32> {
        self.v6.as_ref().map(|d| d.mtu)
    }

    /// The uplink this backend sends through.
    pub fn ext(&self) -> &ExternalInterface {
        &self.ext
    }

    /// Send from `ext`'s addresses from now on (see [`Backend::readdress`]); the devices
    /// follow on the next [`check`](Self::check).
    pub fn set_external(&mut self, ext: &ExternalInterface) {
        if let Some(v4) = &mut self.v4 {
            v4.set_external(ext);
        }
        if let Some(v6) = &mut self.v6 {
            v6.set_external(ext);
        }
        self.ext = ext.clone();
    }

    /// The first device's name: `flannel.<VNI>`, or `flannel-v6.<VNI>` on an IPv6-only
    /// host.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// Every device's name: `flannel.<VNI>` unless IPv6-only, `flannel-v6.<VNI>` with
    /// IPv6.
    pub fn device_names(&self) -> Vec<String> {
        let v4 = self.v4.iter().map(|d| d.name.clone());
        v4.chain(self.v6.iter().map(|d| d.name.clone())).collect()
    }

    /// The IPv4 device name (`flannel.<VNI>`), unless the network is IPv6-only.
    pub fn v4_device_name(&self) -> Option<&str> {
        self.v4.as_ref().map(|d| d.name.as_str())
    }

    /// The IPv6 device name (`flannel-v6.<VNI>`), when IPv6 is enabled.
    pub fn v6_device_name(&self) -> Option<&str> {
        self.v6.as_ref().map(|d| d.name.as_str())
    }

    /// `flannel-v6.<VNI>`'s index, MAC (`BackendV6Data.VtepMAC`) and local address (the
    /// outer IPv6 source), when IPv6 is enabled.
    pub fn v6_vtep(&self) -> Option<(u32, [u8; 6], Ipv6Addr)> {
        self.v6.as_ref().map(|d| (d.ifindex, d.mac, d.local))
    }

    /// The backend options the devices were built with.
    pub fn config(&self) -> &VxlanConfig {
        &self.config
    }

    /// The first device's netlink connection (its request counters show what steady
    /// state costs).
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    /// Peer subnets this backend has programmed (both families).
    pub fn programmed_peers(&self) -> usize {
        self.v4.as_ref().map_or(0, VxlanDevice::programmed_peers)
            + self.v6.as_ref().map_or(0, VxlanDevice::programmed_peers)
    }

    /// Compare everything this backend owns with the kernel and put back what differs:
    /// the devices (re-created with the advertised MAC when gone, taken over again when
    /// replaced), their MTU, MAC, address and up flag, and every peer's neighbour, FDB
    /// entry and route. Returns what had to be written.
    pub async fn check(&mut self, peers: &[Lease]) -> Result<Fixes, Error> {
        self.check_with(peers, None, &Touched::default()).await
    }

    /// A future that reads both devices' tables without borrowing the backend: the
    /// expensive part of a resync, run while lease events go on
    /// ([`check_with`](Self::check_with) compares afterwards).
    pub fn tables_reader(
        &self,
    ) -> impl Future<Output = Result<KernelTables, Error>> + Send + 'static {
        let v4 = self.v4.as_ref().map(VxlanDevice::tables_reader);
        let v6 = self.v6.as_ref().map(VxlanDevice::tables_reader);
        let guard = self.guard.as_ref().and_then(PeerGuard::reader);
        async move {
            Ok(KernelTables {
                v4: match v4 {
                    Some(f) => Some(f.await?),
                    None => None,
                },
                v6: match v6 {
                    Some(f) => Some(f.await?),
                    None => None,
                },
                guard: match guard {
                    Some(f) => Some(f.await),
                    None => None,
                },
            })
        }
    }

    /// [`check`](Self::check) against `tables` read earlier by
    /// [`tables_reader`](Self::tables_reader); the subnets in `touched` were changed by
    /// lease events since and are left as those made them.
    pub async fn check_with(
        &mut self,
        peers: &[Lease],
        tables: Option<KernelTables>,
        touched: &Touched,
    ) -> Result<Fixes, Error> {
        let (t4, t6, tg) = tables.map_or((None, None, None), |t| (t.v4, t.v6, t.guard));
        if let Some(guard) = &mut self.guard {
            let own = self.own;
            let senders = peers
                .iter()
                .filter(|l| !is_own(own, l) && guarded(l))
                .map(|l| (l.id(), guarded_senders(l)));
            guard
                .replace_all_with(senders, tg)
                .await
                .map_err(Error::from)?;
        }
        let mut fixes = match &mut self.v4 {
            Some(v4) => v4.check_with(peers, t4, &touched.v4).await,
            None => Ok(Fixes::new()),
        };
        if let Some(v6) = &mut self.v6 {
            // One family's failure does not keep the other from being repaired.
            let more = v6.check_with(peers, t6, &touched.v6).await;
            fixes = match (fixes, more) {
                (Ok(mut a), Ok(b)) => {
                    a.extend(b);
                    Ok(a)
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        fixes
    }
}

/// The VTEP MACs a host published before, per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtepMacs {
    /// `BackendData.VtepMAC`.
    pub v4: Option<MacAddr>,
    /// `BackendV6Data.VtepMAC`.
    pub v6: Option<MacAddr>,
}

impl Backend for KernelVxlan {
    async fn prepare(&mut self) -> Result<LeaseAttrs> {
        let v4 = match &mut self.v4 {
            Some(d) => Some(d.prepare().await?),
            None => None,
        };
        let v6 = match &mut self.v6 {
            Some(d) => Some(d.prepare().await?),
            None => None,
        };
        let ext = &self.ext;
        Ok(LeaseAttrs {
            // 0.0.0.0 on an IPv6-only host, as upstream's zero `PublicIP`.
            public_ip: ext.public_ip,
            public_ipv6: ext.public_ipv6.filter(|_| v6.is_some()),
            backend: BackendAttrs::Vxlan { v4, v6 },
        })
    }

    async fn register(&mut self, own: &Lease) -> Result<()> {
        self.own = Some(own.id());
        if let (Some(d), Some(sn)) = (&mut self.v4, own.subnet) {
            d.register(sn).await?;
        }
        if let (Some(d), Some(sn6)) = (&mut self.v6, own.ipv6_subnet) {
            d.register(sn6).await?;
        }
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        // Accepted before we send to it, so its first replies get through.
        if let Some(guard) = &mut self.guard
            && !is_own(self.own, peer)
            && guarded(peer)
        {
            guard
                .set_peer(peer.id(), guarded_senders(peer))
                .await
                .map_err(Error::from)?;
        }
        if let Some(d) = &mut self.v4 {
            d.add_peer(peer).await?;
        }
        if let Some(d) = &mut self.v6 {
            d.add_peer(peer).await?;
        }
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<()> {
        if is_own(self.own, peer) {
            return Ok(());
        }
        if let Some(d) = &mut self.v4 {
            d.remove_peer(peer).await?;
        }
        if let Some(d) = &mut self.v6 {
            d.remove_peer(peer).await?;
        }
        // Stop accepting its VXLAN only once nothing routes to it any more.
        if let Some(guard) = &mut self.guard {
            guard.remove_peer(peer.id()).await.map_err(Error::from)?;
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<()> {
        let fixes = self.check(peers).await?;
        debug!(
            peers = peers.len(),
            written = fixes.len(),
            "VXLAN state reconciled"
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
        self.set_external(ext);
        let fixes = self.check(peers).await?;
        debug!(
            written = fixes.len(),
            "VXLAN devices follow the new uplink address"
        );
        Ok(())
    }

    /// The smaller device MTU: pods' packets of either family then fit.
    fn mtu(&self) -> u32 {
        let mtus = self
            .v4
            .iter()
            .map(|d| d.mtu)
            .chain(self.v6.iter().map(|d| d.mtu));
        // `new` refuses to build a backend without a device.
        mtus.min().unwrap_or_default()
    }
}

fn arp_entry<N: NlFamily>(ifindex: u32, ip: N::Addr, mac: [u8; 6]) -> NeighbourMessage {
    let mut n = arp_del::<N>(ifindex, ip);
    n.header.state = NeighbourState::Permanent;
    n.header.kind = RouteType::Unicast;
    n.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    n
}

fn arp_del<N: NlFamily>(ifindex: u32, ip: N::Addr) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = N::AF;
    n.header.ifindex = ifindex;
    n.attributes
        .push(NeighbourAttribute::Destination(N::neigh_addr(ip)));
    n
}

fn fdb_entry<N: NlFamily>(ifindex: u32, mac: [u8; 6], remote: N::Addr) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Bridge;
    n.header.ifindex = ifindex;
    n.header.flags = NeighbourFlags::Own;
    n.header.state = NeighbourState::Permanent;
    n.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    n.attributes
        .push(NeighbourAttribute::Destination(N::neigh_addr(remote)));
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(backend_type: &str, data: Option<&str>) -> Lease {
        Lease {
            subnet: Some("10.244.2.0/24".parse().unwrap()),
            ipv6_subnet: None,
            extra_senders: Vec::new(),
            attrs: LeaseAttrs {
                public_ip: "198.18.0.2".parse().unwrap(),
                public_ipv6: None,
                backend: BackendAttrs::parse(backend_type, data, None).unwrap(),
            },
        }
    }

    #[test]
    fn peer_is_read_from_typed_lease_data() {
        let p = parse_peer::<Ipv4Network>(&lease(
            "vxlan",
            Some(r#"{"vni":1,"vtepmac":"0E:2A:BC:01:02:FF"}"#),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.vtep_mac, [0x0e, 0x2a, 0xbc, 0x01, 0x02, 0xff]);
        assert_eq!(p.public_ip, Ipv4Addr::new(198, 18, 0, 2));
    }

    #[test]
    fn the_ipv6_half_is_read_from_v6_fields_and_optional() {
        let mut l = lease("vxlan", Some(r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:04"}"#));
        // No IPv6 subnet, or one without v6 data / PublicIPv6: nothing to program.
        assert_eq!(parse_peer::<Ipv6Network>(&l), Ok(None));
        l.ipv6_subnet = Some("fd00:10:244:2::/64".parse().unwrap());
        assert_eq!(parse_peer::<Ipv6Network>(&l), Ok(None));
        l.attrs.public_ipv6 = Some("fd00:198::2".parse().unwrap());
        assert_eq!(parse_peer::<Ipv6Network>(&l), Ok(None));
        l.attrs.backend = BackendAttrs::parse(
            "vxlan",
            Some(r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:04"}"#),
            Some(r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:06"}"#),
        )
        .unwrap();
        let p = parse_peer::<Ipv6Network>(&l).unwrap().unwrap();
        assert_eq!(p.subnet, l.ipv6_subnet.unwrap());
        assert_eq!(p.public_ip, l.attrs.public_ipv6.unwrap());
        assert_eq!(p.vtep_mac[5], 6);
        // The IPv4 half keeps its own data.
        let p4 = parse_peer::<Ipv4Network>(&l).unwrap().unwrap();
        assert_eq!(p4.vtep_mac[5], 4);
    }

    #[test]
    fn unusable_peers_are_errors_naming_the_lease() {
        let e = parse_peer::<Ipv4Network>(&lease("host-gw", None)).unwrap_err();
        assert!(matches!(e, PeerError::WrongBackend { .. }));
        let e = parse_peer::<Ipv4Network>(&lease("vxlan", None)).unwrap_err();
        assert!(matches!(e, PeerError::MissingData { .. }));
        assert_eq!(peer_vtep_mac(&lease("vxlan", Some("null"))), None);
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..64 {
            let m = random_mac();
            assert_eq!(m[0] & 0x03, 0x02);
        }
    }
}

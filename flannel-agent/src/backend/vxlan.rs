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
//! 3. route `<peer subnet> via <peer subnet base> dev flannel.N onlink`.
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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use ipnetwork::Ipv4Network;
use netlink_packet_route::{
    AddressFamily,
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteType},
};
use tracing::{debug, info, warn};

use super::{Backend, ExternalInterface, Result};
use crate::{
    lease::{BackendAttrs, Lease, LeaseAttrs, MacAddr, VxlanBackendData},
    net::{
        netlink::{self, Netlink},
        vxlan_guard::PeerGuard,
    },
    netconf::VxlanConfig,
    repair::{self, RepairKind},
};

pub use crate::net::netlink::RTPROT_FLANNEL;

/// VXLAN encapsulation overhead over IPv4 (outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet
/// 14), subtracted from the uplink MTU for the device and the pods.
pub const VXLAN_OVERHEAD: u32 = flannel_common::wire::VXLAN_OVERHEAD as u32;

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
        subnet: Ipv4Network,
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
        subnet: Ipv4Network,
        /// Its backend type.
        found: String,
    },
    /// No `BackendData`.
    #[error("lease {subnet}: BackendData is missing")]
    MissingData {
        /// The peer's subnet.
        subnet: Ipv4Network,
    },
}

/// What a VXLAN peer's lease says, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanPeer {
    /// The peer's pod subnet.
    pub subnet: Ipv4Network,
    /// Where to send its VXLAN packets.
    pub public_ip: Ipv4Addr,
    /// Its VTEP (device) MAC: the inner destination MAC its kernel accepts.
    pub vtep_mac: [u8; 6],
}

/// A peer's lease as a VXLAN peer: `BackendType` must be `vxlan` with an IPv4 VTEP (the
/// lease was parsed and validated by the subnet manager; the `VNI` is informational
/// upstream and ignored here too).
pub fn parse_peer(lease: &Lease) -> Result<VxlanPeer, PeerError> {
    let subnet = lease.subnet;
    match &lease.attrs.backend {
        BackendAttrs::Vxlan { v4: Some(data), .. } => Ok(VxlanPeer {
            subnet,
            public_ip: lease.attrs.public_ip,
            vtep_mac: data.vtep_mac.octets(),
        }),
        BackendAttrs::Vxlan { v4: None, .. } => Err(PeerError::MissingData { subnet }),
        other => Err(PeerError::WrongBackend {
            subnet,
            found: other.type_name().to_owned(),
        }),
    }
}

/// The peer's VTEP MAC, or `None` with a warning naming the lease and field.
pub fn peer_vtep_mac(peer: &Lease) -> Option<[u8; 6]> {
    match parse_peer(peer) {
        Ok(p) => Some(p.vtep_mac),
        Err(e) => {
            warn!(subnet = %peer.subnet, error = %e, "skipping peer");
            None
        }
    }
}

/// A random locally-administered unicast MAC (upstream `pkg/mac`).
fn random_mac() -> [u8; 6] {
    MacAddr::random_local().octets()
}

/// How one peer subnet is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Through the VXLAN device.
    Vxlan {
        vtep_mac: [u8; 6],
        public_ip: Ipv4Addr,
    },
    /// A plain route via the peer's public IP on the uplink (DirectRouting).
    Direct { gateway: Ipv4Addr, oif: u32 },
}

impl std::fmt::Display for Target {
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

/// The kernel VXLAN backend.
pub struct KernelVxlan {
    nl: Netlink,
    ext: ExternalInterface,
    config: VxlanConfig,
    name: String,
    ifindex: u32,
    mac: [u8; 6],
    mtu: u32,
    own: Option<Ipv4Network>,
    /// The nftables peer guard, when VXLAN is accepted only from known peers.
    guard: Option<PeerGuard>,
    /// What is programmed per peer subnet, as far as this backend knows: read from the
    /// kernel by the first peer event or reconcile, rebuilt by every reconcile, kept in
    /// step by every peer event, so an event is turned into the difference without
    /// reading any table.
    programmed: Option<BTreeMap<Ipv4Network, Target>>,
}

/// The underlay addresses a VXLAN peer may send from: where its packets to us come from.
pub fn sender_addresses(lease: &Lease) -> Vec<Ipv4Addr> {
    vec![lease.attrs.public_ip]
}

/// Netlink requests in flight at once while reconciling (pipelined on one socket; the
/// bound keeps the socket's receive buffer from overflowing with acknowledgements).
const NETLINK_BATCH: usize = 64;

impl KernelVxlan {
    /// Build the backend for this host: opens netlink and creates (or adopts) the device,
    /// so [`vxlan_ifindex`](Self::vxlan_ifindex) and [`vtep_mac`](Self::vtep_mac) are valid
    /// from here on.
    pub async fn new(ext: ExternalInterface, config: VxlanConfig) -> Result<Self> {
        Self::with_vtep_mac(ext, config, None).await
    }

    /// Like [`new`](Self::new), with the VTEP MAC this host published before (its previous
    /// lease, read back from the store): the device is created with it, or an existing
    /// device is given it, so peers' neighbour and FDB entries stay valid across a reboot
    /// (upstream reads it back from the lease / node annotation too).
    pub async fn with_vtep_mac(
        ext: ExternalInterface,
        config: VxlanConfig,
        vtep_mac: Option<MacAddr>,
    ) -> Result<Self> {
        let base = config.mtu.unwrap_or(ext.mtu);
        let mtu = base
            .checked_sub(VXLAN_OVERHEAD)
            .filter(|m| *m >= 68)
            .ok_or(Error::MtuTooSmall { mtu: base })?;
        let nl = Netlink::connect().map_err(Error::from)?;
        let mut this = Self {
            nl,
            name: format!("flannel.{}", config.vni),
            ext,
            config,
            ifindex: 0,
            mac: vtep_mac.map_or([0; 6], MacAddr::octets),
            mtu,
            own: None,
            guard: None,
            programmed: None,
        };
        this.ensure_device().await?;
        Ok(this)
    }

    /// Accept VXLAN only from known peers on the kernel path too: keep the nftables guard
    /// ([`crate::net::vxlan_guard`]) equal to the peer set from now on.
    pub fn enable_peer_guard(&mut self) {
        self.guard = Some(PeerGuard::new(self.config.port));
    }

    /// Index of `flannel.<VNI>`.
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

    /// The device name (`flannel.<VNI>`).
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
    async fn record(&mut self) -> Result<&mut BTreeMap<Ipv4Network, Target>, Error> {
        if self.programmed.is_none() {
            self.programmed = Some(self.read_programmed().await?);
        }
        Ok(self.programmed.get_or_insert_default())
    }

    /// What the kernel holds of ours, per peer subnet: VXLAN peers (route via the subnet
    /// base on the device, its neighbour's MAC, that MAC's FDB destination) and direct
    /// routes. Three dumps; used when there is no record yet.
    async fn read_programmed(&self) -> Result<BTreeMap<Ipv4Network, Target>, Error> {
        let mac_of: BTreeMap<Ipv4Addr, [u8; 6]> = self
            .nl
            .neighbours(AddressFamily::Inet, self.ifindex)
            .await?
            .iter()
            .filter(|n| n.header.state == NeighbourState::Permanent)
            .filter_map(|n| match netlink::neigh_dst(n)? {
                IpAddr::V4(ip) => Some((ip, netlink::neigh_lladdr(n)?)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let dst_of: BTreeMap<[u8; 6], Ipv4Addr> = self
            .nl
            .neighbours(AddressFamily::Bridge, self.ifindex)
            .await?
            .iter()
            .filter_map(|n| match netlink::neigh_dst(n)? {
                IpAddr::V4(ip) => Some((netlink::neigh_lladdr(n)?, ip)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut out = BTreeMap::new();
        for r in self.nl.routes_v4().await? {
            if !self.owns_route(&r) {
                continue;
            }
            let (Some(dst), Some(gw), Some(oif)) = (
                netlink::route_dst_v4(&r),
                netlink::route_gateway_v4(&r),
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
              local = %self.ext.iface_addr, uplink = %self.ext.name, mtu = self.mtu,
              mac = %MacAddr(mac), "created VXLAN device");
        self.adopt(&link).await
    }

    fn device_message(&self, mac: [u8; 6]) -> LinkMessage {
        let mut b = rtnetlink::LinkVxlan::new(&self.name, self.config.vni)
            .dev(self.ext.index)
            .local(self.ext.iface_addr)
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
                InfoVxlan::Local(ip) if !ip.is_unspecified() && ip != self.ext.iface_addr => {
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
    async fn ensure_registered(&mut self, own: Ipv4Network) -> Result<Fixes, Error> {
        let mut fixes = Fixes::new();
        let want = own.network();
        let mut present = false;
        for (addr, len) in self.nl.addresses_v4(self.ifindex).await? {
            if (addr, len) == (want, 32) {
                present = true;
            } else {
                info!(device = %self.name, address = %format!("{addr}/{len}"), "removing stale address");
                self.nl.addr_del_v4(self.ifindex, addr, len).await?;
            }
        }
        if !present {
            self.nl.addr_replace_v4(self.ifindex, want, 32).await?;
            fixes.push((
                RepairKind::DeviceSettings,
                format!("{} address {want}/32", self.name),
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

    /// The desired target of one lease, or `None` (logged) when it can't be programmed.
    async fn target(&self, lease: &Lease) -> Result<Option<Target>, Error> {
        if Some(lease.subnet) == self.own {
            return Ok(None);
        }
        let peer = match parse_peer(lease) {
            Ok(p) => p,
            Err(e) => {
                warn!(subnet = %lease.subnet, error = %e, "skipping peer");
                return Ok(None);
            }
        };
        if self.config.direct_routing
            && let Some(oif) = self.on_link(peer.public_ip).await?
        {
            return Ok(Some(Target::Direct {
                gateway: peer.public_ip,
                oif,
            }));
        }
        Ok(Some(Target::Vxlan {
            vtep_mac: peer.vtep_mac,
            public_ip: peer.public_ip,
        }))
    }

    /// The output interface when `ip` is directly connected (its route has no gateway).
    async fn on_link(&self, ip: Ipv4Addr) -> Result<Option<u32>, Error> {
        let route = match self.nl.route_get_v4(ip).await {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = %ip, error = %e, "no route to peer; not using direct routing");
                return Ok(None);
            }
        };
        if netlink::route_gateway_v4(&route).is_some() {
            return Ok(None);
        }
        Ok(netlink::route_oif(&route))
    }

    /// Program one subnet (neighbour, FDB, route for VXLAN; one route for direct), undoing
    /// the earlier steps when a later one fails, as upstream.
    async fn program(&self, subnet: Ipv4Network, target: Target) -> Result<(), Error> {
        match target {
            Target::Vxlan {
                vtep_mac,
                public_ip,
            } => {
                let base = subnet.network();
                self.nl
                    .neigh_replace(arp_entry(self.ifindex, base, vtep_mac))
                    .await?;
                if let Err(e) = self
                    .nl
                    .neigh_replace(fdb_entry(self.ifindex, vtep_mac, public_ip))
                    .await
                {
                    let _ = self
                        .nl
                        .neigh_del(arp_entry(self.ifindex, base, vtep_mac))
                        .await;
                    return Err(e.into());
                }
                if let Err(e) = self.nl.route_replace(self.vxlan_route(subnet)).await {
                    let _ = self
                        .nl
                        .neigh_del(fdb_entry(self.ifindex, vtep_mac, public_ip))
                        .await;
                    let _ = self
                        .nl
                        .neigh_del(arp_entry(self.ifindex, base, vtep_mac))
                        .await;
                    return Err(e.into());
                }
            }
            Target::Direct { gateway, oif } => {
                self.nl
                    .route_replace(netlink::gateway_route(subnet, gateway, oif))
                    .await?;
            }
        }
        Ok(())
    }

    fn vxlan_route(&self, subnet: Ipv4Network) -> RouteMessage {
        let mut r = netlink::route_base(subnet);
        r.header.flags = RouteFlags::Onlink;
        r.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(
                subnet.network(),
            )));
        r.attributes.push(RouteAttribute::Oif(self.ifindex));
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

    /// Whether a dumped route is exactly what `target` wants for `subnet`.
    fn route_matches(&self, r: &RouteMessage, subnet: Ipv4Network, target: Target) -> bool {
        let (gw, oif) = self.route_target(subnet, target);
        netlink::route_dst_v4(r) == Some(subnet)
            && netlink::route_gateway_v4(r) == Some(gw)
            && netlink::route_oif(r) == Some(oif)
            && self.is_exact_flannel_route(r)
    }

    /// Make the kernel equal `desired` for every entry this backend owns: read the
    /// neighbour, FDB and route tables once, program what is missing or differs and
    /// remove what is stale, many requests in flight at once. Returns the subnets that are
    /// now programmed as desired, and what was missing or wrong and had to be written.
    async fn converge(&self, desired: &BTreeMap<Ipv4Network, Target>) -> Result<Converged, Error> {
        use futures::{StreamExt, stream};
        let neighs = self
            .nl
            .neighbours(AddressFamily::Inet, self.ifindex)
            .await?;
        let fdb = self
            .nl
            .neighbours(AddressFamily::Bridge, self.ifindex)
            .await?;
        let routes = self.nl.routes_v4().await?;
        let mut failed = None;

        // 1. Add or fix what differs (entries already right are not rewritten).
        let routed: BTreeSet<(Ipv4Network, Ipv4Addr, u32)> = routes
            .iter()
            .filter(|r| self.is_exact_flannel_route(r))
            .filter_map(|r| {
                Some((
                    netlink::route_dst_v4(r)?,
                    netlink::route_gateway_v4(r)?,
                    netlink::route_oif(r)?,
                ))
            })
            .collect();
        let neigh_set: BTreeSet<(Ipv4Addr, [u8; 6])> = neighs
            .iter()
            .filter(|n| n.header.state == NeighbourState::Permanent)
            .filter_map(|n| match netlink::neigh_dst(n)? {
                IpAddr::V4(ip) => Some((ip, netlink::neigh_lladdr(n)?)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let fdb_set: BTreeSet<([u8; 6], Ipv4Addr)> = fdb
            .iter()
            .filter_map(|n| match netlink::neigh_dst(n)? {
                IpAddr::V4(ip) => Some((netlink::neigh_lladdr(n)?, ip)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut to_program: Vec<(Ipv4Network, Target)> = Vec::new();
        let mut missing: BTreeMap<Ipv4Network, Fixes> = BTreeMap::new();
        for (subnet, target) in desired {
            let (gw, oif) = self.route_target(*subnet, *target);
            let mut wrong = Fixes::new();
            if !routed.contains(&(*subnet, gw, oif)) {
                wrong.push((RepairKind::Route, format!("route {subnet} ({target})")));
            }
            if let Target::Vxlan {
                vtep_mac,
                public_ip,
            } = *target
            {
                if !neigh_set.contains(&(subnet.network(), vtep_mac)) {
                    wrong.push((
                        RepairKind::Neighbour,
                        format!(
                            "neighbour {} lladdr {} dev {}",
                            subnet.network(),
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
        let mut done: BTreeMap<Ipv4Network, Target> = desired.clone();
        let mut fixes = Fixes::new();
        let results: Vec<(Ipv4Network, Result<(), Error>)> = stream::iter(to_program)
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
        let want_neigh: BTreeSet<(Ipv4Addr, [u8; 6])> = desired
            .iter()
            .filter_map(|(s, t)| match t {
                Target::Vxlan { vtep_mac, .. } => Some((s.network(), *vtep_mac)),
                Target::Direct { .. } => None,
            })
            .collect();
        let want_fdb: BTreeSet<([u8; 6], Ipv4Addr)> = desired
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
            let Some(dst) = netlink::route_dst_v4(r) else {
                continue;
            };
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
            let Some(IpAddr::V4(ip)) = netlink::neigh_dst(n) else {
                continue;
            };
            let keep = netlink::neigh_lladdr(n).is_some_and(|mac| want_neigh.contains(&(ip, mac)))
                && n.header.state == NeighbourState::Permanent;
            if !keep {
                info!(device = %self.name, neighbour = %ip, "removing stale neighbour entry");
                deletions.push(Deletion::Neigh(arp_del(self.ifindex, ip)));
            }
        }
        for n in &fdb {
            // Only VXLAN remote entries (they have a destination); others are the kernel's.
            let (Some(IpAddr::V4(dst)), Some(mac)) =
                (netlink::neigh_dst(n), netlink::neigh_lladdr(n))
            else {
                continue;
            };
            if !want_fdb.contains(&(mac, dst)) {
                info!(device = %self.name, mac = %MacAddr(mac), dst = %dst, "removing stale FDB entry");
                deletions.push(Deletion::Neigh(fdb_entry(self.ifindex, mac, dst)));
            }
        }
        // Routes first (the order above), so nothing is sent to a half-removed peer; the
        // batches keep that order between kinds because routes are queued first.
        let results: Vec<Result<bool, netlink::Error>> = stream::iter(deletions)
            .map(|d| async move {
                match d {
                    Deletion::Route(r) => self.nl.route_del(r).await,
                    Deletion::Neigh(n) => self.nl.neigh_del(n).await,
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
    fn route_target(&self, subnet: Ipv4Network, target: Target) -> (Ipv4Addr, u32) {
        match target {
            Target::Vxlan { .. } => (subnet.network(), self.ifindex),
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
                .any(|a| matches!(a, RouteAttribute::Priority(p) if *p != 0))
    }

    /// The desired state for `peers`, skipping (with a warning) leases we can't program.
    async fn desired(&self, peers: &[Lease]) -> Result<BTreeMap<Ipv4Network, Target>, Error> {
        let mut desired = BTreeMap::new();
        for lease in peers {
            if let Some(t) = self.target(lease).await? {
                desired.insert(lease.subnet, t);
            }
        }
        Ok(desired)
    }

    /// Remove what was programmed for `subnet` as `target`, routes first, so nothing is
    /// sent to a half-removed peer. Entries already gone are fine.
    async fn unprogram(&self, subnet: Ipv4Network, target: Target) -> Result<(), Error> {
        match target {
            Target::Vxlan {
                vtep_mac,
                public_ip,
            } => {
                self.nl.route_del(self.vxlan_route(subnet)).await?;
                self.nl
                    .neigh_del(fdb_entry(self.ifindex, vtep_mac, public_ip))
                    .await?;
                self.nl
                    .neigh_del(arp_del(self.ifindex, subnet.network()))
                    .await?;
            }
            Target::Direct { gateway, oif } => {
                self.nl
                    .route_del(netlink::gateway_route(subnet, gateway, oif))
                    .await?;
            }
        }
        Ok(())
    }
}

/// A stale entry to delete.
enum Deletion {
    Route(RouteMessage),
    Neigh(NeighbourMessage),
}

/// What [`KernelVxlan::converge`] achieved.
struct Converged {
    /// The subnets now programmed as desired.
    done: BTreeMap<Ipv4Network, Target>,
    /// The last programming error, if any peer failed.
    failed: Option<Error>,
    /// What was missing or wrong and was written.
    fixes: Fixes,
}

impl KernelVxlan {
    /// Compare everything this backend owns with the kernel and put back what differs:
    /// the device (re-created with the advertised MAC when gone, taken over again when
    /// replaced), its MTU, MAC, address and up flag, and every peer's neighbour, FDB entry
    /// and route. Returns what had to be written.
    pub async fn check(&mut self, peers: &[Lease]) -> Result<Fixes, Error> {
        let mut fixes = self.check_device().await?;
        if let Some(own) = self.own {
            fixes.extend(self.ensure_registered(own).await?);
        }
        if let Some(guard) = &mut self.guard {
            let own = self.own;
            let senders = peers
                .iter()
                .filter(|l| Some(l.subnet) != own && parse_peer(l).is_ok())
                .map(|l| (l.subnet, sender_addresses(l)));
            guard.replace_all(senders).await.map_err(Error::from)?;
        }
        let desired = self.desired(peers).await?;
        let converged = self.converge(&desired).await?;
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

impl Backend for KernelVxlan {
    async fn prepare(&mut self) -> Result<LeaseAttrs> {
        self.ensure_device().await?;
        let vtep = VxlanBackendData {
            vni: self.config.vni,
            vtep_mac: MacAddr(self.mac),
        };
        Ok(LeaseAttrs {
            public_ipv6: self.ext.public_ipv6,
            ..LeaseAttrs::vxlan(self.ext.public_ip, vtep)
        })
    }

    async fn register(&mut self, own: &Lease) -> Result<()> {
        self.own = Some(own.subnet);
        if own.subnet.prefix() > 31 {
            return Err(Error::OwnLease {
                subnet: own.subnet,
                reason: "a /32 subnet leaves no pod addresses".into(),
            }
            .into());
        }
        self.ensure_registered(own.subnet).await?;
        info!(device = %self.name, address = %format!("{}/32", own.subnet.network()), "VXLAN device registered");
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        let Some(target) = self.target(peer).await? else {
            return Ok(());
        };
        // Accepted before we send to it, so its first replies get through.
        if let Some(guard) = &mut self.guard {
            guard
                .set_peer(peer.subnet, sender_addresses(peer))
                .await
                .map_err(Error::from)?;
        }
        let old = self.record().await?.remove(&peer.subnet);
        match old {
            // Same kind: the neighbour and route are replaced in place; only an FDB entry
            // for a MAC or address the lease no longer has must go (after, so the subnet is
            // never without a route).
            Some(Target::Vxlan { .. }) | None if matches!(target, Target::Vxlan { .. }) => {}
            Some(Target::Direct { .. }) if matches!(target, Target::Direct { .. }) => {}
            // Between VXLAN and direct routing the old route has another gateway or
            // device: everything of the subnet goes first.
            Some(old) => self.unprogram(peer.subnet, old).await?,
            None => {}
        }
        self.program(peer.subnet, target).await?;
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
                .neigh_del(fdb_entry(self.ifindex, old_mac, old_ip))
                .await
                .map_err(Error::from)?;
        }
        self.record().await?.insert(peer.subnet, target);
        info!(subnet = %peer.subnet, public_ip = %peer.attrs.public_ip, ?target, "peer programmed");
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<()> {
        if Some(peer.subnet) == self.own {
            return Ok(());
        }
        // Only what the record says was programmed: entries nobody recorded are stale
        // state, which the next reconcile removes.
        match self.record().await?.get(&peer.subnet).copied() {
            Some(target) => {
                self.unprogram(peer.subnet, target).await?;
                self.record().await?.remove(&peer.subnet);
                info!(subnet = %peer.subnet, "peer removed");
            }
            None => debug!(subnet = %peer.subnet, "peer was not programmed; nothing to remove"),
        }
        // Stop accepting its VXLAN only once nothing routes to it any more.
        if let Some(guard) = &mut self.guard {
            guard.remove_peer(peer.subnet).await.map_err(Error::from)?;
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

    fn mtu(&self) -> u32 {
        self.mtu
    }
}

fn arp_entry(ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> NeighbourMessage {
    let mut n = arp_del(ifindex, ip);
    n.header.state = NeighbourState::Permanent;
    n.header.kind = RouteType::Unicast;
    n.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    n
}

fn arp_del(ifindex: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Inet;
    n.header.ifindex = ifindex;
    n.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    n
}

fn fdb_entry(ifindex: u32, mac: [u8; 6], remote: Ipv4Addr) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Bridge;
    n.header.ifindex = ifindex;
    n.header.flags = NeighbourFlags::Own;
    n.header.state = NeighbourState::Permanent;
    n.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    n.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            remote,
        )));
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(backend_type: &str, data: Option<&str>) -> Lease {
        Lease {
            subnet: "10.244.2.0/24".parse().unwrap(),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: "198.18.0.2".parse().unwrap(),
                public_ipv6: None,
                backend: BackendAttrs::parse(backend_type, data, None).unwrap(),
            },
        }
    }

    #[test]
    fn peer_is_read_from_typed_lease_data() {
        let p = parse_peer(&lease(
            "vxlan",
            Some(r#"{"vni":1,"vtepmac":"0E:2A:BC:01:02:FF"}"#),
        ))
        .unwrap();
        assert_eq!(p.vtep_mac, [0x0e, 0x2a, 0xbc, 0x01, 0x02, 0xff]);
        assert_eq!(p.public_ip, Ipv4Addr::new(198, 18, 0, 2));
    }

    #[test]
    fn unusable_peers_are_errors_naming_the_lease() {
        let e = parse_peer(&lease("host-gw", None)).unwrap_err();
        assert!(matches!(e, PeerError::WrongBackend { .. }));
        let e = parse_peer(&lease("vxlan", None)).unwrap_err();
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

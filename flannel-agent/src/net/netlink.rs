//! Shared rtnetlink helpers: one connection in the current network namespace, and the
//! handful of typed operations the kernel datapaths need (links, addresses, neighbours,
//! FDB entries, routes).
//!
//! Why a wrapper at all: rtnetlink's builders report "already exists" and "not found" as an
//! opaque `NetlinkError`, and every backend wants the same answers to "does it exist?",
//! "make it so" and "make sure it's gone". Those mappings (EEXIST, ENOENT, ESRCH, ENODEV,
//! EADDRNOTAVAIL) live here once. Messages are built from plain `netlink-packet-route`
//! structs so callers can express exactly what upstream flannel sends (for example an FDB
//! entry with `NTF_SELF` and no VNI/port attributes).
//!
//! The socket is bound to the network namespace of the thread that calls
//! [`Netlink::connect`]; tests rely on that by entering a namespace on a dedicated thread
//! before building their runtime.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::StreamExt;
use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::proto::{ConnectionHandle, sys::SocketAddr};

use crate::{
    net::nexthop::{Nexthop, NexthopMessage},
    wire::cidr::Cidr,
};

/// How one address family's addresses appear in rtnetlink messages: everything the
/// address, route and neighbour helpers below need to be written once for IPv4 and IPv6.
pub trait NlFamily: Cidr {
    /// `AF_INET` or `AF_INET6`.
    const AF: AddressFamily;
    /// The metric the kernel gives a route added without one: 0 for IPv4, 1024 for IPv6
    /// (`IP6_RT_PRIO_USER`), so a dump of a route we wrote shows it.
    const DEFAULT_METRIC: u32;
    /// The address as a route attribute value.
    fn route_addr(addr: Self::Addr) -> RouteAddress;
    /// The address of a route attribute, when it is of this family.
    fn of_route_addr(addr: &RouteAddress) -> Option<Self::Addr>;
    /// The address as a neighbour destination.
    fn neigh_addr(addr: Self::Addr) -> NeighbourAddress;
    /// The address, when `ip` is of this family.
    fn of_ip(ip: IpAddr) -> Option<Self::Addr>;
    /// Whether this family's peer routes name nexthop objects (see [`crate::net::nexthop`]
    /// for why IPv4 routes do and IPv6 routes need not).
    const NEXTHOP_OBJECTS: bool;
    /// The id of the nexthop object a peer route to `subnet` names: the subnet's base
    /// address as a number, distinct for distinct leases of one network and stable across
    /// restarts, so a dump tells which subnet a nexthop is for.
    fn nexthop_id(subnet: Self) -> Option<u32> {
        if !Self::NEXTHOP_OBJECTS {
            return None;
        }
        u32::try_from(Self::addr_bits(crate::wire::cidr::base(subnet)))
            .ok()
            .filter(|id| *id != 0)
    }
}

impl NlFamily for Ipv4Network {
    const AF: AddressFamily = AddressFamily::Inet;
    const DEFAULT_METRIC: u32 = 0;
    const NEXTHOP_OBJECTS: bool = true;
    fn route_addr(addr: Ipv4Addr) -> RouteAddress {
        RouteAddress::Inet(addr)
    }
    fn of_route_addr(addr: &RouteAddress) -> Option<Ipv4Addr> {
        match addr {
            RouteAddress::Inet(a) => Some(*a),
            _ => None,
        }
    }
    fn neigh_addr(addr: Ipv4Addr) -> NeighbourAddress {
        NeighbourAddress::Inet(addr)
    }
    fn of_ip(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

impl NlFamily for Ipv6Network {
    const AF: AddressFamily = AddressFamily::Inet6;
    const DEFAULT_METRIC: u32 = 1024;
    const NEXTHOP_OBJECTS: bool = false;
    fn route_addr(addr: Ipv6Addr) -> RouteAddress {
        RouteAddress::Inet6(addr)
    }
    fn of_route_addr(addr: &RouteAddress) -> Option<Ipv6Addr> {
        match addr {
            RouteAddress::Inet6(a) => Some(*a),
            _ => None,
        }
    }
    fn neigh_addr(addr: Ipv6Addr) -> NeighbourAddress {
        NeighbourAddress::Inet6(addr)
    }
    fn of_ip(ip: IpAddr) -> Option<Ipv6Addr> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
}

/// Errors of netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {source}")]
    Connect {
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel rejected a request.
    #[error("netlink {op} failed: {source} (errno {errno})")]
    Kernel {
        /// What was attempted (e.g. `"add link flannel.1"`).
        op: String,
        /// Positive errno.
        errno: i32,
        /// The errno as an I/O error (for its message).
        #[source]
        source: std::io::Error,
    },
    /// The request could not be sent (the connection task is gone).
    #[error("netlink {op}: request could not be sent")]
    Transport {
        /// What was attempted.
        op: String,
    },
    /// The kernel answered with something other than what was asked for.
    #[error("netlink {op}: unexpected reply")]
    Unexpected {
        /// What was attempted.
        op: String,
    },
}

impl Error {
    /// The errno of a kernel rejection, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the kernel said the object already exists.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// Whether the kernel said the object (or its device) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT | libc::ESRCH | libc::ENODEV | libc::EADDRNOTAVAIL)
        )
    }
}

/// Result of netlink operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// A route-netlink connection in the network namespace it was opened in.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    /// A second socket for nexthop objects, whose messages `rtnetlink` cannot carry.
    nexthops: ConnectionHandle<NexthopMessage>,
    /// Dump requests sent on this connection (all clones), so tests and metrics can see
    /// that steady-state work never re-reads whole tables.
    dumps: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Netlink {
    /// Open a connection in the calling thread's network namespace. The connection task is
    /// spawned on the current tokio runtime and ends when the last clone is dropped (its
    /// owner's lifetime: a backend, a resync task).
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| Error::Connect { source })?;
        tokio::spawn(conn);
        let (conn, nexthops, _) = rtnetlink::proto::new_connection::<NexthopMessage>(
            rtnetlink::sys::protocols::NETLINK_ROUTE,
        )
        .map_err(|source| Error::Connect { source })?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            nexthops,
            dumps: Default::default(),
        })
    }

    /// How many dump requests (whole-table reads) this connection has sent.
    pub fn dump_count(&self) -> u64 {
        self.dumps.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The raw rtnetlink handle, for requests this module does not wrap.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// Send a request that expects only an acknowledgement.
    async fn ack(&self, op: impl Into<String>, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        let op = op.into();
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        let mut replies = handle
            .request(req)
            .map_err(|_| Error::Transport { op: op.clone() })?;
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(err) = reply.payload
                && err.code.is_some()
            {
                return Err(kernel_error(op, err.raw_code()));
            }
        }
        Ok(())
    }

    /// Send a request and collect every inner reply (dumps and single gets).
    async fn collect(
        &self,
        op: impl Into<String>,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let op = op.into();
        if flags & NLM_F_DUMP == NLM_F_DUMP {
            self.dumps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        let mut handle = self.handle.clone();
        let mut replies = handle
            .request(req)
            .map_err(|_| Error::Transport { op: op.clone() })?;
        let mut out = Vec::new();
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(kernel_error(op, err.raw_code()));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    // ---- links ----

    /// Every link.
    pub async fn links(&self) -> Result<Vec<LinkMessage>> {
        let replies = self
            .collect(
                "dump links",
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// The link called `name`, if it exists.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        self.one_link(format!("get link {name}"), msg).await
    }

    /// The link with index `index`, if it exists.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.one_link(format!("get link #{index}"), msg).await
    }

    async fn one_link(&self, op: String, msg: LinkMessage) -> Result<Option<LinkMessage>> {
        match self
            .collect(op.clone(), RouteNetlinkMessage::GetLink(msg), 0)
            .await
        {
            Ok(replies) => replies
                .into_iter()
                .find_map(|m| match m {
                    RouteNetlinkMessage::NewLink(l) => Some(l),
                    _ => None,
                })
                .map(Some)
                .ok_or(Error::Unexpected { op }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a link (fails with EEXIST if the name is taken).
    pub async fn link_add(&self, msg: LinkMessage) -> Result<()> {
        let op = format!("add link {}", link_name(&msg).unwrap_or("?"));
        self.ack(
            op,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .await
    }

    /// Change attributes of an existing link (flags, MTU, address).
    pub async fn link_set(&self, msg: LinkMessage) -> Result<()> {
        let op = format!("set link #{}", msg.header.index);
        self.ack(op, RouteNetlinkMessage::SetLink(msg), 0).await
    }

    /// Delete a link; `Ok(false)` if it was already gone.
    pub async fn link_del(&self, index: u32) -> Result<bool> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        absent_ok(
            self.ack(
                format!("delete link #{index}"),
                RouteNetlinkMessage::DelLink(msg),
                0,
            )
            .await,
        )
    }

    // ---- addresses ----

    /// IPv4 addresses on link `index`, as (address, prefix length).
    pub async fn addresses_v4(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        self.addresses::<Ipv4Network>(index).await
    }

    /// Addresses of family `N` on link `index`, as (address, prefix length).
    pub async fn addresses<N: NlFamily>(&self, index: u32) -> Result<Vec<(N::Addr, u8)>> {
        let mut msg = AddressMessage::default();
        msg.header.family = N::AF;
        let replies = self
            .collect(
                "dump addresses",
                RouteNetlinkMessage::GetAddress(msg),
                NLM_F_DUMP,
            )
            .await?;
        let ip = |a: &AddressMessage, local: bool| {
            a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(ip) if local => N::of_ip(*ip),
                AddressAttribute::Address(ip) if !local => N::of_ip(*ip),
                _ => None,
            })
        };
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let addr = ip(&a, true).or_else(|| ip(&a, false))?;
                    Some((addr, a.header.prefix_len))
                }
                _ => None,
            })
            .collect())
    }

    fn addr_msg<N: NlFamily>(index: u32, addr: N::Addr, prefix_len: u8) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.family = N::AF;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        // IPv6 has no IFA_LOCAL (the kernel rejects a mismatching pair less kindly).
        if N::AF == AddressFamily::Inet {
            msg.attributes.push(AddressAttribute::Local(addr.into()));
        }
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        msg
    }

    /// Add `addr/prefix_len` to link `index` (no error if it is already there).
    pub async fn addr_replace_v4(&self, index: u32, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        self.addr_replace::<Ipv4Network>(index, addr, prefix_len)
            .await
    }

    /// Add `addr/prefix_len` (family `N`) to link `index` (no error if it is already there).
    pub async fn addr_replace<N: NlFamily>(
        &self,
        index: u32,
        addr: N::Addr,
        prefix_len: u8,
    ) -> Result<()> {
        self.ack(
            format!("add address {addr}/{prefix_len} on #{index}"),
            RouteNetlinkMessage::NewAddress(Self::addr_msg::<N>(index, addr, prefix_len)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }

    /// Remove `addr/prefix_len` from link `index`; `Ok(false)` if it was not there.
    pub async fn addr_del_v4(&self, index: u32, addr: Ipv4Addr, prefix_len: u8) -> Result<bool> {
        self.addr_del::<Ipv4Network>(index, addr, prefix_len).await
    }

    /// Remove `addr/prefix_len` (family `N`) from link `index`; `Ok(false)` if it was not
    /// there.
    pub async fn addr_del<N: NlFamily>(
        &self,
        index: u32,
        addr: N::Addr,
        prefix_len: u8,
    ) -> Result<bool> {
        absent_ok(
            self.ack(
                format!("delete address {addr}/{prefix_len} on #{index}"),
                RouteNetlinkMessage::DelAddress(Self::addr_msg::<N>(index, addr, prefix_len)),
                0,
            )
            .await,
        )
    }

    // ---- neighbours and FDB entries ----

    /// Every neighbour entry of `family` on link `index` (`AddressFamily::Bridge` lists FDB
    /// entries).
    pub async fn neighbours(
        &self,
        family: AddressFamily,
        index: u32,
    ) -> Result<Vec<NeighbourMessage>> {
        let mut all = self.all_neighbours(family).await?;
        all.retain(|n| n.header.ifindex == index);
        Ok(all)
    }

    /// Every neighbour entry of `family` on any link (for a bridge's FDB, whose entries sit
    /// on the ports).
    pub async fn all_neighbours(&self, family: AddressFamily) -> Result<Vec<NeighbourMessage>> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family;
        let replies = self
            .collect(
                format!("dump neighbours ({family:?})"),
                RouteNetlinkMessage::GetNeighbour(msg),
                NLM_F_DUMP,
            )
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .collect())
    }

    /// Create or replace a neighbour/FDB entry.
    pub async fn neigh_replace(&self, msg: NeighbourMessage) -> Result<()> {
        let op = format!("replace neighbour {}", describe_neigh(&msg));
        self.ack(
            op,
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }

    /// Delete a neighbour/FDB entry; `Ok(false)` if it was not there.
    pub async fn neigh_del(&self, msg: NeighbourMessage) -> Result<bool> {
        let op = format!("delete neighbour {}", describe_neigh(&msg));
        absent_ok(
            self.ack(op, RouteNetlinkMessage::DelNeighbour(msg), 0)
                .await,
        )
    }

    // ---- routes ----

    /// Every IPv4 route of the main table.
    pub async fn routes_v4(&self) -> Result<Vec<RouteMessage>> {
        self.routes::<Ipv4Network>().await
    }

    /// Every route of family `N` in the main table.
    pub async fn routes<N: NlFamily>(&self) -> Result<Vec<RouteMessage>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = N::AF;
        let replies = self
            .collect(
                "dump routes",
                RouteNetlinkMessage::GetRoute(msg),
                NLM_F_DUMP,
            )
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if route_table(&r) == MAIN_TABLE => Some(r),
                _ => None,
            })
            .collect())
    }

    /// Create or replace a route.
    pub async fn route_replace(&self, msg: RouteMessage) -> Result<()> {
        let op = format!("replace route {}", describe_route(&msg));
        self.ack(
            op,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
    }

    /// Create a route; fails with EEXIST when a route with the same key (destination,
    /// TOS, metric, table) exists, whatever its type — never replaces one.
    pub async fn route_add(&self, msg: RouteMessage) -> Result<()> {
        let op = format!("add route {}", describe_route(&msg));
        self.ack(
            op,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .await
    }

    /// Delete a route (matched on every attribute given); `Ok(false)` if it was not there.
    pub async fn route_del(&self, msg: RouteMessage) -> Result<bool> {
        let op = format!("delete route {}", describe_route(&msg));
        absent_ok(self.ack(op, RouteNetlinkMessage::DelRoute(msg), 0).await)
    }

    /// The route the kernel would use to reach `dst` (`ip route get`).
    pub async fn route_get_v4(&self, dst: Ipv4Addr) -> Result<RouteMessage> {
        self.route_get::<Ipv4Network>(dst).await
    }

    /// The route the kernel would use to reach `dst` of family `N` (`ip route get`).
    pub async fn route_get<N: NlFamily>(&self, dst: N::Addr) -> Result<RouteMessage> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = N::AF;
        msg.header.destination_prefix_length = N::BITS;
        msg.attributes
            .push(RouteAttribute::Destination(N::route_addr(dst)));
        let op = format!("get route to {dst}");
        self.collect(op.clone(), RouteNetlinkMessage::GetRoute(msg), 0)
            .await?
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .ok_or(Error::Unexpected { op })
    }

    // ---- nexthop objects ----

    /// Send a nexthop request; its answers (the entries of a dump), or the kernel's error.
    async fn nexthop_request(
        &self,
        op: String,
        msg: NexthopMessage,
        flags: u16,
    ) -> Result<Vec<Nexthop>> {
        if flags & NLM_F_DUMP == NLM_F_DUMP {
            self.dumps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut req = NetlinkMessage::new(Default::default(), NetlinkPayload::InnerMessage(msg));
        req.header.flags = NLM_F_REQUEST | flags;
        let handle = self.nexthops.clone();
        let mut replies = handle
            .request(req, SocketAddr::new(0, 0))
            .map_err(|_| Error::Transport { op: op.clone() })?;
        let mut out = Vec::new();
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(NexthopMessage::New(nh)) => out.push(nh),
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(kernel_error(op, err.raw_code()));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every nexthop object; `Ok(None)` when the kernel has none to offer (built without
    /// them, or older than 5.3), so callers fall back to plain routes.
    pub async fn nexthops(&self) -> Result<Option<Vec<Nexthop>>> {
        let all = self
            .nexthop_request(
                "dump nexthops".into(),
                NexthopMessage::Get(Nexthop::by_id(0)),
                NLM_F_DUMP,
            )
            .await;
        match all {
            Ok(all) => Ok(Some(all)),
            Err(e) if matches!(e.errno(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create or replace a nexthop object.
    pub async fn nexthop_replace(&self, nh: Nexthop) -> Result<()> {
        let op = format!(
            "replace nexthop {} via {:?} dev #{:?}",
            nh.id, nh.gateway, nh.oif
        );
        self.nexthop_request(
            op,
            NexthopMessage::New(nh),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map(drop)
    }

    /// Delete a nexthop object (and with it every route that names it); `Ok(false)` if it
    /// was not there.
    pub async fn nexthop_del(&self, id: u32) -> Result<bool> {
        let op = format!("delete nexthop {id}");
        absent_ok(
            self.nexthop_request(op, NexthopMessage::Del(Nexthop::by_id(id)), NLM_F_ACK)
                .await
                .map(drop),
        )
    }
}

/// The `rtm_protocol` value marking routes this agent created (`ip route show proto 84`).
/// 84 (0x54, 'T' for tunnel) is unassigned in iproute2's `rt_protos` and in the kernel's
/// `RTPROT_*` list, so no routing daemon uses it.
pub const RTPROT_FLANNEL: u8 = 0x54;

/// `<subnet> proto 84 table main`: the parts of every route this agent installs.
pub fn route_base<N: NlFamily>(subnet: N) -> RouteMessage {
    let subnet = crate::wire::cidr::masked(subnet);
    let mut r = RouteMessage::default();
    r.header.address_family = N::AF;
    r.header.destination_prefix_length = subnet.prefix_len();
    r.header.table = MAIN_TABLE as u8;
    r.header.protocol = RouteProtocol::from(RTPROT_FLANNEL);
    r.header.scope = RouteScope::Universe;
    r.header.kind = RouteType::Unicast;
    r.attributes
        .push(RouteAttribute::Destination(N::route_addr(subnet.addr())));
    r
}

/// `<subnet> via <gateway> dev <oif> proto 84`: a host-gw or DirectRouting route.
pub fn gateway_route<N: NlFamily>(subnet: N, gateway: N::Addr, oif: u32) -> RouteMessage {
    let mut r = route_base(subnet);
    r.attributes
        .push(RouteAttribute::Gateway(N::route_addr(gateway)));
    r.attributes.push(RouteAttribute::Oif(oif));
    r
}

/// A delete request matching exactly one dumped route. A route naming a nexthop object
/// is matched by its id: the kernel refuses a gateway or device in that request (they are
/// the nexthop's, reported in dumps for compatibility only).
pub fn route_del_from(r: &RouteMessage) -> RouteMessage {
    let by_nexthop = route_nexthop_id(r).is_some();
    let mut d = RouteMessage::default();
    d.header = r.header.clone();
    d.attributes = r
        .attributes
        .iter()
        .filter(|a| match a {
            RouteAttribute::Destination(_)
            | RouteAttribute::Priority(_)
            | RouteAttribute::Table(_)
            | RouteAttribute::NhId(_) => true,
            RouteAttribute::Gateway(_) | RouteAttribute::Oif(_) => !by_nexthop,
            _ => false,
        })
        .cloned()
        .collect();
    d
}

/// The nexthop object a route names (`RTA_NH_ID`), if it names one.
pub fn route_nexthop_id(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::NhId(id) => Some(*id),
        _ => None,
    })
}

fn kernel_error(op: String, raw: i32) -> Error {
    let errno = raw.abs();
    Error::Kernel {
        op,
        errno,
        source: std::io::Error::from_raw_os_error(errno),
    }
}

/// Map "not found" to `Ok(false)`, success to `Ok(true)`.
fn absent_ok(r: Result<()>) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

// ---- attribute accessors (shared by the backends and tests) ----

/// A link's name.
pub fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// A link's Ethernet address.
/// The index of the link's master (bridge) device, if it has one.
pub fn link_master(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(m) => Some(*m),
        _ => None,
    })
}

pub fn link_mac(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => b.as_slice().try_into().ok(),
        _ => None,
    })
}

/// A link's MTU.
pub fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The table a route lives in (`RTA_TABLE` wins over the 8-bit header field).
pub fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// An IPv4 route's destination network (`0.0.0.0/0` for a default route).
pub fn route_dst_v4(r: &RouteMessage) -> Option<Ipv4Network> {
    route_dst(r)
}

/// A route's destination network of family `N` (the all-zero network for a default
/// route), `None` for another family's route.
pub fn route_dst<N: NlFamily>(r: &RouteMessage) -> Option<N> {
    if r.header.address_family != N::AF {
        return None;
    }
    let addr = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => N::of_route_addr(d),
            _ => None,
        })
        .unwrap_or_else(|| N::addr_from_bits(0));
    N::build(addr, r.header.destination_prefix_length)
}

/// An IPv4 route's gateway.
pub fn route_gateway_v4(r: &RouteMessage) -> Option<Ipv4Addr> {
    route_gateway::<Ipv4Network>(r)
}

/// A route's gateway of family `N`.
pub fn route_gateway<N: NlFamily>(r: &RouteMessage) -> Option<N::Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => N::of_route_addr(g),
        _ => None,
    })
}

/// A route's output interface.
pub fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// A neighbour entry's IP (for FDB entries: the VXLAN remote).
pub fn neigh_dst(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        // FDB (AF_BRIDGE) entries: the parser can't know the remote's family, so it keeps
        // the raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

/// A neighbour entry's link-layer address.
pub fn neigh_lladdr(n: &NeighbourMessage) -> Option<[u8; 6]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => b.as_slice().try_into().ok(),
        _ => None,
    })
}

fn describe_neigh(n: &NeighbourMessage) -> String {
    let dst = neigh_dst(n).map(|d| d.to_string()).unwrap_or_default();
    let mac = neigh_lladdr(n)
        .map(|m| crate::wire::mac::MacAddr(m).to_string())
        .unwrap_or_default();
    format!("{dst} lladdr {mac} on #{}", n.header.ifindex)
}

fn describe_route(r: &RouteMessage) -> String {
    let dst = route_dst_v4(r)
        .map(|d| d.to_string())
        .or_else(|| route_dst::<Ipv6Network>(r).map(|d| d.to_string()))
        .unwrap_or_default();
    let mut s = dst;
    let gw = route_gateway_v4(r)
        .map(|g| g.to_string())
        .or_else(|| route_gateway::<Ipv6Network>(r).map(|g| g.to_string()));
    if let Some(gw) = gw {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(oif) = route_oif(r) {
        s.push_str(&format!(" dev #{oif}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_covers_every_absent_errno() {
        for errno in [libc::ENOENT, libc::ESRCH, libc::ENODEV, libc::EADDRNOTAVAIL] {
            assert!(kernel_error("x".into(), -errno).is_not_found());
        }
        assert!(kernel_error("x".into(), -libc::EEXIST).is_exists());
        assert!(!kernel_error("x".into(), -libc::EPERM).is_not_found());
    }
}

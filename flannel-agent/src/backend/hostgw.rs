//! `host-gw`: no encapsulation, one route per peer: `<peer subnet> via <peer PublicIP> dev
//! <uplink>`. Works only when every host shares one L2 segment, so a peer whose PublicIP is
//! not directly connected is an error naming it (rather than a route the kernel would refuse
//! with a bare "network unreachable"). Refuses to start behind NAT (public IP ≠ interface
//! IP), as upstream: peers would route to an address that is not on the segment.
//!
//! Routes carry [`RTPROT_FLANNEL`]; reconcile removes such routes whose subnet is no longer
//! a peer and touches no other route. Nothing is removed on exit.
//!
//! The routing table is read at start and on resync only: the backend keeps a record of
//! the routes it programmed, so a lease event costs its own route requests (one replace
//! or one delete per family), however many peers there are.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteType};
use tracing::{debug, info, warn};

use super::{Backend, ExternalInterface, Result};
use crate::{
    lease::{BackendAttrs, Lease, LeaseAttrs, LeaseFamily},
    net::netlink::{self, Netlink, NlFamily, RTPROT_FLANNEL},
    repair::{self, RepairKind},
};

/// Errors of the host-gw backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] netlink::Error),
    /// The public IP is not the interface's (NAT).
    #[error(
        "{flag} {public_ip} differs from interface address {iface_addr}; probably you're on a NAT, which is not supported by host-gw backend"
    )]
    Nat {
        /// `--public-ip` or `--public-ipv6`.
        flag: &'static str,
        /// The published address.
        public_ip: IpAddr,
        /// The uplink's address.
        iface_addr: IpAddr,
    },
    /// A peer is not on this host's L2 segment.
    #[error(
        "lease {subnet}: public IP {public_ip} is not directly connected (route via {via}); host-gw needs all hosts on one L2 segment"
    )]
    NotOnLink {
        /// The peer's subnet.
        subnet: String,
        /// Its public IP.
        public_ip: IpAddr,
        /// The gateway the kernel would use (or `no route`).
        via: String,
    },
}

/// The host-gw backend: IPv4 routes and, with IPv6 enabled, IPv6 routes via each peer's
/// `PublicIPv6` (upstream's `RouteNetwork` does the same per family).
pub struct HostGw {
    nl: Netlink,
    ext: ExternalInterface,
    own: Option<Ipv4Network>,
    own6: Option<Ipv6Network>,
    /// The route programmed per peer subnet (both families), as written: set from the
    /// table by every reconcile/resync, kept by each event, so a removal deletes exactly
    /// that route without dumping the table.
    programmed: HashMap<IpNetwork, RouteMessage>,
}

impl HostGw {
    /// Build the backend for this host.
    pub async fn new(ext: ExternalInterface) -> Result<Self> {
        let nat = [
            (
                "--public-ip",
                Some(ext.public_ip.into()),
                Some(ext.iface_addr.into()),
            ),
            (
                "--public-ipv6",
                ext.public_ipv6.map(IpAddr::from),
                ext.iface_addr6.map(IpAddr::from),
            ),
        ];
        for (flag, public, iface) in nat {
            if let (Some(public_ip), Some(iface_addr)) = (public, iface)
                && public_ip != iface_addr
            {
                return Err(Error::Nat {
                    flag,
                    public_ip,
                    iface_addr,
                }
                .into());
            }
        }
        let nl = Netlink::connect().map_err(Error::from)?;
        Ok(Self {
            nl,
            ext,
            own: None,
            own6: None,
            programmed: HashMap::new(),
        })
    }

    /// The netlink connection (its dump counter shows what a call read).
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    /// Peer routes this backend has programmed (both families).
    pub fn programmed_peers(&self) -> usize {
        self.programmed.len()
    }

    /// The route a peer lease's half of family `N` needs, with its subnet; `None` (logged)
    /// for leases of another backend, and for a half the lease does not have.
    async fn route_for<N: NlFamily + LeaseFamily>(
        &self,
        lease: &Lease,
        own: Option<N>,
    ) -> Result<Option<(N, RouteMessage)>, Error> {
        let Some(subnet) = N::subnet(lease).filter(|s| Some(*s) != own) else {
            return Ok(None);
        };
        if lease.attrs.backend != BackendAttrs::HostGw {
            warn!(%subnet, backend_type = %lease.attrs.backend_type(),
                  "skipping peer: BackendType is not host-gw");
            return Ok(None);
        }
        let Some(gw) = N::public_ip(&lease.attrs) else {
            debug!(%subnet, "peer publishes no address of this family");
            return Ok(None);
        };
        let via = match self.nl.route_get::<N>(gw).await {
            Ok(r) => match netlink::route_gateway::<N>(&r) {
                None if netlink::route_oif(&r) == Some(self.ext.index) => None,
                None => Some(format!(
                    "interface #{} instead of {}",
                    netlink::route_oif(&r).unwrap_or(0),
                    self.ext.name
                )),
                Some(g) => Some(g.to_string()),
            },
            Err(e) => Some(format!("no route: {e}")),
        };
        if let Some(via) = via {
            return Err(Error::NotOnLink {
                subnet: subnet.to_string(),
                public_ip: gw.into(),
                via,
            });
        }
        Ok(Some((
            subnet,
            netlink::gateway_route(subnet, gw, self.ext.index),
        )))
    }

    /// Both families' routes for a peer.
    async fn routes_for(&self, lease: &Lease) -> Result<Vec<(IpNetwork, RouteMessage)>, Error> {
        let mut out = Vec::new();
        if let Some((s, r)) = self.route_for(lease, self.own).await? {
            out.push((s.into(), r));
        }
        if self.ext.iface_addr6.is_some()
            && let Some((s, r)) = self.route_for(lease, self.own6).await?
        {
            out.push((s.into(), r));
        }
        Ok(out)
    }

    fn is_ours(r: &RouteMessage) -> bool {
        // The blackhole route for our own subnet carries our protocol too, but belongs to
        // `net::blackhole`, not to the peer set.
        u8::from(r.header.protocol) == RTPROT_FLANNEL && r.header.kind != RouteType::BlackHole
    }

    fn same<N: NlFamily>(a: &RouteMessage, b: &RouteMessage) -> bool {
        netlink::route_dst::<N>(a) == netlink::route_dst::<N>(b)
            && netlink::route_gateway::<N>(a) == netlink::route_gateway::<N>(b)
            && netlink::route_oif(a) == netlink::route_oif(b)
            && a.header.tos == b.header.tos
            && u8::from(a.header.protocol) == u8::from(b.header.protocol)
    }

    /// Remove our route for `subnet`: the recorded one, or (for a subnet the record does
    /// not know, e.g. a failed reconcile) the one a delete by destination, our protocol,
    /// type unicast and the uplink matches — the kernel compares the protocol, so no
    /// route of anyone else (nor the blackhole of our own subnet) can match. One request,
    /// no table read; "not there" is success.
    async fn remove_subnet<N: NlFamily + Into<IpNetwork>>(
        &mut self,
        subnet: N,
    ) -> Result<(), Error> {
        let del = match self.programmed.remove(&subnet.into()) {
            Some(r) => netlink::route_del_from(&r),
            None => {
                let mut r = netlink::route_base(subnet);
                r.attributes.push(RouteAttribute::Oif(self.ext.index));
                r
            }
        };
        if !self.nl.route_del(del).await? {
            debug!(%subnet, "peer route was already gone");
        }
        Ok(())
    }
}

impl Backend for HostGw {
    async fn prepare(&mut self) -> Result<LeaseAttrs> {
        Ok(LeaseAttrs {
            public_ipv6: self.ext.public_ipv6,
            ..LeaseAttrs::host_gw(self.ext.public_ip)
        })
    }

    async fn register(&mut self, own: &Lease) -> Result<()> {
        self.own = own.subnet;
        self.own6 = own.ipv6_subnet;
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        for (subnet, route) in self.routes_for(peer).await? {
            // Replace overwrites a same-destination route of ours with another gateway.
            self.nl
                .route_replace(route.clone())
                .await
                .map_err(Error::from)?;
            self.programmed.insert(subnet, route);
            info!(%subnet, "peer route programmed");
        }
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<()> {
        if peer.subnet.is_some() && peer.subnet == self.own {
            return Ok(());
        }
        if let Some(sn) = peer.subnet {
            self.remove_subnet(sn).await?;
        }
        if let Some(sn6) = peer.ipv6_subnet.filter(|s| Some(*s) != self.own6) {
            self.remove_subnet(sn6).await?;
        }
        info!(subnet = %peer.subnets(), "peer route removed");
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<()> {
        let written = self.check(peers).await?;
        debug!(
            peers = peers.len(),
            written = written.len(),
            "host-gw routes reconciled"
        );
        Ok(())
    }

    async fn resync(&mut self, peers: &[Lease]) -> Result<()> {
        for detail in self.check(peers).await? {
            repair::record(RepairKind::Route, detail);
        }
        Ok(())
    }

    async fn readdress(&mut self, ext: &ExternalInterface, peers: &[Lease]) -> Result<()> {
        // Routes go via the peers' addresses out of the same uplink: nothing of ours
        // names our own address; only the lease changes.
        self.ext = ext.clone();
        self.check(peers).await.map(drop)
    }

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }
}

impl HostGw {
    /// Make our routes equal the peer set, per family; returns the routes that were
    /// missing or wrong and had to be written.
    async fn check(&mut self, peers: &[Lease]) -> Result<Vec<String>> {
        let mut written = self.check_family(peers, self.own).await?;
        if self.ext.iface_addr6.is_some() {
            written.extend(self.check_family(peers, self.own6).await?);
        }
        Ok(written)
    }

    async fn check_family<N: NlFamily + LeaseFamily + Into<IpNetwork>>(
        &mut self,
        peers: &[Lease],
        own: Option<N>,
    ) -> Result<Vec<String>> {
        let mut written = Vec::new();
        let mut desired = BTreeMap::new();
        // Until this check completes, this family's record is unknown; removals fall back
        // to a delete by destination meanwhile.
        self.programmed.retain(|k, _| N::of_ip(k.ip()).is_none());
        let mut failed = None;
        for lease in peers {
            match self.route_for::<N>(lease, own).await {
                Ok(Some((subnet, r))) => {
                    desired.insert(subnet, r);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(subnet = %lease.subnets(), error = %e, "cannot route to peer");
                    failed = Some(e);
                }
            }
        }
        let current = self.nl.routes::<N>().await.map_err(Error::from)?;
        for (subnet, want) in &desired {
            if !current.iter().any(|r| Self::same::<N>(r, want)) {
                debug!(%subnet, "programming peer route");
                self.nl
                    .route_replace(want.clone())
                    .await
                    .map_err(Error::from)?;
                let via =
                    netlink::route_gateway::<N>(want).map_or_else(String::new, |g| g.to_string());
                written.push(format!("route {subnet} via {via} dev {}", self.ext.name));
            }
        }
        let mut kept = BTreeSet::new();
        for r in self.nl.routes::<N>().await.map_err(Error::from)? {
            if !Self::is_ours(&r) {
                continue;
            }
            let Some(dst) = netlink::route_dst::<N>(&r) else {
                continue;
            };
            if desired.get(&dst).is_some_and(|w| Self::same::<N>(&r, w)) && kept.insert(dst) {
                continue;
            }
            info!(route = %dst, "removing stale route");
            self.nl
                .route_del(netlink::route_del_from(&r))
                .await
                .map_err(Error::from)?;
        }
        self.programmed
            .extend(desired.into_iter().map(|(subnet, r)| (subnet.into(), r)));
        failed.map_or(Ok(written), |e| Err(e.into()))
    }
}

//! `host-gw`: no encapsulation, one route per peer: `<peer subnet> via <peer PublicIP> dev
//! <uplink>`. Works only when every host shares one L2 segment, so a peer whose PublicIP is
//! not directly connected is an error naming it (rather than a route the kernel would refuse
//! with a bare "network unreachable"). Refuses to start behind NAT (public IP ≠ interface
//! IP), as upstream: peers would route to an address that is not on the segment.
//!
//! Routes carry [`RTPROT_FLANNEL`]; reconcile removes such routes whose subnet is no longer
//! a peer and touches no other route. Nothing is removed on exit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use netlink_packet_route::route::{RouteMessage, RouteType};
use tracing::{debug, info, warn};

use super::{Backend, ExternalInterface, Result};
use crate::{
    lease::{BackendAttrs, Lease, LeaseAttrs},
    net::netlink::{self, Netlink, RTPROT_FLANNEL},
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
        "--public-ip {public_ip} differs from interface address {iface_addr}; probably you're on a NAT, which is not supported by host-gw backend"
    )]
    Nat {
        /// The published address.
        public_ip: Ipv4Addr,
        /// The uplink's address.
        iface_addr: Ipv4Addr,
    },
    /// A peer is not on this host's L2 segment.
    #[error(
        "lease {subnet}: PublicIP {public_ip} is not directly connected (route via {via}); host-gw needs all hosts on one L2 segment"
    )]
    NotOnLink {
        /// The peer's subnet.
        subnet: Ipv4Network,
        /// Its public IP.
        public_ip: Ipv4Addr,
        /// The gateway the kernel would use (or `no route`).
        via: String,
    },
}

/// The host-gw backend.
pub struct HostGw {
    nl: Netlink,
    ext: ExternalInterface,
    own: Option<Ipv4Network>,
}

impl HostGw {
    /// Build the backend for this host.
    pub async fn new(ext: ExternalInterface) -> Result<Self> {
        if ext.public_ip != ext.iface_addr {
            return Err(Error::Nat {
                public_ip: ext.public_ip,
                iface_addr: ext.iface_addr,
            }
            .into());
        }
        let nl = Netlink::connect().map_err(Error::from)?;
        Ok(Self { nl, ext, own: None })
    }

    /// The route a peer lease needs, `None` (logged) for leases of another backend.
    async fn route_for(&self, lease: &Lease) -> Result<Option<RouteMessage>, Error> {
        if Some(lease.subnet) == self.own {
            return Ok(None);
        }
        if lease.attrs.backend != BackendAttrs::HostGw {
            warn!(subnet = %lease.subnet, backend_type = %lease.attrs.backend_type(),
                  "skipping peer: BackendType is not host-gw");
            return Ok(None);
        }
        let gw = lease.attrs.public_ip;
        let via = match self.nl.route_get_v4(gw).await {
            Ok(r) => match netlink::route_gateway_v4(&r) {
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
                subnet: lease.subnet,
                public_ip: gw,
                via,
            });
        }
        Ok(Some(netlink::gateway_route(
            lease.subnet,
            gw,
            self.ext.index,
        )))
    }

    fn is_ours(r: &RouteMessage) -> bool {
        // The blackhole route for our own subnet carries our protocol too, but belongs to
        // `net::blackhole`, not to the peer set.
        u8::from(r.header.protocol) == RTPROT_FLANNEL && r.header.kind != RouteType::BlackHole
    }

    fn same(a: &RouteMessage, b: &RouteMessage) -> bool {
        netlink::route_dst_v4(a) == netlink::route_dst_v4(b)
            && netlink::route_gateway_v4(a) == netlink::route_gateway_v4(b)
            && netlink::route_oif(a) == netlink::route_oif(b)
            && a.header.tos == b.header.tos
            && u8::from(a.header.protocol) == u8::from(b.header.protocol)
    }

    async fn remove_subnet(&self, subnet: Ipv4Network) -> Result<(), Error> {
        for r in self.nl.routes_v4().await? {
            if Self::is_ours(&r) && netlink::route_dst_v4(&r) == Some(subnet) {
                self.nl.route_del(netlink::route_del_from(&r)).await?;
            }
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
        self.own = Some(own.subnet);
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        let Some(route) = self.route_for(peer).await? else {
            return Ok(());
        };
        // Replace overwrites a same-destination route of ours with another gateway.
        self.nl.route_replace(route).await.map_err(Error::from)?;
        info!(subnet = %peer.subnet, gateway = %peer.attrs.public_ip, "peer route programmed");
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<()> {
        if Some(peer.subnet) == self.own {
            return Ok(());
        }
        self.remove_subnet(peer.subnet).await?;
        info!(subnet = %peer.subnet, "peer route removed");
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

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }
}

impl HostGw {
    /// Make our routes equal the peer set; returns the routes that were missing or wrong
    /// and had to be written.
    async fn check(&mut self, peers: &[Lease]) -> Result<Vec<String>> {
        let mut written = Vec::new();
        let mut desired = BTreeMap::new();
        let mut failed = None;
        for lease in peers {
            match self.route_for(lease).await {
                Ok(Some(r)) => {
                    desired.insert(lease.subnet, r);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(subnet = %lease.subnet, error = %e, "cannot route to peer");
                    failed = Some(e);
                }
            }
        }
        let current = self.nl.routes_v4().await.map_err(Error::from)?;
        for (subnet, want) in &desired {
            if !current.iter().any(|r| Self::same(r, want)) {
                debug!(%subnet, "programming peer route");
                self.nl
                    .route_replace(want.clone())
                    .await
                    .map_err(Error::from)?;
                let via =
                    netlink::route_gateway_v4(want).map_or_else(String::new, |g| g.to_string());
                written.push(format!("route {subnet} via {via} dev {}", self.ext.name));
            }
        }
        let mut kept = BTreeSet::new();
        for r in self.nl.routes_v4().await.map_err(Error::from)? {
            if !Self::is_ours(&r) {
                continue;
            }
            let Some(dst) = netlink::route_dst_v4(&r) else {
                continue;
            };
            if desired.get(&dst).is_some_and(|w| Self::same(&r, w)) && kept.insert(dst) {
                continue;
            }
            info!(route = %dst, "removing stale route");
            self.nl
                .route_del(netlink::route_del_from(&r))
                .await
                .map_err(Error::from)?;
        }
        failed.map_or(Ok(written), |e| Err(e.into()))
    }
}

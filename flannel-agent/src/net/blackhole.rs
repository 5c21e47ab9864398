//! `--ip-blackhole-route`: keep a blackhole route for this host's own subnet, so traffic to
//! unassigned pod addresses is dropped here instead of following the default route out of
//! the host. Meant for setups without the bridge plugin (Canal), where nothing else routes
//! the subnet. The agent adds it at start and puts it back on every resync (a netlink
//! event about one of its routes, or the periodic check).
//!
//! The route is only ever added, never replaced: if another route already has the same key
//! (the `cni0` connected route of a bridge setup), it wins and the blackhole is not needed.
//! It carries [`RTPROT_FLANNEL`] like every route this agent creates.

use netlink_packet_route::route::RouteType;
use tracing::{debug, info};

use crate::net::netlink::{self, Netlink, NlFamily, RTPROT_FLANNEL};

/// Make sure `blackhole <subnet>` exists. `Ok(true)` when it was added now, `Ok(false)` when
/// it (or another route for the subnet with the same key) was already there.
/// (IPv4 or IPv6: one per own subnet.)
pub async fn ensure<N: NlFamily>(nl: &Netlink, subnet: N) -> Result<bool, netlink::Error> {
    let subnet = crate::wire::cidr::masked(subnet);
    let present = nl.routes::<N>().await?.iter().any(|r| {
        r.header.kind == RouteType::BlackHole && netlink::route_dst::<N>(r) == Some(subnet)
    });
    if present {
        return Ok(false);
    }
    let mut route = netlink::route_base(subnet);
    route.header.kind = RouteType::BlackHole;
    match nl.route_add(route).await {
        Ok(()) => {
            info!(%subnet, protocol = RTPROT_FLANNEL, "added blackhole route");
            Ok(true)
        }
        Err(e) if e.is_exists() => {
            debug!(%subnet, "a route for the subnet exists already; no blackhole needed");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// This host's own subnets that get a blackhole route (IPv4 and, with IPv6, IPv6), with
/// the netlink connection that keeps them.
pub struct Blackholes {
    nl: Netlink,
    v4: Option<ipnetwork::Ipv4Network>,
    v6: Option<ipnetwork::Ipv6Network>,
}

impl Blackholes {
    /// `None` when there is no subnet to cover.
    pub fn new(
        v4: Option<ipnetwork::Ipv4Network>,
        v6: Option<ipnetwork::Ipv6Network>,
    ) -> Result<Option<Self>, netlink::Error> {
        if v4.is_none() && v6.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            nl: Netlink::connect()?,
            v4,
            v6,
        }))
    }

    /// [`ensure`] for each subnet: `(subnet, whether it was added now)` or the error.
    pub async fn ensure_all(&self) -> Vec<(String, Result<bool, netlink::Error>)> {
        let mut out = Vec::new();
        if let Some(s) = self.v4 {
            out.push((s.to_string(), ensure(&self.nl, s).await));
        }
        if let Some(s) = self.v6 {
            out.push((s.to_string(), ensure(&self.nl, s).await));
        }
        out
    }
}

//! `--ip-blackhole-route`: keep a blackhole route for this host's own subnet, so traffic to
//! unassigned pod addresses is dropped here instead of following the default route out of
//! the host. Meant for setups without the bridge plugin (Canal), where nothing else routes
//! the subnet. The agent adds it at start and puts it back on every resync (a netlink
//! event about one of its routes, or the periodic check).
//!
//! The route is only ever added, never replaced: if another route already has the same key
//! (the `cni0` connected route of a bridge setup), it wins and the blackhole is not needed.
//! It carries [`RTPROT_FLANNEL`] like every route this agent creates.

use ipnetwork::Ipv4Network;
use netlink_packet_route::route::RouteType;
use tracing::{debug, info};

use crate::net::netlink::{self, Netlink, RTPROT_FLANNEL};

/// Make sure `blackhole <subnet>` exists. `Ok(true)` when it was added now, `Ok(false)` when
/// it (or another route for the subnet with the same key) was already there.
pub async fn ensure(nl: &Netlink, subnet: Ipv4Network) -> Result<bool, netlink::Error> {
    let subnet = crate::wire::cidr::masked(subnet);
    let present =
        nl.routes_v4().await?.iter().any(|r| {
            r.header.kind == RouteType::BlackHole && netlink::route_dst_v4(r) == Some(subnet)
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

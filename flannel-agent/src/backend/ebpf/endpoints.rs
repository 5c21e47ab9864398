//! Local pods for the opt-in all-flows fast path: which pod IP sits behind which bridge
//! port.
//!
//! The CNI plugin doesn't tell the agent about pods (upstream's doesn't either), so the
//! agent learns them from the kernel: the IPv4 neighbour table of the `cni0` bridge maps a
//! pod IP to its MAC (the host ARPs its pods, and learns them from their ARP requests for
//! the gateway), and the bridge's FDB maps that MAC to the port, i.e. the host side of the
//! pod's veth. Re-read on every link and neighbour event (see `pods`); until a pod is
//! listed, its traffic takes the default path, and a pod that goes away is dropped from
//! the map with its veth.

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::net::netlink::{Netlink, link_mac, neigh_dst, neigh_lladdr};
use flannel_common::Endpoint;
use ipnetwork::Ipv4Network;
use netlink_packet_route::{
    AddressFamily,
    neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourState},
};

/// The bridge pods hang off (the CNI bridge plugin's default, as in upstream's conflist).
pub const BRIDGE: &str = "cni0";

/// Pods behind `bridge` whose IP is in `subnet`, with their port and MACs.
pub async fn discover(
    nl: &Netlink,
    bridge: &str,
    subnet: Ipv4Network,
) -> crate::net::netlink::Result<BTreeMap<Ipv4Addr, Endpoint>> {
    let Some(br) = nl.link_by_name(bridge).await? else {
        return Ok(BTreeMap::new());
    };
    let br_index = br.header.index;
    // Pod IP → pod MAC, from the bridge's neighbour table.
    let mut macs = BTreeMap::new();
    for n in nl.neighbours(AddressFamily::Inet, br_index).await? {
        let usable = !matches!(
            n.header.state,
            NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
        );
        if let (true, Some(std::net::IpAddr::V4(ip)), Some(mac)) =
            (usable, neigh_dst(&n), neigh_lladdr(&n))
            && subnet.contains(ip)
        {
            macs.insert(ip, mac);
        }
    }
    if macs.is_empty() {
        return Ok(BTreeMap::new());
    }
    // Pod MAC → bridge port, from the FDB entries the bridge learned (not the ports' own).
    let mut ports = BTreeMap::new();
    for n in nl.all_neighbours(AddressFamily::Bridge).await? {
        let on_bridge = n
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::Controller(m) if *m == br_index));
        let own = n.header.state == NeighbourState::Permanent
            || n.header.flags.contains(NeighbourFlags::Own);
        if let (true, false, Some(mac)) = (on_bridge, own, neigh_lladdr(&n)) {
            ports.insert(mac, n.header.ifindex);
        }
    }
    let mut out = BTreeMap::new();
    for (ip, mac) in macs {
        let Some(&port) = ports.get(&mac) else {
            continue;
        };
        let Some(link) = nl.link_by_index(port).await? else {
            continue;
        };
        let Some(host_mac) = link_mac(&link) else {
            continue;
        };
        out.insert(
            ip,
            Endpoint {
                ifindex: port,
                pod_mac: mac,
                host_mac,
            },
        );
    }
    Ok(out)
}

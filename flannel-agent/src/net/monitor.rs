//! The netlink monitor: notices when something this agent owns is deleted or changed under
//! it, so the main loop can resync at once instead of at the next periodic check.
//!
//! Subscribes (rtnetlink multicast, like `ip monitor`) to links, addresses and routes of
//! both families and neighbours (the FDB included: bridge-family neighbour messages). It
//! does not decide what to fix — the backends' resync compares the kernel with what they
//! want — it only says "look now", and why. The filter is deliberately coarse and cheap:
//!
//! - the VXLAN devices (`flannel.<VNI>`, and `flannel-v6.<VNI>` with IPv6; by name, so a
//!   re-created device is still ours): deleted, or any change of its flags, MTU or MAC
//!   (`RTM_NEWLINK`);
//! - addresses, neighbours and FDB entries deleted from a device;
//! - any deleted route carrying this agent's protocol ([`RTPROT_FLANNEL`]): per-peer VXLAN
//!   and direct routes, host-gw routes, the blackhole route;
//! - any deleted nexthop object carrying it (on a second socket: `rtnetlink` cannot parse
//!   nexthop messages): the kernel deletes the routes naming one without a word;
//! - IPv4 address changes on the uplink ([`Trigger::UplinkAddress`]): the published public
//!   IP may have to follow;
//! - and, outside netlink, the eBPF datapath's pins ([`watch_pins`]): a removed or replaced
//!   map or link pin (bpffs has no netlink event; one `stat` per pin per second).
//!
//! Changes that replace one of our entries with a different one (not a deletion) are left
//! to the periodic resync: reacting to every `RTM_NEWROUTE` would also react to each of the
//! agent's own writes. A lost burst of events (socket overrun) costs at most one period too.

use std::sync::atomic::{AtomicU32, Ordering};

use netlink_packet_route::AddressFamily;

use futures::StreamExt;
use netlink_packet_route::{
    RouteNetlinkMessage, address::AddressMessage, link::LinkMessage, neighbour::NeighbourMessage,
    route::RouteMessage,
};
use rtnetlink::{MulticastGroup, packet_core::NetlinkPayload};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::net::{
    netlink::{RTPROT_FLANNEL, link_name, route_oif},
    nexthop::{NexthopMessage, RTNLGRP_NEXTHOP},
};

/// Why the monitor asks for a resync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Something the backend owns was deleted or changed; the text says what the kernel
    /// reported (for the log).
    Kernel(String),
    /// An address was added to or removed from the uplink.
    UplinkAddress,
}

/// What the monitor watches.
#[derive(Clone, Debug)]
pub struct Watched {
    /// The VXLAN devices' names (`flannel.<VNI>`, `flannel-v6.<VNI>`); none for host-gw.
    pub devices: Vec<String>,
    /// The uplink's interface index.
    pub uplink: u32,
}

/// Watches until `cancel` fires, sending triggers on `tx` (dropped when the channel is
/// full: one pending trigger already causes the resync). When the subscription fails or
/// ends, it is re-opened after a second and a resync is asked for, since events may have
/// been missed meanwhile.
pub async fn run(watched: Watched, tx: mpsc::Sender<Trigger>, cancel: CancellationToken) {
    let filter = Filter {
        devices: watched
            .devices
            .into_iter()
            .map(|name| (name, AtomicU32::new(0)))
            .collect(),
        uplink: watched.uplink,
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = filter.watch(&tx) => {}
        }
        let _ = tx.try_send(Trigger::Kernel("netlink monitor restarted".into()));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// How often [`watch_pins`] looks at the pins.
pub const PIN_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Until `cancel`, every [`PIN_POLL`]: asks for a resync when one of `paths` is gone or
/// is another file than before (a pin replaced by a different map). Only the change is
/// reported, once; the pin coming back (the repair itself) is not.
pub async fn watch_pins(
    paths: Vec<std::path::PathBuf>,
    tx: mpsc::Sender<Trigger>,
    cancel: CancellationToken,
) {
    use std::os::unix::fs::MetadataExt;
    let identity = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut seen: Vec<_> = paths.iter().map(|p| identity(p)).collect();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PIN_POLL) => {}
        }
        for (path, seen) in paths.iter().zip(&mut seen) {
            let now = identity(path);
            if let Some(before) = *seen
                && now != Some(before)
            {
                let what = if now.is_none() { "removed" } else { "replaced" };
                let _ = tx.try_send(Trigger::Kernel(format!("pin {} {what}", path.display())));
            }
            *seen = now;
        }
    }
}

struct Filter {
    /// Each device's name and current index, learnt from its link messages (it changes
    /// when the device is re-created); 0 until the first one.
    devices: Vec<(String, AtomicU32)>,
    uplink: u32,
}

impl Filter {
    /// One subscription, until it fails or ends.
    async fn watch(&self, tx: &mpsc::Sender<Trigger>) {
        let groups = [
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Neigh,
        ];
        let (conn, handle, mut messages) = match rtnetlink::new_multicast_connection(&groups) {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, "netlink monitor: cannot subscribe; relying on the periodic resync");
                return;
            }
        };
        let conn = tokio::spawn(conn);
        drop(handle);
        // Without the nexthop subscription (a kernel without nexthop objects has none to
        // delete), the rest still works.
        let (nh_conn, mut nh_messages) = match nexthop_subscription() {
            Ok((c, m)) => (Some(tokio::spawn(c)), Some(m)),
            Err(error) => {
                debug!(%error, "netlink monitor: no nexthop events");
                (None, None)
            }
        };
        self.learn_device_index().await;
        loop {
            let trigger = tokio::select! {
                msg = messages.next() => {
                    let Some((msg, _)) = msg else { break };
                    let NetlinkPayload::InnerMessage(msg) = msg.payload else {
                        continue;
                    };
                    self.classify(&msg)
                }
                Some((msg, _)) = async { nh_messages.as_mut()?.next().await } => match msg.payload {
                    NetlinkPayload::InnerMessage(NexthopMessage::Del(nh)) if nh.protocol == RTPROT_FLANNEL => {
                        Some(Trigger::Kernel(format!("nexthop {} deleted", nh.id)))
                    }
                    _ => None,
                },
            };
            if let Some(trigger) = trigger {
                debug!(?trigger, "netlink event on owned state");
                let _ = tx.try_send(trigger);
            }
        }
        conn.abort();
        if let Some(c) = nh_conn {
            c.abort();
        }
    }

    /// Seed the device indexes (events about a device's neighbours carry only the index).
    async fn learn_device_index(&self) {
        let Ok(nl) = crate::net::netlink::Netlink::connect() else {
            return;
        };
        for (name, index) in &self.devices {
            if let Ok(Some(link)) = nl.link_by_name(name).await {
                index.store(link.header.index, Ordering::Relaxed);
            }
        }
    }

    /// The watched device `link` is, with its index slot.
    fn device(&self, link: &LinkMessage) -> Option<&(String, AtomicU32)> {
        let name = link_name(link)?;
        self.devices.iter().find(|(d, _)| d == name)
    }

    fn on_device(&self, index: u32) -> bool {
        index != 0
            && self
                .devices
                .iter()
                .any(|(_, i)| i.load(Ordering::Relaxed) == index)
    }

    /// The trigger for one kernel notification, if it concerns what we own.
    fn classify(&self, msg: &RouteNetlinkMessage) -> Option<Trigger> {
        let kernel = |s: String| Some(Trigger::Kernel(s));
        match msg {
            RouteNetlinkMessage::NewLink(l) => {
                let (name, index) = self.device(l)?;
                index.store(l.header.index, Ordering::Relaxed);
                kernel(format!("link {name} changed"))
            }
            RouteNetlinkMessage::DelLink(l) => {
                let (name, _) = self.device(l)?;
                kernel(format!("link {name} deleted"))
            }
            // The public IP follows the uplink's IPv4 address only (see the agent).
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a)
                if a.header.index == self.uplink =>
            {
                (a.header.family == AddressFamily::Inet).then_some(Trigger::UplinkAddress)
            }
            RouteNetlinkMessage::DelAddress(a) if self.on_device(a.header.index) => {
                kernel(describe_addr(a))
            }
            RouteNetlinkMessage::DelRoute(r) if is_ours(r) || self.on_device_route(r) => {
                let dst = crate::net::netlink::route_dst::<ipnetwork::Ipv4Network>(r)
                    .map(|d| d.to_string())
                    .or_else(|| {
                        crate::net::netlink::route_dst::<ipnetwork::Ipv6Network>(r)
                            .map(|d| d.to_string())
                    });
                kernel(format!("route {} deleted", dst.as_deref().unwrap_or("?")))
            }
            RouteNetlinkMessage::DelNeighbour(n) if self.on_device(n.header.ifindex) => {
                kernel(describe_neigh(n))
            }
            _ => None,
        }
    }

    fn on_device_route(&self, r: &RouteMessage) -> bool {
        route_oif(r).is_some_and(|i| self.on_device(i))
    }
}

type NexthopEvents = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<NexthopMessage>,
    rtnetlink::proto::sys::SocketAddr,
)>;

/// A socket subscribed to nexthop changes (`RTNLGRP_NEXTHOP`), with its connection task.
fn nexthop_subscription()
-> std::io::Result<(rtnetlink::proto::Connection<NexthopMessage>, NexthopEvents)> {
    let (mut conn, _, messages) = rtnetlink::proto::new_connection::<NexthopMessage>(
        rtnetlink::sys::protocols::NETLINK_ROUTE,
    )?;
    let socket = rtnetlink::proto::sys::AsyncSocket::socket_mut(conn.socket_mut());
    socket.bind(&rtnetlink::proto::sys::SocketAddr::new(0, 0))?;
    socket.add_membership(RTNLGRP_NEXTHOP)?;
    Ok((conn, messages))
}

fn is_ours(r: &RouteMessage) -> bool {
    u8::from(r.header.protocol) == RTPROT_FLANNEL
}

fn describe_addr(a: &AddressMessage) -> String {
    format!("address deleted from interface #{}", a.header.index)
}

fn describe_neigh(n: &NeighbourMessage) -> String {
    let what = if n.header.family == netlink_packet_route::AddressFamily::Bridge {
        "FDB entry"
    } else {
        "neighbour"
    };
    let dst = crate::net::netlink::neigh_dst(n).map_or_else(|| "?".into(), |d| d.to_string());
    format!("{what} {dst} deleted from interface #{}", n.header.ifindex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::{
        link::LinkAttribute,
        route::{RouteProtocol, RouteType},
    };

    fn filter() -> Filter {
        Filter {
            devices: vec![
                ("flannel.1".into(), AtomicU32::new(7)),
                ("flannel-v6.1".into(), AtomicU32::new(8)),
            ],
            uplink: 2,
        }
    }

    fn link(name: &str, index: u32) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.attributes.push(LinkAttribute::IfName(name.into()));
        l
    }

    #[test]
    fn device_events_trigger_and_track_the_new_index() {
        let f = filter();
        assert!(
            f.classify(&RouteNetlinkMessage::DelLink(link("flannel.1", 7)))
                .is_some()
        );
        assert!(
            f.classify(&RouteNetlinkMessage::DelLink(link("veth3", 9)))
                .is_none()
        );
        assert!(
            f.classify(&RouteNetlinkMessage::NewLink(link("flannel.1", 12)))
                .is_some()
        );
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 12;
        assert!(
            f.classify(&RouteNetlinkMessage::DelNeighbour(n.clone()))
                .is_some()
        );
        n.header.ifindex = 7;
        assert!(f.classify(&RouteNetlinkMessage::DelNeighbour(n)).is_none());
    }

    #[test]
    fn the_ipv6_device_is_watched_too() {
        let f = filter();
        assert!(
            f.classify(&RouteNetlinkMessage::DelLink(link("flannel-v6.1", 8)))
                .is_some()
        );
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 8;
        assert!(f.classify(&RouteNetlinkMessage::DelNeighbour(n)).is_some());
        let mut a = AddressMessage::default();
        a.header.index = 8;
        a.header.family = AddressFamily::Inet6;
        assert!(f.classify(&RouteNetlinkMessage::DelAddress(a)).is_some());
        // IPv6 address churn on the uplink (DAD, privacy addresses) is not a public IP
        // change.
        let mut a = AddressMessage::default();
        a.header.index = 2;
        a.header.family = AddressFamily::Inet6;
        assert_eq!(f.classify(&RouteNetlinkMessage::NewAddress(a)), None);
    }

    #[test]
    fn only_our_deleted_routes_trigger() {
        let f = filter();
        let mut r = RouteMessage::default();
        r.header.protocol = RouteProtocol::Boot;
        r.header.kind = RouteType::Unicast;
        assert!(
            f.classify(&RouteNetlinkMessage::DelRoute(r.clone()))
                .is_none()
        );
        r.header.protocol = RouteProtocol::from(RTPROT_FLANNEL);
        assert!(
            f.classify(&RouteNetlinkMessage::DelRoute(r.clone()))
                .is_some()
        );
        // Our own writes (new routes) do not.
        assert!(f.classify(&RouteNetlinkMessage::NewRoute(r)).is_none());
    }

    #[test]
    fn uplink_addresses_are_their_own_trigger() {
        let f = filter();
        let mut a = AddressMessage::default();
        a.header.index = 2;
        a.header.family = AddressFamily::Inet;
        assert_eq!(
            f.classify(&RouteNetlinkMessage::NewAddress(a)),
            Some(Trigger::UplinkAddress)
        );
    }
}

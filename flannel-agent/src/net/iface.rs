//! Choosing the external interface and the public IP, by upstream's rules (`main.go`
//! `LookupExtIface`, `pkg/ipmatch`): `--iface` (IP or name, in order), then `--iface-regex`
//! (addresses first, then names), then `--iface-can-reach`; with none of those, the owner of
//! `--public-ip`/`--public-ipv6`, else the default-route interface.
//!
//! Split in two: [`gather`] reads links, addresses and routes over rtnetlink (no shelling
//! out); [`select`] is pure, so the rules are unit-tested on fixed host descriptions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::StreamExt;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
};
use regex::Regex;
use rtnetlink::packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use tracing::{info, warn};

use crate::backend::ExternalInterface;

/// Why no interface could be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Talking to the kernel failed.
    #[error("netlink {op}: {reason}")]
    Netlink {
        /// The request.
        op: String,
        /// What went wrong.
        reason: String,
    },
    /// None of `--iface`, `--iface-regex`, `--iface-can-reach` matched.
    #[error(
        "no interface matches --iface {iface:?} / --iface-regex {regex:?} / --iface-can-reach {can_reach:?}"
    )]
    NoMatch {
        /// `--iface` values.
        iface: Vec<String>,
        /// `--iface-regex` values.
        regex: Vec<String>,
        /// `--iface-can-reach`.
        can_reach: Option<IpAddr>,
    },
    /// `--public-ip`/`--public-ipv6` is not on any interface (and no `--iface*` was given).
    #[error("no interface has the address {addr} given by {flag}")]
    PublicIpNotFound {
        /// The flag.
        flag: &'static str,
        /// Its value.
        addr: IpAddr,
    },
    /// No default route to pick the interface from.
    #[error("no {family} default route; pass --iface to choose the interface")]
    NoDefaultRoute {
        /// `IPv4`/`IPv6`.
        family: &'static str,
    },
    /// Dual stack with the two default routes on different interfaces.
    #[error("IPv4 default route is via {v4} but IPv6 via {v6}; pass --iface to choose")]
    DefaultRouteMismatch {
        /// Interface of the IPv4 default route.
        v4: String,
        /// Interface of the IPv6 default route.
        v6: String,
    },
    /// The chosen interface lacks a usable address of a needed family.
    #[error("interface {name} has no usable {family} address")]
    NoAddress {
        /// Interface name.
        name: String,
        /// `IPv4`/`IPv6`.
        family: &'static str,
    },
    /// The chosen interface reports MTU 0.
    #[error("interface {name} reports MTU 0")]
    NoMtu {
        /// Interface name.
        name: String,
    },
    /// A `--iface-regex` does not compile.
    #[error("--iface-regex {regex:?} is not a valid regular expression: {reason}")]
    BadRegex {
        /// The pattern.
        regex: String,
        /// Why.
        reason: String,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// One link of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Whether it is the loopback device.
    pub loopback: bool,
}

/// One address of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    /// Interface index.
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// Scope: global (true) or link (false); host-scope addresses are never collected.
    pub global: bool,
    /// `IFA_F_PERMANENT` (configured, not SLAAC/DHCP).
    pub permanent: bool,
    /// `IFA_F_TEMPORARY` (privacy address).
    pub temporary: bool,
    /// `IFA_F_DEPRECATED`.
    pub deprecated: bool,
}

/// What the selection rules look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostNet {
    /// Links in index order.
    pub links: Vec<Link>,
    /// Addresses in kernel order.
    pub addrs: Vec<Addr>,
    /// Interface of the IPv4 default route.
    pub default_v4: Option<u32>,
    /// Interface of the IPv6 default route.
    pub default_v6: Option<u32>,
    /// Interface of the route to `--iface-can-reach`.
    pub can_reach: Option<u32>,
}

/// The selection inputs (command line and enabled families).
#[derive(Clone, Debug, Default)]
pub struct Selector {
    /// `--iface`.
    pub iface: Vec<String>,
    /// `--iface-regex`.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`.
    pub iface_can_reach: Option<IpAddr>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `EnableIPv4`.
    pub ipv4: bool,
    /// `EnableIPv6`.
    pub ipv6: bool,
}

impl HostNet {
    fn link(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    fn owner_of(&self, ip: IpAddr) -> Option<u32> {
        self.addrs.iter().find(|a| a.ip == ip).map(|a| a.index)
    }

    /// Upstream's preference: usable (not deprecated), global before link-local,
    /// permanent before dynamic, non-temporary before temporary; kernel order otherwise.
    fn best_addr(&self, index: u32, v6: bool) -> Option<IpAddr> {
        self.addrs
            .iter()
            .filter(|a| a.index == index && a.ip.is_ipv6() == v6 && !a.deprecated)
            .filter(|a| !a.ip.is_loopback() && !a.ip.is_multicast() && !a.ip.is_unspecified())
            .min_by_key(|a| (!a.global, !a.permanent, a.temporary))
            .map(|a| a.ip)
    }
}

/// Applies the rules to a host description.
pub fn select(host: &HostNet, sel: &Selector) -> Result<ExternalInterface> {
    let explicit =
        !sel.iface.is_empty() || !sel.iface_regex.is_empty() || sel.iface_can_reach.is_some();
    // The address the user pointed at, when --iface was an IP: it is the interface address.
    let mut pinned: Option<IpAddr> = None;
    let index = if explicit {
        let mut found = None;
        for spec in &sel.iface {
            found = match spec.parse::<IpAddr>() {
                Ok(ip) => host.owner_of(ip).inspect(|_| pinned = Some(ip)),
                Err(_) => host.links.iter().find(|l| l.name == *spec).map(|l| l.index),
            };
            if found.is_some() {
                break;
            }
            warn!(iface = %spec, "--iface matches no interface; trying the next choice");
        }
        if found.is_none() {
            for pattern in &sel.iface_regex {
                let re = Regex::new(pattern).map_err(|e| Error::BadRegex {
                    regex: pattern.clone(),
                    reason: e.to_string(),
                })?;
                let wanted_v6 = !sel.ipv4 && sel.ipv6;
                found = host
                    .addrs
                    .iter()
                    .find(|a| a.ip.is_ipv6() == wanted_v6 && re.is_match(&a.ip.to_string()))
                    .inspect(|a| pinned = Some(a.ip))
                    .map(|a| a.index)
                    .or_else(|| {
                        host.links
                            .iter()
                            .find(|l| re.is_match(&l.name))
                            .map(|l| l.index)
                    });
                if found.is_some() {
                    break;
                }
                warn!(regex = %pattern, "--iface-regex matches no interface; trying the next choice");
            }
        }
        if found.is_none() {
            found = host.can_reach;
        }
        found.ok_or_else(|| Error::NoMatch {
            iface: sel.iface.clone(),
            regex: sel.iface_regex.clone(),
            can_reach: sel.iface_can_reach,
        })?
    } else if let Some(ip) = sel.public_ip {
        host.owner_of(ip.into()).ok_or(Error::PublicIpNotFound {
            flag: "--public-ip",
            addr: ip.into(),
        })?
    } else if let Some(ip) = sel.public_ipv6 {
        host.owner_of(ip.into()).ok_or(Error::PublicIpNotFound {
            flag: "--public-ipv6",
            addr: ip.into(),
        })?
    } else if sel.ipv4 {
        let v4 = host
            .default_v4
            .ok_or(Error::NoDefaultRoute { family: "IPv4" })?;
        if sel.ipv6 {
            let v6 = host
                .default_v6
                .ok_or(Error::NoDefaultRoute { family: "IPv6" })?;
            if v4 != v6 {
                let name = |i| {
                    host.link(i)
                        .map_or_else(|| format!("#{i}"), |l| l.name.clone())
                };
                return Err(Error::DefaultRouteMismatch {
                    v4: name(v4),
                    v6: name(v6),
                });
            }
        }
        v4
    } else {
        host.default_v6
            .ok_or(Error::NoDefaultRoute { family: "IPv6" })?
    };

    let link = host.link(index).ok_or_else(|| Error::Netlink {
        op: format!("find link #{index}"),
        reason: "link vanished".into(),
    })?;
    let iface_addr = match pinned {
        Some(IpAddr::V4(a)) => Some(a),
        _ => host.best_addr(index, false).and_then(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }),
    };
    let iface_addr6 = match pinned {
        Some(IpAddr::V6(a)) => Some(a),
        _ => host.best_addr(index, true).and_then(|a| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }),
    };
    if sel.ipv4 && iface_addr.is_none() {
        return Err(Error::NoAddress {
            name: link.name.clone(),
            family: "IPv4",
        });
    }
    if sel.ipv6 && iface_addr6.is_none() {
        return Err(Error::NoAddress {
            name: link.name.clone(),
            family: "IPv6",
        });
    }
    if link.mtu == 0 {
        return Err(Error::NoMtu {
            name: link.name.clone(),
        });
    }
    // A disabled family's address is neither sent from nor published: an IPv6-only host
    // publishes PublicIP 0.0.0.0, as upstream's zero `ip.IP4`.
    let iface_addr = iface_addr
        .filter(|_| sel.ipv4)
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ok(ExternalInterface {
        name: link.name.clone(),
        index,
        iface_addr,
        public_ip: sel.public_ip.filter(|_| sel.ipv4).unwrap_or(iface_addr),
        iface_addr6: iface_addr6.filter(|_| sel.ipv6),
        public_ipv6: sel.public_ipv6.or(iface_addr6).filter(|_| sel.ipv6),
        mtu: link.mtu,
    })
}

/// Reads the host's links, addresses and the routes the rules need, over rtnetlink, in the
/// calling thread's network namespace.
pub async fn gather(can_reach: Option<IpAddr>) -> Result<HostNet> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Netlink {
        op: "connect".into(),
        reason: e.to_string(),
    })?;
    let conn = tokio::spawn(conn);
    let result = gather_with(&handle, can_reach).await;
    conn.abort();
    result
}

async fn request(
    handle: &rtnetlink::Handle,
    op: &str,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<Vec<RouteNetlinkMessage>> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | flags;
    let mut handle = handle.clone();
    let mut replies = handle.request(req).map_err(|e| Error::Netlink {
        op: op.into(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    while let Some(reply) = replies.next().await {
        match reply.payload {
            NetlinkPayload::InnerMessage(m) => out.push(m),
            NetlinkPayload::Error(err) if err.code.is_some() => {
                return Err(Error::Netlink {
                    op: op.into(),
                    reason: std::io::Error::from_raw_os_error(-err.raw_code()).to_string(),
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

async fn gather_with(handle: &rtnetlink::Handle, can_reach: Option<IpAddr>) -> Result<HostNet> {
    let mut host = HostNet::default();
    for m in request(
        handle,
        "dump links",
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )
    .await?
    {
        if let RouteNetlinkMessage::NewLink(l) = m {
            host.links.push(link_info(&l));
        }
    }
    host.links.sort_by_key(|l| l.index);
    for m in request(
        handle,
        "dump addresses",
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        NLM_F_DUMP,
    )
    .await?
    {
        if let RouteNetlinkMessage::NewAddress(a) = m
            && let Some(info) = addr_info(&a)
        {
            host.addrs.push(info);
        }
    }
    for (family, slot) in [
        (AddressFamily::Inet, &mut host.default_v4),
        (AddressFamily::Inet6, &mut host.default_v6),
    ] {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        let routes = request(
            handle,
            "dump routes",
            RouteNetlinkMessage::GetRoute(msg),
            NLM_F_DUMP,
        )
        .await?;
        *slot = routes.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => default_route_oif(r),
            _ => None,
        });
    }
    if let Some(dst) = can_reach {
        let mut msg = RouteMessage::default();
        let (family, len, addr) = match dst {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(addr));
        let op = format!("get route to {dst}");
        match request(handle, &op, RouteNetlinkMessage::GetRoute(msg), 0).await {
            Ok(routes) => {
                host.can_reach = routes.iter().find_map(|m| match m {
                    RouteNetlinkMessage::NewRoute(r) => oif(r),
                    _ => None,
                });
            }
            Err(error) => warn!(%error, "--iface-can-reach: no route"),
        }
    }
    Ok(host)
}

fn link_info(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mtu: 0,
        loopback: l.header.flags.contains(LinkFlags::Loopback),
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            _ => {}
        }
    }
    link
}

fn addr_info(a: &AddressMessage) -> Option<Addr> {
    let global = match a.header.scope {
        AddressScope::Universe => true,
        AddressScope::Link => false,
        _ => return None,
    };
    let local = a.attributes.iter().find_map(|at| match at {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let ip = local.or_else(|| {
        a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })?;
    let flags = a
        .attributes
        .iter()
        .find_map(|at| match at {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(a.header.flags.bits())));
    Some(Addr {
        index: a.header.index,
        ip,
        global,
        permanent: flags.contains(AddressFlags::Permanent),
        // IFA_F_TEMPORARY shares its bit with IFA_F_SECONDARY; only IPv6 has privacy addresses.
        temporary: ip.is_ipv6() && flags.contains(AddressFlags::Secondary),
        deprecated: flags.contains(AddressFlags::Deprecated),
    })
}

fn oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn default_route_oif(r: &RouteMessage) -> Option<u32> {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    (r.header.destination_prefix_length == 0
        && r.header.kind == RouteType::Unicast
        && table == u32::from(RouteHeader::RT_TABLE_MAIN))
    .then(|| oif(r))
    .flatten()
}

/// Gathers and selects; logs the choice.
pub async fn lookup(sel: &Selector) -> Result<ExternalInterface> {
    let ext = lookup_quiet(sel).await?;
    info!(
        iface = %ext.name, index = ext.index, addr = %ext.iface_addr, public_ip = %ext.public_ip,
        addr6 = ?ext.iface_addr6, public_ipv6 = ?ext.public_ipv6, mtu = ext.mtu,
        "using external interface"
    );
    Ok(ext)
}

/// [`lookup`] without the log line: what the interface looks like now (the agent asks
/// again whenever the uplink's addresses change).
pub async fn lookup_quiet(sel: &Selector) -> Result<ExternalInterface> {
    let host = gather(sel.iface_can_reach).await?;
    select(&host, sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(index: u32, ip: &str) -> Addr {
        let ip: IpAddr = ip.parse().unwrap();
        Addr {
            index,
            ip,
            global: !matches!(ip, IpAddr::V6(a) if a.segments()[0] == 0xfe80),
            permanent: true,
            temporary: false,
            deprecated: false,
        }
    }

    fn host() -> HostNet {
        let link = |index, name: &str| Link {
            index,
            name: name.into(),
            mtu: if index == 1 { 65536 } else { 1500 },
            loopback: index == 1,
        };
        HostNet {
            links: vec![
                link(1, "lo"),
                link(2, "eth0"),
                link(3, "eth1"),
                link(4, "wg0"),
            ],
            addrs: vec![
                addr(2, "198.18.0.2"),
                addr(2, "fe80::1"),
                addr(2, "fd00::2"),
                addr(3, "198.18.1.2"),
                addr(3, "198.18.1.3"),
            ],
            default_v4: Some(2),
            default_v6: Some(2),
            can_reach: None,
        }
    }

    fn v4() -> Selector {
        Selector {
            ipv4: true,
            ..Default::default()
        }
    }

    #[test]
    fn default_route_interface() {
        let ext = select(&host(), &v4()).unwrap();
        assert_eq!((ext.name.as_str(), ext.index, ext.mtu), ("eth0", 2, 1500));
        assert_eq!(ext.iface_addr, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(ext.public_ip, ext.iface_addr);
        assert_eq!(ext.iface_addr6, None);
        let mut h = host();
        h.default_v4 = None;
        assert_eq!(
            select(&h, &v4()).unwrap_err(),
            Error::NoDefaultRoute { family: "IPv4" }
        );
    }

    #[test]
    fn iface_by_name_ip_in_order() {
        let sel = Selector {
            iface: vec!["nope".into(), "198.18.1.3".into(), "eth0".into()],
            ..v4()
        };
        let ext = select(&host(), &sel).unwrap();
        assert_eq!(ext.name, "eth1");
        assert_eq!(
            ext.iface_addr,
            Ipv4Addr::new(198, 18, 1, 3),
            "the IP given wins"
        );
        let sel = Selector {
            iface: vec!["eth1".into()],
            public_ip: Some(Ipv4Addr::new(203, 0, 113, 9)),
            ..v4()
        };
        let ext = select(&host(), &sel).unwrap();
        assert_eq!(ext.iface_addr, Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(ext.public_ip, Ipv4Addr::new(203, 0, 113, 9));
    }

    #[test]
    fn regex_addresses_then_names_then_can_reach() {
        let sel = Selector {
            iface_regex: vec![r"^198\.18\.1\.".into()],
            ..v4()
        };
        assert_eq!(select(&host(), &sel).unwrap().name, "eth1");
        let sel = Selector {
            iface_regex: vec!["^eth1$".into()],
            ..v4()
        };
        assert_eq!(select(&host(), &sel).unwrap().name, "eth1");
        let mut h = host();
        h.can_reach = Some(3);
        let sel = Selector {
            iface: vec!["nope".into()],
            iface_regex: vec!["^zz".into()],
            iface_can_reach: Some("198.18.1.1".parse().unwrap()),
            ..v4()
        };
        assert_eq!(select(&h, &sel).unwrap().name, "eth1");
        h.can_reach = None;
        assert!(matches!(
            select(&h, &sel).unwrap_err(),
            Error::NoMatch { .. }
        ));
    }

    #[test]
    fn public_ip_owner_and_missing_addresses() {
        let sel = Selector {
            public_ip: Some(Ipv4Addr::new(198, 18, 1, 2)),
            ..v4()
        };
        assert_eq!(select(&host(), &sel).unwrap().name, "eth1");
        let sel = Selector {
            public_ip: Some(Ipv4Addr::new(203, 0, 113, 1)),
            ..v4()
        };
        assert!(matches!(
            select(&host(), &sel).unwrap_err(),
            Error::PublicIpNotFound { .. }
        ));
        let sel = Selector {
            iface: vec!["wg0".into()],
            ..v4()
        };
        assert_eq!(
            select(&host(), &sel).unwrap_err(),
            Error::NoAddress {
                name: "wg0".into(),
                family: "IPv4"
            }
        );
    }

    #[test]
    fn dual_stack_prefers_global_v6() {
        let sel = Selector { ipv6: true, ..v4() };
        let ext = select(&host(), &sel).unwrap();
        assert_eq!(ext.iface_addr6, Some("fd00::2".parse().unwrap()));
        assert_eq!(ext.public_ipv6, ext.iface_addr6);
        let mut h = host();
        h.default_v6 = Some(3);
        assert!(matches!(
            select(&h, &sel).unwrap_err(),
            Error::DefaultRouteMismatch { .. }
        ));
        let mut h = host();
        h.addrs[2].deprecated = true;
        assert_eq!(
            select(&h, &sel).unwrap().iface_addr6,
            Some("fe80::1".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn gather_reads_loopback() {
        let host = gather(Some("127.0.0.1".parse().unwrap())).await.unwrap();
        let lo = host.links.iter().find(|l| l.loopback).expect("lo exists");
        assert_eq!(lo.name, "lo");
        assert_eq!(host.can_reach, Some(lo.index));
    }
}

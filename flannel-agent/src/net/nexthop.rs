//! Nexthop objects (`ip nexthop`; `RTM_NEWNEXTHOP`, `RTM_DELNEXTHOP`, `RTM_GETNEXTHOP`):
//! the wire format of the messages, which `netlink-packet-route` 0.34 does not have (it
//! knows a route's `RTA_NH_ID`, not the objects it names).
//!
//! Why the agent uses them for its IPv4 peer routes: the kernel shares one `fib_info`
//! between IPv4 routes with equal attributes, and finds a candidate by a hash of the
//! protocol, scope, source, metric and *device*, not the gateway. Every flannel route has
//! the same protocol and device and a different gateway, so all of them land in one hash
//! bucket and each insertion compares against every route before it: quadratic (5,000
//! routes cost 0.40 s of kernel time, 10,000 cost 1.6 s, measured here with `ip -batch`). A
//! route that names a nexthop object by id is hashed by that id instead (0.09 s and
//! 0.17 s). IPv6 routes share nothing and are written as plain routes.
//!
//! The kernel still reports a route's gateway and device along with its `RTA_NH_ID`
//! (`net.ipv4.nexthop_compat_mode`, on by default), so `ip route` and readers of route
//! dumps see the same routes as before.

use std::net::IpAddr;

use netlink_packet_route::AddressFamily;
use rtnetlink::packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkSerializable,
    NlaBuffer, NlasIterator,
};

/// `RTM_NEWNEXTHOP`.
pub const RTM_NEWNEXTHOP: u16 = 104;
/// `RTM_DELNEXTHOP`.
pub const RTM_DELNEXTHOP: u16 = 105;
/// `RTM_GETNEXTHOP`.
pub const RTM_GETNEXTHOP: u16 = 106;
/// `RTNLGRP_NEXTHOP`: the multicast group of nexthop changes.
pub const RTNLGRP_NEXTHOP: u32 = 32;
/// `RTNH_F_ONLINK`: the gateway is on the link, whatever the device's addresses say.
pub const RTNH_F_ONLINK: u32 = 4;

const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;

/// `struct nhmsg` (8 bytes) before the attributes.
const HEADER_LEN: usize = 8;

/// One nexthop object: a gateway on a device, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nexthop {
    /// Its id (`NHA_ID`); routes name it by this (`RTA_NH_ID`).
    pub id: u32,
    /// `AF_INET` or `AF_INET6` (`AF_UNSPEC` for groups and blackholes).
    pub family: u8,
    /// Who installed it (`nh_protocol`): ours carry `RTPROT_FLANNEL`.
    pub protocol: u8,
    /// `RTNH_F_*` flags (`nh_flags`).
    pub flags: u32,
    /// The output device (`NHA_OIF`).
    pub oif: Option<u32>,
    /// The gateway (`NHA_GATEWAY`).
    pub gateway: Option<IpAddr>,
}

impl Nexthop {
    /// `id <id> via <gateway> dev <oif> onlink proto <protocol>`: the only kind the agent
    /// writes (a peer's gateway on the VXLAN device).
    pub fn onlink(id: u32, gateway: IpAddr, oif: u32, protocol: u8) -> Self {
        let family = match gateway {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        Self {
            id,
            family: u8::from(family),
            protocol,
            flags: RTNH_F_ONLINK,
            oif: Some(oif),
            gateway: Some(gateway),
        }
    }

    /// A request naming only the id (what a delete needs).
    pub fn by_id(id: u32) -> Self {
        Self {
            id,
            family: 0,
            protocol: 0,
            flags: 0,
            oif: None,
            gateway: None,
        }
    }

    fn attributes(&self) -> Vec<DefaultNla> {
        let mut nlas = Vec::new();
        if self.id != 0 {
            nlas.push(DefaultNla::new(NHA_ID, self.id.to_ne_bytes().to_vec()));
        }
        if let Some(oif) = self.oif {
            nlas.push(DefaultNla::new(NHA_OIF, oif.to_ne_bytes().to_vec()));
        }
        if let Some(gw) = self.gateway {
            let bytes = match gw {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            nlas.push(DefaultNla::new(NHA_GATEWAY, bytes));
        }
        nlas
    }

    fn parse(payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() < HEADER_LEN {
            return Err(DecodeError::from(format!(
                "nexthop message of {} bytes is shorter than its header",
                payload.len()
            )));
        }
        let mut nh = Self {
            id: 0,
            family: payload[0],
            protocol: payload[2],
            flags: u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes")),
            oif: None,
            gateway: None,
        };
        for nla in NlasIterator::new(&payload[HEADER_LEN..]) {
            let nla: NlaBuffer<&[u8]> = nla?;
            let value = nla.value();
            let u32_of = |v: &[u8]| {
                <[u8; 4]>::try_from(v)
                    .map(u32::from_ne_bytes)
                    .map_err(|_| DecodeError::from("nexthop attribute is not a u32"))
            };
            match nla.kind() {
                NHA_ID => nh.id = u32_of(value)?,
                NHA_OIF => nh.oif = Some(u32_of(value)?),
                NHA_GATEWAY => {
                    nh.gateway = match value.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(value).expect("4 bytes"))),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(value).expect("16 bytes"))),
                        n => {
                            return Err(DecodeError::from(format!("nexthop gateway of {n} bytes")));
                        }
                    }
                }
                // Groups, encapsulation, FDB nexthops: not ours, kept out of the type.
                _ => {}
            }
        }
        Ok(nh)
    }
}

/// A nexthop request or answer, as the netlink connection carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NexthopMessage {
    /// `RTM_NEWNEXTHOP`: create or replace; also each entry of a dump.
    New(Nexthop),
    /// `RTM_DELNEXTHOP`: delete by id; also the notification of a deletion.
    Del(Nexthop),
    /// `RTM_GETNEXTHOP`: with `NLM_F_DUMP`, every nexthop.
    Get(Nexthop),
}

impl NexthopMessage {
    fn nexthop(&self) -> &Nexthop {
        match self {
            Self::New(nh) | Self::Del(nh) | Self::Get(nh) => nh,
        }
    }
}

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        match self {
            Self::New(_) => RTM_NEWNEXTHOP,
            Self::Del(_) => RTM_DELNEXTHOP,
            Self::Get(_) => RTM_GETNEXTHOP,
        }
    }

    fn buffer_len(&self) -> usize {
        HEADER_LEN + self.nexthop().attributes().as_slice().buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        let nh = self.nexthop();
        buffer[..HEADER_LEN].fill(0);
        buffer[0] = nh.family;
        // nh_scope is answered by the kernel, never set.
        buffer[2] = nh.protocol;
        buffer[4..8].copy_from_slice(&nh.flags.to_ne_bytes());
        nh.attributes().as_slice().emit(&mut buffer[HEADER_LEN..]);
    }
}

impl NetlinkDeserializable for NexthopMessage {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        let nh = Nexthop::parse(payload)?;
        match header.message_type {
            RTM_NEWNEXTHOP => Ok(Self::New(nh)),
            RTM_DELNEXTHOP => Ok(Self::Del(nh)),
            RTM_GETNEXTHOP => Ok(Self::Get(nh)),
            other => Err(DecodeError::from(format!(
                "message type {other} is not a nexthop message"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn a_nexthop_survives_its_wire_format() {
        let nh = Nexthop::onlink(0x0af4_0300, IpAddr::V4(Ipv4Addr::new(10, 244, 3, 0)), 7, 84);
        let msg = NexthopMessage::New(nh.clone());
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        // nhmsg: AF_INET, scope 0, protocol 84, flags onlink; then id, oif, gateway.
        assert_eq!(&buf[..8], &[2, 0, 84, 0, 4, 0, 0, 0]);
        assert_eq!(buf.len(), 8 + 8 + 8 + 8);
        let mut header = NetlinkHeader::default();
        header.message_type = RTM_NEWNEXTHOP;
        assert_eq!(NexthopMessage::deserialize(&header, &buf).unwrap(), msg);
    }

    #[test]
    fn a_short_or_foreign_message_is_an_error_not_a_panic() {
        let mut header = NetlinkHeader::default();
        header.message_type = RTM_NEWNEXTHOP;
        assert!(NexthopMessage::deserialize(&header, &[2, 0, 84]).is_err());
        header.message_type = 24;
        assert!(NexthopMessage::deserialize(&header, &[0; 8]).is_err());
        // A gateway of 5 bytes.
        let mut bad = vec![2, 0, 84, 0, 0, 0, 0, 0];
        bad.extend_from_slice(&[9, 0, 6, 0, 1, 2, 3, 4, 5, 0, 0, 0]);
        header.message_type = RTM_NEWNEXTHOP;
        assert!(NexthopMessage::deserialize(&header, &bad).is_err());
    }
}

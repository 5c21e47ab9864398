//! ctnetlink: the one conntrack change the per-flow fast path needs.
//!
//! A TCP flow on the fast path skips conntrack, so conntrack's TCP window tracking falls
//! behind; the first segment that takes the kernel path again (a periodic re-check, or
//! everything once the programs are detached) would be out of window, hence INVALID, and
//! kube-proxy drops INVALID packets. `nf_flow_table` solves the same problem for the flows
//! it offloads by setting `IP_CT_TCP_FLAG_BE_LIBERAL` on both directions of their
//! conntrack entry; the agent does exactly that, per flow, before the flow goes fast.

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, TCPFlags, Tuple,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// `IP_CT_TCP_FLAG_BE_LIBERAL` (include/uapi/linux/netfilter/nf_conntrack_tcp.h).
const IP_CT_TCP_FLAG_BE_LIBERAL: u8 = 0x08;

/// One direction of a TCP connection as conntrack keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpTuple {
    /// Source address (both addresses of one family).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liberal {
    /// The entry now tolerates unseen segments in both directions.
    Set,
    /// Conntrack holds no entry for the connection (it does not track it).
    NoEntry,
}

/// A ctnetlink socket in the caller's network namespace.
pub struct Conntrack {
    socket: Socket,
    seq: u32,
}

impl Conntrack {
    /// Open the socket.
    pub fn open() -> std::io::Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Set `IP_CT_TCP_FLAG_BE_LIBERAL` on both directions of the connection `tuple`
    /// belongs to (either direction finds it: conntrack hashes both).
    pub fn set_tcp_liberal(&mut self, tuple: TcpTuple) -> std::io::Result<Liberal> {
        let mut msg = NetlinkMessage::new(
            header(NLM_F_REQUEST | NLM_F_ACK, self.next_seq()),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family(tuple.src), 0, 0),
                ConntrackMessage::New(liberal_update(tuple)),
            )),
        );
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        match self.ack()? {
            0 => Ok(Liberal::Set),
            e if e == -libc::ENOENT => Ok(Liberal::NoEntry),
            e => Err(std::io::Error::from_raw_os_error(-e)),
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// The (negative errno or 0) code of the reply to our last request.
    fn ack(&mut self) -> std::io::Result<i32> {
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut rest = &buf[..];
            while !rest.is_empty() {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(rest)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                let len = (msg.header.length as usize).max(1).min(rest.len());
                rest = &rest[len..];
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                if let NetlinkPayload::Error(e) = msg.payload {
                    return Ok(e.raw_code());
                }
            }
        }
    }
}

/// The conntrack table (`nfgen_family`) an address's connections live in.
fn family(addr: IpAddr) -> NetfilterProtoFamily {
    match addr {
        IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
        IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
    }
}

fn header(flags: u16, seq: u32) -> NetlinkHeader {
    let mut h = NetlinkHeader::default();
    h.flags = flags;
    h.sequence_number = seq;
    h
}

/// `IPCTNL_MSG_CT_NEW` without `NLM_F_CREATE`: an update of the existing entry's TCP
/// protocol info only.
fn liberal_update(t: TcpTuple) -> Vec<ConntrackAttribute> {
    let flags = || {
        // The struct is `non_exhaustive`; its wire form is `{ flags, mask }`.
        TCPFlags::parse(&[IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL])
            .expect("two bytes parse")
    };
    vec![
        ConntrackAttribute::CtaTupleOrig(vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(t.src),
                IPTuple::DestinationAddress(t.dst),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Tcp),
                ProtoTuple::SourcePort(t.sport),
                ProtoTuple::DestinationPort(t.dport),
            ]),
        ]),
        ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![
            ProtoInfoTCP::OriginalFlags(flags()),
            ProtoInfoTCP::ReplyFlags(flags()),
        ])]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn liberal_update_names_the_tuple_and_both_directions() {
        let attrs = liberal_update(TcpTuple {
            src: Ipv4Addr::new(10, 244, 1, 2).into(),
            dst: Ipv4Addr::new(10, 244, 2, 2).into(),
            sport: 40000,
            dport: 5201,
        });
        let mut buf = vec![0u8; attrs.as_slice().buffer_len()];
        attrs.as_slice().emit(&mut buf);
        // Addresses and ports in network order, and the liberal flag twice.
        let has = |needle: &[u8]| buf.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[10, 244, 1, 2]) && has(&[10, 244, 2, 2]));
        assert!(has(&40000u16.to_be_bytes()) && has(&5201u16.to_be_bytes()));
        assert_eq!(buf.windows(2).filter(|w| *w == [8, 8]).count(), 2);
    }

    #[test]
    fn ipv6_flows_are_looked_up_in_the_ipv6_table() {
        let src: Ipv6Addr = "fd00:10:244:1::2".parse().unwrap();
        let dst: Ipv6Addr = "fd00:10:244:2::2".parse().unwrap();
        assert_eq!(family(src.into()), NetfilterProtoFamily::IPv6);
        assert_eq!(
            family(Ipv4Addr::new(10, 244, 1, 2).into()),
            NetfilterProtoFamily::IPv4
        );
        let attrs = liberal_update(TcpTuple {
            src: src.into(),
            dst: dst.into(),
            sport: 40000,
            dport: 5201,
        });
        let mut buf = vec![0u8; attrs.as_slice().buffer_len()];
        attrs.as_slice().emit(&mut buf);
        let has = |needle: &[u8]| buf.windows(needle.len()).any(|w| w == needle);
        assert!(has(&src.octets()) && has(&dst.octets()));
    }
}

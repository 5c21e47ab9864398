//! The per-flow fast path: flow verification by observation (ONCache's filter cache).
//!
//! A flow's packets take the kernel path until the programs have watched that path carry
//! them, unchanged, in both directions:
//!
//! * before netfilter, the 5-tuple is *seen*: TC ingress of the pod's host-side veth for
//!   packets the pod sends ([`crate::pod::from_pod`]), the uplink for VXLAN it receives
//!   ([`crate::decap`]);
//! * after netfilter, the same 5-tuple is *confirmed*: TC egress of `flannel.<VNI>` or
//!   `flannel-v6.<VNI>` ([`crate::encap`]) and TC egress of the pod's veth
//!   ([`crate::pod::to_pod`]).
//!
//! Both families share the map: addresses are 16 bytes, IPv4 mapped into IPv6.
//!
//! Only a packet that FORWARD accepted and that no NAT rewrote arrives at the second hook
//! with the tuple the first one recorded. A Service flow (ClusterIP before DNAT, a pod IP
//! after, and the reverse on replies) therefore never verifies, nor does a flow that
//! policy drops. Once both directions are confirmed (and, for TCP, the agent has made the
//! flow's conntrack entry tolerate not seeing every segment: [`FLOW_F_CT_READY`]), both
//! directions go fast. Each direction stays fast for `flow_refresh_ms` after its last
//! confirmation; then its next packet takes the kernel path again, which re-runs
//! netfilter (a new DROP rule takes effect) and refreshes conntrack's timeout.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use flannel_common::{
    DatapathConfig, Flow, FlowKey, PathReason,
    maps::{FLOW_F_CLOSING, FLOW_F_CT_READY},
    wire::{IPV4_LEN, IPV6_LEN, v4_mapped},
};

use crate::maps::{FLOW_EVENTS, FLOWS};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A confirmation counts only this soon after the tuple was seen before netfilter.
const CONFIRM_WINDOW_NS: u64 = 1_000_000_000;
/// How long the agent gets to answer a conntrack request before it is asked again.
const CT_ASK_INTERVAL_NS: u64 = 1_000_000_000;

/// Which way a packet goes, from the local pod's point of view.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// The pod sends it.
    Tx,
    /// The pod receives it.
    Rx,
}

/// The parts of a TCP/UDP packet the fast path needs. Addresses are 16 bytes, IPv4
/// mapped into IPv6 as the route and peer maps hold them.
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub tos: u8,
    /// TTL, or IPv6 hop limit.
    pub ttl: u8,
    /// IP + L4 header bytes, for the GSO segment size check.
    pub headers: u16,
}

impl Packet {
    /// The flow key, seen from the local pod.
    #[inline(always)]
    pub fn key(&self, dir: Dir) -> FlowKey {
        let (pod, remote, pod_port, remote_port) = match dir {
            Dir::Tx => (self.src, self.dst, self.sport, self.dport),
            Dir::Rx => (self.dst, self.src, self.dport, self.sport),
        };
        FlowKey {
            pod,
            remote,
            pod_port,
            remote_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }

    /// SYN, FIN or RST: packets conntrack must see.
    #[inline(always)]
    fn is_tcp_control(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
    }
}

/// The TCP flags and header length, or UDP's 8, of the L4 header at `l4`.
#[inline(always)]
fn l4(ctx: &TcContext, l4: usize, proto: u8) -> Option<(u8, u16)> {
    match proto {
        IPPROTO_TCP => {
            let off_flags: [u8; 2] = ctx.load(l4 + 12).ok()?;
            Some((off_flags[1], u16::from(off_flags[0] >> 4) * 4))
        }
        IPPROTO_UDP => Some((0, 8)),
        _ => None,
    }
}

/// Parse the IPv4 header at `l3` and the TCP/UDP header behind it. `None` for anything
/// else: other protocols, IP options, fragments.
#[inline(always)]
pub fn parse(ctx: &TcContext, l3: usize) -> Option<Packet> {
    let ip: [u8; IPV4_LEN] = ctx.load(l3).ok()?;
    if ip[0] != 0x45 || (u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff) != 0 {
        return None;
    }
    let proto = ip[9];
    let ports: [u8; 4] = ctx.load(l3 + IPV4_LEN).ok()?;
    let (tcp_flags, l4_len) = l4(ctx, l3 + IPV4_LEN, proto)?;
    Some(Packet {
        src: v4_mapped([ip[12], ip[13], ip[14], ip[15]]),
        dst: v4_mapped([ip[16], ip[17], ip[18], ip[19]]),
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        tos: ip[1],
        ttl: ip[8],
        headers: IPV4_LEN as u16 + l4_len,
    })
}

/// Parse the IPv6 header at `l3` and the TCP/UDP header right behind it. `None` for
/// anything else: other upper layers, and extension headers (fragments included), which
/// the kernel path parses.
#[inline(always)]
pub fn parse6(ctx: &TcContext, l3: usize) -> Option<Packet> {
    let head: [u8; 8] = ctx.load(l3).ok()?;
    if head[0] >> 4 != 6 {
        return None;
    }
    let proto = head[6];
    let ports: [u8; 4] = ctx.load(l3 + IPV6_LEN).ok()?;
    let (tcp_flags, l4_len) = l4(ctx, l3 + IPV6_LEN, proto)?;
    Some(Packet {
        src: ctx.load(l3 + 8).ok()?,
        dst: ctx.load(l3 + 24).ok()?,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        tos: (head[0] << 4) | (head[1] >> 4),
        ttl: head[7],
        headers: IPV6_LEN as u16 + l4_len,
    })
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn stamp_seen(f: &mut Flow, dir: Dir, now: u64) {
    match dir {
        Dir::Tx => f.tx_seen_ns = now,
        Dir::Rx => f.rx_seen_ns = now,
    }
}

/// Before netfilter: record the packet and decide whether it may take the fast path.
/// `Ok` is the flow's entry (valid for this program run); `Err` says why the kernel path
/// carries it.
#[inline(always)]
pub fn observe(
    pkt: &Packet,
    dir: Dir,
    cfg: &DatapathConfig,
    now: u64,
) -> Result<*mut Flow, PathReason> {
    let key = pkt.key(dir);
    if pkt.is_tcp() && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        // A new connection, possibly on a tuple an old one used: start over.
        let _ = FLOWS.insert(key, fresh(dir, now), 0);
        return Err(PathReason::TcpControl);
    }
    let Some(f) = FLOWS.get_ptr_mut(key) else {
        let _ = FLOWS.insert(key, fresh(dir, now), BPF_NOEXIST);
        return Err(PathReason::Unverified);
    };
    // SAFETY: the entry stays valid for this program run (RCU); concurrent writers on
    // other CPUs only store timestamps and counters, any interleaving of which is benign.
    let flow = unsafe { &mut *f };
    let reason = verdict(flow, pkt, dir, cfg, now);
    if reason.is_err() {
        stamp_seen(flow, dir, now);
    }
    reason.map(|()| f)
}

#[inline(always)]
fn verdict(
    f: &mut Flow,
    pkt: &Packet,
    dir: Dir,
    cfg: &DatapathConfig,
    now: u64,
) -> Result<(), PathReason> {
    if pkt.is_tcp_control() {
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            f.flags |= FLOW_F_CLOSING;
        }
        return Err(PathReason::TcpControl);
    }
    if f.flags & FLOW_F_CLOSING != 0 {
        return Err(PathReason::TcpControl);
    }
    let (own, other) = match dir {
        Dir::Tx => (f.tx_ok_ns, f.rx_ok_ns),
        Dir::Rx => (f.rx_ok_ns, f.tx_ok_ns),
    };
    if own == 0 || other == 0 {
        return Err(PathReason::Unverified);
    }
    if pkt.is_tcp() && f.flags & FLOW_F_CT_READY == 0 {
        return Err(PathReason::ConntrackPending);
    }
    let refresh = u64::from(cfg.flow_refresh_ms) * 1_000_000;
    // This direction is re-checked every `refresh`; the other one may lag a little (it is
    // re-checked by its own packets), but a direction that stopped confirming — dropped by
    // a new rule — takes this one off the fast path too.
    if now.wrapping_sub(own) > refresh || now.wrapping_sub(other) > 2 * refresh {
        return Err(PathReason::Refresh);
    }
    Ok(())
}

const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn fresh(dir: Dir, now: u64) -> Flow {
    let mut f = Flow::default();
    stamp_seen(&mut f, dir, now);
    f
}

/// After netfilter: the packet left it with the tuple `observe` recorded, so the kernel
/// path accepted this direction of the flow unchanged. `delivered` is, for packets to the
/// pod, the veth and Ethernet addresses the kernel delivered them with.
///
/// `received_on` is, for IPv6 packets from the pod, the interface the packet entered the
/// host on (`skb->skb_iif`). A fast IPv6 packet reaches `flannel-v6.<VNI>` straight from
/// the pod's veth, so it arrives at this hook too, and must not confirm its own flow. The
/// kernel path hands a pod's packets to routing through the bridge, which receives them
/// again as its own, so only a fast packet still carries the pod's veth (the one its flow
/// delivers to). Without a bridge (never the case with flannel's CNI) the kernel path's
/// packets look fast too: such a flow goes fast once and then stays on the kernel path.
#[inline(always)]
pub fn confirm(
    pkt: &Packet,
    dir: Dir,
    now: u64,
    delivered: Option<(u32, [u8; 12])>,
    received_on: Option<u32>,
) {
    if pkt.is_tcp_control() {
        return;
    }
    let key = pkt.key(dir);
    let Some(f) = FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: as in `observe`.
    let f = unsafe { &mut *f };
    if received_on.is_some_and(|i| i != 0 && i == f.rx_ifindex) {
        return;
    }
    let seen = match dir {
        Dir::Tx => f.tx_seen_ns,
        Dir::Rx => f.rx_seen_ns,
    };
    if seen == 0 || now.wrapping_sub(seen) > CONFIRM_WINDOW_NS {
        return;
    }
    match dir {
        Dir::Tx => f.tx_ok_ns = now,
        Dir::Rx => f.rx_ok_ns = now,
    }
    if let Some((ifindex, eth)) = delivered {
        f.rx_ifindex = ifindex;
        f.rx_eth = eth;
    }
    if pkt.is_tcp()
        && f.flags & (FLOW_F_CT_READY | FLOW_F_CLOSING) == 0
        && f.tx_ok_ns != 0
        && f.rx_ok_ns != 0
        && now.wrapping_sub(f.ct_asked_ns) > CT_ASK_INTERVAL_NS
    {
        f.ct_asked_ns = now;
        // A full ring only delays the flow: it is asked again a second later.
        let _ = FLOW_EVENTS.output(key, 0);
    }
}

/// Lower the IPv6 hop limit at `l3` by one, as forwarding would (no header checksum).
#[inline(always)]
pub fn decrement_hop_limit(ctx: &TcContext, l3: usize, hop_limit: u8) -> Result<(), i64> {
    ctx.store(l3 + 7, &(hop_limit - 1), 0)
}

/// Lower the IPv4 TTL at `l3` by one, as forwarding would, fixing the header checksum.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, l3: usize, ttl: u8, proto: u8) -> Result<(), i64> {
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    ctx.store(l3 + 8, &(ttl - 1), 0)?;
    ctx.l3_csum_replace(l3 + 10, u64::from(old), u64::from(new), 2)
}

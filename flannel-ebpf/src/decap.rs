//! Ingress: decapsulate VXLAN from known peers on the uplink.
//!
//! First, for anything addressed to our VXLAN port, [`known_peer`]: the outer source must
//! be an underlay address that holds a lease (the peers map), whatever else the packet
//! is — options and first fragments included, since the kernel device would accept VXLAN
//! from anyone once we hand it over. A stranger's VXLAN is dropped and counted (in total
//! and by source address, which the agent logs once per source); with the
//! check off (`CONFIG_F_ANY_PEER`) it goes to the kernel device, as upstream's does.
//! Non-first fragments carry no UDP header, so they cannot be told apart from other UDP:
//! they go to the kernel, which can never complete a stranger's datagram because its first
//! fragment was dropped here (and the agent's nftables guard drops what reassembles from
//! a non-peer anyway).
//!
//! Then, for a known peer's plain packet (no options, not fragmented, outer checksum and
//! lengths as the kernel accepts them without trimming): VXLAN flags as the
//! kernel device accepts them (the I bit; with GBP also G, D, A and the policy id, which
//! becomes `skb->mark` as the kernel sets it), our VNI, inner frame to our VTEP MAC
//! carrying IPv4. An inner source outside the sending peer's subnet (e.g. its host traffic
//! that is not masqueraded) goes to the kernel device, which carries it as upstream does.
//!
//! Delivery: the inner frame is redirected into `flannel.<VNI>`'s ingress, so it meets the
//! same routing, conntrack and netfilter as a kernel-decapsulated packet (kube-proxy
//! reverse NAT and NetworkPolicy keep working); what is skipped is the outer IP receive,
//! netfilter on the outer packet, the UDP socket lookup and the VXLAN driver.
//!
//! GSO aggregates go to the kernel device untouched: on 6.18 `bpf_skb_adjust_room` cannot
//! clear the tunnel GSO state of a decapsulated aggregate, which the next transmit would
//! then segment in software. A known peer's outer fragments and packets with IP options go
//! to the kernel too (it reassembles and parses them).
//!
//! IPv6 (VXLAN over an IPv6 underlay, IPv6 inside): the same checks in the same order
//! (known peer first, strangers dropped and counted by source; then flags, VNI, the
//! `flannel-v6.<VNI>` MAC, the inner source in the peer's IPv6 subnet), delivered into
//! `flannel-v6.<VNI>`'s ingress; see [`try_decap6`]. The per-flow fast path covers IPv6
//! as IPv4.
//!
//! Per-flow fast path (`CONFIG_F_FLOW_CACHE`, see [`crate::flows`]): the inner packet of a
//! verified pod-to-pod flow is decapsulated, its TTL lowered as forwarding would, and put
//! straight into the pod's namespace with `bpf_redirect_peer`, GSO aggregates included (no
//! device transmit happens, so the stale tunnel GSO state is harmless). Every other inner
//! packet is recorded as seen and continues on the default path below.
//!
//! Kernel path: a packet no fast path takes is stripped and put into `flannel.<VNI>`'s
//! ingress; a GSO aggregate only where the kernel offers `BPF_F_ADJ_ROOM_DECAP_L4_UDP`
//! (`CONFIG_F_DECAP_L4_UDP`, probed by the agent), else it goes to the device as it came.
//!
//! Opt-in all-flows fast path (`CONFIG_F_FAST_INGRESS`): packets for a local pod in the endpoints map,
//! aggregates included, are decapsulated and put straight into the pod's namespace with
//! `bpf_redirect_peer`. No device transmit happens on the way, so the stale tunnel GSO
//! state is harmless; but the host's routing and netfilter never see these packets.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use flannel_common::{
    DatapathConfig, DropReason, Endpoint, EndpointKey, PassReason, PathReason, Peer, PeerKey,
    maps::{
        BPF_F_ADJ_ROOM_DECAP_L4_UDP, CONFIG_F_ANY_PEER, CONFIG_F_DECAP_L4_UDP,
        CONFIG_F_FAST_INGRESS, CONFIG_F_FLOW_CACHE, CONFIG_F_GBP,
    },
    wire::{
        ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_LEN, IPV6_LEN, UDP_LEN, VXLAN_LEN,
        VXLAN_OVERHEAD, VXLAN6_OVERHEAD, in_subnet16, ipv4_header_checksum, is_v4_mapped,
        parse_vxlan_header, v4_mapped,
    },
};

use crate::{
    Outcome,
    flows::{self, Dir},
    maps,
};

const OUTER_IP: usize = ETH_LEN;
const OUTER_UDP: usize = OUTER_IP + IPV4_LEN;
const VXLAN: usize = OUTER_UDP + UDP_LEN;
const INNER_ETH: usize = VXLAN + VXLAN_LEN;
const INNER_IP: usize = INNER_ETH + ETH_LEN;

/// Offsets over an IPv6 underlay.
const OUTER6_UDP: usize = OUTER_IP + IPV6_LEN;
const VXLAN6: usize = OUTER6_UDP + UDP_LEN;
const INNER6_IP: usize = VXLAN6 + VXLAN_LEN + ETH_LEN;

/// The program: each outer family's half is a BPF function of its own, so the
/// verifier's 512-byte limit applies to each half (plus this small frame), not to their
/// sum.
#[inline(always)]
pub fn program(ctx: &TcContext) -> i32 {
    match ctx.load::<u16>(12).map(u16::from_be) {
        Ok(ETH_P_IP) => decap4_program(ctx),
        Ok(ETH_P_IPV6) => decap6_program(ctx),
        _ => Outcome::Ignore.action(ctx),
    }
}

#[inline(never)]
fn decap4_program(ctx: &TcContext) -> i32 {
    match try_decap(ctx) {
        Ok(action) => action,
        Err(outcome) => outcome.action(ctx),
    }
}

#[inline(always)]
fn try_decap(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = maps::config().ok_or(Outcome::Ignore)?;
    let peer = known_peer(ctx, &cfg)?;

    // From here on: a plain (unfragmented, option-less) VXLAN packet from a known peer.
    let (eth, gbp_mark) = inner_frame(ctx, &cfg, VXLAN, &cfg.vtep_mac, ETH_P_IP)?;
    let inner_src: [u8; 4] = ctx
        .load(INNER_IP + 12)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))?;
    if !in_subnet16(v4_mapped(inner_src), peer.subnet, peer.prefix_len) {
        return Err(Outcome::Pass(PassReason::ForeignSource));
    }
    if let Some(mark) = gbp_mark {
        // SAFETY: `mark` is a writable field of the context for TC programs.
        unsafe { (*ctx.skb.skb).mark = mark };
    }
    // Checks are done: what follows only chooses the path.
    if cfg.flags & CONFIG_F_FLOW_CACHE != 0 {
        match flow_fast_path(ctx, &cfg, INNER_IP, flows::parse) {
            Ok((flow, pkt)) => {
                return deliver_fast(ctx, flow, &eth, VXLAN_OVERHEAD, peer.slot, || {
                    flows::decrement_ttl(ctx, ETH_LEN, pkt.ttl, pkt.proto)
                });
            }
            Err(reason) => maps::count(&maps::PATHS, reason as u32, ctx.len()),
        }
    }
    if let Some(ep) = fast_path_endpoint(ctx, &cfg)? {
        let mut delivered = eth;
        delivered[0..6].copy_from_slice(&ep.pod_mac);
        delivered[6..12].copy_from_slice(&ep.host_mac);
        strip_outer(ctx, VXLAN_OVERHEAD, &delivered)?;
        maps::count_peer(peer.slot, ctx.len(), false);
        // SAFETY: plain helper call; the ifindex comes from the agent's endpoint sync.
        return Ok(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32);
    }
    // flannel.<VNI> sees a frame addressed to itself from the peer's VTEP.
    strip_for_kernel_path(ctx, &cfg, VXLAN_OVERHEAD, &eth)?;
    maps::count_peer(peer.slot, ctx.len(), false);
    // SAFETY: plain helper call; the ifindex comes from the agent's configuration.
    Ok(unsafe { bpf_redirect(cfg.vxlan_ifindex, BPF_F_INGRESS as u64) } as i32)
}

/// VXLAN over IPv6 from a known peer: the same checks as over IPv4, the inner frame to
/// `flannel-v6.<VNI>`'s MAC carrying IPv6 from the peer's IPv6 subnet, delivered into
/// `flannel-v6.<VNI>`'s ingress, or, for a verified flow, straight into its pod (the
/// all-flows fast path is IPv4 only).
#[inline(never)]
fn decap6_program(ctx: &TcContext) -> i32 {
    match try_decap6(ctx) {
        Ok(action) => action,
        Err(outcome) => outcome.action(ctx),
    }
}

#[inline(always)]
fn try_decap6(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = maps::config_ref().ok_or(Outcome::Ignore)?;
    let peer = known_peer6(ctx, cfg)?;
    let (eth, gbp_mark) = inner_frame(ctx, cfg, VXLAN6, &cfg.vtep_mac6, ETH_P_IPV6)?;
    let inner_src: [u8; 16] = ctx
        .load(INNER6_IP + 8)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))?;
    if !in_subnet16(inner_src, peer.subnet, peer.prefix_len) {
        // Link-local neighbour discovery from the peer's device lands here too: the
        // kernel device answers it.
        return Err(Outcome::Pass(PassReason::ForeignSource));
    }
    if let Some(mark) = gbp_mark {
        // SAFETY: `mark` is a writable field of the context for TC programs.
        unsafe { (*ctx.skb.skb).mark = mark };
    }
    if cfg.flags & CONFIG_F_FLOW_CACHE != 0 {
        match flow_fast_path(ctx, cfg, INNER6_IP, flows::parse6) {
            Ok((flow, pkt)) => {
                return deliver_fast(ctx, flow, &eth, VXLAN6_OVERHEAD, peer.slot, || {
                    flows::decrement_hop_limit(ctx, ETH_LEN, pkt.ttl)
                });
            }
            Err(reason) => maps::count(&maps::PATHS, reason as u32, ctx.len()),
        }
    }
    strip_for_kernel_path(ctx, cfg, VXLAN6_OVERHEAD, &eth)?;
    maps::count_peer(peer.slot, ctx.len(), false);
    // SAFETY: plain helper call; the ifindex comes from the agent's configuration.
    Ok(unsafe { bpf_redirect(cfg.vxlan6_ifindex, BPF_F_INGRESS as u64) } as i32)
}

/// The VXLAN header at `vxlan` and the inner Ethernet header behind it, as the kernel
/// device accepts them: flags (with GBP, the mark they carry), our VNI, the device's MAC
/// `vtep_mac` and the device's family `ethertype` (anything else, ARP included, is the
/// kernel device's to answer).
#[inline(always)]
fn inner_frame(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    vxlan: usize,
    vtep_mac: &[u8; 6],
    ethertype: u16,
) -> Result<([u8; ETH_LEN], Option<u32>), Outcome> {
    let vx: [u8; VXLAN_LEN] = ctx
        .load(vxlan)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))?;
    let header = parse_vxlan_header(&vx, cfg.flags & CONFIG_F_GBP != 0)
        .ok_or(Outcome::Drop(DropReason::BadFlags))?;
    if header.vni != cfg.vni {
        return Err(Outcome::Drop(DropReason::BadVni));
    }
    let eth: [u8; ETH_LEN] = ctx
        .load(vxlan + VXLAN_LEN)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))?;
    if eth[0..6] != *vtep_mac {
        return Err(Outcome::Pass(PassReason::NotForUs));
    }
    if u16::from_be_bytes([eth[12], eth[13]]) != ethertype {
        return Err(Outcome::Pass(PassReason::NotIpv4));
    }
    Ok((eth, header.gbp_mark))
}

/// The known-peer check over IPv6 (see [`known_peer`]). Outer extension headers
/// (fragments included) hide the UDP header: a known peer's go to the kernel, a
/// stranger's are not ours to judge here and meet the nftables guard, which drops VXLAN
/// from strangers after reassembly.
#[inline(always)]
fn known_peer6(ctx: &TcContext, cfg: &DatapathConfig) -> Result<Peer, Outcome> {
    if cfg.vxlan6_ifindex == 0 {
        return Err(Outcome::Ignore);
    }
    let ip: [u8; IPV6_LEN] = ctx.load(OUTER_IP).map_err(|_| Outcome::Ignore)?;
    if ip[0] >> 4 != 6 || ip[24..40] != cfg.local_ip6 {
        return Err(Outcome::Ignore);
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    if is_v4_mapped(&src) {
        // The kernel drops IPv6 from IPv4-mapped sources; never an IPv4 peer's entry.
        return Err(Outcome::Ignore);
    }
    // SAFETY: the map value is only read, during this run (RCU keeps it alive).
    let peer = unsafe { maps::PEERS.get(PeerKey { addr: src }) };
    if ip[6] != IPPROTO_UDP {
        return Err(match peer {
            Some(_) => Outcome::Pass(PassReason::Ipv6Unsupported),
            None => Outcome::Ignore,
        });
    }
    let udp: [u8; UDP_LEN] = ctx.load(OUTER6_UDP).map_err(|_| Outcome::Ignore)?;
    if u16::from_be_bytes([udp[2], udp[3]]) != cfg.port {
        return Err(Outcome::Ignore);
    }
    let Some(peer) = peer else {
        if cfg.flags & CONFIG_F_ANY_PEER != 0 {
            return Err(Outcome::Pass(PassReason::UnknownPeer));
        }
        debug!(ctx, "dropped VXLAN over IPv6 from an unknown peer");
        maps::count_stranger(src, ctx.len());
        return Err(Outcome::Drop(DropReason::UnknownPeer));
    };
    // What `ip6_rcv` and `udpv6_rcv` would drop or trim: a payload length other than what
    // the packet holds, a UDP length other than the payload, and a zero checksum, which
    // upstream's device refuses (`UDP_ZERO_CSUM6_RX` off). The checksum itself is not
    // summed here (that would read the whole packet): the inner packet carries its own.
    let payload = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
    let udp_len = u32::from(u16::from_be_bytes([udp[4], udp[5]]));
    if payload + (ETH_LEN + IPV6_LEN) as u32 != ctx.len()
        || udp_len != payload
        || (udp[6] == 0 && udp[7] == 0)
    {
        return Err(Outcome::Pass(PassReason::BadOuter));
    }
    Ok(*peer)
}

/// The known-peer check, before anything else happens to a packet for our VXLAN port:
/// `Ok(peer)` for a plain VXLAN packet from a known peer, ready to decapsulate; otherwise
/// the outcome — not ours (`Ignore`), a stranger's VXLAN (dropped, or handed to the kernel
/// with the check off), or a known peer's fragment or packet with options (to the kernel).
#[inline(always)]
fn known_peer(ctx: &TcContext, cfg: &DatapathConfig) -> Result<Peer, Outcome> {
    if cfg.vxlan_ifindex == 0 {
        // An IPv6-only host: no `flannel.<VNI>`, so no IPv4 VXLAN is ours (and its local
        // address in CONFIG is 0.0.0.0).
        return Err(Outcome::Ignore);
    }
    let ip: [u8; IPV4_LEN] = ctx.load(OUTER_IP).map_err(|_| Outcome::Ignore)?;
    if ip[9] != IPPROTO_UDP || ip[16..20] != cfg.local_ip {
        return Err(Outcome::Ignore);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_LEN {
        // Not a valid IPv4 header: the kernel drops it.
        return Err(Outcome::Ignore);
    }
    let src = [ip[12], ip[13], ip[14], ip[15]];
    // A reference (one nullable register), copied out only once the packet is ours: an
    // `Option<Peer>` held across the branches below leaves LLVM free to read an
    // uninitialised register on the `None` path, which the verifier rejects.
    // SAFETY: the map value is only read, during this run (RCU keeps it alive).
    let peer = unsafe {
        maps::PEERS.get(PeerKey {
            addr: v4_mapped(src),
        })
    };
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x1fff != 0 {
        // A non-first fragment: no UDP header to say whether it is VXLAN.
        return Err(match peer {
            Some(_) => Outcome::Pass(PassReason::Fragment),
            None => Outcome::Ignore,
        });
    }
    // The UDP header follows the options, if any; a first fragment always holds all of it.
    let dport: u16 = ctx.load(OUTER_IP + ihl + 2).map_err(|_| Outcome::Ignore)?;
    if u16::from_be(dport) != cfg.port {
        return Err(Outcome::Ignore);
    }
    let Some(peer) = peer else {
        if cfg.flags & CONFIG_F_ANY_PEER != 0 {
            return Err(Outcome::Pass(PassReason::UnknownPeer));
        }
        debug!(
            ctx,
            "dropped VXLAN from unknown peer {:i}",
            u32::from_be_bytes(src)
        );
        maps::count_stranger(v4_mapped(src), ctx.len());
        return Err(Outcome::Drop(DropReason::UnknownPeer));
    };
    if ihl != IPV4_LEN || frag & 0x3fff != 0 {
        // Options, or the first fragment (MF): the kernel parses or reassembles them.
        return Err(Outcome::Pass(PassReason::Fragment));
    }
    // What `ip_rcv` and `udp_rcv` would drop or trim — a bad header checksum (summed with
    // its checksum field, a valid header folds to zero), an IPv4 or UDP length other than
    // what the packet holds — is theirs to handle: decapsulating it as it stands would
    // deliver what the kernel path never would. GRO keeps both lengths and the checksum
    // right for the aggregates it builds.
    let total = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    let udp_len: u16 = ctx
        .load(OUTER_UDP + 4)
        .map_err(|_| Outcome::Pass(PassReason::BadOuter))?;
    if ipv4_header_checksum(&ip) != 0
        || total != ctx.len().saturating_sub(ETH_LEN as u32)
        || u32::from(u16::from_be(udp_len)) + IPV4_LEN as u32 != total
    {
        return Err(Outcome::Pass(PassReason::BadOuter));
    }
    Ok(*peer)
}

/// The per-flow fast path's decision for the inner packet at `inner_ip` (`parse` reads
/// its family): its verified flow, or why the kernel path carries it.
#[inline(always)]
fn flow_fast_path(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    inner_ip: usize,
    parse: impl Fn(&TcContext, usize) -> Option<flows::Packet>,
) -> Result<(*mut flannel_common::Flow, flows::Packet), PathReason> {
    let pkt = parse(ctx, inner_ip).ok_or(PathReason::Unsupported)?;
    let flow = flows::observe(&pkt, Dir::Rx, cfg, flows::now())?;
    if pkt.ttl <= 1 {
        return Err(PathReason::TtlExpired);
    }
    Ok((flow, pkt))
}

/// Put a verified flow's packet straight into its pod: strip the `overhead` outer bytes,
/// frame it as the kernel path delivered the flow, lower its TTL (`lower_ttl`), count it
/// and redirect it into the pod's namespace.
#[inline(always)]
fn deliver_fast(
    ctx: &TcContext,
    flow: *mut flannel_common::Flow,
    eth: &[u8; ETH_LEN],
    overhead: usize,
    peer_slot: u32,
    lower_ttl: impl FnOnce() -> Result<(), i64>,
) -> Result<i32, Outcome> {
    // SAFETY: the entry `observe` returned is valid for this run.
    let flow = unsafe { &mut *flow };
    let mut delivered = *eth;
    delivered[0..12].copy_from_slice(&flow.rx_eth);
    strip_outer(ctx, overhead, &delivered)?;
    lower_ttl().map_err(|_| Outcome::Drop(DropReason::Malformed))?;
    maps::count_peer(peer_slot, ctx.len(), false);
    maps::count(&maps::PATHS, PathReason::FastRx as u32, ctx.len());
    flow.fast_rx_packets += 1;
    // SAFETY: plain helper call; the ifindex is the veth the kernel path delivered this
    // flow to.
    Ok(unsafe { bpf_redirect_peer(flow.rx_ifindex, 0) } as i32)
}

/// With the opt-in all-flows fast path on, the local pod the inner packet is for, if the
/// agent listed it.
#[inline(always)]
fn fast_path_endpoint(ctx: &TcContext, cfg: &DatapathConfig) -> Result<Option<Endpoint>, Outcome> {
    if cfg.flags & CONFIG_F_FAST_INGRESS == 0 {
        return Ok(None);
    }
    let inner_dst: [u8; 4] = ctx
        .load(INNER_IP + 16)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))?;
    // SAFETY: the map value is only read, and copied out at once.
    Ok(unsafe { maps::ENDPOINTS.get(EndpointKey { addr: inner_dst }) }.copied())
}

/// Remove the `overhead` bytes of outer IP, UDP, VXLAN and the inner Ethernet header,
/// then write `eth` where the (moved) outer Ethernet header now sits, in front of the
/// inner IP header.
#[inline(always)]
fn strip_outer(ctx: &TcContext, overhead: usize, eth: &[u8; ETH_LEN]) -> Result<(), Outcome> {
    strip_outer_with(ctx, overhead, eth, 0)
}

/// [`strip_outer`] with more `BPF_F_ADJ_ROOM_*` flags.
#[inline(always)]
fn strip_outer_with(
    ctx: &TcContext,
    overhead: usize,
    eth: &[u8; ETH_LEN],
    flags: u64,
) -> Result<(), Outcome> {
    ctx.adjust_room(
        -(overhead as i32),
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64 | flags,
    )
    .map_err(|_| Outcome::Pass(PassReason::HelperFailed))?;
    ctx.store(0, eth, 0)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))
}

/// Strip the outer headers of a packet the kernel device is to receive. A GSO aggregate
/// is stripped only where the kernel offers `BPF_F_ADJ_ROOM_DECAP_L4_UDP`
/// ([`CONFIG_F_DECAP_L4_UDP`]), which clears the tunnel GSO state; elsewhere it goes to
/// the device undecapsulated (see the flag's documentation).
#[inline(always)]
fn strip_for_kernel_path(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    overhead: usize,
    eth: &[u8; ETH_LEN],
) -> Result<(), Outcome> {
    // SAFETY: reading a field of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).gso_size } == 0 {
        return strip_outer(ctx, overhead, eth);
    }
    if cfg.flags & CONFIG_F_DECAP_L4_UDP == 0 {
        return Err(Outcome::Pass(PassReason::GsoIngress));
    }
    strip_outer_with(ctx, overhead, eth, BPF_F_ADJ_ROOM_DECAP_L4_UDP)
}

/// The body of the `probe_decap_l4` program: 0 when `bpf_skb_adjust_room` takes
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` on a VXLAN frame, else its negative errno.
#[inline(always)]
pub fn probe_decap_l4_udp(ctx: &TcContext) -> i32 {
    match ctx.adjust_room(
        -(VXLAN_OVERHEAD as i32),
        BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L4_UDP,
    ) {
        Ok(()) => 0,
        Err(errno) => errno as i32,
    }
}

//! Egress: encapsulate what the kernel routed into `flannel.<VNI>`.
//!
//! By the time a packet reaches TC egress of the VXLAN device, the kernel has routed it
//! (route `10.244.x.0/24 via 10.244.x.0 dev flannel.1 onlink`), run netfilter, applied the
//! device MTU (so oversized DF packets already got frag-needed), and resolved the inner
//! Ethernet header from the permanent neighbour entry. Only the tunnel half is left: the
//! outer headers and the trip out of the uplink, which this program does instead of
//! `vxlan_xmit` → `iptunnel_xmit` → `ip_local_out`.
//!
//! GSO: `bpf_skb_adjust_room` with the ENCAP flags marks the skb as a UDP tunnel with an
//! inner Ethernet header, exactly as the kernel driver does, so TSO super-packets are
//! segmented (or offloaded) correctly. `FIXED_GSO` keeps the MSS: pods already use MTU − 50.
//! The outer UDP checksum is zero because GSO copies it verbatim into every segment.
//!
//! GBP (`CONFIG_F_GBP`): the header carries the policy id from `skb->mark`, as the kernel
//! device configured with `gbp` writes it.
//!
//! IPv6 (the program also sits on `flannel-v6.<VNI>`): IPv6 inner over an IPv6 underlay,
//! as upstream's device: outer IPv6 (flow label 0, hop limit 64), UDP, VXLAN, inner
//! Ethernet from `flannel-v6.<VNI>`'s MAC to the peer's v6 VTEP MAC. IPv6 needs an outer UDP
//! checksum (upstream's device refuses zero ones), which this program computes from the
//! headers alone (`wire::udp6_tunnel_checksum`); a GSO aggregate would need one per
//! segment, which only the kernel can fill, so aggregates stay on the kernel device.
//!
//! Per-flow fast path (`CONFIG_F_FLOW_CACHE`): a packet that arrives here from routing
//! confirms its flow's send side (see `flows`). Fast IPv6 packets arrive here too, straight
//! from the pod's veth (`pod::from_pod6`), and are encapsulated like any other.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{
        bpf_csum_diff, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect_neigh,
        bpf_skb_load_bytes,
    },
    programs::TcContext,
};
use flannel_common::{
    DatapathConfig, DropReason, PassReason, Route,
    maps::{CONFIG_F_FLOW_CACHE, CONFIG_F_GBP, ROUTE_F_DIRECT},
    wire::{
        ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN,
        IPV6_LEN, UDP_LEN, VXLAN_OVERHEAD, VXLAN6_OVERHEAD, ipv6_tclass, is_v4_mapped,
        outer_ipv4_header, outer_tos, udp6_checksum_from_sums, v4_mapped, vxlan_gbp_header,
        vxlan_header, vxlan_source_port, vxlan6_headers,
    },
};

use crate::{
    Outcome,
    flows::{self, Dir},
    maps,
};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner MAC header length, in the top byte.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | encap_l2(ETH_LEN as u64);

const ENCAP6_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | encap_l2(ETH_LEN as u64);

/// Offset of the outer UDP header after IPv6 encapsulation.
const OUTER6_UDP: usize = ETH_LEN + IPV6_LEN;

/// Offsets after encapsulation.
const OUTER_IP: usize = ETH_LEN;
const OUTER_UDP: usize = OUTER_IP + IPV4_LEN;
const VXLAN: usize = OUTER_UDP + UDP_LEN;
const INNER_ETH: usize = VXLAN + 8;
const HEADERS: usize = INNER_ETH + ETH_LEN;

/// The program: each family's half is a BPF function of its own, so the verifier's
/// 512-byte limit applies to each half (plus this small frame), not to their sum.
#[inline(always)]
pub fn program(ctx: &TcContext) -> i32 {
    match ctx.load::<u16>(12).map(u16::from_be) {
        Ok(ETH_P_IPV6) => encap6_program(ctx),
        _ => encap4_program(ctx),
    }
}

#[inline(never)]
fn encap4_program(ctx: &TcContext) -> i32 {
    match try_encap(ctx) {
        Ok(action) => action,
        Err(outcome) => outcome.action(ctx),
    }
}

#[inline(always)]
fn try_encap(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = maps::config().ok_or(Outcome::Pass(PassReason::Disabled))?;
    if cfg.vxlan_ifindex == 0 {
        // An IPv6-only host (the program rides on `flannel-v6.<VNI>` alone): no IPv4 VTEP.
        return Err(Outcome::Pass(PassReason::NotIpv4));
    }

    let ethertype: u16 = ctx
        .load(12)
        .map_err(|_| Outcome::Pass(PassReason::NotIpv4))?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return Err(Outcome::Pass(PassReason::NotIpv4));
    }
    let tos: u8 = ctx
        .load(ETH_LEN + 1)
        .map_err(|_| Outcome::Pass(PassReason::NotIpv4))?;
    let dst: [u8; 4] = ctx
        .load(ETH_LEN + 16)
        .map_err(|_| Outcome::Pass(PassReason::NotIpv4))?;

    let route = maps::route(v4_mapped(dst)).ok_or(Outcome::Pass(PassReason::NoRoute))?;
    if !is_v4_mapped(&route.peer_ip) {
        // An IPv6 underlay for an IPv4 subnet: not what upstream's devices carry.
        return Err(Outcome::Pass(PassReason::NoRoute));
    }
    if route.flags & ROUTE_F_DIRECT != 0 {
        // DirectRouting peers are reached by a plain route via the uplink; a packet for one
        // that still ends up here is the kernel device's to handle.
        return Err(Outcome::Pass(PassReason::NoRoute));
    }
    if cfg.flags & CONFIG_F_FLOW_CACHE != 0 {
        // The kernel path routed and filtered this packet: confirm its flow's send side.
        // SAFETY: reading a field of the context the kernel handed us.
        let unmarked = unsafe { (*ctx.skb.skb).mark } == 0;
        if let (true, Some(pkt)) = (unmarked, flows::parse(ctx, ETH_LEN)) {
            // Fast IPv4 packets never come here: no need to tell them apart.
            flows::confirm(&pkt, Dir::Tx, flows::now(), None, None);
        }
    }
    encapsulate(ctx, &cfg, &route, tos)
}

/// Put the outer Ethernet/IPv4/UDP/VXLAN headers and the inner Ethernet header (our VTEP
/// MAC to the peer's) in front of the IPv4 packet behind the Ethernet header at offset 0,
/// and send the result out of the uplink.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    route: &Route,
    tos: u8,
) -> Result<i32, Outcome> {
    let inner_len = ctx.len();
    // SAFETY: the helper only reads and caches the flow hash of the skb we were given.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = vxlan_source_port(hash, cfg.sport_min, cfg.sport_max);

    ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| Outcome::Pass(PassReason::HelperFailed))?;
    // From here on the packet has a 50-byte hole: failing now means dropping it.

    let len = ctx.len() as usize;
    let mut h = [0u8; HEADERS];
    // Outer Ethernet: addresses are filled by the neighbour layer on redirect.
    h[12] = (ETH_P_IP >> 8) as u8;
    h[13] = ETH_P_IP as u8;
    // SAFETY of the id: any value is valid (RFC 6864); GSO increments it per segment.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    let peer = [
        route.peer_ip[12],
        route.peer_ip[13],
        route.peer_ip[14],
        route.peer_ip[15],
    ];
    let ip = outer_ipv4_header(
        (len - ETH_LEN) as u16,
        id,
        outer_tos(tos),
        cfg.ttl,
        cfg.local_ip,
        peer,
    );
    h[OUTER_IP..OUTER_UDP].copy_from_slice(&ip);
    let udp_len = (len - OUTER_UDP) as u16;
    h[OUTER_UDP..OUTER_UDP + 2].copy_from_slice(&sport.to_be_bytes());
    h[OUTER_UDP + 2..OUTER_UDP + 4].copy_from_slice(&cfg.port.to_be_bytes());
    h[OUTER_UDP + 4..OUTER_UDP + 6].copy_from_slice(&udp_len.to_be_bytes());
    // Outer UDP checksum stays 0 (bytes 6..8).
    let vxlan = if cfg.flags & CONFIG_F_GBP != 0 {
        // As the kernel device with `gbp`: the policy comes from the packet's mark.
        // SAFETY: reading a field of the context the kernel handed us.
        vxlan_gbp_header(cfg.vni, unsafe { (*ctx.skb.skb).mark })
    } else {
        vxlan_header(cfg.vni)
    };
    h[VXLAN..INNER_ETH].copy_from_slice(&vxlan);
    h[INNER_ETH..INNER_ETH + 6].copy_from_slice(&route.vtep_mac);
    h[INNER_ETH + 6..INNER_ETH + 12].copy_from_slice(&cfg.vtep_mac);
    h[INNER_ETH + 12] = (ETH_P_IP >> 8) as u8;
    h[INNER_ETH + 13] = ETH_P_IP as u8;
    ctx.store(0, &h, 0)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))?;

    maps::count_peer(route.peer_slot, inner_len, true);
    // The kernel routes the outer packet (gateway or on-link) and resolves the next-hop MAC,
    // queueing while ARP is pending.
    // SAFETY: a null `params` asks the helper to route on the packet's own IPv4 header.
    let rc = unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    Ok(rc as i32)
}

/// The IPv6 half: what the kernel routed into `flannel-v6.<VNI>`.
#[inline(never)]
fn encap6_program(ctx: &TcContext) -> i32 {
    match try_encap6(ctx) {
        Ok(action) => action,
        Err(outcome) => outcome.action(ctx),
    }
}

#[inline(always)]
fn try_encap6(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = maps::config_ref().ok_or(Outcome::Pass(PassReason::Disabled))?;
    if cfg.vxlan6_ifindex == 0 {
        return Err(Outcome::Pass(PassReason::NotIpv4));
    }
    // What the outer headers need of the inner IPv6 header, read once: its checksum
    // contribution, traffic class, upper layer and length.
    let scratch = maps::SCRATCH6
        .get_ptr_mut(0)
        .ok_or(Outcome::Pass(PassReason::HelperFailed))?;
    // SAFETY: this CPU's scratch value, valid for the program's run; nothing else uses
    // it meanwhile (a program run is not preempted on its CPU).
    let scratch = unsafe { &mut *scratch };
    let (tclass, next, payload) = {
        let inner = &mut scratch.inner;
        // The helper with a constant length (`load_bytes` clamps it to the packet, which
        // the verifier cannot tell from zero).
        // SAFETY: `inner` is IPV6_LEN bytes of this CPU's scratch value.
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                ETH_LEN as u32,
                inner.as_mut_ptr() as *mut _,
                IPV6_LEN as u32,
            )
        };
        if rc != 0 {
            return Err(Outcome::Pass(PassReason::NotIpv4));
        }
        if inner[0] >> 4 != 6 {
            return Err(Outcome::Pass(PassReason::NotIpv4));
        }
        (
            ipv6_tclass(inner),
            inner[6],
            u32::from(u16::from_be_bytes([inner[4], inner[5]])),
        )
    };
    let dst: [u8; 16] = ctx
        .load(ETH_LEN + 24)
        .map_err(|_| Outcome::Pass(PassReason::NotIpv4))?;
    if is_v4_mapped(&dst) {
        return Err(Outcome::Pass(PassReason::NoRoute));
    }
    let route = maps::route(dst).ok_or(Outcome::Pass(PassReason::NoRoute))?;
    if route.flags & ROUTE_F_DIRECT != 0 || is_v4_mapped(&route.peer_ip) {
        return Err(Outcome::Pass(PassReason::NoRoute));
    }
    if cfg.flags & CONFIG_F_FLOW_CACHE != 0 {
        confirm6(ctx);
    }
    // SAFETY: reading a field of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return Err(Outcome::Pass(PassReason::Ipv6Gso));
    }
    // The outer checksum is derived from the upper layer's own checksum, which must
    // cover everything behind the fixed header.
    let csum_at = match next {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMPV6 => 2,
        _ => return Err(Outcome::Pass(PassReason::Ipv6Unsupported)),
    };
    let l4_check: u16 = ctx
        .load(ETH_LEN + IPV6_LEN + csum_at)
        .map_err(|_| Outcome::Pass(PassReason::Ipv6Unsupported))?;
    if next == IPPROTO_UDP && l4_check == 0 {
        // A UDP datagram without a checksum (a zero-checksum socket) sums to nothing
        // known: the kernel device checksums the payload itself.
        return Err(Outcome::Pass(PassReason::Ipv6Unsupported));
    }
    if payload + (ETH_LEN + IPV6_LEN) as u32 != ctx.len() {
        return Err(Outcome::Pass(PassReason::Ipv6Unsupported));
    }

    let inner_len = ctx.len();
    // SAFETY: the helper only reads and caches the flow hash of the skb we were given.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = vxlan_source_port(hash, cfg.sport_min, cfg.sport_max);
    let vxlan = if cfg.flags & CONFIG_F_GBP != 0 {
        // SAFETY: reading a field of the context the kernel handed us.
        vxlan_gbp_header(cfg.vni, unsafe { (*ctx.skb.skb).mark })
    } else {
        vxlan_header(cfg.vni)
    };

    ctx.adjust_room(VXLAN6_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP6_FLAGS)
        .map_err(|_| Outcome::Pass(PassReason::HelperFailed))?;
    // From here on the packet has a 70-byte hole: failing now means dropping it.

    let udp_len = (ctx.len() as usize - OUTER6_UDP) as u16;
    let h = &mut scratch.headers;
    vxlan6_headers(
        h,
        outer_tos(tclass),
        cfg.ttl,
        &cfg.local_ip6,
        &route.peer_ip,
        (sport, cfg.port),
        udp_len,
        &vxlan,
        (&route.vtep_mac, &cfg.vtep_mac6),
    );
    // The kernel sums the headers (`bpf_csum_diff`): summing 104 bytes here would unroll
    // into more registers than the BPF stack can spill.
    let region = csum_sum(&scratch.headers[20] as *const u8, 104)?;
    let inner_addrs = csum_sum(&scratch.inner[8] as *const u8, 32)?;
    let h = &mut scratch.headers;
    let check = udp6_checksum_from_sums(
        region,
        u16::from_be_bytes([h[20], h[21]]),
        udp_len,
        inner_addrs,
        payload as u16,
        next,
    );
    h[OUTER6_UDP + 6] = (check >> 8) as u8;
    h[OUTER6_UDP + 7] = check as u8;
    ctx.store(0, h, 0)
        .map_err(|_| Outcome::Drop(DropReason::Malformed))?;

    maps::count_peer(route.peer_slot, inner_len, true);
    // SAFETY: a null `params` asks the helper to route on the packet's own IPv6 header
    // (`skb->protocol` is IPv6 already: the inner packet's).
    let rc = unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    Ok(rc as i32)
}

/// The kernel path routed and filtered this IPv6 packet: confirm its flow's send side (a
/// frame of its own: the encapsulation after it needs the stack).
#[inline(never)]
fn confirm6(ctx: &TcContext) {
    // SAFETY: reading fields of the context the kernel handed us.
    let (mark, received_on) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ingress_ifindex) };
    if let (0, Some(pkt)) = (mark, flows::parse6(ctx, ETH_LEN)) {
        flows::confirm(&pkt, Dir::Tx, flows::now(), None, Some(received_on));
    }
}

/// The folded one's-complement sum of the `len` bytes (a multiple of 4) at `at` (map
/// memory), as big-endian words.
#[inline(always)]
fn csum_sum(at: *const u8, len: u32) -> Result<u16, Outcome> {
    // SAFETY: `at` points into this CPU's scratch value with `len` bytes behind it; the
    // helper only reads them.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, at as *mut u32, len, 0) };
    if sum < 0 {
        return Err(Outcome::Drop(DropReason::Malformed));
    }
    // The helper adds 16-bit words as they sit in memory, i.e. little-endian on this
    // target: fold, then swap to big-endian (one's-complement sums commute with it).
    let mut s = sum as u64;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    Ok((s as u16).swap_bytes())
}

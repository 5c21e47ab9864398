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

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect_neigh},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use flannel_common::{
    DatapathConfig, DropReason, PassReason, Route,
    maps::{CONFIG_F_FLOW_CACHE, CONFIG_F_GBP, ROUTE_F_DIRECT},
    wire::{
        ETH_LEN, ETH_P_IP, IPV4_LEN, UDP_LEN, VXLAN_OVERHEAD, outer_ipv4_header, outer_tos,
        vxlan_gbp_header, vxlan_header, vxlan_source_port,
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

/// Offsets after encapsulation.
const OUTER_IP: usize = ETH_LEN;
const OUTER_UDP: usize = OUTER_IP + IPV4_LEN;
const VXLAN: usize = OUTER_UDP + UDP_LEN;
const INNER_ETH: usize = VXLAN + 8;
const HEADERS: usize = INNER_ETH + ETH_LEN;

#[inline(always)]
pub fn try_encap(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = maps::config().ok_or(Outcome::Pass(PassReason::Disabled))?;

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

    let route = *maps::ROUTES
        .get(&Key::new(32, dst))
        .ok_or(Outcome::Pass(PassReason::NoRoute))?;
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
            flows::confirm(&pkt, Dir::Tx, flows::now(), None);
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
    let ip = outer_ipv4_header(
        (len - ETH_LEN) as u16,
        id,
        outer_tos(tos),
        cfg.ttl,
        cfg.local_ip,
        route.peer_ip,
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

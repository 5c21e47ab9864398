//! The two programs on each pod's host-side veth (the `cni0` port).
//!
//! * [`from_pod`] (TC ingress: what the pod sends) sees a packet before the bridge,
//!   routing and netfilter. For a flow to a remote pod it records the tuple (see
//!   [`crate::flows`]); once the flow is verified it does here what the kernel path would:
//!   decrement the TTL, encapsulate with the route's peer and VTEP MAC (source
//!   `flannel.<VNI>`'s MAC), and send it out of the uplink — skipping the bridge, routing,
//!   FORWARD/POSTROUTING and `flannel.<VNI>`.
//! * [`to_pod`] (TC egress: what the kernel path delivers to the pod) confirms the
//!   receive side of a flow and learns how the kernel delivers to this pod (veth, MACs),
//!   which the uplink program then uses to put fast packets straight into the pod.
//!
//! IPv6 the same, except that a fast packet is handed to `flannel-v6.<VNI>`'s transmit
//! instead of encapsulated here (see [`from_pod6`]).
//!
//! Oversized non-GSO packets, GSO packets whose segments would not fit, expiring TTLs and
//! anything not understood stay on the kernel path, which answers them as it always does
//! (frag-needed, time-exceeded).

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect, programs::TcContext};
use flannel_common::{
    DatapathConfig, PathReason, Route,
    maps::{CONFIG_F_FLOW_CACHE, ROUTE_F_DIRECT},
    wire::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, is_v4_mapped, v4_mapped},
};

use crate::{
    Outcome, encap,
    flows::{self, Dir, Packet},
    maps,
};

/// The family of a pod's frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// The frame's family, if the per-flow fast path is on and covers it.
#[inline(always)]
fn flow_cache(ctx: &TcContext) -> Option<Family> {
    let cfg = maps::config_ref()?;
    if cfg.flags & CONFIG_F_FLOW_CACHE == 0 {
        return None;
    }
    let ethertype: u16 = ctx.load(12).ok()?;
    match u16::from_be(ethertype) {
        ETH_P_IP => Some(Family::V4),
        // Without `flannel-v6.<VNI>` the node carries no IPv6 between pods.
        ETH_P_IPV6 if cfg.vxlan6_ifindex != 0 => Some(Family::V6),
        _ => None,
    }
}

/// TC ingress: each family's half is a BPF function of its own, so the verifier's
/// 512-byte stack limit applies to each, not to their sum.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    match flow_cache(ctx) {
        None => TC_ACT_OK,
        Some(Family::V4) => from_pod4(ctx),
        Some(Family::V6) => from_pod6(ctx),
    }
}

#[inline(never)]
fn from_pod4(ctx: &TcContext) -> i32 {
    match try_from_pod4(ctx) {
        Ok(action) => action,
        Err(outcome) => outcome.action(ctx),
    }
}

#[inline(never)]
fn from_pod6(ctx: &TcContext) -> i32 {
    match try_from_pod6(ctx) {
        Ok(action) => action,
        Err(outcome) => outcome.action(ctx),
    }
}

#[inline(always)]
fn try_from_pod4(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = maps::config_ref().ok_or(Outcome::Ignore)?;
    let dst: [u8; 4] = ctx.load(ETH_LEN + 16).map_err(|_| Outcome::Ignore)?;
    let route = match maps::route(v4_mapped(dst)) {
        Some(r) if r.flags & ROUTE_F_DIRECT == 0 && is_v4_mapped(&r.peer_ip) => r,
        _ => return Err(Outcome::Path(PathReason::Unrouted)),
    };
    let pkt = flows::parse(ctx, ETH_LEN).ok_or(Outcome::Path(PathReason::Unsupported))?;
    let flow = fast_flow(ctx, cfg, &pkt, cfg.mtu)?;
    flows::decrement_ttl(ctx, ETH_LEN, pkt.ttl, pkt.proto)
        .map_err(|_| Outcome::Path(PathReason::Unsupported))?;
    sent_fast(ctx, flow);
    encap::encapsulate(ctx, cfg, &route, pkt.tos)
}

/// IPv6: BPF cannot give a GSO aggregate's segments their outer UDP checksums, which IPv6
/// needs, so a fast packet skips the bridge, routing and netfilter and goes straight to
/// `flannel-v6.<VNI>`'s transmit, framed as the neighbour layer would (our v6 VTEP MAC to
/// the peer's). There `vxlan_encap` encapsulates what it can and the driver the rest
/// (GSO aggregates, with `SKB_GSO_UDP_TUNNEL_CSUM`).
#[inline(always)]
fn try_from_pod6(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = maps::config_ref().ok_or(Outcome::Ignore)?;
    let dst: [u8; 16] = ctx.load(ETH_LEN + 24).map_err(|_| Outcome::Ignore)?;
    let route = match route6(dst) {
        Some(r) => r,
        None => return Err(Outcome::Path(PathReason::Unrouted)),
    };
    let pkt = flows::parse6(ctx, ETH_LEN).ok_or(Outcome::Path(PathReason::Unsupported))?;
    let flow = fast_flow(ctx, cfg, &pkt, cfg.mtu6)?;
    flows::decrement_hop_limit(ctx, ETH_LEN, pkt.ttl)
        .map_err(|_| Outcome::Path(PathReason::Unsupported))?;
    let mut eth = [0u8; 12];
    eth[0..6].copy_from_slice(&route.vtep_mac);
    eth[6..12].copy_from_slice(&cfg.vtep_mac6);
    ctx.store(0, &eth, 0)
        .map_err(|_| Outcome::Path(PathReason::Unsupported))?;
    sent_fast(ctx, flow);
    // SAFETY: plain helper call; the ifindex comes from the agent's configuration.
    Ok(unsafe { bpf_redirect(cfg.vxlan6_ifindex, 0) } as i32)
}

/// A remote pod's IPv6 route over an IPv6 underlay (what `flannel-v6.<VNI>` carries).
#[inline(always)]
fn route6(dst: [u8; 16]) -> Option<Route> {
    if is_v4_mapped(&dst) {
        return None;
    }
    maps::route(dst).filter(|r| r.flags & ROUTE_F_DIRECT == 0 && !is_v4_mapped(&r.peer_ip))
}

/// Whether `pkt`, sent by the pod, may take the fast path: its flow verified, unmarked,
/// its TTL not expiring, and each (GSO segment) packet within the overlay's `mtu`.
#[inline(always)]
fn fast_flow(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    pkt: &Packet,
    mtu: u16,
) -> Result<*mut flannel_common::Flow, Outcome> {
    // SAFETY (both reads): fields of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).mark } != 0 {
        return Err(Outcome::Path(PathReason::Marked));
    }
    let flow = flows::observe(pkt, Dir::Tx, cfg, flows::now()).map_err(Outcome::Path)?;
    if pkt.ttl <= 1 {
        return Err(Outcome::Path(PathReason::TtlExpired));
    }
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let fits = if gso_size == 0 {
        ctx.len() as usize - ETH_LEN <= usize::from(mtu)
    } else {
        gso_size as usize + usize::from(pkt.headers) <= usize::from(mtu)
    };
    if !fits {
        return Err(Outcome::Path(PathReason::TooBig));
    }
    Ok(flow)
}

#[inline(always)]
fn sent_fast(ctx: &TcContext, flow: *mut flannel_common::Flow) {
    maps::count(&maps::PATHS, PathReason::FastTx as u32, ctx.len());
    // SAFETY: the entry `observe` returned is valid for this run; see `flows::observe`.
    unsafe { (*flow).fast_tx_packets += 1 };
}

/// TC egress: confirm the receive side of the flow (never drops, never redirects).
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    confirm_to_pod(ctx);
    TC_ACT_OK
}

#[inline(always)]
fn confirm_to_pod(ctx: &TcContext) -> Option<()> {
    let family = flow_cache(ctx)?;
    // SAFETY: fields of the context the kernel handed us.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    if mark != 0 {
        return None;
    }
    let pkt = match family {
        Family::V4 => flows::parse(ctx, ETH_LEN),
        Family::V6 => flows::parse6(ctx, ETH_LEN),
    }?;
    let eth: [u8; 12] = ctx.load(0).ok()?;
    flows::confirm(&pkt, Dir::Rx, flows::now(), Some((ifindex, eth)), None);
    Some(())
}

//! The two programs on each pod's host-side veth (the `cni0` port).
//!
//! * [`try_from_pod`] (TC ingress: what the pod sends) sees a packet before the bridge,
//!   routing and netfilter. For a flow to a remote pod it records the tuple (see
//!   [`crate::flows`]); once the flow is verified it does here what the kernel path would:
//!   decrement the TTL, encapsulate with the route's peer and VTEP MAC (source
//!   `flannel.<VNI>`'s MAC), and send it out of the uplink — skipping the bridge, routing,
//!   FORWARD/POSTROUTING and `flannel.<VNI>`.
//! * [`try_to_pod`] (TC egress: what the kernel path delivers to the pod) confirms the
//!   receive side of a flow and learns how the kernel delivers to this pod (veth, MACs),
//!   which the uplink program then uses to put fast packets straight into the pod.
//!
//! IPv4 only: a pod's IPv6 flows take the kernel path (and `vxlan_encap`/`vxlan_decap`
//! on `flannel-v6.<VNI>` and the uplink).
//!
//! Oversized non-GSO packets, GSO packets whose segments would not fit, expiring TTLs and
//! anything not understood stay on the kernel path, which answers them as it always does
//! (frag-needed, time-exceeded).

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use flannel_common::{
    PathReason,
    maps::{CONFIG_F_FLOW_CACHE, ROUTE_F_DIRECT},
    wire::{ETH_LEN, ETH_P_IP, is_v4_mapped, v4_mapped},
};

use crate::{
    Outcome, encap,
    flows::{self, Dir},
    maps,
};

/// Whether the frame at offset 0 is IPv4 and the per-flow fast path is on.
#[inline(always)]
fn flow_cache_ipv4(ctx: &TcContext) -> Option<flannel_common::DatapathConfig> {
    let cfg = maps::config()?;
    if cfg.flags & CONFIG_F_FLOW_CACHE == 0 {
        return None;
    }
    let ethertype: u16 = ctx.load(12).ok()?;
    (u16::from_be(ethertype) == ETH_P_IP).then_some(cfg)
}

#[inline(always)]
pub fn try_from_pod(ctx: &TcContext) -> Result<i32, Outcome> {
    let cfg = flow_cache_ipv4(ctx).ok_or(Outcome::Ignore)?;
    let dst: [u8; 4] = ctx.load(ETH_LEN + 16).map_err(|_| Outcome::Ignore)?;
    let route = match maps::route(v4_mapped(dst)) {
        Some(r) if r.flags & ROUTE_F_DIRECT == 0 && is_v4_mapped(&r.peer_ip) => r,
        _ => return Err(Outcome::Path(PathReason::Unrouted)),
    };
    let pkt = flows::parse(ctx, ETH_LEN).ok_or(Outcome::Path(PathReason::Unsupported))?;
    // SAFETY (both reads): fields of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).mark } != 0 {
        return Err(Outcome::Path(PathReason::Marked));
    }
    let flow = flows::observe(&pkt, Dir::Tx, &cfg, flows::now()).map_err(Outcome::Path)?;
    if pkt.ttl <= 1 {
        return Err(Outcome::Path(PathReason::TtlExpired));
    }
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let fits = if gso_size == 0 {
        ctx.len() as usize - ETH_LEN <= usize::from(cfg.mtu)
    } else {
        gso_size as usize + usize::from(pkt.headers) <= usize::from(cfg.mtu)
    };
    if !fits {
        return Err(Outcome::Path(PathReason::TooBig));
    }
    flows::decrement_ttl(ctx, ETH_LEN, pkt.ttl, pkt.proto)
        .map_err(|_| Outcome::Path(PathReason::Unsupported))?;
    maps::count(&maps::PATHS, PathReason::FastTx as u32, ctx.len());
    // SAFETY: the entry `observe` returned is valid for this run; see `flows::observe`.
    unsafe { (*flow).fast_tx_packets += 1 };
    encap::encapsulate(ctx, &cfg, &route, pkt.tos)
}

#[inline(always)]
pub fn try_to_pod(ctx: &TcContext) -> Result<i32, Outcome> {
    flow_cache_ipv4(ctx).ok_or(Outcome::Ignore)?;
    // SAFETY: fields of the context the kernel handed us.
    let (mark, ifindex) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).ifindex) };
    if mark != 0 {
        return Err(Outcome::Ignore);
    }
    let pkt = flows::parse(ctx, ETH_LEN).ok_or(Outcome::Ignore)?;
    let eth: [u8; 12] = ctx.load(0).map_err(|_| Outcome::Ignore)?;
    flows::confirm(&pkt, Dir::Rx, flows::now(), Some((ifindex, eth)));
    Ok(TC_ACT_OK)
}

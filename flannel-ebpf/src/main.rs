//! flannel's VXLAN datapath: two TC programs that do what the kernel's `flannel.<VNI>`
//! device does, with fewer stack traversals, while that device stays fully programmed
//! as the fallback for everything these programs hand back (`TC_ACT_OK`).
//!
//! * [`vxlan_encap`] runs on TC egress of `flannel.<VNI>` (and, with dual stack, of
//!   `flannel-v6.<VNI>`): routing, netfilter and kube-proxy have already run, exactly as
//!   upstream; the program adds the outer IPv4/UDP/VXLAN (IPv6/UDP/VXLAN) headers itself
//!   and sends the packet straight out of the uplink.
//! * [`vxlan_decap`] runs on TC ingress of the uplink: VXLAN from a known peer, with our
//!   VNI, is stripped and handed to `flannel.<VNI>`'s (`flannel-v6.<VNI>`'s) ingress, so the inner packet sees the
//!   same routing and netfilter as after a kernel decap, skipping the outer IP/UDP receive.
//!   VXLAN from an address that holds no lease is dropped and counted.
//! * [`from_pod`] and [`to_pod`] run on each pod's host-side veth (TC ingress and egress)
//!   for the per-flow fast path: flows the kernel path has carried unchanged through
//!   netfilter in both directions skip the bridge, routing, netfilter and the VXLAN device
//!   on both hosts (see `flows`).
#![no_std]
#![no_main]

mod decap;
mod encap;
mod flows;
mod maps;
mod pod;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use flannel_common::{DropReason, PassReason, PathReason};

/// Why a program did not finish its job: the single place that maps an outcome to a TC
/// action and a counter.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    /// Not our traffic at all (not VXLAN to us): hand it on, count nothing.
    Ignore,
    /// Ours, but the kernel path should carry it.
    Pass(PassReason),
    /// Ours and bad: drop it.
    Drop(DropReason),
    /// Pod traffic the per-flow fast path leaves to the kernel path, and why.
    Path(PathReason),
}

impl Outcome {
    #[inline(always)]
    fn action(self, ctx: &TcContext) -> i32 {
        match self {
            Outcome::Ignore => TC_ACT_OK,
            Outcome::Pass(reason) => {
                maps::count(&maps::PASSES, reason as u32, ctx.len());
                TC_ACT_OK
            }
            Outcome::Drop(reason) => {
                maps::count(&maps::DROPS, reason as u32, ctx.len());
                TC_ACT_SHOT
            }
            Outcome::Path(reason) => {
                maps::count(&maps::PATHS, reason as u32, ctx.len());
                TC_ACT_OK
            }
        }
    }
}

/// TC egress on `flannel.<VNI>`.
#[classifier]
pub fn vxlan_encap(ctx: TcContext) -> i32 {
    encap::program(&ctx)
}

/// TC ingress on the uplink.
#[classifier]
pub fn vxlan_decap(ctx: TcContext) -> i32 {
    decap::program(&ctx)
}

/// TC ingress on a pod's host-side veth: what the pod sends.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    pod::from_pod(&ctx)
}

/// TC egress on a pod's host-side veth: what the kernel path delivers to the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    pod::to_pod(&ctx)
}

/// Never attached: the agent runs it once on a VXLAN frame (`BPF_PROG_TEST_RUN`) and
/// reads whether `bpf_skb_adjust_room` took `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (0) or not
/// (the helper's negative errno).
#[classifier]
pub fn probe_decap_l4(ctx: TcContext) -> i32 {
    decap::probe_decap_l4_udp(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

/// The kernel lets only GPL-compatible programs call GPL-only helpers such as
/// `bpf_redirect_neigh`'s FIB lookup and `bpf_fib_lookup`.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

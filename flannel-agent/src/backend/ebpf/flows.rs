//! The agent's side of the per-flow fast path (the programs decide; see
//! `flannel-ebpf/src/flows.rs`): make a verified TCP flow's conntrack entry safe to skip
//! before it goes fast, forget the flows of a pod that went away, and read the path
//! counters.

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
};

use aya::maps::MapError;
use flannel_common::{Counter, Flow, FlowKey, PathReason, maps::FLOW_F_CT_READY};
use tracing::{debug, warn};

use super::{
    PinLayout,
    loader::{Datapath, open_flow_events, open_pinned},
    probe::FallbackReason,
};
use crate::net::conntrack::{Conntrack, Liberal, TcpTuple};

impl Datapath {
    /// Every flow the programs track.
    pub fn flows(&self) -> Result<BTreeMap<FlowKey, Flow>, MapError> {
        let mut out = BTreeMap::new();
        for entry in self.flows.iter() {
            let (k, v) = entry?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Let a TCP flow go fast: its conntrack entry no longer needs to see every segment.
    /// False if the flow is gone (evicted, or its pod deleted) meanwhile.
    pub fn mark_ct_ready(&mut self, key: &FlowKey) -> Result<bool, MapError> {
        let mut flow = match self.flows.get(key, 0) {
            Ok(f) => f,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(e),
        };
        flow.flags |= FLOW_F_CT_READY;
        // A timestamp the programs wrote between our read and this write is lost; that
        // costs at most one extra re-check on the kernel path.
        self.flows.insert(key, flow, 0)?;
        Ok(true)
    }

    /// Forget every flow delivered through the veth `ifindex` (its pod is gone), so no
    /// packet is put into it, or into a new pod that reuses the IP, from the fast path.
    pub fn forget_flows_via(&mut self, ifindex: u32) -> Result<usize, MapError> {
        let stale: Vec<FlowKey> = self
            .flows()?
            .into_iter()
            .filter(|(_, f)| f.rx_ifindex == ifindex)
            .map(|(k, _)| k)
            .collect();
        for key in &stale {
            match self.flows.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(stale.len())
    }

    /// Fast path vs kernel path packet counts, by [`PathReason`] name.
    pub fn path_counters(&self) -> Result<BTreeMap<&'static str, Counter>, MapError> {
        let mut out = BTreeMap::new();
        for reason in PathReason::ALL {
            let per_cpu = self.paths.get(&(reason as u32), 0)?;
            let sum = per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            });
            out.insert(reason.as_str(), sum);
        }
        Ok(out)
    }
}

/// Answer the programs' conntrack requests until `stop` is set: for each verified TCP flow
/// they report, make its conntrack entry liberal (or find it untracked) and mark the flow
/// ready to go fast. Blocking; run it on a thread in the datapath's network namespace.
pub fn serve_flow_events(layout: &PinLayout, stop: &AtomicBool) -> Result<(), FallbackReason> {
    let mut events = open_flow_events(layout)?;
    let mut datapath = open_pinned(layout)?;
    let mut conntrack =
        Conntrack::open().map_err(|e| FallbackReason::Load(format!("ctnetlink socket: {e}")))?;
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FallbackReason::Load(format!("poll flow events: {e}")));
        }
        let mut keys = Vec::new();
        while let Some(item) = events.next() {
            if item.len() >= size_of::<FlowKey>() {
                // SAFETY: the programs write exactly a `FlowKey` (plain integers) per event.
                keys.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowKey>()) });
            }
        }
        for key in keys {
            let tuple = TcpTuple {
                src: super::addr_of(key.pod),
                dst: super::addr_of(key.remote),
                sport: key.pod_port,
                dport: key.remote_port,
            };
            match conntrack.set_tcp_liberal(tuple) {
                Ok(outcome) => {
                    debug!(?tuple, ?outcome, "fast path: TCP flow ready");
                    if outcome == Liberal::NoEntry {
                        debug!(?tuple, "fast path: conntrack does not track this flow");
                    }
                    if let Err(error) = datapath.mark_ct_ready(&key) {
                        warn!(%error, "fast path: marking a flow ready failed");
                    }
                }
                Err(error) if !warned => {
                    warned = true;
                    warn!(?tuple, %error, "fast path: conntrack refused to make a TCP flow liberal; such flows stay on the kernel path");
                }
                Err(_) => {}
            }
        }
    }
    Ok(())
}

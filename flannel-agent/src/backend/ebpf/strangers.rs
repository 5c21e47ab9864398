//! Naming the strangers: VXLAN the known-peer check dropped is counted by outer source
//! address in the `STRANGERS` map; this task reads it and logs each source once, with
//! what to do if it is in fact a flannel host sending from an address its lease does not
//! name (a multi-homed node, a `public-ip-overwrite` without NAT). Upstream's kernel device
//! would have accepted such traffic, so an operator must be told why it is not.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{PinLayout, loader::open_pinned};

/// How often the map is read: a stranger is named within this long of its first packet.
const POLL: Duration = Duration::from_secs(1);

/// Most sources remembered as already logged (the map holds at most
/// [`flannel_common::names::MAX_STRANGERS`]; a flood of spoofed sources must not grow
/// memory without bound, so past this the memory starts afresh).
const REMEMBERED: usize = 65_536;

/// Read the pinned `STRANGERS` map of `layout` every [`POLL`] until `cancel`, warning once
/// per source that is still not a known peer when read (a peer whose lease arrived after
/// its first packets is not named).
pub async fn watch(layout: PinLayout, cancel: CancellationToken) {
    let datapath = match open_pinned(&layout) {
        Ok(d) => d,
        Err(error) => {
            warn!(%error, "cannot read the VXLAN drop counts by source; strangers are counted, not named");
            return;
        }
    };
    let mut logged: HashSet<IpAddr> = HashSet::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(strangers) = datapath.strangers() else {
            continue;
        };
        let fresh: Vec<_> = strangers
            .into_iter()
            .filter(|(src, _)| !logged.contains(src))
            .collect();
        if fresh.is_empty() {
            continue;
        }
        let peers = datapath.current_peers().unwrap_or_default();
        let peers6 = datapath.current_peers6().unwrap_or_default();
        for (src, count) in fresh {
            let known = match src {
                IpAddr::V4(a) => peers.contains_key(&a),
                IpAddr::V6(a) => peers6.contains_key(&a),
            };
            if known {
                continue;
            }
            if logged.len() >= REMEMBERED {
                logged.clear();
            }
            logged.insert(src);
            crate::net::vxlan_guard::warn_stranger(src, count.packets, "eBPF known-peer check");
        }
    }
}

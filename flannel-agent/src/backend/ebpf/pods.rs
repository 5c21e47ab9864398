//! Local pods, from netlink events: the per-pod programs go onto every `cni0` port as it
//! appears, and a port that goes away takes its pins and its flows with it at once, so a
//! new pod that reuses the IP never receives the old one's fast-path traffic.
//!
//! Every link (and, for the opt-in all-flows fast path, neighbour) event triggers a
//! resync against a fresh dump of the links; a periodic resync repairs anything a lost
//! event (socket overrun) left behind.

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt;
use ipnetwork::Ipv4Network;
use netlink_sys::{AsyncSocket, SocketAddr};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    PinLayout, endpoints,
    loader::{Datapath, PodPrograms, open_pinned},
};
use crate::net::netlink::{Netlink, link_master, link_name};

/// Legacy rtnetlink multicast groups (bit masks for `bind`).
const RTMGRP_LINK: u32 = 1;
const RTMGRP_NEIGH: u32 = 4;
const RESYNC: Duration = Duration::from_secs(10);

/// What to keep in step with the pods behind the bridge.
pub struct PodWatch {
    /// Pin layout of the datapath.
    pub layout: PinLayout,
    /// The bridge pods hang off.
    pub bridge: String,
    /// Also fill the endpoints map with the pods of this IPv4 subnet (opt-in all-flows
    /// fast path; `None` without it, and on an IPv6-only host).
    pub endpoints: Option<Ipv4Network>,
}

/// Keep the per-pod programs and maps in step with the pods until `cancel`.
pub async fn watch(w: PodWatch, cancel: CancellationToken) {
    let setup = || -> Result<_, String> {
        let programs = PodPrograms::load(&w.layout, &cancel).map_err(|e| e.to_string())?;
        let datapath = open_pinned(&w.layout).map_err(|e| e.to_string())?;
        let nl = Netlink::connect().map_err(|e| e.to_string())?;
        let (mut conn, _handle, events) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
        let groups = RTMGRP_LINK
            | if w.endpoints.is_some() {
                RTMGRP_NEIGH
            } else {
                0
            };
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, groups))
            .map_err(|e| format!("subscribing to link events: {e}"))?;
        tokio::spawn(conn);
        Ok((programs, datapath, nl, events))
    };
    let (mut programs, mut datapath, nl, mut events) = match setup() {
        Ok(s) => s,
        Err(error) => {
            warn!(%error, "per-flow fast path unavailable: pods stay on the kernel path");
            return;
        }
    };
    let mut ticker = tokio::time::interval(RESYNC);
    // Ports this run attached to (a restart re-attaches every port once, replacing the
    // previous run's programs inside their pinned links).
    let mut done = BTreeSet::new();
    loop {
        if let Err(error) = sync(&w, &nl, &mut programs, &mut datapath, &mut done).await {
            debug!(%error, "pod resync failed; retrying on the next event");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            ev = events.next() => if ev.is_none() {
                warn!("link event stream ended; pods resync every {RESYNC:?} only");
                ticker.tick().await;
            },
            _ = ticker.tick() => {}
        }
        // Coalesce a burst (a veth pair's creation is several events) into one resync.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(5), events.next()).await
        {
        }
    }
}

async fn sync(
    w: &PodWatch,
    nl: &Netlink,
    programs: &mut PodPrograms,
    datapath: &mut Datapath,
    done: &mut BTreeSet<u32>,
) -> Result<(), String> {
    let links = nl.links().await.map_err(|e| e.to_string())?;
    let bridge = links
        .iter()
        .find(|l| link_name(l) == Some(w.bridge.as_str()))
        .map(|l| l.header.index);
    let ports: Vec<(u32, String)> = links
        .iter()
        .filter(|l| bridge.is_some() && link_master(l) == bridge)
        .filter_map(|l| Some((l.header.index, link_name(l)?.to_owned())))
        .collect();
    let present: BTreeSet<u32> = ports.iter().map(|(i, _)| *i).collect();
    // Gone first: a new pod may reuse the old one's IP right away.
    let known: BTreeSet<u32> = programs.attached().union(done).copied().collect();
    for gone in known.difference(&present) {
        programs.detach(*gone);
        done.remove(gone);
        match datapath.forget_flows_via(*gone) {
            Ok(n) => info!(
                ifindex = gone,
                flows = n,
                "pod port gone: programs and flows removed"
            ),
            Err(error) => warn!(ifindex = gone, %error, "forgetting a gone pod's flows failed"),
        }
    }
    for (index, name) in &ports {
        if !done.contains(index) {
            match programs.attach(name, *index) {
                Ok(()) => {
                    done.insert(*index);
                    debug!(port = %name, "per-flow fast path programs attached");
                }
                Err(error) => warn!(port = %name, %error, "attaching the pod programs failed"),
            }
        }
    }
    if let Some(subnet) = w.endpoints {
        let found = endpoints::discover(nl, &w.bridge, subnet)
            .await
            .map_err(|e| e.to_string())?;
        datapath
            .set_endpoints(&found)
            .map_err(|e| format!("endpoints map: {e}"))?;
    }
    Ok(())
}

//! Watching leases in etcd, robust to disconnects and compaction.
//!
//! The lease watch starts from a snapshot and, after **any** interruption (etcd restart,
//! network error, compaction), takes a fresh snapshot instead of trying to resume: the
//! snapshot is diffed by the agent's `PeerSet`, so nothing that happened while disconnected
//! is lost, whatever the server's compaction state.

use std::time::Duration;

use etcd_client::WatchStream;
use futures::{StreamExt, stream::BoxStream};
use ipnetwork::Ipv4Network;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{EtcdSubnetManager, WatchStart, is_delete, prefix_watch, removed_lease};
use crate::lease::{LeaseEvent, LeaseRules};

/// Exponential backoff 100 ms → ×2 → 5 s, as upstream's watch reconnect.
#[derive(Debug)]
pub(super) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    /// The delay to wait now; doubles the next one.
    pub(super) fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }

    /// After a success.
    pub(super) fn reset(&mut self) {
        *self = Self::default();
    }
}

type Tx = mpsc::Sender<crate::subnet::Result<LeaseEvent>>;

/// Spawns the watch task; it ends when the returned stream is dropped.
pub(super) fn watch_leases(
    mgr: EtcdSubnetManager,
) -> BoxStream<'static, crate::subnet::Result<LeaseEvent>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(mgr, tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }).boxed()
}

/// Sleeps `d`; `true` if the receiver went away meanwhile.
async fn sleep_or_closed(tx: &Tx, d: Duration) -> bool {
    tokio::select! {
        () = tx.closed() => true,
        () = tokio::time::sleep(d) => false,
    }
}

async fn run(mgr: EtcdSubnetManager, tx: Tx) {
    let prefix = mgr.subnets_prefix();
    let mut backoff = Backoff::default();
    // The first snapshot is the acquisition's read of the leases when it left one: the
    // watch goes on from that read's revision, so no change since is missed, and a start
    // reads the leases once instead of twice. Our own write is in it already; its events
    // (at `skip`) are not passed on again.
    let mut start = mgr.take_watch_start();
    loop {
        let listed = tokio::select! {
            () = tx.closed() => return,
            r = async {
                let rules = mgr.lease_rules().await?;
                match start.take() {
                    Some(start) => Ok((start, rules)),
                    None => mgr.watch_start().await.map(|s| (s, rules)),
                }
            } => r,
        };
        let (
            WatchStart {
                leases,
                revision,
                skip,
            },
            rules,
        ) = match listed {
            Ok(l) => l,
            Err(error) => {
                crate::metrics::get().datastore_error("list_leases");
                warn!(%error, "listing leases failed; retrying");
                if sleep_or_closed(&tx, backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        debug!(leases = leases.len(), revision, "lease snapshot");
        let snapshot = LeaseEvent::Snapshot(leases);
        if tx.send(Ok(snapshot)).await.is_err() {
            return;
        }
        let mut client = mgr.client.clone();
        let watched = tokio::select! {
            () = tx.closed() => return,
            r = client.watch(prefix.as_str(), Some(prefix_watch(revision + 1))) => r,
        };
        match watched {
            Ok(mut ws) => {
                if forward(&mgr, &rules, &mut ws, &tx, &mut backoff, skip).await {
                    return;
                }
            }
            Err(error) => {
                crate::metrics::get().datastore_error("watch_leases");
                warn!(%error, "starting the lease watch failed; resyncing");
            }
        }
        if sleep_or_closed(&tx, backoff.next_delay()).await {
            return;
        }
    }
}

/// Forwards watch events until the watch ends, except those of revision `skip` (already
/// in the snapshot); `true` if the receiver went away.
async fn forward(
    mgr: &EtcdSubnetManager,
    rules: &LeaseRules,
    ws: &mut WatchStream,
    tx: &Tx,
    backoff: &mut Backoff,
    skip: Option<i64>,
) -> bool {
    loop {
        let msg = tokio::select! {
            () = tx.closed() => return true,
            m = ws.message() => m,
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                warn!("lease watch closed by etcd; resyncing");
                return false;
            }
            Err(error) => {
                crate::metrics::get().datastore_error("watch_leases");
                warn!(%error, "lease watch failed; resyncing");
                return false;
            }
        };
        if resp.compact_revision() != 0 || resp.canceled() {
            warn!(
                compact_revision = resp.compact_revision(),
                reason = resp.cancel_reason(),
                "lease watch cancelled by etcd; resyncing"
            );
            return false;
        }
        backoff.reset();
        let events: Vec<(i64, LeaseEvent)> = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv().filter(|kv| Some(kv.mod_revision()) != skip)?;
                let event = if is_delete(ev) {
                    LeaseEvent::Removed(removed_lease(kv)?)
                } else {
                    LeaseEvent::Added(mgr.read_record(Some(rules), kv)?)
                };
                Some((kv.mod_revision(), event))
            })
            .collect();
        // A host replacing its own lease (say, gaining an IPv6 subnet) deletes the old key
        // and puts the new one in one transaction. Its IPv4 subnet lives on in the new
        // lease, so that delete is not passed on: the put replaces the peer in one step and
        // its routes never go away meanwhile.
        let replaced: Vec<(i64, Option<Ipv4Network>)> = events
            .iter()
            .filter_map(|(rev, ev)| match ev {
                LeaseEvent::Added(l) => Some((*rev, l.subnet)),
                _ => None,
            })
            .collect();
        for (rev, event) in events {
            if matches!(&event, LeaseEvent::Removed(l) if replaced.contains(&(rev, l.subnet))) {
                continue;
            }
            if tx.send(Ok(event)).await.is_err() {
                return true;
            }
        }
    }
}

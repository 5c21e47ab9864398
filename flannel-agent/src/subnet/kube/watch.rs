//! The node watch: a kube-runtime watcher turned into lease events. Every (re)list ends in
//! `InitDone`, which becomes one [`LeaseEvent::Snapshot`] of the leases the list's nodes
//! carry; single changes become `Added`/`Removed`.
//!
//! No Node objects are kept (no reflector store): each is turned into its lease as it
//! arrives, and only the leases are remembered. A kubelet-reported Node carries far more
//! than flannel reads (conditions, images, capacity, managed fields), and at 5,000 nodes a
//! store of them was most of the agent's heap.

use std::{collections::HashMap, sync::Arc};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{debug, warn};

use super::{
    annotations::AnnotationNames,
    node::{Families, NodeError, node_to_lease},
};
use crate::lease::{Lease, LeaseEvent, LeaseRules};

/// Watches all nodes; returns the lease event stream.
pub fn lease_events(
    nodes: Api<Node>,
    names: Arc<AnnotationNames>,
    families: Families,
    rules: LeaseRules,
) -> BoxStream<'static, crate::subnet::Result<LeaseEvent>> {
    let mut tracker = LeaseTracker {
        names,
        families,
        rules,
        listing: None,
        known: HashMap::new(),
        warned: HashMap::new(),
    };
    let events = watcher(nodes, watcher::Config::default()).default_backoff();
    events
        .flat_map(move |event| {
            let out = match event {
                Ok(event) => tracker.handle(event),
                // The watcher recovers by itself (re-watch, or relist after 410 Gone); the
                // backoff above paces it. Nothing is lost: a relist ends in a fresh snapshot.
                Err(error) => {
                    crate::metrics::get().datastore_error("watch_leases");
                    warn!(%error, "node watch failed, retrying");
                    Vec::new()
                }
            };
            futures::stream::iter(out.into_iter().map(Ok))
        })
        .boxed()
}

/// Turns reflector-fed watcher events into lease events. State: what was last reported per
/// node, so heartbeats and resyncs that change nothing flannel cares about stay silent,
/// and the last warning per node, so a broken node is reported once per change, not on
/// every status update.
struct LeaseTracker {
    names: Arc<AnnotationNames>,
    families: Families,
    rules: LeaseRules,
    /// The leases of a (re)list in progress: between `Init` and `InitDone`.
    listing: Option<HashMap<String, Lease>>,
    known: HashMap<String, Lease>,
    warned: HashMap<String, String>,
}

impl LeaseTracker {
    /// The node's lease, or why not (logged, once per distinct reason).
    fn convert(&mut self, node: &Node) -> Result<Lease, NodeError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let result = node_to_lease(node, &self.names, self.families).and_then(|lease| {
            match self.rules.check(&lease) {
                Ok(()) => Ok(lease),
                Err(reason) => Err(NodeError::InvalidLease {
                    node: name.clone(),
                    reason,
                }),
            }
        });
        match &result {
            Ok(_) => {
                self.warned.remove(&name);
            }
            Err(error) => {
                let msg = error.to_string();
                if self.warned.get(&name) != Some(&msg) {
                    match error {
                        // A node flannel has not started on yet: normal, not worth a warning.
                        NodeError::NotManaged { value: None, .. } => {
                            debug!(node = %name, %error, "skipping node");
                        }
                        _ => warn!(node = %name, %error, "skipping node"),
                    }
                    self.warned.insert(name, msg);
                }
            }
        }
        result
    }

    fn handle(&mut self, event: watcher::Event<Node>) -> Vec<LeaseEvent> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(node) => {
                if let Ok(lease) = self.convert(&node) {
                    let name = node.metadata.name.clone().unwrap_or_default();
                    self.listing.get_or_insert_default().insert(name, lease);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                self.known = self.listing.take().unwrap_or_default();
                let mut leases: Vec<Lease> = self.known.values().cloned().collect();
                leases.sort_by_key(Lease::id);
                debug!(leases = leases.len(), "node list complete");
                vec![LeaseEvent::Snapshot(leases)]
            }
            watcher::Event::Apply(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                match self.convert(&node) {
                    Ok(new) => match self.known.insert(name, new.clone()) {
                        // Heartbeats, resyncs, unrelated fields: nothing to tell.
                        Some(old) if old == new => Vec::new(),
                        // A new IPv4 pod CIDR (upstream misses this): the old subnet is
                        // gone, so it is removed before the new one is added.
                        Some(old) if !old.same_subnet(&new) => {
                            vec![LeaseEvent::Removed(old), LeaseEvent::Added(new)]
                        }
                        // Same host subnet, other attributes or a gained/changed IPv6 pod
                        // CIDR: `Added` alone, which the agent's `PeerSet` applies in place.
                        // A `Removed` first would drop the peer's IPv4 route for as long as
                        // the re-add takes, on every host.
                        _ => vec![LeaseEvent::Added(new)],
                    },
                    // flannel was taken off the node: it is no longer a peer.
                    Err(NodeError::NotManaged { .. }) => self
                        .known
                        .remove(&name)
                        .map(LeaseEvent::Removed)
                        .into_iter()
                        .collect(),
                    // Malformed update of a known peer: keep what worked (warned above).
                    Err(_) => Vec::new(),
                }
            }
            watcher::Event::Delete(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                self.warned.remove(&name);
                self.known
                    .remove(&name)
                    .map(LeaseEvent::Removed)
                    .into_iter()
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::NodeSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;
    use crate::subnet::kube::annotations::DEFAULT_PREFIX;

    fn node(name: &str, cidr: &str, mac: &str, managed: bool) -> Node {
        let p = "flannel.alpha.coreos.com/";
        let mut ann: std::collections::BTreeMap<String, String> = [
            ("backend-type", "vxlan".to_owned()),
            ("backend-data", format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)),
            ("public-ip", "198.18.0.1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{p}{k}"), v))
        .collect();
        if managed {
            ann.insert(format!("{p}kube-subnet-manager"), "true".into());
        }
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(ann),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(cidr.into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn tracker() -> LeaseTracker {
        LeaseTracker {
            names: Arc::new(AnnotationNames::new(DEFAULT_PREFIX).unwrap()),
            families: Families {
                ipv4: true,
                ipv6: false,
            },
            rules: LeaseRules::default(),
            listing: None,
            known: HashMap::new(),
            warned: HashMap::new(),
        }
    }

    /// `node` with both pod CIDRs and the IPv6 annotations of a dual-stack peer.
    fn dual_node(name: &str, cidr: &str, cidr6: &str) -> Node {
        let mut n = node(name, cidr, "0a:00:00:00:00:01", true);
        let p = "flannel.alpha.coreos.com/";
        let ann = n.metadata.annotations.as_mut().unwrap();
        ann.insert(format!("{p}public-ipv6"), "fd00:198::1".into());
        ann.insert(
            format!("{p}backend-v6-data"),
            r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:61"}"#.into(),
        );
        n.spec.as_mut().unwrap().pod_cidrs = Some(vec![cidr.into(), cidr6.into()]);
        n
    }

    #[test]
    fn a_new_ipv6_pod_cidr_is_one_added_and_a_new_ipv4_one_a_removal_first() {
        let mut t = tracker();
        t.families.ipv6 = true;
        t.handle(watcher::Event::Init);
        t.handle(watcher::Event::InitDone);
        let a = dual_node("a", "10.244.1.0/24", "fd00:10:244:1::/64");
        assert_eq!(
            subnets(&t.handle(watcher::Event::Apply(a))),
            ["added 10.244.1.0/24&fd00:10:244:1::/64"]
        );
        // Same IPv4 subnet, another IPv6 one: the peer is swapped in place, never removed
        // (a removal would take its IPv4 route away on every host until the add).
        let a6 = dual_node("a", "10.244.1.0/24", "fd00:10:244:11::/64");
        assert_eq!(
            subnets(&t.handle(watcher::Event::Apply(a6))),
            ["added 10.244.1.0/24&fd00:10:244:11::/64"]
        );
        // Another IPv4 subnet is another host's address space: the old one goes first.
        let a4 = dual_node("a", "10.244.9.0/24", "fd00:10:244:11::/64");
        assert_eq!(
            subnets(&t.handle(watcher::Event::Apply(a4))),
            [
                "removed 10.244.1.0/24&fd00:10:244:11::/64",
                "added 10.244.9.0/24&fd00:10:244:11::/64"
            ]
        );
    }

    fn subnets(events: &[LeaseEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                LeaseEvent::Snapshot(l) => format!("snapshot {}", l.len()),
                LeaseEvent::Added(l) => format!("added {}", l.subnets()),
                LeaseEvent::Removed(l) => format!("removed {}", l.subnets()),
            })
            .collect()
    }

    #[test]
    fn relist_snapshot_then_minimal_changes() {
        let mut t = tracker();
        let a = node("a", "10.244.1.0/24", "0a:00:00:00:00:01", true);
        let b = node("b", "10.244.2.0/24", "0a:00:00:00:00:02", true);
        let stranger = node("c", "10.244.3.0/24", "0a:00:00:00:00:03", false);
        assert!(t.handle(watcher::Event::Init).is_empty());
        for n in [&a, &b, &stranger] {
            assert!(t.handle(watcher::Event::InitApply(n.clone())).is_empty());
        }
        let ev = t.handle(watcher::Event::InitDone);
        let LeaseEvent::Snapshot(leases) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(leases.len(), 2);
        assert!(leases[0].id() < leases[1].id(), "sorted by subnet");

        // Unchanged: silent. New MAC: Added. New pod CIDR: Removed old, Added new.
        assert!(t.handle(watcher::Event::Apply(a.clone())).is_empty());
        let a2 = node("a", "10.244.1.0/24", "0a:00:00:00:00:11", true);
        assert_eq!(
            subnets(&t.handle(watcher::Event::Apply(a2))),
            ["added 10.244.1.0/24"]
        );
        let a3 = node("a", "10.244.9.0/24", "0a:00:00:00:00:11", true);
        assert_eq!(
            subnets(&t.handle(watcher::Event::Apply(a3))),
            ["removed 10.244.1.0/24", "added 10.244.9.0/24"]
        );
        // flannel taken off b: removed; deleted unknown node: silent; deleted a: removed.
        let b_off = node("b", "10.244.2.0/24", "0a:00:00:00:00:02", false);
        assert_eq!(
            subnets(&t.handle(watcher::Event::Apply(b_off))),
            ["removed 10.244.2.0/24"]
        );
        assert!(t.handle(watcher::Event::Delete(stranger)).is_empty());
        let a_last = node("a", "10.244.9.0/24", "0a:00:00:00:00:11", true);
        assert_eq!(
            subnets(&t.handle(watcher::Event::Delete(a_last))),
            ["removed 10.244.9.0/24"]
        );

        // A relist replaces everything: the snapshot is the new list, nothing else.
        t.handle(watcher::Event::Init);
        t.handle(watcher::Event::InitApply(b.clone()));
        let ev = t.handle(watcher::Event::InitDone);
        assert!(
            matches!(&ev[..], [LeaseEvent::Snapshot(l)] if l.len() == 1 && l[0].subnets().to_string() == "10.244.2.0/24")
        );
    }
}

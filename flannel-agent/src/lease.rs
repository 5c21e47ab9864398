//! Leases as the agent handles them: the events a subnet manager reports, the peer set
//! derived from them, and the checks a lease must pass before any datapath sees it. The
//! wire format (keys, JSON, backend data) lives in [`crate::wire::lease`]; its types are
//! re-exported here.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use ipnetwork::{Ipv4Network, Ipv6Network};

pub use crate::wire::{
    lease::{
        BackendAttrs, Error, KeySubnets, Lease, LeaseAttrs, LeaseFamily, SubnetId, Subnets,
        VxlanBackendData, make_subnet_key, parse_record, parse_subnet_key, same_subnet,
    },
    mac::MacAddr,
};
use crate::{
    netconf::NetworkConfig,
    wire::cidr::{self, Cidr},
};

/// A change in the set of leases, as a subnet manager reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// The complete current set (on start, and again after a resync: a relist after a
    /// disconnect or compaction). Anything not in it is gone.
    Snapshot(Vec<Lease>),
    /// A lease appeared or changed.
    Added(Lease),
    /// A lease went away (deleted or expired). Only the subnet is guaranteed to be right:
    /// etcd's delete events carry no value.
    Removed(Lease),
}

/// Why a well-formed lease is still refused: it would route traffic somewhere it must
/// not go (a subnet outside the cluster network, a non-unicast tunnel endpoint).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    /// The subnet is not inside the configured network.
    #[error("{family} subnet {subnet} is outside the cluster network {network}")]
    OutsideNetwork {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// The lease's subnet.
        subnet: String,
        /// `Network` / `IPv6Network`.
        network: String,
    },
    /// The subnet is written with host bits set (`10.244.117.7-24`).
    #[error("{family} subnet {subnet} has host bits set (not a network address)")]
    NotAligned {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// The lease's subnet.
        subnet: String,
    },
    /// The prefix length is not the configured subnet length.
    #[error("{family} subnet {subnet} is not a /{want} (the configured subnet length)")]
    WrongLength {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// The lease's subnet.
        subnet: String,
        /// `SubnetLen` / `IPv6SubnetLen`.
        want: u8,
    },
    /// The public address is not a usable unicast address.
    #[error("{field} {addr} is {why}, not a unicast host address")]
    BadPublicIp {
        /// `PublicIP` / `PublicIPv6`.
        field: &'static str,
        /// The address.
        addr: IpAddr,
        /// What kind of address it is.
        why: &'static str,
    },
    /// A vxlan lease without the VTEP peers need.
    #[error("vxlan lease has no {field} (VtepMAC) for {family}")]
    MissingVtep {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// `BackendData` or `BackendV6Data`.
        field: &'static str,
    },
    /// An IPv6-only lease without the address peers tunnel to.
    #[error("lease has no {field}, which an IPv6-only network needs")]
    MissingPublicIp {
        /// `PublicIPv6`.
        field: &'static str,
    },
    /// The lease has no subnet of a family the network needs: an IPv4 network's lease
    /// without an IPv4 subnet, or an IPv6-only network's lease without an IPv6 one.
    #[error("lease has no {family} subnet but the network enables {family}")]
    MissingSubnet {
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
}

/// What a lease must satisfy to reach a datapath, from the network configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseRules {
    v4: Option<FamilyRules<Ipv4Network>>,
    v6: Option<FamilyRules<Ipv6Network>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FamilyRules<N> {
    network: Option<N>,
    /// 0 = not configured (kube mode leaves it to the controller manager).
    subnet_len: u8,
}

impl<N: Cidr> FamilyRules<N> {
    fn check(&self, subnet: N) -> Result<(), Invalid> {
        if !cidr::is_aligned(subnet) {
            return Err(Invalid::NotAligned {
                family: N::FAMILY,
                subnet: subnet.to_string(),
            });
        }
        if let Some(network) = self.network
            && !cidr::contains(network, subnet)
        {
            return Err(Invalid::OutsideNetwork {
                family: N::FAMILY,
                subnet: subnet.to_string(),
                network: network.to_string(),
            });
        }
        if self.subnet_len != 0 && subnet.prefix_len() != self.subnet_len {
            return Err(Invalid::WrongLength {
                family: N::FAMILY,
                subnet: subnet.to_string(),
                want: self.subnet_len,
            });
        }
        Ok(())
    }
}

impl LeaseRules {
    /// The rules of `cfg` (checked or not: an unset `SubnetLen` is not enforced).
    pub fn new(cfg: &NetworkConfig) -> Self {
        Self {
            v4: cfg.enable_ipv4.then_some(FamilyRules {
                network: cfg.network,
                subnet_len: cfg.subnet_len,
            }),
            v6: cfg.enable_ipv6.then_some(FamilyRules {
                network: cfg.ipv6_network,
                subnet_len: cfg.ipv6_subnet_len,
            }),
        }
    }

    /// The same rules without the subnet length: in kube mode the controller manager picks
    /// the pod CIDR size and upstream ignores `SubnetLen`.
    pub fn any_length(mut self) -> Self {
        if let Some(v4) = &mut self.v4 {
            v4.subnet_len = 0;
        }
        if let Some(v6) = &mut self.v6 {
            v6.subnet_len = 0;
        }
        self
    }

    /// Whether `lease` may be programmed; the first rule it breaks otherwise. Upstream
    /// checks none of this; a lease outside `Network` or pointing at 127.0.0.1 would be
    /// routed on every host.
    pub fn check(&self, lease: &Lease) -> Result<(), Invalid> {
        if let Some(v4) = &self.v4 {
            let subnet = lease
                .subnet
                .ok_or(Invalid::MissingSubnet { family: "IPv4" })?;
            v4.check(subnet)?;
            unicast("PublicIP", lease.attrs.public_ip.into())?;
            if matches!(lease.attrs.backend, BackendAttrs::Vxlan { v4: None, .. }) {
                return Err(Invalid::MissingVtep {
                    family: "IPv4",
                    field: "BackendData",
                });
            }
        }
        // An IPv6 part is checked where IPv6 is enabled; in dual stack a host without one
        // is an IPv4-only peer (upstream programs each family on its own). On an IPv6-only
        // network the IPv6 part is all there is, so it must be complete.
        if let Some(v6) = &self.v6 {
            match lease.ipv6_subnet {
                Some(subnet) => v6.check(subnet)?,
                None if self.v4.is_none() => {
                    return Err(Invalid::MissingSubnet { family: "IPv6" });
                }
                None => {}
            }
            if self.v4.is_none() {
                if lease.attrs.public_ipv6.is_none() {
                    return Err(Invalid::MissingPublicIp {
                        field: "PublicIPv6",
                    });
                }
                if matches!(lease.attrs.backend, BackendAttrs::Vxlan { v6: None, .. }) {
                    return Err(Invalid::MissingVtep {
                        family: "IPv6",
                        field: "BackendV6Data",
                    });
                }
            }
        }
        if let Some(ip) = lease.attrs.public_ipv6 {
            unicast("PublicIPv6", ip.into())?;
        }
        Ok(())
    }
}

fn unicast(field: &'static str, addr: IpAddr) -> Result<(), Invalid> {
    match cidr::unusable_unicast(addr) {
        None => Ok(()),
        Some(why) => Err(Invalid::BadPublicIp { field, addr, why }),
    }
}

/// Remembers which bad records were already logged, so a record that stays bad is warned
/// about once, not on every resync; a changed value is new and warned about again. Clones
/// share the memory.
#[derive(Clone, Debug, Default)]
pub struct SkipLog {
    seen: Arc<Mutex<HashSet<u64>>>,
}

impl SkipLog {
    /// Whether the record `(id, value)` is reported for the first time (then the caller
    /// logs it).
    pub fn first_time(&self, id: &str, value: &[u8]) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        value.hash(&mut h);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a flood of distinct garbage must not grow memory without limit.
        if seen.len() >= 65_536 {
            seen.clear();
        }
        seen.insert(h.finish())
    }
}

/// One thing the backend must do after a lease event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Program (or re-program, when its attributes changed) a peer.
    Add(Lease),
    /// Remove a peer; carries the last lease seen for it, so its PublicIP/VTEP MAC are known.
    Remove(Lease),
}

/// The set of peers (every lease but our own), maintained from [`LeaseEvent`]s.
///
/// Pure, so the rules that decide what the backend is told are unit-tested without etcd:
/// the own lease is filtered out (by IPv4 subnet, as upstream does for etcd; by IPv6 subnet
/// on an IPv6-only network, see [`Lease::same_subnet`]), a removal is
/// reported with the cached lease (delete events carry no value), a snapshot is diffed
/// against the cache, and unlike upstream a snapshot whose entry changed attributes yields
/// an [`PeerChange::Add`] so a peer that re-registered with a new VTEP MAC during a
/// disconnect is re-programmed.
///
/// Peers are keyed by [`host_key`], so the lease a new one replaces (a host that gained or
/// changed its IPv6 subnet) is found by one lookup, not by a scan of every peer: a cluster
/// start at 5,000 nodes is 5,000 new leases.
#[derive(Clone, Debug)]
pub struct PeerSet {
    own: SubnetId,
    peers: HashMap<SubnetId, Lease>,
}

/// Which host a lease belongs to: its IPv4 subnet, or on an IPv6-only network its IPv6
/// subnet. This is [`same_subnet`]'s rule for networks whose leases all have an IPv4
/// subnet or all lack one, which [`LeaseRules`] makes of every network (and etcd keys
/// always name one): two leases are the same host exactly when their keys are equal.
fn host_key((v4, v6): SubnetId) -> SubnetId {
    match v4 {
        Some(v4) => (Some(v4), None),
        None => (None, v6),
    }
}

impl PeerSet {
    /// An empty set for the host whose lease has the subnet(s) `own` ([`Lease::id`]).
    pub fn new(own: SubnetId) -> Self {
        Self {
            own,
            peers: HashMap::new(),
        }
    }

    /// The current peers, ordered by subnet.
    pub fn peers(&self) -> Vec<Lease> {
        let mut peers: Vec<Lease> = self.peers.values().cloned().collect();
        peers.sort_unstable_by_key(Lease::id);
        peers
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    fn is_own(&self, lease: &Lease) -> bool {
        same_subnet(self.own, lease.id())
    }

    /// Applies one event and returns what changed, in a deterministic order (by subnet).
    pub fn apply(&mut self, event: LeaseEvent) -> Vec<PeerChange> {
        match event {
            LeaseEvent::Added(lease) => {
                if self.is_own(&lease) {
                    return Vec::new();
                }
                match self.peers.get(&host_key(lease.id())) {
                    Some(old) if !changed(old, &lease) => Vec::new(),
                    // New, changed, or a host that replaced its lease (same IPv4 subnet, an
                    // IPv6 subnet gained or changed): the new lease takes the old one's
                    // place. The backends program a peer by subnet, so the add overwrites
                    // what the old lease had; an IPv6 subnet it no longer has is removed
                    // by the next resync.
                    _ => {
                        self.peers.insert(host_key(lease.id()), lease.clone());
                        vec![PeerChange::Add(lease)]
                    }
                }
            }
            LeaseEvent::Removed(lease) => {
                if self.is_own(&lease) {
                    return Vec::new();
                }
                self.peers
                    .remove(&host_key(lease.id()))
                    .map(PeerChange::Remove)
                    .into_iter()
                    .collect()
            }
            LeaseEvent::Snapshot(leases) => {
                let mut fresh = HashMap::with_capacity(leases.len());
                for lease in leases {
                    if !self.is_own(&lease) {
                        fresh.insert(host_key(lease.id()), lease);
                    }
                }
                let mut removed: Vec<Lease> = self
                    .peers
                    .iter()
                    .filter(|(k, _)| !fresh.contains_key(*k))
                    .map(|(_, l)| l.clone())
                    .collect();
                let mut added: Vec<Lease> = fresh
                    .iter()
                    .filter(|(k, l)| self.peers.get(*k).is_none_or(|old| changed(old, l)))
                    .map(|(_, l)| l.clone())
                    .collect();
                removed.sort_unstable_by_key(Lease::id);
                added.sort_unstable_by_key(Lease::id);
                self.peers = fresh;
                removed
                    .into_iter()
                    .map(PeerChange::Remove)
                    .chain(added.into_iter().map(PeerChange::Add))
                    .collect()
            }
        }
    }
}

/// Whether `new`, for the same host as `old`, must be programmed again: other subnets
/// (an IPv6 subnet gained, changed or lost) or other attributes.
fn changed(old: &Lease, new: &Lease) -> bool {
    old.id() != new.id() || old.differs_from(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(sn: &str, ip: [u8; 4]) -> Lease {
        Lease {
            subnet: Some(sn.parse().unwrap()),
            ipv6_subnet: None,
            extra_senders: Vec::new(),
            attrs: LeaseAttrs {
                public_ip: ip.into(),
                public_ipv6: None,
                backend: BackendAttrs::Vxlan { v4: None, v6: None },
            },
        }
    }

    fn bare(sn: &str) -> Lease {
        lease(sn, [0, 0, 0, 0])
    }

    #[test]
    fn peer_set_filters_own_and_uses_cache_on_remove() {
        let mut set = PeerSet::new((Some("10.0.1.0/24".parse().unwrap()), None));
        let a = lease("10.0.2.0/24", [1, 1, 1, 2]);
        assert_eq!(set.apply(LeaseEvent::Added(bare("10.0.1.0/24"))), vec![]);
        assert_eq!(
            set.apply(LeaseEvent::Added(a.clone())),
            vec![PeerChange::Add(a.clone())]
        );
        // A renewal re-put with identical attributes is not a change.
        assert_eq!(set.apply(LeaseEvent::Added(a.clone())), vec![]);
        let a2 = lease("10.0.2.0/24", [1, 1, 1, 9]);
        assert_eq!(
            set.apply(LeaseEvent::Added(a2.clone())),
            vec![PeerChange::Add(a2.clone())]
        );
        assert_eq!(
            set.apply(LeaseEvent::Removed(bare("10.0.2.0/24"))),
            vec![PeerChange::Remove(a2)]
        );
        assert_eq!(set.apply(LeaseEvent::Removed(bare("10.0.2.0/24"))), vec![]);
        assert_eq!(set.apply(LeaseEvent::Removed(bare("10.0.1.0/24"))), vec![]);
        assert!(set.is_empty());
    }

    #[test]
    fn peer_set_replaces_a_peer_that_gained_an_ipv6_subnet_in_one_change() {
        let mut set = PeerSet::new((Some("10.0.1.0/24".parse().unwrap()), None));
        let v4_only = lease("10.0.2.0/24", [1, 1, 1, 2]);
        set.apply(LeaseEvent::Added(v4_only));
        let mut dual = lease("10.0.2.0/24", [1, 1, 1, 2]);
        dual.ipv6_subnet = Some("fd00:0:0:2::/64".parse().unwrap());
        assert_eq!(
            set.apply(LeaseEvent::Added(dual.clone())),
            vec![PeerChange::Add(dual.clone())]
        );
        assert_eq!(set.peers(), vec![dual.clone()]);
        assert_eq!(
            set.apply(LeaseEvent::Removed(bare("10.0.2.0/24"))),
            vec![PeerChange::Remove(dual)]
        );
        assert!(set.is_empty());
    }

    fn dual(sn: &str, sn6: &str, ip: [u8; 4]) -> Lease {
        let mut l = lease(sn, ip);
        l.ipv6_subnet = Some(sn6.parse().unwrap());
        l
    }

    #[test]
    fn peer_set_replaces_in_place_by_host_subnet() {
        let mut set = PeerSet::new((Some("10.0.1.0/24".parse().unwrap()), None));
        let a = lease("10.0.2.0/24", [1, 1, 1, 2]);
        let b = dual("10.0.3.0/24", "fd00:0:0:3::/64", [1, 1, 1, 3]);
        set.apply(LeaseEvent::Added(a.clone()));
        set.apply(LeaseEvent::Added(b.clone()));
        // New attributes, same subnets: replaced in place.
        let a2 = lease("10.0.2.0/24", [1, 1, 1, 22]);
        assert_eq!(
            set.apply(LeaseEvent::Added(a2.clone())),
            vec![PeerChange::Add(a2.clone())]
        );
        // The IPv6 subnet changes, the IPv4 one (the host) stays: one add, no removal.
        let b2 = dual("10.0.3.0/24", "fd00:0:0:33::/64", [1, 1, 1, 3]);
        assert_eq!(
            set.apply(LeaseEvent::Added(b2.clone())),
            vec![PeerChange::Add(b2.clone())]
        );
        assert_eq!(set.apply(LeaseEvent::Added(b2.clone())), vec![]);
        assert_eq!(set.peers(), vec![a2.clone(), b2.clone()]);
        // A removal names the host by the subnets its key carries: the IPv4 one alone, or
        // both (also the stale IPv6 half of an older key).
        assert_eq!(
            set.apply(LeaseEvent::Removed(Lease::bare(b.subnet, b.ipv6_subnet))),
            vec![PeerChange::Remove(b2)]
        );
        assert_eq!(
            set.apply(LeaseEvent::Removed(bare("10.0.2.0/24"))),
            vec![PeerChange::Remove(a2)]
        );
        assert!(set.is_empty());
    }

    #[test]
    fn peer_set_snapshot_swaps_a_replaced_lease_in_place() {
        let mut set = PeerSet::new((Some("10.0.1.0/24".parse().unwrap()), None));
        let a = lease("10.0.2.0/24", [1, 1, 1, 2]);
        let b = lease("10.0.3.0/24", [1, 1, 1, 3]);
        set.apply(LeaseEvent::Snapshot(vec![a, b.clone()]));
        // After a disconnect: a is dual stack now. No removal of a's IPv4 subnet.
        let a6 = dual("10.0.2.0/24", "fd00:0:0:2::/64", [1, 1, 1, 2]);
        assert_eq!(
            set.apply(LeaseEvent::Snapshot(vec![b.clone(), a6.clone()])),
            vec![PeerChange::Add(a6.clone())]
        );
        assert_eq!(set.peers(), vec![a6, b]);
    }

    #[test]
    fn peer_set_snapshot_diff() {
        let mut set = PeerSet::new((Some("10.0.1.0/24".parse().unwrap()), None));
        let a = lease("10.0.2.0/24", [1, 1, 1, 2]);
        let b = lease("10.0.3.0/24", [1, 1, 1, 3]);
        let c = lease("10.0.4.0/24", [1, 1, 1, 4]);
        let own = lease("10.0.1.0/24", [1, 1, 1, 1]);
        assert_eq!(
            set.apply(LeaseEvent::Snapshot(vec![
                b.clone(),
                own.clone(),
                a.clone()
            ])),
            vec![PeerChange::Add(a.clone()), PeerChange::Add(b.clone())]
        );
        let b2 = lease("10.0.3.0/24", [1, 1, 1, 33]);
        assert_eq!(
            set.apply(LeaseEvent::Snapshot(vec![b2.clone(), c.clone(), own])),
            vec![
                PeerChange::Remove(a),
                PeerChange::Add(b2.clone()),
                PeerChange::Add(c.clone())
            ]
        );
        assert_eq!(set.peers(), vec![b2, c]);
        assert_eq!(set.len(), 2);
    }

    fn rules(json: &str) -> LeaseRules {
        LeaseRules::new(&NetworkConfig::parse_and_check(json).unwrap())
    }

    fn vxlan(sn: &str, ip: [u8; 4]) -> Lease {
        let mut l = lease(sn, ip);
        l.attrs.backend = BackendAttrs::Vxlan {
            v4: Some(VxlanBackendData {
                vni: 1,
                vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            }),
            v6: None,
        };
        l
    }

    #[test]
    fn validation_refuses_what_must_not_be_routed() {
        let r = rules(r#"{"Network":"10.244.0.0/17","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(r.check(&vxlan("10.244.7.0/24", [198, 18, 0, 2])), Ok(()));
        let outside = r.check(&vxlan("10.244.200.0/24", [198, 18, 0, 2]));
        assert!(
            matches!(outside, Err(Invalid::OutsideNetwork { .. })),
            "{outside:?}"
        );
        let host_bits = r.check(&vxlan("10.244.117.7/24", [198, 18, 0, 2]));
        assert!(
            matches!(host_bits, Err(Invalid::NotAligned { .. })),
            "{host_bits:?}"
        );
        let len = r.check(&vxlan("10.244.8.0/25", [198, 18, 0, 2]));
        assert!(
            matches!(len, Err(Invalid::WrongLength { want: 24, .. })),
            "{len:?}"
        );
        for ip in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            let e = r.check(&vxlan("10.244.7.0/24", ip)).unwrap_err();
            assert!(
                matches!(
                    e,
                    Invalid::BadPublicIp {
                        field: "PublicIP",
                        ..
                    }
                ),
                "{e}"
            );
        }
        let mut no_vtep = vxlan("10.244.7.0/24", [198, 18, 0, 2]);
        no_vtep.attrs.backend = BackendAttrs::Vxlan { v4: None, v6: None };
        assert_eq!(
            r.check(&no_vtep),
            Err(Invalid::MissingVtep {
                family: "IPv4",
                field: "BackendData"
            })
        );
        // Kube mode ignores SubnetLen (the controller manager sizes pod CIDRs).
        assert_eq!(
            r.clone()
                .any_length()
                .check(&vxlan("10.244.8.0/25", [198, 18, 0, 2])),
            Ok(())
        );
    }

    #[test]
    fn validation_of_the_ipv6_half() {
        let r = rules(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56",
                "Backend":{"Type":"vxlan"}}"#,
        );
        let mut l = vxlan("10.244.7.0/24", [198, 18, 0, 2]);
        assert_eq!(r.check(&l), Ok(()), "an IPv4-only peer is fine");
        l.ipv6_subnet = Some("fd00:10:244:7::/64".parse().unwrap());
        l.attrs.public_ipv6 = Some("fd00:198::2".parse().unwrap());
        assert_eq!(r.check(&l), Ok(()));
        l.ipv6_subnet = Some("fd00:10:245:7::/64".parse().unwrap());
        assert!(matches!(
            r.check(&l),
            Err(Invalid::OutsideNetwork { family: "IPv6", .. })
        ));
        l.ipv6_subnet = Some("fd00:10:244:7::1/64".parse().unwrap());
        assert!(matches!(
            r.check(&l),
            Err(Invalid::NotAligned { family: "IPv6", .. })
        ));
        l.ipv6_subnet = Some("fd00:10:244:7::/64".parse().unwrap());
        for ip in ["::", "::1", "ff02::1"] {
            l.attrs.public_ipv6 = Some(ip.parse().unwrap());
            assert!(
                matches!(
                    r.check(&l),
                    Err(Invalid::BadPublicIp {
                        field: "PublicIPv6",
                        ..
                    })
                ),
                "{ip}"
            );
        }
    }

    fn v6_only(sn6: &str, ip6: &str) -> Lease {
        let mut l = vxlan("10.244.0.0/24", [0, 0, 0, 0]);
        l.subnet = None;
        l.ipv6_subnet = Some(sn6.parse().unwrap());
        l.attrs.public_ip = std::net::Ipv4Addr::UNSPECIFIED;
        l.attrs.public_ipv6 = Some(ip6.parse().unwrap());
        l.attrs.backend = BackendAttrs::Vxlan {
            v4: None,
            v6: Some(VxlanBackendData {
                vni: 1,
                vtep_mac: MacAddr([2, 0, 0, 0, 0, 6]),
            }),
        };
        l
    }

    #[test]
    fn validation_of_an_ipv6_only_lease() {
        let r = rules(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56",
                "Backend":{"Type":"vxlan"}}"#,
        );
        let l = v6_only("fd00:10:244:7::/64", "fd00:198::2");
        assert_eq!(r.check(&l), Ok(()), "no IPv4 subnet, no PublicIP: fine");
        let mut no_subnet = l.clone();
        no_subnet.ipv6_subnet = None;
        assert_eq!(
            r.check(&no_subnet),
            Err(Invalid::MissingSubnet { family: "IPv6" })
        );
        let mut no_ip = l.clone();
        no_ip.attrs.public_ipv6 = None;
        assert_eq!(
            r.check(&no_ip),
            Err(Invalid::MissingPublicIp {
                field: "PublicIPv6"
            })
        );
        let mut no_vtep = l.clone();
        no_vtep.attrs.backend = BackendAttrs::Vxlan { v4: None, v6: None };
        assert_eq!(
            r.check(&no_vtep),
            Err(Invalid::MissingVtep {
                family: "IPv6",
                field: "BackendV6Data"
            })
        );
        // And an IPv4 network refuses a lease without an IPv4 subnet.
        let r4 = rules(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(r4.check(&l), Err(Invalid::MissingSubnet { family: "IPv4" }));
    }

    #[test]
    fn ipv6_only_peer_set_filters_own_by_ipv6_subnet() {
        let own = v6_only("fd00:10:244:1::/64", "fd00:198::1");
        let a = v6_only("fd00:10:244:2::/64", "fd00:198::2");
        let mut set = PeerSet::new(own.id());
        assert_eq!(set.apply(LeaseEvent::Added(own.clone())), vec![]);
        assert_eq!(
            set.apply(LeaseEvent::Added(a.clone())),
            vec![PeerChange::Add(a.clone())]
        );
        let gone = Lease::bare(None, a.ipv6_subnet);
        assert_eq!(
            set.apply(LeaseEvent::Removed(gone)),
            vec![PeerChange::Remove(a.clone())]
        );
        assert_eq!(
            set.apply(LeaseEvent::Snapshot(vec![own, a.clone()])),
            vec![PeerChange::Add(a)]
        );
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn skip_log_reports_each_bad_record_once() {
        let log = SkipLog::default();
        assert!(log.first_time("k", b"v"));
        assert!(!log.clone().first_time("k", b"v"));
        assert!(
            log.first_time("k", b"v2"),
            "a changed value is reported again"
        );
    }
}

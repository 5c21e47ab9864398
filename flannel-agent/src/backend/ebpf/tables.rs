//! Domain verbs over the maps: "this peer exists", "this peer is gone", "the peer set is
//! exactly this". The only code that knows the map encodings.

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key};
use flannel_common::{
    Counter, DatapathConfig, DropReason, Endpoint, EndpointKey, Peer, PeerKey, PeerStats, Route,
    names::MAX_PEERS, stats::PassReason,
};
use ipnetwork::Ipv4Network;

use super::loader::Datapath;

/// A peer as the datapath needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// The peer's underlay address.
    pub underlay: Ipv4Addr,
    /// The peer's pod subnet.
    pub subnet: Ipv4Network,
    /// The peer's VTEP MAC.
    pub vtep_mac: [u8; 6],
}

/// The peer-keyed maps' contents at one moment.
struct Snapshot {
    peers: BTreeMap<Ipv4Addr, Peer>,
    routes: BTreeMap<Ipv4Network, Route>,
}

/// Counters summed over CPUs, for logs, the demo and tests.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Per peer underlay address.
    pub peers: BTreeMap<Ipv4Addr, PeerStats>,
    /// Per drop reason name.
    pub drops: BTreeMap<&'static str, Counter>,
    /// Per pass reason name.
    pub passes: BTreeMap<&'static str, Counter>,
}

impl Datapath {
    /// Write this host's configuration (enables or disables both programs at once).
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapError> {
        self.config.set(0, cfg, 0)
    }

    /// The peers currently in the maps, with their slots.
    pub fn current_peers(&self) -> Result<BTreeMap<Ipv4Addr, Peer>, MapError> {
        let mut out = BTreeMap::new();
        for entry in self.peers.iter() {
            let (k, v) = entry?;
            out.insert(Ipv4Addr::from(k.addr), v);
        }
        Ok(out)
    }

    /// The routes currently in the map.
    pub fn current_routes(&self) -> Result<BTreeMap<Ipv4Network, Route>, MapError> {
        let mut out = BTreeMap::new();
        for entry in self.routes.iter() {
            let (k, v) = entry?;
            if let Ok(net) = Ipv4Network::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8) {
                out.insert(net, v);
            }
        }
        Ok(out)
    }

    /// Both peer-keyed maps as they are now, read once per operation.
    fn snapshot(&self) -> Result<Snapshot, MapError> {
        Ok(Snapshot {
            peers: self.current_peers()?,
            routes: self.current_routes()?,
        })
    }

    /// Add or update one peer.
    pub fn upsert_peer(&mut self, p: &PeerEntry) -> Result<(), MapError> {
        let mut snap = self.snapshot()?;
        self.upsert_in(p, &mut snap)
    }

    /// Add or update `p` against `snap` (kept in step), writing only what differs. The
    /// allow-list entry goes in before the route, so replies to the first encapsulated
    /// packet are already accepted.
    fn upsert_in(&mut self, p: &PeerEntry, snap: &mut Snapshot) -> Result<(), MapError> {
        let slot = match snap.peers.get(&p.underlay) {
            Some(existing) => existing.slot,
            None => {
                let slot = free_slot(&snap.peers).ok_or(MapError::OutOfBounds {
                    index: MAX_PEERS,
                    max_entries: MAX_PEERS,
                })?;
                self.reset_slot(slot)?;
                slot
            }
        };
        let peer = Peer {
            slot,
            subnet: p.subnet.network().octets(),
            prefix_len: u32::from(p.subnet.prefix()),
        };
        if snap.peers.get(&p.underlay) != Some(&peer) {
            let key = PeerKey {
                addr: p.underlay.octets(),
            };
            self.peers.insert(key, peer, 0)?;
            snap.peers.insert(p.underlay, peer);
        }
        // A peer that changed subnet leaves its old route behind: drop it.
        let stale: Vec<Ipv4Network> = snap
            .routes
            .iter()
            .filter(|(net, r)| r.peer_ip == p.underlay.octets() && **net != p.subnet)
            .map(|(net, _)| *net)
            .collect();
        for net in stale {
            ignore_missing(self.routes.remove(&route_key(net)))?;
            snap.routes.remove(&net);
        }
        let route = Route {
            peer_ip: p.underlay.octets(),
            vtep_mac: p.vtep_mac,
            flags: 0,
            peer_slot: slot,
        };
        if snap.routes.get(&p.subnet) != Some(&route) {
            self.routes.insert(&route_key(p.subnet), route, 0)?;
            snap.routes.insert(p.subnet, route);
        }
        Ok(())
    }

    /// Remove the peer owning `subnet`: route first (stop sending), then its allow-list
    /// entry unless another of its subnets is still routed.
    pub fn remove_peer(&mut self, subnet: Ipv4Network) -> Result<(), MapError> {
        let mut routes = self.current_routes()?;
        let Some(route) = routes.remove(&subnet) else {
            return Ok(());
        };
        ignore_missing(self.routes.remove(&route_key(subnet)))?;
        if !routes.values().any(|r| r.peer_ip == route.peer_ip) {
            ignore_missing(self.peers.remove(&PeerKey {
                addr: route.peer_ip,
            }))?;
        }
        Ok(())
    }

    /// Make the maps hold exactly `desired`: write what is missing or differs, delete
    /// every route and peer not in it. The maps are read once, whatever the peer count.
    pub fn reconcile(&mut self, desired: &[PeerEntry]) -> Result<(), MapError> {
        let mut snap = self.snapshot()?;
        for p in desired {
            self.upsert_in(p, &mut snap)?;
        }
        let wanted_routes: BTreeMap<Ipv4Network, [u8; 4]> = desired
            .iter()
            .map(|p| (p.subnet, p.underlay.octets()))
            .collect();
        for (net, route) in &snap.routes {
            if wanted_routes.get(net) != Some(&route.peer_ip) {
                ignore_missing(self.routes.remove(&route_key(*net)))?;
            }
        }
        let wanted_peers: std::collections::BTreeSet<Ipv4Addr> =
            desired.iter().map(|p| p.underlay).collect();
        for underlay in snap.peers.keys() {
            if !wanted_peers.contains(underlay) {
                ignore_missing(self.peers.remove(&PeerKey {
                    addr: underlay.octets(),
                }))?;
            }
        }
        Ok(())
    }

    /// Make the endpoints map hold exactly `desired` (local pod → direct delivery).
    pub fn set_endpoints(
        &mut self,
        desired: &BTreeMap<Ipv4Addr, Endpoint>,
    ) -> Result<(), MapError> {
        let current = self.current_endpoints()?;
        for (ip, ep) in desired {
            if current.get(ip) != Some(ep) {
                self.endpoints
                    .insert(EndpointKey { addr: ip.octets() }, ep, 0)?;
            }
        }
        for ip in current.keys().filter(|ip| !desired.contains_key(ip)) {
            ignore_missing(self.endpoints.remove(&EndpointKey { addr: ip.octets() }))?;
        }
        Ok(())
    }

    /// The endpoints map's contents.
    pub fn current_endpoints(&self) -> Result<BTreeMap<Ipv4Addr, Endpoint>, MapError> {
        let mut out = BTreeMap::new();
        for entry in self.endpoints.iter() {
            let (k, v) = entry?;
            out.insert(Ipv4Addr::from(k.addr), v);
        }
        Ok(out)
    }

    /// Sum the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, MapError> {
        let mut out = Counters::default();
        for (addr, peer) in self.current_peers()? {
            let per_cpu = self.peer_stats.get(&peer.slot, 0)?;
            let mut sum = PeerStats::default();
            for s in per_cpu.iter() {
                sum.tx_packets += s.tx_packets;
                sum.tx_bytes += s.tx_bytes;
                sum.rx_packets += s.rx_packets;
                sum.rx_bytes += s.rx_bytes;
            }
            out.peers.insert(addr, sum);
        }
        for reason in DropReason::ALL {
            out.drops.insert(
                reason.as_str(),
                sum_counter(&self.drops.get(&(reason as u32), 0)?),
            );
        }
        for reason in PassReason::ALL {
            out.passes.insert(
                reason.as_str(),
                sum_counter(&self.passes.get(&(reason as u32), 0)?),
            );
        }
        Ok(out)
    }

    /// Zero a stats slot before a new peer uses it.
    fn reset_slot(&mut self, slot: u32) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            })
        })?;
        let zeros = PerCpuValues::try_from(vec![PeerStats::default(); cpus]).map_err(|e| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "per-cpu values",
                io_error: e,
            })
        })?;
        self.peer_stats.set(slot, zeros, 0)
    }
}

fn sum_counter(values: &PerCpuValues<Counter>) -> Counter {
    values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

fn route_key(net: Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix()), net.network().octets())
}

fn free_slot(current: &BTreeMap<Ipv4Addr, Peer>) -> Option<u32> {
    (0..MAX_PEERS).find(|s| !current.values().any(|p| p.slot == *s))
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_slot_fills_holes_first() {
        let mut m = BTreeMap::new();
        let peer = |slot| Peer {
            slot,
            subnet: [0; 4],
            prefix_len: 24,
        };
        assert_eq!(free_slot(&m), Some(0));
        m.insert(Ipv4Addr::new(1, 0, 0, 1), peer(0));
        m.insert(Ipv4Addr::new(1, 0, 0, 2), peer(2));
        assert_eq!(free_slot(&m), Some(1));
    }
}

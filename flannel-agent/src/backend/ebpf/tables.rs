//! Domain verbs over the maps: "this peer exists", "this peer is gone", "the peer set is
//! exactly this". The only code that knows the map encodings.
//!
//! The maps are read whole only when the record of what was written is (re)built: at the
//! first update after load and on every reconcile. A lease event is applied as the
//! difference to the record: O(1) map operations, O(1) slot allocation. A periodic resync
//! reads them through a second set of descriptors ([`PeerMapsReader`]) on another thread
//! while lease events go on, then compares ([`Datapath::reconcile_with`]).

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
};

use aya::maps::{
    HashMap as BpfHashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuValues,
    lpm_trie::Key,
};
use flannel_common::{
    Counter, DatapathConfig, DropReason, Endpoint, EndpointKey, Peer, PeerKey, PeerStats, Route,
    maps::CONFIG_F_ANY_PEER,
    stats::PassReason,
    wire::{V4_MAPPED_PREFIX, is_v4_mapped, v4_mapped},
};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use tracing::{error, info, warn};

use super::{loader::Datapath, slots::Slots};

/// A peer as the datapath needs it, for one family: a dual-stack peer is two entries,
/// its IPv4 subnet behind its `PublicIP` and its IPv6 subnet behind its `PublicIPv6`
/// (each with its own slot and counters, as the kernel has one device per family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// The peer's underlay address: where its traffic is sent, and an address it sends
    /// from.
    pub underlay: IpAddr,
    /// The peer's pod subnet.
    pub subnet: IpNetwork,
    /// The peer's VTEP MAC.
    pub vtep_mac: [u8; 6],
    /// Other addresses the peer may send VXLAN from (kube mode: its node's addresses and
    /// public-ip annotations). Each gets an allow-list entry sharing the peer's slot, so
    /// its traffic is accepted and counted as the peer's.
    pub aliases: Vec<IpAddr>,
}

impl PeerEntry {
    /// A peer that sends only from `underlay`.
    pub fn new(
        underlay: impl Into<IpAddr>,
        subnet: impl Into<IpNetwork>,
        vtep_mac: [u8; 6],
    ) -> Self {
        Self {
            underlay: underlay.into(),
            subnet: subnet.into(),
            vtep_mac,
            aliases: Vec::new(),
        }
    }
}

/// Counters summed over CPUs, for logs, the demo and tests.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Per peer underlay IPv4 address.
    pub peers: BTreeMap<Ipv4Addr, PeerStats>,
    /// Per peer underlay IPv6 address (dual stack).
    pub peers6: BTreeMap<Ipv6Addr, PeerStats>,
    /// Per drop reason name.
    pub drops: BTreeMap<&'static str, Counter>,
    /// Per pass reason name.
    pub passes: BTreeMap<&'static str, Counter>,
    /// Per-flow fast path: fast vs kernel path, per `PathReason` name.
    pub paths: BTreeMap<&'static str, Counter>,
}

/// What this agent wrote into the peer-keyed maps: the maps' contents as far as it knows.
/// Built by reading the maps once (at the first update after load, and on every
/// reconcile); each lease event is then applied as the difference to it, so a peer event
/// costs a handful of map writes whatever the peer count.
#[derive(Debug)]
pub(super) struct Record {
    peers: HashMap<IpAddr, Peer>,
    routes: HashMap<IpNetwork, Route>,
    /// Peer underlay → the subnets routed to it (to know when its allow-list entry goes).
    routes_of: HashMap<IpAddr, BTreeSet<IpNetwork>>,
    /// Alias (another address a peer sends from) → the peer's underlay. Its allow-list
    /// entry is the peer's, slot included.
    alias_owner: HashMap<IpAddr, IpAddr>,
    /// Peer underlay → its aliases.
    aliases_of: HashMap<IpAddr, BTreeSet<IpAddr>>,
    slots: Slots,
    /// Peers that did not fit: carried by the kernel device alone until a slot frees up.
    overflow: BTreeMap<IpNetwork, PeerEntry>,
}

/// The peer-keyed maps as read at one moment.
pub struct MapContents {
    peers: BTreeMap<IpAddr, Peer>,
    routes: BTreeMap<IpNetwork, Route>,
}

/// The peer-keyed maps opened a second time (duplicated descriptors of the same kernel
/// maps), owned, so a resync can read thousands of entries on a blocking thread while the
/// agent's event loop keeps writing lease events through the [`Datapath`].
pub struct PeerMapsReader {
    peers: BpfHashMap<MapData, PeerKey, Peer>,
    routes: LpmTrie<MapData, [u8; 16], Route>,
}

impl PeerMapsReader {
    /// Read both maps whole (a few thousand syscalls per thousand peers).
    pub fn read(&self) -> Result<MapContents, MapError> {
        Ok(MapContents {
            peers: read_peers(&self.peers)?,
            routes: read_routes(&self.routes)?,
        })
    }
}

/// A second descriptor of `map`'s kernel map, as the map type `T`.
fn reopen<T: TryFrom<Map, Error = MapError>>(
    map: &MapData,
    wrap: fn(MapData) -> Map,
) -> Result<T, MapError> {
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error,
        })
    })?;
    T::try_from(wrap(MapData::from_fd(fd)?))
}

fn read_peers<T: Borrow<MapData>>(
    map: &BpfHashMap<T, PeerKey, Peer>,
) -> Result<BTreeMap<IpAddr, Peer>, MapError> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (k, v) = entry?;
        out.insert(addr_of(k.addr), v);
    }
    Ok(out)
}

fn read_routes<T: Borrow<MapData>>(
    map: &LpmTrie<T, [u8; 16], Route>,
) -> Result<BTreeMap<IpNetwork, Route>, MapError> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (k, v) = entry?;
        if let Some(net) = net_of(k.data(), k.prefix_len()) {
            out.insert(net, v);
        }
    }
    Ok(out)
}

impl Record {
    /// Bring `read` (taken while lease events went on) up to date for the subnets in
    /// `touched`: events wrote those entries after the read may have been taken, and this
    /// record holds what they wrote. Patched are the routes of the touched subnets and the
    /// allow-list entries of the peers they were or are routed to, with those peers'
    /// aliases (as the read and as the record know them). Everything else in the read is
    /// as the maps held it, so the comparison after repairs exactly what was wrong then.
    fn patch(&self, read: &mut MapContents, touched: &BTreeSet<IpNetwork>) {
        if touched.is_empty() {
            return;
        }
        let mut addrs: HashSet<IpAddr> = HashSet::new();
        for subnet in touched {
            for route in [read.routes.get(subnet), self.routes.get(subnet)]
                .into_iter()
                .flatten()
            {
                addrs.insert(addr_of(route.peer_ip));
            }
        }
        // Aliases share their peer's slot in the maps.
        let slots: HashSet<u32> = addrs
            .iter()
            .filter_map(|a| read.peers.get(a))
            .map(|p| p.slot)
            .collect();
        let sharing: Vec<IpAddr> = read
            .peers
            .iter()
            .filter(|(_, p)| slots.contains(&p.slot))
            .map(|(a, _)| *a)
            .collect();
        addrs.extend(sharing);
        let owners: Vec<IpAddr> = addrs.iter().copied().collect();
        for owner in owners {
            addrs.extend(self.aliases_of.get(&owner).into_iter().flatten().copied());
        }
        for addr in addrs {
            let now = self.peers.get(&addr).or_else(|| {
                self.alias_owner
                    .get(&addr)
                    .and_then(|owner| self.peers.get(owner))
            });
            match now {
                Some(p) => read.peers.insert(addr, *p),
                None => read.peers.remove(&addr),
            };
        }
        for subnet in touched {
            match self.routes.get(subnet) {
                Some(r) => read.routes.insert(*subnet, *r),
                None => read.routes.remove(subnet),
            };
        }
    }
}

/// The datapath's bookkeeping next to the map handles.
#[derive(Debug)]
pub struct TableState {
    /// Entries the peer-keyed maps hold (their `max_entries`).
    pub capacity: u32,
    record: Option<Record>,
    /// The configuration the agent asked for (without the overflow flag).
    config: Option<DatapathConfig>,
    /// The flags last written, so the overflow flag is rewritten only when it changes.
    written_flags: Option<u32>,
    /// How often the peer-keyed maps were read whole.
    full_reads: u64,
}

impl TableState {
    /// Bookkeeping for maps of `capacity` entries, not read yet.
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            record: None,
            config: None,
            written_flags: None,
            full_reads: 0,
        }
    }
}

/// Where an upserted peer ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In the maps: the programs carry it.
    Maps,
    /// The maps are full: the kernel device carries it (it always holds every peer).
    KernelOnly,
}

impl Datapath {
    /// Write this host's configuration (enables or disables both programs at once). While
    /// some peers did not fit the maps, `CONFIG_F_ANY_PEER` is added: the peers left out
    /// are the kernel device's (whose nftables guard still knows every peer).
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapError> {
        self.state.config = Some(*cfg);
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), MapError> {
        let Some(mut cfg) = self.state.config else {
            return Ok(());
        };
        if self.overflowing() {
            cfg.flags |= CONFIG_F_ANY_PEER;
        }
        self.config.set(0, cfg, 0)?;
        self.state.written_flags = Some(cfg.flags);
        Ok(())
    }

    fn overflowing(&self) -> bool {
        self.state
            .record
            .as_ref()
            .is_some_and(|r| !r.overflow.is_empty())
    }

    /// Entries the peer-keyed maps hold.
    pub fn capacity(&self) -> u32 {
        self.state.capacity
    }

    /// Peers left to the kernel device because the maps were full.
    pub fn overflowed(&self) -> Vec<PeerEntry> {
        self.state
            .record
            .as_ref()
            .map(|r| r.overflow.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many times the peer-keyed maps were read whole (at start and on reconcile only;
    /// tests check that peer events never do).
    pub fn full_reads(&self) -> u64 {
        self.state.full_reads
    }

    /// The IPv4 peers currently in the maps, with their slots.
    pub fn current_peers(&self) -> Result<BTreeMap<Ipv4Addr, Peer>, MapError> {
        Ok(self
            .all_peers()?
            .into_iter()
            .filter_map(|(a, p)| match a {
                IpAddr::V4(a) => Some((a, p)),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    /// The IPv6 peers currently in the maps, with their slots.
    pub fn current_peers6(&self) -> Result<BTreeMap<Ipv6Addr, Peer>, MapError> {
        Ok(self
            .all_peers()?
            .into_iter()
            .filter_map(|(a, p)| match a {
                IpAddr::V6(a) => Some((a, p)),
                IpAddr::V4(_) => None,
            })
            .collect())
    }

    /// The IPv4 routes currently in the map.
    pub fn current_routes(&self) -> Result<BTreeMap<Ipv4Network, Route>, MapError> {
        Ok(self
            .all_routes()?
            .into_iter()
            .filter_map(|(n, r)| match n {
                IpNetwork::V4(n) => Some((n, r)),
                IpNetwork::V6(_) => None,
            })
            .collect())
    }

    /// The IPv6 routes currently in the map.
    pub fn current_routes6(&self) -> Result<BTreeMap<Ipv6Network, Route>, MapError> {
        Ok(self
            .all_routes()?
            .into_iter()
            .filter_map(|(n, r)| match n {
                IpNetwork::V6(n) => Some((n, r)),
                IpNetwork::V4(_) => None,
            })
            .collect())
    }

    /// Every peer in the maps, both families.
    pub fn all_peers(&self) -> Result<BTreeMap<IpAddr, Peer>, MapError> {
        read_peers(&self.peers)
    }

    /// Every route in the map, both families.
    pub fn all_routes(&self) -> Result<BTreeMap<IpNetwork, Route>, MapError> {
        read_routes(&self.routes)
    }

    /// The peer-keyed maps through descriptors of their own, to read off the event path.
    pub fn peer_maps_reader(&self) -> Result<PeerMapsReader, MapError> {
        Ok(PeerMapsReader {
            peers: reopen(self.peers.map(), Map::HashMap)?,
            routes: reopen(self.routes.map(), Map::LpmTrie)?,
        })
    }

    /// Read both peer-keyed maps and rebuild the record from them.
    fn read_record(&mut self) -> Result<(Record, MapContents), MapError> {
        let read = MapContents {
            peers: self.all_peers()?,
            routes: self.all_routes()?,
        };
        Ok((self.record_from(&read), read))
    }

    /// Rebuild the record from what the maps were read to hold. Peers whose slot is out of
    /// range or shared are left out of the record, so the next upsert gives them a new
    /// slot (overwriting their entries).
    fn record_from(&mut self, read: &MapContents) -> Record {
        self.state.full_reads += 1;
        let (peers, routes) = (&read.peers, &read.routes);
        let capacity = self.state.capacity;
        // Routed-to addresses first: an alias shares its peer's slot, so whichever of two
        // entries a route names is the peer, the other its alias.
        let routed: HashSet<IpAddr> = routes.values().map(|r| addr_of(r.peer_ip)).collect();
        let mut order: Vec<(&IpAddr, &Peer)> = peers.iter().collect();
        order.sort_by_key(|(a, _)| !routed.contains(a));
        let mut owner_of_slot: HashMap<u32, (IpAddr, Peer)> = HashMap::new();
        let mut valid: HashMap<IpAddr, Peer> = HashMap::new();
        let mut alias_owner = HashMap::new();
        let mut aliases_of: HashMap<IpAddr, BTreeSet<IpAddr>> = HashMap::new();
        for (addr, p) in order {
            if p.slot >= capacity {
                continue;
            }
            match owner_of_slot.get(&p.slot) {
                None => {
                    owner_of_slot.insert(p.slot, (*addr, *p));
                    valid.insert(*addr, *p);
                }
                // Same slot, same subnet: an alias of that peer. Anything else sharing a
                // slot is left out, so the next upsert rewrites it.
                Some((owner, op)) if op == p => {
                    alias_owner.insert(*addr, *owner);
                    aliases_of.entry(*owner).or_default().insert(*addr);
                }
                Some(_) => {}
            }
        }
        let mut record = Record {
            slots: Slots::with_used(capacity, valid.values().map(|p| p.slot)),
            peers: valid,
            routes: HashMap::new(),
            routes_of: HashMap::new(),
            alias_owner,
            aliases_of,
            overflow: self
                .state
                .record
                .take()
                .map(|r| r.overflow)
                .unwrap_or_default(),
        };
        for (net, route) in routes {
            let underlay = addr_of(route.peer_ip);
            if record.peers.get(&underlay).map(|p| p.slot) == Some(route.peer_slot) {
                record.routes.insert(*net, *route);
                record.routes_of.entry(underlay).or_default().insert(*net);
            }
        }
        record
    }

    /// The record, read from the maps the first time it is needed.
    fn take_record(&mut self) -> Result<Record, MapError> {
        match self.state.record.take() {
            Some(r) => Ok(r),
            None => Ok(self.read_record()?.0),
        }
    }

    /// Add or update one peer, writing only what differs from the record.
    pub fn upsert_peer(&mut self, p: &PeerEntry) -> Result<Placement, MapError> {
        let mut rec = self.take_record()?;
        let r = self.upsert_in(p, &mut rec);
        self.finish(rec)?;
        r
    }

    /// Remove the peer owning `subnet`: route first (stop sending), then its allow-list
    /// entry unless another of its subnets is still routed. A freed slot goes to a peer
    /// that did not fit before.
    pub fn remove_peer(&mut self, subnet: IpNetwork) -> Result<(), MapError> {
        let mut rec = self.take_record()?;
        let mut r = self.remove_in(subnet, &mut rec);
        if r.is_ok() {
            r = self.place_overflow(&mut rec);
        }
        self.finish(rec)?;
        r
    }

    /// Make the maps hold exactly `desired`: read them once, write what is missing or
    /// differs, delete every route and peer not in it, and start the record afresh from
    /// the result. Callable at any time (start, resync, a repair after tampering).
    pub fn reconcile(&mut self, desired: &[PeerEntry]) -> Result<(), MapError> {
        let (mut rec, read) = self.read_record()?;
        rec.overflow.clear();
        let r = self.reconcile_in(desired, &mut rec, &read);
        self.finish(rec)?;
        r
    }

    /// [`reconcile`](Self::reconcile) against `read`, taken earlier by a
    /// [`PeerMapsReader`] while lease events went on. The subnets in `touched` were
    /// changed by those events: the read may predate them, so their entries are taken
    /// from the record (what the events wrote) rather than from the read, and are left as
    /// the events made them. Without a record (nothing written yet) the maps are read
    /// now.
    pub fn reconcile_with(
        &mut self,
        desired: &[PeerEntry],
        mut read: MapContents,
        touched: &BTreeSet<IpNetwork>,
    ) -> Result<(), MapError> {
        let Some(current) = self.state.record.as_ref() else {
            return self.reconcile(desired);
        };
        current.patch(&mut read, touched);
        let mut rec = self.record_from(&read);
        rec.overflow.clear();
        let r = self.reconcile_in(desired, &mut rec, &read);
        self.finish(rec)?;
        r
    }

    fn reconcile_in(
        &mut self,
        desired: &[PeerEntry],
        rec: &mut Record,
        read: &MapContents,
    ) -> Result<(), MapError> {
        let (peers, routes) = (&read.peers, &read.routes);
        let wanted_routes: HashMap<IpNetwork, IpAddr> =
            desired.iter().map(|p| (p.subnet, p.underlay)).collect();
        let wanted_peers: HashSet<IpAddr> = desired.iter().map(|p| p.underlay).collect();
        let wanted_aliases: HashSet<IpAddr> = desired
            .iter()
            .flat_map(|p| p.aliases.iter().copied())
            .collect();
        // Removals first, so their slots are free for the additions.
        for (net, route) in routes {
            if wanted_routes.get(net) != Some(&addr_of(route.peer_ip)) {
                ignore_missing(self.routes.remove(&route_key(*net)))?;
                if let Some(r) = rec.routes.remove(net) {
                    forget_route(rec, addr_of(r.peer_ip), *net);
                }
            }
        }
        for (underlay, peer) in peers {
            if wanted_peers.contains(underlay) {
                continue;
            }
            // No longer a peer of its own; an address still listed as some peer's alias
            // keeps its entry, which that peer's upsert below rewrites.
            if rec.peers.get(underlay) == Some(peer) {
                rec.peers.remove(underlay);
                rec.slots.release(peer.slot);
                for alias in rec.aliases_of.remove(underlay).unwrap_or_default() {
                    rec.alias_owner.remove(&alias);
                }
            }
            if !wanted_aliases.contains(underlay) {
                ignore_missing(self.peers.remove(&PeerKey {
                    addr: key_of(*underlay),
                }))?;
                forget_alias(rec, *underlay);
            }
        }
        for p in desired {
            self.upsert_in(p, rec)?;
        }
        Ok(())
    }

    /// Put the record back and bring the overflow flag in step with it.
    fn finish(&mut self, rec: Record) -> Result<(), MapError> {
        let (capacity, left_out) = (self.state.capacity, rec.overflow.len());
        self.state.record = Some(rec);
        let (Some(cfg), Some(written)) = (self.state.config, self.state.written_flags) else {
            return Ok(());
        };
        let overflowing = left_out > 0;
        let want = cfg.flags | if overflowing { CONFIG_F_ANY_PEER } else { 0 };
        if want == written {
            return Ok(());
        }
        if overflowing {
            error!(
                capacity,
                peers_left_out = left_out,
                "eBPF peer maps are full: the peers left out are carried by the kernel VXLAN \
                 device, and VXLAN from addresses not in the maps goes to it (its peer guard \
                 still applies); raise --ebpf-max-peers"
            );
        } else {
            info!(capacity, "every peer fits the eBPF maps again");
        }
        self.write_config()
    }

    /// Give slots freed by removals to peers that did not fit before.
    fn place_overflow(&mut self, rec: &mut Record) -> Result<(), MapError> {
        while rec.slots.available() > 0 {
            let Some((_, p)) = rec.overflow.pop_first() else {
                break;
            };
            if self.upsert_in(&p, rec)? == Placement::KernelOnly {
                break;
            }
        }
        Ok(())
    }

    /// Add or update `p` against the record (kept in step), writing only what differs.
    /// The allow-list entry goes in before the route, so replies to the first encapsulated
    /// packet are already accepted.
    fn upsert_in(&mut self, p: &PeerEntry, rec: &mut Record) -> Result<Placement, MapError> {
        // The subnet moved to another host (or the host to another address): the old
        // owner's route goes first, and with it the old owner if that was its last route,
        // which may free the slot the new one needs. Meanwhile the subnet takes the
        // kernel device, which already has the new address.
        if rec
            .routes
            .get(&p.subnet)
            .is_some_and(|r| r.peer_ip != key_of(p.underlay))
        {
            self.remove_route(p.subnet, rec)?;
        }
        // The address was another peer's alias: it is a peer of its own now.
        if rec.alias_owner.contains_key(&p.underlay) {
            forget_alias(rec, p.underlay);
        }
        let existing = rec.peers.get(&p.underlay).copied();
        let slot = match existing {
            Some(e) => e.slot,
            None => match rec.slots.take() {
                Some(slot) => {
                    if let Err(e) = self.reset_slot(slot) {
                        rec.slots.release(slot);
                        return Err(e);
                    }
                    slot
                }
                None => return self.leave_out(p, rec),
            },
        };
        let peer = Peer {
            slot,
            subnet: key_of(p.subnet.network()),
            prefix_len: prefix_of(p.subnet),
        };
        if existing != Some(peer) {
            let key = PeerKey {
                addr: key_of(p.underlay),
            };
            match self.peers.insert(key, peer, 0) {
                Ok(()) => {}
                Err(e) if existing.is_none() && is_full(&e) => {
                    rec.slots.release(slot);
                    return self.leave_out(p, rec);
                }
                Err(e) => {
                    if existing.is_none() {
                        rec.slots.release(slot);
                    }
                    return Err(e);
                }
            }
            rec.peers.insert(p.underlay, peer);
        }
        let aliases_fit = self.sync_aliases(p, peer, existing != Some(peer), rec)?;
        // A peer that changed subnet leaves its old route behind: drop it.
        let stale: Vec<IpNetwork> = rec
            .routes_of
            .get(&p.underlay)
            .map(|nets| nets.iter().filter(|n| **n != p.subnet).copied().collect())
            .unwrap_or_default();
        for net in stale {
            self.remove_route(net, rec)?;
        }
        let route = Route {
            peer_ip: key_of(p.underlay),
            vtep_mac: p.vtep_mac,
            flags: 0,
            peer_slot: slot,
        };
        let old = rec.routes.get(&p.subnet).copied();
        if old != Some(route) {
            match self.routes.insert(&route_key(p.subnet), route, 0) {
                Ok(()) => {}
                // The trie is full (only when it is smaller than the peers map): the peer
                // is accepted on ingress, its egress takes the kernel device.
                Err(e) if old.is_none() && is_full(&e) => {
                    rec.overflow.insert(p.subnet, p.clone());
                    return Ok(Placement::KernelOnly);
                }
                Err(e) => return Err(e),
            }
            rec.routes.insert(p.subnet, route);
            rec.routes_of
                .entry(p.underlay)
                .or_default()
                .insert(p.subnet);
        }
        if !aliases_fit {
            // No room for an alias: while it is out, VXLAN from unknown addresses goes to
            // the kernel device, whose peer guard knows every alias.
            rec.overflow.insert(p.subnet, p.clone());
            return Ok(Placement::KernelOnly);
        }
        rec.overflow.remove(&p.subnet);
        Ok(Placement::Maps)
    }

    /// Make the allow-list hold `p`'s aliases with the peer's entry `peer` (rewritten
    /// when `changed`), and none it no longer lists. `false` when the map had no room for
    /// one of them.
    fn sync_aliases(
        &mut self,
        p: &PeerEntry,
        peer: Peer,
        changed: bool,
        rec: &mut Record,
    ) -> Result<bool, MapError> {
        let want = wanted_aliases(p, rec);
        let have = rec.aliases_of.get(&p.underlay).cloned().unwrap_or_default();
        for gone in have.difference(&want) {
            ignore_missing(self.peers.remove(&PeerKey {
                addr: key_of(*gone),
            }))?;
            forget_alias(rec, *gone);
        }
        let mut fits = true;
        for alias in &want {
            if have.contains(alias) && !changed {
                continue;
            }
            match self.peers.insert(
                PeerKey {
                    addr: key_of(*alias),
                },
                peer,
                0,
            ) {
                Ok(()) => {
                    rec.alias_owner.insert(*alias, p.underlay);
                    rec.aliases_of.entry(p.underlay).or_default().insert(*alias);
                }
                Err(e) if is_full(&e) => fits = false,
                Err(e) => return Err(e),
            }
        }
        Ok(fits)
    }

    /// The maps are full: `p` stays with the kernel device. Whatever the maps still say for
    /// its subnet (an earlier owner) must not outlive the change.
    fn leave_out(&mut self, p: &PeerEntry, rec: &mut Record) -> Result<Placement, MapError> {
        if rec.routes.contains_key(&p.subnet) {
            self.remove_route(p.subnet, rec)?;
        }
        if rec.overflow.is_empty() {
            warn!(subnet = %p.subnet, underlay = %p.underlay, capacity = self.state.capacity,
                  "eBPF peer maps full; this peer is carried by the kernel VXLAN device");
        }
        rec.overflow.insert(p.subnet, p.clone());
        Ok(Placement::KernelOnly)
    }

    fn remove_in(&mut self, subnet: IpNetwork, rec: &mut Record) -> Result<(), MapError> {
        if rec.overflow.remove(&subnet).is_some() || !rec.routes.contains_key(&subnet) {
            return Ok(());
        }
        self.remove_route(subnet, rec)
    }

    /// Delete the route for `subnet`, and its peer's allow-list entry if that was the
    /// peer's last route.
    fn remove_route(&mut self, subnet: IpNetwork, rec: &mut Record) -> Result<(), MapError> {
        let Some(route) = rec.routes.get(&subnet).copied() else {
            return Ok(());
        };
        ignore_missing(self.routes.remove(&route_key(subnet)))?;
        rec.routes.remove(&subnet);
        self.forget_route_of(addr_of(route.peer_ip), subnet, rec)
    }

    /// `subnet` is no longer routed to `underlay`: drop the peer when nothing else is.
    fn forget_route_of(
        &mut self,
        underlay: IpAddr,
        subnet: IpNetwork,
        rec: &mut Record,
    ) -> Result<(), MapError> {
        if !forget_route(rec, underlay, subnet) {
            return Ok(());
        }
        if let Some(peer) = rec.peers.get(&underlay).copied() {
            for alias in rec.aliases_of.remove(&underlay).unwrap_or_default() {
                ignore_missing(self.peers.remove(&PeerKey {
                    addr: key_of(alias),
                }))?;
                rec.alias_owner.remove(&alias);
            }
            ignore_missing(self.peers.remove(&PeerKey {
                addr: key_of(underlay),
            }))?;
            rec.peers.remove(&underlay);
            rec.slots.release(peer.slot);
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
        // A peer's aliases share its slot: count it once, under the address routes name.
        let routed: HashSet<IpAddr> = self
            .all_routes()?
            .values()
            .map(|r| addr_of(r.peer_ip))
            .collect();
        let mut peers: Vec<(IpAddr, Peer)> = self.all_peers()?.into_iter().collect();
        peers.sort_by_key(|(a, _)| !routed.contains(a));
        let mut seen = HashSet::new();
        for (addr, peer) in peers {
            if !seen.insert(peer.slot) {
                continue;
            }
            let per_cpu = self.peer_stats.get(&peer.slot, 0)?;
            let mut sum = PeerStats::default();
            for s in per_cpu.iter() {
                sum.tx_packets += s.tx_packets;
                sum.tx_bytes += s.tx_bytes;
                sum.rx_packets += s.rx_packets;
                sum.rx_bytes += s.rx_bytes;
            }
            match addr {
                IpAddr::V4(a) => out.peers.insert(a, sum),
                IpAddr::V6(a) => out.peers6.insert(a, sum),
            };
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
        out.paths = self.path_counters()?;
        Ok(out)
    }

    /// VXLAN the known-peer check dropped, by outer source (either family): packets and
    /// bytes.
    pub fn strangers(&self) -> Result<BTreeMap<IpAddr, Counter>, MapError> {
        let mut out = BTreeMap::new();
        for entry in self.strangers.iter() {
            let (k, per_cpu) = entry?;
            out.insert(addr_of(k.addr), sum_counter(&per_cpu));
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

/// An address as the peer-keyed maps hold it: IPv6 as is, IPv4 IPv4-mapped.
fn key_of(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address a map key (or `Route::peer_ip`) holds.
pub fn addr_of(k: [u8; 16]) -> IpAddr {
    if is_v4_mapped(&k) {
        IpAddr::V4(Ipv4Addr::new(k[12], k[13], k[14], k[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(k))
    }
}

/// A subnet's prefix length over 128 bits (IPv4 as mapped).
fn prefix_of(net: IpNetwork) -> u32 {
    match net {
        IpNetwork::V4(n) => V4_MAPPED_PREFIX + u32::from(n.prefix()),
        IpNetwork::V6(n) => u32::from(n.prefix()),
    }
}

/// The pod subnet a peer entry names (its family's: IPv4 subnets are held mapped).
pub fn peer_subnet(p: &Peer) -> Option<IpNetwork> {
    net_of(p.subnet, p.prefix_len)
}

/// The subnet a route key holds.
fn net_of(data: [u8; 16], prefix: u32) -> Option<IpNetwork> {
    match addr_of(data) {
        IpAddr::V4(a) => {
            let p = u8::try_from(prefix.checked_sub(V4_MAPPED_PREFIX)?).ok()?;
            Ipv4Network::new(a, p).ok().map(IpNetwork::V4)
        }
        IpAddr::V6(a) => Ipv6Network::new(a, u8::try_from(prefix).ok()?)
            .ok()
            .map(IpNetwork::V6),
    }
}

fn route_key(net: IpNetwork) -> Key<[u8; 16]> {
    Key::new(prefix_of(net), key_of(net.network()))
}

/// The aliases `p` should have: its own list minus its underlay and addresses that are
/// peers of their own or another peer's aliases (first come keeps it).
fn wanted_aliases(p: &PeerEntry, rec: &Record) -> BTreeSet<IpAddr> {
    p.aliases
        .iter()
        .copied()
        .filter(|a| {
            *a != p.underlay
                && !rec.peers.contains_key(a)
                && rec.alias_owner.get(a).is_none_or(|o| *o == p.underlay)
        })
        .collect()
}

/// `alias` is no longer anyone's alias (its map entry is the caller's business).
fn forget_alias(rec: &mut Record, alias: IpAddr) {
    if let Some(owner) = rec.alias_owner.remove(&alias)
        && let Some(set) = rec.aliases_of.get_mut(&owner)
    {
        set.remove(&alias);
        if set.is_empty() {
            rec.aliases_of.remove(&owner);
        }
    }
}

/// Drop `subnet` from `underlay`'s routed subnets; `true` when none are left.
fn forget_route(rec: &mut Record, underlay: IpAddr, subnet: IpNetwork) -> bool {
    let Some(nets) = rec.routes_of.get_mut(&underlay) else {
        return true;
    };
    nets.remove(&subnet);
    if nets.is_empty() {
        rec.routes_of.remove(&underlay);
        return true;
    }
    false
}

/// Whether a map update failed because the map is full (hash: E2BIG, LPM trie: ENOSPC).
fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

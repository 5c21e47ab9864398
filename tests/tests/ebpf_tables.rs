//! The agent's map bookkeeping against the real kernel maps: peer events are applied as
//! differences without reading the maps, the maps are sized from configuration, a full
//! map leaves the excess to the kernel device (and says so in the config flag), and
//! pinned maps of another size are replaced on restart with their contents carried over.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::MapInfo;
use flannel_agent::backend::ebpf::{Datapath, PeerEntry, PinLayout, Placement, load_sized};
use flannel_common::{
    DatapathConfig,
    maps::{CONFIG_F_ANY_PEER, CONFIG_F_ENABLED},
    names,
};
use ipnetwork::Ipv4Network;
use tokio_util::sync::CancellationToken;

/// A pin root under /sys/fs/bpf for one test, removed on drop.
struct Pins(PathBuf);

impl Pins {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/flannel-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `f` on a thread in a fresh network namespace with a veth pair `fl0`/`fl1` to attach
/// to; namespace and links vanish with the thread.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which owns nothing else.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        let ok = Command::new("sh")
            .args([
                "-c",
                "ip link add fl0 type veth peer name fl1 && ip link set fl0 up && ip link set fl1 up",
            ])
            .status()
            .expect("sh")
            .success();
        assert!(ok, "veth pair");
        f()
    })
    .join()
    .expect("test thread panicked")
}

fn load(pins: &PathBuf, capacity: u32) -> Datapath {
    let dp = load_sized(
        &PinLayout::new(pins),
        flannel_agent::backend::ebpf::Devices {
            vxlan: Some("fl0"),
            vxlan6: None,
            uplink: "fl1",
        },
        Some(capacity),
        &CancellationToken::new(),
    )
    .unwrap_or_else(|e| panic!("load: {e}"));
    assert_eq!(dp.capacity(), capacity);
    dp
}

fn peer(i: u8) -> PeerEntry {
    PeerEntry::new(
        Ipv4Addr::new(198, 18, 0, 10 + i),
        Ipv4Network::new(Ipv4Addr::new(10, 244, i, 0), 24).unwrap(),
        [0x02, 0xbb, 0, 0, 0, i],
    )
}

fn config() -> DatapathConfig {
    DatapathConfig {
        flags: CONFIG_F_ENABLED,
        vni: 1,
        port: 8472,
        local_ip: [198, 18, 0, 1],
        ..Default::default()
    }
}

fn flags(dp: &Datapath) -> u32 {
    dp.config.get(&0, 0).expect("config").flags
}

fn max_entries(pins: &PathBuf, map: &str) -> u32 {
    MapInfo::from_pin(PinLayout::new(pins).map(map))
        .expect("map info")
        .max_entries()
}

#[test]
fn peer_events_are_differences_and_full_maps_leave_the_excess_to_the_kernel() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = Pins::new("tables");
    let root = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = load(&root, 4);
        for map in names::PEER_MAPS {
            assert_eq!(max_entries(&root, map), 4, "{map} sized from the capacity");
        }
        dp.set_config(&config()).expect("config");

        // Six peers for four slots: four in the maps, two left to the kernel device, and
        // the decap program told to hand unknown peers to it.
        let six: Vec<PeerEntry> = (1..=6).map(peer).collect();
        dp.reconcile(&six).expect("reconcile");
        assert_eq!(dp.full_reads(), 1);
        let peers = dp.all_peers().expect("peers");
        assert_eq!(peers.len(), 4, "{peers:?}");
        let mut slots: Vec<u32> = peers.values().map(|p| p.slot).collect();
        slots.sort_unstable();
        assert_eq!(slots, vec![0, 1, 2, 3], "every slot used once");
        assert_eq!(dp.all_routes().expect("routes").len(), 4);
        assert_eq!(dp.overflowed(), vec![peer(5), peer(6)]);
        assert_ne!(flags(&dp) & CONFIG_F_ANY_PEER, 0);
        assert_ne!(flags(&dp) & CONFIG_F_ENABLED, 0);

        // Events touch only what differs, and never read the maps whole.
        let mut moved = peer(2);
        moved.vtep_mac = [0x02, 0xcc, 0, 0, 0, 2];
        assert_eq!(dp.upsert_peer(&moved).expect("upsert"), Placement::Maps);
        let route = dp.all_routes().expect("routes")[&moved.subnet];
        assert_eq!(route.vtep_mac, moved.vtep_mac);
        assert_eq!(
            dp.upsert_peer(&peer(7)).expect("upsert"),
            Placement::KernelOnly
        );
        // A freed slot goes to a peer that did not fit.
        dp.remove_peer(peer(1).subnet).expect("remove");
        let peers = dp.all_peers().expect("peers");
        assert!(!peers.contains_key(&peer(1).underlay));
        assert!(peers.contains_key(&peer(5).underlay), "{peers:?}");
        assert_eq!(peers[&peer(5).underlay].slot, 0, "the freed slot, reused");
        assert_eq!(dp.overflowed(), vec![peer(6), peer(7)]);
        // A peer that changed its underlay address: old allow-list entry and route go.
        let mut readdressed = peer(3);
        readdressed.underlay = Ipv4Addr::new(198, 18, 1, 3).into();
        dp.upsert_peer(&readdressed).expect("upsert");
        let peers = dp.all_peers().expect("peers");
        assert!(!peers.contains_key(&peer(3).underlay), "{peers:?}");
        assert!(peers.contains_key(&readdressed.underlay));
        assert_eq!(
            flannel_agent::backend::ebpf::addr_of(
                dp.all_routes().expect("routes")[&readdressed.subnet].peer_ip
            ),
            readdressed.underlay
        );
        // Removing everything left in the maps places the rest, then the flag clears.
        for i in [2, 3, 4, 5, 6] {
            dp.remove_peer(peer(i).subnet).expect("remove");
        }
        assert_eq!(dp.overflowed(), Vec::new());
        assert_eq!(dp.all_peers().expect("peers").len(), 1, "peer 7 only");
        assert_eq!(flags(&dp) & CONFIG_F_ANY_PEER, 0);
        assert_eq!(dp.full_reads(), 1, "no event read the maps whole");

        // Someone deletes an entry behind our back: reconcile reads the maps and repairs.
        dp.peers
            .remove(&flannel_common::PeerKey {
                addr: match peer(7).underlay {
                    std::net::IpAddr::V4(a) => flannel_common::wire::v4_mapped(a.octets()),
                    std::net::IpAddr::V6(a) => a.octets(),
                },
            })
            .expect("tamper");
        dp.reconcile(&[peer(7)]).expect("reconcile");
        assert_eq!(dp.full_reads(), 2);
        assert!(
            dp.all_peers()
                .expect("peers")
                .contains_key(&peer(7).underlay)
        );
    });
}

/// A peer that sends from more addresses than its lease's (kube mode: its node's
/// addresses): every one is on the allow-list with the peer's own entry (slot, subnet),
/// follows the peer's changes, goes with it, survives a reconcile that re-reads the maps,
/// and never makes the peer count twice.
#[test]
fn a_peers_other_sending_addresses_share_its_allow_list_entry() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = Pins::new("aliases");
    let root = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = load(&root, 8);
        dp.set_config(&config()).expect("config");
        let second = std::net::IpAddr::from(Ipv4Addr::new(198, 19, 0, 11));
        let third = std::net::IpAddr::from(Ipv4Addr::new(198, 19, 0, 111));
        let mut p1 = peer(1);
        p1.aliases = vec![second, third];
        dp.upsert_peer(&p1).expect("upsert");
        dp.upsert_peer(&peer(2)).expect("upsert");
        let peers = dp.all_peers().expect("peers");
        assert_eq!(peers.len(), 4, "{peers:?}");
        assert_eq!(peers[&second], peers[&p1.underlay]);
        assert_eq!(peers[&third], peers[&p1.underlay]);
        assert_eq!(
            dp.counters().expect("counters").peers.len(),
            2,
            "one line per peer"
        );

        // The peer stops listing one; another peer's own address is never an alias.
        p1.aliases = vec![second, peer(2).underlay];
        dp.upsert_peer(&p1).expect("upsert");
        let peers = dp.all_peers().expect("peers");
        assert!(!peers.contains_key(&third), "{peers:?}");
        assert_ne!(peers[&peer(2).underlay].slot, peers[&p1.underlay].slot);
        assert_eq!(dp.full_reads(), 1);

        // A reconcile re-reads the maps, tells the alias from the peer, keeps both.
        dp.reconcile(&[p1.clone(), peer(2)]).expect("reconcile");
        let again = dp.all_peers().expect("peers");
        assert_eq!(again, peers);
        // And one that no longer lists the alias removes it.
        let mut plain = p1.clone();
        plain.aliases.clear();
        dp.reconcile(&[plain, peer(2)]).expect("reconcile");
        assert!(!dp.all_peers().expect("peers").contains_key(&second));

        // The peer goes: its aliases go with it.
        dp.upsert_peer(&p1).expect("upsert");
        assert!(dp.all_peers().expect("peers").contains_key(&second));
        dp.remove_peer(p1.subnet).expect("remove");
        let left = dp.all_peers().expect("peers");
        assert_eq!(
            left.keys().copied().collect::<Vec<_>>(),
            vec![peer(2).underlay]
        );
    });
}

/// A resync reads the maps on another thread while lease events go on: the comparison
/// afterwards repairs what was wrong when it read (a route and an allow-list entry
/// deleted behind the agent's back) and leaves the subnets events changed since (an add
/// that took a slot a removal freed, a removal of a peer with an alias, a new MAC) as the
/// events made them: the stale read neither undoes them nor reads the maps again.
#[test]
fn a_resync_read_leaves_subnets_events_touched_since() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = Pins::new("stale");
    let root = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = load(&root, 32);
        dp.set_config(&config()).expect("config");
        let alias = std::net::IpAddr::from(Ipv4Addr::new(198, 19, 0, 15));
        let with_alias = |i: u8| {
            let mut p = peer(i);
            if i == 5 {
                p.aliases = vec![alias];
            }
            p
        };
        let first: Vec<PeerEntry> = (1..=20).map(with_alias).collect();
        dp.reconcile(&first).expect("reconcile");
        // Tampering before the read: the resync must repair both.
        dp.routes
            .remove(&aya::maps::lpm_trie::Key::new(
                flannel_common::wire::V4_MAPPED_PREFIX + 24,
                flannel_common::wire::v4_mapped([10, 244, 6, 0]),
            ))
            .expect("tamper route");
        dp.peers
            .remove(&flannel_common::PeerKey {
                addr: match peer(9).underlay {
                    std::net::IpAddr::V4(a) => flannel_common::wire::v4_mapped(a.octets()),
                    std::net::IpAddr::V6(a) => a.octets(),
                },
            })
            .expect("tamper peer");

        let reader = dp.peer_maps_reader().expect("reader");
        let read = std::thread::spawn(move || reader.read())
            .join()
            .expect("reader thread")
            .expect("read");
        let reads = dp.full_reads();
        let slot3 = dp.all_peers().expect("peers")[&peer(3).underlay].slot;

        // Events after the read.
        let mut new_mac = peer(4);
        new_mac.vtep_mac = [0x02, 0xcc, 0, 0, 0, 4];
        dp.remove_peer(peer(3).subnet).expect("remove");
        dp.upsert_peer(&peer(21)).expect("upsert");
        dp.upsert_peer(&new_mac).expect("upsert");
        dp.remove_peer(peer(5).subnet).expect("remove");
        let touched: std::collections::BTreeSet<ipnetwork::IpNetwork> =
            [3, 4, 5, 21].map(|i| peer(i).subnet).into();
        let evented = dp.all_peers().expect("peers");
        assert_eq!(
            evented[&peer(21).underlay].slot,
            slot3,
            "the new peer took the slot the removal freed"
        );

        let now: Vec<PeerEntry> = (1..=21)
            .filter(|i| ![3, 5].contains(i))
            .map(|i| if i == 4 { new_mac.clone() } else { peer(i) })
            .collect();
        dp.reconcile_with(&now, read, &touched)
            .expect("reconcile_with");
        assert_eq!(
            dp.full_reads(),
            reads + 1,
            "compared with the read, not re-read"
        );

        let routes = dp.all_routes().expect("routes");
        let peers = dp.all_peers().expect("peers");
        assert_eq!(routes.len(), now.len(), "{routes:?}");
        assert_eq!(peers.len(), now.len(), "{peers:?}");
        for p in &now {
            let r = routes
                .get(&p.subnet)
                .unwrap_or_else(|| panic!("route {}", p.subnet));
            assert_eq!(flannel_agent::backend::ebpf::addr_of(r.peer_ip), p.underlay);
            assert_eq!(r.vtep_mac, p.vtep_mac, "{}", p.subnet);
            assert_eq!(r.peer_slot, peers[&p.underlay].slot, "{}", p.subnet);
        }
        assert!(
            !peers.contains_key(&alias),
            "the removed peer's alias stays gone"
        );
        assert!(!peers.contains_key(&peer(3).underlay));
        for i in [4, 21] {
            assert_eq!(
                peers[&peer(i).underlay].slot,
                evented[&peer(i).underlay].slot,
                "peer {i} keeps the slot its event gave it"
            );
        }
        let mut slots: Vec<u32> = peers.values().map(|p| p.slot).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), now.len(), "every slot used once");
    });
}

#[test]
fn pinned_maps_of_another_size_are_replaced_with_their_contents() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = Pins::new("resize");
    let root = pins.0.clone();
    in_fresh_netns(move || {
        let mut small = load(&root, 4);
        small.set_config(&config()).expect("config");
        let three: Vec<PeerEntry> = (1..=3).map(peer).collect();
        small.reconcile(&three).expect("reconcile");
        let before = small.all_peers().expect("peers");
        drop(small);

        // A restart sized for a bigger cluster: new maps, same contents, programs swapped.
        let big = load(&root, 64);
        for map in names::PEER_MAPS {
            assert_eq!(max_entries(&root, map), 64, "{map} resized");
        }
        assert_eq!(big.all_peers().expect("peers"), before);
        assert_eq!(big.all_routes().expect("routes").len(), 3);
        assert_eq!(
            flags(&big) & CONFIG_F_ENABLED,
            CONFIG_F_ENABLED,
            "config kept"
        );
        drop(big);

        // Shrinking below the slots in use keeps what fits; the reconcile places the rest.
        let mut tiny = load(&root, 2);
        assert_eq!(tiny.all_peers().expect("peers").len(), 2);
        tiny.reconcile(&three).expect("reconcile");
        assert_eq!(tiny.all_peers().expect("peers").len(), 2);
        assert_eq!(tiny.overflowed(), vec![peer(3)]);
        // Loading without a size keeps whatever is pinned.
        drop(tiny);
        let dp = load_sized(
            &PinLayout::new(&root),
            flannel_agent::backend::ebpf::Devices {
                vxlan: Some("fl0"),
                vxlan6: None,
                uplink: "fl1",
            },
            None,
            &CancellationToken::new(),
        )
        .expect("load");
        assert_eq!(dp.capacity(), 2);
    });
}

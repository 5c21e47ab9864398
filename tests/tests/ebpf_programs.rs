//! The real eBPF object, loaded into the kernel and attached in a throwaway network
//! namespace, with crafted packets pushed through `BPF_PROG_TEST_RUN`: verdicts, exact
//! output bytes, counters, and what `bpftool` shows of the pinned maps.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, tc::TcAttachOptions,
    },
};
use flannel_common::{
    Counter, DatapathConfig, DropReason, PassReason, Peer, PeerKey, PeerStats, Route,
    maps::CONFIG_F_ENABLED, names, wire,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL_IP: [u8; 4] = [198, 18, 0, 1];
const PEER_IP: [u8; 4] = [198, 18, 0, 2];
const OUR_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];
const PEER_SUBNET: [u8; 4] = [10, 244, 2, 0];

/// Pins for one test under /sys/fs/bpf, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/flannel-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create pin dir (is bpffs mounted?)");
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `f` on a thread that lives in its own fresh network namespace; the namespace
/// disappears with the thread, so nothing can leak.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which owns nothing else.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("test thread panicked")
}

fn sh(cmd: &str) {
    let status = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("spawn sh");
    assert!(status.success(), "`{cmd}` failed");
}

struct Loaded {
    ebpf: Ebpf,
}

impl Loaded {
    /// Load the agent's embedded object with maps pinned under `pins`, attach both
    /// programs (tcx) to a veth pair in the current namespace, and configure the maps for a
    /// host 198.18.0.1 with one peer 198.18.0.2 owning 10.244.2.0/24.
    fn new(pins: &Path) -> Self {
        sh("ip link add fl0 type veth peer name fl1 && ip link set fl0 up && ip link set fl1 up");
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> =
            names::ALL_MAPS.iter().map(|n| (*n, pins.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(flannel_agent::backend::ebpf::OBJECT)
            .expect("load object");
        for (prog, dev, dir) in [
            (names::PROG_ENCAP, "fl0", TcAttachType::Egress),
            (names::PROG_DECAP, "fl1", TcAttachType::Ingress),
        ] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(prog)
                .expect("program")
                .try_into()
                .expect("classifier");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejected {prog}: {e:#}"));
            p.attach_with_options(dev, dir, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .unwrap_or_else(|e| panic!("attach {prog} to {dev}: {e:#}"));
        }
        let mut me = Self { ebpf };
        me.configure();
        me
    }

    fn configure(&mut self) {
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(names::MAP_CONFIG).unwrap()).unwrap();
        config
            .set(
                0,
                DatapathConfig {
                    flags: CONFIG_F_ENABLED,
                    vni: 1,
                    port: 8472,
                    sport_min: 32768,
                    sport_max: 61000,
                    local_ip: LOCAL_IP,
                    vtep_mac: OUR_MAC,
                    uplink_ifindex: 1,
                    vxlan_ifindex: 1,
                    ttl: 64,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        let mut peers: HashMap<&mut MapData, PeerKey, Peer> =
            HashMap::try_from(self.ebpf.map_mut(names::MAP_PEERS).unwrap()).unwrap();
        peers
            .insert(
                PeerKey { addr: PEER_IP },
                Peer {
                    slot: 3,
                    subnet: PEER_SUBNET,
                    prefix_len: 24,
                },
                0,
            )
            .unwrap();
        let mut routes: LpmTrie<&mut MapData, [u8; 4], Route> =
            LpmTrie::try_from(self.ebpf.map_mut(names::MAP_ROUTES).unwrap()).unwrap();
        routes
            .insert(
                &Key::new(24, PEER_SUBNET),
                Route {
                    peer_ip: PEER_IP,
                    vtep_mac: PEER_MAC,
                    flags: 0,
                    peer_slot: 3,
                },
                0,
            )
            .unwrap();
    }

    fn run(&mut self, prog: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let p: &mut SchedClassifier = self.ebpf.program_mut(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 128];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        let r = p
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test_run {prog}: {e:#}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn per_cpu_sum<T: aya::Pod + Copy>(
        &self,
        map: &str,
        index: u32,
        add: impl Fn(T, T) -> T,
        zero: T,
    ) -> T {
        let m: PerCpuArray<&MapData, T> =
            PerCpuArray::try_from(self.ebpf.map(map).unwrap()).unwrap();
        m.get(&index, 0)
            .unwrap()
            .iter()
            .fold(zero, |a, b| add(a, *b))
    }

    fn peer_stats(&self, slot: u32) -> PeerStats {
        self.per_cpu_sum(
            names::MAP_PEER_STATS,
            slot,
            |a: PeerStats, b| PeerStats {
                tx_packets: a.tx_packets + b.tx_packets,
                tx_bytes: a.tx_bytes + b.tx_bytes,
                rx_packets: a.rx_packets + b.rx_packets,
                rx_bytes: a.rx_bytes + b.rx_bytes,
            },
            PeerStats::default(),
        )
    }

    fn counter(&self, map: &str, index: u32) -> u64 {
        self.per_cpu_sum(
            map,
            index,
            |a: Counter, b| Counter {
                packets: a.packets + b.packets,
                bytes: a.bytes + b.bytes,
            },
            Counter::default(),
        )
        .packets
    }
}

/// An Ethernet + IPv4 + ICMP echo frame from `src` to `dst`.
fn inner_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let payload = b"flannel-ebpf-smoke-test-payload!";
    let total = (20 + 8 + payload.len()) as u16;
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [
        0x45,
        0x00,
        (total >> 8) as u8,
        total as u8,
        0x12,
        0x34,
        0x40,
        0x00,
        64,
        1,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let c = wire::ipv4_header_checksum(&ip);
    ip[10] = (c >> 8) as u8;
    ip[11] = c as u8;
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    f.extend_from_slice(payload);
    f
}

/// A VXLAN packet as a kernel VXLAN device on `outer_src` would send it to us.
fn vxlan_packet(outer_src: [u8; 4], vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x10]); // our uplink MAC
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x20]); // peer uplink MAC
    p.extend_from_slice(&[0x08, 0x00]);
    let udp_len = (8 + 8 + inner.len()) as u16;
    p.extend_from_slice(&wire::outer_ipv4_header(
        20 + udp_len,
        7,
        0,
        64,
        outer_src,
        LOCAL_IP,
    ));
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&8472u16.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34]); // kernel peers send a real checksum; we don't care
    p.extend_from_slice(&wire::vxlan_header(vni));
    p.extend_from_slice(inner);
    p
}

#[test]
fn encap_builds_the_headers_the_linux_vxlan_driver_builds() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("encap");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(PEER_MAC, OUR_MAC, [10, 244, 1, 5], [10, 244, 2, 7]);
        let (verdict, out) = dp.run(names::PROG_ENCAP, &inner);
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "encap must redirect to the uplink"
        );
        assert_eq!(out.len(), inner.len() + 50, "VXLAN adds exactly 50 bytes");

        // Outer IPv4.
        let ip: [u8; 20] = out[14..34].try_into().unwrap();
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, out.len() - 14);
        assert_eq!(ip[6] & 0x40, 0, "DF is clear, like the kernel driver");
        assert_eq!(ip[8], 64);
        assert_eq!(ip[9], 17);
        assert_eq!(&ip[12..16], &LOCAL_IP);
        assert_eq!(&ip[16..20], &PEER_IP);
        let mut zeroed = ip;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(
            wire::ipv4_header_checksum(&zeroed),
            u16::from_be_bytes([ip[10], ip[11]])
        );
        // Outer UDP.
        let sport = u16::from_be_bytes([out[34], out[35]]);
        assert!(
            (32768..61000).contains(&sport),
            "source port {sport} from the flow hash"
        );
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), 8472);
        assert_eq!(
            u16::from_be_bytes([out[38], out[39]]) as usize,
            out.len() - 34
        );
        assert_eq!(
            &out[40..42],
            &[0, 0],
            "outer UDP checksum is zero (GSO-safe)"
        );
        // VXLAN, VNI 1.
        assert_eq!(&out[42..50], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        // Inner frame: dst = peer VTEP MAC, src = ours, then the original IP packet.
        assert_eq!(&out[50..56], &PEER_MAC);
        assert_eq!(&out[56..62], &OUR_MAC);
        assert_eq!(&out[62..64], &[0x08, 0x00]);
        assert_eq!(&out[64..], &inner[14..], "inner IP packet untouched");

        let stats = dp.peer_stats(3);
        assert_eq!(stats.tx_packets, 1);
        assert_eq!(stats.tx_bytes, inner.len() as u64);
    });
}

#[test]
fn encap_leaves_unrouted_and_non_ip_traffic_to_the_kernel() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("miss");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let miss = inner_frame(PEER_MAC, OUR_MAC, [10, 244, 1, 5], [10, 244, 9, 7]);
        let (verdict, out) = dp.run(names::PROG_ENCAP, &miss);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, miss, "a route miss must not touch the packet");
        assert_eq!(dp.counter(names::MAP_PASSES, PassReason::NoRoute as u32), 1);

        let mut arp = miss.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let (verdict, _) = dp.run(names::PROG_ENCAP, &arp);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(dp.counter(names::MAP_PASSES, PassReason::NotIpv4 as u32), 1);
    });
}

#[test]
fn decap_delivers_vxlan_from_known_peers_and_drops_the_rest() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("decap");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);

        let (verdict, out) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &inner));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "known peer: redirected into flannel.1"
        );
        assert_eq!(out, inner, "exactly the inner frame comes out");
        let stats = dp.peer_stats(3);
        assert_eq!(stats.rx_packets, 1);
        assert_eq!(stats.rx_bytes, inner.len() as u64);

        let (verdict, _) = dp.run(
            names::PROG_DECAP,
            &vxlan_packet([198, 18, 0, 99], 1, &inner),
        );
        assert_eq!(
            verdict, TC_ACT_SHOT,
            "VXLAN from an address without a lease is dropped"
        );
        assert_eq!(
            dp.counter(names::MAP_DROPS, DropReason::UnknownPeer as u32),
            1
        );

        let (verdict, _) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 2, &inner));
        assert_eq!(verdict, TC_ACT_SHOT, "another VNI is dropped");
        assert_eq!(dp.counter(names::MAP_DROPS, DropReason::BadVni as u32), 1);

        // The peer's host traffic (not masqueraded) has an inner source outside its subnet:
        // the kernel device carries that, as upstream's does.
        let foreign = inner_frame(OUR_MAC, PEER_MAC, PEER_IP, [10, 244, 1, 5]);
        let foreign_packet = vxlan_packet(PEER_IP, 1, &foreign);
        let (verdict, out) = dp.run(names::PROG_DECAP, &foreign_packet);
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, foreign_packet),
            "inner source outside the peer's subnet goes to the kernel device untouched"
        );
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::ForeignSource as u32),
            1
        );

        let mut fragment = vxlan_packet(PEER_IP, 1, &inner);
        fragment[20] |= 0x20; // MF
        let (verdict, out) = dp.run(names::PROG_DECAP, &fragment);
        assert_eq!(
            verdict, TC_ACT_OK,
            "outer fragments go to the kernel for reassembly"
        );
        assert_eq!(out, fragment);
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::Fragment as u32),
            1
        );

        let mut arp = inner.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let arp_packet = vxlan_packet(PEER_IP, 1, &arp);
        let (verdict, out) = dp.run(names::PROG_DECAP, &arp_packet);
        assert_eq!(
            verdict, TC_ACT_OK,
            "inner ARP is the kernel device's to answer"
        );
        assert_eq!(out, arp_packet, "and reaches it untouched");
        assert_eq!(dp.counter(names::MAP_PASSES, PassReason::NotIpv4 as u32), 1);

        let mut other_port = vxlan_packet(PEER_IP, 1, &inner);
        other_port[36..38].copy_from_slice(&4789u16.to_be_bytes());
        let (verdict, out) = dp.run(names::PROG_DECAP, &other_port);
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, other_port),
            "not our port: untouched"
        );
    });
}

/// `packet` (from [`vxlan_packet`]) with `options` inserted after the outer IPv4 header
/// (a multiple of 4 bytes) and the fragment field set to `frag` (flags and offset).
fn with_outer(packet: &[u8], options: &[u8], frag: u16) -> Vec<u8> {
    let mut ip: [u8; 20] = packet[14..34].try_into().unwrap();
    ip[0] = 0x45 + (options.len() / 4) as u8;
    let total = u16::from_be_bytes([ip[2], ip[3]]) + options.len() as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    let mut p = packet[..14].to_vec();
    p.extend_from_slice(&ip);
    p.extend_from_slice(options);
    p.extend_from_slice(&packet[34..]);
    p
}

const MF: u16 = 0x2000;
const NOP_OPTIONS: [u8; 4] = [1, 1, 1, 0];

#[test]
fn the_peer_check_comes_before_any_hand_off_to_the_kernel() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("peercheck");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let stranger = vxlan_packet([198, 18, 0, 99], 1, &inner);
        let peer = vxlan_packet(PEER_IP, 1, &inner);
        let drops = |dp: &Loaded| dp.counter(names::MAP_DROPS, DropReason::UnknownPeer as u32);

        // A stranger's first fragment (it holds the UDP header): dropped, so the kernel can
        // never reassemble the datagram.
        let (verdict, _) = dp.run(names::PROG_DECAP, &with_outer(&stranger, &[], MF));
        assert_eq!(verdict, TC_ACT_SHOT, "stranger's first fragment");
        assert_eq!(drops(&dp), 1);
        // With IP options (the UDP header moves): dropped as well.
        let (verdict, _) = dp.run(names::PROG_DECAP, &with_outer(&stranger, &NOP_OPTIONS, 0));
        assert_eq!(verdict, TC_ACT_SHOT, "stranger's VXLAN with IP options");
        assert_eq!(drops(&dp), 2);
        // Options and a first fragment at once.
        let (verdict, _) = dp.run(names::PROG_DECAP, &with_outer(&stranger, &NOP_OPTIONS, MF));
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(drops(&dp), 3);
        // A non-first fragment has no UDP header: not identifiable as VXLAN, left alone.
        let later = with_outer(&stranger, &[], MF | 6);
        let (verdict, out) = dp.run(names::PROG_DECAP, &later);
        assert_eq!((verdict, out), (TC_ACT_OK, later));
        assert_eq!(drops(&dp), 3, "uncounted: maybe not VXLAN at all");

        // The known peer's fragments and options go to the kernel, which reassembles them.
        for (options, frag) in [(&[][..], MF), (&[][..], MF | 6), (&NOP_OPTIONS[..], 0)] {
            let p = with_outer(&peer, options, frag);
            let (verdict, out) = dp.run(names::PROG_DECAP, &p);
            assert_eq!(
                (verdict, out),
                (TC_ACT_OK, p),
                "options {options:?} frag {frag:#x}"
            );
        }
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::Fragment as u32),
            3
        );
        // Another port with options from a stranger is not ours.
        let mut other = with_outer(&stranger, &NOP_OPTIONS, 0);
        other[40..42].copy_from_slice(&4789u16.to_be_bytes());
        let (verdict, out) = dp.run(names::PROG_DECAP, &other);
        assert_eq!((verdict, out), (TC_ACT_OK, other));
        assert_eq!(drops(&dp), 3);

        // With the check off, a stranger's VXLAN goes to the kernel device, as upstream.
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(dp.ebpf.map_mut(names::MAP_CONFIG).unwrap()).unwrap();
        let mut cfg = config.get(&0, 0).unwrap();
        cfg.flags |= flannel_common::maps::CONFIG_F_ANY_PEER;
        config.set(0, cfg, 0).unwrap();
        let (verdict, out) = dp.run(names::PROG_DECAP, &stranger);
        assert_eq!((verdict, out), (TC_ACT_OK, stranger));
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::UnknownPeer as u32),
            1
        );
        assert_eq!(drops(&dp), 3);
    });
}

#[test]
fn gbp_flags_are_accepted_only_when_the_network_uses_gbp() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("gbp");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let mut gbp = vxlan_packet(PEER_IP, 1, &inner);
        gbp[42..50].copy_from_slice(&wire::vxlan_gbp_header(1, 0x0042));
        let (verdict, _) = dp.run(names::PROG_DECAP, &gbp);
        assert_eq!(verdict, TC_ACT_SHOT, "G bit on a network without GBP");
        assert_eq!(dp.counter(names::MAP_DROPS, DropReason::BadFlags as u32), 1);

        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(dp.ebpf.map_mut(names::MAP_CONFIG).unwrap()).unwrap();
        let mut cfg = config.get(&0, 0).unwrap();
        cfg.flags |= flannel_common::maps::CONFIG_F_GBP;
        config.set(0, cfg, 0).unwrap();
        let (verdict, out) = dp.run(names::PROG_DECAP, &gbp);
        assert_eq!(
            (verdict, out),
            (TC_ACT_REDIRECT, inner.clone()),
            "GBP network"
        );
        let (verdict, _) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &inner));
        assert_eq!(verdict, TC_ACT_REDIRECT, "no G bit on a GBP network");
    });
}

#[test]
fn bpftool_dumps_the_pinned_maps_with_field_names() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("bpftool");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let _dp = Loaded::new(&pin_path);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin_path.join(names::MAP_ROUTES))
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        let entry = &dump[0]["formatted"];
        assert_eq!(entry["value"]["peer_slot"], 3, "dump: {dump}");
        let ip: Vec<u8> = entry["value"]["peer_ip"]
            .as_array()
            .expect("peer_ip array")
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
            Ipv4Addr::from(PEER_IP)
        );
        assert!(entry["value"]["vtep_mac"].is_array());

        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin_path.join(names::MAP_CONFIG))
            .output()
            .expect("run bpftool");
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        assert_eq!(dump[0]["formatted"]["value"]["vni"], 1, "dump: {dump}");
        assert_eq!(dump[0]["formatted"]["value"]["port"], 8472);
    });
}

#[test]
fn fast_path_decap_hands_frames_for_local_pods_straight_to_their_veth() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("fast");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(dp.ebpf.map_mut(names::MAP_CONFIG).unwrap()).unwrap();
        let mut cfg = config.get(&0, 0).unwrap();
        cfg.flags |= flannel_common::maps::CONFIG_F_FAST_INGRESS;
        config.set(0, cfg, 0).unwrap();
        let pod_mac = [0x02, 0x0d, 0, 0, 0, 5];
        let veth_mac = [0x02, 0x0e, 0, 0, 0, 5];
        let mut endpoints: HashMap<
            &mut MapData,
            flannel_common::EndpointKey,
            flannel_common::Endpoint,
        > = HashMap::try_from(dp.ebpf.map_mut(names::MAP_ENDPOINTS).unwrap()).unwrap();
        endpoints
            .insert(
                flannel_common::EndpointKey {
                    addr: [10, 244, 1, 5],
                },
                flannel_common::Endpoint {
                    ifindex: 42,
                    pod_mac,
                    host_mac: veth_mac,
                },
                0,
            )
            .unwrap();

        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let (verdict, out) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &inner));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[0..6], &pod_mac, "delivered to the pod's MAC");
        assert_eq!(&out[6..12], &veth_mac, "from the host side of its veth");
        assert_eq!(
            &out[12..],
            &inner[12..],
            "the inner packet itself is untouched"
        );

        // A pod not in the map takes the default path (into flannel.1, inner MACs kept).
        let other = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 6]);
        let (verdict, out) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &other));
        assert_eq!((verdict, out), (TC_ACT_REDIRECT, other));
    });
}

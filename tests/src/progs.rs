//! The agent's real eBPF object loaded in a throwaway network namespace, for tests that push
//! crafted packets through `BPF_PROG_TEST_RUN`: the loader and map set-up for one host
//! (198.18.0.1, VTEP MAC 02:aa::1) with one peer (198.18.0.2 owning 10.244.2.0/24), counter
//! readers, and the frames those tests send.

use std::{
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
    Counter, DatapathConfig, Peer, PeerKey, PeerStats, Route, maps::CONFIG_F_ENABLED, names, wire,
};

/// `TC_ACT_OK`: hand the packet on (to the kernel path).
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`: drop.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: delivered by the program itself.
pub const TC_ACT_REDIRECT: u32 = 7;

/// This host's underlay address.
pub const LOCAL_IP: [u8; 4] = [198, 18, 0, 1];
/// The one peer's underlay address.
pub const PEER_IP: [u8; 4] = [198, 18, 0, 2];
/// This host's VTEP MAC.
pub const OUR_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
/// The peer's VTEP MAC.
pub const PEER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];
/// The peer's pod subnet (/24).
pub const PEER_SUBNET: [u8; 4] = [10, 244, 2, 0];

/// Pins for one test under /sys/fs/bpf, removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
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
pub fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
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

pub struct Loaded {
    /// The loaded object, for tests that change maps themselves.
    pub ebpf: Ebpf,
}

impl Loaded {
    /// Load the agent's embedded object with maps pinned under `pins`, attach both
    /// programs (tcx) to a veth pair in the current namespace, and configure the maps for a
    /// host 198.18.0.1 with one peer 198.18.0.2 owning 10.244.2.0/24.
    pub fn new(pins: &Path) -> Self {
        // No IPv6 on the links: their neighbour discovery would run through the attached
        // programs and move the counters tests read.
        sh(
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 && \
            ip link add fl0 type veth peer name fl1 && ip link set fl0 up && ip link set fl1 up",
        );
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
            load_program(&mut ebpf, prog)
                .attach_with_options(dev, dir, TcAttachOptions::TcxOrder(LinkOrder::default()))
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
                PeerKey {
                    addr: wire::v4_mapped(PEER_IP),
                },
                Peer {
                    slot: 3,
                    subnet: wire::v4_mapped(PEER_SUBNET),
                    prefix_len: wire::V4_MAPPED_PREFIX + 24,
                },
                0,
            )
            .unwrap();
        let mut routes: LpmTrie<&mut MapData, [u8; 16], Route> =
            LpmTrie::try_from(self.ebpf.map_mut(names::MAP_ROUTES).unwrap()).unwrap();
        routes
            .insert(
                &Key::new(wire::V4_MAPPED_PREFIX + 24, wire::v4_mapped(PEER_SUBNET)),
                Route {
                    peer_ip: wire::v4_mapped(PEER_IP),
                    vtep_mac: PEER_MAC,
                    flags: 0,
                    peer_slot: 3,
                },
                0,
            )
            .unwrap();
    }

    /// Sets the CONFIG map's flags (`CONFIG_F_*`), keeping the rest of the configuration.
    pub fn set_flags(&mut self, flags: u32) {
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(names::MAP_CONFIG).unwrap()).unwrap();
        let mut cfg = config.get(&0, 0).unwrap();
        cfg.flags = flags;
        config.set(0, cfg, 0).unwrap();
    }

    /// Changes the CONFIG map with `f`, keeping what it leaves alone.
    pub fn update_config(&mut self, f: impl FnOnce(&mut DatapathConfig)) {
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map_mut(names::MAP_CONFIG).unwrap()).unwrap();
        let mut cfg = config.get(&0, 0).unwrap();
        f(&mut cfg);
        config.set(0, cfg, 0).unwrap();
    }

    /// The CONFIG map's flags.
    pub fn flags(&self) -> u32 {
        let config: Array<&MapData, DatapathConfig> =
            Array::try_from(self.ebpf.map(names::MAP_CONFIG).unwrap()).unwrap();
        config.get(&0, 0).unwrap().flags
    }

    /// Loads the pod-side programs (`from_pod`, `to_pod`) too, unattached: enough for
    /// `BPF_PROG_TEST_RUN`, and the verifier's verdict on them.
    pub fn load_pod_programs(&mut self) {
        for prog in [names::PROG_FROM_POD, names::PROG_TO_POD] {
            load_program(&mut self.ebpf, prog);
        }
    }

    /// Loads classifier `prog`, one no test attaches (the agent's probe), for
    /// [`run`](Self::run).
    pub fn load_program(&mut self, prog: &str) {
        load_program(&mut self.ebpf, prog);
    }

    /// Runs `prog` once on `packet`: its verdict, the packet as it left, and the
    /// `struct __sk_buff` as the program left it (`mark` at offset 8); `Err` when
    /// `BPF_PROG_TEST_RUN` refuses the input itself.
    pub fn try_run_with_context(
        &mut self,
        prog: &str,
        packet: &[u8],
    ) -> Result<(u32, Vec<u8>, Vec<u8>), aya::programs::ProgramError> {
        let p: &mut SchedClassifier = self.ebpf.program_mut(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 128];
        let mut ctx = vec![0u8; 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.ctx_out = Some(&mut ctx);
        let r = p.test_run(opts)?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, ctx))
    }

    /// Runs `prog` once on `packet`: its verdict and the packet as it left.
    pub fn run(&mut self, prog: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self
            .try_run_with_context(prog, packet)
            .unwrap_or_else(|e| panic!("test_run {prog} on {} bytes: {e:?}", packet.len()));
        (verdict, out)
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

    /// A peer's traffic counters summed over CPUs.
    pub fn peer_stats(&self, slot: u32) -> PeerStats {
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

    /// Packets counted at `index` of a per-CPU counter map, summed over CPUs.
    pub fn counter(&self, map: &str, index: u32) -> u64 {
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

/// Loads classifier `prog` of `ebpf`: the verifier's verdict on it.
fn load_program<'a>(ebpf: &'a mut Ebpf, prog: &str) -> &'a mut SchedClassifier {
    let p: &mut SchedClassifier = ebpf
        .program_mut(prog)
        .expect("program")
        .try_into()
        .expect("classifier");
    p.load()
        .unwrap_or_else(|e| panic!("verifier rejected {prog}: {e:#}"));
    p
}

/// An Ethernet + IPv4 + ICMP echo frame from `src` to `dst`.
pub fn inner_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let payload = b"flannel-ebpf-smoke-test-payload!";
    let total = (20 + 8 + payload.len()) as u16;
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    // The outer header's layout with DF set and protocol ICMP.
    let mut ip = wire::outer_ipv4_header(total, 0x1234, 0, 64, src, dst);
    ip[6] = 0x40;
    ip[9] = 1;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = wire::ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    f.extend_from_slice(payload);
    f
}

/// A VXLAN packet as a kernel VXLAN device on `outer_src` would send it to us.
pub fn vxlan_packet(outer_src: [u8; 4], vni: u32, inner: &[u8]) -> Vec<u8> {
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

/// `packet` (from [`vxlan_packet`]) with `options` inserted after the outer IPv4 header
/// (a multiple of 4 bytes) and the fragment field set to `frag` (flags and offset).
pub fn with_outer(packet: &[u8], options: &[u8], frag: u16) -> Vec<u8> {
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

/// The "more fragments" bit of the IPv4 fragment field.
pub const MF: u16 = 0x2000;
/// IPv4 options: three NOPs and an end-of-list.
pub const NOP_OPTIONS: [u8; 4] = [1, 1, 1, 0];

//! Loading, pinning and attaching the programs so that an agent restart never leaves a
//! packet without a datapath.
//!
//! Pin layout under `--bpf-pin-path` (default `/sys/fs/bpf/flannel`):
//!
//! ```text
//! <root>/v5/maps/{ROUTES,PEERS,ENDPOINTS,CONFIG,PEER_STATS,DROPS,PASSES,FLOWS,FLOW_EVENTS,PATHS,STRANGERS}
//! <root>/v5/links/{encap,encap6,decap}   # encap: vxlan_encap on flannel.<VNI> (unless IPv6-only),
//!                                       # encap6: on flannel-v6.<VNI> (with IPv6)
//! <root>/v5/links/pod<ifindex>-{in,out}   # from_pod / to_pod on a pod veth (bpffs names allow no dots)
//! ```
//!
//! `v5` is `flannel_common::names::LAYOUT_VERSION`: a release that changes a map type uses
//! a new directory instead of reusing maps of the wrong shape (aya reuses a pinned map
//! without checking it). A map's *size* is not part of the layout: the peer-keyed maps are
//! sized for the cluster at load time, and pinned maps of another size are replaced with
//! their contents carried over (see [`load_sized`]). Maps are pinned, so their contents outlive the agent. Programs are
//! attached with tcx links, which are pinned too: on restart the new program replaces the
//! old one inside the same link (`BPF_LINK_UPDATE`), atomically, and the maps the new
//! program opens are the pinned ones, already filled.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapInfo, PerCpuArray, PerCpuHashMap,
        RingBuf,
    },
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use flannel_common::{
    Counter, DatapathConfig, DropReason, Endpoint, EndpointKey, Flow, FlowKey, PassReason,
    PathReason, Peer, PeerKey, PeerStats, Route,
    names::{self, DEFAULT_PEER_CAPACITY, LAYOUT_VERSION},
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use super::{probe::FallbackReason, tables::TableState};
use crate::repair::RepairKind;

/// The compiled programs, embedded at build time by `build.rs` (aya-build).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel"));

/// Where one agent's objects are pinned.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under `root` (the `--bpf-pin-path`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The versioned directory holding everything.
    pub fn versioned(&self) -> PathBuf {
        self.root.join(LAYOUT_VERSION)
    }

    /// Pin path of a map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.versioned().join("maps").join(name)
    }

    /// Pin path of a program's link.
    pub fn link(&self, which: &str) -> PathBuf {
        self.versioned().join("links").join(which)
    }

    /// Pin directories of other layout versions (`v<N>` next to ours), left by an upgrade.
    pub fn other_versions(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name != LAYOUT_VERSION
                    && name
                        .strip_prefix('v')
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|e| e.path())
            .collect()
    }

    /// Remove every pin: the links go (detaching the programs) and the maps with them.
    /// Used by tests and `teardown`; the agent itself never does this on exit.
    pub fn remove_all(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// The loaded datapath: typed handles on every map, and the programs attached.
pub struct Datapath {
    /// Remote subnet (either family, 16-byte keys) → route.
    pub routes: LpmTrie<MapData, [u8; 16], Route>,
    /// Peer underlay → peer.
    pub peers: HashMap<MapData, PeerKey, Peer>,
    /// Local pod → direct delivery (fast path).
    pub endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    /// This host's configuration.
    pub config: Array<MapData, DatapathConfig>,
    /// Per-peer counters.
    pub peer_stats: PerCpuArray<MapData, PeerStats>,
    /// Drop counters.
    pub drops: PerCpuArray<MapData, Counter>,
    /// Pass-to-kernel counters.
    pub passes: PerCpuArray<MapData, Counter>,
    /// The per-flow fast path's flows (an LRU hash).
    pub flows: HashMap<MapData, FlowKey, Flow>,
    /// Fast path vs kernel path counters.
    pub paths: PerCpuArray<MapData, Counter>,
    /// VXLAN dropped by the known-peer check, by outer source (a per-CPU LRU hash).
    pub strangers: PerCpuHashMap<MapData, PeerKey, Counter>,
    /// What was written into the peer-keyed maps, and their capacity.
    pub(super) state: TableState,
    /// Whether `vxlan_encap` rides on `flannel.<VNI>` (not on an IPv6-only host).
    encap4: bool,
    /// Whether `vxlan_encap` rides on `flannel-v6.<VNI>` (its link is pinned).
    encap6: bool,
    /// The kernel's answer to [`probe_decap_l4_udp`] (`false` when only the pinned maps
    /// were opened).
    pub decap_l4_udp: bool,
    /// Keeps the programs (and their log buffer) loaded while the agent runs; `None` when
    /// only the pinned maps were opened for inspection.
    _ebpf: Option<Ebpf>,
    /// Stops the log forwarder when the datapath goes.
    _tasks: Option<DropGuard>,
}

/// Open the pinned maps of a running datapath without loading or attaching anything:
/// for inspection (counters, contents) from another process.
pub fn open_pinned(layout: &PinLayout) -> Result<Datapath, FallbackReason> {
    let pinned = check_pinned_maps(layout)?;
    let capacity = pinned_capacity(&pinned).unwrap_or(DEFAULT_PEER_CAPACITY);
    let encaps = (
        layout.link("encap").exists(),
        layout.link("encap6").exists(),
    );
    assemble(|name| open_pinned_map(layout, name), capacity, encaps)
}

/// The pinned map at `name`, untyped.
fn open_pinned_map(layout: &PinLayout, name: &str) -> Result<Map, FallbackReason> {
    let path = layout.map(name);
    MapData::from_pin(&path)
        .map(Map::from_map_data)
        .map_err(|e| FallbackReason::Pin {
            path: path.display().to_string(),
            error: e.to_string(),
        })?
        .map_err(|e| FallbackReason::Load(format!("map {name}: {e}")))
}

/// The ring buffer through which the programs ask for conntrack preparation of verified
/// TCP flows; one reader (the agent) per datapath.
pub fn open_flow_events(layout: &PinLayout) -> Result<RingBuf<MapData>, FallbackReason> {
    RingBuf::try_from(open_pinned_map(layout, names::MAP_FLOW_EVENTS)?)
        .map_err(|e| FallbackReason::Load(format!("map {}: {e}", names::MAP_FLOW_EVENTS)))
}

/// The typed map handles, each map fetched by name from `get`.
fn assemble(
    mut get: impl FnMut(&str) -> Result<Map, FallbackReason>,
    capacity: u32,
    (encap4, encap6): (bool, bool),
) -> Result<Datapath, FallbackReason> {
    fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(
        get: &mut impl FnMut(&str) -> Result<Map, FallbackReason>,
        name: &str,
    ) -> Result<T, FallbackReason> {
        T::try_from(get(name)?)
            .map_err(|e| FallbackReason::Load(format!("map {name} has an unexpected type: {e}")))
    }
    Ok(Datapath {
        routes: typed(&mut get, names::MAP_ROUTES)?,
        peers: typed(&mut get, names::MAP_PEERS)?,
        endpoints: typed(&mut get, names::MAP_ENDPOINTS)?,
        config: typed(&mut get, names::MAP_CONFIG)?,
        peer_stats: typed(&mut get, names::MAP_PEER_STATS)?,
        drops: typed(&mut get, names::MAP_DROPS)?,
        passes: typed(&mut get, names::MAP_PASSES)?,
        flows: typed(&mut get, names::MAP_FLOWS)?,
        paths: typed(&mut get, names::MAP_PATHS)?,
        strangers: typed(&mut get, names::MAP_STRANGERS)?,
        state: TableState::new(capacity),
        encap4,
        encap6,
        decap_l4_udp: false,
        _ebpf: None,
        _tasks: None,
    })
}

/// Whether this kernel's `bpf_skb_adjust_room` takes `BPF_F_ADJ_ROOM_DECAP_L4_UDP`:
/// flags are checked when the helper runs, not by the verifier, so the `probe_decap_l4`
/// program is run once through `BPF_PROG_TEST_RUN` on a VXLAN frame (never a kernel
/// version compared). `Err` when the probe itself could not run or answered something
/// else than yes (0) or no (`-EINVAL`, which on this frame can only be the flag).
pub fn probe_decap_l4_udp(ebpf: &mut Ebpf) -> Result<bool, String> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(names::PROG_PROBE_DECAP_L4_UDP)
        .ok_or("the probe program is missing from the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    program.load().map_err(|e| format!("loading it: {e}"))?;
    let frame = probe_frame();
    let mut out = vec![0u8; frame.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.data_out = Some(&mut out);
    let answer = program
        .test_run(opts)
        .map(|r| r.return_value as i32)
        .map_err(|e| format!("running it: {e}"));
    // Run once; nothing keeps it loaded.
    let _ = program.unload();
    match answer? {
        0 => Ok(true),
        e if e == -libc::EINVAL => Ok(false),
        e => Err(format!("unexpected answer {e}")),
    }
}

/// A VXLAN frame as a peer sends it (outer Ethernet, IPv4, UDP 8472, VXLAN VNI 1, inner
/// Ethernet, IPv4, 8 bytes of payload): long enough that stripping 50 bytes leaves a whole
/// IPv4 header, which the helper checks before the flags.
fn probe_frame() -> Vec<u8> {
    use flannel_common::wire::{ETH_LEN, IPV4_LEN, UDP_LEN, VXLAN_LEN};
    let inner_ip = IPV4_LEN + 8;
    let udp = UDP_LEN + VXLAN_LEN + ETH_LEN + inner_ip;
    let mut f = Vec::with_capacity(ETH_LEN + IPV4_LEN + udp);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    let outer_len = u16::try_from(IPV4_LEN + udp).expect("small");
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0]);
    f[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&outer_len.to_be_bytes());
    f.extend_from_slice(&[198, 18, 0, 2, 198, 18, 0, 1]);
    let udp_len = u16::try_from(udp).expect("small");
    f.extend_from_slice(&[0x12, 0x34, 0x21, 0x18]);
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 3, 0x02, 0, 0, 0, 0, 4, 0x08, 0x00]);
    let inner_len = u16::try_from(inner_ip).expect("small");
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0]);
    let at = f.len() - 10;
    f[at..at + 2].copy_from_slice(&inner_len.to_be_bytes());
    f.extend_from_slice(&[10, 244, 2, 2, 10, 244, 1, 2]);
    f.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
    f
}

/// The links of `vxlan_encap`, one per VXLAN device (see [`attachments`]).
const ENCAP_LINKS: [&str; 2] = ["encap", "encap6"];

/// One program and where it goes.
struct Attachment<'a> {
    program: &'static str,
    link: &'a str,
    interface: &'a str,
    direction: TcAttachType,
}

/// The devices the programs ride on: at least one VXLAN device.
#[derive(Clone, Copy, Debug)]
pub struct Devices<'a> {
    /// `flannel.<VNI>`, unless the network is IPv6-only.
    pub vxlan: Option<&'a str>,
    /// `flannel-v6.<VNI>`, with IPv6 (dual stack or IPv6-only).
    pub vxlan6: Option<&'a str>,
    /// The uplink.
    pub uplink: &'a str,
}

/// Where the programs go: encap on each VXLAN device's egress (the same program: it
/// tells the families apart by the inner EtherType), decap on the uplink's ingress (it
/// tells the outer families apart).
fn attachments<'a>(d: Devices<'a>) -> Vec<Attachment<'a>> {
    let mut out = Vec::with_capacity(3);
    if let Some(v4) = d.vxlan {
        out.push(Attachment {
            program: names::PROG_ENCAP,
            link: "encap",
            interface: v4,
            direction: TcAttachType::Egress,
        });
    }
    out.push(Attachment {
        program: names::PROG_DECAP,
        link: "decap",
        interface: d.uplink,
        direction: TcAttachType::Ingress,
    });
    if let Some(v6) = d.vxlan6 {
        out.push(Attachment {
            program: names::PROG_ENCAP,
            link: "encap6",
            interface: v6,
            direction: TcAttachType::Egress,
        });
    }
    out
}

/// Load the programs, reuse or create the pinned maps, and attach (or atomically replace)
/// the encap program on `vxlan_dev` egress and the decap program on `uplink` ingress. The
/// peer-keyed maps keep the size they are pinned with (or the compiled default).
pub fn load(layout: &PinLayout, vxlan_dev: &str, uplink: &str) -> Result<Datapath, FallbackReason> {
    let devices = Devices {
        vxlan: Some(vxlan_dev),
        vxlan6: None,
        uplink,
    };
    load_sized(layout, devices, None, &CancellationToken::new())
}

/// [`load`] with the peer-keyed maps sized for `capacity` peers. Pinned maps of another
/// size (an earlier run for a smaller cluster, or another build's fixed-size maps) are
/// replaced: new maps are created and pinned, the old contents copied in, and only then
/// do the new programs replace the old ones inside the pinned links, so traffic never
/// meets an empty map. Peers whose slot no longer fits are left to the next reconcile.
///
/// The background task forwarding the programs' log records ends with `cancel` or when
/// the returned datapath is dropped, whichever comes first.
pub fn load_sized(
    layout: &PinLayout,
    devices: Devices<'_>,
    capacity: Option<u32>,
    cancel: &CancellationToken,
) -> Result<Datapath, FallbackReason> {
    let pin_err = |path: &Path, error: String| FallbackReason::Pin {
        path: path.display().to_string(),
        error,
    };
    for dir in [
        layout.versioned().join("maps"),
        layout.versioned().join("links"),
    ] {
        std::fs::create_dir_all(&dir).map_err(|e| pin_err(&dir, e.to_string()))?;
    }
    let pinned = check_pinned_maps(layout)?;
    let capacity = capacity
        .or_else(|| pinned_capacity(&pinned))
        .unwrap_or(DEFAULT_PEER_CAPACITY)
        .max(1);

    // Pinned maps of the wrong size: keep them open (the running programs still use them)
    // and move their pins aside, so the loader creates maps of the right size.
    let mut resized: Vec<(&'static str, MapData)> = Vec::new();
    for &(name, entries) in &pinned {
        let Some(want) = expected_entries(name, capacity).filter(|w| *w != entries) else {
            continue;
        };
        let path = layout.map(name);
        let old = MapData::from_pin(&path).map_err(|e| pin_err(&path, e.to_string()))?;
        std::fs::remove_file(&path).map_err(|e| pin_err(&path, e.to_string()))?;
        info!(map = name, from = entries, to = want, "resizing pinned map");
        resized.push((name, old));
    }
    let restore_pins = |resized: &[(&'static str, MapData)]| {
        for (name, old) in resized {
            let path = layout.map(name);
            let _ = std::fs::remove_file(&path);
            if let Err(e) = old.pin(&path) {
                warn!(map = name, error = %e, "could not put the old map's pin back");
            }
        }
    };

    let mut ebpf = match load_object(layout, capacity) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            restore_pins(&resized);
            return Err(e);
        }
    };
    if let Err(e) = carry_over(&mut ebpf, resized, capacity) {
        // The new maps are pinned already and the old programs still run on the old
        // ones; the next reconcile fills the new maps when the programs switch.
        warn!(error = %e, "copying the resized maps' contents failed; the reconcile refills them");
    }

    let decap_l4_udp = match probe_decap_l4_udp(&mut ebpf) {
        Ok(yes) => yes,
        Err(error) => {
            warn!(%error, "probing for BPF_F_ADJ_ROOM_DECAP_L4_UDP failed; going without it");
            false
        }
    };
    let wanted = attachments(devices);
    for a in &wanted {
        attach(&mut ebpf, layout, a)?;
    }
    // A device this run has no family for (dual stack before, IPv6-only now) keeps the
    // link of an earlier run: its program would go on reading maps that no longer
    // describe that device. Unpinning the link detaches it.
    for stale in ENCAP_LINKS
        .iter()
        .filter(|l| !wanted.iter().any(|a| a.link == **l))
    {
        let pin = layout.link(stale);
        match std::fs::remove_file(&pin) {
            Ok(()) => {
                info!(pin = %pin.display(), "unpinned the encap link of a device this run does not use")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(pin_err(&pin, e.to_string())),
        }
    }
    // An upgrade across a layout change leaves the previous version's links attached, with
    // programs reading maps nobody updates any more: now that ours run, unpin them (which
    // detaches them) and their maps.
    for old in layout.other_versions() {
        match std::fs::remove_dir_all(&old) {
            Ok(()) => {
                info!(pins = %old.display(), "removed the previous layout version's programs and maps")
            }
            Err(error) => {
                warn!(pins = %old.display(), %error, "cannot remove the previous layout version's pins")
            }
        }
    }
    // Only now: the logger takes the log ring buffer out of `ebpf`, and without a runtime
    // to forward from it is dropped, which must not happen before the programs that write
    // to the buffer are loaded.
    let tasks = cancel.child_token();
    start_log_forwarder(&mut ebpf, tasks.clone());

    let maps = assemble(
        |name| {
            ebpf.take_map(name)
                .ok_or_else(|| FallbackReason::Load(format!("map {name} missing from the object")))
        },
        capacity,
        (devices.vxlan.is_some(), devices.vxlan6.is_some()),
    )?;
    Ok(Datapath {
        decap_l4_udp,
        _ebpf: Some(ebpf),
        _tasks: Some(tasks.drop_guard()),
        ..maps
    })
}

/// The per-pod programs (`from_pod`, `to_pod`), loaded once against the pinned maps of a
/// running datapath and attached to each pod's host-side veth as it appears. Their tcx
/// links are pinned like the others, so they survive an agent restart; a veth's links die
/// with it and their pins are removed by [`PodPrograms::detach`].
pub struct PodPrograms {
    ebpf: Ebpf,
    layout: PinLayout,
    _tasks: DropGuard,
}

impl PodPrograms {
    /// Load the pod programs against the pinned maps of `layout` (which [`load_sized`]
    /// created); their log records are forwarded until `cancel`.
    pub fn load(layout: &PinLayout, cancel: &CancellationToken) -> Result<Self, FallbackReason> {
        let pinned = check_pinned_maps(layout)?;
        let capacity = pinned_capacity(&pinned).unwrap_or(DEFAULT_PEER_CAPACITY);
        let mut ebpf = load_object(layout, capacity)?;
        for program in [names::PROG_FROM_POD, names::PROG_TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(program)
                .ok_or_else(|| FallbackReason::Load(format!("program {program} missing")))?
                .try_into()
                .map_err(|e| FallbackReason::Load(format!("program {program}: {e}")))?;
            prog.load()
                .map_err(|e| FallbackReason::Load(format!("program {program}: {e:#}")))?;
        }
        let tasks = cancel.child_token();
        start_log_forwarder(&mut ebpf, tasks.clone());
        Ok(Self {
            ebpf,
            layout: layout.clone(),
            _tasks: tasks.drop_guard(),
        })
    }

    /// Attach (or re-attach) both programs to the veth `interface` (index `ifindex`).
    pub fn attach(&mut self, interface: &str, ifindex: u32) -> Result<(), FallbackReason> {
        for (program, dir, direction) in [
            (names::PROG_FROM_POD, "in", TcAttachType::Ingress),
            (names::PROG_TO_POD, "out", TcAttachType::Egress),
        ] {
            let link = pod_link_name(ifindex, dir);
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| FallbackReason::Load(format!("program {program} missing")))?
                .try_into()
                .map_err(|e| FallbackReason::Load(format!("program {program}: {e}")))?;
            link_up(
                prog,
                &self.layout,
                &Attachment {
                    program,
                    link: &link,
                    interface,
                    direction,
                },
            )?;
        }
        Ok(())
    }

    /// Drop the pins of the veth `ifindex`'s links (detaching the programs if the veth
    /// still exists).
    pub fn detach(&self, ifindex: u32) {
        for dir in ["in", "out"] {
            let pin = self.layout.link(&pod_link_name(ifindex, dir));
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    warn!(pin = %pin.display(), error = %e, "removing a pod link pin failed");
                }
                _ => {}
            }
        }
    }

    /// The veths that have pinned pod links.
    pub fn attached(&self) -> std::collections::BTreeSet<u32> {
        let Ok(dir) = std::fs::read_dir(self.layout.versioned().join("links")) else {
            return Default::default();
        };
        dir.filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("pod")?.split_once('-')?.0.parse().ok()
        })
        .collect()
    }
}

fn pod_link_name(ifindex: u32, dir: &str) -> String {
    format!("pod{ifindex}-{dir}")
}

/// The number of entries this build wants in map `name` for `capacity` peers; `None` for a
/// map whose size this build does not check.
fn expected_entries(name: &str, capacity: u32) -> Option<u32> {
    if names::PEER_MAPS.contains(&name) {
        return Some(capacity);
    }
    match name {
        names::MAP_ENDPOINTS => Some(names::MAX_ENDPOINTS),
        names::MAP_CONFIG => Some(1),
        names::MAP_DROPS => Some(DropReason::COUNT),
        names::MAP_PASSES => Some(PassReason::COUNT),
        names::MAP_PATHS => Some(PathReason::COUNT),
        names::MAP_FLOWS => Some(names::MAX_FLOWS),
        _ => None,
    }
}

/// The peer capacity the pinned maps were made with (the peers map's size).
fn pinned_capacity(pinned: &[(&'static str, u32)]) -> Option<u32> {
    pinned
        .iter()
        .find(|(name, _)| *name == names::MAP_PEERS)
        .map(|(_, n)| *n)
}

/// Copy what the replaced maps held into the new ones (still unused by any program):
/// routes and peers whose slot fits, counters, configuration and endpoints.
fn carry_over(
    ebpf: &mut Ebpf,
    old: Vec<(&'static str, MapData)>,
    capacity: u32,
) -> Result<(), aya::maps::MapError> {
    use aya::maps::MapError;
    fn new_map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map, MapError> {
        ebpf.map_mut(name).ok_or(MapError::InvalidName {
            name: name.to_owned(),
        })
    }
    fn per_cpu<T: aya::Pod>(old: Map, new: &mut Map, slots: u32) -> Result<(), MapError> {
        let old = PerCpuArray::<MapData, T>::try_from(old)?;
        let mut new = PerCpuArray::<&mut MapData, T>::try_from(new)?;
        for i in 0..old.len().min(new.len()).min(slots) {
            new.set(i, old.get(&i, 0)?, 0)?;
        }
        Ok(())
    }
    for (name, data) in old {
        let old = Map::from_map_data(data)?;
        let new = new_map(ebpf, name)?;
        match name {
            names::MAP_ROUTES => {
                let old = LpmTrie::<MapData, [u8; 16], Route>::try_from(old)?;
                let mut new = LpmTrie::<&mut MapData, [u8; 16], Route>::try_from(new)?;
                for entry in old.iter() {
                    let (k, v) = entry?;
                    if v.peer_slot < capacity {
                        new.insert(&k, v, 0)?;
                    }
                }
            }
            names::MAP_PEERS => {
                let old = HashMap::<MapData, PeerKey, Peer>::try_from(old)?;
                let mut new = HashMap::<&mut MapData, PeerKey, Peer>::try_from(new)?;
                for entry in old.iter() {
                    let (k, v) = entry?;
                    if v.slot < capacity {
                        new.insert(k, v, 0)?;
                    }
                }
            }
            names::MAP_ENDPOINTS => {
                let old = HashMap::<MapData, EndpointKey, Endpoint>::try_from(old)?;
                let mut new = HashMap::<&mut MapData, EndpointKey, Endpoint>::try_from(new)?;
                for entry in old.iter() {
                    let (k, v) = entry?;
                    new.insert(k, v, 0)?;
                }
            }
            names::MAP_CONFIG => {
                let old = Array::<MapData, DatapathConfig>::try_from(old)?;
                let mut new = Array::<&mut MapData, DatapathConfig>::try_from(new)?;
                new.set(0, old.get(&0, 0)?, 0)?;
            }
            names::MAP_PEER_STATS => per_cpu::<PeerStats>(old, new, capacity)?,
            names::MAP_DROPS | names::MAP_PASSES => per_cpu::<Counter>(old, new, u32::MAX)?,
            _ => {}
        }
    }
    Ok(())
}

impl Datapath {
    /// Every map handle with its pinned name.
    /// Every pin this datapath keeps: its maps' and its links' (what [`Self::repair_pins`]
    /// puts back), for the agent's watch on them.
    pub fn pin_paths(&self, layout: &PinLayout) -> Vec<PathBuf> {
        self.map_handles()
            .iter()
            .map(|(name, _)| layout.map(name))
            .chain(
                attachments(Devices {
                    vxlan: self.encap4.then_some(""),
                    vxlan6: self.encap6.then_some(""),
                    uplink: "",
                })
                .iter()
                .map(|a| layout.link(a.link)),
            )
            .collect()
    }

    fn map_handles(&self) -> [(&'static str, &MapData); 10] {
        [
            (names::MAP_ROUTES, self.routes.map()),
            (names::MAP_PEERS, self.peers.map()),
            (names::MAP_ENDPOINTS, self.endpoints.map()),
            (names::MAP_CONFIG, self.config.map()),
            (names::MAP_PEER_STATS, self.peer_stats.map()),
            (names::MAP_DROPS, self.drops.map()),
            (names::MAP_PASSES, self.passes.map()),
            (names::MAP_FLOWS, self.flows.map()),
            (names::MAP_PATHS, self.paths.map()),
            (names::MAP_STRANGERS, self.strangers.map()),
        ]
    }

    /// Put back what someone removed from bpffs or the hooks while the agent runs: a map
    /// pin that is gone (or now names another map) is pinned again from the map the
    /// programs use, so `bpftool` and the next agent see the live one; a program no longer
    /// attached to its hook (link pin removed, link detached, device re-created) gets a new
    /// pinned tcx link. Returns what was fixed. Nothing to do for an inspection-only handle.
    pub fn repair_pins(
        &mut self,
        layout: &PinLayout,
        devices: Devices<'_>,
    ) -> Result<Vec<(RepairKind, String)>, FallbackReason> {
        let mut fixes = self.repin_maps(layout)?;
        let Some(ebpf) = self._ebpf.as_mut() else {
            return Ok(fixes);
        };
        for a in attachments(devices) {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(a.program)
                .ok_or_else(|| FallbackReason::Load(format!("program {} missing", a.program)))?
                .try_into()
                .map_err(|e| FallbackReason::Load(format!("program {}: {e}", a.program)))?;
            let id = prog
                .info()
                .map_err(|e| FallbackReason::Load(format!("program {}: {e}", a.program)))?
                .id();
            let attached = SchedClassifier::query_tcx(a.interface, a.direction)
                .is_ok_and(|(_, progs)| progs.iter().any(|p| p.id() == id));
            let pin = layout.link(a.link);
            let pinned = pin.exists();
            if attached && pinned {
                continue;
            }
            // A pin left behind by a detached link can't be reused: replace it.
            if pinned {
                std::fs::remove_file(&pin).map_err(|e| FallbackReason::Pin {
                    path: pin.display().to_string(),
                    error: e.to_string(),
                })?;
            }
            link_up(prog, layout, &a)?;
            let why = match (attached, pinned) {
                (false, true) => "detached",
                (true, false) => "link pin removed",
                _ => "detached and unpinned",
            };
            fixes.push((
                RepairKind::TcxLink,
                format!(
                    "{} on {} {:?} ({why}); re-attached and pinned at {}",
                    a.program,
                    a.interface,
                    a.direction,
                    pin.display()
                ),
            ));
        }
        Ok(fixes)
    }

    fn repin_maps(&self, layout: &PinLayout) -> Result<Vec<(RepairKind, String)>, FallbackReason> {
        let mut fixes = Vec::new();
        for (name, map) in self.map_handles() {
            let path = layout.map(name);
            let pin_err = |error: String| FallbackReason::Pin {
                path: path.display().to_string(),
                error,
            };
            let ours = map.info().map_err(|e| pin_err(e.to_string()))?.id();
            let why = match MapInfo::from_pin(&path) {
                Ok(info) if info.id() == ours => continue,
                Ok(info) => {
                    std::fs::remove_file(&path).map_err(|e| pin_err(e.to_string()))?;
                    format!("pin named map #{} instead of #{ours}", info.id())
                }
                Err(_) => {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| pin_err(e.to_string()))?;
                    }
                    "pin removed".to_owned()
                }
            };
            map.pin(&path).map_err(|e| pin_err(e.to_string()))?;
            fixes.push((
                RepairKind::PinnedMap,
                format!("map {name} ({why}); pinned again at {}", path.display()),
            ));
        }
        Ok(fixes)
    }
}

/// Refuse pinned maps whose shape differs from what this build expects, instead of letting
/// the programs read garbage. Within one layout version this only happens after a bug.
/// Returns the pinned maps with their sizes (entries), which may legitimately differ.
fn check_pinned_maps(layout: &PinLayout) -> Result<Vec<(&'static str, u32)>, FallbackReason> {
    use std::mem::size_of;
    let expected: [(&'static str, usize, usize); 11] = [
        (names::MAP_ROUTES, 4 + 16, size_of::<Route>()),
        (names::MAP_PEERS, size_of::<PeerKey>(), size_of::<Peer>()),
        (
            names::MAP_ENDPOINTS,
            size_of::<EndpointKey>(),
            size_of::<Endpoint>(),
        ),
        (names::MAP_CONFIG, 4, size_of::<DatapathConfig>()),
        (names::MAP_PEER_STATS, 4, size_of::<PeerStats>()),
        (names::MAP_DROPS, 4, size_of::<Counter>()),
        (names::MAP_PASSES, 4, size_of::<Counter>()),
        (names::MAP_FLOWS, size_of::<FlowKey>(), size_of::<Flow>()),
        (names::MAP_FLOW_EVENTS, 0, 0),
        (names::MAP_PATHS, 4, size_of::<Counter>()),
        (
            names::MAP_STRANGERS,
            size_of::<PeerKey>(),
            size_of::<Counter>(),
        ),
    ];
    let mut pinned = Vec::new();
    for (name, key, value) in expected {
        let path = layout.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| FallbackReason::Pin {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            return Err(FallbackReason::Pin {
                path: path.display().to_string(),
                error: format!(
                    "pinned map has key/value size {}/{}, this build needs {key}/{value}",
                    info.key_size(),
                    info.value_size()
                ),
            });
        }
        pinned.push((name, info.max_entries()));
    }
    Ok(pinned)
}

/// Attach one program: replace the program inside the pinned link if there is a live one,
/// otherwise create a tcx link and pin it.
fn attach(ebpf: &mut Ebpf, layout: &PinLayout, a: &Attachment<'_>) -> Result<(), FallbackReason> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(a.program)
        .ok_or_else(|| FallbackReason::Load(format!("program {} missing", a.program)))?
        .try_into()
        .map_err(|e| FallbackReason::Load(format!("program {}: {e}", a.program)))?;
    // One program may go on two hooks (encap on both VXLAN devices): loaded once.
    if prog.fd().is_err() {
        prog.load()
            .map_err(|e| FallbackReason::Load(format!("program {}: {e:#}", a.program)))?;
    }
    link_up(prog, layout, a)
}

/// Put a loaded program on its hook: inside the pinned link if there is a live one,
/// otherwise through a new tcx link, pinned.
fn link_up(
    prog: &mut SchedClassifier,
    layout: &PinLayout,
    a: &Attachment<'_>,
) -> Result<(), FallbackReason> {
    let attach_err = |error: String| FallbackReason::Attach {
        program: a.program,
        interface: a.interface.to_owned(),
        error,
    };
    let pin = layout.link(a.link);
    if pin.exists() {
        match replace_in_pinned_link(prog, &pin) {
            Ok(()) => {
                info!(
                    program = a.program,
                    interface = a.interface,
                    "replaced program in pinned link"
                );
                return Ok(());
            }
            Err(error) => {
                // The link died with its device (recreated flannel.1, gone veth): start over.
                warn!(program = a.program, pin = %pin.display(), %error, "stale link pin, re-attaching");
                std::fs::remove_file(&pin).map_err(|e| attach_err(e.to_string()))?;
            }
        }
    }
    let id = prog
        .attach_with_options(
            a.interface,
            a.direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| attach_err(format!("{e:#}")))?;
    let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
    let fd_link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
    fd_link.pin(&pin).map_err(|e| FallbackReason::Pin {
        path: pin.display().to_string(),
        error: e.to_string(),
    })?;
    info!(
        program = a.program,
        interface = a.interface,
        "attached with a new pinned tcx link"
    );
    Ok(())
}

fn replace_in_pinned_link(prog: &mut SchedClassifier, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    let id = prog.attach_to_link(link).map_err(|e| format!("{e:#}"))?;
    // The pin keeps the link; our fd can go.
    drop(prog.take_link(id).map_err(|e| e.to_string())?);
    Ok(())
}

/// The agent's log level as aya-log's level number (0 = off, 1 = error … 5 = trace).
/// [`OBJECT`] loaded (programs not yet) against the pinned maps of `layout`, the peer-keyed
/// maps sized for `capacity` peers: the one way both the datapath and the pod programs
/// open the object, so they always agree on the maps.
fn load_object(layout: &PinLayout, capacity: u32) -> Result<Ebpf, FallbackReason> {
    // Log statements below the agent's level cost the programs one branch, nothing more.
    static LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];
    let log_level = &LEVELS[usize::from(ebpf_log_level().min(5))];
    let mut shared = LOADER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let loader = shared.get_or_insert_with(|| {
        // `EbpfLoader::new` parses the kernel's BTF (`/sys/kernel/btf/vmlinux`, 5 MB,
        // ~17 MB once parsed), which only CO-RE relocations use, and the object has none
        // (its .BTF.ext holds function and line info only; the maps' BTF, which bpftool
        // prints field names from, is the object's own). Drop the parse at once, before
        // the object's load allocates, and create the loader once per process: the
        // datapath and the pod programs no longer parse it twice, the second time on top
        // of thousands of peers.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        release_freed_memory();
        loader
    });
    loader.override_global("AYA_LOG_LEVEL", log_level, false);
    // Set for every load: one process may load for several layouts (tests do).
    for name in names::ALL_MAPS {
        loader.map_pin_path(name, layout.map(name));
    }
    for name in names::PEER_MAPS {
        loader.map_max_entries(name, capacity);
    }
    let loaded = loader
        .load(OBJECT)
        .map_err(|e| FallbackReason::Load(format!("{e:#}")));
    drop(shared);
    release_freed_memory();
    loaded
}

/// The process's one object loader (see [`load_object`]).
static LOADER: std::sync::Mutex<Option<EbpfLoader<'static>>> = std::sync::Mutex::new(None);

/// glibc keeps freed pages in its arenas: after a load's transient allocations (the ELF
/// parse, relocations, the verifier's log buffers), hand them back, so the agent's
/// resident size is what it holds.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn ebpf_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => 1,
        LevelFilter::WARN => 2,
        LevelFilter::INFO => 3,
        LevelFilter::DEBUG => 4,
        _ => 5,
    }
}

/// Forward the programs' aya-log records into our tracing logs (via the `log` bridge).
fn start_log_forwarder(ebpf: &mut Ebpf, cancel: CancellationToken) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            debug!(error = %e, "no eBPF log records to forward");
            return;
        }
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer fd and moves into the AsyncFd, so the fd
        // stays open and unchanged for as long as it is registered.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let Ok(mut fd) = registered else {
            return;
        };
        loop {
            let ready = tokio::select! {
                () = cancel.cancelled() => return,
                r = fd.readable_mut() => r,
            };
            let Ok(mut guard) = ready else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_versions_are_the_old_layout_directories_only() {
        let root = tempfile::tempdir().unwrap();
        for d in ["v1", LAYOUT_VERSION, "v", "vx", "maps"] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        let layout = PinLayout::new(root.path());
        assert_eq!(layout.other_versions(), vec![root.path().join("v1")]);
    }
}

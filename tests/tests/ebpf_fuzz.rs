//! Randomized packets through the real programs with `BPF_PROG_TEST_RUN`: truncated
//! frames, wrong IPv4/UDP lengths and checksums, IP options, first/middle/last fragments,
//! every VXLAN flag combination (I, G/GBP, D, A, reserved bits), wrong VNIs and ports,
//! strangers and the known peer, inner frames that are not IPv4 or not for us, tiny and
//! large packets — under every datapath configuration the agent sets.
//!
//! Each verdict is checked against a model of what the program must do, computed from the
//! packet's bytes alone (not from how it was generated): VXLAN from a stranger is always
//! dropped (options and first fragments included) unless the peer check is off; what is
//! not ours leaves untouched; what is delivered is exactly the inner frame of a packet whose
//! outer headers the kernel would accept; what is encapsulated carries well-formed outer
//! headers. Counters must agree with the model's reasons. The seed is printed; rerun a
//! failure with `FLANNEL_FUZZ_SEED=<seed>` (and `FLANNEL_FUZZ_CASES=<n>` per run).

use aya::maps::{HashMap, MapData};
use flannel_common::{
    DropReason, Endpoint, EndpointKey, PassReason,
    maps::{
        CONFIG_F_ANY_PEER, CONFIG_F_ENABLED, CONFIG_F_FAST_INGRESS, CONFIG_F_FLOW_CACHE,
        CONFIG_F_GBP,
    },
    names, wire,
};
use flannel_e2e::progs::{
    LOCAL_IP, Loaded, OUR_MAC, PEER_IP, PEER_MAC, PEER_SUBNET, PinDir, TC_ACT_OK, TC_ACT_REDIRECT,
    TC_ACT_SHOT, in_fresh_netns,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// A local pod the opt-in all-flows fast path knows (ENDPOINTS).
const POD: [u8; 4] = [10, 244, 1, 5];
const POD_MAC: [u8; 6] = [0x02, 0x0d, 0, 0, 0, 5];
const VETH_MAC: [u8; 6] = [0x02, 0x0e, 0, 0, 0, 5];
/// The largest packet `BPF_PROG_TEST_RUN` takes for an skb program (a page less head and
/// tail room), rounded down.
const MAX_LEN: usize = 3500;

fn seed_and_cases() -> (u64, usize) {
    let seed = std::env::var("FLANNEL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let cases = std::env::var("FLANNEL_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2500);
    (seed, cases)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// RFC 1071 sum of `b` folded and inverted: zero for a header with a valid checksum.
fn fold(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|w| u32::from(be16(w))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a program must do with one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// `TC_ACT_OK` with the packet unchanged; counted as this pass reason (`None`: not ours,
    /// uncounted).
    Untouched(Option<PassReason>),
    /// `TC_ACT_SHOT`, counted as this reason.
    Drop(DropReason),
    /// `TC_ACT_REDIRECT` with exactly these bytes, and this `skb->mark` (GBP).
    Deliver(Vec<u8>, u32),
    /// `TC_ACT_REDIRECT` with outer headers in front of the frame (checked separately).
    Encap,
}

/// The kernel's VXLAN header rule (`vxlan_rcv`), as bits: the I flag; with GBP and the G
/// flag, also D, A and the policy id; the rest of the first word and the last byte zero.
/// Returns the mark the kernel gives the inner packet.
fn kernel_vxlan(h: &[u8], gbp: bool) -> Option<u32> {
    let w = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let g = gbp && w & 0x8000_0000 != 0;
    let allowed = 0x0800_0000 | if g { 0x8040_ffff | 0x0008_0000 } else { 0 };
    if w & 0x0800_0000 == 0 || w & !allowed != 0 || h[7] != 0 {
        return None;
    }
    if !g {
        return Some(0);
    }
    let mut mark = w & 0xffff;
    if w & 0x0040_0000 != 0 {
        mark |= wire::GBP_MARK_DONT_LEARN;
    }
    if w & 0x0008_0000 != 0 {
        mark |= wire::GBP_MARK_POLICY_APPLIED;
    }
    Some(mark)
}

/// The model of `vxlan_decap` under configuration `flags`, from the packet's bytes.
fn expect_decap(p: &[u8], flags: u32) -> Expect {
    use Expect::*;
    if p.len() < 34 || be16(&p[12..]) != wire::ETH_P_IP {
        return Untouched(None);
    }
    let ip = &p[14..34];
    if ip[9] != wire::IPPROTO_UDP || ip[16..20] != LOCAL_IP {
        return Untouched(None);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Untouched(None);
    }
    let known = ip[12..16] == PEER_IP;
    let frag = be16(&ip[6..]);
    if frag & 0x1fff != 0 {
        // A non-first fragment: not identifiable as VXLAN.
        return Untouched(known.then_some(PassReason::Fragment));
    }
    if p.len() < 14 + ihl + 4 || be16(&p[14 + ihl + 2..]) != 8472 {
        return Untouched(None);
    }
    // VXLAN to us. The security property: a stranger's never gets past this point.
    if !known {
        return if flags & CONFIG_F_ANY_PEER != 0 {
            Untouched(Some(PassReason::UnknownPeer))
        } else {
            Drop(DropReason::UnknownPeer)
        };
    }
    if ihl != 20 || frag & 0x3fff != 0 {
        return Untouched(Some(PassReason::Fragment));
    }
    // Only what the kernel would take without trimming is decapsulated here.
    let total = usize::from(be16(&ip[2..]));
    if p.len() < 40
        || fold(ip) != 0
        || total != p.len() - 14
        || usize::from(be16(&p[38..])) + 20 != total
    {
        return Untouched(Some(PassReason::BadOuter));
    }
    if p.len() < 50 {
        return Drop(DropReason::Malformed);
    }
    let Some(mark) = kernel_vxlan(&p[42..50], flags & CONFIG_F_GBP != 0) else {
        return Drop(DropReason::BadFlags);
    };
    if p[46..49] != [0, 0, 1] {
        return Drop(DropReason::BadVni);
    }
    if p.len() < 64 {
        return Drop(DropReason::Malformed);
    }
    if p[50..56] != OUR_MAC {
        return Untouched(Some(PassReason::NotForUs));
    }
    if be16(&p[62..]) != wire::ETH_P_IP {
        return Untouched(Some(PassReason::NotIpv4));
    }
    if p.len() < 80 {
        return Drop(DropReason::Malformed);
    }
    if !wire::in_subnet(p[76..80].try_into().unwrap(), PEER_SUBNET, 24) {
        return Untouched(Some(PassReason::ForeignSource));
    }
    let inner = p[50..].to_vec();
    if flags & CONFIG_F_FAST_INGRESS != 0 {
        if p.len() < 84 {
            return Drop(DropReason::Malformed);
        }
        if p[80..84] == POD {
            let mut out = inner;
            out[0..6].copy_from_slice(&POD_MAC);
            out[6..12].copy_from_slice(&VETH_MAC);
            return Deliver(out, mark);
        }
    }
    // `bpf_skb_adjust_room` keeps at least an IPv4 header's worth behind the MAC header.
    if p.len() < 14 + 50 + 20 {
        return Untouched(Some(PassReason::HelperFailed));
    }
    Deliver(inner, mark)
}

/// The model of `vxlan_encap` for a frame the kernel routed into `flannel.1`.
fn expect_encap(p: &[u8]) -> Expect {
    if be16(&p[12..]) != wire::ETH_P_IP || p.len() < 34 {
        return Expect::Untouched(Some(PassReason::NotIpv4));
    }
    if wire::in_subnet(p[30..34].try_into().unwrap(), PEER_SUBNET, 24) {
        Expect::Encap
    } else {
        Expect::Untouched(Some(PassReason::NoRoute))
    }
}

/// An encapsulated frame is what the Linux VXLAN driver would send for `inner`.
fn check_encapsulated(inner: &[u8], out: &[u8]) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{what}: {:02x?}", &out[..out.len().min(64)]));
    if out.len() != inner.len() + 50 {
        return fail("length is not +50");
    }
    let ip = &out[14..34];
    if be16(&out[12..]) != wire::ETH_P_IP || ip[0] != 0x45 || ip[9] != wire::IPPROTO_UDP {
        return fail("outer IPv4/UDP header");
    }
    if usize::from(be16(&ip[2..])) != out.len() - 14 || fold(ip) != 0 {
        return fail("outer IPv4 length or checksum");
    }
    if be16(&ip[6..]) != 0 || ip[8] != 64 || ip[12..16] != LOCAL_IP || ip[16..20] != PEER_IP {
        return fail("outer fragment field, TTL or addresses");
    }
    if ip[1] != wire::outer_tos(inner[15]) {
        return fail("outer TOS");
    }
    let sport = be16(&out[34..]);
    if !(32768..61000).contains(&sport) || be16(&out[36..]) != 8472 {
        return fail("UDP ports");
    }
    if usize::from(be16(&out[38..])) != out.len() - 34 || out[40..42] != [0, 0] {
        return fail("UDP length or checksum");
    }
    if out[42..50] != wire::vxlan_header(1) {
        return fail("VXLAN header");
    }
    if out[50..56] != PEER_MAC || out[56..62] != OUR_MAC || be16(&out[62..]) != wire::ETH_P_IP {
        return fail("inner Ethernet header");
    }
    if out[64..] != inner[14..] {
        return fail("inner packet changed");
    }
    Ok(())
}

/// The index of one of `weights`, drawn in proportion to them.
fn pick(rng: &mut StdRng, weights: &[u32]) -> usize {
    let mut n = rng.random_range(0..weights.iter().sum::<u32>());
    for (i, w) in weights.iter().enumerate() {
        if n < *w {
            return i;
        }
        n -= w;
    }
    unreachable!()
}

/// IPv4 option bytes: mostly NOPs, some anything (option kinds and lengths included).
fn ip_options(rng: &mut StdRng, options: &mut [u8]) {
    for b in options {
        *b = if rng.random_bool(0.75) {
            1
        } else {
            rng.random()
        };
    }
}

/// An inner frame: mostly IPv4 TCP/UDP/ICMP between pod addresses, sometimes anything.
fn inner_frame(
    rng: &mut StdRng,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    let ethertype: u16 = match pick(rng, &[8, 1, 1, 1]) {
        0 => 0x0800,
        1 => 0x0806,
        2 => 0x86dd,
        _ => rng.random(),
    };
    f.extend_from_slice(&ethertype.to_be_bytes());
    let options = match pick(rng, &[9, 1]) {
        0 => 0,
        _ => 4 * rng.random_range(1..=10),
    };
    let proto: u8 = match pick(rng, &[4, 4, 1, 1]) {
        0 => 6,
        1 => 17,
        2 => 1,
        _ => rng.random(),
    };
    let payload = match pick(rng, &[6, 3, 1]) {
        0 => rng.random_range(0..64),
        1 => rng.random_range(64..1400),
        _ => rng.random_range(1400..3300),
    };
    let l4 = match proto {
        6 => 20,
        17 | 1 => 8,
        _ => 0,
    };
    let total = (20 + options + l4 + payload) as u16;
    let mut ip = vec![0u8; 20 + options];
    ip[0] = 0x40 | ((20 + options) / 4) as u8;
    ip[1] = rng.random();
    let claimed: u16 = match pick(rng, &[9, 1]) {
        0 => total,
        _ => rng.random(),
    };
    ip[2..4].copy_from_slice(&claimed.to_be_bytes());
    ip[4..6].copy_from_slice(&rng.random::<u16>().to_be_bytes());
    let frag: u16 = match pick(rng, &[8, 1, 1]) {
        0 => 0x4000,
        1 => 0,
        _ => rng.random(),
    };
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = match pick(rng, &[9, 1]) {
        0 => 64,
        _ => rng.random_range(0..2),
    };
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    ip_options(rng, &mut ip[20..]);
    let c = fold(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut rest = vec![0u8; l4 + payload];
    rng.fill(&mut rest[..]);
    if proto == 6 {
        rest[12] = 0x50;
        rest[13] = match pick(rng, &[6, 1, 1, 1, 1]) {
            0 => 0x10,
            1 => 0x02,
            2 => 0x11,
            3 => 0x04,
            _ => rng.random(),
        };
    }
    if proto == 17 {
        rest[4..6].copy_from_slice(&((l4 + payload) as u16).to_be_bytes());
    }
    f.extend_from_slice(&rest);
    f
}

/// A packet arriving on the uplink: a VXLAN packet to us, mostly well-formed, with any of
/// the faults the decap program must survive.
fn uplink_packet(rng: &mut StdRng) -> Vec<u8> {
    // A third of the packets are clean (only the inner frame varies), so deliveries are
    // common enough to check their bytes; the rest draw every fault.
    let clean = rng.random_bool(0.3);
    let pick = |rng: &mut StdRng, weights: &[u32]| if clean { 0 } else { pick(rng, weights) };
    let sound = |rng: &mut StdRng, p: f64| clean || rng.random_bool(p);
    let outer_src: [u8; 4] = match pick(rng, &[6, 3, 1]) {
        0 => PEER_IP,
        1 => [198, 18, rng.random_range(0..4), rng.random()],
        _ => rng.random(),
    };
    let outer_dst: [u8; 4] = match pick(rng, &[19, 1]) {
        0 => LOCAL_IP,
        _ => rng.random(),
    };
    let inner_src: [u8; 4] = match pick(rng, &[7, 2, 1]) {
        0 => [10, 244, 2, rng.random()],
        1 => PEER_IP,
        _ => rng.random(),
    };
    let inner_dst: [u8; 4] = match pick(rng, &[4, 4, 1]) {
        0 => POD,
        1 => [10, 244, 1, rng.random()],
        _ => rng.random(),
    };
    let inner_mac: [u8; 6] = match pick(rng, &[9, 1]) {
        0 => OUR_MAC,
        _ => rng.random(),
    };
    let inner = inner_frame(rng, inner_mac, PEER_MAC, inner_src, inner_dst);

    // Every flag combination shows up: the first two header bytes are the ones peers send
    // (I; G with D and A) or, often, anything.
    let mut vx = [0u8; 8];
    vx[0] = match pick(rng, &[5, 2, 3]) {
        0 => wire::VXLAN_FLAGS_I,
        1 => wire::VXLAN_FLAGS_I | wire::VXLAN_FLAGS_G,
        _ => rng.random(),
    };
    vx[1] = match pick(rng, &[6, 1, 1, 1, 1]) {
        0 => 0,
        1 => wire::VXLAN_GBP_D,
        2 => wire::VXLAN_GBP_A,
        3 => wire::VXLAN_GBP_D | wire::VXLAN_GBP_A,
        _ => rng.random(),
    };
    if !sound(rng, 0.5) {
        vx[2] = rng.random();
        vx[3] = rng.random();
    }
    let vni: u32 = match pick(rng, &[8, 1, 1]) {
        0 => 1,
        1 => 2,
        _ => rng.random_range(0..1 << 24),
    };
    vx[4..7].copy_from_slice(&vni.to_be_bytes()[1..]);
    vx[7] = if sound(rng, 0.9) { 0 } else { rng.random() };

    let udp_total = (8 + 8 + inner.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&rng.random::<u16>().to_be_bytes());
    let dport: u16 = match pick(rng, &[17, 2, 1]) {
        0 => 8472,
        1 => 4789,
        _ => rng.random(),
    };
    udp.extend_from_slice(&dport.to_be_bytes());
    let udp_len: u16 = match pick(rng, &[17, 1, 2]) {
        0 => udp_total,
        1 => rng.random(),
        _ => udp_total.wrapping_add(rng.random_range(1..9)),
    };
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&rng.random::<u16>().to_be_bytes());
    udp.extend_from_slice(&vx);
    udp.extend_from_slice(&inner);

    let options = match pick(rng, &[8, 2]) {
        0 => 0,
        _ => 4 * rng.random_range(1..=10),
    };
    let hl = 20 + options;
    let mut ip = vec![0u8; hl];
    let ihl = match pick(rng, &[49, 1]) {
        0 => (hl / 4) as u8,
        _ => rng.random_range(0..16),
    };
    let version = match pick(rng, &[49, 1]) {
        0 => 4,
        _ => rng.random_range(0..16),
    };
    ip[0] = version << 4 | ihl;
    ip[1] = rng.random();
    let total = (hl + udp.len()) as u16;
    let claimed: u16 = match pick(rng, &[17, 1, 2]) {
        0 => total,
        1 => rng.random(),
        _ => total.wrapping_sub(rng.random_range(1..9)),
    };
    ip[2..4].copy_from_slice(&claimed.to_be_bytes());
    ip[4..6].copy_from_slice(&rng.random::<u16>().to_be_bytes());
    let offset: u16 = rng.random_range(1..0x1fff);
    // Unfragmented, DF, first (MF), middle (MF and an offset), last (an offset).
    let frag: u16 = match pick(rng, &[14, 2, 2, 1, 1]) {
        0 => 0,
        1 => 0x4000,
        2 => 0x2000,
        3 => 0x2000 | offset,
        _ => offset,
    };
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = rng.random_range(1..=255);
    ip[9] = if sound(rng, 0.95) {
        wire::IPPROTO_UDP
    } else {
        rng.random()
    };
    ip[12..16].copy_from_slice(&outer_src);
    ip[16..20].copy_from_slice(&outer_dst);
    ip_options(rng, &mut ip[20..]);
    let checksum = if sound(rng, 0.95) {
        fold(&ip)
    } else {
        rng.random()
    };
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());

    let mut p = Vec::new();
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x10, 0x02, 0, 0, 0, 0, 0x20]);
    let ethertype = if sound(rng, 0.97) {
        wire::ETH_P_IP
    } else {
        rng.random()
    };
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&udp);
    // Truncated anywhere (down to a bare Ethernet header), or cut to the test-run maximum.
    if !sound(rng, 0.88) {
        let at = rng.random_range(14..=p.len());
        p.truncate(at);
        // Often with lengths and checksum made to agree: a peer really sending a VXLAN
        // packet too short for its headers.
        if hl == 20 && p.len() >= 42 && rng.random_bool(0.5) {
            let total = (p.len() - 14) as u16;
            p[16..18].copy_from_slice(&total.to_be_bytes());
            p[38..40].copy_from_slice(&(total - 20).to_be_bytes());
            p[24..26].copy_from_slice(&[0, 0]);
            let c = fold(&p[14..34]);
            p[24..26].copy_from_slice(&c.to_be_bytes());
        }
    }
    p.truncate(MAX_LEN);
    p
}

/// What the kernel routed into `flannel.1`: a frame to the peer's VTEP, or anything.
fn vxlan_device_frame(rng: &mut StdRng) -> Vec<u8> {
    let dst: [u8; 4] = match pick(rng, &[6, 3, 1]) {
        0 => [10, 244, 2, rng.random()],
        1 => [10, 244, rng.random(), rng.random()],
        _ => rng.random(),
    };
    let mut f = inner_frame(rng, PEER_MAC, OUR_MAC, POD, dst);
    if rng.random_bool(0.1) {
        let at = rng.random_range(14..=f.len());
        f.truncate(at);
    }
    f.truncate(MAX_LEN - 50);
    f
}

/// Per-reason counter values of the drops and passes maps.
fn counters(dp: &Loaded) -> (Vec<u64>, Vec<u64>) {
    (
        DropReason::ALL
            .iter()
            .map(|r| dp.counter(names::MAP_DROPS, *r as u32))
            .collect(),
        PassReason::ALL
            .iter()
            .map(|r| dp.counter(names::MAP_PASSES, *r as u32))
            .collect(),
    )
}

#[derive(Default)]
struct Tally {
    drops: Vec<u64>,
    passes: Vec<u64>,
    delivered: u64,
    encapsulated: u64,
    ignored: u64,
    stranger_drops: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            drops: vec![0; DropReason::ALL.len()],
            passes: vec![0; PassReason::ALL.len()],
            ..Self::default()
        }
    }

    fn add(&mut self, other: &Tally) {
        for (a, b) in self.drops.iter_mut().zip(&other.drops) {
            *a += b;
        }
        for (a, b) in self.passes.iter_mut().zip(&other.passes) {
            *a += b;
        }
        self.delivered += other.delivered;
        self.encapsulated += other.encapsulated;
        self.ignored += other.ignored;
        self.stranger_drops += other.stranger_drops;
    }

    fn count(&mut self, e: &Expect) {
        match e {
            Expect::Untouched(Some(r)) => self.passes[*r as usize] += 1,
            Expect::Untouched(None) => self.ignored += 1,
            Expect::Drop(r) => {
                self.drops[*r as usize] += 1;
                if *r == DropReason::UnknownPeer {
                    self.stranger_drops += 1;
                }
            }
            Expect::Deliver(..) => self.delivered += 1,
            Expect::Encap => self.encapsulated += 1,
        }
    }
}

/// Runs `prog` on `packet` with a context buffer, returning the verdict, the output bytes
/// and `skb->mark` as the program left it. `None` when the test runner itself refuses the
/// frame, which 6.18 does for one shorter than its L3 header (IPv4 under 34 bytes, IPv6
/// under 54); any other refusal fails the test.
fn run(dp: &mut Loaded, prog: &str, packet: &[u8]) -> Option<(u32, Vec<u8>, u32)> {
    match dp.try_run_with_context(prog, packet) {
        Ok((verdict, out, ctx)) => {
            // `struct __sk_buff`: len, pkt_type, mark.
            let mark = u32::from_ne_bytes(ctx[8..12].try_into().unwrap());
            Some((verdict, out, mark))
        }
        Err(e) => {
            let l3 = match be16(&packet[12..]) {
                0x0800 => 20,
                0x86dd => 40,
                _ => 0,
            };
            assert!(
                packet.len() < 14 + l3,
                "test_run {prog} on {}: {e:?}",
                describe(packet)
            );
            None
        }
    }
}

fn describe(p: &[u8]) -> String {
    format!("{} bytes: {:02x?}", p.len(), &p[..p.len().min(96)])
}

/// Runs `prog` on `p` and checks the verdict, the output and the counters against `want`:
/// exactly one drop or pass reason counted, the one the model names (none for what is
/// not ours or is delivered). `false` when the test runner refused the frame.
fn check(dp: &mut Loaded, what: &str, prog: &str, p: &[u8], want: &Expect) -> bool {
    let before = counters(dp);
    let Some((verdict, out, mark)) = run(dp, prog, p) else {
        return false;
    };
    let ok = match want {
        Expect::Untouched(_) => verdict == TC_ACT_OK && out == p,
        Expect::Drop(_) => verdict == TC_ACT_SHOT,
        Expect::Deliver(bytes, m) => verdict == TC_ACT_REDIRECT && &out == bytes && mark == *m,
        Expect::Encap => verdict == TC_ACT_REDIRECT,
    };
    assert!(
        ok,
        "{what}: want {want:?}, got verdict {verdict} mark {mark:#x}\n in: {}\nout: {}",
        describe(p),
        describe(&out)
    );
    if *want == Expect::Encap
        && let Err(e) = check_encapsulated(p, &out)
    {
        panic!("{what}: encapsulation of {}: {e}", describe(p));
    }
    let (mut drops, mut passes) = before;
    match want {
        Expect::Drop(r) => drops[*r as usize] += 1,
        Expect::Untouched(Some(r)) => passes[*r as usize] += 1,
        _ => {}
    }
    assert_eq!(
        counters(dp),
        (drops, passes),
        "{what}: counters (drops, passes) for {want:?}: {}",
        describe(p)
    );
    true
}

#[test]
fn random_packets_get_the_verdict_the_model_gives() {
    if !flannel_e2e::require_root() {
        return;
    }
    let (seed, cases) = seed_and_cases();
    eprintln!(
        "ebpf_fuzz: seed {seed}, {cases} cases per program and configuration (FLANNEL_FUZZ_SEED={seed} to rerun)"
    );
    let pins = PinDir::new("fuzz");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let started = std::time::Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        // Loading is the verifier check: every program must load under this kernel.
        let mut dp = Loaded::new(&pin_path);
        dp.load_pod_programs();
        let mut endpoints: HashMap<&mut MapData, EndpointKey, Endpoint> =
            HashMap::try_from(dp.ebpf.map_mut(names::MAP_ENDPOINTS).unwrap()).unwrap();
        endpoints
            .insert(
                EndpointKey { addr: POD },
                Endpoint {
                    ifindex: 42,
                    pod_mac: POD_MAC,
                    host_mac: VETH_MAC,
                },
                0,
            )
            .unwrap();

        let configurations = [
            ("default", 0),
            ("GBP", CONFIG_F_GBP),
            ("peer check off", CONFIG_F_ANY_PEER),
            ("per-flow fast path", CONFIG_F_FLOW_CACHE),
            ("all-flows fast path", CONFIG_F_FAST_INGRESS),
            (
                "GBP, check off, flow cache",
                CONFIG_F_GBP | CONFIG_F_ANY_PEER | CONFIG_F_FLOW_CACHE,
            ),
        ];
        let (mut total_runs, mut refused, mut total) = (0, 0, Tally::new());
        for (name, extra) in configurations {
            let flags = CONFIG_F_ENABLED | extra;
            dp.set_flags(flags);
            let mut tally = Tally::new();
            for i in 0..cases {
                let p = uplink_packet(&mut rng);
                let want = expect_decap(&p, flags);
                let what = format!("seed {seed}, {name}, decap case {i}");
                if check(&mut dp, &what, names::PROG_DECAP, &p, &want) {
                    tally.count(&want);
                } else {
                    refused += 1;
                }
            }
            for i in 0..cases / 2 {
                let f = vxlan_device_frame(&mut rng);
                let want = expect_encap(&f);
                let what = format!("seed {seed}, {name}, encap case {i}");
                if check(&mut dp, &what, names::PROG_ENCAP, &f, &want) {
                    tally.count(&want);
                } else {
                    refused += 1;
                }
            }
            total_runs += cases + cases / 2;
            eprintln!(
                "  {name}: {} delivered, {} encapsulated, {} dropped ({} from strangers), {} to the kernel, {} not ours",
                tally.delivered,
                tally.encapsulated,
                tally.drops.iter().sum::<u64>(),
                tally.stranger_drops,
                tally.passes.iter().sum::<u64>(),
                tally.ignored
            );
            if extra & CONFIG_F_ANY_PEER == 0 {
                assert!(
                    tally.stranger_drops > 0,
                    "{name}: no stranger VXLAN generated"
                );
            }
            total.add(&tally);
        }
        // The generator reaches every interesting outcome (over all configurations, so a
        // rare reason cannot miss by chance), so every branch of the model is exercised.
        assert!(total.delivered > 0 && total.encapsulated > 0 && total.ignored > 0);
        for r in [
            DropReason::BadFlags,
            DropReason::BadVni,
            DropReason::Malformed,
        ] {
            let n = total.drops[r as usize];
            eprintln!("  drop {}: {n}", r.as_str());
            assert!(n > 0, "no {} case", r.as_str());
        }
        for r in [
            PassReason::Fragment,
            PassReason::BadOuter,
            PassReason::ForeignSource,
            PassReason::NotForUs,
            PassReason::NotIpv4,
            PassReason::NoRoute,
            PassReason::UnknownPeer,
        ] {
            let n = total.passes[r as usize];
            eprintln!("  pass {}: {n}", r.as_str());
            assert!(n > 0, "no {} case", r.as_str());
        }

        // The pod-side programs with the per-flow fast path on: no flow here was ever
        // confirmed after netfilter, so nothing may take the fast path — whatever the frame.
        dp.set_flags(CONFIG_F_ENABLED | CONFIG_F_FLOW_CACHE);
        for i in 0..cases {
            let src: [u8; 4] = if rng.random_bool(0.8) {
                POD
            } else {
                rng.random()
            };
            let dst: [u8; 4] = if rng.random_bool(0.6) {
                [10, 244, 2, rng.random()]
            } else {
                rng.random()
            };
            let mut f = inner_frame(&mut rng, [0x02, 0, 0, 0, 0, 9], POD_MAC, src, dst);
            if rng.random_bool(0.1) {
                let at = rng.random_range(14..=f.len());
                f.truncate(at);
            }
            f.truncate(MAX_LEN);
            for prog in [names::PROG_FROM_POD, names::PROG_TO_POD] {
                let Some((verdict, out, _)) = run(&mut dp, prog, &f) else {
                    refused += 1;
                    continue;
                };
                assert_eq!(
                    (verdict, &out),
                    (TC_ACT_OK, &f),
                    "seed {seed}, {prog} case {i}: an unverified flow must take the kernel path untouched: {}",
                    describe(&f)
                );
            }
        }
        total_runs += 2 * cases;
        eprintln!(
            "ebpf_fuzz: {total_runs} cases in {:.1?} ({refused} frames too short for the test runner)",
            started.elapsed()
        );
    });
}

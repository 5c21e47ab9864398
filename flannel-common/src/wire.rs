//! Wire constants and the small pieces of arithmetic both sides must agree on. Pure
//! functions, so they are unit-tested on the host and used unchanged by the programs.

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// IPv4 header length without options.
pub const IPV4_LEN: usize = 20;
/// UDP header length.
pub const UDP_LEN: usize = 8;
/// VXLAN header length.
pub const VXLAN_LEN: usize = 8;
/// Bytes VXLAN over IPv4 adds in front of the inner IP packet: outer IPv4 + UDP + VXLAN +
/// inner Ethernet. The pod MTU is the uplink MTU minus this (1500 → 1450).
pub const VXLAN_OVERHEAD: usize = IPV4_LEN + UDP_LEN + VXLAN_LEN + ETH_LEN;
/// IPv6 header length (no extension headers).
pub const IPV6_LEN: usize = 40;
/// Bytes VXLAN over IPv6 adds in front of the inner IP packet: outer IPv6 + UDP + VXLAN +
/// inner Ethernet (1500 → 1430 on `flannel-v6.<VNI>`).
pub const VXLAN6_OVERHEAD: usize = IPV6_LEN + UDP_LEN + VXLAN_LEN + ETH_LEN;
/// flannel's VXLAN UDP port (Linux's pre-IANA default; flannel never sends another unless
/// configured).
pub const FLANNEL_VXLAN_PORT: u16 = 8472;
/// flannel's default VNI.
pub const FLANNEL_VNI: u32 = 1;
/// VXLAN flags byte with only the I (valid VNI) bit set.
pub const VXLAN_FLAGS_I: u8 = 0x08;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IPv6 next header of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// `a` as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`): how the peer-keyed maps hold
/// IPv4 addresses (see [`crate::Route`]).
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// The IPv4 address in the last four bytes of a mapped one (see [`v4_mapped`]).
#[inline(always)]
pub const fn v4_unmapped(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Prefix length of the IPv4-mapped range: an IPv4 `/n` is the mapped `/96+n`.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// Whether `a` is IPv4-mapped. The kernel drops IPv6 packets with such addresses
/// (`ip6_rcv_core`), and the programs never look them up, so an IPv6 packet cannot
/// match an IPv4 entry.
#[inline(always)]
pub const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// The outer UDP source port the Linux VXLAN driver would pick for a flow hash
/// (`udp_flow_src_port` in the kernel): spreads flows over `[min, max)` for ECMP/RSS.
#[inline(always)]
pub const fn vxlan_source_port(hash: u32, min: u16, max: u16) -> u16 {
    let h = hash ^ (hash << 16);
    let span = max.saturating_sub(min) as u64;
    (((h as u64) * span) >> 32) as u16 + min
}

/// The VXLAN header for `vni`: flags, three reserved bytes, the 24-bit VNI, one reserved
/// byte.
#[inline(always)]
pub const fn vxlan_header(vni: u32) -> [u8; VXLAN_LEN] {
    [
        VXLAN_FLAGS_I,
        0,
        0,
        0,
        (vni >> 16) as u8,
        (vni >> 8) as u8,
        vni as u8,
        0,
    ]
}

/// G bit of the VXLAN flags byte: a Group Based Policy id follows (draft-smith-vxlan-
/// group-policy, the kernel's `gbp` option).
pub const VXLAN_FLAGS_G: u8 = 0x80;
/// GBP "don't learn" bit, in the second header byte.
pub const VXLAN_GBP_D: u8 = 0x40;
/// GBP "policy applied" bit, in the second header byte.
pub const VXLAN_GBP_A: u8 = 0x08;
/// Where the kernel's VXLAN driver puts the D bit in `skb->mark` (`VXLAN_GBP_DONT_LEARN`).
pub const GBP_MARK_DONT_LEARN: u32 = 1 << 22;
/// Where it puts the A bit (`VXLAN_GBP_POLICY_APPLIED`).
pub const GBP_MARK_POLICY_APPLIED: u32 = 1 << 19;

/// What a VXLAN header says, once accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanHeader {
    /// The 24-bit VNI.
    pub vni: u32,
    /// With GBP and the G bit set: the `skb->mark` the kernel device gives the inner packet
    /// (policy id, plus the D and A bits at the kernel's positions).
    pub gbp_mark: Option<u32>,
}

/// Parse a VXLAN header the way the kernel device does (`vxlan_rcv`): the I bit must be set
/// and every other flag and reserved bit clear — except, when the device uses GBP (`gbp`)
/// and the G bit is set, the D and A bits and the 16-bit policy id. Without the G bit those
/// stay reserved even on a GBP device (the kernel parses the GBP fields only behind G).
/// `None` means the kernel would drop the frame.
#[inline(always)]
pub const fn parse_vxlan_header(h: &[u8; VXLAN_LEN], gbp: bool) -> Option<VxlanHeader> {
    let g = gbp && h[0] & VXLAN_FLAGS_G != 0;
    let (flags, second, policy) = if g {
        (
            h[0] & !VXLAN_FLAGS_G,
            h[1] & !(VXLAN_GBP_D | VXLAN_GBP_A),
            0,
        )
    } else {
        (h[0], h[1], h[2] | h[3])
    };
    if flags != VXLAN_FLAGS_I || second != 0 || policy != 0 || h[7] != 0 {
        return None;
    }
    let vni = ((h[4] as u32) << 16) | ((h[5] as u32) << 8) | h[6] as u32;
    let gbp_mark = if g {
        let mut mark = ((h[2] as u32) << 8) | h[3] as u32;
        if h[1] & VXLAN_GBP_D != 0 {
            mark |= GBP_MARK_DONT_LEARN;
        }
        if h[1] & VXLAN_GBP_A != 0 {
            mark |= GBP_MARK_POLICY_APPLIED;
        }
        Some(mark)
    } else {
        None
    };
    Some(VxlanHeader { vni, gbp_mark })
}

/// The VXLAN-GBP header the kernel device (with `gbp`) writes for a packet carrying
/// `mark`: the plain header when the mark is zero, else the G bit, the policy id from the
/// low 16 bits, and the D and A bits from theirs.
#[inline(always)]
pub const fn vxlan_gbp_header(vni: u32, mark: u32) -> [u8; VXLAN_LEN] {
    let mut h = vxlan_header(vni);
    if mark == 0 {
        return h;
    }
    h[0] |= VXLAN_FLAGS_G;
    if mark & GBP_MARK_DONT_LEARN != 0 {
        h[1] |= VXLAN_GBP_D;
    }
    if mark & GBP_MARK_POLICY_APPLIED != 0 {
        h[1] |= VXLAN_GBP_A;
    }
    h[2] = (mark >> 8) as u8;
    h[3] = mark as u8;
    h
}

/// One's-complement checksum of an IPv4 header without options (the checksum field must be
/// zero in `h`). Loop-free: the verifier rejects unbounded folding loops.
#[inline(always)]
pub const fn ipv4_header_checksum(h: &[u8; IPV4_LEN]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_LEN {
        sum += ((h[i] as u32) << 8) | h[i + 1] as u32;
        i += 2;
    }
    // Ten 16-bit words sum to at most 20 bits: two folds always suffice.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Whether `addr` lies in `subnet/prefix_len` (all network order).
#[inline(always)]
pub const fn in_subnet(addr: [u8; 4], subnet: [u8; 4], prefix_len: u32) -> bool {
    if prefix_len == 0 {
        return true;
    }
    if prefix_len > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - prefix_len);
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(subnet) & mask)
}

/// Whether `addr` lies in `subnet/prefix_len`, 16-byte addresses over 128 bits (both
/// network order; IPv4 as mapped addresses and prefixes). Two 64-bit halves: the BPF
/// target has no 128-bit shifts.
#[inline(always)]
pub const fn in_subnet16(addr: [u8; 16], subnet: [u8; 16], prefix_len: u32) -> bool {
    if prefix_len > 128 {
        return false;
    }
    let (a_hi, a_lo) = halves(&addr);
    let (s_hi, s_lo) = halves(&subnet);
    let (m_hi, m_lo) = if prefix_len == 0 {
        (0, 0)
    } else if prefix_len <= 64 {
        (u64::MAX << (64 - prefix_len), 0)
    } else if prefix_len < 128 {
        (u64::MAX, u64::MAX << (128 - prefix_len))
    } else {
        (u64::MAX, u64::MAX)
    };
    (a_hi & m_hi) == (s_hi & m_hi) && (a_lo & m_lo) == (s_lo & m_lo)
}

#[inline(always)]
const fn halves(a: &[u8; 16]) -> (u64, u64) {
    let mut hi = 0u64;
    let mut lo = 0u64;
    let mut i = 0;
    while i < 8 {
        hi = (hi << 8) | a[i] as u64;
        lo = (lo << 8) | a[i + 8] as u64;
        i += 1;
    }
    (hi, lo)
}

/// Fold a 32-bit one's-complement sum to 16 bits (not complemented).
#[inline(always)]
pub const fn csum_fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Bytes in front of the inner IP packet once VXLAN over IPv6 is added: outer Ethernet,
/// outer IPv6, UDP, VXLAN, inner Ethernet.
pub const VXLAN6_HEADERS: usize = ETH_LEN + VXLAN6_OVERHEAD;

/// Write the headers of VXLAN over IPv6 into `h` (outer Ethernet addresses left zero for
/// the neighbour layer): outer IPv6 with traffic class `tclass` (see [`outer_tos`]), flow
/// label 0 and hop limit `hop_limit` as the kernel device (`label 0`, `ttl auto`), UDP
/// `ports` (source, destination) over `udp_len` bytes (checksum zero: see
/// [`udp6_checksum_from_sums`]), the VXLAN header `vxlan`, inner Ethernet `macs`
/// (destination, source) carrying IPv6.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn vxlan6_headers(
    h: &mut [u8; VXLAN6_HEADERS],
    tclass: u8,
    hop_limit: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    ports: (u16, u16),
    udp_len: u16,
    vxlan: &[u8; VXLAN_LEN],
    macs: (&[u8; 6], &[u8; 6]),
) {
    const IP: usize = ETH_LEN;
    const UDP: usize = IP + IPV6_LEN;
    const VX: usize = UDP + UDP_LEN;
    const ETH: usize = VX + VXLAN_LEN;
    // Every byte is written: `h` may hold an earlier packet's headers.
    let mut i = 0;
    while i < 12 {
        h[i] = 0;
        i += 1;
    }
    h[12] = (ETH_P_IPV6 >> 8) as u8;
    h[13] = ETH_P_IPV6 as u8;
    h[IP] = 0x60 | (tclass >> 4);
    h[IP + 1] = tclass << 4;
    h[IP + 2] = 0;
    h[IP + 3] = 0;
    h[IP + 4] = (udp_len >> 8) as u8;
    h[IP + 5] = udp_len as u8;
    h[IP + 6] = IPPROTO_UDP;
    h[IP + 7] = hop_limit;
    h[IP + 8..IP + 24].copy_from_slice(src);
    h[IP + 24..IP + 40].copy_from_slice(dst);
    h[UDP..UDP + 2].copy_from_slice(&ports.0.to_be_bytes());
    h[UDP + 2..UDP + 4].copy_from_slice(&ports.1.to_be_bytes());
    h[UDP + 4..UDP + 6].copy_from_slice(&udp_len.to_be_bytes());
    h[UDP + 6] = 0;
    h[UDP + 7] = 0;
    h[VX..ETH].copy_from_slice(vxlan);
    h[ETH..ETH + 6].copy_from_slice(macs.0);
    h[ETH + 6..ETH + 12].copy_from_slice(macs.1);
    h[ETH + 12] = (ETH_P_IPV6 >> 8) as u8;
    h[ETH + 13] = ETH_P_IPV6 as u8;
}

/// The outer UDP checksum of VXLAN over IPv6, which IPv6 requires (upstream's
/// `flannel-v6.<VNI>` refuses zero checksums: `UDP_ZERO_CSUM6_RX` off), computed from the
/// headers alone, without reading the payload.
///
/// The inner upper-layer packet (TCP, UDP or ICMPv6, right behind the inner IPv6 header)
/// carries a checksum over its IPv6 pseudo-header. Whether that checksum is already filled
/// in or still to be (`CHECKSUM_PARTIAL`, where the field holds the pseudo-header sum and
/// the device fills it later), the upper-layer bytes sum to the complement of that
/// pseudo-header sum once it is: the kernel's local checksum offload (`lco_csum`) rests on
/// the same identity. So the outer sum is the outer pseudo-header, the tunnel headers, the
/// inner IPv6 header and that complement. A zero result goes out as 0xffff.
///
/// The arguments are partial sums a program gets from `bpf_csum_diff` (which sums in the
/// kernel, so no unrolled summing loop fills the BPF stack): `region` is the
/// folded sum of the 104 bytes from the outer next-header byte (offset 20 of the
/// headers) through the end of the inner IPv6 header, checksum field zero; `hop_word`
/// the outer next-header/hop-limit word inside it, which is no part of the checksum;
/// `inner_addrs` the folded sum of the inner source and destination addresses. Sums
/// are of big-endian words (byte-swap what the helper returns on a little-endian host:
/// one's-complement sums commute with swapping).
#[inline(always)]
pub const fn udp6_checksum_from_sums(
    region: u16,
    hop_word: u16,
    udp_len: u16,
    inner_addrs: u16,
    inner_payload: u16,
    inner_next: u8,
) -> u16 {
    let pseudo = csum_fold(inner_addrs as u32 + inner_payload as u32 + inner_next as u32);
    let sum =
        region as u32 + !hop_word as u32 + udp_len as u32 + IPPROTO_UDP as u32 + !pseudo as u32;
    let c = !csum_fold(sum);
    if c == 0 { 0xffff } else { c }
}

/// The traffic class of an IPv6 header.
#[inline(always)]
pub const fn ipv6_tclass(h: &[u8; IPV6_LEN]) -> u8 {
    (h[0] << 4) | (h[1] >> 4)
}

/// The outer IPv4 header VXLAN encapsulation writes: no options, DF clear like the kernel
/// driver, protocol UDP, checksum filled in.
#[inline(always)]
pub const fn outer_ipv4_header(
    total_len: u16,
    id: u16,
    tos: u8,
    ttl: u8,
    src: [u8; 4],
    dst: [u8; 4],
) -> [u8; IPV4_LEN] {
    let mut h = [
        0x45,
        tos,
        (total_len >> 8) as u8,
        total_len as u8,
        (id >> 8) as u8,
        id as u8,
        0,
        0,
        ttl,
        IPPROTO_UDP,
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
    let c = ipv4_header_checksum(&h);
    h[10] = (c >> 8) as u8;
    h[11] = c as u8;
    h
}

/// Outer TOS for an inner TOS, as the kernel's `ip_tunnel_ecn_encap` does with DSCP 0: copy
/// the ECN bits, but CE becomes ECT(0) so the outer path can mark congestion again.
#[inline(always)]
pub const fn outer_tos(inner_tos: u8) -> u8 {
    let ecn = inner_tos & 0x3;
    if ecn == 0x3 { 0x2 } else { ecn }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    // The plain RFC 1071 computation of the outer checksum over the headers, the oracle
    // `udp6_checksum_from_sums` is checked against.

    /// Add the big-endian 16-bit words of `b` (even length) to a one's-complement sum kept
    /// unfolded in 32 bits (fold it with `csum_fold`).
    const fn csum_add<const N: usize>(mut sum: u32, b: &[u8; N]) -> u32 {
        let mut i = 0;
        while i + 1 < N {
            sum += ((b[i] as u32) << 8) | b[i + 1] as u32;
            i += 2;
        }
        sum
    }

    /// The one's-complement sum of an IPv6 pseudo-header (RFC 8200 §8.1), folded.
    const fn ipv6_pseudo_sum(src: &[u8; 16], dst: &[u8; 16], len: u32, next: u8) -> u16 {
        let mut sum = csum_add(0, src);
        sum = csum_add(sum, dst);
        sum += (len >> 16) + (len & 0xffff) + next as u32;
        csum_fold(sum)
    }

    /// Add the big-endian 16-bit words of `b[from..to]` (`to - from` even) to an unfolded
    /// one's-complement sum.
    const fn csum_add_range<const N: usize>(
        mut sum: u32,
        b: &[u8; N],
        from: usize,
        to: usize,
    ) -> u32 {
        let mut i = from;
        while i + 1 < to && i + 1 < N {
            sum += ((b[i] as u32) << 8) | b[i + 1] as u32;
            i += 2;
        }
        sum
    }

    /// What the inner packet adds to the outer UDP checksum of VXLAN over IPv6, computed
    /// from its IPv6 header `inner` alone (see [`udp6_tunnel_checksum`]): the header's words
    /// and the complement of the upper layer's pseudo-header sum.
    ///
    /// The upper-layer packet (TCP, UDP or ICMPv6, right behind the header) carries a
    /// checksum over its IPv6 pseudo-header. Whether that checksum is already filled in or
    /// still to be (`CHECKSUM_PARTIAL`, where the field holds the pseudo-header sum and the
    /// device fills it later), the upper-layer bytes sum to the complement of that
    /// pseudo-header sum once it is: the kernel's local checksum offload (`lco_csum`) rests on
    /// the same identity. So the payload never has to be read.
    const fn udp6_inner_sum(inner: &[u8; IPV6_LEN]) -> u32 {
        let sum = csum_add(0, inner);
        let mut pseudo = csum_add_range(0, inner, 8, 40);
        pseudo += (((inner[4] as u32) << 8) | inner[5] as u32) + inner[6] as u32;
        sum + !csum_fold(pseudo) as u32
    }

    /// The outer UDP checksum of VXLAN over IPv6, which IPv6 requires (upstream's
    /// `flannel-v6.<VNI>` refuses zero checksums: `UDP_ZERO_CSUM6_RX` off): the outer
    /// pseudo-header and the headers `vxlan6_headers` wrote into `h` (UDP checksum zero),
    /// plus `inner_sum` from `udp6_inner_sum`. A zero result goes out as 0xffff (zero
    /// means "no checksum").
    const fn udp6_tunnel_checksum(h: &[u8; VXLAN6_HEADERS], inner_sum: u32) -> u16 {
        const IP: usize = ETH_LEN;
        const UDP: usize = IP + IPV6_LEN;
        // Outer pseudo-header: addresses, UDP length (the payload length: no extension
        // headers), next header.
        let mut sum = csum_add_range(0, h, IP + 8, IP + 40);
        sum += (((h[UDP + 4] as u32) << 8) | h[UDP + 5] as u32) + IPPROTO_UDP as u32;
        sum = csum_add_range(sum, h, UDP, VXLAN6_HEADERS);
        let c = !csum_fold(csum_fold(sum) as u32 + csum_fold(inner_sum) as u32);
        if c == 0 { 0xffff } else { c }
    }

    #[test]
    fn overhead_is_fifty_bytes() {
        assert_eq!(VXLAN_OVERHEAD, 50);
    }

    #[test]
    fn source_port_stays_in_range_and_spreads() {
        let (min, max) = (32768, 60999);
        let mut seen = [false; 16];
        for hash in [0u32, 1, 0xdead_beef, u32::MAX, 0x1234_5678, 0x8000_0000] {
            let p = vxlan_source_port(hash, min, max);
            assert!((min..max).contains(&p), "{p}");
            seen[(p % 16) as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 2);
        // Kernel formula, worked by hand: h = 1 ^ (1 << 16) = 0x10001.
        assert_eq!(
            vxlan_source_port(1, min, max),
            ((0x10001u64 * 28231) >> 32) as u16 + min
        );
    }

    #[test]
    fn vxlan_header_round_trips() {
        let h = vxlan_header(1);
        assert_eq!(h, [0x08, 0, 0, 0, 0, 0, 1, 0]);
        let vni = |h: &[u8; 8], gbp| parse_vxlan_header(h, gbp).map(|v| v.vni);
        assert_eq!(vni(&h, false), Some(1));
        assert_eq!(vni(&vxlan_header(0xabcdef), false), Some(0xabcdef));
        let mut bad = h;
        bad[0] = 0x0c;
        assert_eq!(vni(&bad, false), None);
        assert_eq!(vni(&bad, true), None);
    }

    #[test]
    fn gbp_headers_round_trip_and_need_gbp() {
        let mark = 0x1234 | GBP_MARK_DONT_LEARN | GBP_MARK_POLICY_APPLIED;
        let h = vxlan_gbp_header(7, mark);
        assert_eq!(h, [0x88, 0x48, 0x12, 0x34, 0, 0, 7, 0]);
        assert_eq!(parse_vxlan_header(&h, false), None, "GBP bits without gbp");
        let parsed = parse_vxlan_header(&h, true).unwrap();
        assert_eq!((parsed.vni, parsed.gbp_mark), (7, Some(mark)));
        // A plain header on a GBP network: no mark.
        assert_eq!(
            parse_vxlan_header(&vxlan_header(7), true).unwrap().gbp_mark,
            None
        );
        assert_eq!(vxlan_gbp_header(7, 0), vxlan_header(7));
        // Other reserved bits stay forbidden with GBP.
        let mut bad = h;
        bad[1] |= 0x01;
        assert_eq!(parse_vxlan_header(&bad, true), None);
        // Found by the property test: without G, the GBP fields are reserved even on a GBP
        // device, so a policy id or the D/A bits without G are dropped, as the kernel does.
        let mut no_g = h;
        no_g[0] &= !VXLAN_FLAGS_G;
        assert_eq!(parse_vxlan_header(&no_g, true), None);
        no_g[1] = 0;
        assert_eq!(parse_vxlan_header(&no_g, true), None, "policy id without G");
        no_g[1] = VXLAN_GBP_D;
        no_g[2] = 0;
        no_g[3] = 0;
        assert_eq!(parse_vxlan_header(&no_g, true), None, "D without G");
    }

    #[test]
    fn ipv4_checksum_matches_a_known_header() {
        // Header from RFC 1071 style worked example (checksum 0xb861).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
        let full = outer_ipv4_header(0x73, 0, 0, 64, [192, 168, 0, 1], [192, 168, 0, 199]);
        // Re-summing a header including its checksum gives zero.
        let mut sum: u32 = 0;
        for w in full.chunks(2) {
            sum += u32::from(w[0]) << 8 | u32::from(w[1]);
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn subnet_membership() {
        assert!(in_subnet([10, 244, 7, 9], [10, 244, 7, 0], 24));
        assert!(!in_subnet([10, 244, 8, 9], [10, 244, 7, 0], 24));
        assert!(in_subnet([1, 2, 3, 4], [0, 0, 0, 0], 0));
        assert!(!in_subnet([1, 2, 3, 4], [1, 2, 3, 4], 33));
    }

    #[test]
    fn mapped_addresses_and_128_bit_subnets() {
        let m = v4_mapped([10, 244, 7, 9]);
        assert!(is_v4_mapped(&m));
        assert!(in_subnet16(m, v4_mapped([10, 244, 7, 0]), 96 + 24));
        assert!(!in_subnet16(m, v4_mapped([10, 244, 8, 0]), 96 + 24));
        let a = [0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 7, 0, 0, 0, 0, 0, 0, 0, 9];
        let mut net = a;
        net[15] = 0;
        assert!(!is_v4_mapped(&a));
        assert!(in_subnet16(a, net, 64));
        assert!(in_subnet16(a, net, 120));
        assert!(!in_subnet16(a, net, 128));
        assert!(in_subnet16(a, a, 128));
        let mut other = net;
        other[7] = 8;
        assert!(!in_subnet16(a, other, 64));
        assert!(in_subnet16(a, other, 60));
        assert!(in_subnet16(a, [0; 16], 0));
        assert!(!in_subnet16(a, a, 129));
        // An IPv4-mapped subnet never contains an IPv6 pod address.
        assert!(!in_subnet16(a, v4_mapped([10, 244, 7, 0]), 120));
    }

    /// The full RFC 1071 sum over a byte string, as a receiver verifies.
    fn full_sum(init: u32, b: &[u8]) -> u32 {
        let mut sum = init;
        for w in b.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            sum += hi | w.get(1).map_or(0, |l| u32::from(*l));
        }
        sum
    }

    fn fold_all(mut sum: u32) -> u16 {
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn udp6_tunnel_checksum_verifies_over_the_whole_datagram() {
        let outer_src = [0xfd, 0, 1, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let outer_dst = [0xfd, 0, 1, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let isrc = [0xfd, 0, 0, 0x10, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
        let idst = [0xfd, 0, 0, 0x10, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 6];
        let (dmac, smac) = (
            [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 2],
            [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 1],
        );
        // Odd and even payload lengths, each L4 protocol with its checksum offset.
        for (proto, csum_at, payload) in [
            (IPPROTO_ICMPV6, 2usize, 64usize),
            (IPPROTO_UDP, 6, 21),
            (IPPROTO_TCP, 16, 1000),
            (IPPROTO_TCP, 16, 33),
        ] {
            let mut l4: std::vec::Vec<u8> = (0..payload).map(|i| (i * 7 + 3) as u8).collect();
            l4[csum_at] = 0;
            l4[csum_at + 1] = 0;
            let p = ipv6_pseudo_sum(&isrc, &idst, payload as u32, proto);
            let c = !fold_all(full_sum(u32::from(p), &l4));
            l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
            let mut inner = [0u8; IPV6_LEN];
            inner[0] = 0x60;
            inner[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
            inner[6] = proto;
            inner[7] = 63;
            inner[8..24].copy_from_slice(&isrc);
            inner[24..40].copy_from_slice(&idst);
            let udp_len = (UDP_LEN + VXLAN_LEN + ETH_LEN + IPV6_LEN + payload) as u16;
            let mut h = [0x5au8; VXLAN6_HEADERS];
            vxlan6_headers(
                &mut h,
                0x02,
                64,
                &outer_src,
                &outer_dst,
                (40001, 8472),
                udp_len,
                &vxlan_header(1),
                (&dmac, &smac),
            );
            assert_eq!(h[14] >> 4, 6);
            assert_eq!((h[14] << 4) | (h[15] >> 4), 0x02, "traffic class");
            assert_eq!(&h[15..18], &[0x20, 0, 0], "flow label 0");
            assert_eq!((h[20], h[21]), (IPPROTO_UDP, 64));
            assert_eq!(u16::from_be_bytes([h[18], h[19]]), udp_len);
            assert_eq!(&h[22..38], &outer_src);
            assert_eq!(&h[38..54], &outer_dst);
            assert_eq!(&h[..12], &[0; 12], "outer MACs left to the neighbour layer");
            assert_eq!(&h[60..62], &[0, 0]);
            let ck = udp6_tunnel_checksum(&h, udp6_inner_sum(&inner));
            assert_ne!(ck, 0);
            // The same from the partial sums the program takes from `bpf_csum_diff`.
            let mut region = h[20..].to_vec();
            region.extend_from_slice(&inner);
            assert_eq!(region.len(), 104);
            let from_sums = udp6_checksum_from_sums(
                fold_all(full_sum(0, &region)),
                u16::from_be_bytes([h[20], h[21]]),
                udp_len,
                fold_all(full_sum(0, &inner[8..40])),
                payload as u16,
                proto,
            );
            assert_eq!(from_sums, ck);
            h[60..62].copy_from_slice(&ck.to_be_bytes());
            // What the receiver does: pseudo-header plus the whole datagram folds to 0xffff.
            let mut datagram = h[54..].to_vec();
            datagram.extend_from_slice(&inner);
            datagram.extend_from_slice(&l4);
            assert_eq!(datagram.len(), usize::from(udp_len));
            let pseudo = ipv6_pseudo_sum(&outer_src, &outer_dst, u32::from(udp_len), IPPROTO_UDP);
            assert_eq!(
                fold_all(full_sum(u32::from(pseudo), &datagram)),
                0xffff,
                "proto {proto} payload {payload}"
            );
        }
        assert_eq!(VXLAN6_OVERHEAD, 70);
    }

    #[test]
    fn ecn_is_copied_with_ce_downgraded() {
        assert_eq!(outer_tos(0xb8), 0);
        assert_eq!(outer_tos(0x01), 0x01);
        assert_eq!(outer_tos(0x02), 0x02);
        assert_eq!(outer_tos(0x03), 0x02);
    }
}

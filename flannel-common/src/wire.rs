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
/// flannel's VXLAN UDP port (Linux's pre-IANA default; flannel never sends another unless
/// configured).
pub const FLANNEL_VXLAN_PORT: u16 = 8472;
/// flannel's default VNI.
pub const FLANNEL_VNI: u32 = 1;
/// VXLAN flags byte with only the I (valid VNI) bit set.
pub const VXLAN_FLAGS_I: u8 = 0x08;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

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
    use super::*;

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
    fn ecn_is_copied_with_ce_downgraded() {
        assert_eq!(outer_tos(0xb8), 0);
        assert_eq!(outer_tos(0x01), 0x01);
        assert_eq!(outer_tos(0x02), 0x02);
        assert_eq!(outer_tos(0x03), 0x02);
    }
}

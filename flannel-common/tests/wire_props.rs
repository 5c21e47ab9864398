//! Property tests of the packet arithmetic the programs and the agent share (`wire`):
//! every 8-byte VXLAN header is judged exactly as the kernel's VXLAN receive path judges
//! it (an independent model below), headers we write parse back to what we wrote, and the
//! checksum and subnet helpers agree with straightforward reference implementations.
//! Case counts are fixed so CI time is bounded (the whole file runs in about a second).

use flannel_common::wire::{
    GBP_MARK_DONT_LEARN, GBP_MARK_POLICY_APPLIED, IPV4_LEN, VXLAN_FLAGS_G, VXLAN_FLAGS_I,
    VXLAN_GBP_A, VXLAN_GBP_D, in_subnet, ipv4_header_checksum, outer_ipv4_header, outer_tos,
    parse_vxlan_header, vxlan_gbp_header, vxlan_header, vxlan_source_port,
};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The kernel's rule (`vxlan_rcv` with `VXLAN_F_GBP` or not), written from the RFC 7348 /
/// draft-smith-vxlan-group-policy bit layout rather than from our parser: the I flag must be
/// set and every other bit of the first word and the last byte zero — except that on a GBP
/// device a set G flag makes the D and A bits and the 16-bit policy id legal
/// (`vxlan_parse_gbp_hdr` runs only behind G).
fn kernel_accepts(h: &[u8; 8], gbp: bool) -> bool {
    let flags = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let reserved_low = h[7];
    let i_bit = 0x0800_0000;
    let allowed = if gbp && flags & 0x8000_0000 != 0 {
        // G (0x80 in byte 0), D (0x40 in byte 1), A (0x08 in byte 1), policy id (bytes 2-3).
        i_bit | 0x8000_0000 | 0x0040_0000 | 0x0008_0000 | 0x0000_ffff
    } else {
        i_bit
    };
    flags & i_bit != 0 && flags & !allowed == 0 && reserved_low == 0
}

/// RFC 1071 over any even-length buffer, folding until no carry is left.
fn reference_checksum(words: &[u8]) -> u16 {
    let mut sum: u64 = words
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn any_vxlan_header_is_judged_as_the_kernel_judges_it(h in any::<[u8; 8]>(), gbp in any::<bool>()) {
        let parsed = parse_vxlan_header(&h, gbp);
        prop_assert_eq!(parsed.is_some(), kernel_accepts(&h, gbp), "header {:02x?} gbp {}", h, gbp);
        if let Some(p) = parsed {
            prop_assert_eq!(p.vni, u32::from_be_bytes([0, h[4], h[5], h[6]]));
            let g = h[0] & VXLAN_FLAGS_G != 0;
            prop_assert_eq!(p.gbp_mark.is_some(), gbp && g);
            if let Some(mark) = p.gbp_mark {
                let mut want = u32::from(u16::from_be_bytes([h[2], h[3]]));
                if h[1] & VXLAN_GBP_D != 0 { want |= GBP_MARK_DONT_LEARN; }
                if h[1] & VXLAN_GBP_A != 0 { want |= GBP_MARK_POLICY_APPLIED; }
                prop_assert_eq!(mark, want);
            }
        }
    }

    #[test]
    fn headers_we_write_parse_back(vni in 0u32..1 << 24, mark in any::<u32>()) {
        let plain = vxlan_header(vni);
        prop_assert_eq!(plain[0], VXLAN_FLAGS_I);
        for gbp in [false, true] {
            let p = parse_vxlan_header(&plain, gbp).expect("our own plain header");
            prop_assert_eq!((p.vni, p.gbp_mark), (vni, None));
        }
        let h = vxlan_gbp_header(vni, mark);
        let p = parse_vxlan_header(&h, true).expect("our own GBP header on a GBP network");
        prop_assert_eq!(p.vni, vni);
        // What the header can carry of the mark: the policy id and the D and A bits.
        let carried = mark & (0xffff | GBP_MARK_DONT_LEARN | GBP_MARK_POLICY_APPLIED);
        prop_assert_eq!(p.gbp_mark, (mark != 0).then_some(carried));
        // A network without GBP accepts it only when nothing GBP-specific was written.
        prop_assert_eq!(parse_vxlan_header(&h, false).is_some(), mark == 0);
    }

    #[test]
    fn header_checksum_matches_rfc1071(mut h in any::<[u8; IPV4_LEN]>()) {
        h[10] = 0;
        h[11] = 0;
        let c = ipv4_header_checksum(&h);
        prop_assert_eq!(c, reference_checksum(&h));
        // Filled in, the header verifies: summing it with its checksum gives zero.
        h[10..12].copy_from_slice(&c.to_be_bytes());
        prop_assert_eq!(reference_checksum(&h), 0);
    }

    #[test]
    fn outer_headers_are_well_formed(
        len in 28u16.., id in any::<u16>(), tos in any::<u8>(), ttl in 1u8..,
        src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(),
    ) {
        let h = outer_ipv4_header(len, id, outer_tos(tos), ttl, src, dst);
        prop_assert_eq!(h[0], 0x45);
        prop_assert_eq!(u16::from_be_bytes([h[2], h[3]]), len);
        prop_assert_eq!(h[6] & 0x3f, 0, "no fragment offset, no MF");
        prop_assert_eq!(reference_checksum(&h), 0, "checksum verifies");
        prop_assert_eq!(&h[12..16], &src);
        prop_assert_eq!(&h[16..20], &dst);
        // ECN is copied except CE, DSCP never.
        prop_assert_eq!(h[1] & !0x3, 0);
        prop_assert_eq!(h[1], if tos & 3 == 3 { 2 } else { tos & 3 });
    }

    #[test]
    fn subnet_membership_matches_masking(addr in any::<u32>(), subnet in any::<u32>(), len in 0u32..=40) {
        let want = match len {
            0 => true,
            1..=32 => (addr ^ subnet) >> (32 - len) == 0,
            _ => false,
        };
        prop_assert_eq!(in_subnet(addr.to_be_bytes(), subnet.to_be_bytes(), len), want);
    }

    #[test]
    fn source_ports_stay_in_range(hash in any::<u32>(), min in any::<u16>(), span in 1u16..) {
        let max = min.saturating_add(span);
        prop_assume!(max > min);
        let p = vxlan_source_port(hash, min, max);
        prop_assert!((min..max).contains(&p), "{} not in {}..{}", p, min, max);
    }
}

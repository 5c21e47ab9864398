//! Address-family-generic CIDR arithmetic, written once for IPv4 and IPv6: masking host
//! bits, alignment, the first host address, and what counts as a usable unicast address.

use std::{
    fmt::{Debug, Display},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnetwork::{Ipv4Network, Ipv6Network};

/// An IPv4 or IPv6 network; everything here is implemented once on top of it.
pub trait Cidr: Copy + Eq + Ord + Hash + Debug + Display + FromStr + Send + Sync + 'static {
    /// The family's address type.
    type Addr: Copy + Eq + Ord + Hash + Debug + Display + FromStr + Into<IpAddr> + Send + Sync;
    /// `IPv4` or `IPv6`, for messages.
    const FAMILY: &'static str;
    /// Address width in bits.
    const BITS: u8;
    /// The address as an integer.
    fn addr_bits(addr: Self::Addr) -> u128;
    /// The address for an integer (truncated to the family's width).
    fn addr_from_bits(bits: u128) -> Self::Addr;
    /// Builds a network; `None` when the prefix is longer than the family allows.
    fn build(addr: Self::Addr, prefix: u8) -> Option<Self>;
    /// The address the network was written with (host bits possibly set).
    fn addr(&self) -> Self::Addr;
    /// The prefix length.
    fn prefix_len(&self) -> u8;
}

impl Cidr for Ipv4Network {
    type Addr = Ipv4Addr;
    const FAMILY: &'static str = "IPv4";
    const BITS: u8 = 32;
    fn addr_bits(addr: Ipv4Addr) -> u128 {
        u128::from(u32::from(addr))
    }
    fn addr_from_bits(bits: u128) -> Ipv4Addr {
        Ipv4Addr::from(bits as u32)
    }
    fn build(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        Ipv4Network::new(addr, prefix).ok()
    }
    fn addr(&self) -> Ipv4Addr {
        self.ip()
    }
    fn prefix_len(&self) -> u8 {
        self.prefix()
    }
}

impl Cidr for Ipv6Network {
    type Addr = Ipv6Addr;
    const FAMILY: &'static str = "IPv6";
    const BITS: u8 = 128;
    fn addr_bits(addr: Ipv6Addr) -> u128 {
        u128::from(addr)
    }
    fn addr_from_bits(bits: u128) -> Ipv6Addr {
        Ipv6Addr::from(bits)
    }
    fn build(addr: Ipv6Addr, prefix: u8) -> Option<Self> {
        Ipv6Network::new(addr, prefix).ok()
    }
    fn addr(&self) -> Ipv6Addr {
        self.ip()
    }
    fn prefix_len(&self) -> u8 {
        self.prefix()
    }
}

/// CIDR text read as Go's `net.ParseCIDR` reads it, which is what upstream's fields go
/// through: an address of the family, `/`, and a prefix length of decimal digits only
/// (leading zeros allowed; no sign, spaces or netmask form) no longer than the family
/// allows. Host bits are kept as written. `ipnetwork`'s own parser is laxer: it takes a
/// bare address as a full-length prefix and `+24` or `255.255.0.0` as a length.
pub fn parse_cidr<N: Cidr>(s: &str) -> Option<N> {
    let (addr, prefix) = s.split_once('/')?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len = prefix.bytes().try_fold(0u32, |n, b| {
        n.checked_mul(10)?.checked_add(u32::from(b - b'0'))
    })?;
    N::build(addr.parse().ok()?, u8::try_from(len).ok()?)
}

/// The mask of the network part of a `prefix`-bit prefix in a `bits`-wide address.
fn network_mask(bits: u8, prefix: u8) -> u128 {
    let host = u32::from(bits - prefix.min(bits));
    let all = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    all & !(1u128.checked_shl(host).map_or(u128::MAX, |v| v - 1))
}

/// The network with its host bits cleared (`10.244.1.7/16` → `10.244.0.0/16`), as Go's
/// `net.ParseCIDR` returns it.
pub fn masked<N: Cidr>(net: N) -> N {
    let bits = N::addr_bits(net.addr()) & network_mask(N::BITS, net.prefix_len());
    N::build(N::addr_from_bits(bits), net.prefix_len()).expect("prefix of a valid network")
}

/// Whether the network is written with its host bits clear (`10.244.117.7/24` is not).
pub fn is_aligned<N: Cidr>(net: N) -> bool {
    masked(net) == net
}

/// Whether `addr` lies on a `/prefix` boundary.
pub fn addr_aligned<N: Cidr>(addr: N::Addr, prefix: u8) -> bool {
    N::build(addr, prefix).is_some_and(is_aligned)
}

/// The number of addresses in a `/prefix` block (saturating at `u128::MAX` for `::/0`).
pub fn block_size<N: Cidr>(prefix: u8) -> u128 {
    1u128
        .checked_shl(u32::from(N::BITS - prefix.min(N::BITS)))
        .unwrap_or(u128::MAX)
}

/// The network's base address (`10.244.1.7/24` → `10.244.1.0`).
pub fn base<N: Cidr>(net: N) -> N::Addr {
    masked(net).addr()
}

/// The network's base address plus one (`10.244.1.0/24` → `10.244.1.1`): the gateway
/// address `subnet.env` and the bridge use.
pub fn first_host<N: Cidr>(net: N) -> N::Addr {
    N::addr_from_bits(N::addr_bits(masked(net).addr()).wrapping_add(1))
}

/// Whether `inner` lies entirely inside `outer`.
pub fn contains<N: Cidr>(outer: N, inner: N) -> bool {
    inner.prefix_len() >= outer.prefix_len()
        && masked(N::build(inner.addr(), outer.prefix_len()).expect("shorter prefix is valid"))
            == masked(outer)
}

/// Whether the two networks share any address.
pub fn overlaps<N: Cidr>(a: N, b: N) -> bool {
    contains(a, b) || contains(b, a)
}

/// Why an address cannot be a host's public (underlay) address.
pub fn unusable_unicast(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) => a
            .to_ipv4_mapped()
            .and_then(|v4| unusable_unicast(v4.into()).map(|_| "a v4-mapped non-unicast address")),
        IpAddr::V4(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }
    fn v6(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    #[test]
    fn masking_and_alignment_both_families() {
        assert_eq!(masked(v4("10.244.1.7/16")), v4("10.244.0.0/16"));
        assert_eq!(masked(v4("10.244.1.7/32")), v4("10.244.1.7/32"));
        assert_eq!(masked(v4("10.244.1.7/0")), v4("0.0.0.0/0"));
        assert_eq!(masked(v6("fd00:1:2:3::9/48")), v6("fd00:1:2::/48"));
        assert_eq!(masked(v6("fd00::1/0")), v6("::/0"));
        assert!(!is_aligned(v4("10.244.117.7/24")));
        assert!(is_aligned(v4("10.244.117.0/24")));
        assert!(!is_aligned(v6("fd00::1/64")));
        assert!(addr_aligned::<Ipv4Network>("10.1.2.0".parse().unwrap(), 24));
        assert!(!addr_aligned::<Ipv4Network>(
            "10.1.2.8".parse().unwrap(),
            28
        ));
    }

    #[test]
    fn first_host_containment_sizes() {
        assert_eq!(
            first_host(v4("10.244.1.0/24")),
            Ipv4Addr::new(10, 244, 1, 1)
        );
        assert_eq!(
            first_host(v6("2001:cafe:42::/64")),
            "2001:cafe:42::1".parse::<Ipv6Addr>().unwrap()
        );
        assert!(contains(v4("10.244.0.0/17"), v4("10.244.7.0/24")));
        assert!(!contains(v4("10.244.0.0/17"), v4("10.244.200.0/24")));
        assert!(!contains(v4("10.244.7.0/24"), v4("10.244.0.0/16")));
        assert!(overlaps(v4("10.244.7.0/24"), v4("10.244.0.0/16")));
        assert!(contains(v6("fd00:10:244::/56"), v6("fd00:10:244:7::/64")));
        assert_eq!(block_size::<Ipv4Network>(24), 256);
        assert_eq!(block_size::<Ipv6Network>(0), u128::MAX);
        assert_eq!(block_size::<Ipv4Network>(0), 1 << 32);
    }

    #[test]
    fn cidr_text_as_go_reads_it() {
        assert_eq!(parse_cidr("10.244.1.7/16"), Some(v4("10.244.1.7/16")));
        assert_eq!(parse_cidr("10.244.0.0/024"), Some(v4("10.244.0.0/24")));
        assert_eq!(parse_cidr("fd00::/56"), Some(v6("fd00::/56")));
        // Found by the parser property test: ipnetwork takes these, Go does not.
        for bad in [
            "10.244.0.0",
            "10.244.0.0/+24",
            "10.244.0.0/255.255.0.0",
            "10.244.0.0/33",
        ] {
            assert_eq!(parse_cidr::<Ipv4Network>(bad), None, "{bad}");
        }
        assert_eq!(parse_cidr::<Ipv4Network>("fd00::/56"), None, "wrong family");
        assert_eq!(parse_cidr::<Ipv6Network>("fd00::/129"), None);
    }

    #[test]
    fn unicast_rules() {
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(unusable_unicast(bad.parse().unwrap()).is_some(), "{bad}");
        }
        for good in ["198.18.0.1", "10.0.0.1", "fd00:198::1", "2001:db8::1"] {
            assert!(unusable_unicast(good.parse().unwrap()).is_none(), "{good}");
        }
    }
}

//! Pure allocation arithmetic of the etcd manager: which subnets are free, and when to
//! renew. Kept free of I/O so the rules are unit-tested without etcd.

use std::{net::Ipv4Addr, net::Ipv6Addr, time::Duration};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::netconf::NetworkConfig;

/// How many free candidates upstream collects before picking one at random.
pub const CANDIDATES: usize = 100;

/// The first `limit` free IPv4 subnets of a checked config, walking `SubnetMin..=SubnetMax`
/// in `SubnetLen` steps and skipping any that overlap a subnet in `used` (upstream).
pub fn free_v4(cfg: &NetworkConfig, used: &[Ipv4Network], limit: usize) -> Vec<Ipv4Network> {
    let len = cfg.subnet_len;
    let size = 1u64 << (32 - u32::from(len));
    let (min, max) = (
        u64::from(u32::from(cfg.subnet_min)),
        u64::from(u32::from(cfg.subnet_max)),
    );
    let mut ranges: Vec<(u64, u64)> = used
        .iter()
        .map(|n| {
            let lo = u64::from(u32::from(n.network()));
            (lo, lo + (1u64 << (32 - u32::from(n.prefix()))))
        })
        .collect();
    // One sweep instead of every candidate against every used subnet: at 5,000 leases
    // the first free /24s lie past all of them, which made this 25 million comparisons.
    // The candidates ascend, so the ranges starting before a candidate's end only grow;
    // one of them overlaps it exactly when the furthest end among them lies past its base.
    ranges.sort_unstable();
    let (mut next, mut reach) = (0, 0u64);
    let mut out = Vec::new();
    let mut base = min;
    while base <= max && out.len() < limit {
        let end = base + size;
        while let Some(&(lo, hi)) = ranges.get(next)
            && lo < end
        {
            reach = reach.max(hi);
            next += 1;
        }
        if reach <= base {
            out.push(Ipv4Network::new(Ipv4Addr::from(base as u32), len).expect("len <= 32"));
        }
        base = end;
    }
    out
}

/// IPv6 counterpart of [`free_v4`]; empty when IPv6 is not configured.
pub fn free_v6(cfg: &NetworkConfig, used: &[Ipv6Network], limit: usize) -> Vec<Ipv6Network> {
    let (Some(min), Some(max)) = (cfg.ipv6_subnet_min, cfg.ipv6_subnet_max) else {
        return Vec::new();
    };
    let len = cfg.ipv6_subnet_len;
    let size = 1u128 << (128 - u32::from(len));
    let span = |n: &Ipv6Network| {
        let lo = u128::from(n.network());
        let p = u32::from(n.prefix());
        let hi = if p == 0 {
            u128::MAX
        } else {
            lo.saturating_add((1u128 << (128 - p)) - 1)
        };
        (lo, hi)
    };
    let mut ranges: Vec<(u128, u128)> = used.iter().map(span).collect();
    // The sweep of `free_v4`, with inclusive ends (a /0 ends at `u128::MAX`).
    ranges.sort_unstable();
    let (mut next, mut reach) = (0, None::<u128>);
    let mut out = Vec::new();
    let (mut base, max) = (u128::from(min), u128::from(max));
    while base <= max && out.len() < limit {
        let last = base + (size - 1);
        while let Some(&(lo, hi)) = ranges.get(next)
            && lo <= last
        {
            reach = Some(reach.map_or(hi, |r| r.max(hi)));
            next += 1;
        }
        if reach.is_none_or(|r| r < base) {
            out.push(Ipv6Network::new(Ipv6Addr::from(base), len).expect("len <= 128"));
        }
        match last.checked_add(1) {
            Some(b) => base = b,
            None => break,
        }
    }
    out
}

/// How long after a (re)grant to renew: `ttl - margin`, as upstream; when the margin is not
/// smaller than the TTL (short TTLs in tests, or a misconfiguration) renew at half the TTL
/// instead of spinning.
pub fn renew_after(ttl: Duration, margin: Duration) -> Duration {
    if margin >= ttl { ttl / 2 } else { ttl - margin }
}

/// How long to wait before retrying a failed renewal: upstream's one minute, but never more
/// than a tenth of the TTL so a short-TTL lease gets several tries before expiring.
pub fn renew_retry(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_millis(200), Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse_and_check(json).unwrap()
    }

    #[test]
    fn walks_range_skipping_used_and_overlaps() {
        let c =
            cfg(r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.6.0","Backend":{"Type":"vxlan"}}"#);
        let used: Vec<Ipv4Network> = vec![
            "10.1.2.0/24".parse().unwrap(),
            "10.1.4.0/23".parse().unwrap(),
        ];
        let free: Vec<String> = free_v4(&c, &used, 100)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(free, ["10.1.1.0/24", "10.1.3.0/24", "10.1.6.0/24"]);
        assert_eq!(free_v4(&c, &used, 2).len(), 2);
        let all: Vec<Ipv4Network> = free_v4(&c, &[], 100);
        assert_eq!(all.len(), 6);
        assert!(free_v4(&c, &all, 100).is_empty());
    }

    #[test]
    fn whole_slash8_stops_at_limit() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#);
        let free = free_v4(&c, &[], CANDIDATES);
        assert_eq!(free.len(), 100);
        assert_eq!(free[0].to_string(), "10.0.1.0/24");
    }

    #[test]
    fn unsorted_and_nested_used_subnets() {
        let c =
            cfg(r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.9.0","Backend":{"Type":"vxlan"}}"#);
        // A /22 covering 10.1.4-7 listed after a /24 inside it, and unsorted around them.
        let used: Vec<Ipv4Network> = ["10.1.8.0/24", "10.1.5.0/24", "10.1.4.0/22", "10.1.1.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let free: Vec<String> = free_v4(&c, &used, 100)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(free, ["10.1.2.0/24", "10.1.3.0/24", "10.1.9.0/24"]);
    }

    #[test]
    fn sweep_agrees_with_checking_every_used_subnet() {
        let c = cfg(r#"{"Network":"10.1.0.0/16","SubnetLen":26,"Backend":{"Type":"vxlan"}}"#);
        let mut x = 0x2545_f491_u32;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..200 {
            let used: Vec<Ipv4Network> = (0..rnd() % 40)
                .map(|_| {
                    let len = 22 + (rnd() % 9) as u8;
                    let addr = 0x0a01_0000 | (rnd() & 0xffff);
                    Ipv4Network::new(Ipv4Addr::from(addr), len).unwrap()
                })
                .map(|n| Ipv4Network::new(n.network(), n.prefix()).unwrap())
                .collect();
            let naive: Vec<Ipv4Network> = free_v4(&c, &[], 1024)
                .into_iter()
                .filter(|sn| !used.iter().any(|u| u.overlaps(*sn)))
                .take(100)
                .collect();
            assert_eq!(free_v4(&c, &used, 100), naive, "used {used:?}");
        }
    }

    #[test]
    fn v6_candidates() {
        let c = cfg(
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/62","Backend":{"Type":"vxlan"}}"#,
        );
        assert_eq!(c.ipv6_subnet_len, 64);
        let used = vec!["fd00:0:0:2::/64".parse().unwrap()];
        let free: Vec<String> = free_v6(&c, &used, 100)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(free, ["fd00:0:0:1::/64", "fd00:0:0:3::/64"]);
        // Unsorted, one covering the other, and a /0 covering everything.
        let used: Vec<Ipv6Network> = ["fd00:0:0:3::/64", "fd00::/63", "fd00:0:0:1::/64"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let free: Vec<String> = free_v6(&c, &used, 100)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(free, ["fd00:0:0:2::/64"]);
        assert!(free_v6(&c, &["::/0".parse().unwrap()], 100).is_empty());
    }

    #[test]
    fn renew_timing() {
        let h = Duration::from_secs(3600);
        assert_eq!(renew_after(24 * h, h), 23 * h);
        assert_eq!(
            renew_after(Duration::from_secs(4), h),
            Duration::from_secs(2)
        );
        assert_eq!(renew_retry(24 * h), Duration::from_secs(60));
        assert_eq!(
            renew_retry(Duration::from_secs(4)),
            Duration::from_millis(400)
        );
    }
}

//! MAC addresses as upstream writes them: Go's `net.HardwareAddr.String()` (lower-case hex,
//! `:`-separated) out; `:` or `-` separators in either case in (`net.ParseMAC` for EUI-48,
//! minus the dotted form nobody writes into leases).

use serde::{Deserialize, Serialize};

/// A 6-byte MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a 6-byte MAC address (aa:bb:cc:dd:ee:ff)")]
pub struct MacError {
    /// The text given (truncated to 64 bytes).
    pub value: String,
}

impl MacAddr {
    /// A random locally administered unicast address (upstream `pkg/mac`).
    pub fn random_local() -> Self {
        let mut mac: [u8; 6] = rand::random();
        mac[0] = (mac[0] & 0xfe) | 0x02;
        Self(mac)
    }

    /// The bytes.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(b: [u8; 6]) -> Self {
        Self(b)
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, MacError> {
        let bad = || MacError {
            value: s.chars().take(64).collect(),
        };
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut mac = [0u8; 6];
        let mut parts = s.split(sep);
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        match parts.next() {
            None => Ok(Self(mac)),
            Some(_) => Err(bad()),
        }
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let m: MacAddr = "0E-2A-00-00-00-01".parse().unwrap();
        assert_eq!(m, MacAddr([0x0e, 0x2a, 0, 0, 0, 1]));
        assert_eq!(m.to_string(), "0e:2a:00:00:00:01");
        assert_eq!("0e:2a:00:00:00:01".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "0e:2a:00:00:00",
            "0e:2a:00:00:00:01:02",
            "0e:2a:00:00:00:1",
            "0e:2a:00-00:00:01",
            "zz:zz:zz:zz:zz:zz",
            "+e:2a:00:00:00:01",
            "",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..64 {
            let m = MacAddr::random_local().0;
            assert_eq!(m[0] & 0x01, 0, "unicast");
            assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        }
    }
}

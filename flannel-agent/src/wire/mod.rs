//! Upstream flannel's wire formats, parsed and formatted here and nowhere else: lease keys
//! and values with their per-backend data ([`lease`]), MAC addresses ([`mac`]), node
//! annotations ([`annotations`]) and `subnet.env` ([`subnet_env`]), on top of Go-JSON
//! field lookup ([`gojson`]) and family-generic CIDR arithmetic ([`cidr`]).
//!
//! Each format has one public parse entry point (what the fuzz targets drive):
//! [`lease::parse_record`] / [`lease::parse_subnet_key`] / [`lease::LeaseAttrs::from_json`],
//! [`lease::BackendAttrs::parse`], [`annotations::parse_lease_attrs`],
//! [`subnet_env::SubnetEnv::parse`], and `MacAddr`'s `FromStr`.

pub mod annotations;
pub mod cidr;
pub mod gojson;
pub mod lease;
pub mod mac;
pub mod subnet_env;

/// How much of a bad record a log line or error quotes.
pub const QUOTE_LIMIT: usize = 200;

/// `bytes` for a log line: the first [`QUOTE_LIMIT`] bytes (lossy UTF-8) and, when cut, the
/// full length, so a 1 MiB garbage value costs one short line, not a megabyte.
pub fn truncated(bytes: &[u8]) -> String {
    if bytes.len() <= QUOTE_LIMIT {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    format!(
        "{}… ({} bytes)",
        String::from_utf8_lossy(&bytes[..QUOTE_LIMIT]),
        bytes.len()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncation() {
        assert_eq!(super::truncated(b"short"), "short");
        let t = super::truncated(&vec![b'x'; 1 << 20]);
        assert!(t.ends_with("… (1048576 bytes)"), "{t}");
        assert!(t.len() < 250);
    }
}

//! Hand-made VXLAN for hostile-input tests: a UDP datagram carrying an inner frame (IPv4,
//! or IPv6 with [`vxlan_datagram6`]), cut into outer IPv4 packets with options and/or as
//! fragments, sent through a raw socket (`IPPROTO_RAW`, so the kernel sends our header as
//! written: options, fragment offsets).

use std::net::{Ipv4Addr, Ipv6Addr};

use flannel_common::wire;

use crate::netns::NetNs;

/// What the inner frame carries: a UDP datagram from `src:port` to `dst:port`.
#[derive(Clone, Debug)]
pub struct Inner {
    /// Destination MAC: the receiving host's VTEP MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC: the sender's VTEP MAC (anything, for a stranger).
    pub src_mac: [u8; 6],
    /// Inner source address.
    pub src: Ipv4Addr,
    /// Inner destination address (a pod).
    pub dst: Ipv4Addr,
    /// Inner UDP port (source and destination).
    pub port: u16,
    /// Inner UDP payload.
    pub payload: Vec<u8>,
}

/// The outer UDP datagram (header included) of VXLAN `vni` to `vxlan_port` carrying `inner`.
pub fn vxlan_datagram(vni: u32, vxlan_port: u16, inner: &Inner) -> Vec<u8> {
    let udp_len = (8 + inner.payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = wire::IPPROTO_UDP;
    ip[12..16].copy_from_slice(&inner.src.octets());
    ip[16..20].copy_from_slice(&inner.dst.octets());
    let c = wire::ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut frame = Vec::new();
    frame.extend_from_slice(&inner.dst_mac);
    frame.extend_from_slice(&inner.src_mac);
    frame.extend_from_slice(&wire::ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&inner.port.to_be_bytes());
    frame.extend_from_slice(&inner.port.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // no checksum (valid for IPv4)
    frame.extend_from_slice(&inner.payload);

    let outer_len = (8 + 8 + frame.len()) as u16;
    let mut d = Vec::new();
    d.extend_from_slice(&40123u16.to_be_bytes());
    d.extend_from_slice(&vxlan_port.to_be_bytes());
    d.extend_from_slice(&outer_len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&wire::vxlan_header(vni));
    d.extend_from_slice(&frame);
    d
}

/// [`Inner`] over IPv6: the inner frame carries a UDP datagram from `src:port` to
/// `dst:port` in an IPv6 packet.
#[derive(Clone, Debug)]
pub struct Inner6 {
    /// Destination MAC: the receiving host's `flannel-v6.<VNI>` MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC (anything, for a stranger).
    pub src_mac: [u8; 6],
    /// Inner source address.
    pub src: Ipv6Addr,
    /// Inner destination address (a pod).
    pub dst: Ipv6Addr,
    /// Inner UDP port (source and destination).
    pub port: u16,
    /// Inner UDP payload.
    pub payload: Vec<u8>,
}

/// The outer UDP datagram (header included, checksum left 0: a socket sending the rest
/// fills its own) of VXLAN `vni` to `vxlan_port` carrying `inner` as IPv6.
pub fn vxlan_datagram6(vni: u32, vxlan_port: u16, inner: &Inner6) -> Vec<u8> {
    let udp_len = (8 + inner.payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&inner.port.to_be_bytes());
    udp.extend_from_slice(&inner.port.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&inner.payload);
    // IPv6 UDP needs a checksum (RFC 8200 8.1): over the pseudo-header and the datagram.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&inner.src.octets());
    pseudo.extend_from_slice(&inner.dst.octets());
    pseudo.extend_from_slice(&u32::from(udp_len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, wire::IPPROTO_UDP]);
    pseudo.extend_from_slice(&udp);
    let check = match !ones_complement_sum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());

    let mut frame = Vec::new();
    frame.extend_from_slice(&inner.dst_mac);
    frame.extend_from_slice(&inner.src_mac);
    frame.extend_from_slice(&wire::ETH_P_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[wire::IPPROTO_UDP, 64]);
    frame.extend_from_slice(&inner.src.octets());
    frame.extend_from_slice(&inner.dst.octets());
    frame.extend_from_slice(&udp);

    let outer_len = (8 + 8 + frame.len()) as u16;
    let mut d = Vec::new();
    d.extend_from_slice(&40123u16.to_be_bytes());
    d.extend_from_slice(&vxlan_port.to_be_bytes());
    d.extend_from_slice(&outer_len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&wire::vxlan_header(vni));
    d.extend_from_slice(&frame);
    d
}

/// The folded 16-bit one's-complement sum of `bytes` (big-endian words, odd tail padded).
fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// How to shape the outer IPv4 packets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    /// IPv4 options after the header (padded to a multiple of 4 with EOL bytes).
    pub options: &'static [u8],
    /// Cut the datagram into fragments of at most this many payload bytes (rounded down
    /// to a multiple of 8); `None`: one packet.
    pub fragment: Option<usize>,
}

/// Four NOP options: harmless, but they move the UDP header.
pub const NOP_OPTIONS: &[u8] = &[1, 1, 1, 1];

/// The outer IPv4 packets (header + payload, no Ethernet) carrying `datagram`.
pub fn ipv4_packets(src: Ipv4Addr, dst: Ipv4Addr, datagram: &[u8], shape: Shape) -> Vec<Vec<u8>> {
    let mut options = shape.options.to_vec();
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    let step = shape
        .fragment
        .map_or(datagram.len(), |n| (n / 8).max(1) * 8);
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let end = (offset + step).min(datagram.len());
        let more = end < datagram.len();
        let hl = 20 + options.len();
        let mut h = vec![0u8; hl];
        h[0] = 0x40 | (hl / 4) as u8;
        h[2..4].copy_from_slice(&((hl + end - offset) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&0x5151u16.to_be_bytes());
        let frag = ((offset / 8) as u16) | if more { 0x2000 } else { 0 };
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = 64;
        h[9] = wire::IPPROTO_UDP;
        h[12..16].copy_from_slice(&src.octets());
        h[16..20].copy_from_slice(&dst.octets());
        h[20..].copy_from_slice(&options);
        // The kernel fills in the checksum of a raw IP_HDRINCL packet.
        h.extend_from_slice(&datagram[offset..end]);
        out.push(h);
        offset = end;
    }
    out
}

/// Send raw IPv4 `packets` to `dst` from inside `ns`.
pub fn send_raw(ns: &NetNs, dst: Ipv4Addr, packets: Vec<Vec<u8>>) {
    ns.enter(move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            for p in &packets {
                let n = libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                assert_eq!(
                    n,
                    p.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
    });
}

//! Our own TCP connections that an address change killed. When the uplink's address goes
//! away, connections from it (to the API server, to etcd) are dead, but nothing tells
//! their owners: the kernel keeps them established until retransmissions time out, many
//! minutes later, and a client keeps sending its requests (the lease update announcing
//! the new address among them) into them. Shutting them down makes every client see the
//! end at once and reconnect from the new address.
//!
//! Only this process's sockets are touched (found through `/proc/self/fd`), and only with
//! `shutdown(2)`: the descriptors stay open and owned by whoever holds them, so no
//! descriptor is closed or reused behind a library's back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracing::{debug, info};

/// Shut down (both directions) every TCP socket of this process whose local address is
/// `addr`; how many.
pub fn shut_down_tcp_from(addr: IpAddr) -> usize {
    let table = match addr {
        IpAddr::V4(_) => "/proc/self/net/tcp",
        IpAddr::V6(_) => "/proc/self/net/tcp6",
    };
    let inodes: Vec<u64> = match std::fs::read_to_string(table) {
        Ok(text) => sockets_from(&text, addr),
        Err(error) => {
            debug!(%table, %error, "cannot read the TCP socket table");
            return 0;
        }
    };
    if inodes.is_empty() {
        return 0;
    }
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut shut = 0;
    for entry in fds.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(inode) = socket_inode(&target.to_string_lossy()) else {
            continue;
        };
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if inodes.contains(&inode) {
            // SAFETY: `fd` is open in this process (just listed) and refers to the socket
            // with this inode; shutdown neither closes nor invalidates it.
            if unsafe { libc::shutdown(fd, libc::SHUT_RDWR) } == 0 {
                shut += 1;
            }
        }
    }
    if shut > 0 {
        info!(%addr, connections = shut, "closed our connections from the address the uplink lost; their clients reconnect");
    }
    shut
}

/// The inode in a `/proc/<pid>/fd` link target `socket:[<inode>]`.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inodes of the sockets in a `/proc/net/tcp` or `tcp6` table whose local address is
/// `addr`. Addresses are printed as the kernel holds them: each 32-bit word of the
/// network-order address in hex, as a host-order (here little-endian) integer.
fn sockets_from(table: &str, addr: IpAddr) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?.split(':').next()?;
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            (parse_proc_addr(local)? == addr).then_some(inode)
        })
        .collect()
}

fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_le_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&hex[i * 8..i * 8 + 8])?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_are_matched_by_local_address() {
        // Two sockets from 198.18.0.1, one from 127.0.0.1.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 011212C6:C35A FE1212C6:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n\
   1: 0100007F:0929 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0\n\
   2: 011212C6:C35B FE1212C6:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n";
        let from = IpAddr::V4(Ipv4Addr::new(198, 18, 18, 1));
        assert_eq!(sockets_from(table, from), vec![4242, 4343]);
        assert_eq!(
            sockets_from(table, IpAddr::V4(Ipv4Addr::LOCALHOST)),
            vec![17]
        );
        assert!(sockets_from(table, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9))).is_empty());
    }

    #[test]
    fn ipv6_words_and_fd_links_parse() {
        // ::1 as the kernel prints it.
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000"),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
    }

    #[test]
    fn a_socket_of_ours_is_found_and_shut_down() {
        // An address no other test uses: only this test's sockets are shut down.
        let addr = Ipv4Addr::new(127, 0, 0, 77);
        let listener = std::net::TcpListener::bind((addr, 0)).unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        // The accepted end (and the listener) are local to 127.0.0.77.
        assert!(shut_down_tcp_from(IpAddr::V4(addr)) >= 1);
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "the peer sees the end");
    }
}

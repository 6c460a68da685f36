//! The kernel's count of datagrams dropped on one UDP socket (receive buffer full, or refused
//! by a socket filter), from `/proc/self/net/udp{,6}`: the `drops` column of the row whose
//! inode is the socket's. The process's own network namespace is the one `/proc/self/net`
//! shows, which is the socket's unless it was moved.

use std::io;
use std::os::fd::AsRawFd;

/// Datagrams the kernel dropped on this socket since it was created, or `None` if the socket
/// is not found in `/proc/self/net/udp` or `/proc/self/net/udp6`. Reads two small files: call
/// it when metrics are asked for, not per packet.
pub fn socket_drops(socket: &impl AsRawFd) -> io::Result<Option<u64>> {
    let inode = socket_inode(socket)?;
    for table in ["/proc/self/net/udp", "/proc/self/net/udp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(drops) = parse_socket_drops(&text, inode) {
            return Ok(Some(drops));
        }
    }
    Ok(None)
}

/// The `drops` column of the row for socket `inode` in a `/proc/net/udp`-format table.
///
/// The columns are `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt
/// uid timeout inode ref pointer drops`; the header row and malformed rows are skipped.
pub fn parse_socket_drops(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let row_inode: u64 = cols.get(9)?.parse().ok()?;
        if row_inode != inode {
            return None;
        }
        cols.get(12)?.parse().ok()
    })
}

fn socket_inode(socket: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: fstat on our own descriptor into a zeroed stat buffer of the right type.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` outlives the call.
    if unsafe { libc::fstat(socket.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1234: 00000000:0D96 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 31337 2 0000000000000000 42
 1235: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 999 2 0000000000000000 0
";

    #[test]
    fn the_row_with_the_sockets_inode_gives_its_drops() {
        assert_eq!(parse_socket_drops(TABLE, 31337), Some(42));
        assert_eq!(parse_socket_drops(TABLE, 999), Some(0));
    }

    #[test]
    fn an_unknown_inode_or_a_malformed_table_gives_nothing() {
        assert_eq!(parse_socket_drops(TABLE, 1), None);
        assert_eq!(parse_socket_drops("header\n1: short row", 1), None);
        assert_eq!(parse_socket_drops("", 0), None);
    }

    #[test]
    fn a_live_socket_is_found_with_no_drops() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        assert_eq!(socket_drops(&sock).expect("read /proc"), Some(0));
    }

    #[test]
    fn a_full_receive_queue_is_counted() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        // Nobody reads `rx`: its (default, at most a few MiB) buffer overflows.
        let datagram = [0u8; 1400];
        for _ in 0..20_000 {
            let _ = tx.send_to(&datagram, rx.local_addr().expect("addr"));
        }
        let drops = socket_drops(&rx).expect("read /proc").expect("row");
        assert!(drops > 0, "20000 unread datagrams and no drops counted");
    }
}

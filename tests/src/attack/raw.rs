//! UDP with a forged source address: a raw IPv4 socket (`IP_HDRINCL`) inside a lab namespace,
//! for attacks that spoof a relay, a peer or a victim of reflection.

use std::io;
use std::net::SocketAddrV4;

/// A raw socket that writes whole IPv4/UDP datagrams.
pub struct RawUdp {
    fd: libc::c_int,
    buf: Vec<u8>,
}

impl RawUdp {
    pub fn new() -> io::Result<RawUdp> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawUdp {
            fd,
            buf: Vec::with_capacity(2048),
        })
    }

    /// Sends `payload` as a UDP datagram from `src` (forged) to `dst`.
    pub fn send(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> io::Result<()> {
        write_ipv4_udp(&mut self.buf, src, dst, payload);
        let to = sockaddr(dst);
        // SAFETY: `buf` and `to` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd,
                self.buf.as_ptr().cast(),
                self.buf.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for RawUdp {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// Writes an IPv4/UDP datagram (header checksum set, UDP checksum none) into `buf`.
pub fn write_ipv4_udp(buf: &mut Vec<u8>, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let total = 20 + 8 + payload.len();
    buf.clear();
    buf.extend_from_slice(&[0x45, 0]);
    buf.extend_from_slice(&(total as u16).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    buf.extend_from_slice(&src.ip().octets());
    buf.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&buf[..20]);
    buf[10..12].copy_from_slice(&sum.to_be_bytes());
    buf.extend_from_slice(&src.port().to_be_bytes());
    buf.extend_from_slice(&dst.port().to_be_bytes());
    buf.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    // A zero UDP checksum means "none" in IPv4.
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(payload);
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The IPv4 header checksum.
fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checksum_of_a_known_header() {
        // From RFC 1071's worked example style: a header whose checksum field is zero.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
    }
}

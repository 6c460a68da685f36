//! `sendmmsg`/`recvmmsg` on IPv4 UDP sockets, for the load generator and the batched
//! reference forwarder.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;

fn to_sockaddr(a: &SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr = libc::in_addr {
        s_addr: u32::from_ne_bytes(a.ip().octets()),
    };
    s
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(s.sin_addr.s_addr.to_ne_bytes()),
        u16::from_be(s.sin_port),
    )
}

/// Sends each of `bufs` (to the matching `dest`, or to the connected peer when `dest` is
/// `None`) in one `sendmmsg`. Returns how many were sent.
pub fn send_batch(
    fd: RawFd,
    bufs: &[&[u8]],
    dest: Option<&[SocketAddrV4]>,
    flags: i32,
) -> io::Result<usize> {
    let n = bufs.len();
    if n == 0 {
        return Ok(0);
    }
    let mut iovs: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut addrs: Vec<libc::sockaddr_in> = match dest {
        Some(d) => d.iter().take(n).map(to_sockaddr).collect(),
        None => Vec::new(),
    };
    // SAFETY: mmsghdr is plain old data.
    let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_iov = &mut iovs[i];
        m.msg_hdr.msg_iovlen = 1;
        if let Some(a) = addrs.get_mut(i) {
            m.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
    }
    // SAFETY: every pointer in msgs points into iovs/addrs/bufs, alive for the call.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as u32, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Reusable receive buffers for `recv_batch`.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_in>,
}

impl RecvBatch {
    pub fn new(count: usize, size: usize) -> Self {
        RecvBatch {
            bufs: vec![vec![0u8; size]; count],
            lens: vec![0; count],
            // SAFETY: sockaddr_in is plain old data.
            addrs: vec![unsafe { std::mem::zeroed() }; count],
        }
    }

    pub fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        let n = self.lens[i];
        &mut self.bufs[i][..n]
    }

    pub fn addr(&self, i: usize) -> SocketAddrV4 {
        from_sockaddr(&self.addrs[i])
    }

    /// One `recvmmsg` into the buffers; returns how many datagrams arrived.
    pub fn recv(&mut self, fd: RawFd, flags: i32) -> io::Result<usize> {
        let n = self.bufs.len();
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain old data.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: every pointer in msgs points into self's buffers, alive for the call.
        let r =
            unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), n as u32, flags, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = r as usize;
        for (i, m) in msgs.iter().take(r).enumerate() {
            self.lens[i] = m.msg_len as usize;
        }
        Ok(r)
    }
}

/// Sets a socket's receive (or send) buffer, beyond `rmem_max` (root).
pub fn set_buffer(fd: RawFd, recv: bool, bytes: i32) {
    let opt = if recv {
        libc::SO_RCVBUFFORCE
    } else {
        libc::SO_SNDBUFFORCE
    };
    // SAFETY: setsockopt with a pointer to a live i32 of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_crosses_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = match rx.local_addr().expect("addr") {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let sent = send_batch(
            tx.as_raw_fd(),
            &[b"one", b"two", b"three"],
            Some(&[to, to, to]),
            0,
        )
        .expect("sendmmsg");
        assert_eq!(sent, 3);
        let mut batch = RecvBatch::new(8, 64);
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = batch
                .recv(rx.as_raw_fd(), libc::MSG_WAITFORONE)
                .expect("recvmmsg");
            for i in 0..n {
                got.push(batch.buf(i).to_vec());
                assert_eq!(
                    batch.addr(i),
                    match tx.local_addr().expect("a") {
                        std::net::SocketAddr::V4(a) => a,
                        _ => unreachable!(),
                    }
                );
            }
        }
        assert_eq!(
            got,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }
}

//! The control plane's UDP socket, with receive and send buffers large enough for a crowd.
//!
//! With the kernel's default (~200 KiB), a thousand agents acknowledging one round of pushes at
//! once overflow the socket: datagrams are dropped, QUIC waits out its loss timers, and joins
//! stall with both processes idle.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Buffer asked for in each direction.
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Binds `addr` and raises its buffers to `bytes` (beyond `rmem_max` when privileged).
pub fn bind(addr: SocketAddr, bytes: usize) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    grow_buffers(&socket, bytes);
    Ok(socket)
}

/// Raises the socket's buffers to `bytes` each: `SO_*BUFFORCE` when allowed, else the plain
/// options (capped by `net.core.{r,w}mem_max`). Best effort.
pub fn grow_buffers(socket: &impl AsRawFd, bytes: usize) {
    let fd = socket.as_raw_fd();
    let v = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
        let forced = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                force,
                (&v as *const libc::c_int).cast(),
                size,
            )
        };
        if forced != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    plain,
                    (&v as *const libc::c_int).cast(),
                    size,
                )
            };
        }
    }
}

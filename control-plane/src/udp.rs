//! The control plane's UDP socket, with receive and send buffers large enough for a crowd.
//!
//! With the kernel's default (~200 KiB), a thousand agents acknowledging one round of pushes at
//! once overflow the socket: datagrams are dropped, QUIC waits out its loss timers, and joins
//! stall with both processes idle.

use std::net::{SocketAddr, UdpSocket};

/// Buffer asked for in each direction.
pub const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Binds `addr` and raises its buffers to `bytes` (beyond `rmem_max` when privileged; best
/// effort).
pub fn bind(addr: SocketAddr, bytes: usize) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    rally_udp::grow_socket_buffers(&socket, bytes);
    Ok(socket)
}

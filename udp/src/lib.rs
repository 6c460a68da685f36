//! Batched UDP I/O shared by Rally's agent and relay.
//!
//! - [`GsoBatch`]: datagrams to one destination gathered for a single UDP GSO send.
//! - [`grow_socket_buffers`]: deep socket buffers, so bursts are queued rather than dropped.
//! - [`skip_receive_metadata`]: no per-datagram TOS / packet-info control messages for a
//!   socket that does not use them.
//! - [`socket_drops`]: what the kernel dropped on a socket's receive queue.
//! - [`recv_batch`], [`send`] and [`send_to`]: one `recvmmsg` (with UDP GRO) that tells when
//!   the queue ran dry, and sends (a GSO train through quinn-udp's `UdpSocketState`, or one
//!   datagram) that wait out a full send buffer, on a non-blocking std socket.
//! - [`thread_class`]: the data path's thread in the real-time class while bulk traffic flows.

#![warn(missing_docs)]

mod drops;
mod gso;
mod io;
pub mod thread_class;

use std::os::fd::AsRawFd;

pub use drops::{parse_socket_drops, socket_drops};
pub use gso::{GsoBatch, MAX_GSO_BYTES};
pub use io::{recv_batch, send, send_to, wait_writable, Received, SEND_WAIT};

/// Turns off the per-datagram control messages quinn-udp's `UdpSocketState::new` asks the
/// kernel for besides GRO's segment size: the TOS/traffic class (ECN) and the packet info
/// (destination address). A socket that reads neither `RecvMeta::ecn` nor `RecvMeta::dst_ip`
/// saves building and parsing two control messages per datagram or GRO train. Call it after
/// `UdpSocketState::new`; `RecvMeta::ecn` and `dst_ip` are then `None`. Best effort: an
/// option the socket's family lacks is skipped.
pub fn skip_receive_metadata(socket: &impl AsRawFd) {
    let fd = socket.as_raw_fd();
    let off: libc::c_int = 0;
    for (level, name) in [
        (libc::IPPROTO_IP, libc::IP_RECVTOS),
        (libc::IPPROTO_IP, libc::IP_PKTINFO),
        (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS),
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    ] {
        // SAFETY: setsockopt on our own socket with a pointer to a live c_int and its size; an
        // option the family does not have fails harmlessly.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// Asks for `bytes` of receive and send buffer (past `rmem_max`/`wmem_max` where the process
/// may: root or CAP_NET_ADMIN); returns what the kernel granted.
pub fn grow_socket_buffers(socket: &impl AsRawFd, bytes: usize) -> (usize, usize) {
    let fd = socket.as_raw_fd();
    let set = |force: libc::c_int, plain: libc::c_int| {
        let v = bytes as libc::c_int;
        let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: setsockopt on our own socket with a pointer to a live c_int and its size.
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
        let mut got: libc::c_int = 0;
        let mut len = size;
        // SAFETY: getsockopt into a live c_int with its size.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                plain,
                (&mut got as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        got.max(0) as usize
    };
    (
        set(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        set(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    )
}

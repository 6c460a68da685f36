//! Batched reads and GSO sends through quinn-udp on a non-blocking socket, as the agent's
//! data-plane thread drives its socket under its own `ppoll` (the relay's forwarding thread
//! calls quinn-udp itself under a level-triggered `epoll`). A short read needs no readiness
//! bookkeeping; a full send buffer is waited out in place.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

/// Longest wait for room in a socket's send buffer before a send gives up (the datagram is
/// dropped: a peer that stopped reading for this long is not kept up with).
pub const SEND_WAIT: Duration = Duration::from_secs(1);

/// What one batched read returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Buffers filled (each a datagram or a GRO train), from the first.
    pub count: usize,
    /// The socket's queue ran dry (the batch came back short, or empty): the reader goes
    /// back to waiting without one more read that would find nothing.
    pub drained: bool,
}

/// Reads up to `bufs.len()` datagrams or GRO trains (at most [`quinn_udp::BATCH_SIZE`]) with one
/// `recvmmsg`, without waiting (the socket is non-blocking). A short or empty batch reports
/// `drained`. Errors are the socket's (e.g. an ICMP error for an earlier send).
pub fn recv_batch(
    socket: &UdpSocket,
    state: &UdpSocketState,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
) -> io::Result<Received> {
    let wanted = bufs.len().min(meta.len()).min(quinn_udp::BATCH_SIZE);
    match state.recv(socket.into(), bufs, meta) {
        Ok(count) => Ok(Received {
            count,
            drained: count < wanted,
        }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received {
            count: 0,
            drained: true,
        }),
        Err(e) => Err(e),
    }
}

/// Sends `transmit` (one datagram, or a GSO train when it has a `segment_size`), waiting up to
/// [`SEND_WAIT`] while the socket's send buffer is full. Errors are the socket's; the caller
/// decides whether one matters (a relay or an agent carries on).
pub fn send(socket: &UdpSocket, state: &UdpSocketState, transmit: &Transmit<'_>) -> io::Result<()> {
    loop {
        match state.send(socket.into(), transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(socket, SEND_WAIT)?,
            r => return r,
        }
    }
}

/// Sends one datagram to `to`, waiting as [`send`] does while the send buffer is full.
pub fn send_to(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) -> io::Result<usize> {
    loop {
        match socket.send_to(bytes, to) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(socket, SEND_WAIT)?,
            r => return r,
        }
    }
}

/// Waits until `fd` can be written, at most `limit` (then a `TimedOut` error).
pub fn wait_writable(fd: &impl AsRawFd, limit: Duration) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one valid pollfd, its count 1.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the send buffer stayed full",
            ));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiving and a sending socket on loopback, non-blocking, the sender connected to the
    /// receiver.
    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        tx.connect(rx.local_addr().expect("addr")).expect("connect");
        rx.set_nonblocking(true).expect("non-blocking");
        tx.set_nonblocking(true).expect("non-blocking");
        (rx, tx)
    }

    /// Waits until `fd` has something to read (a condition, not a sleep: `poll` returns when
    /// the datagram is queued).
    fn wait_readable(fd: &impl AsRawFd) {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count 1.
        let r = unsafe { libc::poll(&mut p, 1, 5_000) };
        assert_eq!(r, 1, "nothing to read within 5 s");
    }

    #[test]
    fn a_short_batch_is_drained_and_a_full_one_is_not() {
        let (rx, tx) = pair();
        let state = UdpSocketState::new((&rx).into()).expect("state");
        let mut bufs = vec![vec![0u8; 64]; 4];
        let mut meta = vec![RecvMeta::default(); 4];
        // Different lengths, so GRO (where the kernel applies it) cannot merge them.
        for i in 0..6u8 {
            tx.send(&vec![i; 10 + usize::from(i)]).expect("send");
        }
        wait_readable(&rx);
        let mut iovs: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let first = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((first.count, first.drained), (4, false));
        assert_eq!(meta[0].len, 10);
        let second = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((second.count, second.drained), (2, true));
        assert_eq!(meta[1].len, 15);
        // Empty is drained too; a new datagram is read by the next call.
        let third = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((third.count, third.drained), (0, true));
        tx.send(b"again").expect("send");
        wait_readable(&rx);
        let fourth = recv_batch(&rx, &state, &mut iovs, &mut meta).expect("read");
        assert_eq!((fourth.count, fourth.drained), (1, true));
    }

    #[test]
    fn send_delivers_a_gso_train_as_datagrams() {
        // The receiver has no quinn-udp state, so no UDP_GRO: the train arrives split.
        let (rx, tx) = pair();
        let tx_state = UdpSocketState::new((&tx).into()).expect("state");
        let to = rx.local_addr().expect("addr");
        let train = [7u8; 30];
        let segment_size = (tx_state.max_gso_segments() > 1).then_some(10);
        send(
            &tx,
            &tx_state,
            &Transmit {
                destination: to,
                ecn: None,
                contents: &train,
                segment_size,
                src_ip: None,
            },
        )
        .expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.iter().sum::<usize>() < train.len() {
            wait_readable(&rx);
            got.push(rx.recv(&mut buf).expect("recv"));
        }
        let want = if segment_size.is_some() {
            vec![10, 10, 10]
        } else {
            vec![30]
        };
        assert_eq!(got, want);
    }
}

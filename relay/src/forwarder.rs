//! The forwarding thread: the relay's UDP sockets and the sans-IO [`Relay`], driven by a plain
//! `poll(2)` loop on a thread of its own.
//!
//! The loop waits for a socket to be readable (or the relay's next timeout), reads what it
//! holds in batches (`recvmmsg` with UDP GRO, through quinn-udp: one read returns up to
//! [`quinn_udp::BATCH_SIZE`] datagrams or trains of same-sized datagrams from one source), puts
//! every datagram through [`Relay::handle_datagram`] and sends what it says. A read that comes
//! back short means the queue ran dry: the loop goes back to `poll`, which is level-triggered,
//! so nothing that arrived meanwhile is missed and no read is spent finding the queue empty.
//! Per wake-up that is one `poll` and one `recvmmsg` and the sends, with no async runtime
//! between them (the tokio task this replaced also paid the runtime's waker and timer
//! bookkeeping and a last `recvmmsg` that found nothing, on every wake-up).
//!
//! Forwarding rewrites each datagram in place, so consecutive `Deliver`s to one destination
//! leave as one UDP GSO send: a GRO train whose datagrams all go to one session is sent
//! straight from the receive buffer; others are gathered in a [`GsoBatch`] per socket, flushed
//! when the destination changes and after the last read of a wake-up. Buffers are allocated
//! once: the `Send` → `Deliver` path allocates nothing.
//!
//! Stats requests from the metrics listener (another thread) arrive on a channel the loop
//! looks at on every turn; the loop wakes at least every [`MAX_WAIT`] to look at them and at the
//! stop flag.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rally_udp::{socket_drops, GsoBatch};
use tokio::sync::{mpsc, oneshot};

use crate::core::{Action, Relay, Stats, Via};
use crate::metrics::Snapshot;

/// Reads (each up to [`quinn_udp::BATCH_SIZE`] datagrams or GRO trains) per wake-up of one
/// socket before the loop looks at the others.
const ROUNDS: usize = 8;
/// One receive buffer: the largest UDP payload, which is also the largest GRO train.
const RX_BUF: usize = 65_535;
/// Most datagrams in one GRO train (the kernel's `UDP_MAX_SEGMENTS`, 128 since Linux 6.x).
const MAX_TRAIN: usize = 128;
/// Longest the loop sleeps before it looks at stats requests and the stop flag.
pub const MAX_WAIT: Duration = Duration::from_millis(50);
/// Longest a send waits for room in a full socket send buffer before the datagram is dropped.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// One non-blocking UDP socket with its quinn-udp state (GRO, GSO) and its pending GSO batch.
#[derive(Debug)]
pub struct Udp {
    pub socket: UdpSocket,
    pub state: quinn_udp::UdpSocketState,
    gso: GsoBatch,
}

impl Udp {
    /// Wraps a bound, non-blocking socket whose quinn-udp state is `state`.
    pub fn new(socket: UdpSocket, state: quinn_udp::UdpSocketState) -> Self {
        let gso = GsoBatch::new(state.max_gso_segments());
        Udp { socket, state, gso }
    }

    /// Sends `contents` to `to`: one datagram, or `segment_size`-byte datagrams (the last may
    /// be shorter) in one GSO send. A full send buffer is waited out for up to [`SEND_WAIT`].
    fn send(&self, to: SocketAddr, contents: &[u8], segment_size: Option<usize>) {
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            match self.state.send((&self.socket).into(), &transmit) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_writable(&self.socket, SEND_WAIT) {
                        tracing::debug!(%to, "send buffer full: datagram dropped");
                        return;
                    }
                }
                Err(e) => {
                    // E.g. an ICMP error for an earlier send: nothing to do but carry on.
                    tracing::debug!(%to, error = %e, "send failed");
                    return;
                }
            }
        }
    }

    /// Sends what the GSO batch holds, if anything.
    fn flush(&mut self) {
        if let Some((to, contents, segment_size)) = self.gso.pending() {
            self.send(to, contents, segment_size);
        }
        self.gso.clear();
    }
}

/// Waits until `socket` can take a datagram; false after `wait` without room.
fn wait_writable(socket: &UdpSocket, wait: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll on one live pollfd we own, with its count.
    let r = unsafe { libc::poll(&mut fd, 1, ms) };
    r > 0 && fd.revents & libc::POLLOUT != 0
}

/// The relay's sockets: the primary one and the alternate-port one for RFC 5780.
#[derive(Debug)]
pub struct Sockets {
    pub primary: Udp,
    pub alt: Option<Udp>,
}

impl Sockets {
    fn get(&self, via: Via) -> &Udp {
        match via {
            Via::Alt => self.alt.as_ref().unwrap_or(&self.primary),
            Via::Primary => &self.primary,
        }
    }

    fn get_mut(&mut self, via: Via) -> &mut Udp {
        match via {
            Via::Alt => self.alt.as_mut().unwrap_or(&mut self.primary),
            Via::Primary => &mut self.primary,
        }
    }

    /// The kernel's receive drops per socket, for the metrics (read from `/proc`).
    fn kernel_drops(&self) -> Vec<(&'static str, u64)> {
        let alt = self.alt.as_ref().map(|a| ("alt", a));
        std::iter::once(("primary", &self.primary))
            .chain(alt)
            .filter_map(|(name, udp)| match socket_drops(&udp.socket) {
                Ok(Some(n)) => Some((name, n)),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the socket's kernel drops");
                    None
                }
            })
            .collect()
    }

    fn flush(&mut self) {
        self.primary.flush();
        if let Some(alt) = &mut self.alt {
            alt.flush();
        }
    }
}

/// Receive buffers and their metadata, allocated once.
struct RxBuffers {
    bufs: Vec<Box<[u8]>>,
    meta: Vec<quinn_udp::RecvMeta>,
    /// Where each datagram of the GRO train being handled goes (reused).
    forwards: Vec<Option<(Via, SocketAddr)>>,
}

impl RxBuffers {
    fn new() -> Self {
        RxBuffers {
            bufs: (0..quinn_udp::BATCH_SIZE)
                .map(|_| vec![0u8; RX_BUF].into_boxed_slice())
                .collect(),
            meta: vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE],
            forwards: Vec::with_capacity(MAX_TRAIN),
        }
    }
}

/// Everything the forwarding thread owns.
pub struct Forwarder {
    pub sockets: Sockets,
    pub relay: Relay,
    /// Stats requests from the metrics listener.
    pub stats: mpsc::Receiver<oneshot::Sender<Snapshot>>,
    /// Set by the server to stop the loop (seen within [`MAX_WAIT`]).
    pub stop: Arc<AtomicBool>,
}

impl Forwarder {
    /// Runs the loop until `stop` is set; returns the final counters.
    pub fn run(mut self) -> Stats {
        let mut rx = RxBuffers::new();
        let alt_fd = self
            .sockets
            .alt
            .as_ref()
            .map_or(-1, |a| a.socket.as_raw_fd());
        let mut fds = [
            libc::pollfd {
                fd: self.sockets.primary.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            // A negative fd is ignored by poll(2).
            libc::pollfd {
                fd: alt_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        while !self.stop.load(Ordering::Relaxed) {
            while let Ok(reply) = self.stats.try_recv() {
                let _ = reply.send(Snapshot {
                    stats: self.relay.stats(),
                    socket_drops: self.sockets.kernel_drops(),
                });
            }
            let now = now();
            if self.relay.poll_timeout().is_some_and(|t| t <= now) {
                self.relay.handle_timeout(now, unix_now());
            }
            let wait = self
                .relay
                .poll_timeout()
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(now))
                .min(MAX_WAIT);
            // Round up: a timeout due in 0.4 ms must not turn into a busy loop of 0 ms polls.
            let ms = libc::c_int::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(0);
            // SAFETY: poll on an array of live pollfds we own, with its length.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            let ready = libc::POLLIN | libc::POLLERR;
            if fds[0].revents & ready != 0 {
                self.drain(Via::Primary, &mut rx);
            }
            if fds[1].revents & ready != 0 {
                self.drain(Via::Alt, &mut rx);
            }
        }
        self.relay.stats()
    }

    /// Reads and handles what `via`'s socket holds: up to [`ROUNDS`] reads, until one comes
    /// back short (the queue ran dry; `poll` tells when there is more).
    fn drain(&mut self, via: Via, rx: &mut RxBuffers) {
        let now = now();
        let now_unix = unix_now();
        for _ in 0..ROUNDS {
            let n = {
                let udp = self.sockets.get(via);
                let mut iovs: [io::IoSliceMut<'_>; quinn_udp::BATCH_SIZE] = {
                    let mut bufs = rx.bufs.iter_mut();
                    std::array::from_fn(|_| match bufs.next() {
                        Some(b) => io::IoSliceMut::new(b),
                        None => io::IoSliceMut::new(&mut []),
                    })
                };
                match udp
                    .state
                    .recv((&udp.socket).into(), &mut iovs, &mut rx.meta)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // E.g. an ICMP error for an earlier send: nothing to do but carry on.
                        tracing::debug!(error = %e, "recv failed");
                        continue;
                    }
                }
            };
            for i in 0..n {
                let (Some(meta), Some(buf)) = (rx.meta.get(i), rx.bufs.get_mut(i)) else {
                    break;
                };
                let Some(train) = buf.get_mut(..meta.len) else {
                    continue;
                };
                let stride = if meta.stride == 0 {
                    meta.len
                } else {
                    meta.stride
                };
                handle_train(
                    via,
                    meta.addr,
                    train,
                    stride.max(1),
                    &mut self.sockets,
                    &mut self.relay,
                    &mut rx.forwards,
                    now,
                    now_unix,
                );
            }
            if n < quinn_udp::BATCH_SIZE {
                break;
            }
        }
        // Once per wake-up, not per read: a run of datagrams to one destination that straddles
        // two reads still leaves as one GSO send (one `sendmsg`, and behind it one trip through
        // the transmit path, instead of two).
        self.sockets.flush();
    }
}

/// Handles the datagrams of one read (`stride` bytes each, the last may be shorter) from `src`.
#[allow(clippy::too_many_arguments)]
fn handle_train(
    via: Via,
    src: SocketAddr,
    train: &mut [u8],
    stride: usize,
    sockets: &mut Sockets,
    relay: &mut Relay,
    forwards: &mut Vec<Option<(Via, SocketAddr)>>,
    now: Instant,
    now_unix: u64,
) {
    forwards.clear();
    // `chunks_mut` yields nothing for an empty datagram, which must still be handled (and
    // counted as garbage).
    let empty: &mut [u8] = &mut [];
    let datagrams = train.chunks_mut(stride);
    let datagrams = (datagrams.len() == 0)
        .then_some(empty)
        .into_iter()
        .chain(datagrams);
    for datagram in datagrams {
        let len = datagram.len();
        match relay.handle_datagram(via, src, datagram, now, now_unix) {
            Action::Forward { via, to, len: n } if n == len => forwards.push(Some((via, to))),
            Action::Forward { .. } => forwards.push(None),
            Action::Reply(t) | Action::Drop { reply: Some(t), .. } => {
                forwards.push(None);
                sockets.get(t.via).send(t.to, &t.payload, None);
            }
            Action::Drop { reply: None, .. } => forwards.push(None),
        }
    }
    // The usual case: the whole train goes to one session, already rewritten in place.
    if let [Some(first), rest @ ..] = forwards.as_slice() {
        if forwards.len() > 1 && rest.iter().all(|f| *f == Some(*first)) {
            let (out_via, to) = *first;
            let udp = sockets.get_mut(out_via);
            udp.flush();
            let max = udp.state.max_gso_segments().max(1) * stride;
            for chunk in train.chunks(max) {
                let segment = (chunk.len() > stride).then_some(stride);
                udp.send(to, chunk, segment);
            }
            return;
        }
    }
    for (datagram, forward) in train.chunks(stride).zip(forwards.iter()) {
        let Some((out_via, to)) = *forward else {
            continue;
        };
        let udp = sockets.get_mut(out_via);
        if !udp.gso.fits(to, datagram.len()) {
            udp.flush();
        }
        udp.gso.push(to, datagram);
    }
}

/// The monotonic clock, for the relay's timeouts and rate limits (and its origin, read by
/// `Server::bind`).
#[allow(clippy::disallowed_methods)] // the driver is where the clock is read
pub fn now() -> Instant {
    Instant::now()
}

/// Wall-clock unix seconds, for token expiry.
#[allow(clippy::disallowed_methods)] // the driver is where the clock is read
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

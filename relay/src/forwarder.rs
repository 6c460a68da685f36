//! The forwarding thread: the relay's UDP sockets and the sans-IO [`Relay`], driven by a plain
//! level-triggered `epoll` loop on a thread of its own.
//!
//! The loop waits for a socket to be readable (or the relay's next timeout), reads what it
//! holds in batches (`recvmmsg` with UDP GRO, through quinn-udp: one read returns up to
//! [`quinn_udp::BATCH_SIZE`] datagrams or trains of same-sized datagrams from one source), puts
//! every datagram through [`Relay::handle_datagram`] and sends what it says. A read that comes
//! back short means the queue ran dry: the loop goes back to `epoll_wait`, level-triggered,
//! so nothing that arrived meanwhile is missed and no read is spent finding the queue empty.
//! Per wake-up that is one `epoll_wait`, one clock read, one `recvmmsg` and the sends, with no
//! async runtime between them (the tokio task this replaced also paid the runtime's waker and
//! timer bookkeeping and a last `recvmmsg` that found nothing, on every wake-up). `epoll`
//! rather than `poll(2)`: `poll` adds itself to each socket's wait queue and takes itself off
//! again on every call (7.9 % of the relay's CPU at 100 pairs, against 5.0 % for `epoll_wait`).
//!
//! Forwarding rewrites each datagram in place, so consecutive `Deliver`s to one destination
//! leave as one UDP GSO send: a GRO train whose datagrams all go to one session is sent
//! straight from the receive buffer; others are gathered in a [`GsoBatch`] per socket, flushed
//! when the destination changes and after the last read of a wake-up. Buffers are allocated
//! once: the `Send` → `Deliver` path allocates nothing.
//!
//! When a wake-up was busy and emptied the sockets, the loop pauses briefly before it waits
//! for input again, so the next wake-up finds a fuller batch ([`crate::coalesce`]).
//!
//! Stats requests from the metrics listener (another thread) arrive on a channel the loop
//! looks at on every turn; the loop wakes at least every [`MAX_WAIT`] to look at them and at the
//! stop flag.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rally_udp::{socket_drops, GsoBatch};
use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::coalesce::{self, Wakeup};
use crate::core::{Action, Relay, Stats, Via};
use crate::metrics::Snapshot;
use crate::tcp::{TcpInput, TcpSide};
use rally_udp::thread_class::RealtimeBoost;

/// Reads (each up to [`quinn_udp::BATCH_SIZE`] datagrams or GRO trains) per wake-up of one
/// socket before the loop looks at the others.
const ROUNDS: usize = 8;
/// One receive buffer: the largest UDP payload, which is also the largest GRO train.
const RX_BUF: usize = 65_535;
/// Most datagrams in one GRO train (the kernel's `UDP_MAX_SEGMENTS`, 128 since Linux 6.x).
const MAX_TRAIN: usize = 128;
/// Datagrams forwarded between members in one wake-up that make it a busy one: bulk traffic
/// flows, and the thread takes its real-time class ([`rally_udp::thread_class`]). A game's
/// packets come one or two per wake-up; a transfer's come in GRO trains of dozens.
const BUSY_FORWARDS: usize = 16;

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

/// Token of the alternate-port socket in epoll events (the primary's is 0).
const ALT: u64 = 1;
/// Token of the eventfd the TCP connections wake the loop with.
const TCP: u64 = 2;
/// Frames from TCP connections handled per wake-up before the sockets get a turn.
const TCP_BATCH: usize = 256;

/// A level-triggered epoll instance watching the relay's sockets for input. Unlike `poll(2)`,
/// which adds itself to every socket's wait queue and removes itself again on every call, the
/// registration is made once; a call on a busy socket costs one readiness check.
struct Poller {
    epoll: OwnedFd,
}

impl Poller {
    fn new(primary: RawFd, alt: Option<RawFd>, tcp: Option<RawFd>) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let others = alt
            .map(|a| (a, ALT))
            .into_iter()
            .chain(tcp.map(|t| (t, TCP)));
        for (socket, token) in std::iter::once((primary, 0)).chain(others) {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: token,
            };
            // SAFETY: epoll_ctl on our epoll fd and a live socket, with a pointer to a live
            // event for the duration of the call.
            let r = unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, socket, &mut ev) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Poller { epoll })
    }

    /// Waits up to `wait` (rounded up to whole milliseconds: a timeout due in 0.4 ms must not
    /// turn into a busy loop of 0 ms waits) for input; returns how many of `events` it filled.
    fn wait(&self, events: &mut [libc::epoll_event], wait: Duration) -> io::Result<usize> {
        let ms = libc::c_int::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(0);
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: epoll_wait on our epoll fd, writing at most `max` events into `events`.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), max, ms) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

/// The relay's sockets: the primary one and the alternate-port one for RFC 5780.
#[derive(Debug)]
pub struct Sockets {
    pub primary: Udp,
    pub alt: Option<Udp>,
}

impl Sockets {
    /// The UDP socket for `via` (TCP sends never get here: see [`send_reply`]).
    fn get(&self, via: Via) -> &Udp {
        match via {
            Via::Alt => self.alt.as_ref().unwrap_or(&self.primary),
            Via::Primary | Via::Tcp => &self.primary,
        }
    }

    fn get_mut(&mut self, via: Via) -> &mut Udp {
        match via {
            Via::Alt => self.alt.as_mut().unwrap_or(&mut self.primary),
            Via::Primary | Via::Tcp => &mut self.primary,
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
    sockets: Sockets,
    relay: Relay,
    poller: Poller,
    /// Stats requests from the metrics listener.
    stats: mpsc::Receiver<oneshot::Sender<Snapshot>>,
    /// Set by the server to stop the loop (seen within [`MAX_WAIT`]).
    stop: Arc<AtomicBool>,
    /// How long a busy wake-up puts off the next ([`coalesce::pause_after`]).
    pause: Duration,
    /// The TCP connections, with `--listen-tcp`.
    tcp: Option<TcpSide>,
    /// The thread's real-time class while members' bulk traffic flows through it.
    boost: RealtimeBoost,
}

impl Forwarder {
    /// Registers the sockets for readiness; fails only if the kernel refuses an epoll
    /// instance. `pause` is the receive coalescing pause (zero: none).
    pub fn new(
        sockets: Sockets,
        relay: Relay,
        stats: mpsc::Receiver<oneshot::Sender<Snapshot>>,
        stop: Arc<AtomicBool>,
        pause: Duration,
        tcp: Option<TcpSide>,
    ) -> io::Result<Self> {
        let alt = sockets.alt.as_ref().map(|a| a.socket.as_raw_fd());
        let waker = tcp.as_ref().map(|t| t.waker.raw_fd());
        let poller = Poller::new(sockets.primary.socket.as_raw_fd(), alt, waker)?;
        Ok(Forwarder {
            sockets,
            relay,
            poller,
            stats,
            stop,
            pause,
            tcp,
            boost: RealtimeBoost::from_env(true),
        })
    }

    /// Runs the loop until `stop` is set; returns the final counters.
    pub fn run(mut self) -> Stats {
        if !self.pause.is_zero() {
            coalesce::precise_sleeps();
        }
        let mut rx = RxBuffers::new();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 3];
        let mut clock = Clock::new();
        while !self.stop.load(Ordering::Relaxed) {
            while let Ok(reply) = self.stats.try_recv() {
                let _ = reply.send(Snapshot {
                    stats: self.relay.stats(),
                    socket_drops: self.sockets.kernel_drops(),
                    realtime: self.boost.is_on(),
                });
            }
            let change = self.boost.on_turn(|| clock.now);
            log_class(change);
            // `clock` was read when the last wait ended: late by at most one wake-up's work.
            if self.relay.poll_timeout().is_some_and(|t| t <= clock.now) {
                self.relay.handle_timeout(clock.now, clock.unix);
            }
            let wait = self
                .relay
                .poll_timeout()
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(clock.now))
                .min(MAX_WAIT);
            let ready = self.poller.wait(&mut events, wait);
            clock.tick();
            let ready = match ready {
                Ok(ready) => ready,
                Err(e) => {
                    if e.kind() != io::ErrorKind::Interrupted {
                        tracing::warn!(error = %e, "epoll_wait failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    continue;
                }
            };
            let mut wakeup = Wakeup {
                datagrams: 0,
                drained: true,
            };
            let mut forwarded = 0;
            for ev in &events[..ready] {
                if ev.u64 == TCP {
                    self.drain_tcp(&clock);
                    continue;
                }
                let via = if ev.u64 == ALT {
                    Via::Alt
                } else {
                    Via::Primary
                };
                let (datagrams, sent, drained) = self.drain(via, &mut rx, &clock);
                wakeup.datagrams += datagrams;
                forwarded += sent;
                wakeup.drained &= drained;
            }
            if forwarded >= BUSY_FORWARDS {
                log_class(self.boost.on_bulk(clock.now));
            }
            if let Some(pause) = coalesce::pause_after(wakeup, self.pause) {
                std::thread::sleep(pause);
            }
        }
        self.relay.stats()
    }

    /// Reads and handles what `via`'s socket holds: up to [`ROUNDS`] reads, until one comes
    /// back short (the queue ran dry; `epoll_wait` tells when there is more). Returns how many
    /// datagrams it handled, how many of them it forwarded between members, and whether the
    /// queue ran dry.
    fn drain(&mut self, via: Via, rx: &mut RxBuffers, clock: &Clock) -> (usize, usize, bool) {
        let (now, now_unix) = (clock.now, clock.unix);
        let (mut datagrams, mut forwarded, mut drained) = (0, 0, false);
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
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
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
                datagrams += meta.len.div_ceil(stride.max(1)).max(1);
                forwarded += handle_train(
                    via,
                    meta.addr,
                    train,
                    stride.max(1),
                    &mut self.sockets,
                    self.tcp.as_ref(),
                    &mut self.relay,
                    &mut rx.forwards,
                    now,
                    now_unix,
                );
            }
            if n < quinn_udp::BATCH_SIZE {
                drained = true;
                break;
            }
        }
        // Once per wake-up, not per read: a run of datagrams to one destination that straddles
        // two reads still leaves as one GSO send (one `sendmsg`, and behind it one trip through
        // the transmit path, instead of two).
        self.sockets.flush();
        (datagrams, forwarded, drained)
    }
}

impl Forwarder {
    /// Handles what the TCP connections sent: connections opened and closed, and frames, each
    /// put through the core like a datagram (up to [`TCP_BATCH`]; the eventfd stays set when
    /// more wait).
    fn drain_tcp(&mut self, clock: &Clock) {
        let Some(tcp) = &mut self.tcp else {
            return;
        };
        tcp.waker.reset();
        for _ in 0..TCP_BATCH {
            let Ok(input) = tcp.input.try_recv() else {
                return;
            };
            match input {
                TcpInput::Open {
                    addr,
                    queue,
                    binding,
                } => {
                    tcp.queues.insert(addr, queue);
                    if let Some(binding) = binding {
                        self.relay.handle_tcp_open(addr, binding);
                    }
                }
                TcpInput::Closed { addr } => {
                    tcp.queues.remove(&addr);
                    self.relay.handle_closed(addr);
                }
                TcpInput::Frame { addr, mut frame } => {
                    let action = self.relay.handle_datagram(
                        Via::Tcp,
                        addr,
                        &mut frame,
                        clock.now,
                        clock.unix,
                    );
                    match action {
                        Action::Forward { via, to, len, also } => {
                            let msg = frame.get(..len).unwrap_or_default();
                            send_to(&self.sockets, Some(tcp), via, to, msg);
                            if let Some(other) = also {
                                send_to(&self.sockets, Some(tcp), Via::Tcp, other, msg);
                            }
                        }
                        Action::Reply(t) | Action::Drop { reply: Some(t), .. } => {
                            send_to(&self.sockets, Some(tcp), t.via, t.to, &t.payload);
                        }
                        Action::Drop { reply: None, .. } => {}
                    }
                }
            }
        }
        // More waiting: come back after the sockets had their turn.
        tcp.waker.wake();
    }
}

/// Sends one message on `via`: a TCP connection's queue, or a UDP socket at once.
fn send_to(sockets: &Sockets, tcp: Option<&TcpSide>, via: Via, to: SocketAddr, msg: &[u8]) {
    if via == Via::Tcp {
        match tcp.and_then(|t| t.queues.get(&to)) {
            Some(queue) => queue.push(msg),
            None => tracing::debug!(%to, "no tcp connection for a session: message dropped"),
        }
    } else {
        sockets.get(via).send(to, msg, None);
    }
}

/// Handles the datagrams of one read (`stride` bytes each, the last may be shorter) from `src`;
/// returns how many it forwarded.
#[allow(clippy::too_many_arguments)]
fn handle_train(
    via: Via,
    src: SocketAddr,
    train: &mut [u8],
    stride: usize,
    sockets: &mut Sockets,
    tcp: Option<&TcpSide>,
    relay: &mut Relay,
    forwards: &mut Vec<Option<(Via, SocketAddr)>>,
    now: Instant,
    now_unix: u64,
) -> usize {
    forwards.clear();
    let mut forwarded = 0;
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
            Action::Forward {
                via: Via::Tcp,
                to,
                len: n,
                also,
            } => {
                forwards.push(None);
                forwarded += 1;
                let msg = datagram.get(..n).unwrap_or_default();
                send_to(sockets, tcp, Via::Tcp, to, msg);
                if let Some(other) = also {
                    send_to(sockets, tcp, Via::Tcp, other, msg);
                }
            }
            Action::Forward {
                via, to, len: n, ..
            } if n == len => {
                forwarded += 1;
                forwards.push(Some((via, to)));
            }
            Action::Forward { .. } => forwards.push(None),
            Action::Reply(t) | Action::Drop { reply: Some(t), .. } => {
                forwards.push(None);
                send_to(sockets, tcp, t.via, t.to, &t.payload);
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
            return forwarded;
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
    forwarded
}

/// Logs a change of the forwarding thread's scheduling class.
fn log_class(change: Option<io::Result<bool>>) {
    match change {
        None => {}
        Some(Ok(realtime)) => tracing::debug!(realtime, "forwarding thread's scheduling class"),
        Some(Err(e)) => tracing::debug!("forwarding thread stays in the fair class: {e}"),
    }
}

//! The tokio driver: sockets, timer and metrics listener around the sans-IO [`Relay`].
//!
//! One task owns the relay and loops: wait for a socket to be readable, read what it holds in
//! batches (`recvmmsg` with UDP GRO, through quinn-udp: one read returns up to
//! [`quinn_udp::BATCH_SIZE`] datagrams or trains of same-sized datagrams from one source), put
//! every datagram through [`Relay::handle_datagram`] and send what it says; run
//! [`Relay::handle_timeout`] when [`Relay::poll_timeout`] says; answer stats requests from the
//! metrics listener.
//!
//! Forwarding rewrites each datagram in place, so consecutive `Deliver`s to one destination
//! leave as one UDP GSO send: a GRO train whose datagrams all go to one session is sent
//! straight from the receive buffer; others are gathered in a [`GsoBatch`] per socket, flushed
//! when the destination changes and after the last read of a wake-up. Buffers are allocated once: the
//! `Send` → `Deliver` path allocates nothing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rally_proto::Key32;
use rally_udp::{
    grow_socket_buffers, recv_batch, skip_receive_metadata, socket_drops, Drain, GsoBatch,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::core::{Action, Config, Limits, Relay, Stats, Via};
use crate::metrics;
use crate::metrics::Snapshot;

/// What `rally-relay serve` is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The UDP address for STUN and relaying (port 0 picks one).
    pub listen: SocketAddr,
    /// A second UDP port on the same IP for RFC 5780 `change_port`; 0 for none.
    pub alt_port: u16,
    /// Where to serve `GET /metrics`, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The control plane's public key.
    pub control_key: Key32,
    /// Session limits and rates.
    pub limits: Limits,
}

/// Why the relay could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A UDP socket could not be bound.
    #[error("cannot listen on udp {addr}")]
    BindUdp {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS's reason.
        source: io::Error,
    },
    /// The metrics listener could not be bound.
    #[error("cannot listen for metrics on tcp {addr}")]
    BindMetrics {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS's reason.
        source: io::Error,
    },
    /// `--alt-port` names the `--listen` port.
    #[error("--alt-port {0} is the --listen port; pick another")]
    AltPortIsListenPort(u16),
    /// A bound socket could not report its address.
    #[error("cannot read a socket's local address")]
    LocalAddr(#[source] io::Error),
}

/// A bound relay, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    primary: Udp,
    alt: Option<Udp>,
    metrics: Option<TcpListener>,
    relay: Relay,
}

/// Reads (each up to [`quinn_udp::BATCH_SIZE`] datagrams or GRO trains) per wake-up of one
/// socket before the loop looks at the others.
const ROUNDS: usize = 8;
/// One receive buffer: the largest UDP payload, which is also the largest GRO train.
const RX_BUF: usize = 65_535;
/// Socket receive and send buffers asked for: deep enough that a burst arriving while the
/// relay is not scheduled is queued, not dropped (~3 ms at 1 Mpps of 1200-byte datagrams).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Most datagrams in one GRO train (the kernel's `UDP_MAX_SEGMENTS`, 128 since Linux 6.x).
const MAX_TRAIN: usize = 128;
/// Concurrent metrics connections; more are closed at once.
const METRICS_CONNECTIONS: usize = 16;
/// Time a metrics client has to send its request and read the answer.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// Binds the sockets and builds the relay. `seed` is the cookie secret (from a CSPRNG).
    pub async fn bind(opts: Options, seed: [u8; 32]) -> Result<Server, ServeError> {
        let primary = Udp::bind(opts.listen).await?;
        let local = primary.socket.local_addr().map_err(ServeError::LocalAddr)?;
        let alt = match opts.alt_port {
            0 => None,
            p if p == local.port() => return Err(ServeError::AltPortIsListenPort(p)),
            p => Some(Udp::bind(SocketAddr::new(local.ip(), p)).await?),
        };
        let alt_addr = match &alt {
            Some(s) => Some(s.socket.local_addr().map_err(ServeError::LocalAddr)?),
            None => None,
        };
        let metrics = match opts.metrics {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::BindMetrics { addr, source })?,
            ),
            None => None,
        };
        let config = Config {
            control_key: opts.control_key,
            local,
            alt: alt_addr,
            limits: opts.limits,
        };
        let relay = Relay::new(config, seed, Instant::now().into_std());
        Ok(Server {
            primary,
            alt,
            metrics,
            relay,
        })
    }

    /// The primary UDP socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.relay.config().local
    }

    /// The alternate-port socket's address, if there is one.
    pub fn alt_addr(&self) -> Option<SocketAddr> {
        self.relay.config().alt
    }

    /// The metrics listener's address, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes; returns the final counters.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Stats, ServeError> {
        let Server {
            primary,
            alt,
            metrics,
            mut relay,
        } = self;
        let (stats_tx, mut stats_rx) = mpsc::channel::<oneshot::Sender<Snapshot>>(16);
        let metrics_task = metrics.map(|l| tokio::spawn(serve_metrics(l, stats_tx.clone())));
        let mut sockets = Sockets { primary, alt };
        let mut rx = RxBuffers::new();
        tokio::pin!(shutdown);
        let next_wake = |relay: &Relay| {
            relay
                .poll_timeout()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + crate::core::SWEEP_INTERVAL)
        };
        // One timer, moved only when the relay's deadline moves: not a new timer per wake-up.
        let timer = tokio::time::sleep_until(next_wake(&relay));
        tokio::pin!(timer);

        loop {
            let wake = next_wake(&relay);
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                () = &mut shutdown => break,
                r = sockets.primary.socket.readable() => match r {
                    Ok(()) => drain(Via::Primary, &mut sockets, &mut relay, &mut rx).await,
                    Err(e) => tracing::warn!(error = %e, "primary socket not readable"),
                },
                r = readable(sockets.alt.as_ref()) => match r {
                    Ok(()) => drain(Via::Alt, &mut sockets, &mut relay, &mut rx).await,
                    Err(e) => tracing::warn!(error = %e, "alternate socket not readable"),
                },
                Some(reply) = stats_rx.recv() => {
                    let _ = reply.send(Snapshot {
                        stats: relay.stats(),
                        socket_drops: sockets.kernel_drops(),
                    });
                }
                () = &mut timer => {
                    relay.handle_timeout(Instant::now().into_std(), unix_now());
                }
            }
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        Ok(relay.stats())
    }
}

/// One UDP socket with its quinn-udp state (GRO, GSO) and its pending GSO batch.
#[derive(Debug)]
struct Udp {
    socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
    gso: GsoBatch,
}

impl Udp {
    async fn bind(addr: SocketAddr) -> Result<Udp, ServeError> {
        let bind_error = |source| ServeError::BindUdp { addr, source };
        let socket = UdpSocket::bind(addr).await.map_err(bind_error)?;
        let state = quinn_udp::UdpSocketState::new((&socket).into()).map_err(bind_error)?;
        // The relay reads neither ECN nor the destination address of a datagram: two control
        // messages per read saved.
        skip_receive_metadata(&socket);
        let (rcvbuf, sndbuf) = grow_socket_buffers(&socket, SOCKET_BUFFER);
        tracing::info!(
            %addr,
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            rcvbuf,
            sndbuf,
            "udp socket ready"
        );
        let gso = GsoBatch::new(state.max_gso_segments());
        Ok(Udp { socket, state, gso })
    }

    /// Sends `contents` to `to`: one datagram, or `segment_size`-byte datagrams (the last may
    /// be shorter) in one GSO send.
    async fn send(&self, to: SocketAddr, contents: &[u8], segment_size: Option<usize>) {
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        if let Err(e) = rally_udp::send(&self.socket, &self.state, &transmit).await {
            // E.g. an ICMP error for an earlier send: nothing to do but carry on.
            tracing::debug!(%to, error = %e, "send failed");
        }
    }

    /// Sends what the GSO batch holds, if anything.
    async fn flush(&mut self) {
        if let Some((to, contents, segment_size)) = self.gso.pending() {
            self.send(to, contents, segment_size).await;
        }
        self.gso.clear();
    }
}

#[derive(Debug)]
struct Sockets {
    primary: Udp,
    alt: Option<Udp>,
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

    async fn flush(&mut self) {
        self.primary.flush().await;
        if let Some(alt) = &mut self.alt {
            alt.flush().await;
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

/// Reads and handles what `via`'s socket holds: up to [`ROUNDS`] reads, until one finds nothing
/// ([`Drain::WhenEmpty`]: under load the extra read often finds more).
async fn drain(via: Via, sockets: &mut Sockets, relay: &mut Relay, rx: &mut RxBuffers) {
    let now = Instant::now().into_std();
    let now_unix = unix_now();
    for _ in 0..ROUNDS {
        let got = {
            let udp = sockets.get(via);
            let mut iovs: [io::IoSliceMut<'_>; quinn_udp::BATCH_SIZE] = {
                let mut bufs = rx.bufs.iter_mut();
                std::array::from_fn(|_| match bufs.next() {
                    Some(b) => io::IoSliceMut::new(b),
                    None => io::IoSliceMut::new(&mut []),
                })
            };
            match recv_batch(
                &udp.socket,
                &udp.state,
                &mut iovs,
                &mut rx.meta,
                Drain::WhenEmpty,
            ) {
                Ok(got) => got,
                Err(e) => {
                    // E.g. an ICMP error for an earlier send: nothing to do but carry on.
                    tracing::debug!(error = %e, "recv failed");
                    continue;
                }
            }
        };
        for i in 0..got.count {
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
                sockets,
                relay,
                &mut rx.forwards,
                now,
                now_unix,
            )
            .await;
        }
        if got.drained {
            break;
        }
    }
    // Once per wake-up, not per read: a run of datagrams to one destination that straddles two
    // reads still leaves as one GSO send (one `sendmsg`, and behind it one trip through the
    // transmit path, instead of two).
    sockets.flush().await;
}

/// Handles the datagrams of one read (`stride` bytes each, the last may be shorter) from `src`.
#[allow(clippy::too_many_arguments)]
async fn handle_train(
    via: Via,
    src: SocketAddr,
    train: &mut [u8],
    stride: usize,
    sockets: &mut Sockets,
    relay: &mut Relay,
    forwards: &mut Vec<Option<(Via, SocketAddr)>>,
    now: std::time::Instant,
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
                sockets.get(t.via).send(t.to, &t.payload, None).await;
            }
            Action::Drop { reply: None, .. } => forwards.push(None),
        }
    }
    // The usual case: the whole train goes to one session, already rewritten in place.
    if let [Some(first), rest @ ..] = forwards.as_slice() {
        if forwards.len() > 1 && rest.iter().all(|f| *f == Some(*first)) {
            let (out_via, to) = *first;
            let udp = sockets.get_mut(out_via);
            udp.flush().await;
            let max = udp.state.max_gso_segments().max(1) * stride;
            for chunk in train.chunks(max) {
                let segment = (chunk.len() > stride).then_some(stride);
                udp.send(to, chunk, segment).await;
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
            udp.flush().await;
        }
        udp.gso.push(to, datagram);
    }
}

async fn readable(udp: Option<&Udp>) -> io::Result<()> {
    match udp {
        Some(u) => u.socket.readable().await,
        None => std::future::pending().await,
    }
}

/// Wall-clock unix seconds, for token expiry.
#[allow(clippy::disallowed_methods)] // the driver is where the clock is read
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// --- metrics over HTTP ------------------------------------------------------------------------

async fn serve_metrics(listener: TcpListener, stats: mpsc::Sender<oneshot::Sender<Snapshot>>) {
    let slots = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: closing it is the answer
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(METRICS_TIMEOUT, answer_metrics(stream, stats)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

async fn answer_metrics(
    mut stream: TcpStream,
    stats: mpsc::Sender<oneshot::Sender<Snapshot>>,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !rally_proto::http::head_complete(&head) {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let snapshot = if head.starts_with(b"GET /metrics") {
        let (tx, rx) = oneshot::channel();
        match stats.send(tx).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        }
    } else {
        None
    };
    let response = rally_proto::http::metrics_response(&head, || {
        snapshot.map(|s| metrics::render(&s.stats, &s.socket_drops))
    });
    stream.write_all(&response).await?;
    stream.shutdown().await
}

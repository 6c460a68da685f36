//! The driver around the sans-IO [`Relay`]: binds the sockets, runs the forwarding thread
//! ([`crate::forwarder`]) and serves the metrics over HTTP from the caller's tokio runtime.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rally_proto::Key32;
use rally_udp::{grow_socket_buffers, skip_receive_metadata};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::clock;
use crate::core::{Config, Limits, Relay, Stats};
use crate::forwarder::{Forwarder, Sockets, Udp};
use crate::metrics;
use crate::metrics::Snapshot;
use crate::tcp::{self, TcpCounters, TcpListenerSide, TcpSide};

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
    /// Receive coalescing: how long the forwarding thread waits after a busy wake-up before it
    /// looks for more input (zero: never). See [`crate::coalesce`].
    pub coalesce: Duration,
    /// Relay sessions over TLS on TCP: the address to listen on and the certificate to
    /// present (self-signed over the key the control plane's relay entry pins, or an
    /// operator's).
    pub tcp: Option<(SocketAddr, crate::tls::TlsIdentity)>,
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
    /// The TCP listener could not be bound.
    #[error("cannot listen on tcp {addr}")]
    BindTcp {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS's reason.
        source: io::Error,
    },
    /// The TLS configuration for the TCP listener could not be built.
    #[error("tls for --listen-tcp: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// `--alt-port` names the `--listen` port.
    #[error("--alt-port {0} is the --listen port; pick another")]
    AltPortIsListenPort(u16),
    /// A bound socket could not report its address.
    #[error("cannot read a socket's local address")]
    LocalAddr(#[source] io::Error),
    /// The kernel refused an epoll instance for the sockets.
    #[error("cannot watch the sockets (epoll)")]
    Epoll(#[source] io::Error),
    /// The forwarding thread could not be started.
    #[error("cannot start the forwarding thread")]
    Thread(#[source] io::Error),
    /// The forwarding thread ended without being asked to (it panicked).
    #[error("the forwarding thread stopped unexpectedly")]
    ForwarderDied,
}

/// A bound relay, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    sockets: Sockets,
    metrics: Option<TcpListener>,
    relay: Relay,
    coalesce: Duration,
    tcp: Option<(TcpListenerSide, TcpSide)>,
    tcp_addr: Option<SocketAddr>,
    tcp_counters: Arc<TcpCounters>,
}

/// Socket receive and send buffers asked for: deep enough that a burst arriving while the
/// relay is not scheduled is queued, not dropped (~3 ms at 1 Mpps of 1200-byte datagrams).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Concurrent metrics connections; more are closed at once.
const METRICS_CONNECTIONS: usize = 16;
/// Time a metrics client has to send its request and read the answer.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// Binds the sockets and builds the relay. `seed` is the cookie secret (from a CSPRNG).
    pub async fn bind(opts: Options, seed: [u8; 32]) -> Result<Server, ServeError> {
        let primary = bind_udp(opts.listen)?;
        let local = primary.socket.local_addr().map_err(ServeError::LocalAddr)?;
        let alt = match opts.alt_port {
            0 => None,
            p if p == local.port() => return Err(ServeError::AltPortIsListenPort(p)),
            p => Some(bind_udp(SocketAddr::new(local.ip(), p))?),
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
            limits: opts.limits.clone(),
        };
        let tcp_counters = Arc::new(TcpCounters::default());
        let (tcp, tcp_addr) = match opts.tcp {
            Some((addr, identity)) => {
                let bind_error = |source| ServeError::BindTcp { addr, source };
                let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
                let bound = listener.local_addr().map_err(ServeError::LocalAddr)?;
                let tls = identity.server_config()?;
                let limits = (
                    opts.limits.max_sessions,
                    opts.limits.max_sessions_per_ip,
                    opts.limits.idle_timeout,
                );
                let sides = tcp::channel(listener, tls, tcp_counters.clone(), limits)
                    .map_err(ServeError::Epoll)?;
                (Some(sides), Some(bound))
            }
            None => (None, None),
        };
        let relay = Relay::new(config, seed, clock::now());
        Ok(Server {
            sockets: Sockets { primary, alt },
            metrics,
            relay,
            coalesce: opts.coalesce,
            tcp,
            tcp_addr,
            tcp_counters,
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

    /// The TCP listener's address, if there is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The metrics listener's address, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Forwards (on a thread of its own) and serves the metrics until `shutdown` completes;
    /// returns the final counters.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<Stats, ServeError> {
        let Server {
            sockets,
            metrics,
            relay,
            coalesce,
            tcp,
            tcp_addr: _,
            tcp_counters,
        } = self;
        let (stats_tx, stats_rx) = mpsc::channel::<oneshot::Sender<Snapshot>>(16);
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp_listener, tcp_side) = match tcp {
            Some((l, s)) => (Some(l), Some(s)),
            None => (None, None),
        };
        let with_tcp = tcp_listener.is_some();
        let forwarder = Forwarder::new(sockets, relay, stats_rx, stop.clone(), coalesce, tcp_side)
            .map_err(ServeError::Epoll)?;
        let tcp_task = tcp_listener.map(|l| tokio::spawn(tcp::serve(l)));
        let counters = with_tcp.then_some(tcp_counters);
        let metrics_task = metrics.map(|l| tokio::spawn(serve_metrics(l, stats_tx, counters)));
        let (done_tx, mut done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("rally-relay-fwd".into())
            .spawn(move || {
                let _ = done_tx.send(forwarder.run());
            })
            .map_err(ServeError::Thread)?;
        tokio::pin!(shutdown);
        let died = tokio::select! {
            () = &mut shutdown => false,
            _ = &mut done_rx => true,
        };
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = tcp_task {
            t.abort();
        }
        if died {
            return Err(ServeError::ForwarderDied);
        }
        stop.store(true, Ordering::Relaxed);
        // The loop sees the flag within `forwarder::MAX_WAIT`.
        done_rx.await.map_err(|_| ServeError::ForwarderDied)
    }
}

/// Binds one non-blocking UDP socket with its quinn-udp state (GRO, GSO), deep buffers and no
/// per-datagram metadata the relay does not read.
fn bind_udp(addr: SocketAddr) -> Result<Udp, ServeError> {
    let bind_error = |source| ServeError::BindUdp { addr, source };
    let socket = UdpSocket::bind(addr).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
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
    Ok(Udp::new(socket, state))
}

// --- metrics over HTTP ------------------------------------------------------------------------

async fn serve_metrics(
    listener: TcpListener,
    stats: mpsc::Sender<oneshot::Sender<Snapshot>>,
    tcp: Option<Arc<TcpCounters>>,
) {
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
        let tcp = tcp.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(METRICS_TIMEOUT, answer_metrics(stream, stats, tcp)).await {
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
    tcp: Option<Arc<TcpCounters>>,
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
        snapshot.map(|s| metrics::render(&s, tcp.as_deref()))
    });
    stream.write_all(&response).await?;
    stream.shutdown().await
}

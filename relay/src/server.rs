//! The tokio driver: sockets, timer and metrics listener around the sans-IO [`Relay`].
//!
//! One task owns the relay and loops: wait for a socket to be readable, drain a batch of
//! datagrams through [`Relay::handle_datagram`] into one reused buffer and send what it says;
//! run [`Relay::handle_timeout`] when [`Relay::poll_timeout`] says; answer stats requests from
//! the metrics listener. Forwarding rewrites the datagram in place, so the `Send` → `Deliver`
//! path allocates nothing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rally_proto::Key32;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::core::{Action, Config, Limits, Relay, Stats, Transmit, Via};
use crate::metrics;

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
    primary: UdpSocket,
    alt: Option<UdpSocket>,
    metrics: Option<TcpListener>,
    relay: Relay,
}

/// Datagrams handled per wake-up of one socket before the loop looks at the others.
const BATCH: usize = 64;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// Concurrent metrics connections; more are closed at once.
const METRICS_CONNECTIONS: usize = 16;
/// Time a metrics client has to send its request and read the answer.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// Binds the sockets and builds the relay. `seed` is the cookie secret (from a CSPRNG).
    pub async fn bind(opts: Options, seed: [u8; 32]) -> Result<Server, ServeError> {
        let primary = UdpSocket::bind(opts.listen)
            .await
            .map_err(|source| ServeError::BindUdp {
                addr: opts.listen,
                source,
            })?;
        let local = primary.local_addr().map_err(ServeError::LocalAddr)?;
        let alt = match opts.alt_port {
            0 => None,
            p if p == local.port() => return Err(ServeError::AltPortIsListenPort(p)),
            p => {
                let addr = SocketAddr::new(local.ip(), p);
                Some(
                    UdpSocket::bind(addr)
                        .await
                        .map_err(|source| ServeError::BindUdp { addr, source })?,
                )
            }
        };
        let alt_addr = match &alt {
            Some(s) => Some(s.local_addr().map_err(ServeError::LocalAddr)?),
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
        let (stats_tx, mut stats_rx) = mpsc::channel::<oneshot::Sender<Stats>>(16);
        let metrics_task = metrics.map(|l| tokio::spawn(serve_metrics(l, stats_tx.clone())));
        let sockets = Sockets {
            primary: &primary,
            alt: alt.as_ref(),
        };
        let mut buf = vec![0u8; MAX_DATAGRAM];
        tokio::pin!(shutdown);

        loop {
            let wake = relay
                .poll_timeout()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + crate::core::SWEEP_INTERVAL);
            tokio::select! {
                () = &mut shutdown => break,
                r = primary.readable() => match r {
                    Ok(()) => drain(Via::Primary, &sockets, &mut relay, &mut buf).await,
                    Err(e) => tracing::warn!(error = %e, "primary socket not readable"),
                },
                r = readable(alt.as_ref()) => match r {
                    Ok(()) => drain(Via::Alt, &sockets, &mut relay, &mut buf).await,
                    Err(e) => tracing::warn!(error = %e, "alternate socket not readable"),
                },
                Some(reply) = stats_rx.recv() => {
                    let _ = reply.send(relay.stats());
                }
                () = tokio::time::sleep_until(wake) => {
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

struct Sockets<'a> {
    primary: &'a UdpSocket,
    alt: Option<&'a UdpSocket>,
}

impl Sockets<'_> {
    fn get(&self, via: Via) -> &UdpSocket {
        match via {
            Via::Alt => self.alt.unwrap_or(self.primary),
            Via::Primary => self.primary,
        }
    }
}

/// Handles up to [`BATCH`] datagrams waiting on `via`'s socket.
async fn drain(via: Via, sockets: &Sockets<'_>, relay: &mut Relay, buf: &mut [u8]) {
    let sock = sockets.get(via);
    let now = Instant::now().into_std();
    let now_unix = unix_now();
    for _ in 0..BATCH {
        let (n, src) = match sock.try_recv_from(buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // E.g. an ICMP error for an earlier send: nothing to do but carry on.
                tracing::debug!(error = %e, "recv failed");
                continue;
            }
        };
        let Some(datagram) = buf.get_mut(..n) else {
            continue;
        };
        match relay.handle_datagram(via, src, datagram, now, now_unix) {
            Action::Forward { via, to, len } => {
                if let Some(d) = buf.get(..len) {
                    send(sockets.get(via), d, to).await;
                }
            }
            Action::Reply(t) | Action::Drop { reply: Some(t), .. } => {
                send_transmit(sockets, &t).await;
            }
            Action::Drop { reply: None, .. } => {}
        }
    }
}

async fn send_transmit(sockets: &Sockets<'_>, t: &Transmit) {
    send(sockets.get(t.via), &t.payload, t.to).await;
}

async fn send(sock: &UdpSocket, datagram: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(datagram, to).await {
        tracing::debug!(%to, error = %e, "send failed");
    }
}

async fn readable(sock: Option<&UdpSocket>) -> io::Result<()> {
    match sock {
        Some(s) => s.readable().await,
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

async fn serve_metrics(listener: TcpListener, stats: mpsc::Sender<oneshot::Sender<Stats>>) {
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
    stats: mpsc::Sender<oneshot::Sender<Stats>>,
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
    let response =
        rally_proto::http::metrics_response(&head, || snapshot.map(|s| metrics::render(&s)));
    stream.write_all(&response).await?;
    stream.shutdown().await
}

//! Relays over TLS on TCP: the connections behind the node's TCP slots
//! ([`rally_agent_core::node::is_tcp_slot`]).
//!
//! What the node or the send path addresses to a slot is pushed on that connection's short
//! **drop-oldest queue** ([`QUEUE_FRAMES`]: a late game packet is worth nothing, and an
//! unbounded queue under TCP is the TCP-over-TCP meltdown); one writer task drains the whole
//! queue into one write (frames of `rally_proto::relay_stream`). The socket has `TCP_NODELAY`
//! and `TCP_NOTSENT_LOWAT` ([`NOTSENT_LOWAT`]), so data not yet sent waits in our queue, where
//! it can be dropped, rather than in the kernel. The send buffer itself is left to the
//! kernel's autotuning: it also holds the data in flight, and a fixed small one capped a
//! stream at one buffer per round trip (64 KiB at 80 ms: 6 Mbit/s in the lab). A reader task hands every whole frame back to the
//! engine's loop, tagged with the slot, as if it had come from that address over UDP.
//!
//! A connection is dialed on the first frame for its slot (through the HTTP CONNECT proxy
//! when one is configured), verifying the relay as its entry says ([`super::relay_tls`]: its
//! pinned TLS key, or an operator's certificate under trusted roots); a failed or closed one is
//! dialed again on the next frame, 0.5 s after the last dial, doubling after each dial in a row
//! that never came up (a relay that refuses our trust or does not answer) up to 30 s
//! ([`REDIAL`], [`Redial`]). Connections whose slot the node no longer uses are closed.
//!
//! Once TLS is up the node is handed a `BindChallenge` carrying the connection's channel
//! binding (`rally_proto::relay_stream::BIND_EXPORTER_LABEL`), so the first `Bind` goes out
//! at once: bound one round trip after TLS instead of two.
//!
//! Each slot has a second connection, its twin ([`super::relay_twin`]), dialed once the first
//! came up and redialed like it: it binds itself with the token of the node's latest `Bind`,
//! carries a copy of every small WireGuard data message
//! ([`rally_proto::relay_stream::is_copied`]) and ping, and carries bulk only while the node's
//! connection is down.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rally_proto::relay::RelayMsg;
use rally_proto::relay_stream::{write_frame, StreamDecoder, BIND_EXPORTER_LABEL};
use rally_proto::Identity;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info};

use super::relay_twin::{self, Sent, TwinTask};
use crate::backoff::BackoffPolicy;
use crate::node::TcpEndpoint;

/// Frames waiting for the socket, per connection (the oldest is dropped beyond). One TUN
/// read with offload yields up to 64 KiB of TCP segments (~46 frames), and several reads may
/// run before the writer task does: fewer slots dropped frames of a single TCP stream.
pub const QUEUE_FRAMES: usize = 256;
/// Unsent bytes in the kernel above which the socket does not count as writable.
const NOTSENT_LOWAT: u32 = 16 * 1024;
/// Time for the TCP connect (or proxy) and TLS handshakes.
pub(super) const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between two dials of one slot: `base` after a dial that came up, doubling after each
/// that did not, at most `max`.
const REDIAL: BackoffPolicy = BackoffPolicy {
    base: Duration::from_millis(500),
    max: Duration::from_secs(30),
    jitter: 0.0,
    attempts: None,
};
/// Frames from every connection waiting for the engine's loop.
const INBOUND: usize = 1024;

/// Frames dropped from full queues in this process, over all connections ever made (the
/// metrics endpoint's `rally_dataplane_relay_tcp_drops_total`).
pub static QUEUE_DROPS: AtomicU64 = AtomicU64::new(0);

/// A frame read from a relay connection: the slot it stands for and the relay message.
pub type Inbound = (SocketAddr, Vec<u8>);

/// The engine's relay connections over TLS/TCP, by slot.
pub struct TcpRelays {
    conns: HashMap<SocketAddr, Conn>,
    proxy: Option<String>,
    inbound_tx: mpsc::Sender<Inbound>,
    /// Frames from every connection (the engine's loop selects on it).
    pub inbound: mpsc::Receiver<Inbound>,
    /// Frames dropped from full queues, summed over connections ever made.
    dropped_closed: u64,
    /// Signs the twins' binds.
    identity: Arc<Identity>,
}

struct Conn {
    endpoint: TcpEndpoint,
    queue: Arc<Queue>,
    task: JoinHandle<()>,
    redial: Redial,
    /// The second connection, once dialed.
    twin: Option<Twin>,
    /// The token of the node's latest `Bind` on the slot, for the twin's binds.
    token: watch::Sender<Vec<u8>>,
}

struct Twin {
    queue: Arc<Queue>,
    task: JoinHandle<()>,
    redial: Redial,
}

/// When a connection may be dialed again, by the [`REDIAL`] schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Redial {
    dialed: Instant,
    /// Dials in a row before the last that never came up.
    failures: u32,
}

impl Redial {
    fn first(now: Instant) -> Redial {
        Redial {
            dialed: now,
            failures: 0,
        }
    }

    /// The schedule of a dial at `now` after this one, which came up or not.
    fn next(self, came_up: bool, now: Instant) -> Redial {
        Redial {
            dialed: now,
            failures: if came_up {
                0
            } else {
                self.failures.saturating_add(1)
            },
        }
    }

    fn due(&self, now: Instant) -> bool {
        now >= self.dialed + self.delay()
    }

    /// The wait after the last dial.
    fn delay(&self) -> Duration {
        REDIAL.nominal(self.failures.saturating_add(1))
    }
}

#[derive(Default)]
pub(super) struct Queue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    notify: Notify,
    dropped: AtomicU64,
    pub(super) closed: AtomicBool,
    /// The connection's TLS handshake completed (it came up, whatever happened next).
    pub(super) up: AtomicBool,
    /// A twin's session is bound at the relay (unused for the node's connection).
    pub(super) bound: AtomicBool,
}

impl Queue {
    /// Adds a frame, dropping (and counting) the oldest when [`QUEUE_FRAMES`] wait already,
    /// and wakes the writer.
    pub(super) fn push(&self, msg: &[u8]) {
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        if frames.len() >= QUEUE_FRAMES {
            frames.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
            QUEUE_DROPS.fetch_add(1, Ordering::Relaxed);
        }
        frames.push_back(msg.to_vec());
        drop(frames);
        self.notify.notify_one();
    }

    /// Forgets the `BindRequest`s waiting to be sent.
    fn drop_bind_requests(&self) {
        let request = RelayMsg::BindRequest.to_vec();
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        frames.retain(|f| *f != request);
    }

    /// Every waiting frame, framed for the stream, appended to `buf`.
    fn drain_into(&self, buf: &mut Vec<u8>) {
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(f) = frames.pop_front() {
            let _ = write_frame(buf, &f);
        }
    }
}

impl TcpRelays {
    pub fn new(proxy: Option<String>, identity: Arc<Identity>) -> Self {
        let (inbound_tx, inbound) = mpsc::channel(INBOUND);
        TcpRelays {
            conns: HashMap::new(),
            proxy,
            inbound_tx,
            inbound,
            dropped_closed: 0,
            identity,
        }
    }

    /// Opens the connections of `slot` to `endpoint` unless they are up or being dialed.
    pub fn connect(&mut self, slot: SocketAddr, endpoint: &TcpEndpoint) {
        let now = Instant::now();
        let stale = self.conns.get(&slot).is_none_or(|c| {
            c.endpoint != *endpoint || (c.queue.closed.load(Ordering::Relaxed) && c.redial.due(now))
        });
        if stale {
            self.dial(slot, endpoint.clone(), now);
        }
        // The twin follows a connection that came up: a relay that refuses the first refuses
        // the second too.
        let twin_stale = self.conns.get(&slot).is_some_and(|c| {
            c.queue.up.load(Ordering::Relaxed)
                && c.twin
                    .as_ref()
                    .is_none_or(|t| t.queue.closed.load(Ordering::Relaxed) && t.redial.due(now))
        });
        if twin_stale {
            self.dial_twin(slot, now);
        }
    }

    /// Queues `msg` (one relay message) for the connections of `slot` to `endpoint`, dialing
    /// them if there are none (or only dead ones): on the node's connection, and a copy on
    /// the twin when it is small; on the twin alone while the node's connection is down.
    pub fn send(&mut self, slot: SocketAddr, endpoint: &TcpEndpoint, msg: &[u8]) {
        self.connect(slot, endpoint);
        let Some(c) = self.conns.get(&slot) else {
            return;
        };
        let sent = Sent::of(msg);
        if let Sent::Bind(token) = sent {
            c.token.send_if_modified(|t| {
                let changed = t.as_slice() != token;
                if changed {
                    *t = token.to_vec();
                }
                changed
            });
        }
        let up = !c.queue.closed.load(Ordering::Relaxed);
        if up {
            c.queue.push(msg);
        }
        let twin = c.twin.as_ref().filter(|t| {
            t.queue.bound.load(Ordering::Relaxed) && !t.queue.closed.load(Ordering::Relaxed)
        });
        if let Some(twin) = twin {
            if sent == Sent::Copied || (!up && !matches!(sent, Sent::Bind(_))) {
                twin.queue.push(msg);
            }
        }
    }

    /// Closes every connection whose slot `keep` refuses (the node closed its client).
    pub fn retain(&mut self, keep: impl Fn(&SocketAddr) -> bool) {
        let gone: Vec<SocketAddr> = self.conns.keys().filter(|s| !keep(s)).copied().collect();
        for slot in gone {
            if let Some(c) = self.conns.remove(&slot) {
                debug!(addr = %c.endpoint.addr, "relay connection over TCP closed");
                self.close(c);
            }
        }
    }

    /// Frames dropped from full queues so far.
    pub fn queue_drops(&self) -> u64 {
        self.dropped_closed
            + self
                .conns
                .values()
                .flat_map(|c| std::iter::once(&c.queue).chain(c.twin.as_ref().map(|t| &t.queue)))
                .map(|q| q.dropped.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// Ends both connections of a slot, keeping their drop counts.
    fn close(&mut self, c: Conn) {
        self.dropped_closed += c.queue.dropped.load(Ordering::Relaxed);
        c.task.abort();
        if let Some(t) = c.twin {
            self.dropped_closed += t.queue.dropped.load(Ordering::Relaxed);
            t.task.abort();
        }
    }

    fn dial(&mut self, slot: SocketAddr, endpoint: TcpEndpoint, now: Instant) {
        // A new endpoint starts over; the same one keeps its twin and the token.
        let (twin, token, redial) = match self.conns.remove(&slot) {
            Some(mut old) if old.endpoint == endpoint => {
                self.dropped_closed += old.queue.dropped.load(Ordering::Relaxed);
                old.task.abort();
                let came_up = old.queue.up.load(Ordering::Relaxed);
                (old.twin.take(), old.token, old.redial.next(came_up, now))
            }
            Some(old) => {
                self.close(old);
                (None, watch::channel(Vec::new()).0, Redial::first(now))
            }
            None => (None, watch::channel(Vec::new()).0, Redial::first(now)),
        };
        let queue = Arc::new(Queue::default());
        let task = tokio::spawn(run(
            slot,
            endpoint.clone(),
            self.proxy.clone(),
            queue.clone(),
            self.inbound_tx.clone(),
        ));
        self.conns.insert(
            slot,
            Conn {
                endpoint,
                queue,
                task,
                redial,
                twin,
                token,
            },
        );
    }

    fn dial_twin(&mut self, slot: SocketAddr, now: Instant) {
        let Some(c) = self.conns.get_mut(&slot) else {
            return;
        };
        let redial = match c.twin.take() {
            Some(old) => {
                self.dropped_closed += old.queue.dropped.load(Ordering::Relaxed);
                old.task.abort();
                old.redial.next(old.queue.up.load(Ordering::Relaxed), now)
            }
            None => Redial::first(now),
        };
        let queue = Arc::new(Queue::default());
        let task = tokio::spawn(relay_twin::run(TwinTask {
            slot,
            endpoint: c.endpoint.clone(),
            proxy: self.proxy.clone(),
            queue: queue.clone(),
            inbound: self.inbound_tx.clone(),
            identity: self.identity.clone(),
            token: c.token.subscribe(),
        }));
        c.twin = Some(Twin {
            queue,
            task,
            redial,
        });
    }
}

impl Drop for TcpRelays {
    fn drop(&mut self) {
        for c in self.conns.values() {
            c.task.abort();
            if let Some(t) = &c.twin {
                t.task.abort();
            }
        }
    }
}

/// One connection: dial, then write what the queue holds and read frames until either side
/// fails.
async fn run(
    slot: SocketAddr,
    endpoint: TcpEndpoint,
    proxy: Option<String>,
    queue: Arc<Queue>,
    inbound: mpsc::Sender<Inbound>,
) {
    let addr = endpoint.addr;
    let tls = match tokio::time::timeout(DIAL_TIMEOUT, dial(&endpoint, proxy.as_deref())).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%addr, "relay over TCP: {e}");
            queue.closed.store(true, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            debug!(%addr, "relay over TCP: no answer");
            queue.closed.store(true, Ordering::Relaxed);
            return;
        }
    };
    queue.up.store(true, Ordering::Relaxed);
    info!(%addr, "relay connection over TLS/TCP up");
    if let Some(challenge) = channel_challenge(&tls) {
        // The bind request queued before the connection was up would only fetch a cookie
        // the connection's own binding replaces (and a second bind after the first).
        queue.drop_bind_requests();
        if inbound.send((slot, challenge)).await.is_err() {
            return;
        }
    }
    let (mut reader, mut writer) = tokio::io::split(tls);
    let write = write_queue(&queue, &mut writer);
    let read = async {
        let mut decoder = StreamDecoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            decoder.extend(&buf[..n]);
            while let Some(frame) = decoder.next_frame() {
                if inbound.send((slot, frame.to_vec())).await.is_err() {
                    return Ok(());
                }
            }
        }
    };
    let why = tokio::select! {
        r = write => r.err().map(|e| e.to_string()),
        r = read => r.err().map(|e| e.to_string()),
    };
    info!(%addr, reason = why.as_deref().unwrap_or("closed by the relay"), "relay connection over TLS/TCP down");
    queue.closed.store(true, Ordering::Relaxed);
}

/// Writes what `queue` holds to `writer`, each time it is woken, until a write fails.
pub(super) async fn write_queue<W: AsyncWrite + Unpin>(
    queue: &Queue,
    writer: &mut W,
) -> Result<(), std::io::Error> {
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        queue.notify.notified().await;
        loop {
            buf.clear();
            queue.drain_into(&mut buf);
            if buf.is_empty() {
                break;
            }
            writer.write_all(&buf).await?;
            writer.flush().await?;
        }
    }
}

/// A `BindChallenge` whose cookie is the connection's channel binding
/// ([`BIND_EXPORTER_LABEL`]): handed to the node as if the relay had sent it, so the first
/// `Bind` leaves with no round trip for a challenge (the relay accepts that cookie from this
/// connection; one that does not refuses it, and the client asks for a challenge as before).
fn channel_challenge(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<Vec<u8>> {
    let cookie = tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], BIND_EXPORTER_LABEL, None)
        .ok()?;
    Some(RelayMsg::BindChallenge { cookie }.to_vec())
}

pub(super) async fn dial(
    endpoint: &TcpEndpoint,
    proxy: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let (config, name) = super::relay_tls::client_config(endpoint)?;
    let stream = match proxy {
        Some(proxy) => crate::control::proxy::connect(proxy, endpoint.addr).await?,
        None => TcpStream::connect(endpoint.addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?,
    };
    tune(&stream);
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| super::relay_tls::refused(endpoint, &e))
}

/// `TCP_NODELAY` and `TCP_NOTSENT_LOWAT`: what waits to be sent waits in our drop-oldest
/// queue.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(target_os = "linux")]
    set_notsent_lowat(stream);
}

#[cfg(target_os = "linux")]
fn set_notsent_lowat(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level, name, value: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        libc::c_int::try_from(NOTSENT_LOWAT).unwrap_or(libc::c_int::MAX),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rally_proto::relay_stream::StreamDecoder;

    #[test]
    fn failed_dials_back_off_to_the_cap_and_a_connection_that_came_up_resets_it() {
        let t0 = Instant::now();
        let mut r = Redial::first(t0);
        let (base, max) = (REDIAL.base, REDIAL.max);
        assert!(!r.due(t0 + base - Duration::from_millis(1)) && r.due(t0 + base));
        let mut waits = Vec::new();
        for _ in 0..10 {
            r = r.next(false, r.dialed);
            waits.push(r.delay().as_millis());
        }
        assert_eq!(
            waits,
            [1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000, 30_000, 30_000]
        );
        assert!(!r.due(r.dialed + Duration::from_secs(29)) && r.due(r.dialed + max));
        // One that came up: the next dial after it waits the base again.
        let up = r.next(true, r.dialed);
        assert_eq!((up.failures, up.due(up.dialed + base)), (0, true));
        // Failures without end neither overflow nor pass the cap.
        let worn = Redial {
            dialed: t0,
            failures: u32::MAX,
        };
        assert_eq!(worn.next(false, t0).failures, u32::MAX);
        assert_eq!(worn.delay(), max);
    }

    #[test]
    fn queued_bind_requests_are_dropped_and_other_frames_kept_in_order() {
        let q = Queue::default();
        q.push(&RelayMsg::BindRequest.to_vec());
        q.push(&[1, 2, 3]);
        q.push(&RelayMsg::BindRequest.to_vec());
        q.push(&[4]);
        q.drop_bind_requests();
        let mut buf = Vec::new();
        q.drain_into(&mut buf);
        let mut d = StreamDecoder::new();
        d.extend(&buf);
        assert_eq!(d.next_frame().map(|f| f.to_vec()), Some(vec![1, 2, 3]));
        assert_eq!(d.next_frame().map(|f| f.to_vec()), Some(vec![4]));
        assert!(d.next_frame().is_none());
    }

    #[test]
    fn a_full_queue_drops_the_oldest_frames_and_counts_them() {
        let q = Queue::default();
        for i in 0..QUEUE_FRAMES + 3 {
            q.push(&[u8::try_from(i % 256).unwrap_or(0); 3]);
        }
        assert_eq!(q.dropped.load(Ordering::Relaxed), 3);
        let mut buf = Vec::new();
        q.drain_into(&mut buf);
        let mut d = StreamDecoder::new();
        d.extend(&buf);
        let first = d.next_frame().map(|f| f.to_vec());
        assert_eq!(first, Some(vec![3, 3, 3]), "the three oldest are gone");
        let mut rest = 1;
        while d.next_frame().is_some() {
            rest += 1;
        }
        assert_eq!(rest, QUEUE_FRAMES);
        let mut again = Vec::new();
        q.drain_into(&mut again);
        assert!(again.is_empty(), "drained once");
    }
}

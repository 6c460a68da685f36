//! The control plane's tokio driver: accepts agents over QUIC within connection limits, reads
//! their messages into the [`Hub`], performs its [`Effect`]s, and writes each session's frames.
//!
//! Limits before authentication: at most `max_connections` connections in all and
//! `max_connections_per_ip` per source address (a new one beyond is refused at once); above
//! `retry_above` connections a client must first prove its address with a QUIC Retry; the
//! handshake, the first stream, registration and every write have a deadline, and reads after
//! registration end with the connection's idle timeout.
//!
//! Each session's outgoing queue is bounded ([`SESSION_QUEUE`]): the session's own replies wait
//! for room (so a client that does not read stops being read, and QUIC flow control stalls it),
//! and messages for other sessions (punches) are dropped and counted when it is full. Peer-map
//! pushes do not queue: they wait in the session's outbox as a bounded latest state.
//!
//! This module and `main.rs` are the only places that read clocks and draw randomness.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rally_proto::control::MAX_CLIENT_FRAME_LEN;
use rally_proto::identity::REGISTER_EXPORTER_LABEL;
use rally_proto::Key32;
use rally_proto::{frame, ClientMsg, ErrorCode, ErrorReply, FrameDecoder, FrameError, ServerMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tracing::debug;

use crate::hub::{DriverFigures, Effect, Hub, Now, Session, SessionId};

/// How long after a session's first pending change its peer-map push is sent (changes within
/// it are coalesced into one message).
pub const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// While changes keep coming, a session gets at most one peer-map push per this interval (its
/// changes meanwhile coalesce into the next one).
pub const PUSH_PACE: Duration = Duration::from_millis(100);
/// Messages queued for one session's writer.
pub const SESSION_QUEUE: usize = 64;
/// How long a client has for the QUIC handshake…
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// …then to open its stream…
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// …and to finish registering.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write may wait for the client to take data (flow control).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often identities that never joined are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Connection limits (before any authentication).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Above this many connections, a client must first answer a QUIC Retry.
    pub retry_above: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_ip: 256,
            retry_above: 1_000,
        }
    }
}

/// The running control plane: the hub behind a lock, and what the driver tracks.
pub struct Server {
    hub: Mutex<Hub>,
    limits: Limits,
    /// Each session's queue and writer wake-up, by session id.
    sessions: Mutex<HashMap<SessionId, SessionHandle>>,
    /// Connections open (or handshaking) per source address.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    next_session: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    retries: AtomicU64,
    deliveries_dropped: AtomicU64,
}

struct SessionHandle {
    tx: mpsc::Sender<ServerMsg>,
    wake: Arc<Notify>,
}

impl Server {
    pub fn new(hub: Hub, limits: Limits) -> Arc<Self> {
        Arc::new(Server {
            hub: Mutex::new(hub),
            limits,
            sessions: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            connections_refused: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            deliveries_dropped: AtomicU64::new(0),
        })
    }

    /// Prometheus text of the hub and the driver.
    pub fn render_metrics(&self) -> String {
        let figures = DriverFigures {
            connections: lock(&self.per_ip).values().sum::<usize>() as u64,
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            deliveries_dropped: self.deliveries_dropped.load(Ordering::Relaxed),
        };
        lock(&self.hub).render_metrics(figures)
    }

    /// Accepts connections until the endpoint is closed; sweeps unjoined identities meanwhile.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let sweeper = tokio::spawn(self.clone().sweep());
        while let Some(incoming) = endpoint.accept().await {
            let ip = incoming.remote_address().ip();
            let Some(slot) = self.admit(ip) else {
                self.connections_refused.fetch_add(1, Ordering::Relaxed);
                debug!(%ip, "connection refused: over the connection cap");
                incoming.refuse();
                continue;
            };
            if slot.total > self.limits.retry_above && incoming.may_retry() {
                // Over the threshold, an address not yet validated must answer a Retry first
                // (its second attempt comes back validated, and is let in).
                self.retries.fetch_add(1, Ordering::Relaxed);
                drop(slot);
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            let server = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(conn)) => server.serve_connection(conn).await,
                    Ok(Err(e)) => debug!(%remote, "handshake failed: {e}"),
                    Err(_) => debug!(%remote, "handshake timed out"),
                }
                drop(slot);
            });
        }
        sweeper.abort();
    }

    /// A connection slot for `ip` if the caps allow one.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut per_ip = lock(&self.per_ip);
        let total: usize = per_ip.values().sum();
        let here = per_ip.get(&ip).copied().unwrap_or(0);
        if total >= self.limits.max_connections || here >= self.limits.max_connections_per_ip {
            return None;
        }
        *per_ip.entry(ip).or_insert(0) += 1;
        Some(Slot {
            server: self.clone(),
            ip,
            total: total + 1,
        })
    }

    async fn sweep(self: Arc<Self>) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        loop {
            every.tick().await;
            lock(&self.hub).handle_timeout(now());
        }
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let (send, recv) = match tokio::time::timeout(STREAM_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(%remote, "no stream: {e}");
                return;
            }
            Err(_) => {
                debug!(%remote, "no stream in time");
                conn.close(0u32.into(), b"no stream");
                return;
            }
        };
        let mut binding = [0u8; 32];
        let binding = conn
            .export_keying_material(&mut binding, REGISTER_EXPORTER_LABEL, b"")
            .ok()
            .map(|()| Key32(binding));
        let mut send = self.serve_session(remote, binding, recv, send).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        conn.close(0u32.into(), b"bye");
    }

    /// Runs one session over a byte stream pair, whichever transport carries it (a QUIC
    /// stream or TLS over TCP); gives the write half back for the transport to close.
    pub(crate) async fn serve_session<R, W>(
        self: &Arc<Self>,
        remote: std::net::SocketAddr,
        binding: Option<Key32>,
        recv: R,
        send: W,
    ) -> W
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let wake = Arc::new(Notify::new());
        lock(&self.sessions).insert(
            id,
            SessionHandle {
                tx: tx.clone(),
                wake: wake.clone(),
            },
        );
        let session = Arc::new(Mutex::new(Session::new(id, remote).with_binding(binding)));
        let writer = self.clone().write_frames(send, rx, wake, session.clone());
        let reader = async {
            let outcome = self.read_messages(recv, &tx, &session).await;
            {
                let s = lock(&session);
                lock(&self.hub).handle_disconnect(&s, now());
            }
            lock(&self.sessions).remove(&id);
            if let Err(reply) = outcome {
                debug!(%remote, "closing session: {}", reply.message);
                let _ = tx.send(ServerMsg::Error(reply)).await;
            }
            drop(tx);
        };
        tokio::join!(reader, writer).1
    }

    /// Reads and handles messages until the stream ends, an effect closes the session, or
    /// registration takes too long.
    async fn read_messages(
        &self,
        mut recv: impl AsyncRead + Unpin,
        tx: &mpsc::Sender<ServerMsg>,
        session: &Mutex<Session>,
    ) -> Result<(), ErrorReply> {
        let mut decoder = FrameDecoder::with_limit(MAX_CLIENT_FRAME_LEN);
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        loop {
            let registered = lock(session).identity().is_some();
            let read = if registered {
                recv.read(&mut buf).await
            } else {
                tokio::time::timeout_at(deadline, recv.read(&mut buf))
                    .await
                    .map_err(|_| ErrorReply::new(ErrorCode::AuthFailed, "registration timed out"))?
            };
            let n = match read {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            decoder.extend(&buf[..n]);
            loop {
                let msg = decoder.next_msg::<ClientMsg>().map_err(frame_refusal)?;
                let Some(msg) = msg else { break };
                let effects = {
                    let mut s = lock(session);
                    #[allow(clippy::disallowed_types)]
                    let mut rng = rand_core::OsRng;
                    lock(&self.hub).handle(&mut s, msg, now(), &mut rng)
                };
                self.perform(effects, tx).await?;
            }
        }
    }

    /// Performs a call's effects; `Err` closes the session with that reply.
    async fn perform(
        &self,
        effects: Vec<Effect>,
        tx: &mpsc::Sender<ServerMsg>,
    ) -> Result<(), ErrorReply> {
        for effect in effects {
            match effect {
                Effect::Reply(msg) => {
                    if tx.send(msg).await.is_err() {
                        return Ok(());
                    }
                }
                Effect::Close(reply) => return Err(reply),
                Effect::Deliver { session, msg } => {
                    let sent = lock(&self.sessions)
                        .get(&session)
                        .map(|h| h.tx.try_send(msg).is_ok());
                    if sent == Some(false) {
                        self.deliveries_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Effect::Wake(session) => {
                    if let Some(h) = lock(&self.sessions).get(&session) {
                        h.wake.notify_one();
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a session's frames: replies and punches as they come, and peer-map pushes
    /// [`FLUSH_DELAY`] after the outbox was first woken.
    async fn write_frames<W: AsyncWrite + Unpin>(
        self: Arc<Self>,
        mut send: W,
        mut rx: mpsc::Receiver<ServerMsg>,
        wake: Arc<Notify>,
        session: Arc<Mutex<Session>>,
    ) -> W {
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut last_push: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let last = matches!(msg, ServerMsg::Error(_));
                    if !write(&mut send, &frame::encode(&msg)).await || last {
                        break;
                    }
                }
                _ = wake.notified(), if flush_at.is_none() => {
                    let soonest = tokio::time::Instant::now() + FLUSH_DELAY;
                    flush_at = Some(last_push.map_or(soonest, |t| soonest.max(t + PUSH_PACE)));
                }
                _ = sleep_until(flush_at), if flush_at.is_some() => {
                    flush_at = None;
                    let frames = {
                        let s = lock(&session);
                        lock(&self.hub).poll_pushes(&s, now())
                    };
                    if !frames.is_empty() {
                        last_push = Some(tokio::time::Instant::now());
                    }
                    for f in frames {
                        if !write(&mut send, &f).await {
                            return send;
                        }
                    }
                }
            }
        }
        send
    }
}

/// A connection counted against the caps until dropped.
pub(crate) struct Slot {
    server: Arc<Server>,
    ip: IpAddr,
    /// Connections in all, this one included, when it was admitted.
    total: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_ip = lock(&self.server.per_ip);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Writes one frame within [`WRITE_TIMEOUT`]; `false` if the session must end.
async fn write(send: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, async {
            send.write_all(frame).await?;
            send.flush().await
        })
        .await,
        Ok(Ok(()))
    )
}

fn frame_refusal(e: FrameError) -> ErrorReply {
    let code = match e {
        FrameError::Oversized(..) => ErrorCode::TooLarge,
        _ => ErrorCode::BadRequest,
    };
    ErrorReply::new(code, e.to_string())
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The time for the hub: the one place the driver reads clocks.
#[allow(clippy::disallowed_methods)]
fn now() -> Now {
    Now {
        mono: std::time::Instant::now(),
        unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

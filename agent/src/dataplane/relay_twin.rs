//! The second TLS connection of a relay-over-TCP slot (its **twin**): it carries a copy of
//! every small WireGuard data message (`rally_proto::relay_stream::is_copied`: game state,
//! voice) and every ping the node sends on the slot,
//! so a TCP segment lost on one connection does not hold the datagram back (TCP would deliver
//! it, and everything behind it, only after a retransmission: about 1.25 round trips). Bulk
//! stays on the node's own connection, so it is neither doubled nor reordered; it moves to the
//! twin only while that connection is down.
//!
//! The node knows nothing of the twin. The twin binds itself, as its own session at the relay
//! (which holds up to two TCP sessions per agent): with the connection's TLS exporter value
//! (`rally_proto::relay_stream::BIND_EXPORTER_LABEL`) as cookie, signed by the agent's
//! identity, with the token of the node's latest `Bind` on the slot, and again whenever that
//! token changes or the relay says the session is gone (`NotBound`). What it reads is handed
//! to the node only when it is a `Deliver`, exactly as if it had come on the node's
//! connection; the copy that arrives second is refused by WireGuard's replay window before
//! any decryption (counted as a duplicate, not an error). The relay's answers to the twin
//! (`BindOk`, `Pong`, errors) are sealed with the twin's own session key and stay here.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rally_proto::relay::{bind_transcript, session_key, RelayErrorCode, RelayMsg, DOMAIN_BIND};
use rally_proto::relay_stream::{self, StreamDecoder, BIND_EXPORTER_LABEL};
use rally_proto::Identity;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::debug;

use super::relay_tcp::{dial, write_queue, Inbound, Queue, DIAL_TIMEOUT};
use crate::node::TcpEndpoint;

/// Least time between two binds the relay's `NotBound` asks for.
const REBIND: Duration = Duration::from_secs(1);

/// What a message the node sends on a slot is to the twin, from one decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent<'a> {
    /// A `Bind` with this token: the twin binds with it too, and never carries the node's.
    Bind(&'a [u8]),
    /// Goes on the twin too: a `Send` of small WireGuard data ([`relay_stream::is_copied`]) or a
    /// `Ping` (which keeps the twin's session alive when there is no traffic; the twin
    /// swallows the `Pong`).
    Copied,
    /// Anything else: on the node's connection only, or the twin's while that one is down.
    Once,
}

impl<'a> Sent<'a> {
    pub(super) fn of(msg: &'a [u8]) -> Self {
        match RelayMsg::decode(msg) {
            Ok(RelayMsg::Bind { token, .. }) => Sent::Bind(token),
            Ok(RelayMsg::Send { .. }) if relay_stream::is_copied(msg) => Sent::Copied,
            Ok(RelayMsg::Ping { .. }) => Sent::Copied,
            _ => Sent::Once,
        }
    }
}

/// What the twin connection task needs.
pub(super) struct TwinTask {
    pub slot: SocketAddr,
    pub endpoint: TcpEndpoint,
    pub proxy: Option<String>,
    pub queue: Arc<Queue>,
    pub inbound: mpsc::Sender<Inbound>,
    pub identity: Arc<Identity>,
    /// The token of the node's latest `Bind` on the slot (empty until there is one).
    pub token: watch::Receiver<Vec<u8>>,
}

/// One twin connection: dial, bind, then write the queue, read `Deliver`s for the node and
/// rebind when needed, until the connection fails.
pub(super) async fn run(t: TwinTask) {
    let TwinTask {
        slot,
        endpoint,
        proxy,
        queue,
        inbound,
        identity,
        token: tokens,
    } = t;
    let addr = endpoint.addr;
    let Some((tls, cookie)) = connect(&endpoint, proxy.as_deref()).await else {
        queue.closed.store(true, Ordering::Relaxed);
        return;
    };
    queue.up.store(true, Ordering::Relaxed);
    debug!(%addr, "second relay connection over TLS/TCP up");
    let binder = Binder {
        cookie,
        identity,
        queue: queue.clone(),
        key: Mutex::new(None),
    };
    let (mut reader, mut writer) = tokio::io::split(tls);
    let why = tokio::select! {
        r = write_queue(&queue, &mut writer) => r.err().map(|e| e.to_string()),
        r = read_frames(&mut reader, &binder, &inbound, slot, tokens.clone()) => {
            r.err().map(|e| e.to_string())
        }
        () = follow_token(&binder, tokens) => None,
    };
    debug!(%addr, reason = why.as_deref().unwrap_or("closed by the relay"), "second relay connection over TLS/TCP down");
    queue.bound.store(false, Ordering::Relaxed);
    queue.closed.store(true, Ordering::Relaxed);
}

/// The TLS connection and its exporter value under the bind label, or `None` (logged).
async fn connect(endpoint: &TcpEndpoint, proxy: Option<&str>) -> Option<(TlsStream, [u8; 32])> {
    let addr = endpoint.addr;
    let tls = match tokio::time::timeout(DIAL_TIMEOUT, dial(endpoint, proxy)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%addr, "second relay connection over TCP: {e}");
            return None;
        }
        Err(_) => {
            debug!(%addr, "second relay connection over TCP: no answer");
            return None;
        }
    };
    let cookie = tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], BIND_EXPORTER_LABEL, None)
        .ok()?;
    Some((tls, cookie))
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Binds the twin: signs its channel binding with a token and queues the `Bind`.
struct Binder {
    cookie: [u8; 32],
    identity: Arc<Identity>,
    queue: Arc<Queue>,
    /// The session key of the last bind sent (seals the `BindOk`).
    key: Mutex<Option<[u8; 32]>>,
}

impl Binder {
    fn bind(&self, token: &[u8]) {
        if token.is_empty() {
            return;
        }
        let cookie = self.cookie;
        let signature = self
            .identity
            .sign(DOMAIN_BIND, &bind_transcript(&cookie, token));
        if let Ok(mut k) = self.key.lock() {
            *k = Some(session_key(&cookie, &signature));
        }
        let msg = RelayMsg::Bind {
            cookie,
            signature,
            token,
        };
        self.queue.push(&msg.to_vec());
    }

    /// Whether `msg` is sealed by the last bind's session key.
    fn seals(&self, msg: &RelayMsg<'_>) -> bool {
        self.key
            .lock()
            .ok()
            .and_then(|k| *k)
            .is_some_and(|k| msg.is_sealed_by(&k))
    }
}

/// Binds with the current token, and again whenever it changes; never returns.
async fn follow_token(binder: &Binder, mut tokens: watch::Receiver<Vec<u8>>) {
    let first = tokens.borrow_and_update().clone();
    binder.bind(&first);
    while tokens.changed().await.is_ok() {
        let token = tokens.borrow_and_update().clone();
        binder.bind(&token);
    }
    // The node's side is gone: nothing more to bind with; keep reading.
    std::future::pending::<()>().await;
}

/// Reads frames until the connection ends: `Deliver`s go to the node as from `slot`; a sealed
/// `BindOk` marks the twin bound; `NotBound` rebinds (at most once per [`REBIND`]).
async fn read_frames<R: AsyncRead + Unpin>(
    reader: &mut R,
    binder: &Binder,
    inbound: &mpsc::Sender<Inbound>,
    slot: SocketAddr,
    token: watch::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut decoder = StreamDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_rebind: Option<Instant> = None;
    let queue = &binder.queue;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        decoder.extend(&buf[..n]);
        while let Some(frame) = decoder.next_frame() {
            let msg = RelayMsg::decode(frame);
            if matches!(msg, Ok(RelayMsg::Deliver { .. })) {
                if inbound.send((slot, frame.to_vec())).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            match msg {
                Ok(msg @ RelayMsg::BindOk { .. }) => {
                    let sealed = binder.seals(&msg);
                    queue.bound.store(sealed, Ordering::Relaxed);
                    debug!(sealed, "second relay connection bound");
                }
                Ok(RelayMsg::Error { code, .. }) if is_unbound(code) => {
                    queue.bound.store(false, Ordering::Relaxed);
                    let now = Instant::now();
                    if code == RelayErrorCode::NotBound
                        && last_rebind.is_none_or(|at| now >= at + REBIND)
                    {
                        last_rebind = Some(now);
                        let current = token.borrow().clone();
                        binder.bind(&current);
                    }
                }
                // Pongs, and errors about peers: the node hears them on its connection.
                _ => {}
            }
        }
    }
}

/// Errors after which the twin has no session at the relay.
fn is_unbound(code: RelayErrorCode) -> bool {
    !matches!(code, RelayErrorCode::PeerUnavailable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rally_proto::relay::ShortId;
    use rally_proto::relay_stream::SMALL_FRAME;

    /// A WireGuard data message of `len` bytes.
    fn data(len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        d[0] = 4;
        d
    }

    #[test]
    fn small_data_sends_and_pings_are_copied_and_bulk_handshakes_and_binds_are_not() {
        let to = ShortId::default();
        let send = |payload: &[u8]| RelayMsg::Send { to, payload }.to_vec();
        let is_copied = |m: &[u8]| Sent::of(m) == Sent::Copied;
        let small = send(&data(200));
        assert!(is_copied(&small));
        let header = small.len() - 200;
        let at_limit = send(&data(SMALL_FRAME - header));
        assert_eq!(at_limit.len(), SMALL_FRAME);
        assert!(is_copied(&at_limit));
        assert!(!is_copied(&send(&data(SMALL_FRAME - header + 1))));
        let mut initiation = data(148);
        initiation[0] = 1;
        assert!(!is_copied(&send(&initiation)), "a handshake goes once");
        assert!(!is_copied(&send(b"probe")));
        assert!(is_copied(&RelayMsg::Ping { nonce: 1 }.to_vec()));
        assert!(!is_copied(&RelayMsg::BindRequest.to_vec()));
        let bind = RelayMsg::Bind {
            cookie: [1; 32],
            signature: [2; 64],
            token: b"token",
        }
        .to_vec();
        assert!(!is_copied(&bind));
        assert_eq!(Sent::of(&bind), Sent::Bind(b"token"));
        assert_eq!(Sent::of(&small), Sent::Copied);
    }
}

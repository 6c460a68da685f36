//! A task that keeps the agent registered with its control plane: connects, answers the
//! challenge, forwards peer maps and deltas, carries requests, and reconnects with backoff and
//! jitter. Keeping the peer map itself (and asking for a full one after a gap) is the caller's
//! job, with [`rally_proto::PeerView`]; a full map sent as pages is assembled here
//! ([`rally_proto::MapPages`]) and reported as one [`ControlEvent::PeerMap`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rally_proto::control::{ErrorReply, RelayEntry};
use rally_proto::identity::{register_transcript, DOMAIN_REGISTER};
use rally_proto::{
    frame, ClientMsg, FrameDecoder, Identity, Key32, MapPages, PeerChange, PeerInfo, Request,
    Response, ServerMsg, Sig64, PROTOCOL_VERSION,
};
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, BackoffPolicy};
use crate::state::ControlTarget;

/// Reconnect schedule towards the control plane: never gives up.
pub const RECONNECT: BackoffPolicy = BackoffPolicy {
    base: Duration::from_millis(500),
    max: Duration::from_secs(30),
    jitter: 0.3,
    attempts: None,
};
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("not connected to the control plane at {addr}: {reason}")]
    NotConnected { addr: String, reason: String },
    #[error("{0}")]
    Refused(ErrorReply),
    #[error("control plane connection lost")]
    Lost,
}

/// What the task reports to the daemon.
#[derive(Debug)]
pub enum ControlEvent {
    Registered {
        peer_id: Key32,
        name: String,
        virtual_ip: Ipv4Addr,
        observed: SocketAddr,
    },
    Disconnected {
        reason: String,
    },
    /// A full peer map at `version` (the first after every registration), whole even when it
    /// arrived in pages.
    PeerMap {
        version: u64,
        peers: Vec<PeerInfo>,
    },
    /// Changes on top of version `version - 1`.
    PeerDelta {
        version: u64,
        changes: Vec<PeerChange>,
    },
    Relays {
        relays: Vec<RelayEntry>,
        token: String,
    },
    Punch {
        peer: Key32,
        candidates: Vec<SocketAddr>,
        start_in_ms: u32,
    },
}

/// What the daemon asks of the task.
pub enum ControlCmd {
    Request(Request, oneshot::Sender<Result<Response, ControlError>>),
    SetEndpoints(Vec<SocketAddr>),
    /// Ask for a full peer map (the answer comes as [`ControlEvent::PeerMap`]).
    SyncPeers,
}

/// Who the agent is, as it registers.
pub struct Registration {
    pub identity: Arc<Identity>,
    pub wg_key: Key32,
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::UnboundedSender<ControlCmd>,
}

impl ControlHandle {
    /// Sends a request and waits for its answer.
    pub async fn request(&self, req: Request) -> Result<Response, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(ControlCmd::Request(req, tx))
            .map_err(|_| ControlError::Lost)?;
        rx.await.map_err(|_| ControlError::Lost)?
    }

    pub fn set_endpoints(&self, endpoints: Vec<SocketAddr>) {
        let _ = self.tx.send(ControlCmd::SetEndpoints(endpoints));
    }

    /// Asks for a full peer map, after a delta did not follow the caller's version. Dropped
    /// while disconnected: every registration starts with a full map anyway.
    pub fn sync_peers(&self) {
        let _ = self.tx.send(ControlCmd::SyncPeers);
    }
}

/// Starts the task. It ends when every handle is dropped.
pub fn spawn(
    target: ControlTarget,
    reg: Registration,
    events: mpsc::UnboundedSender<ControlEvent>,
) -> ControlHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(target, reg, events, rx));
    ControlHandle { tx }
}

async fn run(
    target: ControlTarget,
    mut reg: Registration,
    events: mpsc::UnboundedSender<ControlEvent>,
    mut cmds: mpsc::UnboundedReceiver<ControlCmd>,
) {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let mut backoff = Backoff::new(RECONNECT, seed);
    let endpoint = match client_endpoint() {
        Ok(e) => e,
        Err(e) => {
            let _ = events.send(ControlEvent::Disconnected {
                reason: format!("cannot open a UDP socket: {e}"),
            });
            return;
        }
    };
    loop {
        let mut session = Session {
            target: &target,
            reg: &mut reg,
            events: &events,
            backoff: &mut backoff,
        };
        let reason = match session.run(&endpoint, &mut cmds).await {
            Ok(()) => return,
            Err(reason) => reason,
        };
        warn!(control = %target.addr, "control plane: {reason}");
        let _ = events.send(ControlEvent::Disconnected {
            reason: reason.clone(),
        });
        let delay = backoff.next_delay().unwrap_or(RECONNECT.max);
        debug!(?delay, "reconnecting to the control plane");
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                cmd = cmds.recv() => match cmd {
                    None => return,
                    Some(ControlCmd::SetEndpoints(eps)) => reg.endpoints = eps,
                    Some(ControlCmd::SyncPeers) => {}
                    Some(ControlCmd::Request(_, reply)) => {
                        let _ = reply.send(Err(ControlError::NotConnected {
                            addr: target.addr.clone(),
                            reason: reason.clone(),
                        }));
                    }
                },
            }
        }
    }
}

/// A client endpoint on any port (IPv6 dual-stack if possible), with a receive buffer that
/// holds a full peer map of a large party in one burst (the default ~200 KiB drops part of it,
/// and QUIC then waits out its loss timers).
fn client_endpoint() -> std::io::Result<quinn::Endpoint> {
    const BUFFER: usize = 2 * 1024 * 1024;
    let socket = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0))
        .or_else(|_| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
    rally_udp::grow_socket_buffers(&socket, BUFFER);
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

struct Session<'a> {
    target: &'a ControlTarget,
    reg: &'a mut Registration,
    events: &'a mpsc::UnboundedSender<ControlEvent>,
    backoff: &'a mut Backoff,
}

impl Session<'_> {
    /// Runs one connection. `Ok` means the daemon is gone; `Err` says why the connection ended.
    async fn run(
        &mut self,
        endpoint: &quinn::Endpoint,
        cmds: &mut mpsc::UnboundedReceiver<ControlCmd>,
    ) -> Result<(), String> {
        let addr = tokio::net::lookup_host(&self.target.addr)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.target.addr))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.target.addr))?;
        let config = super::tls::client_config(self.target.key).map_err(|e| e.to_string())?;
        let connecting = endpoint
            .connect_with(config, addr, super::tls::SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no answer from {addr}"))?
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut reader = Reader::new(recv);
        let identity = self.reg.identity.public();
        write(
            &mut send,
            &ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                identity,
            },
        )
        .await?;
        let nonce = match reader.next().await? {
            ServerMsg::Challenge { nonce } => nonce,
            ServerMsg::Error(e) => return Err(format!("refused: {}", e.message)),
            other => return Err(format!("unexpected {other:?} before challenge")),
        };
        let transcript = register_transcript(&nonce, &identity, &self.reg.wg_key, &self.reg.name);
        let signature = Sig64(self.reg.identity.sign(DOMAIN_REGISTER, &transcript));
        write(
            &mut send,
            &ClientMsg::Register {
                name: self.reg.name.clone(),
                wg_key: self.reg.wg_key,
                endpoints: self.reg.endpoints.clone(),
                signature,
            },
        )
        .await?;
        match reader.next().await? {
            ServerMsg::Registered {
                peer_id,
                name,
                virtual_ip,
                observed,
            } => {
                info!(control = %addr, %virtual_ip, "registered with the control plane");
                self.backoff.reset();
                let _ = self.events.send(ControlEvent::Registered {
                    peer_id,
                    name,
                    virtual_ip,
                    observed,
                });
            }
            ServerMsg::Error(e) => return Err(format!("registration refused: {}", e.message)),
            other => return Err(format!("unexpected {other:?} during registration")),
        }

        let mut pending: HashMap<u64, oneshot::Sender<Result<Response, ControlError>>> =
            HashMap::new();
        let mut next_id = 1u64;
        let mut pages = MapPages::new();
        let result = loop {
            tokio::select! {
                msg = reader.next() => match msg {
                    Ok(ServerMsg::PeerPage { version, peers }) => {
                        if let Err(e) = pages.handle_page(version, peers) {
                            break Err(format!("bad peer map from the control plane: {e}"));
                        }
                    }
                    Ok(ServerMsg::PeerMap { version, peers }) => match pages.handle_map(version, peers) {
                        Ok(peers) => {
                            let _ = self.events.send(ControlEvent::PeerMap { version, peers });
                        }
                        Err(e) => break Err(format!("bad peer map from the control plane: {e}")),
                    },
                    Ok(ServerMsg::PeerDelta { version, changes }) => {
                        if let Err(e) = pages.handle_delta(version) {
                            break Err(format!("bad peer map from the control plane: {e}"));
                        }
                        let _ = self.events.send(ControlEvent::PeerDelta { version, changes });
                    }
                    Ok(ServerMsg::Relays { relays, token, .. }) => {
                        let _ = self.events.send(ControlEvent::Relays { relays, token });
                    }
                    Ok(ServerMsg::Punch { peer, candidates, start_in_ms }) => {
                        let _ = self.events.send(ControlEvent::Punch { peer, candidates, start_in_ms });
                    }
                    Ok(ServerMsg::Response { id, result }) => {
                        if let Some(reply) = pending.remove(&id) {
                            let _ = reply.send(result.map_err(ControlError::Refused));
                        }
                    }
                    Ok(ServerMsg::Error(e)) => break Err(format!("closed by the control plane: {}", e.message)),
                    Ok(other) => debug!("ignoring {other:?}"),
                    Err(e) => break Err(e),
                },
                cmd = cmds.recv() => {
                    let (req, reply) = match cmd {
                        None => break Ok(()),
                        Some(ControlCmd::SetEndpoints(eps)) => {
                            self.reg.endpoints = eps.clone();
                            (Request::UpdateEndpoints { endpoints: eps }, None)
                        }
                        Some(ControlCmd::SyncPeers) => (Request::SyncPeers, None),
                        Some(ControlCmd::Request(req, reply)) => (req, Some(reply)),
                    };
                    let id = next_id;
                    next_id += 1;
                    if let Some(reply) = reply {
                        pending.insert(id, reply);
                    }
                    if let Err(e) = write(&mut send, &ClientMsg::Request { id, body: req }).await {
                        break Err(e);
                    }
                }
            }
        };
        for (_, reply) in pending {
            let _ = reply.send(Err(ControlError::Lost));
        }
        conn.close(0u32.into(), b"");
        result
    }
}

async fn write(send: &mut quinn::SendStream, msg: &ClientMsg) -> Result<(), String> {
    send.write_all(&frame::encode(msg))
        .await
        .map_err(|e| format!("send failed: {e}"))
}

struct Reader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Reader {
    fn new(recv: quinn::RecvStream) -> Self {
        Reader {
            recv,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next message; cancel-safe (a partly read frame stays in the decoder).
    async fn next(&mut self) -> Result<ServerMsg, String> {
        loop {
            if let Some(msg) = self
                .decoder
                .next_msg::<ServerMsg>()
                .map_err(|e| format!("bad message from the control plane: {e}"))?
            {
                return Ok(msg);
            }
            // Chunks as quinn holds them: one copy into the decoder, no buffer of our own.
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.decoder.extend(&chunk.bytes),
                Ok(None) => return Err("control plane closed the stream".into()),
                Err(e) => return Err(format!("connection lost: {e}")),
            }
        }
    }
}

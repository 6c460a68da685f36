//! A task that keeps the agent registered with its control plane: connects, answers the
//! challenge, forwards peer maps and deltas, carries requests, and reconnects with backoff and
//! jitter. Each connection races QUIC against TLS 1.3 over TCP (`link.rs`): QUIC first, TCP
//! after a short head start, the first handshake wins; while on TCP, QUIC is tried again now
//! and then and the session moves back to it when it answers. Keeping the peer map itself (and
//! asking for a full one after a gap) is the caller's job, with [`rally_proto::PeerView`]; a
//! full map sent as pages is assembled here ([`rally_proto::MapPages`]) and reported as one
//! [`ControlEvent::PeerMap`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rally_proto::control::{ErrorReply, RelayEntry};
use rally_proto::identity::{register_transcript, DOMAIN_REGISTER};
use rally_proto::ErrorCode;
use rally_proto::{
    frame, ClientMsg, FrameDecoder, Identity, Key32, MapPages, PeerChange, PeerInfo, Request,
    Response, ServerMsg, Sig64, PROTOCOL_VERSION,
};
use rand_core::{OsRng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::link::{quic_answers, BoxRead, BoxWrite, Link};
use crate::backoff::{Backoff, BackoffPolicy};
use crate::state::ControlTarget;

/// Reconnect schedule towards the control plane: never gives up.
pub const RECONNECT: BackoffPolicy = BackoffPolicy {
    base: Duration::from_millis(500),
    max: Duration::from_secs(30),
    jitter: 0.3,
    attempts: None,
};
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long QUIC has to itself before TLS over TCP is dialled too.
pub const TCP_HEAD_START: Duration = Duration::from_millis(300);
/// While on TCP, how often QUIC is tried again.
pub const UDP_RETRY: Duration = Duration::from_secs(5);

/// Which transport carries the control channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlTransport {
    Quic,
    Tcp,
}

impl ControlTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlTransport::Quic => "quic",
            ControlTransport::Tcp => "tcp",
        }
    }
}

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
        /// The transport that won the race.
        transport: ControlTransport,
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
    /// An HTTP CONNECT proxy (`HOST:PORT`) for the TLS-over-TCP dial.
    pub proxy: Option<String>,
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
    let mut last = None;
    let mut early_register = true;
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
            last: &mut last,
            early_register: &mut early_register,
        };
        let reason = match session.run(&endpoint, &mut cmds).await {
            Ok(Ended::DaemonGone) => return,
            Ok(Ended::UdpBack) => {
                info!(control = %target.addr, "UDP answers again: moving the control channel to QUIC");
                continue;
            }
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
    /// The transport the last connection used: after one over TCP, the next race dials TCP
    /// at once (UDP was blocked a moment ago; QUIC still gets tried, and retried later).
    last: &'a mut Option<ControlTransport>,
    /// Whether to sign the registration over the connection's channel binding and send it
    /// with the `Hello` (cleared when a control plane refuses that signature: an older one
    /// that knows only its challenge).
    early_register: &'a mut bool,
}

impl Session<'_> {
    /// Runs one connection. `Ok` says why it ended without an error; `Err` says what failed.
    async fn run(
        &mut self,
        endpoint: &quinn::Endpoint,
        cmds: &mut mpsc::UnboundedReceiver<ControlCmd>,
    ) -> Result<Ended, String> {
        let addr = self.resolve().await?;
        let head_start = match self.last {
            Some(ControlTransport::Tcp) => Duration::ZERO,
            _ => TCP_HEAD_START,
        };
        let link = Link::connect(
            endpoint,
            addr,
            self.target.key,
            self.reg.proxy.as_deref(),
            head_start,
        )
        .await?;
        let transport = link.transport;
        *self.last = Some(transport);
        let quic = link.quic.clone();
        let binding = link.binding.filter(|_| *self.early_register);
        let mut live = Live {
            send: link.send,
            reader: Reader::new(link.recv),
            pending: HashMap::new(),
            next_id: 1,
            pages: MapPages::new(),
        };
        let result = match self.register(&mut live, addr, transport, binding).await {
            Ok(()) => self.serve(&mut live, endpoint, addr, transport, cmds).await,
            Err(e) => Err(e),
        };
        for (_, reply) in live.pending {
            let _ = reply.send(Err(ControlError::Lost));
        }
        if let Some(conn) = quic {
            conn.close(0u32.into(), b"");
        }
        result
    }

    /// The control plane's first address.
    async fn resolve(&self) -> Result<SocketAddr, String> {
        tokio::net::lookup_host(&self.target.addr)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.target.addr))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.target.addr))
    }

    /// Hello, the signed registration, and the registration the daemon is told of. With the
    /// connection's channel `binding`, the registration is signed over it and sent with the
    /// `Hello` (the challenge that follows is not needed); without, over the challenge's nonce.
    async fn register(
        &mut self,
        live: &mut Live,
        addr: SocketAddr,
        transport: ControlTransport,
        binding: Option<Key32>,
    ) -> Result<(), String> {
        let identity = self.reg.identity.public();
        let hello = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            identity,
        };
        write(&mut live.send, &hello).await?;
        debug!(
            transport = transport.as_str(),
            channel_bound = binding.is_some(),
            "registering"
        );
        if let Some(binding) = binding {
            write(&mut live.send, &self.registration(&binding)).await?;
        }
        let nonce = match live.reader.next().await? {
            ServerMsg::Challenge { nonce } => nonce,
            ServerMsg::Error(e) => return Err(format!("refused: {}", e.message)),
            other => return Err(format!("unexpected {other:?} before challenge")),
        };
        if binding.is_none() {
            write(&mut live.send, &self.registration(&nonce)).await?;
        }
        match live.reader.next().await? {
            ServerMsg::Registered {
                peer_id,
                name,
                virtual_ip,
                observed,
            } => {
                info!(control = %addr, %virtual_ip, transport = transport.as_str(), "registered with the control plane");
                self.backoff.reset();
                let _ = self.events.send(ControlEvent::Registered {
                    peer_id,
                    name,
                    virtual_ip,
                    observed,
                    transport,
                });
                Ok(())
            }
            ServerMsg::Error(e) => {
                if binding.is_some() && e.code == ErrorCode::AuthFailed {
                    // Perhaps a control plane from before channel bindings: answer its
                    // challenge from the next connection on.
                    *self.early_register = false;
                }
                Err(format!("registration refused: {}", e.message))
            }
            other => Err(format!("unexpected {other:?} during registration")),
        }
    }

    /// The registration, signed over `nonce` (the challenge's, or the channel binding).
    fn registration(&self, nonce: &Key32) -> ClientMsg {
        let identity = self.reg.identity.public();
        let transcript = register_transcript(nonce, &identity, &self.reg.wg_key, &self.reg.name);
        ClientMsg::Register {
            name: self.reg.name.clone(),
            wg_key: self.reg.wg_key,
            endpoints: self.reg.endpoints.clone(),
            signature: Sig64(self.reg.identity.sign(DOMAIN_REGISTER, &transcript)),
        }
    }

    /// The registered session: messages from the control plane, commands from the daemon,
    /// and (while on TCP) the periodic check whether QUIC answers again.
    async fn serve(
        &mut self,
        live: &mut Live,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        transport: ControlTransport,
        cmds: &mut mpsc::UnboundedReceiver<ControlCmd>,
    ) -> Result<Ended, String> {
        let mut udp_retry =
            tokio::time::interval_at(tokio::time::Instant::now() + UDP_RETRY, UDP_RETRY);
        loop {
            tokio::select! {
                _ = udp_retry.tick(), if transport == ControlTransport::Tcp => {
                    if quic_answers(endpoint, addr, self.target.key).await {
                        *self.last = Some(ControlTransport::Quic);
                        return Ok(Ended::UdpBack);
                    }
                }
                msg = live.reader.next() => self.handle_server_msg(live, msg?)?,
                cmd = cmds.recv() => match cmd {
                    None => return Ok(Ended::DaemonGone),
                    Some(cmd) => self.handle_cmd(live, cmd).await?,
                },
            }
        }
    }

    /// One message from the control plane: to the daemon, or the answer to a request.
    fn handle_server_msg(&self, live: &mut Live, msg: ServerMsg) -> Result<(), String> {
        let bad_map = |e| format!("bad peer map from the control plane: {e}");
        let event = match msg {
            ServerMsg::PeerPage { version, peers } => {
                live.pages.handle_page(version, peers).map_err(bad_map)?;
                return Ok(());
            }
            ServerMsg::PeerMap { version, peers } => {
                let peers = live.pages.handle_map(version, peers).map_err(bad_map)?;
                ControlEvent::PeerMap { version, peers }
            }
            ServerMsg::PeerDelta { version, changes } => {
                live.pages.handle_delta(version).map_err(bad_map)?;
                ControlEvent::PeerDelta { version, changes }
            }
            ServerMsg::Relays { relays, token, .. } => ControlEvent::Relays { relays, token },
            ServerMsg::Punch {
                peer,
                candidates,
                start_in_ms,
            } => ControlEvent::Punch {
                peer,
                candidates,
                start_in_ms,
            },
            ServerMsg::Response { id, result } => {
                if let Some(reply) = live.pending.remove(&id) {
                    let _ = reply.send(result.map_err(ControlError::Refused));
                }
                return Ok(());
            }
            ServerMsg::Error(e) => {
                return Err(format!("closed by the control plane: {}", e.message))
            }
            other => {
                debug!("ignoring {other:?}");
                return Ok(());
            }
        };
        let _ = self.events.send(event);
        Ok(())
    }

    /// One command from the daemon: a request to the control plane (answered when its
    /// response comes, or with `Lost` when the session ends first).
    async fn handle_cmd(&mut self, live: &mut Live, cmd: ControlCmd) -> Result<(), String> {
        let (req, reply) = match cmd {
            ControlCmd::SetEndpoints(eps) => {
                self.reg.endpoints = eps.clone();
                (Request::UpdateEndpoints { endpoints: eps }, None)
            }
            ControlCmd::SyncPeers => (Request::SyncPeers, None),
            ControlCmd::Request(req, reply) => (req, Some(reply)),
        };
        let id = live.next_id;
        live.next_id += 1;
        if let Some(reply) = reply {
            live.pending.insert(id, reply);
        }
        write(&mut live.send, &ClientMsg::Request { id, body: req }).await
    }
}

/// One connection's state once it is up.
struct Live {
    send: BoxWrite,
    reader: Reader,
    /// Requests awaiting their response, by id.
    pending: HashMap<u64, oneshot::Sender<Result<Response, ControlError>>>,
    next_id: u64,
    /// A full peer map arriving in pages.
    pages: MapPages,
}

/// Why a session ended without an error.
enum Ended {
    /// Every handle was dropped.
    DaemonGone,
    /// The session ran over TCP and QUIC answers again.
    UdpBack,
}

async fn write(send: &mut BoxWrite, msg: &ClientMsg) -> Result<(), String> {
    send.write_all(&frame::encode(msg))
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    send.flush().await.map_err(|e| format!("send failed: {e}"))
}

struct Reader {
    recv: BoxRead,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl Reader {
    fn new(recv: BoxRead) -> Self {
        Reader {
            recv,
            decoder: FrameDecoder::new(),
            buf: vec![0u8; 64 * 1024],
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
            match self.recv.read(&mut self.buf).await {
                Ok(0) => return Err("control plane closed the stream".into()),
                Ok(n) => self.decoder.extend(&self.buf[..n]),
                Err(e) => return Err(format!("connection lost: {e}")),
            }
        }
    }
}

//! `rally up`: the daemon. It ties together the state directory, the control-plane client, the
//! data plane and the local control socket the CLI talks to.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rally_proto::control::{NatReport, PartyInfo, RelayEntry};
use rally_proto::{
    DeltaError, Identity, InviteCode, Key32, Overlay, PeerEvent, PeerView, Request, Response,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::conn::{PathId, Profile};
use crate::control::{self, ControlError, ControlEvent, ControlHandle, Registration};
use crate::dataplane::{Engine, EngineCmd, EngineConfig, EngineEvent, EngineHandle};
use crate::events::{EventBus, EventFilter, Item};
use crate::ipc::{self, ControlStatus, IpcReply, IpcRequest, IpcResult, StatusReport};
use crate::netinfo::local_endpoints;
use crate::state::{ControlTarget, StateDir, StateError};

/// How long `party join` waits for the agent to register with a control plane it just learned.
const REGISTER_WAIT: Duration = Duration::from_secs(15);
/// How long after a peer-map change the on-disk cache is rewritten (changes within it share
/// one write).
const PEER_CACHE_DELAY: Duration = Duration::from_secs(1);

/// How the daemon was started.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub control: Option<ControlTarget>,
    pub name: String,
    pub listen_port: u16,
    pub tun_name: String,
    pub profile: Profile,
    /// Serve Prometheus text on this address.
    pub metrics: Option<SocketAddr>,
    /// LAN game discovery (`rally up --discovery …`).
    pub discovery: crate::discovery::DiscoveryConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("a rally daemon is already running with state directory {0}")]
    AlreadyRunning(String),
    #[error("cannot listen on UDP port {port}: {source}")]
    Udp { port: u16, source: std::io::Error },
    #[error("cannot create the control socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen for metrics on tcp {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Fatal(String),
}

struct Daemon {
    cfg: Config,
    state: StateDir,
    identity: Arc<Identity>,
    wg_secret: [u8; 32],
    wg_public: Key32,
    overlay: Overlay,
    /// The agent's one UDP socket (the data plane gets a handle of it when it starts).
    udp: std::net::UdpSocket,
    listen_port: u16,
    inner: Mutex<Inner>,
    connected: watch::Sender<bool>,
    events: mpsc::UnboundedSender<ControlEvent>,
    engine_events: mpsc::UnboundedSender<EngineEvent>,
    stop: mpsc::UnboundedSender<Option<String>>,
    bus: Arc<Mutex<EventBus>>,
}

#[derive(Default)]
struct Inner {
    control: Option<ControlHandle>,
    target: Option<ControlTarget>,
    control_error: Option<String>,
    virtual_ip: Option<Ipv4Addr>,
    engine: Option<EngineHandle>,
    parties: Vec<PartyInfo>,
    nat: Option<NatReport>,
    /// Relays as last handed out, kept to renew the token.
    relays: Vec<RelayEntry>,
    /// The peer map, kept in step with the control plane's full maps and deltas.
    peers: PeerView,
    /// A write of `peers.json` is scheduled.
    peer_cache_due: bool,
}

/// Runs the daemon until `rally down`, SIGINT/SIGTERM, or a fatal error.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let state = StateDir::new(&cfg.state_dir);
    state.ensure()?;
    let keys = state.load_or_create_keys()?;
    let mut saved = state.load_saved()?;
    if let Some(t) = &cfg.control {
        if saved.control.as_ref() != Some(t) {
            saved.control = Some(t.clone());
            state.store_saved(&saved)?;
        }
    }

    let socket_path = state.socket_path();
    if tokio::net::UnixStream::connect(&socket_path).await.is_ok() {
        return Err(DaemonError::AlreadyRunning(
            cfg.state_dir.display().to_string(),
        ));
    }
    let _ = std::fs::remove_file(&socket_path);
    let udp = std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.listen_port)))
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|source| DaemonError::Udp {
            port: cfg.listen_port,
            source,
        })?;
    let listen_port = udp
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(cfg.listen_port);
    let metrics_listener = match cfg.metrics {
        Some(addr) => Some(
            crate::metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    let listener = UnixListener::bind(&socket_path).map_err(|source| DaemonError::Socket {
        path: socket_path.display().to_string(),
        source,
    })?;
    let _ = std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600));

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (engine_tx, engine_rx) = mpsc::unbounded_channel();
    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel();
    let wg_public = keys.wg_public();
    let daemon = Arc::new(Daemon {
        identity: Arc::new(keys.identity),
        wg_secret: keys.wireguard,
        wg_public,
        overlay: Overlay::default(),
        udp,
        listen_port,
        inner: Mutex::new(Inner::default()),
        connected: watch::channel(false).0,
        events: events_tx,
        engine_events: engine_tx,
        stop: stop_tx,
        bus: Arc::new(Mutex::new(EventBus::new(crate::events::DEFAULT_HISTORY))),
        state,
        cfg,
    });
    info!(
        name = %daemon.cfg.name,
        peer_id = %daemon.identity.public(),
        port = listen_port,
        "rally agent starting"
    );

    // With a known address, tunnels come up from the cached peer map before the control plane
    // answers (or while it is down).
    if let Some(vip) = saved.virtual_ip {
        daemon.start_engine(vip)?;
        match daemon.state.load_peers() {
            Ok(peers) if !peers.is_empty() => {
                info!(peers = peers.len(), "restoring cached peer map");
                let mut inner = daemon.lock();
                let changes = inner.peers.handle_cached(peers);
                if let Some(engine) = &inner.engine {
                    engine.apply_peer_changes(changes);
                }
            }
            Ok(_) => {}
            Err(e) => warn!("ignoring the cached peer map: {e}"),
        }
    }
    if let Some(target) = saved.control {
        daemon.connect_control(target);
    } else {
        info!("no control plane yet: join a party with `rally party join CODE`");
    }

    tokio::spawn(daemon.clone().handle_events(events_rx));
    tokio::spawn(daemon.clone().handle_engine_events(engine_rx));
    tokio::spawn(daemon.clone().watch_network());
    tokio::spawn(daemon.clone().renew_relay_tokens());
    tokio::spawn(daemon.clone().serve_cli(listener));
    if let Some(l) = metrics_listener {
        let d = daemon.clone();
        tokio::spawn(crate::metrics::serve(l, move || {
            let d = d.clone();
            async move {
                let engine = d.lock().engine.clone();
                let (peers, discovery) = match engine {
                    Some(e) => (e.peers().await, e.discovery().await),
                    None => (Vec::new(), None),
                };
                let mut text = crate::metrics::render(&peers);
                if let Some(d) = discovery {
                    crate::metrics::render_discovery(&mut text, &d.counters);
                }
                text
            }
        }));
    }

    let outcome = tokio::select! {
        reason = stop_rx.recv() => reason.flatten(),
        _ = shutdown_signal() => None,
    };
    info!("rally agent stopping");
    if let Some(engine) = daemon.lock().engine.take() {
        engine.shutdown();
    }
    if daemon.lock().peer_cache_due {
        daemon.write_peer_cache();
    }
    let _ = std::fs::remove_file(&socket_path);
    // Let the data plane close the TUN device.
    tokio::time::sleep(Duration::from_millis(50)).await;
    match outcome {
        Some(err) => Err(DaemonError::Fatal(err)),
        None => Ok(()),
    }
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_engine(&self, vip: Ipv4Addr) -> Result<(), DaemonError> {
        let mut inner = self.lock();
        if inner.engine.is_some() {
            if inner.virtual_ip != Some(vip) {
                warn!(old = ?inner.virtual_ip, new = %vip, "virtual IP changed; restart rally to apply it");
            }
            return Ok(());
        }
        let udp = self.udp.try_clone().map_err(|source| DaemonError::Udp {
            port: self.listen_port,
            source,
        })?;
        let engine = Engine::start(
            EngineConfig {
                udp,
                wg_secret: self.wg_secret,
                identity: self.identity.clone(),
                tun_name: self.cfg.tun_name.clone(),
                virtual_ip: vip,
                prefix: self.overlay.prefix,
                local_ips: local_endpoints(0, &self.overlay)
                    .into_iter()
                    .map(|e| e.ip())
                    .collect(),
                profile: self.cfg.profile.clone(),
                bus: self.bus.clone(),
                discovery: self.cfg.discovery.clone(),
            },
            self.engine_events.clone(),
        )
        .map_err(|e| {
            DaemonError::Fatal(format!(
                "cannot create TUN device {}: {e} (rally needs root or CAP_NET_ADMIN)",
                self.cfg.tun_name
            ))
        })?;
        // Peers learned before the engine existed.
        engine.apply_peer_changes(
            inner
                .peers
                .shared_peers()
                .cloned()
                .map(PeerEvent::Added)
                .collect(),
        );
        inner.engine = Some(engine);
        inner.virtual_ip = Some(vip);
        Ok(())
    }

    fn connect_control(&self, target: ControlTarget) {
        let reg = Registration {
            identity: self.identity.clone(),
            wg_key: self.wg_public,
            name: self.cfg.name.clone(),
            endpoints: self.endpoints(),
        };
        info!(control = %target.addr, "connecting to the control plane");
        let handle = control::spawn(target.clone(), reg, self.events.clone());
        let mut inner = self.lock();
        inner.control = Some(handle);
        inner.target = Some(target);
    }

    /// Hands peer-map changes to the data plane (if it runs yet; it is seeded from the view
    /// when it starts) and schedules a rewrite of the cache.
    fn apply_peer_changes(self: &Arc<Self>, inner: &mut Inner, changes: Vec<PeerEvent>) {
        if changes.is_empty() {
            return;
        }
        if let Some(engine) = &inner.engine {
            engine.apply_peer_changes(changes);
        }
        if !inner.peer_cache_due {
            inner.peer_cache_due = true;
            let daemon = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PEER_CACHE_DELAY).await;
                daemon.write_peer_cache();
            });
        }
    }

    /// Writes the peer map to `peers.json` (once per [`PEER_CACHE_DELAY`] at most).
    fn write_peer_cache(&self) {
        let peers: Vec<_> = {
            let mut inner = self.lock();
            inner.peer_cache_due = false;
            inner.peers.peers().cloned().collect()
        };
        if let Err(e) = self.state.store_peers(&peers) {
            warn!("cannot cache the peer map: {e}");
        }
    }

    async fn handle_events(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<ControlEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                ControlEvent::Registered { virtual_ip, .. } => {
                    self.lock().control_error = None;
                    self.remember_vip(virtual_ip);
                    if let Err(e) = self.start_engine(virtual_ip) {
                        let _ = self.stop.send(Some(e.to_string()));
                        return;
                    }
                    self.connected.send_replace(true);
                    tokio::spawn(self.clone().refresh_parties());
                }
                ControlEvent::Disconnected { reason } => {
                    self.lock().control_error = Some(reason);
                    self.connected.send_replace(false);
                }
                ControlEvent::Relays { relays, token } => {
                    self.lock().relays = relays.clone();
                    tokio::spawn(self.clone().apply_relays(relays, token));
                }
                ControlEvent::Punch {
                    peer,
                    candidates,
                    start_in_ms,
                } => {
                    if let Some(engine) = &self.lock().engine {
                        engine.send(EngineCmd::Punch {
                            peer,
                            candidates,
                            start_in: Duration::from_millis(u64::from(start_in_ms)),
                        });
                    }
                }
                ControlEvent::PeerMap { version, peers } => {
                    let mut inner = self.lock();
                    let changes = inner.peers.handle_full(version, peers);
                    info!(
                        peers = inner.peers.len(),
                        changed = changes.len(),
                        version,
                        "peer map from the control plane"
                    );
                    self.apply_peer_changes(&mut inner, changes);
                }
                ControlEvent::PeerDelta { version, changes } => {
                    let mut inner = self.lock();
                    match inner.peers.handle_delta(version, changes) {
                        Ok(changes) => {
                            debug!(
                                peers = inner.peers.len(),
                                changed = changes.len(),
                                version,
                                "peer-map delta"
                            );
                            self.apply_peer_changes(&mut inner, changes);
                        }
                        Err(e @ DeltaError::Gap { .. }) => {
                            warn!("{e}; asking the control plane for a full map");
                            if let Some(control) = &inner.control {
                                control.sync_peers();
                            }
                        }
                        Err(e @ DeltaError::AwaitingFull { .. }) => debug!("{e}"),
                    }
                }
            }
        }
    }

    /// Resolves the relays' addresses and hands them with the token to the data plane.
    async fn apply_relays(self: Arc<Self>, relays: Vec<RelayEntry>, token: String) {
        let Ok(token) = URL_SAFE_NO_PAD.decode(token.as_bytes()) else {
            warn!("the control plane sent a relay token that is not base64");
            return;
        };
        let mut resolved = Vec::new();
        for r in relays {
            match tokio::net::lookup_host(&r.addr)
                .await
                .map(|mut a| a.find(|a| a.is_ipv4()))
            {
                Ok(Some(addr)) => resolved.push((r.name, r.addr, addr)),
                Ok(None) => warn!(relay = %r.name, "{} has no IPv4 address", r.addr),
                Err(e) => warn!(relay = %r.name, "cannot resolve {}: {e}", r.addr),
            }
        }
        if let Some(engine) = &self.lock().engine {
            engine.send(EngineCmd::SetRelays(resolved, token));
        }
    }

    async fn handle_engine_events(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<EngineEvent>,
    ) {
        while let Some(ev) = events.recv().await {
            let Some(control) = self.lock().control.clone() else {
                continue;
            };
            match ev {
                EngineEvent::Nat(nat) => {
                    self.lock().nat = Some(nat.clone());
                    control.set_endpoints(self.endpoints());
                    let _ = control.request(Request::ReportNat { nat }).await;
                }
                EngineEvent::WantPunch(peer) => {
                    tokio::spawn(async move {
                        let _ = control.request(Request::Punch { peer }).await;
                    });
                }
            }
        }
    }

    /// Direct candidates: every local address, and the public endpoint netcheck found.
    fn endpoints(&self) -> Vec<SocketAddr> {
        let mut eps = local_endpoints(self.listen_port, &self.overlay);
        if let Some(public) = self.lock().nat.as_ref().and_then(|n| n.public_endpoint) {
            if !eps.contains(&public) {
                eps.insert(0, public);
            }
        }
        eps.truncate(rally_proto::control::MAX_ENDPOINTS);
        eps
    }

    /// Notices network changes (netlink, with a slow poll as a fallback): reports new
    /// endpoints, runs netcheck again, and has every peer retry its paths.
    async fn watch_network(self: Arc<Self>) {
        let mut watch = match crate::netwatch::NetWatch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("no netlink notifications ({e}); checking addresses every 5 s");
                None
            }
        };
        let mut last = local_endpoints(self.listen_port, &self.overlay);
        loop {
            match &mut watch {
                Some(w) => {
                    let _ = tokio::time::timeout(Duration::from_secs(30), w.changed()).await;
                    // Let a burst of changes (address, then route) settle.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => tokio::time::sleep(Duration::from_secs(5)).await,
            }
            let now = local_endpoints(self.listen_port, &self.overlay);
            if now == last {
                continue;
            }
            info!(endpoints = ?now, "network changed");
            last = now;
            let (control, engine) = {
                let inner = self.lock();
                (inner.control.clone(), inner.engine.clone())
            };
            if let Some(c) = control {
                c.set_endpoints(self.endpoints());
            }
            if let Some(e) = engine {
                e.send(EngineCmd::Netcheck(None));
                e.send(EngineCmd::Reconnect(None));
            }
        }
    }

    /// Asks for a fresh relay token well before the current one expires.
    async fn renew_relay_tokens(self: Arc<Self>) {
        let every = Duration::from_secs(300);
        loop {
            tokio::time::sleep(every).await;
            let Some(control) = self.lock().control.clone() else {
                continue;
            };
            if let Ok(Response::RelayToken { token, .. }) =
                control.request(Request::RelayToken).await
            {
                let relays = self.lock().relays.clone();
                self.clone().apply_relays(relays, token).await;
            }
        }
    }

    fn remember_vip(&self, vip: Ipv4Addr) {
        let mut saved = match self.state.load_saved() {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot read agent.json: {e}");
                return;
            }
        };
        if saved.virtual_ip != Some(vip) {
            saved.virtual_ip = Some(vip);
            if let Err(e) = self.state.store_saved(&saved) {
                warn!("cannot save the virtual IP: {e}");
            }
        }
    }

    async fn refresh_parties(self: Arc<Self>) {
        let Some(control) = self.lock().control.clone() else {
            return;
        };
        if let Ok(Response::Parties { parties }) = control.request(Request::ListParties).await {
            self.lock().parties = parties;
        }
    }

    async fn serve_cli(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let daemon = self.clone();
            tokio::spawn(async move {
                let reply = match ipc::read_request(&mut stream).await {
                    Ok(IpcRequest::Events {
                        follow,
                        types,
                        peer,
                    }) => {
                        daemon.stream_events(&mut stream, follow, types, peer).await;
                        return;
                    }
                    Ok(req) => daemon.handle_request(req).await,
                    Err(e) => Err(format!("bad request: {e}")),
                };
                let _ = ipc::write_reply(&mut stream, &reply).await;
            });
        }
    }

    /// `rally events`: the history, then (following) new events as they come, one frame
    /// each, until the client hangs up.
    async fn stream_events(
        &self,
        stream: &mut tokio::net::UnixStream,
        follow: bool,
        types: Option<Vec<crate::events::EventType>>,
        peer: Option<String>,
    ) {
        let filter = EventFilter {
            types: types.map(|t| t.into_iter().collect()),
            peer: match peer {
                Some(p) => Some(self.peer_name(&p).await.unwrap_or(p)),
                None => None,
            },
        };
        let (history, sub) = {
            let mut bus = self.bus.lock().unwrap_or_else(|e| e.into_inner());
            let sub = follow.then(|| bus.subscribe(filter.clone()));
            (bus.history(&filter), sub)
        };
        let first: IpcResult = Ok(IpcReply::Events {
            events: history,
            missed: 0,
        });
        if ipc::write_frame(stream, &first).await.is_err() {
            return;
        }
        let Some(sub) = sub else {
            let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let items = self
                .bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll(sub)
                .unwrap_or_default();
            let mut events = Vec::new();
            let mut missed = 0;
            for item in items {
                match item {
                    Item::Event(e) => events.push(e),
                    Item::Lagged { missed: m } => missed += m,
                }
            }
            if events.is_empty() && missed == 0 {
                // Notice a client that went away even while nothing happens.
                if ipc::peer_gone(stream).await {
                    break;
                }
                continue;
            }
            let frame: IpcResult = Ok(IpcReply::Events { events, missed });
            if ipc::write_frame(stream, &frame).await.is_err() {
                break;
            }
        }
        self.bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unsubscribe(sub);
    }

    /// The name events carry for a peer given as name, virtual IP or id.
    async fn peer_name(&self, query: &str) -> Option<String> {
        let engine = self.lock().engine.clone()?;
        let peers = engine.peers().await;
        crate::ipc::resolve_peer(&peers, query)
            .ok()
            .map(|p| p.name.clone())
    }

    async fn peer_id(&self, query: &str) -> Result<Key32, String> {
        let engine = self
            .lock()
            .engine
            .clone()
            .ok_or("the agent has no peers yet")?;
        let peers = engine.peers().await;
        let p = crate::ipc::resolve_peer(&peers, query)?;
        p.peer_id.parse().map_err(|_| "bad peer id".to_string())
    }

    async fn handle_request(self: &Arc<Self>, req: IpcRequest) -> IpcResult {
        match req {
            IpcRequest::Status => Ok(IpcReply::Status(self.status())),
            IpcRequest::Peers => {
                let engine = self.lock().engine.clone();
                let peers = match engine {
                    Some(e) => e.peers().await,
                    None => Vec::new(),
                };
                Ok(IpcReply::Peers { peers })
            }
            IpcRequest::PartyCreate {
                name,
                max_uses,
                expires_in_secs,
            } => {
                let control = self.control()?;
                let reply = control
                    .request(Request::CreateParty {
                        name,
                        max_uses,
                        expires_in_secs,
                    })
                    .await;
                self.party_reply(reply).await
            }
            IpcRequest::PartyJoin { code } => {
                let invite = InviteCode::decode(&code).map_err(|e| e.to_string())?;
                let control = self.control_for(&invite).await?;
                let reply = control.request(Request::JoinParty { code }).await;
                self.party_reply(reply).await
            }
            IpcRequest::PartyLeave { party } => {
                let control = self.control()?;
                let reply = control.request(Request::LeaveParty { party }).await;
                self.party_reply(reply).await
            }
            IpcRequest::PartyList => {
                let control = self.control()?;
                match control.request(Request::ListParties).await {
                    Ok(Response::Parties { parties }) => {
                        self.lock().parties = parties.clone();
                        Ok(IpcReply::Parties { parties })
                    }
                    Ok(other) => Err(format!("unexpected reply {other:?}")),
                    Err(e) => Err(control_error(e)),
                }
            }
            IpcRequest::Netcheck => {
                let engine = self.lock().engine.clone();
                let Some(engine) = engine else {
                    return Err("not connected yet: the agent has no virtual IP".into());
                };
                let nat = engine.netcheck().await?;
                Ok(IpcReply::Netcheck(nat))
            }
            IpcRequest::PeerReconnect { peer } => {
                let id = self.peer_id(&peer).await?;
                let engine = self.lock().engine.clone().ok_or("no data plane")?;
                engine.send(EngineCmd::Reconnect(Some(id)));
                Ok(IpcReply::Ok)
            }
            IpcRequest::SetPrimary { peer, path } => {
                let id = self.peer_id(&peer).await?;
                let path: PathId = path.parse().map_err(|e| format!("{e}"))?;
                let engine = self.lock().engine.clone().ok_or("no data plane")?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                engine.send(EngineCmd::SetPrimary(id, path, tx));
                rx.await
                    .map_err(|_| "the data plane stopped".to_string())??;
                Ok(IpcReply::Ok)
            }
            IpcRequest::Discovery => {
                let engine = self.lock().engine.clone();
                match engine {
                    Some(e) => e
                        .discovery()
                        .await
                        .map(|d| IpcReply::Discovery(Box::new(d)))
                        .ok_or_else(|| "the data plane stopped".into()),
                    None => Err("no virtual IP yet: join or create a party first".into()),
                }
            }
            IpcRequest::Events { .. } => Err("events are streamed".into()),
            IpcRequest::Down => {
                let _ = self.stop.send(None);
                Ok(IpcReply::Ok)
            }
        }
    }

    async fn party_reply(self: &Arc<Self>, reply: Result<Response, ControlError>) -> IpcResult {
        let out = match reply.map_err(control_error)? {
            Response::PartyCreated { party, invite } => IpcReply::Party {
                party,
                invite: Some(invite),
            },
            Response::Joined { party } | Response::Left { party } => IpcReply::Party {
                party,
                invite: None,
            },
            other => return Err(format!("unexpected reply {other:?}")),
        };
        self.clone().refresh_parties().await;
        Ok(out)
    }

    fn control(&self) -> Result<ControlHandle, String> {
        self.lock().control.clone().ok_or_else(|| {
            "this agent has no control plane yet: start it with --control and --control-key, \
             or join a party with an invite code"
                .to_string()
        })
    }

    /// The control plane an invite belongs to, connecting to it first if the agent has none.
    async fn control_for(self: &Arc<Self>, invite: &InviteCode) -> Result<ControlHandle, String> {
        let target = ControlTarget {
            addr: invite.control_addr.clone(),
            key: invite.control_key,
        };
        let current = self.lock().target.clone();
        match current {
            Some(t) if t.key == target.key => {}
            Some(t) => {
                return Err(format!(
                    "this invite is for control plane {} (key {}), but this agent belongs to {} (key {}); \
                     use another --state-dir to join a second control plane",
                    target.addr,
                    target.key.short(),
                    t.addr,
                    t.key.short()
                ))
            }
            None => {
                let mut saved = self.state.load_saved().map_err(|e| e.to_string())?;
                saved.control = Some(target.clone());
                self.state.store_saved(&saved).map_err(|e| e.to_string())?;
                self.connect_control(target.clone());
            }
        }
        let mut connected = self.connected.subscribe();
        let waited = tokio::time::timeout(REGISTER_WAIT, connected.wait_for(|c| *c)).await;
        if !matches!(waited, Ok(Ok(_))) {
            let why = self
                .lock()
                .control_error
                .clone()
                .unwrap_or_else(|| "no answer".into());
            return Err(format!(
                "cannot reach the control plane at {}: {why}",
                target.addr
            ));
        }
        self.control()
    }

    fn status(&self) -> StatusReport {
        let inner = self.lock();
        StatusReport {
            name: self.cfg.name.clone(),
            peer_id: self.identity.public().to_string(),
            virtual_ip: inner.virtual_ip,
            control: ControlStatus {
                connected: *self.connected.borrow(),
                addr: inner.target.as_ref().map(|t| t.addr.clone()),
                error: inner.control_error.clone(),
            },
            nat: serde_json::to_value(&inner.nat).unwrap_or_default(),
            parties: inner.parties.clone(),
            listen_port: self.listen_port,
        }
    }
}

fn control_error(e: ControlError) -> String {
    match e {
        ControlError::Refused(reply) => reply.message,
        other => other.to_string(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

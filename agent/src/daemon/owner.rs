//! The owner: the agent's state and the one loop that changes it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rally_proto::control::{PartyInfo, RelayEntry};
use rally_proto::{DeltaError, Identity, Key32, Overlay, PeerEvent, PeerView, Request, Response};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::backlog::Backlog;
use super::network::{mapping_changed, net_changed};
use super::{Config, DaemonError};
use crate::api::{IpcRequest, IpcResult};
use crate::control::{self, ControlEvent, ControlHandle, ControlTransport, Registration};
use crate::dataplane::{Engine, EngineCmd, EngineConfig, EngineEvent, EngineHandle};
use crate::events::{Event, EventBus, EventType};
use crate::netinfo::local_endpoints;
use crate::netwatch::NetWatch;
use crate::portmap::{PortMapper, PortMappingStatus};
use crate::state::{ControlTarget, Keys, Saved, StateDir};

/// How long after a peer-map change the on-disk cache is rewritten (changes within it share
/// one write).
const PEER_CACHE_DELAY: Duration = Duration::from_secs(1);
/// How often a fresh relay token is asked for (well before the current one expires).
const RENEW_EVERY: Duration = Duration::from_secs(300);
/// How long shutdown waits for the gateway to confirm the port mapping's removal.
const PORTMAP_REMOVE_WAIT: Duration = Duration::from_secs(3);

/// A relay with its resolved addresses (UDP, and TLS/TCP if it has one).
pub(super) type ResolvedRelay = crate::node::RelayConfig;

/// What reaches the owner besides control and engine events.
pub(super) enum Msg {
    /// A CLI request and where its answer goes.
    Request(IpcRequest, oneshot::Sender<IpcResult>),
    /// The parties as the control plane listed them.
    Parties(Vec<PartyInfo>),
    /// A fresh relay token from the control plane.
    RelayToken(String),
    /// The relays' addresses, looked up, with the (decoded) token they go with.
    RelaysResolved(Vec<ResolvedRelay>, Vec<u8>),
    /// A party join gave this agent another name (its own was taken in the party).
    Renamed(String),
}

/// The connection to the control plane: the client task's handle and its events.
pub(super) struct Link {
    pub(super) handle: ControlHandle,
    pub(super) target: ControlTarget,
    events: mpsc::UnboundedReceiver<ControlEvent>,
}

/// Whether the current link is registered, published for requests that wait for it.
#[derive(Debug, Clone, Default)]
pub(super) struct LinkState {
    /// Counts links; a waiter only trusts the state of the link it started on.
    pub(super) generation: u64,
    pub(super) connected: bool,
    pub(super) error: Option<String>,
    /// What carries the control channel while connected.
    pub(super) transport: Option<ControlTransport>,
}

/// The agent's state. Only [`Owner::run`] (and what it calls) touches it.
pub(super) struct Owner {
    pub(super) cfg: Config,
    pub(super) state: StateDir,
    pub(super) identity: Arc<Identity>,
    wg_secret: [u8; 32],
    wg_public: Key32,
    pub(super) overlay: Overlay,
    /// The agent's one UDP socket (each data plane gets a handle of it when it starts).
    udp: std::net::UdpSocket,
    pub(super) listen_port: u16,
    bus: Arc<Mutex<EventBus>>,
    inbox: mpsc::Receiver<Msg>,
    /// For the tasks the owner starts to wait on the network: they answer with a [`Msg`].
    pub(super) me: mpsc::Sender<Msg>,
    pub(super) link: Option<Link>,
    pub(super) link_state: watch::Sender<LinkState>,
    pub(super) virtual_ip: Option<Ipv4Addr>,
    pub(super) engine: Option<EngineHandle>,
    engine_tx: mpsc::UnboundedSender<EngineEvent>,
    engine_rx: mpsc::UnboundedReceiver<EngineEvent>,
    pub(super) parties: Vec<PartyInfo>,
    /// The name the control plane knows this agent by: the configured one until registration
    /// or a join says otherwise (`laptop-2` when a fellow member holds `laptop`).
    pub(super) name: String,
    /// This agent's latest NAT report and the wanted punches, for the control plane.
    pub(super) backlog: Backlog,
    /// Relays as last handed out, kept to renew the token.
    pub(super) relays: Vec<RelayEntry>,
    /// The relays as last given to the data plane, for a data plane that starts later.
    pub(super) resolved: Option<(Vec<ResolvedRelay>, Vec<u8>)>,
    /// The peer map, kept in step with the control plane's full maps and deltas.
    peers: PeerView,
    /// When `peers.json` is due to be rewritten.
    peer_cache_at: Option<Instant>,
    /// The host's addresses as last reported.
    pub(super) local: Vec<SocketAddr>,
    pub(super) netwatch: Option<NetWatch>,
    /// When the current burst of network changes is looked at.
    pub(super) net_settle_at: Option<Instant>,
    /// The gateway port mapping of `listen_port` (src/portmap), running beside the owner.
    pub(super) portmap: PortMapper,
    /// The mapper's news (`None` once it has ended).
    pub(super) mapping_rx: Option<watch::Receiver<Option<PortMappingStatus>>>,
    /// The port mapping in effect, as the mapper last reported it.
    pub(super) mapping: Option<PortMappingStatus>,
    /// Set to end the loop, with the daemon's outcome.
    pub(super) stopping: Option<Result<(), DaemonError>>,
    /// `rally down` requests, answered once the daemon has stopped.
    pub(super) down: Vec<oneshot::Sender<IpcResult>>,
}

impl Owner {
    pub(super) fn new(
        cfg: Config,
        state: StateDir,
        keys: Keys,
        udp: std::net::UdpSocket,
        bus: Arc<Mutex<EventBus>>,
        inbox: mpsc::Receiver<Msg>,
        me: mpsc::Sender<Msg>,
    ) -> Owner {
        let listen_port = udp
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(cfg.listen_port);
        let overlay = Overlay::default();
        let netwatch = match NetWatch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("no netlink notifications ({e}): address changes will not be noticed");
                None
            }
        };
        let (engine_tx, engine_rx) = mpsc::unbounded_channel();
        let portmap = PortMapper::start(listen_port, rand::random());
        Owner {
            wg_public: keys.wg_public(),
            wg_secret: keys.wireguard,
            identity: Arc::new(keys.identity),
            local: local_endpoints(listen_port, &overlay),
            overlay,
            udp,
            listen_port,
            bus,
            inbox,
            me,
            link: None,
            link_state: watch::channel(LinkState::default()).0,
            virtual_ip: None,
            engine: None,
            engine_tx,
            engine_rx,
            parties: Vec::new(),
            name: cfg.name.clone(),
            backlog: Backlog::default(),
            relays: Vec::new(),
            resolved: None,
            peers: PeerView::default(),
            peer_cache_at: None,
            netwatch,
            net_settle_at: None,
            mapping_rx: Some(portmap.subscribe()),
            mapping: None,
            portmap,
            stopping: None,
            down: Vec::new(),
            state,
            cfg,
        }
    }

    /// Runs until `rally down`, SIGINT/SIGTERM or a fatal error; then stops the data plane
    /// (joining its thread) and writes what is due. Returns the outcome and the `rally down`
    /// requests still to be answered.
    pub(super) async fn run(
        mut self,
        saved: Saved,
    ) -> (Result<(), DaemonError>, Vec<oneshot::Sender<IpcResult>>) {
        info!(
            name = %self.cfg.name,
            peer_id = %self.identity.public(),
            port = self.listen_port,
            "rally agent starting"
        );
        self.start(saved);
        let mut renew = tokio::time::interval_at(Instant::now() + RENEW_EVERY, RENEW_EVERY);
        let stop_signal = shutdown_signal();
        tokio::pin!(stop_signal);
        while self.stopping.is_none() {
            tokio::select! {
                Some(msg) = self.inbox.recv() => self.handle_msg(msg),
                ev = next_event(self.link.as_mut().map(|l| &mut l.events)) => {
                    self.handle_control(ev).await;
                }
                Some(ev) = self.engine_rx.recv() => self.handle_engine(ev),
                changed = net_changed(&mut self.netwatch) => self.handle_net_change(changed),
                () = sleep_until(self.net_settle_at) => self.network_settled(),
                mapping = mapping_changed(&mut self.mapping_rx) => self.handle_port_mapping(mapping),
                () = sleep_until(self.peer_cache_at) => self.write_peer_cache(),
                _ = renew.tick() => self.renew_relay_token(),
                () = &mut stop_signal => self.stopping = Some(Ok(())),
            }
        }
        info!("rally agent stopping");
        let outcome = self.stopping.take().unwrap_or(Ok(()));
        self.portmap.shutdown(PORTMAP_REMOVE_WAIT).await;
        self.stop_engine().await;
        if self.peer_cache_at.is_some() {
            self.write_peer_cache();
        }
        (outcome, std::mem::take(&mut self.down))
    }

    /// With a known address, tunnels come up from the cached peer map before the control
    /// plane answers (or while it is down).
    fn start(&mut self, saved: Saved) {
        if let Some(vip) = saved.virtual_ip {
            if let Err(e) = self.start_engine(vip) {
                self.stopping = Some(Err(e));
                return;
            }
            match self.state.load_peers() {
                Ok(peers) if !peers.is_empty() => {
                    info!(peers = peers.len(), "restoring cached peer map");
                    let changes = self.peers.handle_cached(peers);
                    if let Some(engine) = &self.engine {
                        engine.apply_peer_changes(changes);
                    }
                }
                Ok(_) => {}
                Err(e) => warn!("ignoring the cached peer map: {e}"),
            }
        }
        match saved.control {
            Some(target) => self.connect_control(target),
            None => info!("no control plane yet: join a party with `rally party join CODE`"),
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Request(req, reply) => self.handle_request(req, reply),
            Msg::Parties(parties) => self.parties = parties,
            Msg::Renamed(name) => self.set_name(name),
            Msg::RelayToken(token) => self.resolve_relays(self.relays.clone(), token),
            Msg::RelaysResolved(relays, token) => {
                if let Some(engine) = &self.engine {
                    engine.send(EngineCmd::SetRelays(relays.clone(), token.clone()));
                }
                self.resolved = Some((relays, token));
            }
        }
    }

    async fn handle_control(&mut self, ev: ControlEvent) {
        match ev {
            ControlEvent::Registered {
                virtual_ip,
                transport,
                name,
                ..
            } => {
                self.set_name(name);
                if let Err(e) = self.apply_virtual_ip(virtual_ip).await {
                    self.stopping = Some(Err(e));
                    return;
                }
                let before = self.link_state.borrow().transport;
                self.publish_transport(before, transport);
                if let Some(engine) = &self.engine {
                    engine.send(EngineCmd::UdpHint(transport == ControlTransport::Tcp));
                }
                self.link_state.send_modify(|s| {
                    s.connected = true;
                    s.error = None;
                    s.transport = Some(transport);
                });
                self.on_registered();
            }
            ControlEvent::Disconnected { reason } => self.link_state.send_modify(|s| {
                s.connected = false;
                s.error = Some(reason);
                s.transport = None;
            }),
            ControlEvent::Relays { relays, token } => {
                self.relays = relays.clone();
                self.resolve_relays(relays, token);
            }
            ControlEvent::Punch {
                peer,
                candidates,
                start_in_ms,
            } => {
                if let Some(engine) = &self.engine {
                    engine.send(EngineCmd::Punch {
                        peer,
                        candidates,
                        start_in: Duration::from_millis(u64::from(start_in_ms)),
                    });
                }
            }
            ControlEvent::PeerMap { version, peers } => {
                let changes = self.peers.handle_full(version, peers);
                info!(
                    peers = self.peers.len(),
                    changed = changes.len(),
                    version,
                    "peer map from the control plane"
                );
                self.apply_peer_changes(changes);
            }
            ControlEvent::PeerDelta { version, changes } => {
                match self.peers.handle_delta(version, changes) {
                    Ok(changes) => {
                        debug!(
                            peers = self.peers.len(),
                            changed = changes.len(),
                            version,
                            "peer-map delta"
                        );
                        self.apply_peer_changes(changes);
                    }
                    Err(e @ DeltaError::Gap { .. }) => {
                        warn!("{e}; asking the control plane for a full map");
                        if let Some(link) = &self.link {
                            link.handle.sync_peers();
                        }
                    }
                    Err(e @ DeltaError::AwaitingFull { .. }) => debug!("{e}"),
                }
            }
        }
    }

    /// What the control plane missed while it was away: endpoints, this agent's NAT report,
    /// the punches the data plane asked for; and the parties, fresh.
    fn on_registered(&mut self) {
        let Some(link) = &self.link else { return };
        link.handle.set_endpoints(self.endpoints());
        for req in self.backlog.on_registered() {
            self.tell_control(req);
        }
        self.refresh_parties();
    }

    /// The data plane's news; kept in the backlog while the control plane is away.
    fn handle_engine(&mut self, ev: EngineEvent) {
        let connected = self.link_state.borrow().connected;
        let nat = matches!(ev, EngineEvent::Nat(_));
        let requests = self.backlog.handle_engine_event(ev, connected);
        if nat && connected {
            if let Some(link) = &self.link {
                link.handle.set_endpoints(self.endpoints());
            }
        }
        for req in requests {
            self.tell_control(req);
        }
    }

    /// Sends a request whose answer nobody waits for.
    pub(super) fn tell_control(&self, req: Request) {
        let Some(link) = &self.link else { return };
        let handle = link.handle.clone();
        tokio::spawn(async move {
            if let Err(e) = handle.request(req).await {
                debug!("control plane request: {e}");
            }
        });
    }

    /// Asks the control plane for the parties; the answer comes back as [`Msg::Parties`].
    pub(super) fn refresh_parties(&self) {
        let Some(link) = &self.link else { return };
        let handle = link.handle.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            if let Ok(Response::Parties { parties }) = handle.request(Request::ListParties).await {
                let _ = me.send(Msg::Parties(parties)).await;
            }
        });
    }

    /// Starts the data plane with the registered address, or restarts it when the address
    /// differs from the one it runs with (a saved address the control plane no longer
    /// gives), and remembers the address.
    async fn apply_virtual_ip(&mut self, vip: Ipv4Addr) -> Result<(), DaemonError> {
        match self.virtual_ip {
            Some(old) if old == vip => {}
            Some(old) => {
                info!(%old, new = %vip, "the control plane gave another virtual IP; restarting the data plane with it");
                self.stop_engine().await;
                self.start_engine(vip)?;
            }
            None => self.start_engine(vip)?,
        }
        self.remember_vip(vip);
        Ok(())
    }

    fn start_engine(&mut self, vip: Ipv4Addr) -> Result<(), DaemonError> {
        let udp = self.udp.try_clone().map_err(|source| DaemonError::Udp {
            port: self.listen_port,
            source,
        })?;
        let config = EngineConfig {
            udp,
            wg_secret: self.wg_secret,
            identity: self.identity.clone(),
            tun_name: self.cfg.tun_name.clone(),
            virtual_ip: vip,
            prefix: self.overlay.prefix,
            local_ips: self.local.iter().map(|e| e.ip()).collect(),
            profile: self.cfg.profile.clone(),
            bus: self.bus.clone(),
            discovery: self.cfg.discovery.clone(),
            proxy: self.cfg.proxy.clone(),
        };
        let engine =
            Engine::start(config, self.engine_tx.clone()).map_err(|e| DaemonError::Tun {
                name: self.cfg.tun_name.clone(),
                reason: e.to_string(),
            })?;
        // Peers and relays learned before this data plane existed.
        engine.apply_peer_changes(
            self.peers
                .shared_peers()
                .cloned()
                .map(PeerEvent::Added)
                .collect(),
        );
        if let Some(transport) = self.link_state.borrow().transport {
            engine.send(EngineCmd::UdpHint(transport == ControlTransport::Tcp));
        }
        if let Some((relays, token)) = &self.resolved {
            engine.send(EngineCmd::SetRelays(relays.clone(), token.clone()));
        }
        self.engine = Some(engine);
        self.virtual_ip = Some(vip);
        Ok(())
    }

    /// Stops the data plane and waits for its thread: its TUN device is gone on return.
    async fn stop_engine(&mut self) {
        let Some(engine) = self.engine.take() else {
            return;
        };
        self.virtual_ip = None;
        if let Err(e) = tokio::task::spawn_blocking(move || engine.stop()).await {
            warn!("the data plane did not stop cleanly: {e}");
        }
    }

    /// A `transport_change` event when the control channel comes up over TLS/TCP, or moves
    /// between it and QUIC.
    /// Takes the name the control plane gave this agent.
    fn set_name(&mut self, name: String) {
        if let Err(e) = rally_proto::control::validate_name(&name) {
            warn!("ignoring the name the control plane gave this agent: {e}");
            return;
        }
        if name != self.name {
            warn!(asked = %self.cfg.name, now = %name, "the control plane knows this agent by another name: its own is taken in a party");
            self.name = name;
        }
    }

    fn publish_transport(&self, before: Option<ControlTransport>, now: ControlTransport) {
        let message = match (before, now) {
            (Some(b), n) if b == n => return,
            (None, ControlTransport::Quic) => return,
            (_, ControlTransport::Tcp) => "control plane over TLS/TCP: UDP seems blocked",
            (_, ControlTransport::Quic) => "control plane back on QUIC: UDP works again",
        };
        info!(transport = now.as_str(), "{message}");
        let event = Event::new(
            crate::dataplane::timers::unix_ms(),
            EventType::TransportChange,
            message,
        );
        if let Ok(mut bus) = self.bus.lock() {
            bus.publish(event);
        }
    }

    pub(super) fn connect_control(&mut self, target: ControlTarget) {
        let reg = Registration {
            identity: self.identity.clone(),
            wg_key: self.wg_public,
            name: self.cfg.name.clone(),
            endpoints: self.endpoints(),
            proxy: self.cfg.proxy.clone(),
        };
        info!(control = %target.addr, "connecting to the control plane");
        let (tx, events) = mpsc::unbounded_channel();
        let handle = control::spawn(target.clone(), reg, tx);
        // The old link's task ends with its last handle; its events are no longer read.
        self.link = Some(Link {
            handle,
            target,
            events,
        });
        self.link_state.send_modify(|s| {
            s.generation += 1;
            s.connected = false;
            s.error = None;
        });
    }

    /// Hands peer-map changes to the data plane (if it runs yet; it is seeded from the view
    /// when it starts) and schedules a rewrite of the cache.
    fn apply_peer_changes(&mut self, changes: Vec<PeerEvent>) {
        if changes.is_empty() {
            return;
        }
        if let Some(engine) = &self.engine {
            engine.apply_peer_changes(changes);
        }
        self.peer_cache_at
            .get_or_insert_with(|| Instant::now() + PEER_CACHE_DELAY);
    }

    /// Writes the peer map to `peers.json`.
    fn write_peer_cache(&mut self) {
        self.peer_cache_at = None;
        let peers: Vec<_> = self.peers.peers().cloned().collect();
        if let Err(e) = self.state.store_peers(&peers) {
            warn!("cannot cache the peer map: {e}");
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
}

/// The next event of a channel that may be missing or closed (then: never).
async fn next_event<T>(rx: Option<&mut mpsc::UnboundedReceiver<T>>) -> T {
    if let Some(rx) = rx {
        if let Some(ev) = rx.recv().await {
            return ev;
        }
    }
    std::future::pending().await
}

/// Sleeps until `at` (forever if `None`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

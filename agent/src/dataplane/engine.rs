//! The data-plane task: moves packets between the TUN device and the UDP socket through each
//! peer's WireGuard tunnel, over a direct path when one is proven and through a relay otherwise.
//!
//! Peers are found by virtual IP (outbound), by the receiver index in WireGuard replies and data
//! (inbound), by the decrypted static key in handshake initiations, and by short id in relayed
//! datagrams and probes. A packet from the tunnel is delivered only if its inner source is the
//! peer's own virtual IP (cryptokey routing), and a handshake from a key that is not in the peer
//! map is dropped: the control plane decides who may talk to whom.
//!
//! WireGuard output is written at offset [`DATA_HEADER_LEN`] of the send buffer, so sending it
//! through a relay only adds the relay header in front: no copy, no allocation.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::x25519::{PublicKey, StaticSecret};
use rally_proto::control::NatReport;
use rally_proto::probe::{peek_from, probe_key, Probe, ProbeKind};
use rally_proto::relay::{short_id, write_send_header, RelayMsg, ShortId, DATA_HEADER_LEN};
use rally_proto::stun::BindingResponse;
use rally_proto::{Identity, Key32, PeerEvent, PeerInfo};
use rally_udp::grow_socket_buffers;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use super::batch::{GsoBatch, TunBatch};
use super::demux::{classify, receiver_index, Datagram, WgKind};
use super::handshake_guard::{HandshakeGuard, Source, Verdict};
use super::inbound::InboundFilter;
use super::restart::RestartHints;
use super::tunnel::{initiator_key, Output, Tunnel, TunnelError};
use crate::conn::{Command, Connection, PathId, PathMetrics, Profile};
use crate::events::{Event, EventBus, EventType};
use crate::netcheck::{Netcheck, StunServer};
use crate::paths::{PathEvent, PeerPaths, Via};
use crate::relay_client::{RelayClient, RelayEvent};

/// How often timers are looked at.
const TICK: Duration = Duration::from_millis(50);
/// How often WireGuard's own timers run.
const WG_TIMERS: Duration = Duration::from_millis(250);
/// Keepalive towards every peer, which also keeps NAT mappings open.
const KEEPALIVE_SECS: u16 = 25;
const BUF_LEN: usize = 65_536 + 64;
/// Receive buffers per UDP read (each takes one datagram, or one GRO train of them).
const RX_BUFS: usize = 8;
/// UDP reads per wake-up before the TUN side gets its turn.
const RX_ROUNDS: usize = 8;
/// Socket buffer wanted in each direction: GSO sends and GRO receives move up to 64 datagrams
/// at a time, which overflows the kernel's ~200 KiB default under load.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Commands from the daemon.
pub enum EngineCmd {
    /// Changes to the peer map (from [`rally_proto::PeerView`]); each costs O(log n) or less.
    PeerChanges(Vec<PeerEvent>),
    /// The relays (name, `host:port`, resolved address) and this agent's token.
    SetRelays(Vec<(String, String, SocketAddr)>, Vec<u8>),
    Punch {
        peer: Key32,
        candidates: Vec<SocketAddr>,
        start_in: Duration,
    },
    Netcheck(Option<oneshot::Sender<Result<NatReport, String>>>),
    Peers(oneshot::Sender<Vec<PeerStatus>>),
    /// Retry every path of a peer now (`rally peer reconnect`); all peers if `None`.
    Reconnect(Option<Key32>),
    /// Pin a path (`rally path set-primary`).
    SetPrimary(Key32, PathId, oneshot::Sender<Result<(), String>>),
    Shutdown,
}

/// What the engine tells the daemon.
#[derive(Debug)]
pub enum EngineEvent {
    Nat(NatReport),
    WantPunch(Key32),
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<EngineCmd>,
}

impl EngineHandle {
    pub fn send(&self, cmd: EngineCmd) {
        let _ = self.tx.send(cmd);
    }

    pub fn apply_peer_changes(&self, changes: Vec<PeerEvent>) {
        if !changes.is_empty() {
            self.send(EngineCmd::PeerChanges(changes));
        }
    }

    pub async fn peers(&self) -> Vec<PeerStatus> {
        let (tx, rx) = oneshot::channel();
        self.send(EngineCmd::Peers(tx));
        rx.await.unwrap_or_default()
    }

    pub async fn netcheck(&self) -> Result<NatReport, String> {
        let (tx, rx) = oneshot::channel();
        self.send(EngineCmd::Netcheck(Some(tx)));
        rx.await.map_err(|_| "the data plane stopped".to_string())?
    }

    pub fn shutdown(&self) {
        self.send(EngineCmd::Shutdown);
    }
}

/// One row of `rally peers`: the metrics fields of DESIGN.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub peer_id: String,
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    pub strategy: String,
    pub relay: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub state: String,
    pub latency_ms: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub uptime_seconds: u64,
    pub is_primary: bool,
    pub priority: u32,
    /// Unix seconds.
    pub connected_at: Option<u64>,
    pub parties: Vec<String>,
    pub candidates: Vec<SocketAddr>,
    /// Unix milliseconds when the direct path was proven (absent while relayed).
    pub direct_since_ms: Option<u64>,
    pub failovers: u64,
    pub relay_switches: u64,
    pub queued: usize,
    pub queue_dropped: u64,
    /// Every path with its health, latency and rank.
    pub paths: Vec<PathMetrics>,
}

/// Packets dropped, by reason.
#[derive(Debug, Default, Clone, Copy)]
struct Drops {
    unknown_datagram: u64,
    stray_stun: u64,
    unknown_index: u64,
    unknown_peer_key: u64,
    unknown_short_id: u64,
    bad_probe: u64,
    relay_foreign: u64,
    wireguard: u64,
    spoofed_source: u64,
    no_route: u64,
}

/// Where to send a peer's traffic.
#[derive(Clone, Copy)]
enum Route {
    Direct(SocketAddr),
    Relay(usize),
}

struct Peer {
    /// Shared with the daemon's peer view (never copied).
    info: Arc<PeerInfo>,
    short: ShortId,
    tunnel: Tunnel,
    index: u32,
    paths: PeerPaths,
    conn: Connection,
    /// The direct address the connection manager knows (one at a time).
    direct: Option<SocketAddr>,
    connected_at: Option<SystemTime>,
    direct_since: Option<SystemTime>,
}

pub struct Engine {
    udp: UdpSocket,
    udp_state: quinn_udp::UdpSocketState,
    tun: tun_rs::AsyncDevice,
    /// Encrypted datagrams waiting for one GSO send.
    gso: GsoBatch,
    /// Decrypted packets waiting for one TUN write.
    tun_tx: TunBatch,
    gro: tun_rs::GROTable,
    secret: StaticSecret,
    public: PublicKey,
    me: ShortId,
    identity: Arc<Identity>,
    local_port: u16,
    local_ips: Vec<IpAddr>,
    /// Boxed: a `Peer` is ~1.5 KiB (its WireGuard state, ~11 KiB, is boxed apart and created on
    /// first use), and a hash table keeps up to twice as many slots as entries.
    peers: HashMap<Key32, Box<Peer>>,
    by_vip: HashMap<Ipv4Addr, Key32>,
    by_index: HashMap<u32, Key32>,
    by_wg: HashMap<Key32, Key32>,
    by_short: HashMap<ShortId, Key32>,
    relays: Vec<RelayClient>,
    relay_hosts: Vec<String>,
    relay_by_addr: HashMap<SocketAddr, usize>,
    netcheck: Option<Netcheck>,
    netcheck_waiters: Vec<oneshot::Sender<Result<NatReport, String>>>,
    nat: Option<NatReport>,
    events: mpsc::UnboundedSender<EngineEvent>,
    bus: Arc<Mutex<EventBus>>,
    profile: Profile,
    next_index: u32,
    last_wg_timers: tokio::time::Instant,
    drops: Drops,
    /// Peers touched by packets since the last flush (see [`Self::touch`]).
    dirty: Vec<Key32>,
    /// The next flush drains every peer (after timers, commands and relay bindings).
    flush_all: bool,
    /// mac1, cookies and budgets before any handshake's Diffie-Hellman.
    guard: HandshakeGuard,
    /// Decrypted packets go to the TUN device only if addressed to us.
    inbound: InboundFilter,
    /// Handshakes started when a peer's data shows it kept a session we lost.
    restart: RestartHints,
}

/// What the engine needs to start.
pub struct EngineConfig {
    /// The agent's socket; the engine registers it with its own runtime.
    pub udp: std::net::UdpSocket,
    pub wg_secret: [u8; 32],
    pub identity: Arc<Identity>,
    pub tun_name: String,
    pub virtual_ip: Ipv4Addr,
    pub prefix: u8,
    pub local_ips: Vec<IpAddr>,
    pub profile: Profile,
    pub bus: Arc<Mutex<EventBus>>,
}

impl Engine {
    /// Brings up the TUN device and starts the data plane on a thread of its own, with a
    /// single-threaded runtime that owns the socket, the TUN device and their readiness: a
    /// packet wakes exactly this thread, and no other task of the daemon runs between it and
    /// its send.
    pub fn start(
        cfg: EngineConfig,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> std::io::Result<EngineHandle> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("rally-dataplane".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match Engine::build(cfg, events) {
                        Ok(engine) => {
                            let _ = ready_tx.send(Ok(()));
                            engine.run(rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(EngineHandle { tx }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other(
                "the data-plane thread stopped while starting",
            )),
        }
    }

    /// Creates the TUN device and registers both with the current (the data plane's) runtime.
    fn build(
        cfg: EngineConfig,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> std::io::Result<Engine> {
        let udp = UdpSocket::from_std(cfg.udp)?;
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(&cfg.tun_name)
                .ipv4(cfg.virtual_ip, cfg.prefix, None)
                .mtu(1420)
                .offload(offload)
                .build_async()
        };
        // Offload (TSO/GRO on the TUN device) lets one read or write carry up to 64 KiB.
        let (tun, offload) = match build(true) {
            Ok(t) => (t, true),
            Err(e) => {
                warn!("TUN offload unavailable ({e}); one packet per read and write");
                (build(false)?, false)
            }
        };
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into())?;
        // The engine reads neither the ECN bits nor the destination address of what it
        // receives: two control messages per datagram (or GRO train) it need not pay for.
        rally_udp::skip_receive_metadata(&udp);
        let (rcvbuf, sndbuf) = grow_socket_buffers(&udp, SOCKET_BUFFER);
        info!(
            tun = %cfg.tun_name,
            virtual_ip = %cfg.virtual_ip,
            offload,
            udp_gso_segments = udp_state.max_gso_segments(),
            udp_gro_segments = udp_state.gro_segments(),
            rcvbuf,
            sndbuf,
            "TUN device up"
        );
        let secret = StaticSecret::from(cfg.wg_secret);
        let public = PublicKey::from(&secret);
        let local_port = udp.local_addr().map(|a| a.port()).unwrap_or(0);
        let engine = Engine {
            gso: GsoBatch::new(udp_state.max_gso_segments()),
            tun_tx: TunBatch::new(tun_rs::IDEAL_BATCH_SIZE, tun_rs::VIRTIO_NET_HDR_LEN),
            gro: tun_rs::GROTable::default(),
            udp_state,
            udp,
            tun,
            secret,
            public,
            me: short_id(&cfg.identity.public()),
            identity: cfg.identity,
            local_port,
            local_ips: cfg.local_ips,
            peers: HashMap::new(),
            by_vip: HashMap::new(),
            by_index: HashMap::new(),
            by_wg: HashMap::new(),
            by_short: HashMap::new(),
            relays: Vec::new(),
            relay_hosts: Vec::new(),
            relay_by_addr: HashMap::new(),
            netcheck: None,
            netcheck_waiters: Vec::new(),
            nat: None,
            events,
            bus: cfg.bus,
            profile: cfg.profile,
            next_index: rand::thread_rng().next_u32() & 0x00ff_ffff,
            last_wg_timers: tokio::time::Instant::now(),
            drops: Drops::default(),
            dirty: Vec::new(),
            flush_all: false,
            guard: HandshakeGuard::new(&public, rand::random(), now()),
            inbound: InboundFilter::new(cfg.virtual_ip),
            restart: RestartHints::new(now()),
        };
        Ok(engine)
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<EngineCmd>) {
        let mut rx: [Vec<u8>; RX_BUFS] = std::array::from_fn(|_| vec![0u8; BUF_LEN]);
        let mut meta = vec![quinn_udp::RecvMeta::default(); RX_BUFS];
        let mut tun_raw = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
        let mut tun_bufs = vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE];
        let mut tun_sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
        let mut out = vec![0u8; BUF_LEN + DATA_HEADER_LEN + 64];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.udp.readable() => match r {
                    Ok(()) => self.receive_udp(&mut rx, &mut meta, &mut out).await,
                    Err(e) => debug!("udp receive: {e}"),
                },
                r = self.tun.recv_multiple(&mut tun_raw, &mut tun_bufs, &mut tun_sizes, 0) => match r {
                    Ok(n) => {
                        for (buf, size) in tun_bufs.iter().zip(&tun_sizes).take(n) {
                            self.handle_tun_packet(&buf[..*size], &mut out).await;
                        }
                        flush_gso(&self.udp, &self.udp_state, &mut self.gso).await;
                    }
                    Err(e) => debug!("tun receive: {e}"),
                },
                _ = tick.tick() => {
                    self.handle_timers(&mut out).await;
                    self.flush_all = true;
                }
                cmd = cmds.recv() => match cmd {
                    Some(EngineCmd::Shutdown) | None => break,
                    Some(cmd) => {
                        self.handle_cmd(cmd);
                        self.flush_all = true;
                    }
                },
            }
            self.flush(&mut out).await;
        }
        debug!(drops = ?self.drops, "data plane stopped");
    }

    /// One command from the daemon (all but `Shutdown`, which ends [`Self::run`]).
    fn handle_cmd(&mut self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::PeerChanges(changes) => self.apply_peer_changes(changes),
            EngineCmd::SetRelays(relays, token) => self.set_relays(relays, token),
            EngineCmd::Punch {
                peer,
                candidates,
                start_in,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.paths.set_candidates(&candidates);
                    p.paths.start_punch(now() + start_in);
                }
            }
            EngineCmd::Netcheck(reply) => self.start_netcheck(reply),
            EngineCmd::Peers(reply) => {
                let _ = reply.send(self.status());
            }
            EngineCmd::Reconnect(peer) => {
                let t = now();
                for (id, p) in self.peers.iter_mut() {
                    if peer.is_none_or(|want| want == *id) {
                        p.conn.resume(t);
                        p.paths.start_punch(t);
                    }
                }
            }
            EngineCmd::SetPrimary(peer, path, reply) => {
                let r = match self.peers.get_mut(&peer) {
                    Some(p) => p.conn.set_primary(&path).map_err(|e| e.to_string()),
                    None => Err("no such peer".into()),
                };
                let _ = reply.send(r);
            }
            EngineCmd::Shutdown => {}
        }
    }

    fn apply_peer_changes(&mut self, changes: Vec<PeerEvent>) {
        let t = now();
        for change in changes {
            match change {
                PeerEvent::Added(info) | PeerEvent::Updated(info) => self.upsert_peer(info, t),
                PeerEvent::Removed(info) => self.remove_peer(&info.peer_id),
            }
        }
    }

    fn remove_peer(&mut self, id: &Key32) {
        if let Some(mut p) = self.peers.remove(id) {
            p.conn.close();
            info!(peer = %p.info.name, "peer removed");
            self.by_vip.remove(&p.info.virtual_ip);
            self.by_index.remove(&p.index);
            self.by_wg.remove(&p.info.wg_key);
            self.by_short.remove(&p.short);
        }
    }

    /// Adds a peer, or brings an existing one up to date; a new WireGuard key starts afresh.
    fn upsert_peer(&mut self, info: Arc<PeerInfo>, t: std::time::Instant) {
        let id = info.peer_id;
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.info.wg_key != info.wg_key)
        {
            self.remove_peer(&id);
        }
        let my_mapping = self.nat.as_ref().map(|n| n.mapping).unwrap_or_default();
        let hopeless = my_mapping.is_endpoint_dependent()
            && info
                .nat
                .as_ref()
                .is_some_and(|n| n.mapping.is_endpoint_dependent());
        if let Some(p) = self.peers.get_mut(&id) {
            if p.info.virtual_ip != info.virtual_ip {
                self.by_vip.remove(&p.info.virtual_ip);
                self.by_vip.insert(info.virtual_ip, id);
            }
            if p.info.endpoints != info.endpoints {
                // A new endpoint from the control plane: retry this peer's paths.
                p.conn.resume(t);
            }
            p.paths.set_candidates(&info.endpoints);
            p.paths.set_hopeless(hopeless);
            if !p.paths.is_punching() && p.paths.direct().is_none() {
                p.paths.start_punch(t);
            }
            p.info = info;
            return;
        }
        let index = self.allocate_index();
        let peer_public = PublicKey::from(info.wg_key.0);
        let shared = self.secret.diffie_hellman(&peer_public);
        let mut paths = PeerPaths::new(
            self.me,
            probe_key(shared.as_bytes()),
            info.endpoints.clone(),
            rand::thread_rng().next_u64(),
        );
        paths.set_hopeless(hopeless);
        paths.start_punch(t);
        let tunnel = Tunnel::new(
            self.secret.clone(),
            peer_public,
            Some(KEEPALIVE_SECS),
            index,
        );
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        let mut conn = Connection::new(self.profile.clone(), t, seed);
        for r in self.relays.iter().filter(|r| r.is_bound()) {
            conn.add_path(PathId::Relay(r.name.clone()), t);
        }
        info!(peer = %info.name, vip = %info.virtual_ip, endpoints = ?info.endpoints, hopeless, "peer added");
        let short = short_id(&id);
        self.by_vip.insert(info.virtual_ip, id);
        self.by_index.insert(index, id);
        self.by_wg.insert(info.wg_key, id);
        self.by_short.insert(short, id);
        let _ = self.events.send(EngineEvent::WantPunch(id));
        self.peers.insert(
            id,
            Box::new(Peer {
                info,
                short,
                tunnel,
                index,
                paths,
                conn,
                direct: None,
                connected_at: None,
                direct_since: None,
            }),
        );
    }

    fn set_relays(&mut self, relays: Vec<(String, String, SocketAddr)>, token: Vec<u8>) {
        let t = now();
        let same = relays.len() == self.relays.len()
            && relays
                .iter()
                .zip(&self.relays)
                .all(|((n, _, a), r)| *n == r.name && *a == r.addr);
        if !same {
            info!(relays = ?relays.iter().map(|r| &r.0).collect::<Vec<_>>(), "relays");
            for r in &self.relays {
                let path = PathId::Relay(r.name.clone());
                for p in self.peers.values_mut() {
                    p.conn.remove_path(&path, t);
                }
            }
            self.relays = relays
                .iter()
                .map(|(name, _, addr)| {
                    RelayClient::new(name.clone(), *addr, self.identity.clone(), t)
                })
                .collect();
            self.relay_hosts = relays.iter().map(|r| r.1.clone()).collect();
            self.relay_by_addr = relays.iter().enumerate().map(|(i, r)| (r.2, i)).collect();
            self.start_netcheck(None);
        }
        for r in &mut self.relays {
            r.set_token(token.clone(), t);
        }
    }

    fn start_netcheck(&mut self, reply: Option<oneshot::Sender<Result<NatReport, String>>>) {
        if self.relays.is_empty() {
            if let Some(r) = reply {
                let _ = r.send(Err(
                    "no relays known yet: the control plane hands them out after registration"
                        .into(),
                ));
            }
            return;
        }
        self.netcheck_waiters.extend(reply);
        if self.netcheck.is_some() {
            return;
        }
        let servers = self
            .relays
            .iter()
            .zip(&self.relay_hosts)
            .map(|(r, host)| StunServer {
                name: r.name.clone(),
                host: host.clone(),
                addr: r.addr,
            })
            .collect();
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        self.netcheck = Some(Netcheck::new(
            servers,
            self.local_port,
            self.local_ips.clone(),
            seed,
            now(),
        ));
    }

    fn allocate_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }

    /// Reads what the UDP socket holds (a few rounds of up to [`RX_BUFS`] datagrams or GRO
    /// trains each), handles every datagram, then writes the decrypted packets to the TUN
    /// device in one batch.
    async fn receive_udp(
        &mut self,
        rx: &mut [Vec<u8>; RX_BUFS],
        meta: &mut [quinn_udp::RecvMeta],
        out: &mut [u8],
    ) {
        for _ in 0..RX_ROUNDS {
            let (n, drained) = {
                let mut iovs = rx.each_mut().map(|b| std::io::IoSliceMut::new(b));
                match rally_udp::recv_batch(&self.udp, &self.udp_state, &mut iovs, meta) {
                    Ok(got) => (got.count, got.drained),
                    Err(e) => {
                        debug!("udp receive: {e}");
                        (0, true)
                    }
                }
            };
            for (buf, m) in rx.iter().zip(meta.iter()).take(n) {
                let stride = if m.stride == 0 { m.len } else { m.stride };
                for d in buf[..m.len].chunks(stride.max(1)) {
                    self.handle_datagram(m.addr, d, out).await;
                }
            }
            // Deliver this round before reading the next: a lone packet reaches the TUN device
            // one system call sooner, and under load nothing waits behind later rounds.
            flush_tun(&self.tun, &mut self.tun_tx, &mut self.gro).await;
            if drained {
                break;
            }
        }
    }

    async fn handle_datagram(&mut self, from: SocketAddr, d: &[u8], out: &mut [u8]) {
        match classify(d) {
            Datagram::Stun => {
                let handled = match (&mut self.netcheck, BindingResponse::decode(d)) {
                    (Some(n), Ok(resp)) => n.handle_response(resp, now()),
                    _ => false,
                };
                if !handled {
                    self.drops.stray_stun += 1;
                }
            }
            Datagram::Relay => {
                let Some(&i) = self.relay_by_addr.get(&from) else {
                    self.drops.relay_foreign += 1;
                    return;
                };
                match RelayMsg::decode(d) {
                    Ok(RelayMsg::Deliver { from: sid, payload }) => {
                        self.handle_payload(Via::Relay(i), sid, payload, out).await;
                    }
                    Ok(msg) => self.relays[i].handle_msg(&msg, now()),
                    Err(_) => self.drops.unknown_datagram += 1,
                }
            }
            Datagram::Probe => match peek_from(d) {
                Ok(sid) => self.handle_payload(Via::Direct(from), sid, d, out).await,
                Err(_) => self.drops.bad_probe += 1,
            },
            Datagram::WireGuard(kind) => {
                if !self
                    .guard_admits(Source::Addr(from), Via::Direct(from), d, out)
                    .await
                {
                    return;
                }
                let Some(id) = self.wg_peer(kind, d) else {
                    if kind == WgKind::Data {
                        self.rehandshake(None, Via::Direct(from), out).await;
                    }
                    return;
                };
                self.handle_wireguard(id, Via::Direct(from), d, out).await;
            }
            Datagram::Unknown => self.drops.unknown_datagram += 1,
        }
    }

    /// The connection manager's name for a path.
    fn path_id(&self, via: Via) -> Option<PathId> {
        match via {
            Via::Direct(a) => Some(PathId::Direct(a)),
            Via::Relay(i) => self.relays.get(i).map(|r| PathId::Relay(r.name.clone())),
        }
    }

    /// A probe or WireGuard datagram from peer `sid`, received via `via`.
    async fn handle_payload(&mut self, via: Via, sid: ShortId, d: &[u8], out: &mut [u8]) {
        let Some(&id) = self.by_short.get(&sid) else {
            self.drops.unknown_short_id += 1;
            return;
        };
        self.touch(id);
        match classify(d) {
            Datagram::Probe => {
                let path = self.path_id(via);
                let Some(peer) = self.peers.get_mut(&id) else {
                    return;
                };
                let key = peer.paths.key();
                let t = now();
                match Probe::decode(d, &key) {
                    Ok(p) => {
                        let mine = p.kind == ProbeKind::Ack
                            && path
                                .as_ref()
                                .is_some_and(|path| peer.conn.handle_probe_ack(path, p.txid, t));
                        if !mine {
                            peer.paths.handle_probe(via, p, t);
                        }
                    }
                    Err(_) => self.drops.bad_probe += 1,
                }
            }
            Datagram::WireGuard(kind) => {
                // The relay vouches for the sender's id; WireGuard still authenticates the bytes.
                if !self.guard_admits(Source::Relayed(sid), via, d, out).await {
                    return;
                }
                match self.wg_peer(kind, d) {
                    Some(x) if x == id => self.handle_wireguard(id, via, d, out).await,
                    None if kind == WgKind::Data => self.rehandshake(Some(id), via, out).await,
                    _ => {}
                }
            }
            _ => self.drops.unknown_datagram += 1,
        }
    }

    /// The handshake guard's verdict on a WireGuard datagram; a cookie reply is sent back on
    /// the way it came.
    async fn guard_admits(&mut self, source: Source, via: Via, d: &[u8], out: &mut [u8]) -> bool {
        match self
            .guard
            .check(source, d, now(), &mut out[DATA_HEADER_LEN..])
        {
            Verdict::Pass => true,
            Verdict::CookieReply(reply) => {
                let n = reply.len();
                if let Via::Direct(to) = via {
                    send(&self.udp, &out[DATA_HEADER_LEN..DATA_HEADER_LEN + n], to).await;
                }
                false
            }
            Verdict::Drop(why) => {
                trace!(?source, ?why, "handshake dropped");
                false
            }
        }
    }

    /// Data for a session we do not have, on a path a peer is known by (`known`: the relay
    /// vouched for it): that peer kept a session we lost, so handshake at once on that path
    /// (see [`RestartHints`]).
    async fn rehandshake(&mut self, known: Option<Key32>, via: Via, out: &mut [u8]) {
        let t = now();
        let id = match (known, via) {
            (Some(id), _) => id,
            (None, Via::Direct(from)) => {
                let peers = self
                    .peers
                    .iter()
                    .map(|(id, p)| (id, p.direct, p.paths.candidates()));
                let Some(id) = self.restart.peer_at(from, peers, t) else {
                    return;
                };
                id
            }
            (None, Via::Relay(_)) => return,
        };
        if !self.restart.may_handshake(id, t) {
            return;
        }
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Ok(Output::Network(b)) = peer.tunnel.handshake(&mut out[DATA_HEADER_LEN..], true)
        else {
            return;
        };
        let n = b.len();
        info!(peer = %peer.info.name, "data for a session we do not have: handshaking again");
        let short = peer.short;
        self.send_framed(Route::from_via(via), short, &mut out[..DATA_HEADER_LEN + n])
            .await;
    }

    fn wg_peer(&mut self, kind: WgKind, d: &[u8]) -> Option<Key32> {
        if kind == WgKind::Initiation {
            let Some(key) = initiator_key(&self.secret, &self.public, d) else {
                self.drops.wireguard += 1;
                return None;
            };
            let id = self.by_wg.get(&Key32(key)).copied();
            if id.is_none() {
                self.drops.unknown_peer_key += 1;
                debug!("handshake from a key outside our parties; dropped");
            }
            return id;
        }
        let idx = receiver_index(d).unwrap_or_default() >> 8;
        let id = self.by_index.get(&idx).copied();
        if id.is_none() {
            self.drops.unknown_index += 1;
        }
        id
    }

    async fn handle_wireguard(&mut self, id: Key32, via: Via, d: &[u8], out: &mut [u8]) {
        self.touch(id);
        let t = now();
        let path = self.path_id(via);
        let mut datagram = d;
        loop {
            let Some(peer) = self.peers.get_mut(&id) else {
                return;
            };
            let from_ip = match via {
                Via::Direct(a) => Some(a.ip()),
                Via::Relay(_) => None,
            };
            let n = match peer
                .tunnel
                .decapsulate(from_ip, datagram, &mut out[DATA_HEADER_LEN..])
            {
                Ok(Output::Done) => return,
                Ok(Output::Network(b)) => b.len(),
                Ok(Output::Tunnel(packet, src)) => {
                    mark_connected(peer);
                    note_rx(peer, via, path.as_ref(), t);
                    if src != peer.info.virtual_ip {
                        self.drops.spoofed_source += 1;
                        debug!(peer = %peer.info.name, %src, "inner source is not the peer's virtual IP");
                    } else if !self.inbound.admits(packet) {
                        debug!(peer = %peer.info.name, "decrypted packet not addressed to us; dropped");
                    } else if self.tun_tx.push(packet) {
                        flush_tun(&self.tun, &mut self.tun_tx, &mut self.gro).await;
                    }
                    return;
                }
                Err(e) => {
                    self.drops.wireguard += 1;
                    trace!(peer = %peer.info.name, "decapsulate: {e}");
                    return;
                }
            };
            // A handshake message or queued data: answer on the path the datagram came by.
            mark_connected(peer);
            note_rx(peer, via, path.as_ref(), t);
            let short = peer.short;
            self.send_framed(Route::from_via(via), short, &mut out[..DATA_HEADER_LEN + n])
                .await;
            datagram = &[];
        }
    }

    async fn handle_tun_packet(&mut self, packet: &[u8], out: &mut [u8]) {
        let Some(dst) = ipv4_destination(packet) else {
            self.drops.no_route += 1;
            return;
        };
        let Some(&id) = self.by_vip.get(&dst) else {
            self.drops.no_route += 1;
            trace!(%dst, "no peer for destination");
            return;
        };
        self.touch(id);
        let t = now();
        let route = self.route(&id);
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        peer.conn.handle_tx(t);
        let Some(route) = route else {
            // No usable path: the connection manager holds it until one comes up.
            peer.conn.enqueue(packet.to_vec());
            return;
        };
        let n = match peer.tunnel.encapsulate(packet, &mut out[DATA_HEADER_LEN..]) {
            Ok(Output::Network(b)) => b.len(),
            Ok(_) => return,
            Err(e) => {
                debug!(peer = %peer.info.name, "encapsulate: {e}");
                return;
            }
        };
        let (dest, frame) = match route {
            Route::Direct(a) => (a, &out[DATA_HEADER_LEN..DATA_HEADER_LEN + n]),
            Route::Relay(i) => {
                let Some(r) = self.relays.get(i) else { return };
                write_send_header(&mut out[..DATA_HEADER_LEN], &peer.short);
                (r.addr, &out[..DATA_HEADER_LEN + n])
            }
        };
        if !self.gso.fits(dest, frame.len()) {
            flush_gso(&self.udp, &self.udp_state, &mut self.gso).await;
        }
        self.gso.push(dest, frame);
    }

    async fn encrypt_and_send(&mut self, id: Key32, route: Route, packet: &[u8], out: &mut [u8]) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let n = match peer.tunnel.encapsulate(packet, &mut out[DATA_HEADER_LEN..]) {
            Ok(Output::Network(b)) => b.len(),
            Ok(_) => return,
            Err(e) => {
                debug!(peer = %peer.info.name, "encapsulate: {e}");
                return;
            }
        };
        let short = peer.short;
        self.send_framed(route, short, &mut out[..DATA_HEADER_LEN + n])
            .await;
    }

    async fn handle_timers(&mut self, out: &mut [u8]) {
        let t = now();
        for r in &mut self.relays {
            if t >= r.poll_timeout() {
                r.handle_timeout(t);
            }
        }
        for p in self.peers.values_mut() {
            if p.paths.poll_timeout().is_some_and(|d| t >= d) {
                p.paths.handle_timeout(t);
            }
            if p.conn.poll_timeout().is_some_and(|d| t >= d) {
                p.conn.handle_timeout(t);
            }
        }
        if let Some(n) = &mut self.netcheck {
            n.handle_timeout(t);
            if n.is_done(t) {
                let report = n.report();
                self.netcheck = None;
                self.publish(Event::new(
                    unix_ms(),
                    EventType::NatDetected,
                    format!(
                        "udp {}, mapping {:?}, filtering {:?}, public {}",
                        report.udp,
                        report.mapping,
                        report.filtering,
                        report.public_endpoint.map_or("-".into(), |e| e.to_string())
                    ),
                ));
                info!(
                    udp = report.udp,
                    mapping = ?report.mapping,
                    filtering = ?report.filtering,
                    public = ?report.public_endpoint,
                    "netcheck"
                );
                for w in self.netcheck_waiters.drain(..) {
                    let _ = w.send(Ok(report.clone()));
                }
                self.nat = Some(report.clone());
                let _ = self.events.send(EngineEvent::Nat(report));
            }
        }
        self.guard.handle_timeout(t);
        let relay_unauthenticated = self.relays.iter().map(|r| r.unauthenticated()).sum();
        super::security::COUNTERS.publish(
            self.guard.stats(),
            self.inbound.dropped(),
            relay_unauthenticated,
        );
        let wg_due = tokio::time::Instant::now() >= self.last_wg_timers + WG_TIMERS;
        if wg_due {
            self.last_wg_timers = tokio::time::Instant::now();
            let ids: Vec<Key32> = self.peers.keys().copied().collect();
            for id in ids {
                let Some(peer) = self.peers.get_mut(&id) else {
                    continue;
                };
                let n = match peer.tunnel.update_timers(&mut out[DATA_HEADER_LEN..]) {
                    Ok(Output::Network(b)) => b.len(),
                    Ok(_) => continue,
                    Err(TunnelError::WireGuard(e)) if e == "ConnectionExpired" => {
                        if peer.connected_at.take().is_some() {
                            info!(peer = %peer.info.name, "session expired");
                        }
                        continue;
                    }
                    Err(e) => {
                        trace!(peer = %peer.info.name, "timers: {e}");
                        continue;
                    }
                };
                let short = peer.short;
                if let Some(route) = self.route(&id) {
                    self.send_framed(route, short, &mut out[..DATA_HEADER_LEN + n])
                        .await;
                }
            }
        }
    }

    /// Sends what the sans-IO parts queued: relay control, probes, STUN; and logs their events.
    async fn flush(&mut self, out: &mut [u8]) {
        for i in 0..self.relays.len() {
            while let Some(b) = self.relays[i].poll_transmit() {
                let to = self.relays[i].addr;
                send(&self.udp, &b, to).await;
            }
            while let Some(ev) = self.relays[i].poll_event() {
                let t = now();
                let path = PathId::Relay(self.relays[i].name.clone());
                match ev {
                    RelayEvent::Bound { observed } => {
                        info!(relay = %self.relays[i].name, %observed, "bound at relay");
                        self.flush_all = true;
                        for p in self.peers.values_mut() {
                            p.conn.add_path(path.clone(), t);
                            // A rebind may carry a token naming new parties: probes sent
                            // before it were dropped, so a peer still waiting for its first
                            // path probes again now instead of after the probe timeout.
                            if p.conn.primary().is_none() {
                                p.conn.resume(t);
                            }
                        }
                    }
                    RelayEvent::Lost { reason } => {
                        warn!(relay = %self.relays[i].name, "relay binding lost: {reason}");
                        self.flush_all = true;
                        for p in self.peers.values_mut() {
                            p.conn.remove_path(&path, t);
                        }
                        self.publish(
                            Event::new(
                                unix_ms(),
                                EventType::Error,
                                format!("relay binding lost: {reason}"),
                            )
                            .with_path(&path),
                        );
                    }
                }
            }
        }
        if let Some(n) = &mut self.netcheck {
            while let Some((to, b)) = n.poll_transmit() {
                send(&self.udp, &b, to).await;
            }
        }
        // After a packet only the peers it touched can have output; after a timer tick, a
        // command or a relay binding, any peer can.
        let mut ids = std::mem::take(&mut self.dirty);
        if std::mem::take(&mut self.flush_all) {
            ids.clear();
            ids.extend(self.peers.keys().copied());
        }
        for &id in &ids {
            self.drain_peer(id, out).await;
        }
        // Keep the allocation; anything touched while draining waits for the next flush.
        ids.clear();
        ids.append(&mut self.dirty);
        self.dirty = ids;
    }

    /// Marks a peer whose machines may have queued output for the next [`Self::flush`].
    fn touch(&mut self, id: Key32) {
        if self.dirty.last() != Some(&id) {
            self.dirty.push(id);
        }
    }

    /// Everything one peer's machines queued: punch results into the connection manager,
    /// probes onto the wire, queued packets onto the new primary, events onto the bus.
    async fn drain_peer(&mut self, id: Key32, out: &mut [u8]) {
        let t = now();
        loop {
            let Some(peer) = self.peers.get_mut(&id) else {
                return;
            };
            if let Some(PathEvent::DirectUp(a)) = peer.paths.poll_event() {
                info!(peer = %peer.info.name, endpoint = %a, "direct path proven");
                if let Some(old) = peer.direct.replace(a) {
                    peer.conn.remove_path(&PathId::Direct(old), t);
                }
                peer.conn.add_path(PathId::Direct(a), t);
                continue;
            }
            if let Some((via, probe)) = peer.paths.poll_transmit() {
                let short = peer.short;
                let n = probe.len();
                out[DATA_HEADER_LEN..DATA_HEADER_LEN + n].copy_from_slice(&probe);
                let route = Route::from_via(via);
                self.send_framed(route, short, &mut out[..DATA_HEADER_LEN + n])
                    .await;
                continue;
            }
            if let Some(tx) = peer.conn.poll_transmit() {
                let probe = Probe {
                    kind: ProbeKind::Probe,
                    from: self.me,
                    txid: tx.txid,
                }
                .encode(&peer.paths.key());
                let short = peer.short;
                let Some(route) = self.route_for(&tx.path) else {
                    continue;
                };
                let n = probe.len();
                out[DATA_HEADER_LEN..DATA_HEADER_LEN + n].copy_from_slice(&probe);
                self.send_framed(route, short, &mut out[..DATA_HEADER_LEN + n])
                    .await;
                continue;
            }
            if let Some(ev) = peer.conn.poll_event() {
                let name = peer.info.name.clone();
                if let crate::conn::ConnEvent::PrimaryChange { to, .. } = &ev {
                    peer.direct_since = match to {
                        Some(PathId::Direct(_)) => Some(SystemTime::now()),
                        _ => None,
                    };
                }
                info!(peer = %name, event = ?ev, "connection");
                if let Some(e) = Event::from_conn(unix_ms(), &name, &ev) {
                    self.publish(e);
                }
                continue;
            }
            if let Some(Command::Reconnect { attempt }) = peer.conn.poll_command() {
                info!(peer = %peer.info.name, attempt, "reconnecting: punching again");
                peer.paths.forget_direct(t);
                let _ = self.events.send(EngineEvent::WantPunch(id));
                continue;
            }
            let Some(route) = self.route(&id) else { return };
            let Some(peer) = self.peers.get_mut(&id) else {
                return;
            };
            let Some(packet) = peer.conn.poll_flush() else {
                return;
            };
            self.encrypt_and_send(id, route, &packet, out).await;
        }
    }

    fn publish(&self, ev: Event) {
        if let Ok(mut bus) = self.bus.lock() {
            bus.publish(ev);
        }
    }

    /// Where a peer's traffic goes now: its connection's primary path, if it has one.
    fn route(&self, id: &Key32) -> Option<Route> {
        let primary = self.peers.get(id)?.conn.primary()?;
        self.route_for(primary)
    }

    fn route_for(&self, path: &PathId) -> Option<Route> {
        match path {
            PathId::Direct(a) => Some(Route::Direct(*a)),
            PathId::Relay(name) => self
                .relays
                .iter()
                .position(|r| &r.name == name)
                .map(Route::Relay),
        }
    }

    /// Sends `frame[DATA_HEADER_LEN..]` on `route`; for a relay the header is written in front.
    async fn send_framed(&self, route: Route, to_peer: ShortId, frame: &mut [u8]) {
        match route {
            Route::Direct(a) => send(&self.udp, &frame[DATA_HEADER_LEN..], a).await,
            Route::Relay(i) => {
                let Some(r) = self.relays.get(i) else { return };
                write_send_header(frame, &to_peer);
                send(&self.udp, frame, r.addr).await;
            }
        }
    }

    fn status(&self) -> Vec<PeerStatus> {
        let mut rows: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(id, p)| self.peer_status(id, p))
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.peer_id.cmp(&b.peer_id)));
        rows
    }

    fn peer_status(&self, id: &Key32, p: &Peer) -> PeerStatus {
        let stats = p.tunnel.stats();
        let m = p.conn.metrics();
        let (strategy, relay, endpoint) = match self.route(id) {
            Some(Route::Direct(a)) => ("direct", None, Some(a)),
            Some(Route::Relay(i)) => (
                "relay",
                Some(self.relays[i].name.clone()),
                Some(self.relays[i].addr),
            ),
            None => ("none", None, None),
        };
        let primary = m.paths.iter().find(|x| x.is_primary);
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok();
        PeerStatus {
            peer_id: id.to_string(),
            name: p.info.name.clone(),
            virtual_ip: p.info.virtual_ip,
            strategy: strategy.into(),
            relay,
            endpoint,
            state: p.conn.state().as_str().into(),
            latency_ms: m.latency_ms.or(stats.rtt_ms.map(f64::from)),
            bytes_sent: stats.tx_bytes as u64,
            bytes_received: stats.rx_bytes as u64,
            uptime_seconds: p
                .connected_at
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or(0, |d| d.as_secs()),
            is_primary: primary.is_some(),
            priority: primary.map_or(0, |x| x.priority),
            connected_at: p.connected_at.and_then(unix).map(|d| d.as_secs()),
            parties: p.info.parties.clone(),
            candidates: p.paths.candidates().to_vec(),
            direct_since_ms: p.direct_since.and_then(unix).map(|d| d.as_millis() as u64),
            failovers: m.failovers,
            relay_switches: m.relay_switches,
            queued: m.queued,
            queue_dropped: m.queue_dropped,
            paths: m.paths,
        }
    }
}

impl Route {
    fn from_via(via: Via) -> Route {
        match via {
            Via::Direct(a) => Route::Direct(a),
            Via::Relay(i) => Route::Relay(i),
        }
    }
}

/// Authenticated traffic from the peer: liveness for the path, and proof of a direct one.
fn note_rx(peer: &mut Peer, via: Via, path: Option<&PathId>, t: std::time::Instant) {
    if let Some(path) = path {
        peer.conn.handle_rx(path, t);
    }
    if let Via::Direct(a) = via {
        peer.paths.handle_direct_traffic(a);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mark_connected(peer: &mut Peer) {
    if peer.connected_at.is_none() {
        peer.connected_at = Some(SystemTime::now());
        info!(peer = %peer.info.name, "tunnel up");
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Sends what the GSO batch holds in one `sendmsg`.
async fn flush_gso(udp: &UdpSocket, state: &quinn_udp::UdpSocketState, batch: &mut GsoBatch) {
    if let Some((destination, contents, segment_size)) = batch.pending() {
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        if let Err(e) = rally_udp::send(udp, state, &transmit).await {
            debug!(to = %destination, "udp send: {e}");
        }
    }
    batch.clear();
}

/// Writes what the TUN batch holds (coalescing TCP segments when the device has offload).
async fn flush_tun(tun: &tun_rs::AsyncDevice, batch: &mut TunBatch, gro: &mut tun_rs::GROTable) {
    if batch.is_empty() {
        return;
    }
    let (bufs, offset) = batch.pending();
    if let Err(e) = tun.send_multiple(gro, bufs, offset).await {
        debug!("tun send: {e}");
    }
    batch.clear();
}

async fn send(udp: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = udp.send_to(bytes, to).await {
        debug!(%to, "udp send: {e}");
    }
}

fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    match boringtun::noise::Tunn::dst_address(packet)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

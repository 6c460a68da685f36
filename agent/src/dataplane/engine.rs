//! The data-plane task: moves packets between the TUN device and the UDP socket through each
//! peer's WireGuard tunnel, over a direct path when one is proven and through a relay otherwise.
//!
//! The engine is a driver: every per-peer rule (paths, punching, relays, netcheck, the peer
//! table) lives in the sans-IO [`Node`]; the engine owns the socket, the TUN device and the
//! WireGuard tunnels, feeds the node datagrams and time, performs its transmits and turns its
//! events into the daemon's [`EngineEvent`]s and the event bus. It sleeps in one `epoll` wait
//! ([`poller`](super::poller)) until a packet, a message on one of its channels, or the
//! earliest deadline of its timers table ([`timers`](super::timers)): the node's next deadline
//! and WireGuard's timer slot; there is no fixed tick, and no async runtime between a packet's
//! arrival and its send.
//!
//! Peers are found by virtual IP (outbound), by the receiver index in WireGuard replies and data
//! (inbound), by the decrypted static key in handshake initiations, and by short id in relayed
//! datagrams and probes. A packet from the tunnel is delivered only if its inner source is the
//! peer's own virtual IP (cryptokey routing), and a handshake from a key that is not in the peer
//! map is dropped: the control plane decides who may talk to whom.
//!
//! WireGuard output is written at offset [`DATA_HEADER_LEN`] of the send buffer, so sending it
//! through a relay only adds the relay header in front: no copy, no allocation.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use boringtun::x25519::{PublicKey, StaticSecret};
use rally_proto::control::NatReport;
use rally_proto::relay::DATA_HEADER_LEN;
use rally_proto::{Identity, Key32, PeerEvent};
use rand::RngCore;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace};

use super::batch::{GsoBatch, TunBatch};
use super::handshake_guard::HandshakeGuard;
use super::inbound::InboundFilter;
use super::path_timing;
use super::poller::{IoThread, Poller, Ready};
use super::restart::RestartHints;
use super::timers::Wake;
use super::tunnel::Tunnel;
use crate::conn::{PathId, Profile};
use crate::discovery::{DiscoveryConfig, DiscoveryIo, DiscoveryStatus};
use crate::events::EventBus;
use crate::node::{Node, NodeConfig};
use rally_agent_core::discovery::Discovery;

const BUF_LEN: usize = 65_536 + 64;
/// Receive buffers per UDP read (each takes one datagram, or one GRO train of them).
pub(super) const RX_BUFS: usize = 8;
/// Commands from the daemon handled per turn of the loop.
const CMDS_PER_TURN: usize = 64;

/// Commands from the daemon.
pub enum EngineCmd {
    /// Changes to the peer map (from [`rally_proto::PeerView`]); each costs O(log n) or less.
    PeerChanges(Vec<PeerEvent>),
    /// The relays (name, `host:port`, resolved addresses) and this agent's token.
    SetRelays(Vec<crate::node::RelayConfig>, Vec<u8>),
    /// Whether UDP is known blocked (the control channel came up over TLS/TCP): relays are
    /// dialed over TCP at once.
    UdpHint(bool),
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
    /// `rally discovery`.
    Discovery(oneshot::Sender<DiscoveryStatus>),
    /// The relayed paths bound now (`rally netcheck`).
    RelayPaths(oneshot::Sender<Vec<PathId>>),
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
    /// The data-plane thread, taken by the first [`EngineHandle::stop`].
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
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

    /// The relayed paths bound now (empty once the data plane stopped).
    pub async fn relay_paths(&self) -> Vec<PathId> {
        let (tx, rx) = oneshot::channel();
        self.send(EngineCmd::RelayPaths(tx));
        rx.await.unwrap_or_default()
    }

    /// Discovery's settings, groups, flows and counters; `None` once the data plane stopped.
    pub async fn discovery(&self) -> Option<DiscoveryStatus> {
        let (tx, rx) = oneshot::channel();
        self.send(EngineCmd::Discovery(tx));
        rx.await.ok()
    }

    pub fn shutdown(&self) {
        self.send(EngineCmd::Shutdown);
    }

    /// Shuts the data plane down and waits for its thread to end (the TUN device is gone
    /// then). Blocks: call it from a blocking context. Later calls return at once.
    pub fn stop(&self) {
        self.shutdown();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

pub use crate::api::PeerStatus;

/// Packets dropped, by reason.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Drops {
    pub unknown_datagram: u64,
    pub stray_stun: u64,
    pub unknown_index: u64,
    pub unknown_peer_key: u64,
    pub unknown_short_id: u64,
    pub bad_probe: u64,
    pub relay_foreign: u64,
    pub wireguard: u64,
    /// WireGuard data seen already (the second copy of a small datagram over two relay
    /// connections, or a replay): not an error.
    pub duplicate: u64,
    pub spoofed_source: u64,
    pub no_route: u64,
}

/// A peer's WireGuard side; its paths and everything else are the node's.
pub(super) struct Peer {
    pub tunnel: Tunnel,
    pub index: u32,
    pub connected_at: Option<SystemTime>,
    pub direct_since: Option<SystemTime>,
}

pub struct Engine {
    /// Non-blocking; read and written by this thread alone, outside any async runtime.
    pub(super) udp: std::net::UdpSocket,
    pub(super) udp_state: quinn_udp::UdpSocketState,
    /// Non-blocking, like `udp`.
    pub(super) tun: tun_rs::SyncDevice,
    /// The loop's wait on the socket, the TUN device, the capture and the doorbell the
    /// channels it polls ring (commands, relay connections, side sockets).
    pub(super) poller: Poller,
    /// Encrypted datagrams waiting for one GSO send.
    pub(super) gso: GsoBatch,
    /// Decrypted packets waiting for one TUN write.
    pub(super) tun_tx: TunBatch,
    pub(super) gro: tun_rs::GROTable,
    pub(super) secret: StaticSecret,
    pub(super) public: PublicKey,
    /// Every per-peer rule: paths, punching, relays, netcheck, the peer table.
    pub(super) node: Node,
    /// Boxed: a `Peer` holds its tunnel (boringtun's ~11 KiB state is boxed apart and created
    /// on first use), and a hash table keeps up to twice as many slots as entries.
    pub(super) peers: HashMap<Key32, Box<Peer>>,
    pub(super) by_index: HashMap<u32, Key32>,
    /// Peers whose tunnel has WireGuard state: the only ones WireGuard's timers visit.
    pub(super) live: BTreeSet<Key32>,
    /// WireGuard's timer slot of the timers table.
    pub(super) wg_due: Option<tokio::time::Instant>,
    pub(super) netcheck_waiters: Vec<oneshot::Sender<Result<NatReport, String>>>,
    pub(super) events: mpsc::UnboundedSender<EngineEvent>,
    pub(super) bus: Arc<Mutex<EventBus>>,
    pub(super) next_index: u32,
    pub(super) drops: Drops,
    /// LAN game discovery: its rules, its IO, its timer slot and the peers owed our groups.
    pub(super) disc: Discovery,
    pub(super) disc_io: DiscoveryIo,
    pub(super) disc_due: tokio::time::Instant,
    pub(super) disc_ticks: u32,
    pub(super) disc_pending: Vec<Key32>,
    /// mac1, cookies and budgets before any handshake's Diffie-Hellman.
    pub(super) guard: HandshakeGuard,
    /// Decrypted packets go to the TUN device only if addressed to us.
    pub(super) inbound: InboundFilter,
    /// Handshakes started when a peer's data shows it kept a session we lost.
    pub(super) restart: RestartHints,
    /// Short-lived sockets besides `udp` (the netcheck's filtering test).
    pub(super) side: super::side::SideSockets,
    /// Relay connections over TLS/TCP, behind the node's TCP slots.
    pub(super) tcp: super::relay_tcp::TcpRelays,
    /// Small packets first, bulk ones under CoDel ([`super::queues`]).
    pub(super) queues: super::queues::Queues,
    /// Traffic the node has not heard of yet ([`super::activity`]).
    pub(super) activity: super::activity::Activity,
}

/// What the engine needs to start.
pub struct EngineConfig {
    /// The agent's socket; the engine's thread alone reads and writes it.
    pub udp: std::net::UdpSocket,
    pub wg_secret: [u8; 32],
    pub identity: Arc<Identity>,
    pub tun_name: String,
    pub virtual_ip: Ipv4Addr,
    pub prefix: u8,
    pub local_ips: Vec<IpAddr>,
    pub profile: Profile,
    pub bus: Arc<Mutex<EventBus>>,
    pub discovery: DiscoveryConfig,
    /// An HTTP CONNECT proxy (`HOST:PORT`) for relay connections over TLS/TCP.
    pub proxy: Option<String>,
}

/// Buffers the loop reuses for every packet.
pub(super) struct Buffers {
    pub rx: [Vec<u8>; RX_BUFS],
    pub meta: Vec<quinn_udp::RecvMeta>,
    pub tun_raw: Vec<u8>,
    pub tun_bufs: Vec<Vec<u8>>,
    pub tun_sizes: Vec<usize>,
    pub out: Vec<u8>,
}

impl Buffers {
    fn new() -> Self {
        Buffers {
            rx: std::array::from_fn(|_| vec![0u8; BUF_LEN]),
            meta: vec![quinn_udp::RecvMeta::default(); RX_BUFS],
            tun_raw: vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535],
            tun_bufs: vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE],
            tun_sizes: vec![0usize; tun_rs::IDEAL_BATCH_SIZE],
            out: vec![0u8; BUF_LEN + DATA_HEADER_LEN + 64],
        }
    }
}

impl Engine {
    /// Brings up the TUN device and starts the data plane on a thread of its own, which owns
    /// the socket and the TUN device and waits on them itself: a packet wakes exactly this
    /// thread, and nothing runs between its arrival and its send but the engine. The tokio
    /// tasks the engine starts (relay connections over TCP, side sockets) run on a second
    /// thread ([`IoThread`]), stopped with the engine.
    pub fn start(
        cfg: EngineConfig,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> std::io::Result<EngineHandle> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let io = IoThread::start()?;
        let thread = std::thread::Builder::new()
            .name("rally-dataplane".into())
            .spawn(move || {
                let entered = io.handle().enter();
                match Engine::build(cfg, events) {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(()));
                        engine.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
                drop(entered);
                drop(io);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(EngineHandle {
                tx,
                thread: Arc::new(Mutex::new(Some(thread))),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::other(
                "the data-plane thread stopped while starting",
            )),
        }
    }

    /// Creates the TUN device and sets both it and the socket non-blocking; tokio's context
    /// (for the engine's tasks and side sockets) is the I/O thread's, entered by the caller.
    fn build(
        cfg: EngineConfig,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> std::io::Result<Engine> {
        let (tun, offload) = super::device::open_tun(&cfg)?;
        tun.set_nonblocking(true)?;
        let udp = cfg.udp;
        udp.set_nonblocking(true)?;
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into())?;
        // The engine reads neither the ECN bits nor the destination address of what it
        // receives: two control messages per datagram (or GRO train) it need not pay for.
        rally_udp::skip_receive_metadata(&udp);
        let queues = super::device::tune_io(
            (&cfg.tun_name, cfg.virtual_ip),
            &tun,
            &udp,
            &udp_state,
            offload,
        );
        let poller = Poller::new(udp.as_raw_fd(), tun.as_raw_fd())?;
        let secret = StaticSecret::from(cfg.wg_secret);
        let public = PublicKey::from(&secret);
        let local_port = udp.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        let disc_io = DiscoveryIo::open(&cfg.tun_name, cfg.discovery.enabled);
        let disc = Discovery::new(cfg.discovery, cfg.virtual_ip, cfg.prefix);
        let identity = cfg.identity.clone();
        let node = Node::new(
            NodeConfig {
                identity: cfg.identity,
                wg_secret: cfg.wg_secret,
                profile: cfg.profile,
                local_port,
                local_ips: cfg.local_ips,
            },
            seed,
            super::timers::now(),
        );
        Ok(Engine {
            gso: GsoBatch::new(udp_state.max_gso_segments()),
            tun_tx: TunBatch::new(tun_rs::IDEAL_BATCH_SIZE, tun_rs::VIRTIO_NET_HDR_LEN),
            gro: tun_rs::GROTable::default(),
            udp_state,
            udp,
            tun,
            poller,
            secret,
            public,
            node,
            peers: HashMap::new(),
            by_index: HashMap::new(),
            live: BTreeSet::new(),
            wg_due: None,
            netcheck_waiters: Vec::new(),
            events,
            bus: cfg.bus,
            next_index: rand::thread_rng().next_u32() & 0x00ff_ffff,
            drops: Drops::default(),
            disc,
            disc_io,
            side: Default::default(),
            tcp: super::relay_tcp::TcpRelays::new(cfg.proxy.clone(), identity),
            disc_due: tokio::time::Instant::now(),
            disc_ticks: 0,
            disc_pending: Vec::new(),
            guard: HandshakeGuard::new(public.as_bytes(), rand::random(), super::timers::now()),
            inbound: InboundFilter::new(cfg.virtual_ip),
            restart: RestartHints::new(super::timers::now()),
            queues,
            activity: Default::default(),
        })
    }

    /// The loop: waits until a packet, a message or the earliest deadline of the timers table,
    /// handles what is ready, serves one slice of the bulk queues, then drains what the node
    /// queued. The node hears of the traffic from its slot of the table ([`super::activity`]).
    fn run(mut self, mut cmds: mpsc::UnboundedReceiver<EngineCmd>) {
        let mut b = Buffers::new();
        let waker = self.poller.waker();
        let mut cx = Context::from_waker(&waker);
        // The channels are polled on the first turn (which registers the waker) and again
        // after each ring, or while a turn left messages in them.
        let mut channels_due = true;
        loop {
            path_timing::turn_end();
            self.queues.settle_boost();
            let (deadline, wake) = self.next_wake();
            // After an idle burst of probes the node may ask for the socket to stay unread
            // a few milliseconds, so the answers are read in one wake-up (node/hold.rs).
            let hold = self.socket_hold();
            let (deadline, wake) = match hold {
                Some(h) if h < deadline => (h, Wake::SocketHold),
                _ => (deadline, wake),
            };
            // With bulk work queued the wait only looks (the kernel's queues are read before
            // each slice); every turn serves one slice, so reads cannot starve the bulk
            // queues, and a small packet waits for a slice or two at most.
            let timeout = if self.queues.has_work() || channels_due {
                Duration::ZERO
            } else {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            };
            let waited_from = self.queues.boosted().then(super::timers::now);
            let slept_from = path_timing::now();
            let ready = self.wait(hold.is_none(), timeout);
            path_timing::woke(slept_from);
            if let Some(from) = waited_from {
                self.queues.breathe(from);
            }
            if ready.bell || channels_due {
                self.poller.bell().clear();
                match self.poll_channels(&mut cmds, &mut cx, &mut b) {
                    Some(again) => channels_due = again,
                    None => break,
                }
            }
            if ready.udp {
                self.socket_readable(&mut b);
            }
            if ready.tun {
                trace!("woke for the TUN device");
                self.drain_tun(&mut b);
            }
            if ready.capture {
                self.discovery_capture(&mut b);
            }
            if tokio::time::Instant::now() >= deadline {
                trace!(reason = ?wake, "woke for a timer");
                match wake {
                    Wake::SocketHold => {}
                    Wake::Activity => self.tell_activity(),
                    _ => self.handle_timers(&mut b.out),
                }
            }
            if self.queues.has_work() {
                self.serve_bulk(&mut b);
                self.queues.report(super::timers::now());
            }
            self.drain_node(&mut b.out);
            self.discovery_flush(&mut b.out);
            self.drain_node(&mut b.out);
        }
        debug!(drops = ?self.drops, queues = ?self.queues.stats, tcp_queue_drops = self.tcp.queue_drops(), "data plane stopped");
    }

    /// One wait of the loop (the socket left out while the node holds it unread).
    fn wait(&mut self, socket: bool, timeout: Duration) -> Ready {
        let capture = self.disc_io.capture_fd();
        self.poller.wait(socket, capture, timeout)
    }

    /// The daemon's commands, frames from relay connections over TCP and datagrams from side
    /// sockets. `None` when the daemon asked the data plane to stop (or is gone); otherwise
    /// whether to look again next turn: a channel that gave a message may hold more, and only
    /// one that answered "empty" has the waker registered.
    fn poll_channels(
        &mut self,
        cmds: &mut mpsc::UnboundedReceiver<EngineCmd>,
        cx: &mut Context<'_>,
        b: &mut Buffers,
    ) -> Option<bool> {
        let mut again = true;
        for _ in 0..CMDS_PER_TURN {
            match cmds.poll_recv(cx) {
                Poll::Ready(Some(EngineCmd::Shutdown) | None) => return None,
                Poll::Ready(Some(cmd)) => {
                    trace!("woke for a command");
                    self.handle_cmd(cmd);
                }
                Poll::Pending => {
                    again = false;
                    break;
                }
            }
        }
        if let Poll::Ready(Some((slot, frame))) = self.tcp.inbound.poll_recv(cx) {
            self.handle_relay_frames(slot, &frame, &mut b.out);
            again = true;
        }
        if let Poll::Ready(Some(d)) = self.side.poll_recv(cx) {
            if self.side.is_carrying(d.socket) {
                self.handle_datagram(d.from, &d.payload, &mut b.out);
                super::tx::flush_tun(&self.tun, &mut self.tun_tx, &mut self.gro);
            } else {
                let t = super::timers::now();
                let _ = self
                    .node
                    .handle_side_datagram(d.socket, d.from, &d.payload, t);
            }
            again = true;
        }
        Some(again)
    }

    /// One command from the daemon (all but `Shutdown`, which ends [`Self::run`]).
    fn handle_cmd(&mut self, cmd: EngineCmd) {
        let t = super::timers::now();
        match cmd {
            EngineCmd::PeerChanges(changes) => self.node.handle_peer_changes(changes, t),
            EngineCmd::SetRelays(relays, token) => self.node.handle_relays(relays, token, t),
            EngineCmd::UdpHint(blocked) => self.node.handle_udp_hint(blocked, t),
            EngineCmd::Punch {
                peer,
                candidates,
                start_in,
            } => self.node.handle_punch(peer, &candidates, t + start_in),
            EngineCmd::Netcheck(reply) => match self.node.start_netcheck(t) {
                Ok(()) => self.netcheck_waiters.extend(reply),
                Err(e) => {
                    if let Some(r) = reply {
                        let _ = r.send(Err(e.to_string()));
                    }
                }
            },
            EngineCmd::Peers(reply) => {
                self.tell_activity();
                // A metrics scrape reads the security counters right after this answer.
                self.publish_security();
                self.queues.settle_boost();
                self.queues.publish();
                let _ = reply.send(self.status());
            }
            EngineCmd::Reconnect(peer) => self.node.handle_reconnect(peer, t),
            EngineCmd::SetPrimary(peer, path, reply) => {
                let _ = reply.send(
                    self.node
                        .set_primary(&peer, &path)
                        .map_err(|e| e.to_string()),
                );
            }
            EngineCmd::Discovery(reply) => {
                let _ = reply.send(self.discovery_status());
            }
            EngineCmd::RelayPaths(reply) => {
                let _ = reply.send(self.node.relay_paths());
            }
            EngineCmd::Shutdown => {}
        }
    }

    /// A new 24-bit receiver index no peer uses.
    pub(super) fn allocate_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }
}

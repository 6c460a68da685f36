//! The data-plane task: moves packets between the TUN device and the UDP socket through each
//! peer's WireGuard tunnel.
//!
//! Peers are found by virtual IP (outbound), by the receiver index in WireGuard replies and data
//! (inbound), and by the decrypted static key in handshake initiations. A packet from the tunnel
//! is delivered only if its inner source is the peer's own virtual IP (cryptokey routing), and a
//! handshake from a key that is not in the peer map is dropped: the control plane decides who may
//! talk to whom.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boringtun::x25519::{PublicKey, StaticSecret};
use rally_proto::{Key32, PeerInfo};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, trace};

use super::demux::{classify, receiver_index, Datagram, WgKind};
use super::tunnel::{initiator_key, Output, Tunnel, TunnelError};

/// How often WireGuard's timers run.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Keepalive towards every peer, which also keeps NAT mappings open.
const KEEPALIVE_SECS: u16 = 25;
/// A session older than this without a new handshake is dead (WireGuard's REJECT_AFTER_TIME).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);
const BUF_LEN: usize = 65_536 + 64;

/// Commands from the daemon.
pub enum EngineCmd {
    SetPeers(Vec<PeerInfo>),
    Peers(oneshot::Sender<Vec<PeerStatus>>),
    Shutdown,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<EngineCmd>,
}

impl EngineHandle {
    pub fn set_peers(&self, peers: Vec<PeerInfo>) {
        let _ = self.tx.send(EngineCmd::SetPeers(peers));
    }

    pub async fn peers(&self) -> Vec<PeerStatus> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(EngineCmd::Peers(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub fn shutdown(&self) {
        let _ = self.tx.send(EngineCmd::Shutdown);
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
}

/// Packets dropped, by reason.
#[derive(Debug, Default, Clone, Copy)]
struct Drops {
    unknown_datagram: u64,
    stun_unhandled: u64,
    unknown_index: u64,
    unknown_peer_key: u64,
    wireguard: u64,
    spoofed_source: u64,
    no_route: u64,
}

struct Peer {
    info: PeerInfo,
    tunnel: Tunnel,
    index: u32,
    /// Where the last authenticated packet came from; where we send.
    endpoint: Option<SocketAddr>,
    connected_at: Option<SystemTime>,
    since: Instant,
}

pub struct Engine {
    udp: Arc<UdpSocket>,
    tun: tun_rs::AsyncDevice,
    secret: StaticSecret,
    public: PublicKey,
    peers: HashMap<Key32, Peer>,
    by_vip: HashMap<Ipv4Addr, Key32>,
    by_index: HashMap<u32, Key32>,
    by_wg: HashMap<Key32, Key32>,
    next_index: u32,
    drops: Drops,
}

impl Engine {
    /// Brings up the TUN device `tun_name` with `virtual_ip/prefix` and starts the task.
    pub fn start(
        udp: Arc<UdpSocket>,
        wg_secret: [u8; 32],
        tun_name: &str,
        virtual_ip: Ipv4Addr,
        prefix: u8,
        index_seed: u32,
    ) -> std::io::Result<EngineHandle> {
        let tun = tun_rs::DeviceBuilder::new()
            .name(tun_name)
            .ipv4(virtual_ip, prefix, None)
            .mtu(1420)
            .build_async()?;
        info!(tun = tun_name, %virtual_ip, "TUN device up");
        let secret = StaticSecret::from(wg_secret);
        let public = PublicKey::from(&secret);
        let engine = Engine {
            udp,
            tun,
            secret,
            public,
            peers: HashMap::new(),
            by_vip: HashMap::new(),
            by_index: HashMap::new(),
            by_wg: HashMap::new(),
            next_index: index_seed & 0x00ff_ffff,
            drops: Drops::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(engine.run(rx));
        Ok(EngineHandle { tx })
    }

    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<EngineCmd>) {
        let mut udp_buf = vec![0u8; BUF_LEN];
        let mut tun_buf = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN + 64];
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = self.udp.recv_from(&mut udp_buf) => match r {
                    Ok((n, from)) => self.handle_datagram(from, &udp_buf[..n], &mut out).await,
                    Err(e) => debug!("udp receive: {e}"),
                },
                r = self.tun.recv(&mut tun_buf) => match r {
                    Ok(n) => self.handle_tun_packet(&tun_buf[..n], &mut out).await,
                    Err(e) => debug!("tun receive: {e}"),
                },
                _ = tick.tick() => self.handle_timers(&mut out).await,
                cmd = cmds.recv() => match cmd {
                    Some(EngineCmd::SetPeers(peers)) => self.set_peers(peers, &mut out).await,
                    Some(EngineCmd::Peers(reply)) => { let _ = reply.send(self.status()); }
                    Some(EngineCmd::Shutdown) | None => break,
                },
            }
        }
        debug!(drops = ?self.drops, "data plane stopped");
    }

    async fn set_peers(&mut self, peers: Vec<PeerInfo>, out: &mut [u8]) {
        let wanted: HashMap<Key32, PeerInfo> = peers.into_iter().map(|p| (p.peer_id, p)).collect();
        let gone: Vec<Key32> = self
            .peers
            .iter()
            .filter(|(id, p)| wanted.get(id).is_none_or(|w| w.wg_key != p.info.wg_key))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                info!(peer = %p.info.name, "peer removed");
                self.by_vip.remove(&p.info.virtual_ip);
                self.by_index.remove(&p.index);
                self.by_wg.remove(&p.info.wg_key);
            }
        }
        for (id, info) in wanted {
            if let Some(p) = self.peers.get_mut(&id) {
                if p.info.virtual_ip != info.virtual_ip {
                    self.by_vip.remove(&p.info.virtual_ip);
                    self.by_vip.insert(info.virtual_ip, id);
                }
                p.info = info;
                continue;
            }
            let index = self.allocate_index();
            let tunnel = Tunnel::new(
                self.secret.clone(),
                PublicKey::from(info.wg_key.0),
                Some(KEEPALIVE_SECS),
                index,
            );
            info!(peer = %info.name, vip = %info.virtual_ip, endpoints = ?info.endpoints, "peer added");
            self.by_vip.insert(info.virtual_ip, id);
            self.by_index.insert(index, id);
            self.by_wg.insert(info.wg_key, id);
            self.peers.insert(
                id,
                Peer {
                    info,
                    tunnel,
                    index,
                    endpoint: None,
                    connected_at: None,
                    since: Instant::now(),
                },
            );
            // Start the handshake now so the first packet does not wait for it.
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            if let Ok(Output::Network(b)) = peer.tunnel.handshake(out, false) {
                send_to_peer(&self.udp, peer, b).await;
            }
        }
    }

    fn allocate_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }

    async fn handle_datagram(&mut self, from: SocketAddr, d: &[u8], out: &mut [u8]) {
        let id = match classify(d) {
            Datagram::WireGuard(WgKind::Initiation) => {
                let Some(key) = initiator_key(&self.secret, &self.public, d) else {
                    self.drops.wireguard += 1;
                    return;
                };
                let Some(id) = self.by_wg.get(&Key32(key)).copied() else {
                    self.drops.unknown_peer_key += 1;
                    debug!(%from, "handshake from a key outside our parties; dropped");
                    return;
                };
                id
            }
            Datagram::WireGuard(_) => {
                let idx = receiver_index(d).unwrap_or_default() >> 8;
                let Some(id) = self.by_index.get(&idx).copied() else {
                    self.drops.unknown_index += 1;
                    return;
                };
                id
            }
            Datagram::Stun => {
                self.drops.stun_unhandled += 1;
                return;
            }
            Datagram::Unknown => {
                self.drops.unknown_datagram += 1;
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let mut first = true;
        loop {
            let datagram = if first { d } else { &[][..] };
            first = false;
            match peer.tunnel.decapsulate(Some(from.ip()), datagram, out) {
                Ok(Output::Done) => break,
                Ok(Output::Network(b)) => {
                    mark_alive(peer, from);
                    if let Err(e) = self.udp.send_to(b, from).await {
                        debug!(%from, "udp send: {e}");
                    }
                }
                Ok(Output::Tunnel(packet, src)) => {
                    mark_alive(peer, from);
                    if src != peer.info.virtual_ip {
                        self.drops.spoofed_source += 1;
                        debug!(peer = %peer.info.name, %src, "inner source is not the peer's virtual IP");
                    } else if let Err(e) = self.tun.send(packet).await {
                        debug!("tun send: {e}");
                    }
                    break;
                }
                Err(e) => {
                    self.drops.wireguard += 1;
                    trace!(peer = %peer.info.name, %from, "decapsulate: {e}");
                    break;
                }
            }
        }
    }

    async fn handle_tun_packet(&mut self, packet: &[u8], out: &mut [u8]) {
        let Some(dst) = ipv4_destination(packet) else {
            self.drops.no_route += 1;
            return;
        };
        let Some(peer) = self.by_vip.get(&dst).and_then(|id| self.peers.get_mut(id)) else {
            self.drops.no_route += 1;
            trace!(%dst, "no peer for destination");
            return;
        };
        match peer.tunnel.encapsulate(packet, out) {
            Ok(Output::Network(b)) => send_to_peer(&self.udp, peer, b).await,
            Ok(_) => {}
            Err(e) => debug!(peer = %peer.info.name, "encapsulate: {e}"),
        }
    }

    async fn handle_timers(&mut self, out: &mut [u8]) {
        for peer in self.peers.values_mut() {
            match peer.tunnel.update_timers(out) {
                Ok(Output::Network(b)) => send_to_peer(&self.udp, peer, b).await,
                Ok(_) => {}
                Err(TunnelError::WireGuard(e)) if e == "ConnectionExpired" => {
                    if peer.connected_at.take().is_some() {
                        info!(peer = %peer.info.name, "session expired");
                    }
                    peer.endpoint = None;
                }
                Err(e) => trace!(peer = %peer.info.name, "timers: {e}"),
            }
        }
    }

    fn status(&self) -> Vec<PeerStatus> {
        let mut rows: Vec<PeerStatus> = self.peers.values().map(peer_status).collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.peer_id.cmp(&b.peer_id)));
        rows
    }
}

fn peer_status(p: &Peer) -> PeerStatus {
    let stats = p.tunnel.stats();
    let live = stats.since_handshake.is_some_and(|d| d < SESSION_LIFETIME);
    let state = match (live, p.connected_at.is_some()) {
        (true, _) => "connected",
        (false, true) => "reconnecting",
        (false, false) => "connecting",
    };
    let connected_at = p
        .connected_at
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let uptime = p
        .connected_at
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let _ = p.since;
    PeerStatus {
        peer_id: p.info.peer_id.to_string(),
        name: p.info.name.clone(),
        virtual_ip: p.info.virtual_ip,
        strategy: "direct".into(),
        relay: None,
        endpoint: p.endpoint,
        state: state.into(),
        latency_ms: stats.rtt_ms.map(f64::from),
        bytes_sent: stats.tx_bytes as u64,
        bytes_received: stats.rx_bytes as u64,
        uptime_seconds: uptime,
        is_primary: p.endpoint.is_some(),
        priority: 0,
        connected_at,
        parties: p.info.parties.clone(),
        candidates: p.info.endpoints.clone(),
    }
}

/// Records that an authenticated packet came from `from`: it becomes the peer's endpoint.
fn mark_alive(peer: &mut Peer, from: SocketAddr) {
    if peer.endpoint != Some(from) {
        info!(peer = %peer.info.name, endpoint = %from, "direct path up");
        peer.endpoint = Some(from);
    }
    if peer.connected_at.is_none() {
        peer.connected_at = Some(SystemTime::now());
    }
}

/// Sends to the peer's proven endpoint, or to every candidate while none is proven.
async fn send_to_peer(udp: &UdpSocket, peer: &Peer, bytes: &[u8]) {
    let targets: &[SocketAddr] = match &peer.endpoint {
        Some(e) => std::slice::from_ref(e),
        None => &peer.info.endpoints,
    };
    for to in targets {
        if let Err(e) = udp.send_to(bytes, to).await {
            debug!(peer = %peer.info.name, %to, "udp send: {e}");
        }
    }
}

fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    match boringtun::noise::Tunn::dst_address(packet)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

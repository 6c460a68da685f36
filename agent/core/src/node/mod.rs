//! The agent's sans-IO node: every per-peer rule between the control plane's peer map, the
//! relays and the wire, with no clock, socket or RNG (time is `now`, randomness a seed).
//!
//! A [`Node`] owns, per peer, a connection manager ([`Connection`]: paths, primary, failover)
//! and a hole puncher ([`PeerPaths`]); and for the agent, one [`RelayClient`](crate::relay_client::RelayClient) per relay and
//! the NAT check ([`Netcheck`](crate::netcheck::Netcheck)). It applies the rules that join them:
//!
//! - a relay binding adds a relayed path to every peer; losing it removes that path;
//! - a probe ack belongs to the connection manager if it owns the txid, else to the puncher;
//! - a direct path proven by the puncher becomes a path of the connection manager; when the
//!   manager loses it (failover to a relay, or every path), punching starts again, and a direct
//!   path proven again after a loss is re-added fresh so it takes the role back at once;
//! - punching is **hopeless** when both this agent and the peer map endpoint-dependently and
//!   the peer holds no gateway port mapping (`mapped_endpoint` in its report); that is
//!   recomputed whenever either NAT report changes ([`Node::handle_nat_report`], the
//!   netcheck, a peer update);
//! - a public address seen changed (a relay's bind answer, or STUN) updates the NAT report at
//!   once ([`NodeEvent::Nat`]);
//! - a relay is named by one [`RelayId`] everywhere (paths, routes, events).
//!
//! The engine (in `rally-agent`) keeps the sockets, the TUN device and the WireGuard tunnels.
//! It feeds the node every datagram that is not WireGuard ([`Node::handle_datagram`], which
//! hands back WireGuard payloads that came through a relay), tells it about authenticated
//! WireGuard traffic ([`Node::handle_tunnel_rx`], [`Node::handle_tunnel_handshake`],
//! [`Node::handle_tunnel_tx`]), asks
//! [`Node::route`] where a peer's packets go, and drains [`Node::poll_transmit`],
//! [`Node::poll_event`], [`Node::poll_packet`] and [`Node::poll_side`] (datagrams from side
//! sockets come back through [`Node::handle_side_datagram`]) after every input; it sleeps until
//! [`Node::poll_timeout`] and then calls [`Node::handle_timeout`].

mod birthday;
mod hold;
mod peer;
mod reason;
mod relay_tcp;
mod relays;
mod schedule;
mod side;
#[cfg(test)]
mod sim;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests_birthday;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests_netcheck;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests_relay_choice;
#[cfg(test)]
mod tests_tcp;
mod tunnel;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use rally_proto::control::NatReport;
use rally_proto::probe::{is_probe, peek_from, Probe, ProbeKind};
use rally_proto::relay::{is_relay, short_id, write_send_header, ShortId, DATA_HEADER_LEN};
use rally_proto::stun::is_stun;
use rally_proto::{Identity, Key32, PeerEvent, PeerInfo};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use x25519_dalek::StaticSecret;

use crate::conn::{ConnEvent, Connection, PathId, Profile, RelayId, SetPrimaryError, Timer};
use crate::paths::PeerPaths;

pub use hold::SOCKET_HOLD;
pub use peer::PeerState;
pub use reason::RelayReason;
pub use relay_tcp::{
    is_tcp_slot, tcp_slot, RelayTrust, TcpChange, TcpEndpoint, TCP_HEAD_START, TCP_LINGER,
};
pub use relays::RelayConfig;
use relays::Relays;
use schedule::Deadlines;
pub use schedule::IDLE_GRID;
pub use side::{SideOp, SideSocket};

/// What a node needs to start.
pub struct NodeConfig {
    /// This agent's identity (relay bindings, its short id).
    pub identity: Arc<Identity>,
    /// This agent's WireGuard secret: probes are keyed with the pair's shared secret.
    pub wg_secret: [u8; 32],
    pub profile: Profile,
    /// The agent socket's port and the host's addresses (the netcheck tells NAT from none).
    pub local_port: u16,
    pub local_ips: Vec<IpAddr>,
}

/// A datagram to send, framed for its path (a relay's `Send` header already in front).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub payload: Vec<u8>,
}

/// Where a peer's WireGuard datagrams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct(SocketAddr),
    /// To the relay at `relay`, behind a `Send` header naming `peer`
    /// ([`rally_proto::relay::write_send_header`]). `relay` is a TCP slot
    /// ([`is_tcp_slot`]) for a relay over TLS/TCP: the engine sends there over that
    /// connection ([`Node::tcp_relay`]).
    Relay {
        relay: SocketAddr,
        peer: ShortId,
    },
}

impl Route {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Route::Direct(a) => *a,
            Route::Relay { relay, .. } => *relay,
        }
    }
}

/// Why the NAT report changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatCause {
    /// A netcheck finished.
    Netcheck,
    /// A relay's bind answer or a STUN answer showed a new public address.
    Observed,
}

/// What the node tells its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    /// A peer to create a WireGuard tunnel for.
    PeerAdded { peer: Key32, wg_key: Key32 },
    /// A peer whose tunnel to drop (also before a re-add with a new WireGuard key).
    PeerRemoved { peer: Key32, wg_key: Key32 },
    /// Ask the control plane to have the peer punch towards us too.
    WantPunch(Key32),
    /// This agent's NAT report changed (the daemon re-registers its endpoints).
    Nat { report: NatReport, cause: NatCause },
    /// A connection manager's event, with the peer's name for logs and the event bus.
    Conn {
        peer: Key32,
        name: String,
        event: ConnEvent,
    },
    RelayBound {
        relay: RelayId,
        observed: SocketAddr,
    },
    /// A relay binding was lost: `path` is `relay:NAME` (UDP) or `relay-tcp:NAME`.
    RelayLost { path: PathId, reason: String },
    /// A relay was bound over TLS/TCP, or that session was closed (UDP works again).
    RelayTcp { relay: RelayId, change: TcpChange },
}

/// Why the node wants to wake up (for the driver's logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerReason {
    /// A connection manager's timer (probe, loss, silence check, reconnect…).
    Conn(Timer),
    /// A punch's next round of probes, or its retry.
    Punch,
    /// A relay's bind retry or keepalive ping.
    Relay,
    /// A netcheck retransmission or its end.
    Netcheck,
}

/// What became of a datagram given to [`Node::handle_datagram`].
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// Consumed (relay control, STUN, a probe).
    Handled,
    /// A WireGuard datagram from `peer`, delivered through relay path `path`: the engine
    /// decrypts it (and checks it really is that peer's) and reports it with
    /// [`Node::handle_tunnel_rx`].
    WireGuard {
        peer: Key32,
        path: PathId,
        payload: &'a [u8],
    },
    Dropped(DropReason),
}

/// Why a datagram was dropped (the engine counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A STUN answer to no request of ours.
    StrayStun,
    /// A relay message from an address that is not one of our relays.
    RelayForeign,
    /// A datagram none of our codecs accept.
    Malformed,
    /// A probe or relayed datagram naming a peer we do not know.
    UnknownShortId,
    /// A probe that fails authentication.
    BadProbe,
}

/// Why a request on a peer or the netcheck was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("no such peer")]
    UnknownPeer,
    #[error(transparent)]
    SetPrimary(#[from] SetPrimaryError),
    #[error("no relays known yet: the control plane hands them out after registration")]
    NoRelays,
}

pub struct Node {
    me: ShortId,
    secret: StaticSecret,
    profile: Profile,
    rng: ChaCha8Rng,
    /// Boxed: a peer's machines are ~1 KiB and a hash table keeps spare slots.
    peers: HashMap<Key32, Box<PeerState>>,
    by_vip: HashMap<Ipv4Addr, Key32>,
    by_wg: HashMap<Key32, Key32>,
    by_short: HashMap<ShortId, Key32>,
    relays: Relays,
    nat: Option<NatReport>,
    /// Each peer's next deadline (the earliest of its puncher's and connection's).
    deadlines: Deadlines<Key32>,
    /// Peers given input since their outputs were last drained.
    dirty: Vec<Key32>,
    /// The latest `now` given to any input (outputs drained later are stamped with it).
    now: Instant,
    /// When the node was created: the origin of the idle grid ([`IDLE_GRID`]).
    epoch: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<NodeEvent>,
    packets: VecDeque<(Key32, Vec<u8>)>,
    /// Until when the engine should leave the UDP socket unread (hold.rs).
    socket_hold: Option<Instant>,
}

impl Node {
    pub fn new(cfg: NodeConfig, seed: [u8; 32], now: Instant) -> Node {
        let mut rng = ChaCha8Rng::from_seed(seed);
        let mut relay_seed = [0u8; 32];
        rng.fill_bytes(&mut relay_seed);
        Node {
            me: short_id(&cfg.identity.public()),
            secret: StaticSecret::from(cfg.wg_secret),
            profile: cfg.profile,
            peers: HashMap::new(),
            by_vip: HashMap::new(),
            by_wg: HashMap::new(),
            by_short: HashMap::new(),
            relays: Relays::new(cfg.identity, cfg.local_port, cfg.local_ips),
            nat: None,
            deadlines: Deadlines::default(),
            dirty: Vec::new(),
            now,
            epoch: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            packets: VecDeque::new(),
            socket_hold: None,
            rng,
        }
    }

    // ----- inputs -----

    /// A datagram that is not WireGuard-from-a-peer: STUN, relay control or data, a probe.
    pub fn handle_datagram<'a>(
        &mut self,
        from: SocketAddr,
        d: &'a [u8],
        now: Instant,
    ) -> Received<'a> {
        self.now = now;
        if is_stun(d) {
            return self.handle_stun(d, now);
        }
        if is_relay(d) {
            return self.handle_relay_datagram(from, d, now);
        }
        if is_probe(d) {
            return match peek_from(d) {
                Ok(sid) => self.handle_probe(PathId::Direct(from), sid, d, now),
                Err(_) => Received::Dropped(DropReason::BadProbe),
            };
        }
        Received::Dropped(DropReason::Malformed)
    }

    /// Changes to the peer map (from [`rally_proto::PeerView`]).
    pub fn handle_peer_changes(&mut self, changes: Vec<PeerEvent>, now: Instant) {
        self.now = now;
        for change in changes {
            match change {
                PeerEvent::Added(info) | PeerEvent::Updated(info) => self.upsert_peer(info, now),
                PeerEvent::Removed(info) => self.remove_peer(&info.peer_id),
            }
        }
    }

    /// This agent's NAT report from elsewhere (e.g. restored from the state file): decides
    /// which peers are hopeless to punch. The node's own netcheck calls this too.
    pub fn handle_nat_report(&mut self, report: NatReport, now: Instant) {
        self.now = now;
        self.nat = Some(report);
        let ids: Vec<Key32> = self.peers.keys().copied().collect();
        for id in ids {
            self.refresh_hopeless(id, now);
        }
    }

    /// The control plane's `Punch`: new candidates, punch from `start` (it may be later).
    pub fn handle_punch(&mut self, peer: Key32, candidates: &[SocketAddr], start: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.paths.set_candidates(candidates);
            p.paths.start_punch(start);
            self.arm_birthday(peer, start);
            self.touch(peer);
        }
    }

    /// `rally peer reconnect`: retry every path of `peer` (all peers if `None`) and punch
    /// every candidate again, now.
    pub fn handle_reconnect(&mut self, peer: Option<Key32>, now: Instant) {
        self.now = now;
        let ids: Vec<Key32> = match peer {
            Some(id) => vec![id],
            None => self.peers.keys().copied().collect(),
        };
        for id in ids {
            if let Some(p) = self.peers.get_mut(&id) {
                p.conn.resume(now);
                p.paths.start_punch(now);
                self.touch(id);
            }
        }
    }

    /// A packet for `peer` was sent (or is to be queued with [`Self::enqueue`]).
    pub fn handle_tunnel_tx(&mut self, peer: &Key32, now: Instant) {
        self.now = now;
        if let Some(p) = self.peers.get_mut(peer) {
            p.conn.handle_tx(now);
            self.touch(*peer);
        }
        self.end_hold();
    }

    /// Holds a packet for `peer` while it has no route; it comes back from
    /// [`Self::poll_packet`] once one exists.
    pub fn enqueue(&mut self, peer: &Key32, packet: Vec<u8>) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.conn.enqueue(packet);
            self.touch(*peer);
        }
    }

    /// Pins `path` as `peer`'s primary (`rally path set-primary`).
    pub fn set_primary(&mut self, peer: &Key32, path: &PathId) -> Result<(), NodeError> {
        let p = self.peers.get_mut(peer).ok_or(NodeError::UnknownPeer)?;
        p.conn.set_primary(path)?;
        self.touch(*peer);
        Ok(())
    }

    /// Runs every timer due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        self.flush();
        let before = self.transmits.len();
        self.relays_timeout(now);
        for id in self.deadlines.take_due(now) {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            if p.paths.poll_timeout().is_some_and(|t| now >= t) {
                p.paths.handle_timeout(now);
            }
            if p.conn.poll_timeout().is_some_and(|t| now >= t) {
                p.conn.handle_timeout(now);
            }
            if p.birthday.poll_timeout().is_some_and(|t| now >= t) {
                p.birthday.handle_timeout(now);
            }
            self.dirty.push(id);
        }
        self.flush();
        self.note_burst(self.transmits.len().saturating_sub(before), now);
    }

    // ----- outputs -----

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.flush();
        crate::outputs::pop(&mut self.transmits)
    }

    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.flush();
        crate::outputs::pop(&mut self.events)
    }

    /// A packet held while its peer had no route, now that it has one: encrypt and send it on
    /// [`Self::route`] (oldest first, before newer packets to that peer).
    pub fn poll_packet(&mut self) -> Option<(Key32, Vec<u8>)> {
        self.flush();
        crate::outputs::pop(&mut self.packets)
    }

    /// The first slot of the node's idle grid ([`IDLE_GRID`]) at or after `t`: when an idle
    /// agent's routine work that can wait (the engine's WireGuard timers and discovery tick
    /// while idle) should run, so that it shares the wake-up of the idle peers' probes.
    pub fn idle_slot(&self, t: Instant) -> Instant {
        schedule::align_up(self.epoch, t, IDLE_GRID)
    }

    /// When to call [`Self::handle_timeout`] next, and why.
    pub fn poll_timeout(&mut self) -> Option<(Instant, TimerReason)> {
        self.flush();
        let peer = self
            .deadlines
            .first()
            .map(|(at, id)| (at, self.peer_reason(&id, at)));
        let epoch = self.epoch;
        let relays = self
            .relays
            .poll_timeout(|t| schedule::align_up(epoch, t, IDLE_GRID));
        [peer, relays]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }

    // ----- queries -----

    /// Where `peer`'s traffic goes now: its primary path, if it has one.
    pub fn route(&self, peer: &Key32) -> Option<Route> {
        let p = self.peers.get(peer)?;
        self.route_via(p.short, p.conn.primary()?)
    }

    /// The route of one path (to answer a peer on the path its datagram came by).
    pub fn route_for(&self, peer: &Key32, path: &PathId) -> Option<Route> {
        self.route_via(self.peers.get(peer)?.short, path)
    }

    pub fn peer(&self, peer: &Key32) -> Option<&PeerState> {
        self.peers.get(peer).map(|p| &**p)
    }

    pub fn peers(&self) -> impl Iterator<Item = (&Key32, &PeerState)> {
        self.peers.iter().map(|(id, p)| (id, &**p))
    }

    pub fn peer_by_vip(&self, vip: &Ipv4Addr) -> Option<Key32> {
        self.by_vip.get(vip).copied()
    }

    pub fn peer_by_wg_key(&self, wg_key: &Key32) -> Option<Key32> {
        self.by_wg.get(wg_key).copied()
    }

    /// The address of a relay we know.
    pub fn relay_addr(&self, relay: &RelayId) -> Option<SocketAddr> {
        self.relays.addr(relay)
    }

    pub fn nat(&self) -> Option<&NatReport> {
        self.nat.as_ref()
    }

    // ----- helpers -----

    fn route_via(&self, short: ShortId, path: &PathId) -> Option<Route> {
        match path {
            PathId::Direct(a) => Some(Route::Direct(*a)),
            PathId::Relay(_) | PathId::RelayTcp(_) => self
                .relays
                .path_addr(path)
                .map(|relay| Route::Relay { relay, peer: short }),
        }
    }

    /// Marks a peer whose machines may have output or a new deadline.
    fn touch(&mut self, id: Key32) {
        if self.dirty.last() != Some(&id) {
            self.dirty.push(id);
        }
    }

    fn peer_reason(&self, id: &Key32, at: Instant) -> TimerReason {
        let Some(p) = self.peers.get(id) else {
            return TimerReason::Punch;
        };
        match (p.paths.poll_timeout(), p.conn.next_wake()) {
            (Some(punch), _) if punch == at => TimerReason::Punch,
            (_, Some(w)) => TimerReason::Conn(w.timer),
            _ => TimerReason::Punch,
        }
    }

    /// A probe from peer `sid` on `path`: an ack goes to whichever machine sent its probe.
    fn handle_probe<'a>(
        &mut self,
        path: PathId,
        sid: ShortId,
        d: &[u8],
        now: Instant,
    ) -> Received<'a> {
        let Some(&id) = self.by_short.get(&sid) else {
            return Received::Dropped(DropReason::UnknownShortId);
        };
        let Some(p) = self.peers.get_mut(&id) else {
            return Received::Dropped(DropReason::UnknownShortId);
        };
        let Ok(probe) = Probe::decode(d, &p.paths.key()) else {
            return Received::Dropped(DropReason::BadProbe);
        };
        // An ack through a relay may come back over the relay's other transport (the relay
        // delivers to the session of ours it heard last): it answers the probe either way.
        let mine = probe.kind == ProbeKind::Ack
            && (p.conn.handle_probe_ack(&path, probe.txid, now)
                || path
                    .sibling()
                    .is_some_and(|s| p.conn.handle_probe_ack(&s, probe.txid, now)));
        if probe.kind == ProbeKind::Probe {
            // The peer watches this path this round: ours waits (idle peers only).
            p.conn.handle_peer_probe(&path, now);
        }
        if !mine {
            p.paths.handle_probe(path, probe, now);
        }
        self.touch(id);
        Received::Handled
    }

    /// Frames `payload` for `path` to the peer with short id `to`.
    fn frame(relays: &Relays, path: &PathId, to: &ShortId, payload: &[u8]) -> Option<Transmit> {
        match path {
            PathId::Direct(a) => Some(Transmit {
                to: *a,
                payload: payload.to_vec(),
            }),
            PathId::Relay(_) | PathId::RelayTcp(_) => {
                let addr = relays.path_addr(path)?;
                let mut buf = vec![0u8; DATA_HEADER_LEN + payload.len()];
                write_send_header(&mut buf, to);
                buf[DATA_HEADER_LEN..].copy_from_slice(payload);
                Some(Transmit {
                    to: addr,
                    payload: buf,
                })
            }
        }
    }

    fn new_peer_machines(
        &mut self,
        info: &PeerInfo,
        now: Instant,
    ) -> (PeerPaths, Connection, crate::birthday::Birthday) {
        let peer_public = x25519_dalek::PublicKey::from(info.wg_key.0);
        let shared = self.secret.diffie_hellman(&peer_public);
        let paths = PeerPaths::new(
            self.me,
            rally_proto::probe::probe_key(shared.as_bytes()),
            info.endpoints.clone(),
            self.rng.next_u64(),
        );
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let conn = Connection::new(self.profile.clone(), now, seed);
        let birthday = crate::birthday::Birthday::new(self.me, paths.key(), self.rng.next_u64());
        (paths, conn, birthday)
    }
}

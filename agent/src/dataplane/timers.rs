//! The engine's timers table and the draining of the node: one slot for the node's next
//! deadline (itself the earliest of every peer's, relay's and the netcheck's), one for
//! WireGuard's timers, one for telling the node of recent traffic ([`super::activity`]). The
//! loop sleeps until the earliest; nothing runs on a fixed tick, and no idle peer is visited.
//!
//! boringtun's timers (handshake retries, keepalives, session expiry) are rounded to a second
//! inside boringtun, so its slot comes round every [`WG_TIMERS`] while a tunnel with WireGuard
//! state belongs to a busy peer (or one without a primary path), and every
//! [`WG_TIMERS_IDLE`] while all of them are idle: then the only timer that can fire is session
//! expiry, up to that much later (there is no persistent keepalive: the connection manager's
//! idle probes watch the paths and keep their NAT mappings open). The slot visits only tunnels
//! with state, and an expired session leaves it. A
//! wake-up for the node runs WireGuard's timers and discovery's too when their slots are due
//! within [`WG_COALESCE`], so they share wake-ups; while idle, both slots sit on the node's idle
//! grid (`Node::idle_slot`), where the idle peers' probes and the relay pings are too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rally_proto::control::NatReport;
use rally_proto::relay::DATA_HEADER_LEN;
use rally_proto::Key32;
use tracing::{info, trace};

use super::engine::{Engine, EngineEvent, Peer};
use super::tunnel::{Output, Tunnel, TunnelError};
use crate::conn::{ConnEvent, PathId, RelayId};
use crate::events::{Event, EventType};
use crate::node::{NatCause, NodeEvent, Route, TcpChange, TimerReason, IDLE_GRID};

/// The cadence of WireGuard's timers while any tunnel has state.
pub const WG_TIMERS: Duration = Duration::from_secs(1);
/// The cadence of WireGuard's timers while every tunnel with state belongs to an idle peer:
/// on the slots of the node's idle grid, shared with the idle peers' probes.
pub const WG_TIMERS_IDLE: Duration = IDLE_GRID;
/// A wake-up this close before WireGuard's (or discovery's) slot runs it early.
pub const WG_COALESCE: Duration = Duration::from_millis(500);
/// How long the loop sleeps when nothing at all is scheduled.
const IDLE_FOREVER: Duration = Duration::from_secs(3600);

/// Why the loop wakes (logged at trace level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Node(TimerReason),
    WireGuard,
    Discovery,
    /// The node's hold on the UDP socket after an idle burst ended: read it.
    SocketHold,
    /// Traffic noted a while ago: tell the node ([`super::activity`]).
    Activity,
    Nothing,
}

/// The data plane's clock: the monotonic clock (through tokio's `Instant`, the type of the
/// timers table's slots).
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Engine {
    /// The end of the node's hold on the UDP socket, if one is running (node/hold.rs).
    pub(super) fn socket_hold(&self) -> Option<tokio::time::Instant> {
        if self.activity.has_out() {
            // Traffic out ends the hold: the node has not heard of it yet.
            return None;
        }
        let now = tokio::time::Instant::now();
        self.node
            .read_socket_at(now.into_std())
            .map(tokio::time::Instant::from_std)
    }

    /// The earliest slot of the timers table.
    pub(super) fn next_wake(&mut self) -> (tokio::time::Instant, Wake) {
        let node = self
            .node
            .poll_timeout()
            .map(|(at, why)| (tokio::time::Instant::from_std(at), Wake::Node(why)));
        let wg = self.wg_due.map(|at| (at, Wake::WireGuard));
        let disc = Some((self.disc_due, Wake::Discovery));
        let activity = self
            .activity
            .due()
            .map(|at| (tokio::time::Instant::from_std(at), Wake::Activity));
        [node, wg, disc, activity]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
            .unwrap_or((tokio::time::Instant::now() + IDLE_FOREVER, Wake::Nothing))
    }

    /// The node's idle-grid slot for work due about `at` (which may run up to
    /// [`WG_COALESCE`] early): the idle WireGuard timers and the discovery tick share the
    /// wake-up of the idle peers' probes.
    pub(super) fn idle_slot(&self, at: tokio::time::Instant) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.node.idle_slot((at - WG_COALESCE).into_std()))
    }

    /// A deadline passed: the node's due timers, and WireGuard's if their slot is (nearly) due.
    pub(super) fn handle_timers(&mut self, out: &mut [u8]) {
        // The node's timers judge paths and peers by their traffic: all of it first.
        self.tell_activity();
        let t = tokio::time::Instant::now();
        self.node.handle_timeout(t.into_std());
        self.guard.handle_timeout(t.into_std());
        if self.wg_due.is_some_and(|due| t + WG_COALESCE >= due) {
            self.wg_due = None;
            self.wireguard_timers(out);
        }
        if t + WG_COALESCE >= self.disc_due {
            self.discovery_tick();
        }
    }

    /// Notes that a tunnel has WireGuard state: its timers run from now on.
    pub(super) fn mark_live(&mut self, id: Key32) {
        if self.live.insert(id) && self.wg_due.is_none() {
            self.wg_due = Some(tokio::time::Instant::now() + WG_TIMERS);
        }
    }

    /// Runs WireGuard's timers of every tunnel with state; a tunnel whose session expired
    /// leaves the slot until it is used again.
    fn wireguard_timers(&mut self, out: &mut [u8]) {
        let ids: Vec<Key32> = self.live.iter().copied().collect();
        for id in ids {
            let Some(peer) = self.peers.get_mut(&id) else {
                self.live.remove(&id);
                continue;
            };
            let n = match peer.tunnel.update_timers(&mut out[DATA_HEADER_LEN..]) {
                Ok(Output::Network(b)) => b.len(),
                Ok(_) => continue,
                Err(TunnelError::WireGuard(e)) if e == "ConnectionExpired" => {
                    if peer.connected_at.take().is_some() {
                        info!(peer = %id, "session expired");
                    }
                    self.live.remove(&id);
                    continue;
                }
                Err(e) => {
                    trace!(peer = %id, "timers: {e}");
                    continue;
                }
            };
            if let Some(route) = self.node.route(&id) {
                self.send_framed(route, &mut out[..DATA_HEADER_LEN + n]);
            }
        }
        if !self.live.is_empty() {
            let now = tokio::time::Instant::now();
            let t = now.into_std();
            let all_idle = self
                .live
                .iter()
                .all(|id| self.node.peer(id).is_some_and(|p| p.conn().is_idle(t)));
            self.wg_due = Some(if all_idle {
                self.idle_slot(now + WG_TIMERS_IDLE)
            } else {
                now + WG_TIMERS
            });
        }
    }

    /// Performs what the node queued: datagrams onto the wire, held packets onto their new
    /// route, events to the daemon and the bus.
    pub(super) fn drain_node(&mut self, out: &mut [u8]) {
        // Side sockets first: a path a side socket now carries sends its first probes there.
        while let Some(op) = self.node.poll_side() {
            self.side.apply(op);
        }
        while let Some(tx) = self.node.poll_transmit() {
            self.transmit(tx.to, &tx.payload);
        }
        while let Some(ev) = self.node.poll_event() {
            self.handle_node_event(ev);
        }
        while let Some((id, packet)) = self.node.poll_packet() {
            if let Some(route) = self.node.route(&id) {
                self.encrypt_and_send(id, route, &packet, out);
            }
        }
        // Events may have queued transmits (a new peer's first probes).
        while let Some(tx) = self.node.poll_transmit() {
            self.transmit(tx.to, &tx.payload);
        }
        while let Some(op) = self.node.poll_side() {
            self.side.apply(op);
        }
    }

    fn handle_node_event(&mut self, ev: NodeEvent) {
        match ev {
            NodeEvent::PeerAdded { peer, wg_key } => {
                self.add_tunnel(peer, wg_key);
                self.discovery_peer_added(peer);
            }
            NodeEvent::PeerRemoved { peer, .. } => {
                if let Some(p) = self.peers.remove(&peer) {
                    self.by_index.remove(&p.index);
                }
                self.live.remove(&peer);
                self.disc.remove_peer(&peer);
            }
            NodeEvent::WantPunch(peer) => {
                let _ = self.events.send(EngineEvent::WantPunch(peer));
            }
            NodeEvent::Nat { report, cause } => self.on_nat(report, cause),
            NodeEvent::Conn { peer, name, event } => {
                if let (ConnEvent::PrimaryChange { to, .. }, Some(p)) =
                    (&event, self.peers.get_mut(&peer))
                {
                    p.direct_since = match to {
                        Some(PathId::Direct(_)) => Some(SystemTime::now()),
                        _ => None,
                    };
                }
                if let Some(e) = Event::from_conn(unix_ms(), &name, &event) {
                    self.publish(e);
                }
            }
            NodeEvent::RelayBound { .. } => {}
            NodeEvent::RelayLost { path, reason } => {
                self.publish(
                    Event::new(
                        unix_ms(),
                        EventType::Error,
                        format!("relay binding lost: {reason}"),
                    )
                    .with_path(path),
                );
            }
            NodeEvent::RelayTcp { relay, change } => self.on_relay_tcp(relay, change),
        }
    }

    /// A NAT report: published and handed to `rally netcheck` waiters when a netcheck made it,
    /// passed on to the engine in every case.
    fn on_nat(&mut self, report: NatReport, cause: NatCause) {
        if cause == NatCause::Netcheck {
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
            for w in self.netcheck_waiters.drain(..) {
                let _ = w.send(Ok(report.clone()));
            }
        }
        let _ = self.events.send(EngineEvent::Nat(report));
    }

    /// A relay's TLS/TCP session changed: dial it, or publish the transport change.
    fn on_relay_tcp(&mut self, relay: RelayId, change: TcpChange) {
        let message = match change {
            TcpChange::Dialing => {
                if let Some((slot, endpoint)) = self.node.tcp_slot_of(&relay) {
                    self.tcp.connect(slot, endpoint);
                }
                return;
            }
            TcpChange::Bound => {
                format!("relay {relay} reached over TLS/TCP (UDP to it gets no answer)")
            }
            TcpChange::Closed => {
                let node = &self.node;
                self.tcp.retain(|slot| node.tcp_relay(slot).is_some());
                format!("relay {relay} back on UDP: its TLS/TCP session is closed")
            }
        };
        self.publish(
            Event::new(unix_ms(), EventType::TransportChange, message)
                .with_path(PathId::RelayTcp(relay)),
        );
    }

    fn add_tunnel(&mut self, id: Key32, wg_key: Key32) {
        let index = self.allocate_index();
        let tunnel = Tunnel::new(
            self.secret.clone(),
            boringtun::x25519::PublicKey::from(wg_key.0),
            // No persistent keepalive: the connection manager's probes watch every path and
            // keep its NAT mappings open (docs/architecture.md, "Keepalives").
            None,
            index,
        );
        self.by_index.insert(index, id);
        self.peers.insert(
            id,
            Box::new(Peer {
                tunnel,
                index,
                connected_at: None,
                direct_since: None,
            }),
        );
    }

    pub(super) fn publish(&self, ev: Event) {
        if let Ok(mut bus) = self.bus.lock() {
            bus.publish(ev);
        }
    }
}

/// Where a route sends: used by status rows.
pub(super) fn route_kind(route: Option<Route>) -> crate::api::Strategy {
    use crate::api::Strategy;
    match route {
        Some(Route::Direct(_)) => Strategy::Direct,
        Some(Route::Relay { .. }) => Strategy::Relay,
        None => Strategy::None,
    }
}

//! The peer table: adding, updating and removing peers, the hopeless rule, and draining each
//! peer's machines into the node's outputs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rally_proto::probe::{Probe, ProbeKind};
use rally_proto::relay::{short_id, ShortId};
use rally_proto::{Key32, PeerInfo};
use tracing::info;

use super::relays::Relays;
use super::schedule::IDLE_GRID;
use super::{Node, NodeEvent};
use crate::conn::{Command, ConnEvent, Connection, PathHealth, PathId, Timer};
use crate::paths::{PathEvent, PeerPaths};

/// One peer: what the control plane says about it and the machines that reach it.
pub struct PeerState {
    pub(super) info: Arc<PeerInfo>,
    pub(super) short: ShortId,
    pub(super) paths: PeerPaths,
    pub(super) conn: Connection,
    /// The direct address the connection manager holds as a path (one at a time).
    pub(super) direct: Option<SocketAddr>,
    /// Birthday punching and port prediction (pairs with one symmetric side).
    pub(super) birthday: crate::birthday::Birthday,
    /// When the puncher (or birthday punching) last proved a direct path.
    pub(super) proven_at: Option<Instant>,
}

impl PeerState {
    /// The peer as the control plane describes it (shared with the daemon's view).
    pub fn info(&self) -> &Arc<PeerInfo> {
        &self.info
    }

    pub fn short_id(&self) -> ShortId {
        self.short
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The direct address the connection manager holds as a path, if any.
    pub fn direct(&self) -> Option<SocketAddr> {
        self.direct
    }

    /// Every address punched towards: reported and peer-reflexive.
    pub fn candidates(&self) -> &[SocketAddr] {
        self.paths.candidates()
    }

    pub fn is_punching(&self) -> bool {
        self.paths.is_punching()
    }

    /// The birthday-punching machine (its last attempt, the socket it carries).
    pub fn birthday(&self) -> &crate::birthday::Birthday {
        &self.birthday
    }

    /// Both sides map endpoint-dependently: no punching, relays only.
    pub fn is_hopeless(&self) -> bool {
        self.paths.is_hopeless()
    }

    /// Punch attempts in a row that timed out.
    pub fn punches_failed(&self) -> usize {
        self.paths.punches_failed()
    }

    /// When the latest punch started, and when a direct path was last proven.
    pub fn punch_history(&self) -> (Option<Instant>, Option<Instant>) {
        (self.paths.started_at(), self.proven_at)
    }
}

impl Node {
    /// Adds a peer, or brings an existing one up to date; a new WireGuard key starts afresh.
    pub(super) fn upsert_peer(&mut self, info: Arc<PeerInfo>, now: Instant) {
        let id = info.peer_id;
        if self
            .peers
            .get(&id)
            .is_some_and(|p| p.info.wg_key != info.wg_key)
        {
            self.remove_peer(&id);
        }
        if let Some(p) = self.peers.get_mut(&id) {
            if p.info.virtual_ip != info.virtual_ip {
                self.by_vip.remove(&p.info.virtual_ip);
                self.by_vip.insert(info.virtual_ip, id);
            }
            p.paths.set_candidates(&info.endpoints);
            if p.info.endpoints != info.endpoints {
                // New endpoints (the peer moved): retry its paths and punch every candidate.
                p.conn.resume(now);
                p.paths.start_punch(now);
            } else if !p.paths.is_punching() && p.direct.is_none() {
                p.paths.start_punch(now);
            }
            p.info = info;
            self.refresh_hopeless(id, now);
            self.touch(id);
            return;
        }
        self.add_peer(info, now);
    }

    fn add_peer(&mut self, info: Arc<PeerInfo>, now: Instant) {
        let id = info.peer_id;
        let (paths, mut conn, birthday) = self.new_peer_machines(&info, now);
        for path in self.relays.bound() {
            conn.add_path(path, now);
        }
        info!(peer = %info.name, vip = %info.virtual_ip, endpoints = ?info.endpoints, "peer added");
        let short = short_id(&id);
        self.by_vip.insert(info.virtual_ip, id);
        self.by_wg.insert(info.wg_key, id);
        self.by_short.insert(short, id);
        self.events.push_back(NodeEvent::PeerAdded {
            peer: id,
            wg_key: info.wg_key,
        });
        self.events.push_back(NodeEvent::WantPunch(id));
        self.peers.insert(
            id,
            Box::new(PeerState {
                info,
                short,
                paths,
                conn,
                direct: None,
                birthday,
                proven_at: None,
            }),
        );
        self.refresh_hopeless(id, now);
        if let Some(p) = self.peers.get_mut(&id) {
            p.paths.start_punch(now);
        }
        self.touch(id);
    }

    pub(super) fn remove_peer(&mut self, id: &Key32) {
        let Some(mut p) = self.peers.remove(id) else {
            return;
        };
        p.conn.close();
        p.birthday.stop(self.now);
        while let Some(out) = p.birthday.poll() {
            super::birthday::apply(*id, &mut p, out, &mut self.relays.side, &mut self.events);
        }
        info!(peer = %p.info.name, "peer removed");
        self.by_vip.remove(&p.info.virtual_ip);
        self.by_wg.remove(&p.info.wg_key);
        self.by_short.remove(&p.short);
        self.deadlines.set(*id, None);
        self.dirty.retain(|d| d != id);
        self.packets.retain(|(d, _)| d != id);
        self.events.push_back(NodeEvent::PeerRemoved {
            peer: *id,
            wg_key: p.info.wg_key,
        });
    }

    /// Recomputes whether punching `id` is hopeless from both NAT reports; a pair that stops
    /// being hopeless punches at once.
    pub(super) fn refresh_hopeless(&mut self, id: Key32, now: Instant) {
        let mine = self.nat.as_ref().map(|n| n.mapping).unwrap_or_default();
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        // A peer with a gateway port mapping is reachable at its mapped endpoint whatever its
        // NAT does; it answers our probes (and probes back) even when it does not punch itself.
        let theirs = p.info.nat.as_ref();
        let hopeless = mine.is_endpoint_dependent()
            && theirs
                .is_some_and(|n| n.mapping.is_endpoint_dependent() && n.mapped_endpoint.is_none());
        if p.direct.is_none() {
            let role = crate::birthday::Role::decide(self.nat.as_ref(), theirs);
            p.birthday.reports_changed(role);
            self.dirty.push(id);
        }
        if hopeless == p.paths.is_hopeless() {
            return;
        }
        info!(peer = %p.info.name, hopeless, "punching {}", if hopeless { "stops: both sides map endpoint-dependently" } else { "is possible again" });
        p.paths.set_hopeless(hopeless);
        if !hopeless {
            p.paths.start_punch(now);
        }
        self.touch(id);
    }

    /// Drains every peer given input since the last call, and reschedules it.
    pub(super) fn flush(&mut self) {
        self.drain_relays();
        if self.dirty.is_empty() {
            return;
        }
        let mut ids = std::mem::take(&mut self.dirty);
        ids.sort_unstable();
        ids.dedup();
        for &id in &ids {
            self.drain_peer(id);
        }
        // Keep the allocation.
        ids.clear();
        ids.append(&mut self.dirty);
        self.dirty = ids;
    }

    /// Everything one peer's machines queued: punch results into the connection manager,
    /// probes onto the wire, held packets out once there is a route, events out.
    fn drain_peer(&mut self, id: Key32) {
        let now = self.now;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        loop {
            if let Some(PathEvent::DirectUp(a)) = p.paths.poll_event() {
                direct_up(p, a, now);
                continue;
            }
            if let Some(out) = p.birthday.poll() {
                super::birthday::apply(id, p, out, &mut self.relays.side, &mut self.events);
                continue;
            }
            if let Some((path, probe)) = p.paths.poll_transmit() {
                self.transmits
                    .extend(Node::frame(&self.relays, &path, &p.short, &probe));
                continue;
            }
            if let Some(tx) = p.conn.poll_transmit() {
                let probe = Probe {
                    kind: ProbeKind::Probe,
                    from: self.me,
                    txid: tx.txid,
                }
                .encode(&p.paths.key());
                self.transmits
                    .extend(Node::frame(&self.relays, &tx.path, &p.short, &probe));
                continue;
            }
            if let Some(event) = p.conn.poll_event() {
                on_conn_event(p, &event, now);
                wake_tcp_on(&mut self.relays, &event, now);
                info!(peer = %p.info.name, event = ?event, "connection");
                self.events.push_back(NodeEvent::Conn {
                    peer: id,
                    name: p.info.name.clone(),
                    event,
                });
                continue;
            }
            if let Some(Command::Reconnect { attempt }) = p.conn.poll_command() {
                info!(peer = %p.info.name, attempt, "reconnecting: punching again");
                p.paths.forget_direct(now);
                self.events.push_back(NodeEvent::WantPunch(id));
                continue;
            }
            if p.conn.primary().is_some() {
                if let Some(packet) = p.conn.poll_flush() {
                    self.packets.push_back((id, packet));
                    continue;
                }
            }
            break;
        }
        self.deadlines.set(id, next_deadline(p, self.epoch, now));
    }
}

/// Dials relays over TCP when a connection event says UDP may have stopped working.
fn wake_tcp_on(relays: &mut Relays, event: &ConnEvent, now: Instant) {
    match event {
        // UDP through that relay stopped working: dial it over TCP now.
        ConnEvent::PathDown {
            path: PathId::Relay(r),
        } => Node::wake_tcp(relays, Some(r), now),
        // The primary failed (or every path did): UDP may have stopped for every path (a
        // network that starts blocking it), so the TCP standbys are dialed before the relay
        // paths over UDP fail in turn.
        ConnEvent::PrimaryChange { to: None, .. } | ConnEvent::Failover { .. } => {
            Node::wake_tcp(relays, None, now)
        }
        _ => {}
    }
}

/// When `p` next needs the node: the earliest of its puncher's, connection manager's and
/// birthday machine's timers. An idle peer's keep-warm probes of paths that are up wait for
/// the next slot of the node's idle grid (from `epoch`): idle peers probe together, in one
/// wake-up, instead of each at its own moment. A new or failing path's probes (punched again,
/// recovering) keep their time.
fn next_deadline(p: &PeerState, epoch: Instant, now: Instant) -> Option<Instant> {
    let conn = p.conn.next_wake().map(|w| {
        let up = w.path.as_ref().and_then(|path| p.conn.path_health(path));
        match w.timer {
            Timer::Probe | Timer::ProbeLoss
                if up == Some(PathHealth::Up) && p.conn.is_idle(now) =>
            {
                super::schedule::align_up(epoch, w.at, IDLE_GRID)
            }
            _ => w.at,
        }
    });
    [p.paths.poll_timeout(), conn, p.birthday.poll_timeout()]
        .into_iter()
        .flatten()
        .min()
}

/// The puncher proved `a`: it becomes (again) the connection manager's direct path. A path
/// proven again after the manager lost it is re-added fresh (even if the manager's own probes
/// already saw it up again): a path that never failed takes the primary role back as soon as
/// its first probe is answered.
fn direct_up(p: &mut PeerState, a: SocketAddr, now: Instant) {
    info!(peer = %p.info.name, endpoint = %a, "direct path proven");
    p.birthday.direct_proven(a, now);
    p.proven_at = Some(now);
    let path = PathId::Direct(a);
    match p.direct.replace(a) {
        Some(old) if old != a => {
            p.conn.remove_path(&PathId::Direct(old), now);
        }
        _ => {}
    }
    // Known but not primary: it failed earlier (down, or up again but still earning the role
    // back over `recovery_threshold` probes). The punch just proved it: start it afresh.
    if p.conn.path_health(&path).is_some() && p.conn.primary() != Some(&path) {
        p.conn.remove_path(&path, now);
    }
    p.conn.add_path(path, now);
}

/// The connection manager lost its direct path (it failed over to a relay, or the path went
/// down as a standby): the address may be stale, so the puncher starts over on every
/// candidate and keeps retrying on its backoff ladder until a direct path is proven again.
fn on_conn_event(p: &mut PeerState, event: &ConnEvent, now: Instant) {
    let lost = match event {
        ConnEvent::PathDown {
            path: PathId::Direct(a),
        } => Some(*a),
        ConnEvent::Failover {
            from: PathId::Direct(a),
            ..
        } => Some(*a),
        _ => None,
    };
    if let Some(a) = lost.filter(|a| p.direct == Some(*a)) {
        info!(peer = %p.info.name, endpoint = %a, "direct path lost: punching again");
        p.birthday.direct_lost(a);
        p.paths.forget_direct(now);
    }
}

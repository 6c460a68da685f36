//! The receive side: datagrams from the UDP socket. WireGuard goes through the peer's tunnel
//! here; everything else (STUN, relay control, probes, relayed datagrams) goes to the node,
//! which hands relayed WireGuard back.

use std::net::SocketAddr;

use rally_proto::Key32;
use tracing::{debug, info, trace};

use super::demux::{classify, receiver_index, Datagram, WgKind};
use super::discovery::Admit;
use super::engine::{Buffers, Engine, RX_BUFS};
use super::handshake_guard::{Source, Verdict};
use super::path_timing;
use super::queue_metrics::Point;
use super::timers::now;
use super::tunnel::{initiator_key, Output, TunnelError};
use crate::conn::PathId;
use crate::node::{DropReason, Received};

/// UDP reads per wake-up before the TUN side gets its turn.
const RX_ROUNDS: usize = 8;
/// Frames from relay connections over TCP handled per wake-up (one TUN write for them).
const RX_FRAMES: usize = 64;

impl Engine {
    /// Reads what the UDP socket holds (a few rounds of up to [`RX_BUFS`] datagrams or GRO
    /// trains each), handles every datagram, then writes the decrypted packets to the TUN
    /// device in one batch.
    /// The UDP socket is readable: what it holds, then what the kernel answered at once while
    /// taking those packets (an echo reply, TCP's ACKs), which is on the TUN device already:
    /// read now rather than after a round through the poller.
    pub(super) fn socket_readable(&mut self, b: &mut Buffers) {
        trace!("woke for the socket");
        if self.receive_udp(b) {
            self.drain_tun(b);
        }
    }

    /// Returns whether anything was written to the TUN device.
    pub(super) fn receive_udp(&mut self, b: &mut Buffers) -> bool {
        let mut wrote = false;
        if let Some(left) = self.queues.undrained_since.take() {
            self.queues
                .stats
                .rx_read_gap(now().saturating_duration_since(left));
        }
        self.queues.trace.observe_socket(&self.udp);
        for round in 0..RX_ROUNDS {
            let (n, drained) = {
                path_timing::mark("udp_read_start");
                let mut iovs = b.rx.each_mut().map(|b| std::io::IoSliceMut::new(b));
                match rally_udp::recv_batch(&self.udp, &self.udp_state, &mut iovs, &mut b.meta) {
                    Ok(got) => (got.count, got.drained),
                    Err(e) => {
                        debug!("udp receive: {e}");
                        (0, true)
                    }
                }
            };
            path_timing::mark("udp_read");
            for i in 0..n.min(RX_BUFS) {
                self.take_received(b, i);
            }
            // Deliver this round before reading the next: a lone packet reaches the TUN device
            // one system call sooner, and under load nothing waits behind later rounds.
            wrote |= !self.tun_tx.is_empty();
            super::tx::flush_tun(&self.tun, &mut self.tun_tx, &mut self.gro);
            if drained {
                break;
            }
            if round + 1 == RX_ROUNDS {
                // The socket still holds datagrams: the next read says how long they waited.
                self.queues.undrained_since = Some(now());
            }
        }
        wrote
    }

    pub(super) fn handle_datagram(&mut self, from: SocketAddr, d: &[u8], out: &mut [u8]) {
        if let Datagram::WireGuard(kind) = classify(d) {
            let via = PathId::Direct(from);
            if !self.guard_admits(Source::Addr(from), &via, d, out) {
                return;
            }
            let Some(id) = self.wg_peer(kind, d) else {
                if kind == WgKind::Data {
                    self.rehandshake(None, via, out);
                }
                return;
            };
            self.handle_wireguard(id, via, d, out);
            return;
        }
        self.handle_for_node(from, d, out);
    }

    /// A frame from a relay connection over TLS/TCP (`slot` names it), and up to
    /// [`RX_FRAMES`] more already waiting, then one TUN write: relay messages only, never
    /// WireGuard straight from an address.
    pub(super) fn handle_relay_frames(&mut self, slot: SocketAddr, frame: &[u8], out: &mut [u8]) {
        self.handle_for_node(slot, frame, out);
        for _ in 1..RX_FRAMES {
            let Ok((slot, frame)) = self.tcp.inbound.try_recv() else {
                break;
            };
            self.handle_for_node(slot, &frame, out);
        }
        super::tx::flush_tun(&self.tun, &mut self.tun_tx, &mut self.gro);
    }

    /// What the node takes (STUN, relay messages, probes); WireGuard it hands back from a
    /// relay goes through the guard and the peer's tunnel.
    fn handle_for_node(&mut self, from: SocketAddr, d: &[u8], out: &mut [u8]) {
        match self.node.handle_datagram(from, d, now()) {
            Received::Handled => {}
            Received::WireGuard {
                peer,
                path,
                payload,
            } => {
                // The relay vouches for the sender's id; WireGuard still authenticates the bytes.
                let Datagram::WireGuard(kind) = classify(payload) else {
                    self.drops.unknown_datagram += 1;
                    return;
                };
                let source = match path {
                    PathId::Direct(a) => Source::Addr(a),
                    PathId::Relay(_) | PathId::RelayTcp(_) => match self.node.peer(&peer) {
                        Some(p) => Source::Relayed(p.short_id()),
                        None => return,
                    },
                };
                if !self.guard_admits(source, &path, payload, out) {
                    return;
                }
                match self.wg_peer(kind, payload) {
                    Some(x) if x == peer => self.handle_wireguard(peer, path, payload, out),
                    None if kind == WgKind::Data => self.rehandshake(Some(peer), path, out),
                    _ => {}
                }
            }
            Received::Dropped(why) => self.count_drop(why),
        }
    }

    /// The handshake guard's verdict on a WireGuard datagram; a cookie reply is sent back on
    /// the way it came (only to a direct address: that is what a cookie proves).
    fn guard_admits(&mut self, source: Source, via: &PathId, d: &[u8], out: &mut [u8]) -> bool {
        match self
            .guard
            .check(source, d, now(), &mut out[DATA_HEADER_LEN..])
        {
            Verdict::Pass => true,
            Verdict::CookieReply(reply) => {
                let n = reply.len();
                if let PathId::Direct(to) = via {
                    self.send_udp(&out[DATA_HEADER_LEN..DATA_HEADER_LEN + n], *to);
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
    /// (see [`super::restart::RestartHints`]).
    fn rehandshake(&mut self, known: Option<Key32>, via: PathId, out: &mut [u8]) {
        let t = now();
        let id = match (known, &via) {
            (Some(id), _) => id,
            (None, &PathId::Direct(from)) => {
                let peers = self
                    .node
                    .peers()
                    .map(|(id, p)| (id, p.direct(), p.candidates()));
                let Some(id) = self.restart.peer_at(from, peers, t) else {
                    return;
                };
                id
            }
            (None, &PathId::Relay(_) | &PathId::RelayTcp(_)) => return,
        };
        if !self.restart.may_handshake(id, t) {
            return;
        }
        let Some(route) = self.node.route_for(&id, &via) else {
            return;
        };
        self.mark_live(id);
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let Ok(Output::Network(b)) = peer.tunnel.handshake(&mut out[DATA_HEADER_LEN..], true)
        else {
            return;
        };
        let n = b.len();
        info!(peer = %id, "data for a session we do not have: handshaking again");
        self.send_framed(route, &mut out[..DATA_HEADER_LEN + n]);
    }

    fn count_drop(&mut self, why: DropReason) {
        let d = &mut self.drops;
        match why {
            DropReason::StrayStun => d.stray_stun += 1,
            DropReason::RelayForeign => d.relay_foreign += 1,
            DropReason::Malformed => d.unknown_datagram += 1,
            DropReason::UnknownShortId => d.unknown_short_id += 1,
            DropReason::BadProbe => d.bad_probe += 1,
        }
    }

    fn wg_peer(&mut self, kind: WgKind, d: &[u8]) -> Option<Key32> {
        if kind == WgKind::Initiation {
            let Some(key) = initiator_key(&self.secret, &self.public, d) else {
                self.drops.wireguard += 1;
                return None;
            };
            let id = self.node.peer_by_wg_key(&Key32(key));
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

    fn handle_wireguard(&mut self, id: Key32, via: PathId, d: &[u8], out: &mut [u8]) {
        let from_ip = via.addr().map(|a| a.ip());
        let mut datagram = d;
        loop {
            let Some(peer) = self.peers.get_mut(&id) else {
                return;
            };
            path_timing::mark("demuxed");
            let n = match peer
                .tunnel
                .decapsulate(from_ip, datagram, &mut out[DATA_HEADER_LEN..])
            {
                Ok(Output::Done) => return,
                Ok(Output::Network(b)) => b.len(),
                Ok(Output::Tunnel(packet, src)) => {
                    path_timing::mark("decrypted");
                    let len = packet.len();
                    mark_connected(peer, &id);
                    let vip = self.node.peer(&id).map(|p| p.info().virtual_ip);
                    let packet = &mut out[DATA_HEADER_LEN..DATA_HEADER_LEN + len];
                    self.queues.trace.observe(Point::Decrypted, packet);
                    let admit = if vip != Some(src) {
                        self.drops.spoofed_source += 1;
                        debug!(peer = %id, %src, "inner source is not the peer's virtual IP");
                        Admit::Drop
                    } else {
                        self.accept_inbound_destination(&id, packet)
                    };
                    // CoDel's pick, not ECN-capable: dropped (still the peer's activity).
                    let admit = if admit == Admit::Tun
                        && self.queues.rx_congested
                        && !self.congestion_allows(packet)
                    {
                        Admit::Drop
                    } else {
                        admit
                    };
                    if admit == Admit::Tun && self.tun_tx.push(packet) {
                        super::tx::flush_tun(&self.tun, &mut self.tun_tx, &mut self.gro);
                    }
                    // A subscription message (repeated every 30 s) is not the peer's activity:
                    // it must not keep an idle peer at the busy probe cadence. It is answered
                    // at once with a keepalive: WireGuard's own passive keepalive waits for the
                    // idle timer slot (up to 5 s late), and a sender that hears nothing for
                    // 15 s after data starts a handshake, which is activity on both sides.
                    if admit == Admit::Control {
                        if let Some(route) = self.node.route_for(&id, &via) {
                            self.encrypt_and_send(id, route, &[], out);
                        }
                    } else {
                        self.note_rx(id, &via);
                    }
                    path_timing::mark("admitted");
                    return;
                }
                Err(TunnelError::Duplicate) => {
                    self.drops.duplicate += 1;
                    return;
                }
                Err(e) => {
                    self.drops.wireguard += 1;
                    trace!(peer = %id, "decapsulate: {e}");
                    return;
                }
            };
            // A handshake message (or our data it released): answer on the path the datagram
            // came by. Liveness for that path, not the peer's activity: an idle session's
            // rekey (boringtun's, 120 s after a session that carried data) leaves both peers
            // idle.
            mark_connected(peer, &id);
            self.mark_live(id);
            self.node.handle_tunnel_handshake(&id, &via, now());
            if let Some(route) = self.node.route_for(&id, &via) {
                self.send_framed(route, &mut out[..DATA_HEADER_LEN + n]);
            }
            datagram = &[];
        }
    }
}

use rally_proto::relay::DATA_HEADER_LEN;

fn mark_connected(peer: &mut super::engine::Peer, id: &Key32) {
    if peer.connected_at.is_none() {
        peer.connected_at = Some(std::time::SystemTime::now());
        tracing::info!(peer = %id, "tunnel up");
    }
}

//! The send side: packets from the TUN device, encrypted for their peer and sent on its
//! route (batched for one GSO send), or held by the node while the peer has no route.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use rally_proto::relay::{write_send_header, DATA_HEADER_LEN};
use rally_proto::Key32;
use std::net::UdpSocket;
use tracing::{debug, trace};

use super::batch::{GsoBatch, TunBatch};
use super::engine::{Buffers, Engine};
use super::path_timing;
use super::queue_metrics::Point;
use super::tunnel::Output;
use crate::node::{is_tcp_slot, Route};

impl Engine {
    /// A batch of packets read from the TUN device.
    pub(super) fn handle_tun_batch(&mut self, b: &mut Buffers, n: usize) {
        for (buf, size) in b.tun_bufs.iter().zip(&b.tun_sizes).take(n) {
            self.handle_tun_packet(&buf[..*size], &mut b.out);
        }
        flush_gso(&self.udp, &self.udp_state, &mut self.gso);
    }

    pub(super) fn handle_tun_packet(&mut self, packet: &[u8], out: &mut [u8]) {
        self.queues.trace.observe(Point::TunRead, packet);
        let Some(dst) = ipv4_destination(packet) else {
            self.drops.no_route += 1;
            return;
        };
        if self.disc.is_discovery_destination(dst) {
            self.discovery_from_tun(packet, out);
            return;
        }
        let Some(id) = self.node.peer_by_vip(&dst) else {
            self.drops.no_route += 1;
            trace!(%dst, "no peer for destination");
            return;
        };
        let Some(route) = self.node.route(&id) else {
            // No usable path: the node hears of the traffic at once (a held packet is no
            // tunnel state) and holds it until one comes up.
            self.node.handle_tunnel_tx(&id, super::timers::now());
            self.node.enqueue(&id, packet.to_vec());
            return;
        };
        self.note_tx(id);
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        path_timing::mark("looked_up");
        let n = match peer.tunnel.encapsulate(packet, &mut out[DATA_HEADER_LEN..]) {
            Ok(Output::Network(b)) => b.len(),
            Ok(_) => return,
            Err(e) => {
                debug!(peer = %id, "encapsulate: {e}");
                return;
            }
        };
        path_timing::mark("encrypted");
        let (dest, frame) = match route {
            Route::Direct(a) => (a, &out[DATA_HEADER_LEN..DATA_HEADER_LEN + n]),
            Route::Relay { relay, peer } => {
                write_send_header(&mut out[..DATA_HEADER_LEN], &peer);
                (relay, &out[..DATA_HEADER_LEN + n])
            }
        };
        if is_tcp_slot(&dest) {
            self.send_tcp(dest, frame);
            return;
        }
        if let Some(s) = self.side.carrier(&dest) {
            // A birthday-punched path: its own socket, no GSO batch.
            send(s, frame, dest);
            return;
        }
        if !self.gso.fits(dest, frame.len()) {
            flush_gso(&self.udp, &self.udp_state, &mut self.gso);
        }
        self.gso.push(dest, frame);
    }

    /// Encrypts one packet the node held and sends it on `route`.
    pub(super) fn encrypt_and_send(
        &mut self,
        id: Key32,
        route: Route,
        packet: &[u8],
        out: &mut [u8],
    ) {
        self.mark_live(id);
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let n = match peer.tunnel.encapsulate(packet, &mut out[DATA_HEADER_LEN..]) {
            Ok(Output::Network(b)) => b.len(),
            Ok(_) => return,
            Err(e) => {
                debug!(peer = %id, "encapsulate: {e}");
                return;
            }
        };
        self.send_framed(route, &mut out[..DATA_HEADER_LEN + n]);
    }

    /// Sends `frame[DATA_HEADER_LEN..]` on `route`; for a relay the header is written in front.
    pub(super) fn send_framed(&mut self, route: Route, frame: &mut [u8]) {
        match route {
            Route::Direct(a) => self.send_udp(&frame[DATA_HEADER_LEN..], a),
            Route::Relay { relay, peer } => {
                write_send_header(frame, &peer);
                self.transmit(relay, frame);
            }
        }
    }

    /// Sends one datagram the node framed: over UDP, or over the relay connection a TCP slot
    /// stands for.
    pub(super) fn transmit(&mut self, to: SocketAddr, payload: &[u8]) {
        if is_tcp_slot(&to) {
            self.send_tcp(to, payload);
        } else {
            self.send_udp(payload, to);
        }
    }

    /// Queues a relay message on the connection of a TCP slot (dropped if the node no longer
    /// uses the slot).
    fn send_tcp(&mut self, slot: SocketAddr, msg: &[u8]) {
        match self.node.tcp_relay(&slot) {
            Some(endpoint) => self.tcp.send(slot, endpoint, msg),
            None => self.drops.no_route += 1,
        }
    }
}

/// Sends what the GSO batch holds in one `sendmsg`.
pub(super) fn flush_gso(udp: &UdpSocket, state: &quinn_udp::UdpSocketState, batch: &mut GsoBatch) {
    if let Some((destination, contents, segment_size)) = batch.pending() {
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        path_timing::mark("send_start");
        if let Err(e) = rally_udp::send(udp, state, &transmit) {
            debug!(to = %destination, "udp send: {e}");
        }
        path_timing::mark("sent");
        path_timing::done(path_timing::Side::Tx);
    }
    batch.clear();
}

/// Writes what the TUN batch holds (coalescing TCP segments when the device has offload).
pub(super) fn flush_tun(
    tun: &tun_rs::SyncDevice,
    batch: &mut TunBatch,
    gro: &mut tun_rs::GROTable,
) {
    if batch.is_empty() {
        return;
    }
    let (bufs, offset) = batch.pending();
    // A TUN device's writes do not wait for room (its socket's send buffer is unlimited), so
    // the non-blocking device needs no wait here.
    path_timing::mark("tun_write_start");
    if let Err(e) = tun.send_multiple(gro, bufs, offset) {
        debug!("tun send: {e}");
    }
    path_timing::mark("tun_written");
    path_timing::done(path_timing::Side::Rx);
    batch.clear();
}

impl Engine {
    /// Sends one datagram from the main socket, or from the side socket that carries `to`
    /// (a birthday-punched path).
    pub(super) fn send_udp(&self, bytes: &[u8], to: SocketAddr) {
        match self.side.carrier(&to) {
            Some(s) => send(s, bytes, to),
            None => send(&self.udp, bytes, to),
        }
    }
}

pub(super) fn send(udp: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if let Err(e) = rally_udp::send_to(udp, bytes, to) {
        debug!(%to, "udp send: {e}");
    }
}

fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    match boringtun::noise::Tunn::dst_address(packet)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

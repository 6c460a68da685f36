//! What the engine reports of the peers' WireGuard traffic: data (the peer's activity and
//! liveness for its path) and handshake messages (liveness only).

use std::time::Instant;

use rally_proto::Key32;

use super::Node;
use crate::conn::PathId;

impl Node {
    /// Authenticated WireGuard traffic from `peer` on `path`: liveness for the path, and
    /// proof of a direct one.
    pub fn handle_tunnel_rx(&mut self, peer: &Key32, path: &PathId, now: Instant) {
        self.tunnel_heard(peer, path, now, false);
    }

    /// An authenticated WireGuard handshake message from `peer` on `path`: liveness for the
    /// path and proof of a direct one, as traffic is, but not the peer's activity (an idle
    /// session's rekey leaves the peer idle).
    pub fn handle_tunnel_handshake(&mut self, peer: &Key32, path: &PathId, now: Instant) {
        self.tunnel_heard(peer, path, now, true);
    }

    fn tunnel_heard(&mut self, peer: &Key32, path: &PathId, now: Instant, handshake: bool) {
        self.now = now;
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if handshake {
            p.conn.handle_handshake(path, now);
        } else {
            p.conn.handle_rx(path, now);
        }
        if let PathId::Direct(a) = path {
            p.paths.handle_direct_traffic(*a);
        }
        self.touch(*peer);
    }
}

//! Reading the socket late after an idle burst: when a timeout sends several probes (or relay
//! pings) while every peer is idle, their answers come back within a few milliseconds of each
//! other, each one a wake-up of its own if the engine reads them as they come. The node asks
//! the engine to leave the UDP socket unread for [`SOCKET_HOLD`] after such a burst, so the
//! answers are read together (one wake-up, one batched receive). Only while every peer is idle
//! (no traffic, nothing to delay but keep-warm answers and keepalives); a packet sent to any
//! peer ends the hold at once. The TUN device and the daemon's commands are never held.

use std::time::{Duration, Instant};

use super::Node;

/// How long the socket stays unread after an idle burst. Short against any probe timeout and
/// the idle probes' RTT samples (smoothed; a sample read late is at most this much longer).
pub const SOCKET_HOLD: Duration = Duration::from_millis(10);

/// The fewest datagrams one timeout must send to count as a burst.
const BURST: usize = 2;

impl Node {
    /// When the engine should read the UDP socket again, if not at once: the end of the hold
    /// after an idle burst (see the module docs). `None` (or a time passed): read as usual.
    pub fn read_socket_at(&self, now: Instant) -> Option<Instant> {
        self.socket_hold.filter(|t| *t > now)
    }

    /// Called at the end of [`Node::handle_timeout`] with how many datagrams it queued.
    pub(super) fn note_burst(&mut self, sent: usize, now: Instant) {
        let all_idle = self.peers.values().all(|p| p.conn.is_idle(now));
        if sent >= BURST && all_idle && !self.peers.is_empty() {
            self.socket_hold = Some(now + SOCKET_HOLD);
        }
    }

    /// Traffic: read the socket at once again.
    pub(super) fn end_hold(&mut self) {
        self.socket_hold = None;
    }
}

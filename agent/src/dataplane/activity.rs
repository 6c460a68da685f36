//! What a turn's packets tell the node, told after the packets' sends and writes: a peer's
//! traffic out (its activity) and in (its activity and the path's liveness), and that its
//! tunnel has WireGuard state for the timers to visit.
//!
//! The node's bookkeeping per packet (its peer table, the connection's clocks, the touched
//! set and the deadlines it recomputes) ran from cold caches between a packet's read and its
//! send or TUN write: 3–6 µs on each side after an idle 10 ms (docs/benchmarks.md). Noted
//! here instead (one entry per run of one peer's packets), the node hears it within
//! [`TELL_WITHIN`] of the first packet noted: a slot of the timers table, so the thread goes
//! back to its wait right after a lone packet's send, and the answer it is waiting for (or the
//! far agent sharing its CPU) does not wait behind the bookkeeping. The node's own timers, a
//! status query, and [`MAX_PENDING`] entries tell it at once; while traffic out is noted the
//! node's hold on the socket is not kept (node/hold.rs: traffic ends it). Handshakes, and a
//! packet the node holds for a peer without a route, are told at once (the slow paths).

use std::time::{Duration, Instant};

use rally_proto::Key32;

use super::engine::Engine;
use crate::conn::PathId;

/// Entries noted before they are told at once. Small, so that under load (two to four
/// entries a turn) the node hears of traffic every few turns in portions of a few µs, not
/// in a burst of a whole millisecond's entries in the small packets' way.
const MAX_PENDING: usize = 32;

/// The most the node hears of traffic late: far below any of its clocks (the busiest probe
/// interval, path timeouts), and its own timers tell it first anyway.
const TELL_WITHIN: Duration = Duration::from_millis(1);

/// One run of a peer's packets: out (`None`) or in on a path.
type Entry = (Key32, Option<PathId>);

/// The traffic not yet told, in order, consecutive repeats folded.
#[derive(Default)]
pub(super) struct Activity {
    pending: Vec<Entry>,
    /// When the first pending entry was noted.
    since: Option<Instant>,
}

impl Activity {
    /// Notes a packet out (`via` `None`) or in at `now()` (read only for the first entry);
    /// returns whether the list is full and must be told now. A repeat of the last entry costs
    /// no copy of its path.
    fn note(&mut self, peer: Key32, via: Option<&PathId>, now: impl FnOnce() -> Instant) -> bool {
        let repeat = self
            .pending
            .last()
            .is_some_and(|(p, v)| *p == peer && v.as_ref() == via);
        if !repeat {
            if self.pending.is_empty() {
                self.since = Some(now());
            }
            self.pending.push((peer, via.cloned()));
        }
        self.pending.len() >= MAX_PENDING
    }

    /// When the pending entries must be told: their slot of the timers table.
    pub fn due(&self) -> Option<Instant> {
        self.since.map(|t| t + TELL_WITHIN)
    }

    /// Whether traffic out waits to be told (which ends the node's hold on the socket).
    pub fn has_out(&self) -> bool {
        self.pending.iter().any(|(_, via)| via.is_none())
    }
}

impl Engine {
    /// A packet to `peer` was encrypted for sending.
    pub(super) fn note_tx(&mut self, peer: Key32) {
        if self.activity.note(peer, None, super::timers::now) {
            self.tell_activity();
        }
    }

    /// A data packet from `peer` arrived on `via`.
    pub(super) fn note_rx(&mut self, peer: Key32, via: &PathId) {
        if self.activity.note(peer, Some(via), super::timers::now) {
            self.tell_activity();
        }
    }

    /// Tells the node what the noted packets showed, and registers their tunnels with
    /// WireGuard's timers.
    pub(super) fn tell_activity(&mut self) {
        if self.activity.pending.is_empty() {
            return;
        }
        let t = super::timers::now();
        self.activity.since = None;
        let mut pending = std::mem::take(&mut self.activity.pending);
        for (peer, via) in pending.drain(..) {
            match via {
                None => self.node.handle_tunnel_tx(&peer, t),
                Some(via) => self.node.handle_tunnel_rx(&peer, &via, t),
            }
            self.mark_live(peer);
        }
        self.activity.pending = pending;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn a_run_of_one_peers_packets_is_one_entry_and_the_list_is_bounded() {
        let a = Key32([1; 32]);
        let b = Key32([2; 32]);
        let via = PathId::Direct(SocketAddr::from(([192, 0, 2, 1], 51820)));
        let t0 = Instant::now();
        let mut act = Activity::default();
        assert_eq!(act.due(), None);
        assert!(!act.note(a, Some(&via), || t0));
        assert!(!act.has_out(), "traffic in alone keeps the socket's hold");
        assert_eq!(act.due(), Some(t0 + TELL_WITHIN));
        let later = || t0 + Duration::from_millis(5);
        assert!(!act.note(a, Some(&via), later));
        for _ in 0..10 {
            assert!(!act.note(a, None, later));
        }
        assert!(act.has_out());
        assert!(!act.note(b, None, later));
        assert!(!act.note(a, None, later));
        assert_eq!(
            act.due(),
            Some(t0 + TELL_WITHIN),
            "the first entry's time sets the slot"
        );
        assert_eq!(
            act.pending,
            vec![(a, Some(via)), (a, None), (b, None), (a, None)]
        );
        let mut full = false;
        for i in 0..MAX_PENDING {
            full = act.note(Key32([(i % 2) as u8 + 3; 32]), None, later);
            if full {
                break;
            }
        }
        assert!(full, "the list says when it is full");
        assert_eq!(act.pending.len(), MAX_PENDING);
    }
}

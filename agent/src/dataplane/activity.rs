//! What a turn's packets tell the node, told after the turn's sends and writes: a peer's
//! traffic out (its activity) and in (its activity and the path's liveness), and that its
//! tunnel has WireGuard state for the timers to visit.
//!
//! The node's bookkeeping per packet (its peer table, the connection's clocks, the touched
//! set) ran from cold caches between a packet's read and its send or TUN write: 3–6 µs on
//! each side after an idle 10 ms (docs/benchmarks.md). Noted here instead (one entry per run
//! of one peer's packets), the node hears it before the turn drains its outputs, as it did
//! before. Handshakes, and a packet the node holds for a peer without a route, are told at
//! once (the slow paths).

use rally_proto::Key32;

use super::engine::Engine;
use crate::conn::PathId;

/// Entries noted before they are told at once (a turn of bulk traffic from many peers).
const MAX_PENDING: usize = 256;

/// One run of a peer's packets: out (`None`) or in on a path.
type Entry = (Key32, Option<PathId>);

/// The turn's traffic, in order, consecutive repeats folded.
#[derive(Default)]
pub(super) struct Activity {
    pending: Vec<Entry>,
}

impl Activity {
    /// Notes a packet out (`via` `None`) or in; returns whether the list is full and must be
    /// told now. A repeat of the last entry costs no copy of its path.
    fn note(&mut self, peer: Key32, via: Option<&PathId>) -> bool {
        let repeat = self
            .pending
            .last()
            .is_some_and(|(p, v)| *p == peer && v.as_ref() == via);
        if !repeat {
            self.pending.push((peer, via.cloned()));
        }
        self.pending.len() >= MAX_PENDING
    }
}

impl Engine {
    /// A packet to `peer` was encrypted for sending.
    pub(super) fn note_tx(&mut self, peer: Key32) {
        if self.activity.note(peer, None) {
            self.tell_activity();
        }
    }

    /// A data packet from `peer` arrived on `via`.
    pub(super) fn note_rx(&mut self, peer: Key32, via: &PathId) {
        if self.activity.note(peer, Some(via)) {
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
        let mut act = Activity::default();
        for _ in 0..10 {
            assert!(!act.note(a, None));
        }
        assert!(!act.note(a, Some(&via)));
        assert!(!act.note(a, Some(&via)));
        assert!(!act.note(b, None));
        assert!(!act.note(a, None));
        assert_eq!(
            act.pending,
            vec![(a, None), (a, Some(via)), (b, None), (a, None)]
        );
        let mut full = false;
        for i in 0..MAX_PENDING {
            full = act.note(Key32([(i % 2) as u8 + 3; 32]), None);
            if full {
                break;
            }
        }
        assert!(full, "the list says when it is full");
        assert_eq!(act.pending.len(), MAX_PENDING);
    }
}

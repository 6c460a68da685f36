//! Noticing at once that a peer lost its session (it crashed and restarted, or we did): data
//! for a receiver index we do not know, arriving on a path a peer is known by (its relay short
//! id, or an address it uses or announced), makes us handshake with that peer right away
//! instead of after WireGuard's rekey timers (~15 s of black hole). Both steps are budgeted:
//! a flood of unknown-index data costs a bounded number of peer lookups, and a peer gets at
//! most one handshake per [`HANDSHAKE_EVERY`] from here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rally_proto::limit::TokenBucket;
use rally_proto::Key32;

/// Least time between two handshakes this starts with one peer.
pub const HANDSHAKE_EVERY: Duration = Duration::from_secs(1);
/// Peer lookups by address per second (each walks the peer table).
const LOOKUPS_PER_SECOND: f64 = 20.0;

pub struct RestartHints {
    lookups: TokenBucket,
    last: BTreeMap<Key32, Instant>,
}

impl RestartHints {
    pub fn new(now: Instant) -> Self {
        RestartHints {
            lookups: TokenBucket::new(LOOKUPS_PER_SECOND, LOOKUPS_PER_SECOND, now),
            last: BTreeMap::new(),
        }
    }

    /// Finds the peer that `from` belongs to (its current direct address or a candidate),
    /// within the lookup budget.
    pub fn peer_at<'a>(
        &mut self,
        from: SocketAddr,
        peers: impl Iterator<Item = (&'a Key32, Option<SocketAddr>, &'a [SocketAddr])>,
        now: Instant,
    ) -> Option<Key32> {
        if !self.lookups.try_take(1.0, now) {
            return None;
        }
        peers
            .filter(|(_, direct, candidates)| *direct == Some(from) || candidates.contains(&from))
            .map(|(id, ..)| *id)
            .next()
    }

    /// Whether to handshake with `peer` now (at most once per [`HANDSHAKE_EVERY`]).
    pub fn may_handshake(&mut self, peer: Key32, now: Instant) -> bool {
        self.last
            .retain(|_, t| now.saturating_duration_since(*t) < HANDSHAKE_EVERY);
        if self.last.contains_key(&peer) {
            return false;
        }
        self.last.insert(peer, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
    fn origin() -> Instant {
        Instant::now()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_peer_is_found_by_its_direct_address_or_a_candidate() {
        let t0 = origin();
        let mut h = RestartHints::new(t0);
        let (a, b) = (Key32([1; 32]), Key32([2; 32]));
        let a_cands = [addr("198.51.100.5:51820")];
        let b_cands = [addr("198.51.100.6:51820")];
        let peers = || {
            [
                (&a, None, &a_cands[..]),
                (&b, Some(addr("203.0.113.9:4000")), &b_cands[..]),
            ]
            .into_iter()
        };
        assert_eq!(h.peer_at(addr("198.51.100.5:51820"), peers(), t0), Some(a));
        assert_eq!(h.peer_at(addr("203.0.113.9:4000"), peers(), t0), Some(b));
        assert_eq!(h.peer_at(addr("192.0.2.1:1"), peers(), t0), None);
    }

    #[test]
    fn lookups_and_handshakes_are_budgeted() {
        let t0 = origin();
        let mut h = RestartHints::new(t0);
        let a = Key32([1; 32]);
        let cands = [addr("198.51.100.5:51820")];
        let found = (0..1000)
            .filter(|_| {
                h.peer_at(
                    addr("198.51.100.5:51820"),
                    [(&a, None, &cands[..])].into_iter(),
                    t0,
                )
                .is_some()
            })
            .count();
        assert_eq!(found, LOOKUPS_PER_SECOND as usize);
        assert!(h.may_handshake(a, t0));
        assert!(!h.may_handshake(a, t0 + Duration::from_millis(500)));
        assert!(h.may_handshake(Key32([2; 32]), t0));
        assert!(h.may_handshake(a, t0 + HANDSHAKE_EVERY));
    }
}

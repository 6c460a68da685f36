//! Per-peer deadlines, ordered: the node finds its next wake-up and the peers due at it
//! without walking idle peers.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The grid an idle agent's routine work is rounded up to (from the node's creation): idle
/// peers' keep-warm probes, relay pings, and in the engine WireGuard's idle timers and
/// discovery's tick. Everything that can wait a few seconds happens in one wake-up every
/// `IDLE_GRID` rather than each at its own moment. A multiple of it (25 s idle probes, 200 s
/// standby probes, 10 s relay pings) keeps its cadence exactly once aligned.
pub const IDLE_GRID: Duration = Duration::from_secs(5);

/// The first grid point (`epoch + k * grid`) at or after `t`.
pub fn align_up(epoch: Instant, t: Instant, grid: Duration) -> Instant {
    let since = t.saturating_duration_since(epoch).as_nanos();
    let g = grid.as_nanos().max(1);
    let k = since.div_ceil(g);
    let k = u32::try_from(k).unwrap_or(u32::MAX);
    epoch + grid * k
}

/// One deadline per key, ordered by time. `set` and `take_due` cost O(log n).
#[derive(Debug)]
pub struct Deadlines<K> {
    order: BTreeSet<(Instant, K)>,
    at: HashMap<K, Instant>,
}

impl<K: Ord + Hash + Copy> Default for Deadlines<K> {
    fn default() -> Self {
        Deadlines {
            order: BTreeSet::new(),
            at: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Copy> Deadlines<K> {
    /// Sets (or clears, with `None`) the deadline of `key`.
    pub fn set(&mut self, key: K, deadline: Option<Instant>) {
        if self.at.get(&key).copied() == deadline {
            return;
        }
        if let Some(old) = self.at.remove(&key) {
            self.order.remove(&(old, key));
        }
        if let Some(t) = deadline {
            self.at.insert(key, t);
            self.order.insert((t, key));
        }
    }

    /// The earliest deadline and its key.
    pub fn first(&self) -> Option<(Instant, K)> {
        self.order.first().copied()
    }

    /// Removes and returns the keys due by `now`, earliest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<K> {
        let mut due = Vec::new();
        while let Some(&(t, key)) = self.order.first() {
            if t > now {
                break;
            }
            self.order.pop_first();
            self.at.remove(&key);
            due.push(key);
        }
        due
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_earliest_deadline_comes_first_and_moving_one_forgets_the_old() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        d.set(1u8, Some(t0 + Duration::from_secs(3)));
        d.set(2u8, Some(t0 + Duration::from_secs(1)));
        d.set(1u8, Some(t0 + Duration::from_secs(2)));
        assert_eq!(d.first(), Some((t0 + Duration::from_secs(1), 2)));
        assert_eq!(d.take_due(t0 + Duration::from_secs(2)), vec![2, 1]);
        assert!(d.is_empty());
        d.set(3u8, Some(t0));
        d.set(3u8, None);
        assert_eq!(d.first(), None);
    }
}

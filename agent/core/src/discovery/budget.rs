//! Per-source packet budgets: a token bucket per sender, in a bounded table.
//!
//! The relay has its own `TokenBucket` (crate-private in `rally-relay`); this branch has no
//! shared one, so this is a small bucket of the same shape, to be unified with it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Instant;

/// Senders tracked at once; beyond it the idlest is forgotten (it starts again full, which is
/// at most one burst more for a sender that was quiet).
const MAX_SOURCES: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Packets per second per source, with a burst of one second's worth.
#[derive(Debug)]
pub struct Budgets {
    rate: f64,
    buckets: HashMap<Ipv4Addr, Bucket>,
}

impl Budgets {
    pub fn new(rate_per_sec: u32) -> Budgets {
        Budgets {
            rate: f64::from(rate_per_sec),
            buckets: HashMap::new(),
        }
    }

    /// Takes one packet from `source`'s budget; false when it is spent.
    pub fn take(&mut self, source: Ipv4Addr, now: Instant) -> bool {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= MAX_SOURCES {
            self.evict_idlest();
        }
        let rate = self.rate;
        let b = self.buckets.entry(source).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate.max(1.0));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn evict_idlest(&mut self) {
        if let Some(k) = self
            .buckets
            .iter()
            .min_by_key(|(_, b)| b.at)
            .map(|(k, _)| *k)
        {
            self.buckets.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    #[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
    fn a_flood_gets_the_rate_and_one_burst() {
        let t0 = Instant::now();
        let mut b = Budgets::new(20);
        let src = Ipv4Addr::new(10, 66, 0, 2);
        // 10,000 packets/s for 3 s.
        let passed = (0..30_000u64)
            .filter(|i| b.take(src, t0 + Duration::from_micros(i * 100)))
            .count();
        assert!((79..=81).contains(&passed), "{passed}");
        // Another source has its own budget.
        assert!(b.take(Ipv4Addr::new(10, 66, 0, 3), t0 + Duration::from_secs(3)));
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn the_table_stays_bounded() {
        let t0 = Instant::now();
        let mut b = Budgets::new(1);
        for i in 0..(MAX_SOURCES as u32 + 10) {
            b.take(Ipv4Addr::from(i), t0);
        }
        assert!(b.buckets.len() <= MAX_SOURCES);
    }
}

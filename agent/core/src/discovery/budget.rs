//! Per-source packet budgets: a token bucket per sender, in a bounded table (the workspace's
//! one keyed token bucket, [`rally_proto::limit::KeyedLimiter`]).

use std::net::Ipv4Addr;
use std::time::Instant;

use rally_proto::limit::KeyedLimiter;

/// Senders tracked at once; beyond it, senders whose buckets have refilled are forgotten, and
/// new ones share one overflow budget until there is room.
const MAX_SOURCES: usize = 1024;

/// Packets per second per source, with a burst of one second's worth.
#[derive(Debug)]
pub struct Budgets {
    buckets: KeyedLimiter<Ipv4Addr>,
}

impl Budgets {
    pub fn new(rate_per_sec: u32) -> Budgets {
        let rate = f64::from(rate_per_sec);
        Budgets {
            buckets: KeyedLimiter::new(rate, rate.max(1.0), MAX_SOURCES),
        }
    }

    /// Takes one packet from `source`'s budget; false when it is spent.
    pub fn take(&mut self, source: Ipv4Addr, now: Instant) -> bool {
        self.buckets.allow(source, now)
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

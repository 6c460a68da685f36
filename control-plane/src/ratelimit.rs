//! Token buckets per key (a source address, an agent; sans-IO: the caller passes `now`).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Allows `burst` attempts at once per key, refilled at one per `refill`.
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    burst: u32,
    refill: Duration,
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl<K: Hash + Eq> RateLimiter<K> {
    pub fn new(burst: u32, refill: Duration) -> Self {
        RateLimiter {
            burst,
            refill,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key`: `Ok(())`, or `Err(wait)` with the time until one is free.
    pub fn check(&mut self, key: K, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() > 100_000 {
            self.forget_full(now);
        }
        let burst = f64::from(self.burst);
        let per_sec = 1.0 / self.refill.as_secs_f64();
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_sec).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / per_sec))
        }
    }

    /// Drops buckets that have refilled completely (they hold no information).
    fn forget_full(&mut self, now: Instant) {
        let full_after = self.refill * self.burst;
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.updated) < full_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // an arbitrary start for the fake clock
    fn burst_then_refused_then_refilled() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut r: RateLimiter = RateLimiter::new(3, Duration::from_secs(2));
        for _ in 0..3 {
            assert_eq!(r.check(ip, t0), Ok(()));
        }
        let wait = r.check(ip, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
        assert!(r.check(ip, t0 + Duration::from_secs(1)).is_err());
        assert_eq!(r.check(ip, t0 + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // an arbitrary start for the fake clock
    fn addresses_are_limited_separately() {
        let t0 = Instant::now();
        let mut r: RateLimiter = RateLimiter::new(1, Duration::from_secs(60));
        assert!(r.check("192.0.2.1".parse().unwrap(), t0).is_ok());
        assert!(r.check("192.0.2.1".parse().unwrap(), t0).is_err());
        assert!(r.check("192.0.2.2".parse().unwrap(), t0).is_ok());
    }
}

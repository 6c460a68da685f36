//! Token buckets: per-session packet and byte budgets, and per-key reply budgets.

use std::collections::BTreeMap;
use std::time::Instant;

/// A token bucket holding at most `burst` tokens, refilled at `rate` tokens per second.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Adds the tokens earned since the last call. Time never runs backwards here.
    pub(crate) fn refill(&mut self, now: Instant) {
        // The driver reads the clock once per receive call, so most calls see no time pass.
        if now <= self.last {
            return;
        }
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether `n` tokens are available (call [`TokenBucket::refill`] first).
    pub(crate) fn has(&self, n: f64) -> bool {
        self.tokens >= n
    }

    /// Removes `n` tokens; only call after [`TokenBucket::has`] said yes.
    pub(crate) fn take(&mut self, n: f64) {
        self.tokens -= n;
    }

    /// Refills, then takes `n` tokens if there are that many.
    pub(crate) fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.has(n) {
            self.take(n);
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now` (so forgetting it changes nothing).
    fn full_at(&self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * self.rate >= self.burst
    }
}

/// One token bucket per key, with a bound on how many keys it remembers.
///
/// When the table is full, unknown keys are refused: under a flood of spoofed sources the relay
/// stays silent rather than growing without bound. [`KeyedLimiter::sweep`] forgets keys whose
/// bucket has refilled, which is exactly as if they had never been seen.
#[derive(Debug)]
pub(crate) struct KeyedLimiter<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: BTreeMap<K, TokenBucket>,
}

impl<K: Ord + Copy> KeyedLimiter<K> {
    pub(crate) fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        KeyedLimiter {
            rate,
            burst,
            max_keys,
            buckets: BTreeMap::new(),
        }
    }

    /// Takes one token from `key`'s bucket; false if it is empty or the table is full.
    pub(crate) fn allow(&mut self, key: K, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&key) {
            return b.try_take(1.0, now);
        }
        if self.buckets.len() >= self.max_keys {
            return false;
        }
        let mut b = TokenBucket::new(self.rate, self.burst, now);
        let ok = b.try_take(1.0, now);
        self.buckets.insert(key, b);
        ok
    }

    /// Forgets every key whose bucket is full again.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, b| !b.full_at(now));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
    fn origin() -> Instant {
        Instant::now()
    }

    #[test]
    fn bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = origin();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert!(b.try_take(1.0, t0));
        }
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(100)));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(100)));
        // Ten seconds of refill still caps at the burst.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..5 {
            assert!(b.try_take(1.0, later));
        }
        assert!(!b.try_take(1.0, later));
    }

    #[test]
    fn keyed_limiter_refuses_new_keys_when_full_and_sweeps_idle_ones() {
        let t0 = origin();
        let mut l = KeyedLimiter::new(1.0, 1.0, 2);
        assert!(l.allow(1, t0));
        assert!(!l.allow(1, t0), "one per second");
        assert!(l.allow(2, t0));
        assert!(!l.allow(3, t0), "table full");
        l.sweep(t0 + Duration::from_secs(1));
        assert_eq!(l.len(), 0);
        assert!(l.allow(3, t0 + Duration::from_secs(1)));
    }
}

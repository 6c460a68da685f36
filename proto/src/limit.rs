//! The one token bucket of the workspace, and a table of them keyed by source.
//!
//! Pure: time is a parameter. The relay uses it for per-session packet and byte budgets and
//! per-source reply budgets; the agent for its handshake budgets (global and per source).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A token bucket holding at most `burst` tokens, refilled at `rate` tokens per second.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Adds the tokens earned since the last call. Time never runs backwards here.
    pub fn refill(&mut self, now: Instant) {
        // The driver reads the clock once per receive call, so most calls see no time pass.
        if now <= self.last {
            return;
        }
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Whether `n` tokens are available (call [`TokenBucket::refill`] first).
    pub fn has(&self, n: f64) -> bool {
        self.tokens >= n
    }

    /// Removes `n` tokens; only call after [`TokenBucket::has`] said yes.
    pub fn take(&mut self, n: f64) {
        self.tokens -= n;
    }

    /// Refills, then takes `n` tokens if there are that many.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
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
/// When the table is full, [`KeyedLimiter::allow`] first forgets the buckets that have refilled
/// (exactly as if those keys had never been seen); if none has, an unknown key shares one
/// *overflow* bucket with every other unknown key. So a flood of spoofed sources can neither
/// grow the table without bound nor lock out every new source: new sources are held to one
/// budget between them until the table has room again.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: BTreeMap<K, TokenBucket>,
    overflow: Option<TokenBucket>,
    /// When a full table last swept itself (a sweep costs O(keys): at most one per
    /// [`FULL_SWEEP_EVERY`], however fast new keys arrive).
    last_full_sweep: Option<Instant>,
}

/// Least time between the sweeps a full table makes on its own.
pub const FULL_SWEEP_EVERY: Duration = Duration::from_millis(100);

impl<K: Ord + Copy> KeyedLimiter<K> {
    /// Each key gets `rate` tokens per second up to `burst`; at most `max_keys` keys are kept.
    pub fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        KeyedLimiter {
            rate,
            burst,
            max_keys,
            buckets: BTreeMap::new(),
            overflow: None,
            last_full_sweep: None,
        }
    }

    /// Takes one token from `key`'s bucket; false if it is empty (or, with the table full of
    /// busy keys, if the shared overflow bucket is).
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        self.allow_n(key, 1.0, now)
    }

    /// Takes `n` tokens from `key`'s bucket, as [`KeyedLimiter::allow`].
    pub fn allow_n(&mut self, key: K, n: f64, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&key) {
            return b.try_take(n, now);
        }
        let sweep_due = self
            .last_full_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= FULL_SWEEP_EVERY);
        if self.buckets.len() >= self.max_keys && sweep_due {
            self.last_full_sweep = Some(now);
            self.sweep(now);
        }
        if self.buckets.len() >= self.max_keys {
            let (rate, burst) = (self.rate, self.burst);
            return self
                .overflow
                .get_or_insert_with(|| TokenBucket::new(rate, burst, now))
                .try_take(n, now);
        }
        let mut b = TokenBucket::new(self.rate, self.burst, now);
        let ok = b.try_take(n, now);
        self.buckets.insert(key, b);
        ok
    }

    /// Forgets every key whose bucket is full again.
    pub fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, b| !b.full_at(now));
        if self.overflow.as_ref().is_some_and(|b| b.full_at(now)) {
            self.overflow = None;
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn keyed_limiter_sweeps_idle_keys_to_make_room() {
        let t0 = origin();
        let mut l = KeyedLimiter::new(1.0, 1.0, 2);
        assert!(l.allow(1, t0));
        assert!(!l.allow(1, t0), "one per second");
        assert!(l.allow(2, t0));
        l.sweep(t0 + Duration::from_secs(1));
        assert_eq!(l.len(), 0);
        assert!(l.allow(3, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_full_table_does_not_refuse_every_new_source() {
        let t0 = origin();
        let mut l = KeyedLimiter::new(1.0, 2.0, 2);
        // Two busy sources fill the table.
        assert!(l.allow(1, t0) && l.allow(2, t0));
        // New sources still get in, on one shared budget (the overflow bucket's burst)...
        assert!(
            l.allow(3, t0),
            "a new source is let in although the table is full"
        );
        assert!(l.allow(4, t0));
        assert!(!l.allow(5, t0), "...which they share");
        assert_eq!(l.len(), 2, "the table does not grow");
        // Half a second later the shared budget has earned half a token: still nothing.
        assert!(!l.allow(8, t0 + Duration::from_millis(500)));
        // Once the busy keys' buckets have refilled, the full table makes room on its own.
        assert!(l.allow(6, t0 + Duration::from_secs(1)));
        assert_eq!(l.len(), 1, "swept, then the new key");
    }
}

//! Exponential backoff with jitter, as data: `min(max, base·2^(n-1))·(1±jitter)` for attempt `n`.
//! Sans-IO: the jitter comes from a seeded RNG, so schedules are exact in tests.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The shape of a backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    pub base: Duration,
    pub max: Duration,
    /// Fraction of the delay added or taken away at random (0.3 = ±30%).
    pub jitter: f64,
    /// Attempts before giving up (`None`: never).
    pub attempts: Option<u32>,
}

impl BackoffPolicy {
    /// The delay before attempt `n` (1-based) without jitter.
    pub fn nominal(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// A running schedule.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
    rng: ChaCha8Rng,
}

impl Backoff {
    pub fn new(policy: BackoffPolicy, seed: [u8; 32]) -> Self {
        Backoff {
            policy,
            attempt: 0,
            rng: ChaCha8Rng::from_seed(seed),
        }
    }

    /// The delay before the next attempt, or `None` when the attempts are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.policy.attempts.is_some_and(|max| self.attempt >= max) {
            return None;
        }
        self.attempt += 1;
        let nominal = self.policy.nominal(self.attempt).as_secs_f64();
        let j = self.policy.jitter;
        let factor = if j > 0.0 {
            self.rng.gen_range(1.0 - j..=1.0 + j)
        } else {
            1.0
        };
        Some(Duration::from_secs_f64(nominal * factor))
    }

    /// Attempts made since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            base: Duration::from_secs(2),
            max: Duration::from_secs(60),
            jitter: 0.3,
            attempts: Some(10),
        }
    }

    #[test]
    fn delays_follow_the_formula_within_the_jitter_band() {
        let mut b = Backoff::new(policy(), [7; 32]);
        for n in 1..=10u32 {
            let nominal = (2.0 * 2f64.powi(n as i32 - 1)).min(60.0);
            let d = b.next_delay().unwrap().as_secs_f64();
            assert!(
                d >= nominal * 0.7 - 1e-9 && d <= nominal * 1.3 + 1e-9,
                "attempt {n}: {d} outside {nominal}±30%"
            );
        }
        assert_eq!(b.next_delay(), None);
    }

    #[test]
    fn same_seed_same_schedule() {
        let mut a = Backoff::new(policy(), [1; 32]);
        let mut b = Backoff::new(policy(), [1; 32]);
        for _ in 0..10 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(
            BackoffPolicy {
                jitter: 0.0,
                ..policy()
            },
            [0; 32],
        );
        assert_eq!(b.next_delay(), Some(Duration::from_secs(2)));
        assert_eq!(b.next_delay(), Some(Duration::from_secs(4)));
        b.reset();
        assert_eq!(b.next_delay(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn unlimited_policy_never_gives_up_and_caps_at_max() {
        let mut b = Backoff::new(
            BackoffPolicy {
                jitter: 0.0,
                attempts: None,
                ..policy()
            },
            [0; 32],
        );
        let last = (0..100).map(|_| b.next_delay().unwrap()).last().unwrap();
        assert_eq!(last, Duration::from_secs(60));
    }
}

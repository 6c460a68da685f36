//! The health of one path: consecutive failures and successes, smoothed latency, up or down.
//! Pure bookkeeping: [`Connection`](super::Connection) decides when probes are sent and what a
//! transition means for the primary.

use std::time::Duration;

use serde::Serialize;

use super::Profile;

/// A new RTT sample's weight in the latency average is `1 / RTT_WEIGHT` (TCP's SRTT uses 8;
/// 4 follows a changed path a little faster). Integer weights keep the average exact.
const RTT_WEIGHT: u32 = 4;

/// Whether a path may carry traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathHealth {
    /// Added, never acknowledged a probe in time.
    Probing,
    /// Usable.
    Up,
    /// Failed `failure_threshold` probes in a row; still probed, usable again after a good one.
    Down,
}

/// What a probe outcome did to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    None,
    WentUp,
    WentDown,
}

#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub state: PathHealth,
    pub failures: u32,
    pub successes: u32,
    pub rtt: Option<Duration>,
    /// The path's recent variation, from which [`Health::jitter`] is read.
    pub variation: Variation,
    /// Has been down since it was added: it must then earn the primary role back.
    pub has_failed: bool,
    pub probes_sent: u64,
    pub probes_failed: u64,
}

impl Health {
    pub fn new() -> Health {
        Health {
            state: PathHealth::Probing,
            failures: 0,
            successes: 0,
            rtt: None,
            variation: Variation::default(),
            has_failed: false,
            probes_sent: 0,
            probes_failed: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.state == PathHealth::Up
    }

    /// Whether the path may take the primary role from a lower-priority path: at once if it
    /// never failed, else after `recovery_threshold` good probes in a row.
    pub fn is_trusted(&self, profile: &Profile) -> bool {
        self.is_up() && (!self.has_failed || self.successes >= profile.recovery_threshold)
    }

    /// A probe was acknowledged after `rtt`: a success if within `max_latency`, else a failure.
    /// Either way the sample feeds the latency average.
    pub fn on_ack(&mut self, rtt: Duration, profile: &Profile) -> Transition {
        self.sample(rtt);
        if rtt > profile.max_latency {
            return self.on_failure(profile);
        }
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        if self.state == PathHealth::Up {
            return Transition::None;
        }
        self.state = PathHealth::Up;
        Transition::WentUp
    }

    /// A probe went unanswered (or answered too late).
    pub fn on_failure(&mut self, profile: &Profile) -> Transition {
        self.probes_failed += 1;
        self.successes = 0;
        self.failures = self.failures.saturating_add(1);
        if self.state != PathHealth::Up || self.failures < profile.failure_threshold {
            return Transition::None;
        }
        self.state = PathHealth::Down;
        self.has_failed = true;
        Transition::WentDown
    }

    /// A silence check failed: the path carried data, then answered nothing (no data, none of
    /// the `lost` check probes) in time. It is down at once, whatever the failure count.
    pub fn on_silence(&mut self, lost: u32, profile: &Profile) -> Transition {
        self.probes_failed += u64::from(lost);
        self.successes = 0;
        self.failures = self.failures.max(profile.failure_threshold);
        if self.state != PathHealth::Up {
            return Transition::None;
        }
        self.state = PathHealth::Down;
        self.has_failed = true;
        Transition::WentDown
    }

    /// Authenticated data arrived on the path: it is alive, whatever the probes say — unless it
    /// is measured slower than `max_latency`, which traffic does not excuse.
    pub fn on_traffic(&mut self, profile: &Profile) {
        if self.rtt.is_none_or(|rtt| rtt <= profile.max_latency) {
            self.failures = 0;
        }
    }

    /// The ack of a probe that already counted as lost: only the latency average learns.
    pub fn on_late_ack(&mut self, rtt: Duration) {
        self.sample(rtt);
    }

    /// Feeds an RTT sample to the average and to the variation.
    fn sample(&mut self, rtt: Duration) {
        self.variation.sample(rtt);
        self.rtt = Some(match self.rtt {
            Some(avg) => (avg * (RTT_WEIGHT - 1) + rtt) / RTT_WEIGHT,
            None => rtt,
        });
    }

    /// The path's jitter: the median difference between consecutive RTT samples over the last
    /// [`JITTER_SAMPLES`] differences, once there are at least half that many. A median, so a
    /// step (a route change) or a lone spike is not jitter: only variation that persists is.
    pub fn jitter(&self) -> Option<Duration> {
        self.variation.median()
    }
}

/// Differences between consecutive RTT samples kept for the jitter.
pub(crate) const JITTER_SAMPLES: usize = 8;

/// The last [`JITTER_SAMPLES`] differences between consecutive RTT samples, in units of
/// 100 µs (saturating at 6.5 s): 24 bytes a path.
#[derive(Debug, Clone, Default)]
pub(crate) struct Variation {
    diffs: [u16; JITTER_SAMPLES],
    /// The last sample, in µs (0: none yet).
    last_us: u32,
    /// Differences stored so far, at most [`JITTER_SAMPLES`].
    filled: u8,
    /// Where the next difference goes.
    next: u8,
}

impl Variation {
    fn sample(&mut self, rtt: Duration) {
        let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX).max(1);
        if self.last_us != 0 {
            let diff = self.last_us.abs_diff(us) / 100;
            self.diffs[usize::from(self.next)] = u16::try_from(diff).unwrap_or(u16::MAX);
            self.next = (self.next + 1) % JITTER_SAMPLES as u8;
            self.filled = (self.filled + 1).min(JITTER_SAMPLES as u8);
        }
        self.last_us = us;
    }

    fn median(&self) -> Option<Duration> {
        let n = usize::from(self.filled);
        if n < JITTER_SAMPLES / 2 {
            return None;
        }
        let mut sorted = self.diffs;
        let sorted = &mut sorted[..n];
        sorted.sort_unstable();
        // The lower median: a single outlier in an even count does not lift it.
        Some(Duration::from_micros(u64::from(sorted[(n - 1) / 2]) * 100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_latency_average_weighs_a_new_sample_a_quarter() {
        let p = Profile::stable();
        let mut h = Health::new();
        h.on_ack(ms(100), &p);
        assert_eq!(h.rtt, Some(ms(100)));
        h.on_ack(ms(400), &p);
        assert_eq!(h.rtt, Some(ms(175)));
        h.on_ack(ms(400), &p);
        assert_eq!(h.rtt, Some(Duration::from_micros(231_250)));
    }

    #[test]
    fn jitter_is_the_median_difference_between_consecutive_samples() {
        let p = Profile::stable();
        let mut h = Health::new();
        for rtt in [100, 110, 100, 104] {
            h.on_ack(ms(rtt), &p);
        }
        assert_eq!(h.jitter(), None, "three differences are too few");
        h.on_late_ack(ms(100));
        // Differences 10, 10, 4, 4: the lower median.
        assert_eq!(h.jitter(), Some(ms(4)));
        for rtt in [110, 100, 110, 100] {
            h.on_ack(ms(rtt), &p);
        }
        assert_eq!(
            h.jitter(),
            Some(ms(10)),
            "the oldest fall out of the window"
        );
    }

    #[test]
    fn a_step_or_a_spike_is_not_jitter() {
        let p = Profile::stable();
        let mut h = Health::new();
        for rtt in [40, 40, 40, 40, 400, 40, 40, 40, 80, 80, 80, 80] {
            h.on_ack(ms(rtt), &p);
        }
        assert_eq!(h.jitter(), Some(ms(0)));
    }

    #[test]
    fn a_late_ack_counts_as_a_failure_but_is_measured() {
        let p = Profile::stable();
        let mut h = Health::new();
        h.on_ack(ms(50), &p);
        assert_eq!(h.on_ack(ms(900), &p), Transition::None);
        assert_eq!((h.failures, h.successes), (1, 0));
        assert_eq!(h.rtt, Some(Duration::from_micros(262_500)));
    }

    #[test]
    fn a_path_goes_down_at_the_threshold_and_must_then_earn_trust() {
        let p = Profile::stable();
        let mut h = Health::new();
        assert_eq!(h.on_ack(ms(10), &p), Transition::WentUp);
        assert!(h.is_trusted(&p));
        assert_eq!(h.on_failure(&p), Transition::None);
        assert_eq!(h.on_failure(&p), Transition::None);
        assert_eq!(h.on_failure(&p), Transition::WentDown);
        assert_eq!(h.on_ack(ms(10), &p), Transition::WentUp);
        assert!(!h.is_trusted(&p));
        for _ in 1..p.recovery_threshold {
            h.on_ack(ms(10), &p);
        }
        assert!(h.is_trusted(&p));
    }

    #[test]
    fn traffic_clears_the_failure_count() {
        let p = Profile::stable();
        let mut h = Health::new();
        h.on_ack(ms(10), &p);
        h.on_failure(&p);
        h.on_failure(&p);
        h.on_traffic(&p);
        assert_eq!(h.on_failure(&p), Transition::None);
        assert!(h.is_up());
    }

    #[test]
    fn traffic_does_not_excuse_a_path_slower_than_max_latency() {
        let p = Profile::stable();
        let mut h = Health::new();
        h.on_ack(ms(100), &p);
        // Probes time out; their late acks show a 1.4 s round trip.
        for _ in 0..4 {
            h.on_failure(&p);
            h.on_late_ack(ms(1400));
            h.on_traffic(&p);
        }
        assert!(h.rtt.unwrap() > p.max_latency);
        assert!(!h.is_up(), "a path carrying data at 1.4 s RTT must fail");
    }

    #[test]
    fn a_failed_silence_check_takes_an_up_path_down_at_once() {
        let p = Profile::stable();
        let mut h = Health::new();
        h.on_ack(ms(10), &p);
        assert_eq!(h.on_silence(3, &p), Transition::WentDown);
        assert_eq!((h.failures, h.probes_failed), (p.failure_threshold, 3));
        assert!(h.has_failed);
        assert_eq!(h.on_silence(3, &p), Transition::None, "already down");
    }
}

//! Connection profiles: the numbers that tune probing, failover and reconnecting.
//!
//! A profile is plain data; [`Connection`](super::Connection) reads it and never changes it.
//! The three named profiles are chosen with `rally up --profile stable|unstable|low-bandwidth`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::backoff::BackoffPolicy;

/// The named profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProfileKind {
    Stable,
    Unstable,
    LowBandwidth,
}

impl ProfileKind {
    /// Every named profile, in the order the CLI lists them.
    pub const ALL: [ProfileKind; 3] = [
        ProfileKind::Stable,
        ProfileKind::Unstable,
        ProfileKind::LowBandwidth,
    ];

    /// The name used on the command line: `stable`, `unstable` or `low-bandwidth`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Stable => "stable",
            ProfileKind::Unstable => "unstable",
            ProfileKind::LowBandwidth => "low-bandwidth",
        }
    }

    /// The profile's numbers.
    pub fn profile(self) -> Profile {
        match self {
            ProfileKind::Stable => Profile::stable(),
            ProfileKind::Unstable => Profile::unstable(),
            ProfileKind::LowBandwidth => Profile::low_bandwidth(),
        }
    }
}

impl fmt::Display for ProfileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A profile name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown profile {0:?}: expected stable, unstable or low-bandwidth")]
pub struct UnknownProfile(pub String);

impl FromStr for ProfileKind {
    type Err = UnknownProfile;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProfileKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownProfile(s.to_string()))
    }
}

impl FromStr for Profile {
    type Err = UnknownProfile;

    /// Parses `stable`, `unstable` or `low-bandwidth` into that profile's numbers.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<ProfileKind>().map(ProfileKind::profile)
    }
}

/// A profile whose numbers contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("failure and recovery thresholds must be at least 1")]
    ZeroThreshold,
    #[error("the probe timeout must be positive and no longer than the probe interval")]
    ProbeTimeout,
    #[error("the idle probe interval must be at least the probe interval")]
    IdleInterval,
    #[error("the degraded latency must not exceed the maximum latency")]
    Latency,
    #[error("the silence timeout must be positive")]
    SilenceTimeout,
}

/// How a [`Connection`](super::Connection) probes, judges and repairs its paths.
///
/// A probe *succeeds* when its acknowledgement arrives within `max_latency`; it *fails* when the
/// acknowledgement is later than that (a late ack still feeds the latency average) or does not
/// arrive within `probe_timeout`.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Which named profile these numbers came from (`None` for a hand-made profile).
    pub kind: Option<ProfileKind>,
    /// Time between probes on each live path while the peer is busy, or while there is no
    /// usable path at all.
    pub probe_interval: Duration,
    /// Time after which an unacknowledged probe counts as lost (at most `probe_interval`).
    pub probe_timeout: Duration,
    /// Time between probes on each path while the peer is idle (no data for `idle_after`):
    /// cheap, and short enough to keep NAT mappings of standby paths open.
    pub idle_probe_interval: Duration,
    /// A peer with no data in either direction for this long is idle.
    pub idle_after: Duration,
    /// Data sent on the primary with nothing heard back on it (no data, no probe ack) for this
    /// long, or for twice the path's smoothed RTT if that is longer, starts a silence check:
    /// a few quick probes that take the path down at once if none is answered. This is how a
    /// busy peer fails over in well under a second while idle peers probe rarely.
    pub silence_timeout: Duration,
    /// A new connection without a usable path after this long starts reconnecting.
    pub connect_timeout: Duration,
    /// Consecutive failed probes after which a path is down.
    pub failure_threshold: u32,
    /// Consecutive successful probes a path that has been down needs before it may take the
    /// primary role back from a lower-priority path.
    pub recovery_threshold: u32,
    /// An acknowledgement slower than this counts as a failed probe.
    pub max_latency: Duration,
    /// Above this primary latency (EWMA) the connection is `degraded`.
    pub degraded_latency: Duration,
    /// Above this latency (EWMA) a relayed primary looks for a faster relay.
    pub relay_switch_latency: Duration,
    /// Reconnect schedule: attempt delays `min(max, base·2^(n-1))·(1±jitter)`.
    pub backoff: BackoffPolicy,
    /// Packets held for a peer with no usable path; beyond this the oldest are dropped.
    pub queue_len: usize,
}

impl Profile {
    /// The default, for home and office broadband.
    ///
    /// Probes every 1 s while busy (25 s while idle, as WireGuard's usual persistent keepalive:
    /// under the common 30 s UDP NAT timeout), a probe is lost after 1 s; a path fails
    /// after 3 failed probes, or at once when it carries our data and a silence check after
    /// 200 ms without an answer goes unanswered (so a busy peer fails over in well under a
    /// second), and takes the primary role back after 5 good probes. Latency: failed above 500 ms, `degraded` above
    /// 200 ms, relay switching above 200 ms. Reconnect: 2 s doubling to 60 s, ±30 %, 10
    /// attempts. Queue: 256 packets.
    pub fn stable() -> Profile {
        Profile {
            kind: Some(ProfileKind::Stable),
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            idle_probe_interval: Duration::from_secs(25),
            idle_after: Duration::from_secs(30),
            silence_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
            failure_threshold: 3,
            recovery_threshold: 5,
            max_latency: Duration::from_millis(500),
            degraded_latency: Duration::from_millis(200),
            relay_switch_latency: Duration::from_millis(200),
            backoff: BackoffPolicy {
                base: Duration::from_secs(2),
                max: Duration::from_secs(60),
                jitter: 0.3,
                attempts: Some(10),
            },
            queue_len: 256,
        }
    }

    /// For networks that drop out often (Wi-Fi roaming, mobile tethering).
    ///
    /// Probes every 500 ms (5 s while idle), a probe is lost after 500 ms, and a path fails
    /// after only 2 failed probes (or a failed silence check after 150 ms without an answer);
    /// it must then answer 8 probes in
    /// a row before it is trusted with the primary role again, so a flapping path is not taken
    /// back. Latency limits are looser (failed above 800 ms, `degraded` above 300 ms) because
    /// such links jitter. Reconnect: 1 s doubling to 30 s, ±30 %, 20 attempts (these networks
    /// come back by themselves). Queue: 512 packets, to ride out short gaps.
    pub fn unstable() -> Profile {
        Profile {
            kind: Some(ProfileKind::Unstable),
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(500),
            idle_probe_interval: Duration::from_secs(5),
            idle_after: Duration::from_secs(30),
            silence_timeout: Duration::from_millis(150),
            connect_timeout: Duration::from_secs(10),
            failure_threshold: 2,
            recovery_threshold: 8,
            max_latency: Duration::from_millis(800),
            degraded_latency: Duration::from_millis(300),
            relay_switch_latency: Duration::from_millis(200),
            backoff: BackoffPolicy {
                base: Duration::from_secs(1),
                max: Duration::from_secs(30),
                jitter: 0.3,
                attempts: Some(20),
            },
            queue_len: 512,
        }
    }

    /// For slow or metered links (satellite, rural DSL, GPRS): few probes, patient limits.
    ///
    /// Probes every 5 s while busy and 25 s while idle (just under the common 30 s UDP NAT
    /// timeout, so standby paths stay open), a probe is lost after 3 s; a path fails after 3
    /// failed probes (or a failed silence check after 1 s without an answer) and takes the
    /// primary role back after 3 good ones (each one costs 5 s).
    /// Latency: failed above 1500 ms, `degraded` above 600 ms, relay switching above 200 ms.
    /// Reconnect: 5 s doubling to 120 s, ±30 %, 10 attempts. Queue: 64 packets, so a reconnect
    /// does not flood the link with a stale burst.
    pub fn low_bandwidth() -> Profile {
        Profile {
            kind: Some(ProfileKind::LowBandwidth),
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            idle_probe_interval: Duration::from_secs(25),
            idle_after: Duration::from_secs(60),
            silence_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(20),
            failure_threshold: 3,
            recovery_threshold: 3,
            max_latency: Duration::from_millis(1500),
            degraded_latency: Duration::from_millis(600),
            relay_switch_latency: Duration::from_millis(200),
            backoff: BackoffPolicy {
                base: Duration::from_secs(5),
                max: Duration::from_secs(120),
                jitter: 0.3,
                attempts: Some(10),
            },
            queue_len: 64,
        }
    }

    /// Checks that the numbers fit together (the named profiles always do).
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.failure_threshold == 0 || self.recovery_threshold == 0 {
            return Err(ProfileError::ZeroThreshold);
        }
        if self.probe_timeout.is_zero() || self.probe_timeout > self.probe_interval {
            return Err(ProfileError::ProbeTimeout);
        }
        if self.idle_probe_interval < self.probe_interval {
            return Err(ProfileError::IdleInterval);
        }
        if self.degraded_latency > self.max_latency {
            return Err(ProfileError::Latency);
        }
        if self.silence_timeout.is_zero() {
            return Err(ProfileError::SilenceTimeout);
        }
        Ok(())
    }
}

impl Default for Profile {
    fn default() -> Self {
        Profile::stable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_has_the_documented_defaults() {
        let p = Profile::stable();
        assert_eq!(p.failure_threshold, 3);
        assert_eq!(p.recovery_threshold, 5);
        assert_eq!(p.max_latency, Duration::from_millis(500));
        assert_eq!(p.silence_timeout, Duration::from_millis(200));
        assert_eq!(p.idle_probe_interval, Duration::from_secs(25));
        assert_eq!(p.degraded_latency, Duration::from_millis(200));
        assert_eq!(p.relay_switch_latency, Duration::from_millis(200));
        assert_eq!(p.backoff.base, Duration::from_secs(2));
        assert_eq!(p.backoff.max, Duration::from_secs(60));
        assert_eq!(p.backoff.attempts, Some(10));
        assert_eq!(p.backoff.jitter, 0.3);
        assert_eq!(p.queue_len, 256);
    }

    #[test]
    fn every_named_profile_is_valid_and_parses_from_its_name() {
        for kind in ProfileKind::ALL {
            let p: Profile = kind.as_str().parse().unwrap();
            assert_eq!(p.kind, Some(kind));
            assert_eq!(p.validate(), Ok(()));
        }
    }

    #[test]
    fn unstable_probes_faster_and_low_bandwidth_slower() {
        let (s, u, l) = (
            Profile::stable(),
            Profile::unstable(),
            Profile::low_bandwidth(),
        );
        assert!(u.probe_interval < s.probe_interval && s.probe_interval < l.probe_interval);
        assert!(u.failure_threshold < s.failure_threshold);
        // Idle, both keep NAT mappings open at WireGuard's usual keepalive (under 30 s).
        assert!(u.idle_probe_interval < s.idle_probe_interval);
        assert!(l.idle_probe_interval >= s.idle_probe_interval);
    }

    #[test]
    fn an_unknown_profile_name_is_a_clear_error() {
        let err = "fast".parse::<Profile>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown profile \"fast\": expected stable, unstable or low-bandwidth"
        );
    }

    #[test]
    fn contradictory_numbers_are_refused() {
        let p = Profile {
            probe_timeout: Duration::from_secs(2),
            ..Profile::stable()
        };
        assert_eq!(p.validate(), Err(ProfileError::ProbeTimeout));
        let p = Profile {
            failure_threshold: 0,
            ..Profile::stable()
        };
        assert_eq!(p.validate(), Err(ProfileError::ZeroThreshold));
    }
}

//! The relay driver's clocks: the monotonic one for timeouts and rate limits, the wall clock
//! for token expiry, read once per wake-up by the forwarder's loop.

use std::time::{Duration, Instant};

/// The monotonic clock, for the relay's timeouts and rate limits (and its origin, read by
/// `Server::bind`).
#[allow(clippy::disallowed_methods)] // the driver is where the clock is read
pub fn now() -> Instant {
    Instant::now()
}

/// The time as the loop sees it: read once per wake-up (a clock read costs as much as the
/// relay's whole decision on a datagram), the wall clock at most once a second.
pub(crate) struct Clock {
    pub(crate) now: Instant,
    /// Wall-clock unix seconds, for token expiry.
    pub(crate) unix: u64,
    unix_read_at: Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let now = now();
        Clock {
            now,
            unix: unix_now(),
            unix_read_at: now,
        }
    }

    pub(crate) fn tick(&mut self) {
        self.now = now();
        if self.now.saturating_duration_since(self.unix_read_at) >= Duration::from_secs(1) {
            self.unix = unix_now();
            self.unix_read_at = self.now;
        }
    }
}

/// Wall-clock unix seconds.
#[allow(clippy::disallowed_methods)] // the driver is where the clock is read
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

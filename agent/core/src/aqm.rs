//! Queueing rules of the data plane, sans-IO: which packets go first, how long bulk packets may
//! wait, and how large the kernel's socket buffers should be.
//!
//! The engine reads the kernel's queues (the TUN device's, the UDP socket's) promptly into user
//! space and sorts what it reads into two classes ([`class_of`]): **small** packets (a game's
//! updates, pings, TCP ACKs, handshakes) are handled at once, as they are read; **bulk** ones
//! wait in the flow queues of [`crate::aqm_fq`] that the engine serves a slice at a time,
//! between reads. [`Codel`]
//! (RFC 8289) watches the bulk packets' sojourn time and tells the engine when to drop one, or
//! mark it Congestion Experienced ([`mark_ce`]) where the inner packet is ECN-capable, so that
//! the inner TCP backs off before megabytes pile up.

use std::time::{Duration, Instant};

/// Datagrams and packets up to this size (bytes) are "small" and never wait behind bulk ones: a
/// game update, a ping, a TCP ACK, a WireGuard handshake message (148 bytes) all fit, with the
/// WireGuard (32 bytes) and relay framing around them.
pub const SMALL_MAX: usize = 576;

/// CoDel's target: bulk packets may wait this long before CoDel reacts.
pub const CODEL_TARGET: Duration = Duration::from_millis(2);
/// CoDel's interval: how long the sojourn must stay above target (the worst round trip the
/// inner flows are expected to have).
pub const CODEL_INTERVAL: Duration = Duration::from_millis(100);

/// The two classes of [`class_of`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Handled as soon as it is read.
    Small,
    /// Queued behind other bulk packets, under CoDel.
    Bulk,
}

/// The class of a packet or datagram of `len` bytes.
pub fn class_of(len: usize) -> Class {
    if len <= SMALL_MAX {
        Class::Small
    } else {
        Class::Bulk
    }
}

/// Socket buffer (bytes, each direction) for a path of `rate_bps` and `rtt`: the
/// bandwidth-delay product, and never less than `min_bytes` (e.g. a few GSO bursts).
pub fn socket_buffer_bytes(rate_bps: u64, rtt: Duration, min_bytes: usize) -> usize {
    let bdp = u128::from(rate_bps) * rtt.as_micros() / 8 / 1_000_000;
    usize::try_from(bdp).unwrap_or(usize::MAX).max(min_bytes)
}

/// CoDel (RFC 8289) on one queue: asked at every dequeue whether to drop (or mark) the packet.
#[derive(Debug, Clone)]
pub struct Codel {
    target: Duration,
    interval: Duration,
    /// When the sojourn went above target and may start dropping (`None`: below target).
    first_above: Option<Instant>,
    dropping: bool,
    drop_next: Option<Instant>,
    count: u32,
    last_count: u32,
}

impl Default for Codel {
    fn default() -> Self {
        Codel::new(CODEL_TARGET, CODEL_INTERVAL)
    }
}

impl Codel {
    pub fn new(target: Duration, interval: Duration) -> Self {
        Codel {
            target,
            interval,
            first_above: None,
            dropping: false,
            drop_next: None,
            count: 0,
            last_count: 0,
        }
    }

    /// A packet leaves the queue after `sojourn`, with `bytes_left` still queued behind it:
    /// true if it must be dropped (or marked).
    pub fn should_drop(&mut self, sojourn: Duration, bytes_left: usize, now: Instant) -> bool {
        let ok_to_drop = self.ok_to_drop(sojourn, bytes_left, now);
        if self.dropping {
            if !ok_to_drop {
                self.dropping = false;
                return false;
            }
            let next = self.drop_next.unwrap_or(now);
            if now < next {
                return false;
            }
            self.count = self.count.saturating_add(1);
            self.drop_next = Some(self.control_law(next));
            return true;
        }
        if !ok_to_drop {
            return false;
        }
        self.dropping = true;
        let delta = self.count.saturating_sub(self.last_count);
        let recent = self
            .drop_next
            .is_some_and(|d| now.saturating_duration_since(d) < self.interval * 16);
        self.count = if delta > 1 && recent { delta } else { 1 };
        self.drop_next = Some(self.control_law(now));
        self.last_count = self.count;
        true
    }

    /// Whether CoDel is in its dropping state.
    pub fn is_dropping(&self) -> bool {
        self.dropping
    }

    fn ok_to_drop(&mut self, sojourn: Duration, bytes_left: usize, now: Instant) -> bool {
        // A queue with less than one full packet behind cannot be standing.
        if sojourn < self.target || bytes_left <= 1500 {
            self.first_above = None;
            return false;
        }
        match self.first_above {
            None => {
                self.first_above = Some(now + self.interval);
                false
            }
            Some(t) => now >= t,
        }
    }

    /// The next drop: `interval / sqrt(count)` after `t`.
    fn control_law(&self, t: Instant) -> Instant {
        let count = f64::from(self.count.max(1));
        t + self.interval.div_f64(count.sqrt())
    }
}

/// What [`mark_ce`] did to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marked {
    /// The packet is ECN-capable and now carries Congestion Experienced.
    Ce,
    /// Not an ECN-capable IPv4 packet: drop it instead.
    NotEct,
}

/// Marks an ECN-capable IPv4 packet Congestion Experienced, updating its header checksum
/// (RFC 1624); already-CE packets stay as they are.
pub fn mark_ce(packet: &mut [u8]) -> Marked {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Marked::NotEct;
    }
    let ecn = packet[1] & 0b11;
    if ecn == 0 {
        return Marked::NotEct;
    }
    if ecn == 0b11 {
        return Marked::Ce;
    }
    let old = u16::from_be_bytes([packet[0], packet[1]]);
    packet[1] |= 0b11;
    let new = u16::from_be_bytes([packet[0], packet[1]]);
    let check = u16::from_be_bytes([packet[10], packet[11]]);
    // HC' = ~(~HC + ~m + m')
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    packet[10..12].copy_from_slice(&check.to_be_bytes());
    Marked::Ce
}

#[cfg(test)]
#[path = "aqm_tests.rs"]
mod tests;

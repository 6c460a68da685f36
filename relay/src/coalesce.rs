//! Receive coalescing: the forwarding loop's version of a NIC's adaptive interrupt moderation.
//!
//! Every wake-up of the forwarding thread costs the same whatever it finds (an `epoll_wait`, a
//! `recvmmsg`, a `sendmsg` per destination, and behind each send a trip through the transmit
//! path), so its cost per datagram falls as its batches grow. A relay that keeps up with a
//! busy stream wakes for whatever arrived while it handled the last batch (four or five
//! datagrams at 560k per second in the lab), and pays those fixed costs for every few. When a
//! wake-up was busy (it handled at least [`BUSY`] datagrams) and emptied the sockets, the loop
//! waits a moment before it looks for more, and the next wake-up reads, rewrites and sends a
//! batch several times larger: fuller `recvmmsg`s and longer GSO trains.
//!
//! A relay that is not busy never waits: a wake-up for a game packet or a ping handles one
//! datagram and the loop goes straight back to `epoll_wait`, so sparse traffic sees no added
//! latency. Busy traffic waits at most the pause per relay hop (50 µs by default), which is
//! what the larger batches cost.

use std::time::Duration;

/// Datagrams one wake-up must handle for the next to be put off: below it the relay is
/// keeping up with room to spare and waiting would only add latency.
pub const BUSY: usize = 4;

/// The default pause (`rally-relay serve --coalesce-us`).
pub const DEFAULT_PAUSE: Duration = Duration::from_micros(50);

/// Longest pause `--coalesce-us` accepts: at 1 Mpps a millisecond queues a thousand datagrams,
/// a third of what the relay's 4 MiB socket buffers hold.
pub const MAX_PAUSE: Duration = Duration::from_millis(1);

/// What one wake-up of the forwarding loop did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wakeup {
    /// Datagrams handled (a GRO train counts each of its datagrams).
    pub datagrams: usize,
    /// Whether every socket read came back short: nothing was left waiting.
    pub drained: bool,
}

/// How long to wait after a wake-up before looking for more input: `pause` after a busy
/// wake-up that left nothing waiting, nothing otherwise (a zero `pause` turns coalescing off).
pub fn pause_after(wakeup: Wakeup, pause: Duration) -> Option<Duration> {
    (wakeup.drained && wakeup.datagrams >= BUSY && !pause.is_zero()).then_some(pause)
}

/// Makes this thread's sleeps end when asked: the kernel's default timer slack (50 µs) would
/// double a 50 µs coalescing pause. Best effort: without it pauses are longer, not wrong.
pub fn precise_sleeps() {
    const SLACK_NS: libc::c_ulong = 1_000;
    // SAFETY: PR_SET_TIMERSLACK takes an integer and touches only this thread's slack.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot set the timer slack");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = DEFAULT_PAUSE;

    fn wakeup(datagrams: usize, drained: bool) -> Wakeup {
        Wakeup { datagrams, drained }
    }

    #[test]
    fn a_quiet_wakeup_goes_straight_back_to_waiting_for_input() {
        for n in 0..BUSY {
            assert_eq!(pause_after(wakeup(n, true), P), None, "{n} datagrams");
        }
    }

    #[test]
    fn a_busy_wakeup_that_emptied_the_sockets_pauses() {
        assert_eq!(pause_after(wakeup(BUSY, true), P), Some(P));
        assert_eq!(pause_after(wakeup(500, true), P), Some(P));
    }

    #[test]
    fn input_left_waiting_is_read_at_once() {
        assert_eq!(pause_after(wakeup(256, false), P), None);
        assert_eq!(pause_after(wakeup(BUSY, false), P), None);
    }

    #[test]
    fn a_zero_pause_turns_coalescing_off() {
        assert_eq!(pause_after(wakeup(500, true), Duration::ZERO), None);
    }
}

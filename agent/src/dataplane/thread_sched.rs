//! The data-plane thread's place in the CPU scheduler (Linux).
//!
//! Under load the thread is always runnable, and every small packet waits for it whenever it
//! waits for a CPU. Two rules, both best effort (the agent runs as root; where the kernel
//! refuses, the thread keeps what it has):
//!
//! - With the queues on, the thread always has a higher weight ([`DATAPLANE_NICE`]).
//! - **While bulk traffic flows** it takes the lowest real-time priority (`SCHED_RR`, 1), so
//!   that a wake-up preempts the bulk applications it carries (iperf3, a download) instead of
//!   waiting for the fair scheduler's next decision, as the kernel's own WireGuard runs its
//!   receive path in softirq context ahead of every process. [`RealtimeBoost`] takes it on
//!   the first bulk packet served and gives it back [`RT_HOLD`] after the last: an idle
//!   thread is a fair-class thread, whose wake-ups were faster on this machine (a real-time
//!   wake-up stays on the thread's previous CPU, idle or not; `bench latency` measured idle
//!   round trips 1.36× longer with the class held all the time). Only authenticated traffic
//!   counts as bulk (packets read from our TUN device, or a train that decrypted), so a
//!   stranger's flood cannot raise it, and the kernel's real-time throttling
//!   (`sched_rt_runtime_us`, 95 % by default) bounds what a busy thread can take.
//!
//! Tried and dropped (issue 18): a short EEVDF slice (`sched_setattr`'s `sched_runtime`,
//! 100 µs) on top of the weight: the thread waited as long for a CPU per turn (270–430 µs
//! with and without it, in alternating runs) and the round trips under load did not move.

use std::time::{Duration, Instant};

use tracing::debug;

/// Nice value of the data-plane thread.
pub const DATAPLANE_NICE: libc::c_int = -10;

/// The environment variable that overrides [`DATAPLANE_NICE`] (A/B runs).
pub const NICE_ENV: &str = "RALLY_DATAPLANE_NICE";

/// `RALLY_DATAPLANE_RT=0` keeps the thread in the fair class under load (A/B runs).
pub const RT_ENV: &str = "RALLY_DATAPLANE_RT";

/// How long after the last bulk packet the thread keeps its real-time priority.
pub const RT_HOLD: Duration = Duration::from_secs(2);

/// The real-time priority taken under load: the lowest, below every kernel thread that has one.
const RT_PRIORITY: libc::c_int = 1;

/// Gives the calling thread [`DATAPLANE_NICE`] (or [`NICE_ENV`]'s value).
pub fn raise_current_thread() {
    let nice = std::env::var(NICE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<libc::c_int>().ok())
        .unwrap_or(DATAPLANE_NICE);
    // SAFETY: gettid has no preconditions; setpriority on our own thread id with a plain
    // integer; a failure only leaves the priority as it was.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if r != 0 {
        debug!(
            "data-plane thread priority unchanged: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// When the data-plane thread holds a real-time priority: from the first bulk packet served
/// until [`RT_HOLD`] after the last. The decisions are pure; the engine applies them to its
/// own thread with [`apply`].
#[derive(Debug)]
pub struct RealtimeBoost {
    allowed: bool,
    on: bool,
    last_bulk: Option<Instant>,
}

impl RealtimeBoost {
    /// Allowed with the queues on, unless [`RT_ENV`] is `0`.
    pub fn from_env(queues: bool) -> Self {
        let off = std::env::var(RT_ENV).is_ok_and(|v| v.trim() == "0");
        Self::new(queues && !off)
    }

    pub fn new(allowed: bool) -> Self {
        RealtimeBoost {
            allowed,
            on: false,
            last_bulk: None,
        }
    }

    /// Bulk work was served at `t`: `Some(true)` if the thread should take the real-time
    /// priority now.
    pub fn bulk(&mut self, t: Instant) -> Option<bool> {
        self.last_bulk = Some(t);
        (self.allowed && !self.on).then(|| {
            self.on = true;
            true
        })
    }

    /// A turn of the loop at `t`: `Some(false)` if the thread should give the priority back.
    pub fn settle(&mut self, t: Instant) -> Option<bool> {
        let quiet = self.last_bulk.is_none_or(|l| t >= l + RT_HOLD);
        (self.on && quiet).then(|| {
            self.on = false;
            false
        })
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// The kernel refused the class: never ask again.
    pub fn refused(&mut self) {
        self.allowed = false;
        self.on = false;
    }
}

/// Puts the calling thread in the real-time class (`SCHED_RR` at [`RT_PRIORITY`]) or back in
/// the fair class (`SCHED_OTHER`; the nice value is kept).
pub fn apply(realtime: bool) -> std::io::Result<()> {
    let (policy, priority) = if realtime {
        (libc::SCHED_RR, RT_PRIORITY)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the
    // call; a failure leaves the thread's class as it was.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_raises_once_and_a_quiet_hold_lowers_once() {
        let t0 = Instant::now();
        let mut b = RealtimeBoost::new(true);
        assert_eq!(b.settle(t0), None, "nothing to give back before any bulk");
        assert_eq!(b.bulk(t0), Some(true));
        assert_eq!(b.bulk(t0 + Duration::from_millis(5)), None, "already on");
        assert_eq!(b.settle(t0 + RT_HOLD), None, "bulk 5 ms later holds it");
        let quiet = t0 + Duration::from_millis(5) + RT_HOLD;
        assert_eq!(b.settle(quiet), Some(false));
        assert!(!b.is_on());
        assert_eq!(b.settle(quiet + RT_HOLD), None);
        assert_eq!(
            b.bulk(quiet + RT_HOLD),
            Some(true),
            "the next burst raises it again"
        );
    }

    #[test]
    fn a_refused_or_disallowed_boost_never_asks() {
        let t0 = Instant::now();
        let mut off = RealtimeBoost::new(false);
        assert_eq!(off.bulk(t0), None);
        assert_eq!(off.settle(t0 + RT_HOLD), None);
        let mut b = RealtimeBoost::new(true);
        assert_eq!(b.bulk(t0), Some(true));
        b.refused();
        assert_eq!(b.bulk(t0), None);
        assert_eq!(b.settle(t0 + RT_HOLD), None);
    }
}

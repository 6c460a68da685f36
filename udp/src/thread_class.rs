//! The data path's thread in the CPU scheduler (Linux): the lowest real-time priority
//! (`SCHED_RR`, 1) while bulk traffic flows, the fair class otherwise.
//!
//! Under load the agent's data-plane thread and the relay's forwarding thread are always
//! runnable, and every small packet waits for them whenever they wait for a CPU; in the fair
//! class a wake-up waits for the scheduler's next decision behind the bulk applications on
//! the same machine (iperf3, a download), milliseconds on a busy host. In the real-time class
//! a wake-up preempts them, as the kernel's own WireGuard runs its receive path in softirq
//! context ahead of every process. [`RealtimeBoost`] takes the class on the first bulk work
//! and gives it back [`RT_HOLD`] after the last: an idle thread is a fair-class thread, whose
//! wake-ups were faster on the lab machine (a real-time wake-up stays on the thread's previous
//! CPU, idle or not; `bench latency` measured idle round trips 1.36× longer with the class
//! held all the time). Callers count only authenticated traffic as bulk, so a stranger's
//! flood cannot raise it, and the kernel's real-time throttling (`sched_rt_runtime_us`, 95 %
//! of each period by default) bounds what a busy thread can take. Best effort: where the
//! kernel refuses (no `CAP_SYS_NICE`), the thread stays where it is and the boost stops asking.

use std::time::{Duration, Instant};

/// `RALLY_DATAPLANE_RT=0` keeps the thread in the fair class under load (A/B runs, or a host
/// whose operator wants it so).
pub const RT_ENV: &str = "RALLY_DATAPLANE_RT";

/// How long after the last bulk packet the thread keeps its real-time priority.
pub const RT_HOLD: Duration = Duration::from_secs(2);

/// The real-time priority taken under load: the lowest, below every kernel thread that has one.
#[cfg(target_os = "linux")]
const RT_PRIORITY: libc::c_int = 1;

/// When the thread holds its real-time priority: from the first bulk work until [`RT_HOLD`]
/// after the last. The decisions are pure; the thread applies them to itself with [`apply`].
#[derive(Debug)]
pub struct RealtimeBoost {
    allowed: bool,
    on: bool,
    last_bulk: Option<Instant>,
}

impl RealtimeBoost {
    /// Allowed if `allowed`, unless [`RT_ENV`] is `0`.
    pub fn from_env(allowed: bool) -> Self {
        let off = std::env::var(RT_ENV).is_ok_and(|v| v.trim() == "0");
        Self::new(allowed && !off)
    }

    /// A boost that asks for the class only if `allowed`.
    pub fn new(allowed: bool) -> Self {
        RealtimeBoost {
            allowed,
            on: false,
            last_bulk: None,
        }
    }

    /// Bulk work was done at `t`: `Some(true)` if the thread should take the real-time
    /// priority now.
    pub fn bulk(&mut self, t: Instant) -> Option<bool> {
        self.last_bulk = Some(t);
        (self.allowed && !self.on).then(|| {
            self.on = true;
            true
        })
    }

    /// A turn of the thread's loop at `t`: `Some(false)` if the thread should give the priority back.
    pub fn settle(&mut self, t: Instant) -> Option<bool> {
        let quiet = self.last_bulk.is_none_or(|l| t >= l + RT_HOLD);
        (self.on && quiet).then(|| {
            self.on = false;
            false
        })
    }

    /// Whether the thread holds the class (as far as the boost knows).
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// The kernel refused the class: never ask again.
    pub fn refused(&mut self) {
        self.allowed = false;
        self.on = false;
    }

    /// [`Self::bulk`], applied to the calling thread: `None` if nothing changes, else the
    /// class taken (`Ok(true)`) or the kernel's refusal (after which the boost stops asking).
    pub fn on_bulk(&mut self, t: Instant) -> Option<std::io::Result<bool>> {
        let realtime = self.bulk(t)?;
        Some(self.switch(realtime))
    }

    /// [`Self::settle`], applied to the calling thread, as [`Self::on_bulk`]. Reads no clock
    /// while the thread does not hold the class.
    pub fn on_turn(&mut self, now: impl FnOnce() -> Instant) -> Option<std::io::Result<bool>> {
        if !self.on {
            return None;
        }
        let realtime = self.settle(now())?;
        Some(self.switch(realtime))
    }

    fn switch(&mut self, realtime: bool) -> std::io::Result<bool> {
        apply(realtime).inspect_err(|_| self.refused())?;
        Ok(realtime)
    }
}

/// Puts the calling thread in the real-time class (`SCHED_RR` at [`RT_PRIORITY`]) or back in
/// the fair class (`SCHED_OTHER`; the nice value is kept).
#[cfg(target_os = "linux")]
fn apply(realtime: bool) -> std::io::Result<()> {
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

/// Elsewhere the per-thread call differs (and Linux is what runs the data path today): the
/// first request fails and the boost stops asking.
#[cfg(not(target_os = "linux"))]
fn apply(_realtime: bool) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
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

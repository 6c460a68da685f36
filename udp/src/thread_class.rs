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
//!
//! The class is bounded from within, too: a thread that has run [`RT_BUSY_MAX`] in it without
//! sleeping takes a **breather** ([`RealtimeBoost::breather`]: it sleeps [`RT_BREATHER`]), so
//! fair-class tasks that wait for its CPU (a game's own process beside a download) run within
//! milliseconds rather than at the throttling's 50 ms a second.

use std::time::{Duration, Instant};

/// `RALLY_DATAPLANE_RT=0` keeps the thread in the fair class under load (A/B runs, or a host
/// whose operator wants it so).
pub const RT_ENV: &str = "RALLY_DATAPLANE_RT";

/// How long after the last bulk packet the thread keeps its real-time priority.
pub const RT_HOLD: Duration = Duration::from_secs(2);

/// `RALLY_DATAPLANE_RT_BREATHER=0` turns the breathers off (A/B runs).
pub const RT_BREATHER_ENV: &str = "RALLY_DATAPLANE_RT_BREATHER";

/// Longest the thread runs in the real-time class without sleeping before a breather.
pub const RT_BUSY_MAX: Duration = Duration::from_millis(2);

/// A breather: long enough for a waiting fair-class task to take a packet (a wake-up and a
/// system call or two), short against [`RT_BUSY_MAX`] (at most a tenth of the thread's time).
pub const RT_BREATHER: Duration = Duration::from_micros(200);

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
    /// Breathers are taken (see [`Self::breather`]).
    breathers: bool,
    /// Since when the thread has held the class without sleeping.
    busy_since: Option<Instant>,
}

impl RealtimeBoost {
    /// Allowed if `allowed`, unless [`RT_ENV`] is `0`.
    pub fn from_env(allowed: bool) -> Self {
        let off = |name| std::env::var(name).is_ok_and(|v| v.trim() == "0");
        let mut b = Self::new(allowed && !off(RT_ENV));
        b.breathers = !off(RT_BREATHER_ENV);
        b
    }

    /// A boost that asks for the class only if `allowed`.
    pub fn new(allowed: bool) -> Self {
        RealtimeBoost {
            allowed,
            on: false,
            last_bulk: None,
            breathers: true,
            busy_since: None,
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

    /// A turn of the thread's loop at `t`, after a wait that slept (`slept`) or returned at
    /// once: how long the thread should sleep now, if it has held the class [`RT_BUSY_MAX`]
    /// without sleeping (the count starts again at the next turn: the breather is a sleep).
    pub fn breather(&mut self, t: Instant, slept: bool) -> Option<Duration> {
        if !self.on || !self.breathers || slept {
            self.busy_since = None;
            return None;
        }
        let since = *self.busy_since.get_or_insert(t);
        if t.saturating_duration_since(since) < RT_BUSY_MAX {
            return None;
        }
        self.busy_since = None;
        Some(RT_BREATHER)
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
    fn a_thread_busy_in_the_class_breathes_every_busy_max() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = RealtimeBoost::new(true);
        assert_eq!(b.breather(t0 + ms(10), false), None, "fair class: never");
        assert_eq!(b.bulk(t0), Some(true));
        // Busy from t0: nothing before RT_BUSY_MAX, a breather at it.
        assert_eq!(b.breather(t0, false), None);
        assert_eq!(b.breather(t0 + ms(1), false), None);
        assert_eq!(b.breather(t0 + RT_BUSY_MAX, false), Some(RT_BREATHER));
        // The breather was a sleep: the count starts again.
        let t1 = t0 + RT_BUSY_MAX + RT_BREATHER;
        assert_eq!(b.breather(t1, true), None);
        assert_eq!(b.breather(t1 + ms(1), false), None);
        // A wait that slept on its own resets it too.
        assert_eq!(b.breather(t1 + ms(2), true), None);
        assert_eq!(b.breather(t1 + ms(3), false), None);
        assert_eq!(b.breather(t1 + ms(5), false), Some(RT_BREATHER));
        // Back in the fair class: none.
        assert_eq!(b.settle(t0 + RT_HOLD), Some(false));
        assert_eq!(b.breather(t0 + RT_HOLD + ms(5), false), None);
        assert_eq!(b.breather(t0 + RT_HOLD + ms(10), false), None);
        // Turned off (the A/B switch): none.
        let mut off = RealtimeBoost::new(true);
        off.breathers = false;
        assert_eq!(off.bulk(t0), Some(true));
        assert_eq!(off.breather(t0, false), None);
        assert_eq!(off.breather(t0 + ms(10), false), None);
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

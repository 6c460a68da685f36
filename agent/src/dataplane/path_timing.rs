//! Where a packet's time goes on the data-plane thread, per step, built only with the
//! `path-timing` feature (without it every call here is empty and inlined away).
//!
//! The engine marks the steps of a lone packet's path: after a wait, the TUN read, the
//! lookups, the encryption and the send (out); the UDP read, the demultiplexing, the
//! decryption, the checks and the TUN write (in). Every 200 paths of each kind it logs the
//! mean time between consecutive marks, split into paths that began after a sleep of 1 ms or
//! more (cold caches: the idle round trip's case) and the others, and what the thread did
//! after a cold send until its next wait returned. Build with `cargo build --release -p
//! rally-agent --features path-timing`, ping through an idle tunnel, and read the agents' logs
//! for `path timing` (docs/benchmarks.md).

pub use imp::*;

/// Which way a path goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// TUN device → encryption → UDP socket.
    Tx,
    /// UDP socket → decryption → TUN device.
    Rx,
}

#[cfg(not(feature = "path-timing"))]
mod imp {
    /// Nothing without the feature.
    #[derive(Clone, Copy)]
    pub struct Stamp;

    #[inline(always)]
    pub fn now() -> Stamp {
        Stamp
    }
    #[inline(always)]
    pub fn woke(_slept_from: Stamp) {}
    #[inline(always)]
    pub fn mark(_step: &'static str) {}
    #[inline(always)]
    pub fn done(_side: super::Side) {}
    #[inline(always)]
    pub fn turn_end() {}
}

#[cfg(feature = "path-timing")]
mod imp {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::Side;

    pub type Stamp = Instant;
    /// A wait at least this long leaves the caches cold.
    const COLD: Duration = Duration::from_millis(1);
    /// Paths averaged per log line.
    const EVERY: u64 = 200;
    const MAX_MARKS: usize = 32;
    /// A wait this short after a cold send returned at once (the answer was already there).
    const AT_ONCE: Duration = Duration::from_micros(30);

    /// Sums per (position, step): nanoseconds since the previous mark, and how often seen.
    type Sums = BTreeMap<(usize, &'static str), (u64, u64)>;

    #[derive(Default)]
    struct Timing {
        marks: Vec<(&'static str, Instant)>,
        slept: Duration,
        /// Tx cold, Rx cold, Tx warm, Rx warm.
        sums: [Sums; 4],
        paths: [u64; 4],
        cold_sent_at: Option<Instant>,
        turn_end: Option<Instant>,
        /// After a cold send: to the turn's end, the next wait, how often it returned at once.
        after_send: (Duration, Duration, u64, u64),
    }

    thread_local! {
        static TIMING: RefCell<Timing> = RefCell::new(Timing::default());
    }

    pub fn now() -> Stamp {
        Instant::now()
    }

    /// The loop's wait returned (it began at `slept_from`).
    pub fn woke(slept_from: Stamp) {
        TIMING.with(|t| t.borrow_mut().woke(slept_from))
    }

    pub fn mark(step: &'static str) {
        TIMING.with(|t| {
            let mut t = t.borrow_mut();
            if t.marks.len() < MAX_MARKS {
                t.marks.push((step, Instant::now()));
            }
        })
    }

    /// A path ended with its send or its TUN write.
    pub fn done(side: Side) {
        TIMING.with(|t| t.borrow_mut().done(side))
    }

    /// The loop's turn ended (the next wait follows).
    pub fn turn_end() {
        TIMING.with(|t| {
            let mut t = t.borrow_mut();
            if t.cold_sent_at.is_some() && t.turn_end.is_none() {
                t.turn_end = Some(Instant::now());
            }
        })
    }

    impl Timing {
        fn woke(&mut self, slept_from: Instant) {
            let now = Instant::now();
            self.slept = now.saturating_duration_since(slept_from);
            self.marks.clear();
            self.marks.push(("woke", now));
            if let (Some(sent), Some(end)) = (self.cold_sent_at.take(), self.turn_end.take()) {
                let a = &mut self.after_send;
                a.0 += end.saturating_duration_since(sent);
                a.1 += self.slept;
                a.2 += 1;
                if self.slept < AT_ONCE {
                    a.3 += 1;
                }
                if a.2 == EVERY {
                    let n = a.2 as f64;
                    tracing::info!(
                        "path timing, after a cold send (µs): to the turn's end {:.1}, next wait {:.1}, returned at once {}/{}",
                        a.0.as_secs_f64() * 1e6 / n,
                        a.1.as_secs_f64() * 1e6 / n,
                        a.3,
                        a.2
                    );
                    self.after_send = Default::default();
                }
            }
        }

        fn done(&mut self, side: Side) {
            if self.marks.is_empty() {
                return;
            }
            let cold = self.slept >= COLD;
            let kind = match (side, cold) {
                (Side::Tx, true) => 0,
                (Side::Rx, true) => 1,
                (Side::Tx, false) => 2,
                (Side::Rx, false) => 3,
            };
            if cold && side == Side::Tx {
                self.cold_sent_at = self.marks.last().map(|m| m.1);
            }
            self.slept = Duration::ZERO;
            for (i, w) in self.marks.windows(2).enumerate() {
                let ns = w[1].1.saturating_duration_since(w[0].1).as_nanos();
                let e = self.sums[kind].entry((i, w[1].0)).or_insert((0, 0));
                e.0 += u64::try_from(ns).unwrap_or(u64::MAX);
                e.1 += 1;
            }
            self.marks.clear();
            self.paths[kind] += 1;
            if self.paths[kind] == EVERY {
                self.log(kind);
            }
        }

        fn log(&mut self, kind: usize) {
            let n = self.paths[kind];
            let mut steps = String::new();
            for ((_, step), (ns, seen)) in &self.sums[kind] {
                steps.push_str(&format!(" {step} {:.1}", *ns as f64 / 1e3 / n as f64));
                if *seen != n {
                    steps.push_str(&format!(" ({seen}×)"));
                }
            }
            let what = ["out, cold", "in, cold", "out, warm", "in, warm"][kind];
            tracing::info!("path timing, {what} (µs since the previous mark, mean of {n}):{steps}");
            self.sums[kind].clear();
            self.paths[kind] = 0;
        }
    }
}

//! Per-path probing state and the connection's own timers.

use super::*;

/// One path's probing and health.
#[derive(Debug, Clone)]
pub(super) struct Path {
    pub(super) health: Health,
    pub(super) next_probe: Instant,
    pub(super) outstanding: Option<Outstanding>,
    /// The last probe that timed out (already counted as a failure): its late ack still
    /// tells how slow the path is.
    pub(super) late: Option<Outstanding>,
    /// Not a relay-switch candidate before this (it measured worse after a switch).
    pub(super) held_until: Option<Instant>,
    /// A running silence check (the primary only).
    pub(super) check: Option<Check>,
    /// When the path was last probed: by us, or (while idle) by the peer.
    pub(super) last_probe: Option<Instant>,
}

impl Path {
    pub(super) fn new(now: Instant) -> Path {
        Path {
            health: Health::new(),
            next_probe: now,
            outstanding: None,
            late: None,
            held_until: None,
            check: None,
            last_probe: None,
        }
    }

    /// While idle: when a healthy path probed less than `interval` ago (its last answer
    /// came, nothing failed since) is due again, so that a peer going idle does not probe
    /// every path at once only a second after its last busy round. `None`: probe it now.
    pub(super) fn idle_due(&self, interval: Duration) -> Option<Instant> {
        if !self.health.is_up() || self.health.failures > 0 || self.check.is_some() {
            return None;
        }
        self.last_probe.map(|t| t + interval)
    }

    /// One probe is outstanding at a time, so while one is, only its loss deadline counts;
    /// a silence check runs beside it with its own timers.
    pub(super) fn next_timer(&self) -> (Instant, Timer) {
        let probe = match self.outstanding {
            Some(o) => (o.deadline, Timer::ProbeLoss),
            None => (self.next_probe, Timer::Probe),
        };
        let check = self.check.map(|c| match c.next_send() {
            Some(at) => (at, Timer::CheckProbe),
            None => (c.deadline, Timer::CheckLoss),
        });
        check.filter(|c| c.0 < probe.0).unwrap_or(probe)
    }
}

/// A silence check: probes `first_txid..first_txid + CHECK_PROBES`, sent `CHECK_SPACING` apart
/// from `started`, all answered by `deadline` or the path is down.
#[derive(Debug, Clone, Copy)]
pub(super) struct Check {
    pub(super) first_txid: u64,
    pub(super) started: Instant,
    /// How many of the probes have been sent.
    pub(super) sent: u32,
    pub(super) deadline: Instant,
}

impl Check {
    pub(super) fn next_send(&self) -> Option<Instant> {
        (self.sent < CHECK_PROBES).then(|| self.started + CHECK_SPACING * self.sent)
    }

    /// The txid of the next probe if it is due by `now` (and counts it as sent).
    pub(super) fn next_due(&mut self, now: Instant) -> Option<u64> {
        self.next_send().filter(|at| *at <= now)?;
        let txid = self.first_txid.wrapping_add(u64::from(self.sent));
        self.sent += 1;
        Some(txid)
    }

    /// When the probe with `txid` was sent, if it is one of this check's.
    pub(super) fn sent_at(&self, txid: u64) -> Option<Instant> {
        let i = u32::try_from(txid.wrapping_sub(self.first_txid)).ok()?;
        (i < self.sent).then(|| self.started + CHECK_SPACING * i)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Outstanding {
    pub(super) txid: u64,
    pub(super) at: Instant,
    pub(super) deadline: Instant,
}

/// The connection's own timers, one slot each.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Timers {
    pub(super) connect: Option<Instant>,
    pub(super) backoff: Option<Instant>,
}

impl Timers {
    pub(super) fn next(&self) -> Option<(Instant, Timer)> {
        [
            (self.connect, Timer::Connect),
            (self.backoff, Timer::Backoff),
        ]
        .into_iter()
        .filter_map(|(at, timer)| Some((at?, timer)))
        .min_by_key(|(at, _)| *at)
    }
}

/// A relay switch under evaluation.
#[derive(Debug, Clone)]
pub(super) struct Trial {
    pub(super) from: PathId,
    pub(super) to: PathId,
    /// RTTs measured on `to` since the switch.
    pub(super) samples: Vec<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Pending,
    Keep,
    Revert,
}

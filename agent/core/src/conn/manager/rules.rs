//! The connection's internal rules: reselection, failover, recovery, relay switching,
//! reconnecting, silence checks, cadence.

use super::*;

impl Connection {
    // ----- helpers -----

    /// Re-evaluates the primary after any change of health, and the state after that.
    pub(super) fn reselect(&mut self, now: Instant) {
        if self.state == ConnState::Disconnected {
            return;
        }
        if self.pinned.as_ref().is_some_and(|p| !self.is_up(p)) {
            self.pinned = None;
        }
        match self.primary.clone() {
            None => {
                if let Some(to) = self.best_up() {
                    self.gain_primary(to, now);
                }
            }
            Some(from) if !self.is_up(&from) => match self.best_up() {
                Some(to) => self.fail_over(from, to),
                None => self.lose_primary(now),
            },
            Some(current) => self.improve(current, now),
        }
        self.update_state();
    }

    /// With a healthy primary: recovery to a higher-priority path, then relay switching.
    pub(super) fn improve(&mut self, current: PathId, now: Instant) {
        if self.pinned.is_some() {
            return;
        }
        if let Some(to) = self.recovery_candidate(&current) {
            self.change_primary(Some(to), PrimaryReason::Recovery);
            return;
        }
        match self.trial_verdict() {
            Some(Verdict::Pending) => {}
            Some(Verdict::Revert) => self.revert_relay_switch(now),
            Some(Verdict::Keep) => {
                self.trial = None;
                self.try_relay_switch(current, now);
            }
            None => self.try_relay_switch(current, now),
        }
    }

    /// The best trusted path of a strictly better kind than the primary's.
    pub(super) fn recovery_candidate(&self, current: &PathId) -> Option<PathId> {
        self.paths
            .iter()
            .filter(|(id, p)| id.kind() < current.kind() && p.health.is_trusted(&self.profile))
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .min()
            .map(|r| r.path.clone())
    }

    pub(super) fn try_relay_switch(&mut self, current: PathId, now: Instant) {
        let to = match self.relay_candidate(&current, now) {
            Some(to) => Some(to),
            None => self.clearly_better_relay(&current, now),
        };
        let Some(to) = to else {
            return;
        };
        self.better = None;
        self.relay_switches += 1;
        self.events.push_back(ConnEvent::RelaySwitch {
            from: current.clone(),
            to: to.clone(),
            revert: false,
        });
        self.change_primary(Some(to.clone()), PrimaryReason::RelaySwitch);
        self.trial = Some(Trial {
            from: current,
            to,
            samples: Vec::new(),
        });
    }

    /// For a relayed primary slower than `relay_switch_latency`: the best trusted relay over
    /// the same transport measured strictly faster that is not held back by an earlier
    /// revert (a move between transports is recovery's, by kind).
    pub(super) fn relay_candidate(&self, current: &PathId, now: Instant) -> Option<PathId> {
        if !current.kind().is_relay() {
            return None;
        }
        let slow = self.latency(current)?;
        if slow <= self.profile.relay_switch_latency {
            return None;
        }
        self.paths
            .iter()
            .filter(|(id, p)| {
                id.kind() == current.kind()
                    && *id != current
                    && p.health.is_trusted(&self.profile)
                    && p.held_until.is_none_or(|t| now >= t)
                    && p.health.rtt.is_some_and(|r| r < slow)
            })
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .min()
            .map(|r| r.path.clone())
    }

    /// After a relay switch: compare the new relay's first samples with the old relay.
    pub(super) fn trial_verdict(&self) -> Option<Verdict> {
        let trial = self.trial.as_ref()?;
        if trial.samples.len() < RELAY_TRIAL_SAMPLES {
            return Some(Verdict::Pending);
        }
        let n = u32::try_from(trial.samples.len()).unwrap_or(u32::MAX);
        let mean = trial.samples.iter().sum::<Duration>() / n;
        // The new relay's samples with its jitter against the old relay's whole quality, as
        // the relay choice ranks them (for a steady path, just the RTTs).
        let jitter = self
            .paths
            .get(&trial.to)
            .and_then(|p| p.health.jitter())
            .unwrap_or_default();
        let new = (mean.as_secs_f64() * 1000.0)
            + relay_choice::JITTER_WEIGHT * jitter.as_secs_f64() * 1000.0;
        let old = self
            .paths
            .get(&trial.from)
            .filter(|p| p.health.is_up())
            .and_then(relay_choice::quality);
        Some(match old {
            Some(old) if new > old => Verdict::Revert,
            _ => Verdict::Keep,
        })
    }

    pub(super) fn revert_relay_switch(&mut self, now: Instant) {
        let Some(trial) = self.trial.take() else {
            return;
        };
        if let Some(p) = self.paths.get_mut(&trial.to) {
            p.held_until = Some(now + RELAY_REVERT_HOLD);
        }
        self.relay_switches += 1;
        self.events.push_back(ConnEvent::RelaySwitch {
            from: trial.to,
            to: trial.from.clone(),
            revert: true,
        });
        self.change_primary(Some(trial.from), PrimaryReason::RelayRevert);
    }

    pub(super) fn gain_primary(&mut self, to: PathId, now: Instant) {
        self.change_primary(Some(to.clone()), PrimaryReason::Connected);
        self.events.push_back(ConnEvent::Connected { path: to });
        self.connected_since = Some(now);
        self.timers.connect = None;
        self.timers.backoff = None;
        self.backoff.reset();
        self.attempt = 0;
    }

    pub(super) fn fail_over(&mut self, from: PathId, to: PathId) {
        self.failovers += 1;
        self.events.push_back(ConnEvent::Failover {
            from,
            to: to.clone(),
        });
        self.change_primary(Some(to), PrimaryReason::Failover);
    }

    pub(super) fn lose_primary(&mut self, now: Instant) {
        self.change_primary(None, PrimaryReason::Lost);
        self.connected_since = None;
        let soon = now + self.profile.probe_interval;
        for p in self.paths.values_mut() {
            p.next_probe = p.next_probe.min(soon);
        }
        self.start_reconnecting(now);
    }

    pub(super) fn change_primary(&mut self, to: Option<PathId>, reason: PrimaryReason) {
        let from = std::mem::replace(&mut self.primary, to.clone());
        self.trial = None;
        // Silence is judged on the primary only, from the first data sent on it.
        self.unanswered = None;
        for p in self.paths.values_mut() {
            p.check = None;
        }
        self.events
            .push_back(ConnEvent::PrimaryChange { from, to, reason });
    }

    /// Attempt 1 now, then on the backoff schedule.
    pub(super) fn start_reconnecting(&mut self, now: Instant) {
        self.backoff.reset();
        self.attempt = 0;
        self.timers.connect = None;
        self.set_state(ConnState::Reconnecting);
        self.next_attempt(now);
    }

    /// The backoff deadline passed: the next attempt, or `failed` after the last one.
    pub(super) fn next_attempt(&mut self, now: Instant) {
        let limit = self.profile.backoff.attempts;
        if limit.is_some_and(|n| self.attempt >= n) {
            return self.give_up();
        }
        let Some(delay) = self.backoff.next_delay() else {
            return self.give_up();
        };
        self.attempt += 1;
        self.commands.push_back(Command::Reconnect {
            attempt: self.attempt,
        });
        self.events.push_back(ConnEvent::Reconnecting {
            attempt: self.attempt,
            attempts: limit,
        });
        self.timers.backoff = Some(now + delay);
    }

    pub(super) fn give_up(&mut self) {
        self.timers.backoff = None;
        self.set_state(ConnState::Failed);
        self.events.push_back(ConnEvent::Failed {
            attempts: self.attempt,
        });
    }

    /// `connected` or `degraded` from the primary's latency; the states without a primary are
    /// set by their transitions.
    pub(super) fn update_state(&mut self) {
        let Some(primary) = &self.primary else {
            return;
        };
        let slow = self
            .latency(primary)
            .is_some_and(|l| l > self.profile.degraded_latency);
        self.set_state(if slow {
            ConnState::Degraded
        } else {
            ConnState::Connected
        });
    }

    pub(super) fn set_state(&mut self, to: ConnState) {
        if self.state == to {
            return;
        }
        let from = std::mem::replace(&mut self.state, to);
        self.events.push_back(ConnEvent::StateChange { from, to });
    }

    pub(super) fn note(&mut self, path: &PathId, transition: Transition) {
        let path = path.clone();
        match transition {
            Transition::None => {}
            Transition::WentUp => self.events.push_back(ConnEvent::PathUp { path }),
            Transition::WentDown => self.events.push_back(ConnEvent::PathDown { path }),
        }
    }

    /// Something authenticated arrived on `path` (data or a probe ack): it is not silent.
    /// Returns false for an unknown path.
    pub(super) fn heard(&mut self, path: &PathId) -> bool {
        if self.primary.as_ref() == Some(path) {
            self.unanswered = None;
        }
        let Some(p) = self.paths.get_mut(path) else {
            return false;
        };
        p.check = None;
        true
    }

    /// Authenticated traffic on `path`: it is heard (a running check ends, failures reset); a
    /// direct primary is checked at once when it came through a relay. A path not up is probed
    /// now; an up one, when `busy`, within one probe interval (so silence after it is noticed).
    pub(super) fn traffic_on(&mut self, path: &PathId, now: Instant, busy: bool) -> bool {
        if !self.heard(path) {
            return false;
        }
        if path.kind().is_relay() && self.check_direct_primary_now(now) {
            self.relayed_check = Some(now);
            self.start_check(now);
        }
        let soon = now + self.profile.probe_interval;
        let Some(p) = self.paths.get_mut(path) else {
            return false;
        };
        p.health.on_traffic(&self.profile);
        if !p.health.is_up() {
            p.next_probe = p.next_probe.min(now);
        } else if busy {
            p.next_probe = p.next_probe.min(soon);
        }
        true
    }

    /// When the primary, having carried data, has been silent long enough for a check: the
    /// profile's `silence_timeout`, or twice its smoothed RTT if longer. `None` while a check
    /// runs or nothing is unanswered.
    pub(super) fn silence_deadline(&self) -> Option<Instant> {
        let since = self.unanswered?;
        let primary = self.primary.as_ref()?;
        let p = self.paths.get(primary)?;
        if p.check.is_some() {
            return None;
        }
        let rtt = p.health.rtt.unwrap_or_default();
        Some(since + self.profile.silence_timeout.max(rtt * 2))
    }

    /// Whether a direct primary should be checked now, on data from the peer through a relay:
    /// it is direct, no check of it runs, and no such check started within `probe_interval`
    /// (a peer that stays on the relay a while, earning its direct path back, costs one check
    /// per interval, not one after another).
    pub(super) fn check_direct_primary_now(&self, now: Instant) -> bool {
        let Some(primary) = self.primary.as_ref() else {
            return false;
        };
        let recent = self
            .relayed_check
            .is_some_and(|t| now < t + self.profile.probe_interval);
        primary.kind() == PathKind::Direct
            && !recent
            && self.paths.get(primary).is_some_and(|p| p.check.is_none())
    }

    /// Starts a silence check on the primary: [`CHECK_PROBES`] probes, [`CHECK_SPACING`]
    /// apart (the first now), one shared deadline. Any answer on the path ends it; none by the
    /// deadline takes the path down.
    pub(super) fn start_check(&mut self, now: Instant) {
        let Some(primary) = self.primary.clone() else {
            return;
        };
        let max_latency = self.profile.max_latency;
        let Some(p) = self.paths.get_mut(&primary) else {
            return;
        };
        let wait = p.health.rtt.map_or(max_latency, |rtt| {
            (rtt * 3 + CHECK_MARGIN).clamp(CHECK_MIN_WAIT, max_latency)
        });
        p.check = Some(Check {
            first_txid: self.next_txid,
            started: now,
            sent: 0,
            deadline: now + wait,
        });
        self.next_txid = self.next_txid.wrapping_add(u64::from(CHECK_PROBES));
    }

    pub(super) fn mark_busy(&mut self, now: Instant) {
        let was_idle = !self.is_busy(now);
        self.last_activity = Some(now);
        if was_idle {
            let soon = now + self.profile.probe_interval;
            for p in self.paths.values_mut() {
                p.next_probe = p.next_probe.min(soon);
            }
        }
    }

    pub(super) fn is_busy(&self, now: Instant) -> bool {
        self.last_activity
            .is_some_and(|t| now.saturating_duration_since(t) < self.profile.idle_after)
    }

    /// Time to the next probe on each path: fast while busy or while there is no primary
    /// (except when failed: then cheap until resumed), slow while idle.
    pub(super) fn cadence(&self, now: Instant) -> Duration {
        let fast = match self.primary {
            None => self.state != ConnState::Failed,
            Some(_) => self.is_busy(now),
        };
        if fast {
            self.profile.probe_interval
        } else {
            self.profile.idle_probe_interval
        }
    }

    /// Whether the peer has a primary and no traffic lately (probes at the idle interval).
    pub fn is_idle(&self, now: Instant) -> bool {
        self.primary.is_some() && !self.is_busy(now)
    }

    pub(super) fn is_up(&self, path: &PathId) -> bool {
        self.paths.get(path).is_some_and(|p| p.health.is_up())
    }

    pub(super) fn best_up(&self) -> Option<PathId> {
        self.paths
            .iter()
            .filter(|(_, p)| p.health.is_up())
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .min()
            .map(|r| r.path.clone())
    }

    pub(super) fn ranked(&self) -> Vec<Rank<'_>> {
        let mut ranks: Vec<Rank<'_>> = self
            .paths
            .iter()
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .collect();
        ranks.sort();
        ranks
    }

    /// Sends the probes due by `now`: a running silence check's, and each path's at its
    /// cadence.
    pub(super) fn send_due_probes(&mut self, now: Instant) {
        let cadence = self.cadence(now);
        let fast = cadence == self.profile.probe_interval;
        // While idle, a probe due on any path takes along the others due within a quarter of
        // the idle interval (one wake-up per peer, not one per path); and only the primary
        // keeps the idle interval, standbys probe eight times as rarely (a busy peer probes
        // every path at `probe_interval` again, and a relay's own pings watch the relay).
        let any_due = self
            .paths
            .iter()
            .any(|(_, p)| p.outstanding.is_none() && now >= p.next_probe);
        let horizon = match (fast, any_due) {
            (false, true) => now + self.profile.idle_probe_interval / IDLE_COALESCE,
            _ => now,
        };
        let primary = self.primary.clone();
        for (id, p) in self.paths.iter_mut() {
            while let Some(txid) = p.check.as_mut().and_then(|c| c.next_due(now)) {
                p.health.probes_sent += 1;
                self.transmits.push_back(ProbeTransmit {
                    path: id.clone(),
                    txid,
                });
            }
            if p.outstanding.is_some() || horizon < p.next_probe {
                continue;
            }
            let kept_warm = fast || primary.as_ref() == Some(id);
            let interval = if kept_warm {
                cadence
            } else {
                cadence * IDLE_STANDBY_FACTOR
            };
            // A peer that just went idle: each healthy path waits out its idle interval from
            // its last (busy) probe rather than being probed again at once.
            if let Some(due) = p.idle_due(interval).filter(|due| !fast && *due > horizon) {
                p.next_probe = due;
                continue;
            }
            let txid = self.next_txid;
            self.next_txid = self.next_txid.wrapping_add(1);
            p.outstanding = Some(Outstanding {
                txid,
                at: now,
                deadline: now + self.profile.probe_timeout,
            });
            p.last_probe = Some(now);
            p.next_probe = now + interval;
            p.health.probes_sent += 1;
            self.transmits.push_back(ProbeTransmit {
                path: id.clone(),
                txid,
            });
        }
    }
}

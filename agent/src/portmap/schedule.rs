//! When to map, renew and remove the gateway port mapping: a sans-IO state machine.
//!
//! The driver (`super::driver`) performs the [`Action`]s this schedule returns and feeds back
//! their outcome with `handle_*(.., now)`. A granted lease is renewed at half its lifetime; a
//! failed renewal is retried with backoff until the lease runs out; a fresh mapping that keeps
//! failing is retried a few times and then given up (until the network changes), so a network
//! without a mapping-capable gateway costs a handful of small datagrams and nothing more.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::backoff::{Backoff, BackoffPolicy};

/// Retries of a failed mapping or renewal: 15 s, 30 s, 60 s, 120 s, 240 s (±20 %), then the
/// schedule gives up until the network changes.
pub const RETRY: BackoffPolicy = BackoffPolicy {
    base: Duration::from_secs(15),
    max: Duration::from_secs(300),
    jitter: 0.2,
    attempts: Some(5),
};

/// A renewal is never scheduled sooner than this after the lease was granted (a gateway that
/// grants a lease of a second or two must not make the agent spin).
pub const MIN_RENEW_AFTER: Duration = Duration::from_secs(1);

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Find the gateway and ask it for a mapping (PCP, then NAT-PMP, then UPnP IGD).
    Map,
    /// Renew the mapping held, with the protocol that made it.
    Renew,
    /// Delete the mapping held from the gateway.
    Remove,
}

/// What changed, for the driver to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The lease ran out before a renewal succeeded: the mapped endpoint is gone.
    Expired,
    /// Every attempt failed: no mapping until the network changes.
    GaveUp,
}

/// The timers, one slot each; the earliest is the next deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Try a fresh mapping again.
    Retry,
    /// Renew the lease (at half its lifetime, or again after a failed renewal).
    Renew,
    /// The lease ends.
    Expiry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A `Map` is in flight or scheduled.
    Mapping,
    /// A mapping is held (a `Renew` may be in flight).
    Mapped { expires: Instant, renewing: bool },
    /// Attempts used up; waiting for a network change.
    GaveUp,
    /// Shut down: nothing more will happen.
    Stopped,
}

/// The port-mapping schedule.
#[derive(Debug)]
pub struct Schedule {
    state: State,
    backoff: Backoff,
    retry_at: Option<Instant>,
    renew_at: Option<Instant>,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
}

impl Schedule {
    /// A schedule whose first action is `Map`.
    pub fn new(policy: BackoffPolicy, seed: [u8; 32]) -> Schedule {
        Schedule {
            state: State::Mapping,
            backoff: Backoff::new(policy, seed),
            retry_at: None,
            renew_at: None,
            actions: VecDeque::from([Action::Map]),
            events: VecDeque::new(),
        }
    }

    /// A `Map` or `Renew` succeeded with a lease of `lifetime`.
    pub fn handle_granted(&mut self, lifetime: Duration, now: Instant) {
        if self.state == State::Stopped {
            return;
        }
        self.backoff.reset();
        self.retry_at = None;
        self.renew_at = Some(now + (lifetime / 2).max(MIN_RENEW_AFTER));
        self.state = State::Mapped {
            expires: now + lifetime,
            renewing: false,
        };
    }

    /// A `Map` or `Renew` failed.
    pub fn handle_failed(&mut self, now: Instant) {
        match self.state {
            State::Mapping => match self.backoff.next_delay() {
                Some(delay) => self.retry_at = Some(now + delay),
                None => self.give_up(),
            },
            State::Mapped { expires, .. } => {
                self.state = State::Mapped {
                    expires,
                    renewing: false,
                };
                // Retry while the lease lasts; at its end the Expiry timer takes over.
                self.renew_at = self
                    .backoff
                    .next_delay()
                    .map(|d| now + d)
                    .filter(|at| *at < expires);
            }
            State::GaveUp | State::Stopped => {}
        }
    }

    /// The host's addresses or routes changed: the mapping (if any) belongs to the old network.
    /// Removes it (best effort) and maps afresh, with a fresh retry budget.
    pub fn handle_network_change(&mut self, _now: Instant) {
        if self.state == State::Stopped {
            return;
        }
        self.actions.clear();
        if matches!(self.state, State::Mapped { .. }) {
            self.actions.push_back(Action::Remove);
        }
        self.actions.push_back(Action::Map);
        self.backoff.reset();
        self.retry_at = None;
        self.renew_at = None;
        self.state = State::Mapping;
    }

    /// The agent is stopping: remove the mapping held, then nothing more.
    pub fn handle_shutdown(&mut self) {
        self.actions.clear();
        if matches!(self.state, State::Mapped { .. }) {
            self.actions.push_back(Action::Remove);
        }
        self.retry_at = None;
        self.renew_at = None;
        self.state = State::Stopped;
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            if self.state == State::Mapping {
                self.actions.push_back(Action::Map);
            }
        }
        if let State::Mapped { expires, renewing } = self.state {
            if expires <= now {
                // The lease is over: what is held is worth nothing; start again.
                self.renew_at = None;
                self.state = State::Mapping;
                self.events.push_back(Event::Expired);
                self.actions.retain(|a| *a != Action::Renew);
                self.handle_failed(now);
                return;
            }
            if !renewing && self.renew_at.is_some_and(|at| at <= now) {
                self.renew_at = None;
                self.state = State::Mapped {
                    expires,
                    renewing: true,
                };
                self.actions.push_back(Action::Renew);
            }
        }
    }

    /// The next action to perform.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event to publish.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next deadline and why.
    pub fn poll_timeout(&self) -> Option<(Instant, Timer)> {
        let expiry = match self.state {
            State::Mapped { expires, .. } => Some((expires, Timer::Expiry)),
            _ => None,
        };
        [
            self.retry_at.map(|at| (at, Timer::Retry)),
            self.renew_at.map(|at| (at, Timer::Renew)),
            expiry,
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(at, _)| *at)
    }

    /// Whether the schedule has given up until the network changes.
    pub fn gave_up(&self) -> bool {
        self.state == State::GaveUp
    }

    fn give_up(&mut self) {
        self.state = State::GaveUp;
        self.retry_at = None;
        self.events.push_back(Event::GaveUp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(7200);

    #[test]
    fn first_action_is_a_map_and_nothing_is_scheduled() {
        let (mut s, _) = schedule();
        assert_eq!(s.poll_action(), Some(Action::Map));
        assert_eq!(s.poll_action(), None);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_granted_lease_is_renewed_at_half_its_lifetime() {
        let (mut s, t0) = schedule();
        s.poll_action();
        s.handle_granted(LEASE, t0);
        assert_eq!(s.poll_timeout(), Some((t0 + LEASE / 2, Timer::Renew)));

        s.handle_timeout(t0 + LEASE / 2 - Duration::from_millis(1));
        assert_eq!(s.poll_action(), None);
        s.handle_timeout(t0 + LEASE / 2);
        assert_eq!(s.poll_action(), Some(Action::Renew));
        // While the renewal is in flight only the lease's end is pending.
        assert_eq!(s.poll_timeout(), Some((t0 + LEASE, Timer::Expiry)));

        let t1 = t0 + LEASE / 2 + Duration::from_secs(1);
        s.handle_granted(LEASE, t1);
        assert_eq!(s.poll_timeout(), Some((t1 + LEASE / 2, Timer::Renew)));
        assert_eq!(s.poll_event(), None);
    }

    #[test]
    fn failed_renewals_back_off_until_the_lease_ends_then_it_expires() {
        let (mut s, t0) = schedule_without_jitter();
        s.poll_action();
        let lease = Duration::from_secs(120);
        s.handle_granted(lease, t0);
        let mut now = t0 + lease / 2;
        s.handle_timeout(now);
        assert_eq!(s.poll_action(), Some(Action::Renew));
        s.handle_failed(now);
        // 60 s + 15 s < 120 s: retried; 75 s + 30 s < 120 s: retried; 105 + 60 > 120: no more.
        let mut retries = Vec::new();
        while let Some((at, Timer::Renew)) = s.poll_timeout() {
            retries.push(at - t0);
            now = at;
            s.handle_timeout(now);
            assert_eq!(s.poll_action(), Some(Action::Renew));
            s.handle_failed(now);
        }
        assert_eq!(
            retries,
            [Duration::from_secs(75), Duration::from_secs(105)],
            "renewal retries"
        );
        assert_eq!(s.poll_timeout(), Some((t0 + lease, Timer::Expiry)));
        s.handle_timeout(t0 + lease);
        assert_eq!(s.poll_event(), Some(Event::Expired));
        // Back to fresh mapping with the remaining budget: the next retry is scheduled.
        assert_eq!(s.poll_action(), None);
        assert_eq!(
            s.poll_timeout(),
            Some((t0 + lease + Duration::from_secs(120), Timer::Retry))
        );
    }

    #[test]
    fn failed_maps_retry_with_backoff_and_then_give_up() {
        let (mut s, t0) = schedule_without_jitter();
        let mut now = t0;
        let mut delays = Vec::new();
        while let Some(Action::Map) = s.poll_action() {
            s.handle_failed(now);
            let Some((at, timer)) = s.poll_timeout() else {
                break;
            };
            assert_eq!(timer, Timer::Retry);
            delays.push((at - now).as_secs());
            now = at;
            s.handle_timeout(now);
        }
        assert_eq!(delays, [15, 30, 60, 120, 240]);
        assert!(s.gave_up());
        assert_eq!(s.poll_event(), Some(Event::GaveUp));
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_network_change_removes_the_old_mapping_and_maps_afresh() {
        let (mut s, t0) = schedule();
        s.poll_action();
        s.handle_granted(LEASE, t0);
        s.handle_network_change(t0 + Duration::from_secs(5));
        assert_eq!(s.poll_action(), Some(Action::Remove));
        assert_eq!(s.poll_action(), Some(Action::Map));
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_network_change_revives_a_schedule_that_gave_up() {
        let (mut s, t0) = schedule_without_jitter();
        let mut now = t0;
        while let Some(Action::Map) = s.poll_action() {
            s.handle_failed(now);
            if let Some((at, _)) = s.poll_timeout() {
                now = at;
                s.handle_timeout(now);
            }
        }
        assert!(s.gave_up());
        s.handle_network_change(now);
        assert_eq!(s.poll_action(), Some(Action::Map));
        s.handle_failed(now);
        assert_eq!(
            s.poll_timeout(),
            Some((now + Duration::from_secs(15), Timer::Retry))
        );
    }

    #[test]
    fn shutdown_removes_a_held_mapping_and_stops_every_timer() {
        let (mut s, t0) = schedule();
        s.poll_action();
        s.handle_granted(LEASE, t0);
        s.handle_shutdown();
        assert_eq!(s.poll_action(), Some(Action::Remove));
        assert_eq!(s.poll_action(), None);
        assert_eq!(s.poll_timeout(), None);
        // A late answer to an in-flight request changes nothing.
        s.handle_granted(LEASE, t0);
        assert_eq!(s.poll_timeout(), None);
        s.handle_network_change(t0);
        assert_eq!(s.poll_action(), None);
    }

    #[test]
    fn shutdown_without_a_mapping_removes_nothing() {
        let (mut s, t0) = schedule();
        s.poll_action();
        s.handle_failed(t0);
        s.handle_shutdown();
        assert_eq!(s.poll_action(), None);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_tiny_lease_is_not_renewed_in_a_busy_loop() {
        let (mut s, t0) = schedule();
        s.poll_action();
        s.handle_granted(Duration::from_millis(10), t0);
        let (at, _) = s.poll_timeout().expect("a deadline");
        assert_eq!(at, t0 + Duration::from_millis(10), "expiry comes first");
        s.handle_granted(Duration::from_secs(3), t0);
        assert_eq!(
            s.poll_timeout(),
            Some((t0 + Duration::from_millis(1500), Timer::Renew))
        );
    }

    #[test]
    fn jittered_retries_stay_within_twenty_percent() {
        let (mut s, t0) = schedule();
        s.poll_action();
        s.handle_failed(t0);
        let (at, _) = s.poll_timeout().expect("a retry");
        let d = (at - t0).as_secs_f64();
        assert!((12.0..=18.0).contains(&d), "first retry after {d} s");
    }

    fn schedule() -> (Schedule, Instant) {
        (Schedule::new(RETRY, [7; 32]), Instant::now())
    }

    fn schedule_without_jitter() -> (Schedule, Instant) {
        let policy = BackoffPolicy {
            jitter: 0.0,
            ..RETRY
        };
        (Schedule::new(policy, [7; 32]), Instant::now())
    }
}

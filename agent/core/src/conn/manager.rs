//! [`Connection`]: the paths to one peer, which one is primary, and what to do when none works.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::health::{Health, PathHealth, Transition};
use super::path::{PathId, PathKind, Rank};
use super::profile::Profile;
use super::queue::PacketQueue;
use super::table::PathTable;
use crate::backoff::Backoff;

/// Acknowledged probes on a newly switched-to relay before it is compared with the old one.
pub const RELAY_TRIAL_SAMPLES: usize = 3;
/// A relay that turned out worse after a switch is not switched to again for this long.
pub const RELAY_REVERT_HOLD: Duration = Duration::from_secs(60);
/// Probes in a silence check (see [`Timer::Silence`]), so that one lost probe or ack does not
/// fail a path that carries data.
pub const CHECK_PROBES: u32 = 3;
/// While idle, paths other than the primary and the best standby are probed this many times
/// more rarely than the idle interval.
pub const IDLE_STANDBY_FACTOR: u32 = 4;
/// While idle, a probe due takes along the peer's other probes due within the idle interval
/// divided by this.
pub const IDLE_COALESCE: u32 = 4;
/// Time between the probes of a silence check.
pub const CHECK_SPACING: Duration = Duration::from_millis(25);
/// A silence check waits for an answer three times the path's smoothed RTT plus this...
pub const CHECK_MARGIN: Duration = Duration::from_millis(100);
/// ...but at least this long, and at most `max_latency` (an answer slower than that fails a
/// probe anyway).
pub const CHECK_MIN_WAIT: Duration = Duration::from_millis(150);

/// The connection's state, as shown by `rally peers` and in `state_change` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// New: paths are being tried, none works yet.
    Connecting,
    /// A primary path works.
    Connected,
    /// A primary path works, but its latency is above `degraded_latency`.
    Degraded,
    /// No usable path: reconnect attempts run on the backoff schedule.
    Reconnecting,
    /// The attempts are used up; waiting for [`Connection::resume`] (or a path that recovers).
    Failed,
    /// Closed; terminal.
    Disconnected,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Degraded => "degraded",
            ConnState::Reconnecting => "reconnecting",
            ConnState::Failed => "failed",
            ConnState::Disconnected => "disconnected",
        }
    }
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the primary path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrimaryReason {
    /// The first usable path (on connecting or reconnecting).
    Connected,
    /// The primary failed or was removed; the next healthy path took over.
    Failover,
    /// A higher-priority path earned the role back.
    Recovery,
    /// The relayed primary was slow and another relay measured faster.
    RelaySwitch,
    /// The relay switched to measured worse than the one before; switched back.
    RelayRevert,
    /// `set_primary`.
    Manual,
    /// The primary failed and no other path was usable.
    Lost,
    /// The connection was closed.
    Closed,
}

impl PrimaryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PrimaryReason::Connected => "connected",
            PrimaryReason::Failover => "failover",
            PrimaryReason::Recovery => "recovery",
            PrimaryReason::RelaySwitch => "relay switch",
            PrimaryReason::RelayRevert => "relay switch reverted",
            PrimaryReason::Manual => "set by hand",
            PrimaryReason::Lost => "lost",
            PrimaryReason::Closed => "closed",
        }
    }
}

/// What happened, for logs and the event bus (see [`crate::events::Event::from_conn`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEvent {
    StateChange {
        from: ConnState,
        to: ConnState,
    },
    /// A primary path exists again (after connecting, reconnecting or failing).
    Connected {
        path: PathId,
    },
    Disconnected,
    PrimaryChange {
        from: Option<PathId>,
        to: Option<PathId>,
        reason: PrimaryReason,
    },
    Failover {
        from: PathId,
        to: PathId,
    },
    /// `revert`: switching back after the new relay measured worse.
    RelaySwitch {
        from: PathId,
        to: PathId,
        revert: bool,
    },
    /// Reconnect attempt `attempt` (1-based) of `attempts` (`None`: unlimited) started.
    Reconnecting {
        attempt: u32,
        attempts: Option<u32>,
    },
    /// The last attempt's wait ran out: the connection is `failed`.
    Failed {
        attempts: u32,
    },
    PathUp {
        path: PathId,
    },
    PathDown {
        path: PathId,
    },
}

/// Something the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Refresh the peer's candidates from the control plane and punch again.
    Reconnect { attempt: u32 },
}

/// A probe to send: the caller encodes `Probe { kind: Probe, from: me, txid }` with the peer's
/// probe key and sends it on `path`, then reports the matching ack with
/// [`Connection::handle_probe_ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTransmit {
    pub path: PathId,
    pub txid: u64,
}

/// The timers, one per reason to wake up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// A new connection without a usable path starts reconnecting.
    Connect,
    /// The next reconnect attempt, or giving up after the last.
    Backoff,
    /// A path is due for a probe.
    Probe,
    /// A path's outstanding probe is lost unless acknowledged by now.
    ProbeLoss,
    /// The primary carried data and has returned nothing (no data, no ack) for the silence
    /// timeout: a check of [`CHECK_PROBES`] probes starts.
    Silence,
    /// The next probe of a running silence check is due.
    CheckProbe,
    /// A silence check fails (the path goes down at once) unless answered by now.
    CheckLoss,
}

/// The next deadline and why (for logs: "woke for ...").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    pub at: Instant,
    pub timer: Timer,
    /// The path, for per-path timers.
    pub path: Option<PathId>,
}

/// Why [`Connection::set_primary`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetPrimaryError {
    #[error("no path {0} to this peer")]
    UnknownPath(PathId),
    #[error("path {0} is not up")]
    NotUp(PathId),
    #[error("the connection is closed")]
    Closed,
}

/// A snapshot for `rally peers` and Prometheus.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnMetrics {
    pub state: ConnState,
    pub primary: Option<PathId>,
    /// `direct` or `relay`, from the primary.
    pub strategy: Option<PathKind>,
    /// The primary's smoothed latency.
    pub latency_ms: Option<f64>,
    pub failovers: u64,
    pub relay_switches: u64,
    /// The current reconnect attempt (0 when not reconnecting).
    pub reconnect_attempt: u32,
    pub queued: usize,
    pub queue_dropped: u64,
    /// Every path, in priority order.
    pub paths: Vec<PathMetrics>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathMetrics {
    pub path: PathId,
    pub kind: PathKind,
    pub health: PathHealth,
    pub latency_ms: Option<f64>,
    pub is_primary: bool,
    /// Position in the priority order; 0 is the most preferred.
    pub priority: u32,
    /// Pinned with `set_primary`.
    pub pinned: bool,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub probes_sent: u64,
    pub probes_failed: u64,
}

/// The connection to one peer: a sans-IO state machine.
///
/// Inputs are `add_path`, `remove_path`, `handle_probe_ack`, `handle_rx`, `handle_tx`,
/// `handle_timeout`, `set_primary`, `resume`, `enqueue` and `close`; outputs are drained with
/// `poll_transmit`, `poll_event`, `poll_command` and `poll_flush` until `None`, and
/// `poll_timeout` says when to call `handle_timeout` next. See the [module docs](super).
#[derive(Debug)]
pub struct Connection {
    profile: Profile,
    state: ConnState,
    paths: PathTable<Path>,
    primary: Option<PathId>,
    pinned: Option<PathId>,
    trial: Option<Trial>,
    timers: Timers,
    backoff: Backoff,
    attempt: u32,
    queue: PacketQueue,
    next_txid: u64,
    last_activity: Option<Instant>,
    /// When data was first sent on the current primary since anything was last heard on it.
    unanswered: Option<Instant>,
    connected_since: Option<Instant>,
    failovers: u64,
    relay_switches: u64,
    transmits: VecDeque<ProbeTransmit>,
    events: VecDeque<ConnEvent>,
    commands: VecDeque<Command>,
}

impl Connection {
    /// A new connection in state `connecting`, without paths. `seed` drives the backoff jitter
    /// and the first probe txid. The profile must pass [`Profile::validate`] (the named ones
    /// do; debug builds assert it).
    pub fn new(profile: Profile, now: Instant, seed: [u8; 32]) -> Connection {
        debug_assert_eq!(profile.validate(), Ok(()));
        let mut rng = ChaCha8Rng::from_seed(seed);
        let backoff_seed: [u8; 32] = rng.gen();
        Connection {
            state: ConnState::Connecting,
            paths: PathTable::default(),
            primary: None,
            pinned: None,
            trial: None,
            timers: Timers {
                connect: Some(now + profile.connect_timeout),
                backoff: None,
            },
            backoff: Backoff::new(profile.backoff, backoff_seed),
            attempt: 0,
            queue: PacketQueue::new(profile.queue_len),
            next_txid: rng.gen(),
            last_activity: None,
            unanswered: None,
            connected_since: None,
            failovers: 0,
            relay_switches: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            commands: VecDeque::new(),
            profile,
        }
    }

    // ----- inputs -----

    /// A new live path (a punched direct endpoint, a bound relay). It is probed at once and
    /// kept warm from then on. Returns false if it was already known or the connection is
    /// closed.
    pub fn add_path(&mut self, path: PathId, now: Instant) -> bool {
        if self.state == ConnState::Disconnected || self.paths.contains_key(&path) {
            return false;
        }
        self.paths.insert(path, Path::new(now));
        true
    }

    /// A path that is gone (relay binding lost, endpoint withdrawn). If it was the primary,
    /// the next healthy path takes over at once. Returns false for an unknown path.
    pub fn remove_path(&mut self, path: &PathId, now: Instant) -> bool {
        if self.paths.remove(path).is_none() {
            return false;
        }
        if self.pinned.as_ref() == Some(path) {
            self.pinned = None;
        }
        self.reselect(now);
        true
    }

    /// An authenticated probe acknowledgement with `txid` arrived on `path`. Returns false
    /// (and changes nothing) unless it answers this connection's outstanding probe on that
    /// path, so the caller may offer acks to other machines too.
    pub fn handle_probe_ack(&mut self, path: &PathId, txid: u64, now: Instant) -> bool {
        let Some(p) = self.paths.get_mut(path) else {
            return false;
        };
        let sent = if let Some(o) = p.outstanding.filter(|o| o.txid == txid) {
            p.outstanding = None;
            o.at
        } else if let Some(at) = p.check.and_then(|c| c.sent_at(txid)) {
            p.check = None;
            at
        } else if let Some(late) = p.late.filter(|o| o.txid == txid) {
            // The ack of a probe that already timed out: its loss was counted; its round trip
            // still feeds the latency average, so a slow path cannot hide behind its traffic.
            p.late = None;
            p.health.on_late_ack(now.saturating_duration_since(late.at));
            self.heard(path);
            return true;
        } else {
            return false;
        };
        self.heard(path);
        let Some(p) = self.paths.get_mut(path) else {
            return false;
        };
        let rtt = now.saturating_duration_since(sent);
        let transition = p.health.on_ack(rtt, &self.profile);
        if let Some(trial) = self.trial.as_mut().filter(|t| t.to == *path) {
            trial.samples.push(rtt);
        }
        self.note(path, transition);
        self.reselect(now);
        true
    }

    /// Authenticated data from the peer arrived on `path`. Traffic proves the path alive
    /// (its failure count resets) and marks the peer busy; if it goes silent, a probe follows
    /// within one probe interval. Returns false for an unknown path.
    pub fn handle_rx(&mut self, path: &PathId, now: Instant) -> bool {
        self.mark_busy(now);
        let soon = now + self.profile.probe_interval;
        if !self.heard(path) {
            return false;
        }
        let Some(p) = self.paths.get_mut(path) else {
            return false;
        };
        p.health.on_traffic(&self.profile);
        // An up path is checked once the data stops; one that is not up is checked now.
        p.next_probe = p.next_probe.min(if p.health.is_up() { soon } else { now });
        true
    }

    /// Data for the peer was sent on the primary (or queued): marks the peer busy, so its paths
    /// are probed at `probe_interval` instead of `idle_probe_interval`; and if nothing comes
    /// back on the primary within the silence timeout, a silence check starts.
    pub fn handle_tx(&mut self, now: Instant) {
        self.mark_busy(now);
        if self.primary.is_some() && self.unanswered.is_none() {
            self.unanswered = Some(now);
        }
    }

    /// Runs the timers that are due: lost probes, probes to send, connect timeout, reconnect
    /// attempts.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == ConnState::Disconnected {
            return;
        }
        // Lost probes first, then failed silence checks (events in that order).
        let (mut lost, mut silent) = (Vec::new(), Vec::new());
        for (id, p) in self.paths.iter_mut() {
            if p.outstanding.is_some_and(|o| now >= o.deadline) {
                p.late = p.outstanding.take();
                lost.push((id.clone(), p.health.on_failure(&self.profile)));
            }
            if let Some(c) = p.check.filter(|c| now >= c.deadline) {
                p.check = None;
                silent.push((id.clone(), p.health.on_silence(c.sent, &self.profile)));
            }
        }
        for (id, transition) in lost.into_iter().chain(silent) {
            self.note(&id, transition);
        }
        self.reselect(now);
        if let Some(at) = self.silence_deadline() {
            if now >= at {
                self.start_check(now);
            }
        }

        if self.timers.connect.is_some_and(|t| now >= t) {
            self.timers.connect = None;
            if self.primary.is_none() && self.state == ConnState::Connecting {
                self.start_reconnecting(now);
            }
        }
        if self.timers.backoff.is_some_and(|t| now >= t) {
            self.timers.backoff = None;
            self.next_attempt(now);
        }

        let cadence = self.cadence(now);
        let fast = cadence == self.profile.probe_interval;
        // While idle, a probe due on any path takes along the others due within a quarter of
        // the idle interval (one wake-up per peer, not one per path); and only the primary
        // and the best standby keep the idle interval, the rest probe four times as rarely.
        let standby = (!fast).then(|| self.best_standby()).flatten();
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
            let txid = self.next_txid;
            self.next_txid = self.next_txid.wrapping_add(1);
            p.outstanding = Some(Outstanding {
                txid,
                at: now,
                deadline: now + self.profile.probe_timeout,
            });
            let kept_warm = fast || primary.as_ref() == Some(id) || standby.as_ref() == Some(id);
            p.next_probe = now
                + if kept_warm {
                    cadence
                } else {
                    cadence * IDLE_STANDBY_FACTOR
                };
            p.health.probes_sent += 1;
            self.transmits.push_back(ProbeTransmit {
                path: id.clone(),
                txid,
            });
        }
    }

    /// Pins `path` as the primary until it fails (or is removed, or [`unpin`](Self::unpin)).
    /// Only a path that is up can be pinned.
    pub fn set_primary(&mut self, path: &PathId) -> Result<(), SetPrimaryError> {
        if self.state == ConnState::Disconnected {
            return Err(SetPrimaryError::Closed);
        }
        let Some(p) = self.paths.get(path) else {
            return Err(SetPrimaryError::UnknownPath(path.clone()));
        };
        if !p.health.is_up() {
            return Err(SetPrimaryError::NotUp(path.clone()));
        }
        self.pinned = Some(path.clone());
        if self.primary.as_ref() != Some(path) {
            self.change_primary(Some(path.clone()), PrimaryReason::Manual);
        }
        self.update_state();
        Ok(())
    }

    /// Ends a `set_primary` pin; the automatic rules apply again at once.
    pub fn unpin(&mut self, now: Instant) {
        self.pinned = None;
        self.reselect(now);
    }

    /// Something changed (the network, the peer's endpoints, or `rally peer reconnect`):
    /// every path is probed afresh now (outstanding probes are abandoned, not counted as
    /// lost), and a reconnecting or failed connection starts its attempts over with attempt 1
    /// now.
    pub fn resume(&mut self, now: Instant) {
        match self.state {
            ConnState::Disconnected => return,
            ConnState::Reconnecting | ConnState::Failed => self.start_reconnecting(now),
            ConnState::Connecting | ConnState::Connected | ConnState::Degraded => {}
        }
        self.unanswered = None;
        for p in self.paths.values_mut() {
            p.outstanding = None;
            p.check = None;
            p.next_probe = now;
        }
    }

    /// Holds a packet until a path is up (see [`poll_flush`](Self::poll_flush)). When the queue
    /// is full the oldest packet is dropped and counted.
    pub fn enqueue(&mut self, packet: Vec<u8>) {
        self.queue.push(packet);
    }

    /// Closes the connection (the peer left, or the agent stops): state `disconnected`,
    /// paths and queued packets dropped, no more timers.
    pub fn close(&mut self) {
        if self.state == ConnState::Disconnected {
            return;
        }
        if self.primary.is_some() {
            self.change_primary(None, PrimaryReason::Closed);
        }
        self.paths.clear();
        self.unanswered = None;
        self.pinned = None;
        self.timers = Timers::default();
        self.queue.clear();
        self.transmits.clear();
        self.connected_since = None;
        self.set_state(ConnState::Disconnected);
        self.events.push_back(ConnEvent::Disconnected);
    }

    // ----- outputs -----

    pub fn poll_transmit(&mut self) -> Option<ProbeTransmit> {
        crate::outputs::pop(&mut self.transmits)
    }

    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        crate::outputs::pop(&mut self.events)
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        crate::outputs::pop(&mut self.commands)
    }

    /// The oldest queued packet, once there is a primary path to send it on. Drain this
    /// before sending newer packets so the peer sees them in order.
    pub fn poll_flush(&mut self) -> Option<Vec<u8>> {
        self.primary.as_ref()?;
        self.queue.pop()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_wake().map(|w| w.at)
    }

    /// The next deadline with its reason.
    pub fn next_wake(&self) -> Option<Wake> {
        let own = self.timers.next().map(|(at, timer)| Wake {
            at,
            timer,
            path: None,
        });
        let silence = self.silence_deadline().map(|at| Wake {
            at,
            timer: Timer::Silence,
            path: self.primary.clone(),
        });
        let paths = self.paths.iter().map(|(id, p)| {
            let (at, timer) = p.next_timer();
            Wake {
                at,
                timer,
                path: Some(id.clone()),
            }
        });
        own.into_iter()
            .chain(silence)
            .chain(paths)
            .min_by_key(|w| w.at)
    }

    // ----- queries -----

    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The path traffic goes on now.
    pub fn primary(&self) -> Option<&PathId> {
        self.primary.as_ref()
    }

    /// The path pinned with `set_primary`, while the pin holds.
    pub fn pinned(&self) -> Option<&PathId> {
        self.pinned.as_ref()
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Since when the current primary-holding stretch began (for `uptime_seconds`).
    pub fn connected_since(&self) -> Option<Instant> {
        self.connected_since
    }

    pub fn path_health(&self, path: &PathId) -> Option<PathHealth> {
        self.paths.get(path).map(|p| p.health.state)
    }

    /// A path's smoothed latency, once measured.
    pub fn latency(&self, path: &PathId) -> Option<Duration> {
        self.paths.get(path).and_then(|p| p.health.rtt)
    }

    /// Every known path, in priority order.
    pub fn paths(&self) -> Vec<&PathId> {
        self.ranked().into_iter().map(|r| r.path).collect()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn metrics(&self) -> ConnMetrics {
        let ms = |d: Duration| d.as_nanos() as f64 / 1e6;
        let paths = self
            .ranked()
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let p = self.paths.get(r.path)?;
                Some(PathMetrics {
                    path: r.path.clone(),
                    kind: r.kind,
                    health: p.health.state,
                    latency_ms: p.health.rtt.map(ms),
                    is_primary: self.primary.as_ref() == Some(r.path),
                    priority: u32::try_from(i).unwrap_or(u32::MAX),
                    pinned: self.pinned.as_ref() == Some(r.path),
                    consecutive_failures: p.health.failures,
                    consecutive_successes: p.health.successes,
                    probes_sent: p.health.probes_sent,
                    probes_failed: p.health.probes_failed,
                })
            })
            .collect();
        ConnMetrics {
            state: self.state,
            primary: self.primary.clone(),
            strategy: self.primary.as_ref().map(PathId::kind),
            latency_ms: self.primary.as_ref().and_then(|p| self.latency(p)).map(ms),
            failovers: self.failovers,
            relay_switches: self.relay_switches,
            reconnect_attempt: self.attempt,
            queued: self.queue.len(),
            queue_dropped: self.queue.dropped(),
            paths,
        }
    }

    // ----- helpers -----

    /// Re-evaluates the primary after any change of health, and the state after that.
    fn reselect(&mut self, now: Instant) {
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
    fn improve(&mut self, current: PathId, now: Instant) {
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
    fn recovery_candidate(&self, current: &PathId) -> Option<PathId> {
        self.paths
            .iter()
            .filter(|(id, p)| id.kind() < current.kind() && p.health.is_trusted(&self.profile))
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .min()
            .map(|r| r.path.clone())
    }

    fn try_relay_switch(&mut self, current: PathId, now: Instant) {
        let Some(to) = self.relay_candidate(&current, now) else {
            return;
        };
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

    /// For a relayed primary slower than `relay_switch_latency`: the best trusted relay
    /// measured strictly faster that is not held back by an earlier revert.
    fn relay_candidate(&self, current: &PathId, now: Instant) -> Option<PathId> {
        if current.kind() != PathKind::Relay {
            return None;
        }
        let slow = self.latency(current)?;
        if slow <= self.profile.relay_switch_latency {
            return None;
        }
        self.paths
            .iter()
            .filter(|(id, p)| {
                id.kind() == PathKind::Relay
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
    fn trial_verdict(&self) -> Option<Verdict> {
        let trial = self.trial.as_ref()?;
        if trial.samples.len() < RELAY_TRIAL_SAMPLES {
            return Some(Verdict::Pending);
        }
        let n = u32::try_from(trial.samples.len()).unwrap_or(u32::MAX);
        let mean = trial.samples.iter().sum::<Duration>() / n;
        let old = self
            .paths
            .get(&trial.from)
            .filter(|p| p.health.is_up())
            .and_then(|p| p.health.rtt);
        Some(match old {
            Some(old) if mean > old => Verdict::Revert,
            _ => Verdict::Keep,
        })
    }

    fn revert_relay_switch(&mut self, now: Instant) {
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

    fn gain_primary(&mut self, to: PathId, now: Instant) {
        self.change_primary(Some(to.clone()), PrimaryReason::Connected);
        self.events.push_back(ConnEvent::Connected { path: to });
        self.connected_since = Some(now);
        self.timers.connect = None;
        self.timers.backoff = None;
        self.backoff.reset();
        self.attempt = 0;
    }

    fn fail_over(&mut self, from: PathId, to: PathId) {
        self.failovers += 1;
        self.events.push_back(ConnEvent::Failover {
            from,
            to: to.clone(),
        });
        self.change_primary(Some(to), PrimaryReason::Failover);
    }

    fn lose_primary(&mut self, now: Instant) {
        self.change_primary(None, PrimaryReason::Lost);
        self.connected_since = None;
        let soon = now + self.profile.probe_interval;
        for p in self.paths.values_mut() {
            p.next_probe = p.next_probe.min(soon);
        }
        self.start_reconnecting(now);
    }

    fn change_primary(&mut self, to: Option<PathId>, reason: PrimaryReason) {
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
    fn start_reconnecting(&mut self, now: Instant) {
        self.backoff.reset();
        self.attempt = 0;
        self.timers.connect = None;
        self.set_state(ConnState::Reconnecting);
        self.next_attempt(now);
    }

    /// The backoff deadline passed: the next attempt, or `failed` after the last one.
    fn next_attempt(&mut self, now: Instant) {
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

    fn give_up(&mut self) {
        self.timers.backoff = None;
        self.set_state(ConnState::Failed);
        self.events.push_back(ConnEvent::Failed {
            attempts: self.attempt,
        });
    }

    /// `connected` or `degraded` from the primary's latency; the states without a primary are
    /// set by their transitions.
    fn update_state(&mut self) {
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

    fn set_state(&mut self, to: ConnState) {
        if self.state == to {
            return;
        }
        let from = std::mem::replace(&mut self.state, to);
        self.events.push_back(ConnEvent::StateChange { from, to });
    }

    fn note(&mut self, path: &PathId, transition: Transition) {
        let path = path.clone();
        match transition {
            Transition::None => {}
            Transition::WentUp => self.events.push_back(ConnEvent::PathUp { path }),
            Transition::WentDown => self.events.push_back(ConnEvent::PathDown { path }),
        }
    }

    /// Something authenticated arrived on `path` (data or a probe ack): it is not silent.
    /// Returns false for an unknown path.
    fn heard(&mut self, path: &PathId) -> bool {
        if self.primary.as_ref() == Some(path) {
            self.unanswered = None;
        }
        let Some(p) = self.paths.get_mut(path) else {
            return false;
        };
        p.check = None;
        true
    }

    /// When the primary, having carried data, has been silent long enough for a check: the
    /// profile's `silence_timeout`, or twice its smoothed RTT if longer. `None` while a check
    /// runs or nothing is unanswered.
    fn silence_deadline(&self) -> Option<Instant> {
        let since = self.unanswered?;
        let primary = self.primary.as_ref()?;
        let p = self.paths.get(primary)?;
        if p.check.is_some() {
            return None;
        }
        let rtt = p.health.rtt.unwrap_or_default();
        Some(since + self.profile.silence_timeout.max(rtt * 2))
    }

    /// Starts a silence check on the primary: [`CHECK_PROBES`] probes, [`CHECK_SPACING`]
    /// apart (the first now), one shared deadline. Any answer on the path ends it; none by the
    /// deadline takes the path down.
    fn start_check(&mut self, now: Instant) {
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

    fn mark_busy(&mut self, now: Instant) {
        let was_idle = !self.is_busy(now);
        self.last_activity = Some(now);
        if was_idle {
            let soon = now + self.profile.probe_interval;
            for p in self.paths.values_mut() {
                p.next_probe = p.next_probe.min(soon);
            }
        }
    }

    fn is_busy(&self, now: Instant) -> bool {
        self.last_activity
            .is_some_and(|t| now.saturating_duration_since(t) < self.profile.idle_after)
    }

    /// Time to the next probe on each path: fast while busy or while there is no primary
    /// (except when failed: then cheap until resumed), slow while idle.
    fn cadence(&self, now: Instant) -> Duration {
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

    /// The best up path other than the primary: the one failover would pick.
    fn best_standby(&self) -> Option<PathId> {
        self.paths
            .iter()
            .filter(|(id, p)| p.health.is_up() && self.primary.as_ref() != Some(*id))
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .min()
            .map(|r| r.path.clone())
    }

    fn is_up(&self, path: &PathId) -> bool {
        self.paths.get(path).is_some_and(|p| p.health.is_up())
    }

    fn best_up(&self) -> Option<PathId> {
        self.paths
            .iter()
            .filter(|(_, p)| p.health.is_up())
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .min()
            .map(|r| r.path.clone())
    }

    fn ranked(&self) -> Vec<Rank<'_>> {
        let mut ranks: Vec<Rank<'_>> = self
            .paths
            .iter()
            .map(|(id, p)| Rank::new(id, p.health.rtt))
            .collect();
        ranks.sort();
        ranks
    }
}

/// One path's probing and health.
#[derive(Debug, Clone)]
struct Path {
    health: Health,
    next_probe: Instant,
    outstanding: Option<Outstanding>,
    /// The last probe that timed out (already counted as a failure): its late ack still
    /// tells how slow the path is.
    late: Option<Outstanding>,
    /// Not a relay-switch candidate before this (it measured worse after a switch).
    held_until: Option<Instant>,
    /// A running silence check (the primary only).
    check: Option<Check>,
}

impl Path {
    fn new(now: Instant) -> Path {
        Path {
            health: Health::new(),
            next_probe: now,
            outstanding: None,
            late: None,
            held_until: None,
            check: None,
        }
    }

    /// One probe is outstanding at a time, so while one is, only its loss deadline counts;
    /// a silence check runs beside it with its own timers.
    fn next_timer(&self) -> (Instant, Timer) {
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
struct Check {
    first_txid: u64,
    started: Instant,
    /// How many of the probes have been sent.
    sent: u32,
    deadline: Instant,
}

impl Check {
    fn next_send(&self) -> Option<Instant> {
        (self.sent < CHECK_PROBES).then(|| self.started + CHECK_SPACING * self.sent)
    }

    /// The txid of the next probe if it is due by `now` (and counts it as sent).
    fn next_due(&mut self, now: Instant) -> Option<u64> {
        self.next_send().filter(|at| *at <= now)?;
        let txid = self.first_txid.wrapping_add(u64::from(self.sent));
        self.sent += 1;
        Some(txid)
    }

    /// When the probe with `txid` was sent, if it is one of this check's.
    fn sent_at(&self, txid: u64) -> Option<Instant> {
        let i = u32::try_from(txid.wrapping_sub(self.first_txid)).ok()?;
        (i < self.sent).then(|| self.started + CHECK_SPACING * i)
    }
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    txid: u64,
    at: Instant,
    deadline: Instant,
}

/// The connection's own timers, one slot each.
#[derive(Debug, Clone, Copy, Default)]
struct Timers {
    connect: Option<Instant>,
    backoff: Option<Instant>,
}

impl Timers {
    fn next(&self) -> Option<(Instant, Timer)> {
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
struct Trial {
    from: PathId,
    to: PathId,
    /// RTTs measured on `to` since the switch.
    samples: Vec<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pending,
    Keep,
    Revert,
}

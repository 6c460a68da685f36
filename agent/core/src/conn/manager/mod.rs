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

mod probing;
mod queries;
pub mod relay_choice;
mod rules;

pub use queries::{ConnMetrics, PathMetrics};

use probing::{Check, Outstanding, Path, Timers, Trial, Verdict};

/// Acknowledged probes on a newly switched-to relay before it is compared with the old one.
pub const RELAY_TRIAL_SAMPLES: usize = 3;
/// A relay that turned out worse after a switch is not switched to again for this long.
pub const RELAY_REVERT_HOLD: Duration = Duration::from_secs(60);
/// Probes in a silence check (see [`Timer::Silence`]), so that one lost probe or ack does not
/// fail a path that carries data.
pub const CHECK_PROBES: u32 = 3;
/// While idle, paths other than the primary are probed this many times more rarely than the
/// idle interval (every 200 s with the stable profile's 25 s): a standby is a relay path, and
/// the relay client's own 10 s pings (and the peer's) watch the relay and keep its NAT mapping
/// open in between.
pub const IDLE_STANDBY_FACTOR: u32 = 8;
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

/// What happened, for logs and the event bus (the agent turns them into its event bus's `Event::from_conn`).
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
    /// A relay measured clearly better for the pair than the relayed primary, and since when
    /// ([`relay_choice`]).
    better: Option<(PathId, Instant)>,
    timers: Timers,
    backoff: Backoff,
    attempt: u32,
    queue: PacketQueue,
    next_txid: u64,
    last_activity: Option<Instant>,
    /// When data was first sent on the current primary since anything was last heard on it.
    unanswered: Option<Instant>,
    /// When the peer's data through a relay last started a check of a direct primary (at
    /// most one per `probe_interval`).
    relayed_check: Option<Instant>,
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
            better: None,
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
            relayed_check: None,
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
    ///
    /// Data from the peer through a relay while our primary is direct means the peer fell
    /// back to the relay: it no longer hears us directly (its address changed, or the path
    /// broke one way). Our primary is checked at once rather than after `silence_timeout`,
    /// so a roaming peer's replies follow it within one check.
    pub fn handle_rx(&mut self, path: &PathId, now: Instant) -> bool {
        self.mark_busy(now);
        self.traffic_on(path, now, true)
    }

    /// An authenticated WireGuard handshake message from the peer arrived on `path`: liveness
    /// for the path as data is, but not the peer's activity. boringtun rekeys a session 120 s
    /// after it began if it ever carried data, idle or not; were that busy, both idle peers
    /// would probe every path every second for `idle_after`. Returns false for an unknown path.
    pub fn handle_handshake(&mut self, path: &PathId, now: Instant) -> bool {
        self.traffic_on(path, now, self.is_busy(now))
    }

    /// The peer's own probe arrived on `path` (and was answered). While the peer is idle, an
    /// up path the peer has just probed needs no probe of ours this round: the peer is
    /// watching it, and the path carried its probe. Our next probe there moves to one idle
    /// interval from now, so each idle path is probed by one side only (the side whose round
    /// comes first), not by both. Busy peers are unaffected. A path not up yet that the peer
    /// has just reached us by is probed back at once (a relay path the peer bound before we
    /// did comes up one round trip later, not one probe interval). Returns whether the probe
    /// was postponed.
    pub fn handle_peer_probe(&mut self, path: &PathId, now: Instant) -> bool {
        let failed = self.state == ConnState::Failed;
        let stale = now.checked_sub(self.profile.probe_interval / 4);
        if let Some(p) = self.paths.get_mut(path) {
            // A probe of ours still waiting there long before the peer's came went out before
            // the path worked: it is replaced (a recent one is left to its answer).
            let waiting = p
                .outstanding
                .is_some_and(|o| stale.is_none_or(|t| o.at > t));
            if !failed && !p.health.is_up() && p.check.is_none() && !waiting {
                p.outstanding = None;
                p.next_probe = p.next_probe.min(now);
                return false;
            }
        }
        if !self.is_idle(now) {
            return false;
        }
        let cadence = self.cadence(now);
        let Some(p) = self.paths.get_mut(path) else {
            return false;
        };
        if !p.health.is_up() || p.outstanding.is_some() || p.check.is_some() {
            return false;
        }
        p.next_probe = p.next_probe.max(now + cadence);
        p.last_probe = Some(now);
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

        self.send_due_probes(now);
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
}

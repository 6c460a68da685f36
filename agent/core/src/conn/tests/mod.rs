//! Scenario tests on a fake clock: a simulated link answers each probe (or not) after a
//! scripted RTT, and the clock jumps from one deadline to the next.
//!
//! `failover`: failover, recovery and relay switching; `liveness`: traffic, silence checks and
//! idle probing; `lifecycle`: reconnecting, queueing, pinning, metrics and closing. The
//! simulation (`Sim`, `Link`) and its helpers are here.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::*;

mod failover;
mod lifecycle;
mod liveness;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn direct() -> PathId {
    PathId::Direct("203.0.113.2:51820".parse().unwrap())
}

fn relay(name: &str) -> PathId {
    PathId::Relay(name.into())
}

fn is_failover(e: &ConnEvent) -> bool {
    matches!(e, ConnEvent::Failover { .. })
}

fn is_relay_switch(e: &ConnEvent) -> bool {
    matches!(e, ConnEvent::RelaySwitch { .. })
}

/// A single relay path that dies; returns the reconnect attempts and when the connection failed.
fn reconnect_schedule(seed: [u8; 32]) -> (Vec<(u32, Duration)>, Duration) {
    let mut sim = Sim::with_seed(Profile::stable(), seed);
    sim.add(relay("eu"), Link::up(ms(40)));
    sim.send_every(ms(100));
    sim.run_for(secs(5));
    sim.link(&relay("eu"), Link::down());
    let failed_at = sim.run_until_event(|e| matches!(e, ConnEvent::Failed { .. }), secs(3600));
    let attempts = sim
        .commands
        .iter()
        .map(|(t, Command::Reconnect { attempt })| (*attempt, *t - sim.t0))
        .collect();
    (attempts, failed_at - sim.t0)
}

/// How a simulated path answers probes: each probe takes the next outcome (`None`: lost,
/// `Some(rtt)`: acked after `rtt`); at the end the script repeats its last entry, or starts
/// over if it cycles.
#[derive(Debug, Clone)]
struct Link {
    outcomes: Vec<Option<Duration>>,
    cycle: bool,
    next: usize,
}

impl Link {
    fn up(rtt: Duration) -> Link {
        Link::script([], Some(rtt))
    }

    fn down() -> Link {
        Link::script([], None)
    }

    fn script<const N: usize>(first: [Option<Duration>; N], then: Option<Duration>) -> Link {
        Link {
            outcomes: first.into_iter().chain([then]).collect(),
            cycle: false,
            next: 0,
        }
    }

    /// Lost, answered, lost, answered, ...
    fn alternating(rtt: Duration) -> Link {
        Link {
            outcomes: vec![None, Some(rtt)],
            cycle: true,
            next: 0,
        }
    }

    fn outcome(&mut self) -> Option<Duration> {
        let o = self.outcomes[self.next.min(self.outcomes.len() - 1)];
        self.next += 1;
        if self.cycle {
            self.next %= self.outcomes.len();
        }
        o
    }
}

/// A point in a simulation: its time and how much had been recorded.
struct Mark {
    at: Instant,
    events: usize,
    commands: usize,
}

/// A connection, a fake clock and simulated links, with a record of everything that happened.
struct Sim {
    conn: Connection,
    t0: Instant,
    now: Instant,
    links: BTreeMap<PathId, Link>,
    /// Acks on their way: (arrival, path, txid, rtt).
    in_flight: VecDeque<(Instant, PathId, u64, Duration)>,
    /// (sent, path, txid, outcome)
    probes: Vec<(Instant, PathId, u64, Option<Duration>)>,
    /// Acks the connection accepted: (arrival, path, rtt).
    acks: Vec<(Instant, PathId, Duration)>,
    events: Vec<(Instant, ConnEvent)>,
    commands: Vec<(Instant, Command)>,
    receiving: Option<(PathId, Duration, Instant)>,
    sending: Option<(Duration, Instant)>,
}

impl Sim {
    fn new(profile: Profile) -> Sim {
        Sim::with_seed(profile, [9; 32])
    }

    fn with_seed(profile: Profile, seed: [u8; 32]) -> Sim {
        let t0 = Instant::now();
        Sim {
            conn: Connection::new(profile, t0, seed),
            t0,
            now: t0,
            links: BTreeMap::new(),
            in_flight: VecDeque::new(),
            probes: Vec::new(),
            acks: Vec::new(),
            events: Vec::new(),
            commands: Vec::new(),
            receiving: None,
            sending: None,
        }
    }

    /// A busy peer (data both ways every 100 ms, on the direct path) with a direct path
    /// (20 ms) as primary and a relay `eu` (40 ms) standing by.
    fn direct_and_relay() -> Sim {
        let mut sim = Sim::new(Profile::stable());
        sim.add(direct(), Link::up(ms(20)));
        sim.add(relay("eu"), Link::up(ms(40)));
        sim.send_every(ms(100));
        sim.receive_every(&direct(), ms(100));
        sim.run_for(secs(10));
        assert_eq!(sim.conn.primary(), Some(&direct()));
        sim
    }

    /// A busy peer (data both ways every 100 ms, on relay `a`) with relays `a` (primary) and
    /// `b` only.
    fn relays(a: Duration, b: Duration) -> Sim {
        let mut sim = Sim::new(Profile::stable());
        sim.add(relay("a"), Link::up(a));
        sim.add(relay("b"), Link::up(b));
        sim.send_every(ms(100));
        sim.receive_every(&relay("a"), ms(100));
        sim.run_for(secs(10));
        assert_eq!(sim.conn.primary(), Some(&relay("a")));
        sim
    }

    fn profile(&self) -> Profile {
        self.conn.profile().clone()
    }

    fn add(&mut self, path: PathId, link: Link) {
        self.links.insert(path.clone(), link);
        assert!(self.conn.add_path(path, self.now));
        self.drain();
    }

    /// From now on, probes on `path` fare as `link` says.
    fn link(&mut self, path: &PathId, link: Link) {
        self.links.insert(path.clone(), link);
    }

    fn receive_every(&mut self, path: &PathId, every: Duration) {
        self.receiving = Some((path.clone(), every, self.now));
    }

    fn stop_receiving(&mut self) {
        self.receiving = None;
    }

    fn stop_sending(&mut self) {
        self.sending = None;
    }

    /// The path stops working both ways: probes are lost and the peer's data on it stops.
    fn cut(&mut self, path: &PathId) {
        self.link(path, Link::down());
        if self.receiving.as_ref().is_some_and(|r| r.0 == *path) {
            self.stop_receiving();
        }
    }

    fn send_every(&mut self, every: Duration) {
        self.sending = Some((every, self.now));
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Jumps from deadline to deadline (timers, acks, traffic) up to and including `end`.
    fn run_until(&mut self, end: Instant) {
        while self.advance(end) {}
        self.now = end.max(self.now);
    }

    /// Runs until an event matches; returns when it happened. Panics after `limit`.
    fn run_until_event(&mut self, pred: impl Fn(&ConnEvent) -> bool, limit: Duration) -> Instant {
        let seen = self.events.len();
        let end = self.now + limit;
        loop {
            if let Some((t, _)) = self.events[seen..].iter().find(|(_, e)| pred(e)) {
                return *t;
            }
            assert!(
                self.advance(end),
                "no matching event within {limit:?}: {:#?}",
                &self.events[seen..]
            );
        }
    }

    /// Moves the clock to the next deadline if it is at or before `end`, and runs it.
    fn advance(&mut self, end: Instant) -> bool {
        let next = [
            self.conn.poll_timeout(),
            self.in_flight.iter().map(|a| a.0).min(),
            self.receiving.as_ref().map(|r| r.2),
            self.sending.map(|s| s.1),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(t) = next.filter(|t| *t <= end) else {
            return false;
        };
        self.now = t.max(self.now);
        self.step();
        true
    }

    fn step(&mut self) {
        let now = self.now;
        while self.has_due_ack(now) {
            let i = self
                .in_flight
                .iter()
                .enumerate()
                .min_by_key(|(_, a)| a.0)
                .map(|(i, _)| i)
                .unwrap();
            let (_, path, txid, rtt) = self.in_flight.remove(i).unwrap();
            if self.conn.handle_probe_ack(&path, txid, now) {
                self.acks.push((now, path, rtt));
            }
            self.drain();
        }
        if let Some((path, every, at)) = self.receiving.clone().filter(|r| r.2 <= now) {
            self.conn.handle_rx(&path, now);
            self.receiving = Some((path, every, at + every));
        }
        if let Some((every, at)) = self.sending.filter(|s| s.1 <= now) {
            self.conn.handle_tx(now);
            self.sending = Some((every, at + every));
        }
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
            assert!(
                self.conn.poll_timeout().is_none_or(|t| t > now),
                "handle_timeout leaves no deadline in the past"
            );
        }
        self.drain();
    }

    fn has_due_ack(&self, now: Instant) -> bool {
        self.in_flight.iter().any(|a| a.0 <= now)
    }

    fn drain(&mut self) {
        let now = self.now;
        while let Some(tx) = self.conn.poll_transmit() {
            let outcome = self.links.get_mut(&tx.path).and_then(Link::outcome);
            if let Some(rtt) = outcome {
                self.in_flight
                    .push_back((now + rtt, tx.path.clone(), tx.txid, rtt));
            }
            self.probes.push((now, tx.path, tx.txid, outcome));
        }
        while let Some(e) = self.conn.poll_event() {
            self.events.push((now, e));
        }
        while let Some(c) = self.conn.poll_command() {
            self.commands.push((now, c));
        }
    }

    /// The present moment, to compare with later.
    fn mark(&self) -> Mark {
        Mark {
            at: self.now,
            events: self.events.len(),
            commands: self.commands.len(),
        }
    }

    /// Events since `mark`, without the chatter of state changes and paths coming up.
    fn events_since(&self, mark: &Mark) -> Vec<ConnEvent> {
        self.events[mark.events..]
            .iter()
            .map(|(_, e)| e.clone())
            .filter(|e| !matches!(e, ConnEvent::StateChange { .. } | ConnEvent::PathUp { .. }))
            .collect()
    }

    fn commands_since(&self, mark: &Mark) -> Vec<Command> {
        self.commands[mark.commands..]
            .iter()
            .map(|(_, c)| *c)
            .collect()
    }

    fn primary_changes_since(&self, mark: &Mark) -> usize {
        self.events[mark.events..]
            .iter()
            .filter(|(_, e)| matches!(e, ConnEvent::PrimaryChange { .. }))
            .count()
    }

    /// When probes on `path` were sent in `[from, to)`.
    fn probes_on(&self, path: &PathId, from: Instant, to: Instant) -> Vec<Instant> {
        self.probes
            .iter()
            .filter(|(t, p, ..)| p == path && *t >= from && *t < to)
            .map(|(t, ..)| *t)
            .collect()
    }

    fn lost_probes(&self, path: &PathId, from: Instant, to: Instant) -> Vec<Instant> {
        self.probes
            .iter()
            .filter(|(t, p, _, o)| p == path && o.is_none() && *t >= from && *t < to)
            .map(|(t, ..)| *t)
            .collect()
    }

    fn txids_on(&self, path: &PathId) -> Vec<u64> {
        self.probes
            .iter()
            .filter(|(_, p, ..)| p == path)
            .map(|(_, _, txid, _)| *txid)
            .collect()
    }

    /// Accepted acks on `path` that arrived in `(from, to]`.
    fn acks(&self, path: &PathId, from: Instant, to: Instant) -> Vec<Instant> {
        self.acks
            .iter()
            .filter(|(t, p, _)| p == path && *t > from && *t <= to)
            .map(|(t, ..)| *t)
            .collect()
    }

    /// When acks on `path` that took exactly `rtt` arrived.
    fn acks_taking(&self, path: &PathId, rtt: Duration) -> Vec<Instant> {
        self.acks
            .iter()
            .filter(|(_, p, r)| p == path && *r == rtt)
            .map(|(t, ..)| *t)
            .collect()
    }

    fn path_metrics(&self, path: &PathId) -> PathMetrics {
        self.conn
            .metrics()
            .paths
            .into_iter()
            .find(|m| m.path == *path)
            .unwrap()
    }
}

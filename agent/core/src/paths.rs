//! Hole punching towards one peer (sans-IO): probes to every candidate until one is proven.
//! Once a direct path is proven it belongs to the peer's connection manager (`conn`), which
//! watches its health; when that manager loses the path (the peer failed over to a relay, or
//! lost every path), [`PeerPaths::forget_direct`] starts punching again, and a punch that
//! gives up is retried on a backoff ladder ([`PUNCH_RETRY`]) for as long as no direct path is
//! proven. [`PeerPaths::start_punch`] always starts over, even while a (possibly stale)
//! direct address is known: new candidates, the control plane's `Punch` and
//! `rally peer reconnect` all mean "try every candidate now".
//!
//! A direct path is proven by an acknowledged probe, or by authenticated traffic from an address
//! (a WireGuard packet that decrypts). A probe from an unknown address (a peer-reflexive
//! candidate, e.g. a symmetric NAT's fresh port) is answered with an ack of its own size (at
//! most [`ACK_RATE`] a second) and probed back at most [`REFLEXIVE_RATE`] times a second: a
//! member forging probes from someone else's address gets no more bytes sent there than it
//! sent, and a probe flood costs the data plane an HMAC per probe, not a send.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rally_proto::limit::TokenBucket;
use rally_proto::probe::{Probe, ProbeKind, LEN as PROBE_LEN};
use rally_proto::relay::ShortId;

use crate::conn::PathId;

/// Probing schedule while punching: fast at first, then slower, then give up until retried.
const PUNCH_FAST: Duration = Duration::from_millis(100);
const PUNCH_FAST_FOR: Duration = Duration::from_secs(2);
const PUNCH_SLOW: Duration = Duration::from_millis(500);
const PUNCH_FOR: Duration = Duration::from_secs(10);
/// After the n-th punch in a row fails, try again this much later (the last step repeats).
pub const PUNCH_RETRY: [Duration; 4] = [
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(15),
    Duration::from_secs(30),
];
/// Most candidates (reported and peer-reflexive) kept.
const MAX_CANDIDATES: usize = 24;
/// Probes sent back to the address a probe came from, per second (burst 2): that address is
/// not proven to be the peer's.
pub const REFLEXIVE_RATE: f64 = 1.0;
/// Probes from the peer answered per second (burst as many): far above what its punching and
/// path checks send, low enough that a member flooding probes costs a few syscalls a second.
pub const ACK_RATE: f64 = 100.0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEvent {
    DirectUp(SocketAddr),
}

#[derive(Debug, Clone, Copy)]
struct Punch {
    start: Instant,
    next: Instant,
}

pub struct PeerPaths {
    me: ShortId,
    key: [u8; 32],
    candidates: Vec<SocketAddr>,
    direct: Option<SocketAddr>,
    punch: Option<Punch>,
    retry_at: Option<Instant>,
    /// Punches in a row that gave up (the step of [`PUNCH_RETRY`]).
    failed: usize,
    /// Skip punching (both sides map endpoint-dependently): relay only.
    hopeless: bool,
    pending: VecDeque<(u64, SocketAddr)>,
    txid: u64,
    transmits: VecDeque<(PathId, [u8; PROBE_LEN])>,
    events: VecDeque<PathEvent>,
    /// Budget for probing back new addresses (created on first use).
    reflexive: Option<TokenBucket>,
    /// Budget for acks (created on first use).
    acks: Option<TokenBucket>,
    /// When the latest punch started (`rally peer why`).
    started_at: Option<Instant>,
}

impl PeerPaths {
    /// `me`: our short id; `key`: the probe key shared with this peer; `txid_seed`: random.
    pub fn new(me: ShortId, key: [u8; 32], candidates: Vec<SocketAddr>, txid_seed: u64) -> Self {
        PeerPaths {
            me,
            key,
            candidates,
            direct: None,
            punch: None,
            retry_at: None,
            failed: 0,
            hopeless: false,
            pending: VecDeque::new(),
            txid: txid_seed,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            reflexive: None,
            acks: None,
            started_at: None,
        }
    }

    /// When the latest punch started.
    pub fn started_at(&self) -> Option<Instant> {
        self.started_at
    }

    /// The key probes with this peer are authenticated with.
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    pub fn candidates(&self) -> &[SocketAddr] {
        &self.candidates
    }

    /// The proven direct address, if any.
    pub fn direct(&self) -> Option<SocketAddr> {
        self.direct
    }

    /// The connection manager gave the direct path up: punch again from `now`.
    pub fn forget_direct(&mut self, now: Instant) {
        self.direct = None;
        self.start_punch(now);
    }

    pub fn is_punching(&self) -> bool {
        self.punch.is_some()
    }

    /// New candidates from the control plane (peer-reflexive ones are kept).
    pub fn set_candidates(&mut self, candidates: &[SocketAddr]) {
        for c in candidates {
            self.add_candidate(*c);
        }
    }

    /// When both sides map endpoint-dependently, punching cannot work: don't try (a punch in
    /// progress stops). Clearing it does not start a punch: the caller decides when.
    pub fn set_hopeless(&mut self, hopeless: bool) {
        self.hopeless = hopeless;
        if hopeless {
            self.punch = None;
            self.retry_at = None;
            self.forget_pending();
        }
    }

    pub fn is_hopeless(&self) -> bool {
        self.hopeless
    }

    /// How many punch attempts in a row timed out without a proven direct path.
    pub fn punches_failed(&self) -> usize {
        self.failed
    }

    /// Starts (or restarts) punching every candidate at `start`, with the retry ladder from
    /// its first step. A known direct address does not stop it: it may be stale.
    pub fn start_punch(&mut self, start: Instant) {
        if self.hopeless {
            return;
        }
        self.punch = Some(Punch { start, next: start });
        self.retry_at = None;
        self.failed = 0;
        self.started_at = Some(start);
    }

    /// Probes `to` once from the main socket (birthday punching's prober): its ack proves the
    /// path like any punch probe's. `to` does not become a candidate.
    pub fn probe_extra(&mut self, to: SocketAddr) {
        self.send_probe(to);
    }

    /// `to` was proven another way (birthday punching's opener, through the side socket
    /// that now carries it).
    pub fn prove_external(&mut self, to: SocketAddr) {
        self.prove(to);
    }

    /// An authenticated probe from the peer, received via `via`.
    pub fn handle_probe(&mut self, via: PathId, probe: Probe, now: Instant) {
        match probe.kind {
            ProbeKind::Probe => {
                let acks = self
                    .acks
                    .get_or_insert_with(|| TokenBucket::new(ACK_RATE, ACK_RATE, now));
                if !acks.try_take(1.0, now) {
                    return;
                }
                let direct = via.addr();
                self.queue(via, ProbeKind::Ack, probe.txid);
                if let Some(addr) = direct {
                    if self.direct != Some(addr) && self.may_probe_back(now) {
                        // Peer-reflexive: probe it back to prove the way out too.
                        self.add_candidate(addr);
                        self.send_probe(addr);
                    }
                }
            }
            ProbeKind::Ack => {
                let PathId::Direct(addr) = via else { return };
                let Some(i) = self
                    .pending
                    .iter()
                    .position(|(t, a)| *t == probe.txid && *a == addr)
                else {
                    // Our probe, answered from another address: the peer now sends to us from
                    // another socket (one birthday punching made carry our path), or through
                    // another mapping. That address proves nothing yet: probe it back, as a
                    // peer-reflexive candidate (within the same budget).
                    let ours = self.pending.iter().any(|(t, _)| *t == probe.txid);
                    if ours && self.direct != Some(addr) && self.may_probe_back(now) {
                        self.add_candidate(addr);
                        self.send_probe(addr);
                    }
                    return;
                };
                self.pending.remove(i);
                self.prove(addr);
            }
        }
    }

    /// Authenticated WireGuard traffic arrived directly from `addr`.
    pub fn handle_direct_traffic(&mut self, addr: SocketAddr) {
        if self.direct != Some(addr) {
            self.add_candidate(addr);
            self.prove(addr);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = &mut self.punch {
            if now >= p.next {
                let elapsed = now.saturating_duration_since(p.start);
                if elapsed >= PUNCH_FOR {
                    self.punch = None;
                    // With a direct path known, the punch only looked for a better one:
                    // retrying is for peers without one.
                    if self.direct.is_none() {
                        let step = PUNCH_RETRY[self.failed.min(PUNCH_RETRY.len() - 1)];
                        self.failed += 1;
                        self.retry_at = Some(now + step);
                    }
                    self.forget_pending();
                } else {
                    p.next = now
                        + if elapsed < PUNCH_FAST_FOR {
                            PUNCH_FAST
                        } else {
                            PUNCH_SLOW
                        };
                    for c in self.candidates.clone() {
                        self.send_probe(c);
                    }
                }
            }
        }
        if self.retry_at.is_some_and(|t| now >= t) && !self.hopeless {
            self.retry_at = None;
            self.punch = Some(Punch {
                start: now,
                next: now,
            });
            self.handle_timeout(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.punch.map(|p| p.next), self.retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<(PathId, [u8; PROBE_LEN])> {
        crate::outputs::pop(&mut self.transmits)
    }

    pub fn poll_event(&mut self) -> Option<PathEvent> {
        crate::outputs::pop(&mut self.events)
    }

    /// Whether to probe `addr` back now, within [`REFLEXIVE_RATE`] (the punch itself probes
    /// every candidate on its own schedule).
    fn may_probe_back(&mut self, now: Instant) -> bool {
        self.reflexive
            .get_or_insert_with(|| TokenBucket::new(REFLEXIVE_RATE, 2.0, now))
            .try_take(1.0, now)
    }

    /// `addr` answered: the punch is over; a new address is news for the connection manager.
    fn prove(&mut self, addr: SocketAddr) {
        self.punch = None;
        self.retry_at = None;
        self.failed = 0;
        self.forget_pending();
        if self.direct != Some(addr) {
            self.direct = Some(addr);
            self.events.push_back(PathEvent::DirectUp(addr));
        }
    }

    /// The probes still awaiting an ack are of no use once the punch is over (proven or given
    /// up), and a hundred of them are 4 KiB per peer.
    fn forget_pending(&mut self) {
        self.pending = VecDeque::new();
    }

    fn add_candidate(&mut self, addr: SocketAddr) {
        if !self.candidates.contains(&addr) && self.candidates.len() < MAX_CANDIDATES {
            self.candidates.push(addr);
        }
    }

    fn send_probe(&mut self, to: SocketAddr) -> u64 {
        self.txid = self.txid.wrapping_add(1);
        let txid = self.txid;
        self.pending.push_back((txid, to));
        while self.pending.len() > 256 {
            self.pending.pop_front();
        }
        self.queue(PathId::Direct(to), ProbeKind::Probe, txid);
        txid
    }

    fn queue(&mut self, via: PathId, kind: ProbeKind, txid: u64) {
        let p = Probe {
            kind,
            from: self.me,
            txid,
        };
        self.transmits.push_back((via, p.encode(&self.key)));
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
#[path = "paths_tests.rs"]
mod tests;

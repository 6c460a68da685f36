//! The birthday machine's state once a pair has been a birthday pair: arming, the attempt
//! (opening sockets or probing ports), its end, and the retry schedule.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use rally_proto::probe::{Probe, ProbeKind, LEN as PROBE_LEN};
use rally_proto::relay::ShortId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::role::Role;
use super::{
    BirthdayOut, Outcome, Record, AFTER_PUNCH, ATTEMPT_FOR, MAX_PROBES, MAX_SOCKETS, MIN_GAP,
    OPEN_PER_TICK, PREDICT, RETRY, TICK, WIRE_BYTES,
};

struct Attempt {
    record: Record,
    next: Instant,
    end: Instant,
    txid_base: u64,
    /// Ports probed (prober), so each is tried at most once.
    tried: HashSet<u16>,
    /// Sockets that got a probe from the peer and probed back (opener).
    answered: HashSet<u16>,
    /// Opener: the peer's probes acked (each costs an ack of the same size).
    acks: u32,
    /// Prober: predicted ports used up.
    k: u32,
    /// The prober's random ports.
    rng: ChaCha8Rng,
}

/// The machine's state once the pair has been a birthday pair (boxed in [`Birthday`]).
pub(super) struct Inner {
    me: ShortId,
    key: [u8; 32],
    /// Seeds the next attempt's generator (and then moves on).
    seed: u64,
    attempt: Option<Box<Attempt>>,
    /// A coordinated punch started at this instant: an attempt is due [`AFTER_PUNCH`] later.
    armed: Option<(Instant, Role)>,
    /// The socket carrying the peer's direct path.
    carried: Option<(u16, SocketAddr)>,
    last: Option<Box<Record>>,
    failed: usize,
    last_end: Option<Instant>,
    retry_at: Option<Instant>,
    /// A coordinated punch was asked for when the pair first looked like one for us.
    asked_first: bool,
    out: VecDeque<BirthdayOut>,
}

impl Inner {
    pub(super) fn new(me: ShortId, key: [u8; 32], seed: u64) -> Self {
        Inner {
            me,
            key,
            seed,
            attempt: None,
            armed: None,
            carried: None,
            last: None,
            failed: 0,
            last_end: None,
            retry_at: None,
            asked_first: false,
            out: VecDeque::new(),
        }
    }

    /// The running attempt or the last one.
    pub fn record(&self) -> Option<Record> {
        self.attempt
            .as_ref()
            .map(|a| a.record)
            .or(self.last.as_deref().copied())
    }

    /// Attempts in a row that failed.
    pub fn failures(&self) -> usize {
        self.failed
    }

    pub fn is_running(&self) -> bool {
        self.attempt.is_some()
    }

    /// An attempt is armed or running.
    pub fn is_busy(&self) -> bool {
        self.attempt.is_some() || self.armed.is_some()
    }

    /// Too many attempts elsewhere: ask for another coordinated punch at `at` instead.
    pub fn defer(&mut self, at: Instant) {
        if self.retry_at.is_none() && !self.is_busy() {
            self.retry_at = Some(at);
        }
    }

    /// The side socket carrying the peer's direct path, and its address.
    pub fn carried(&self) -> Option<(u16, SocketAddr)> {
        self.carried
    }

    /// A coordinated punch starts at `start` and `role` is what the NAT reports give (none:
    /// birthday punching is not for this pair). Arms an attempt [`AFTER_PUNCH`] later unless
    /// one runs or the last ended less than [`MIN_GAP`] ago.
    pub fn arm(&mut self, start: Instant, role: Option<Role>) {
        let Some(role) = role else {
            self.armed = None;
            return;
        };
        let recent = self.last_end.is_some_and(|e| start < e + MIN_GAP);
        if self.attempt.is_some() || recent || self.carried.is_some() {
            return;
        }
        self.armed = Some((start + AFTER_PUNCH, role));
        self.retry_at = None;
    }

    /// The NAT reports now call for birthday punching (`role`): the first time, and only
    /// while nothing was armed or tried, ask for a coordinated punch (the punches at the
    /// peer's arrival usually come before both reports are in).
    pub fn reports_changed(&mut self, role: Option<Role>) {
        if role.is_none() || self.asked_first || self.armed.is_some() {
            return;
        }
        if self.attempt.is_none() && self.last.is_none() && self.carried.is_none() {
            self.asked_first = true;
            self.out.push_back(BirthdayOut::WantPunch);
        }
    }

    /// A direct path is known (any way): no attempt is wanted; a running one ends.
    pub fn direct_proven(&mut self, addr: SocketAddr, now: Instant) {
        self.armed = None;
        self.retry_at = None;
        let Some(a) = self.attempt.as_ref() else {
            return;
        };
        let predicted = match a.record.role {
            Role::Probe {
                predict: Some((base, d)),
                ..
            } => (1..=PREDICT as i32).any(|k| i32::from(base) + d * k == i32::from(addr.port())),
            _ => false,
        };
        let won = match a.record.role {
            Role::Probe { ip, .. } => ip == addr.ip(),
            // Through a carried socket, or the main socket (a predicted port can be the main
            // socket's own mapping towards the peer).
            Role::Open { target } => addr == target,
        };
        let outcome = if won {
            Outcome::Direct { predicted }
        } else {
            Outcome::Abandoned
        };
        self.end(outcome, now);
    }

    /// The direct path at `addr` was lost: the socket carrying it (if any) closes.
    pub fn direct_lost(&mut self, addr: SocketAddr) {
        if let Some((socket, to)) = self.carried {
            if to == addr {
                self.carried = None;
                self.out.push_back(BirthdayOut::Close(socket));
            }
        }
    }

    /// Stops everything (the peer left, or birthday punching no longer fits the pair).
    pub fn stop(&mut self, now: Instant) {
        self.armed = None;
        self.retry_at = None;
        if self.attempt.is_some() {
            self.end(Outcome::Abandoned, now);
        }
        if let Some((socket, _)) = self.carried.take() {
            self.out.push_back(BirthdayOut::Close(socket));
        }
    }

    /// An authenticated probe from the peer arrived on side socket `socket` from `from`.
    pub fn handle_probe(&mut self, socket: u16, from: SocketAddr, probe: Probe, now: Instant) {
        let Some(a) = self.attempt.as_mut() else {
            return;
        };
        let Role::Open { target } = a.record.role else {
            return;
        };
        if socket >= a.record.sockets || from != target {
            return;
        }
        let txid = a.txid_base.wrapping_add(u64::from(socket));
        match probe.kind {
            ProbeKind::Probe => {
                if a.acks >= MAX_PROBES {
                    return;
                }
                a.acks += 1;
                let ack = encode(self.me, &self.key, ProbeKind::Ack, probe.txid);
                let back = a.answered.insert(socket);
                a.record.bytes += WIRE_BYTES * (1 + u64::from(back));
                self.out.push_back(BirthdayOut::SideSend {
                    socket,
                    to: from,
                    payload: ack,
                });
                if back {
                    let p = encode(self.me, &self.key, ProbeKind::Probe, txid);
                    self.out.push_back(BirthdayOut::SideSend {
                        socket,
                        to: from,
                        payload: p,
                    });
                }
            }
            ProbeKind::Ack if probe.txid == txid => {
                self.carried = Some((socket, from));
                self.out.push_back(BirthdayOut::Carry { socket, to: from });
                self.out.push_back(BirthdayOut::Proven(from));
                self.direct_proven(from, now);
            }
            ProbeKind::Ack => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((at, role)) = self.armed {
            if now >= at {
                self.armed = None;
                self.start(role, now);
            }
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            self.out.push_back(BirthdayOut::WantPunch);
        }
        let Some(a) = self.attempt.as_mut() else {
            return;
        };
        if now >= a.end {
            self.end(Outcome::Failed, now);
            return;
        }
        if now >= a.next {
            a.next = now + TICK;
            self.tick();
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let attempt = self.attempt.as_ref().map(|a| a.next.min(a.end));
        [attempt, self.armed.map(|(t, _)| t), self.retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll(&mut self) -> Option<BirthdayOut> {
        crate::outputs::pop(&mut self.out)
    }

    fn start(&mut self, role: Role, now: Instant) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        self.seed = rng.gen();
        let txid_base = rng.gen::<u64>() & !0xffff;
        self.attempt = Some(Box::new(Attempt {
            record: Record {
                role,
                started: now,
                ended: None,
                outcome: Outcome::Running,
                probes: 0,
                sockets: 0,
                bytes: 0,
                predicted: 0,
            },
            next: now,
            end: now + ATTEMPT_FOR,
            txid_base,
            tried: HashSet::new(),
            answered: HashSet::new(),
            acks: 0,
            k: 0,
            rng,
        }));
        self.handle_timeout(now);
    }

    /// One tick: the opener opens its next sockets, the prober sends its next probe.
    fn tick(&mut self) {
        let Some(a) = self.attempt.as_mut() else {
            return;
        };
        match a.record.role {
            Role::Open { target } => {
                let upto = (a.record.sockets + OPEN_PER_TICK).min(MAX_SOCKETS);
                for socket in a.record.sockets..upto {
                    let txid = a.txid_base.wrapping_add(u64::from(socket));
                    let payload = encode(self.me, &self.key, ProbeKind::Probe, txid);
                    self.out.push_back(BirthdayOut::SideSend {
                        socket,
                        to: target,
                        payload,
                    });
                    a.record.bytes += WIRE_BYTES;
                }
                a.record.probes += u32::from(upto - a.record.sockets);
                a.record.sockets = upto;
            }
            Role::Probe { ip, predict } => {
                if a.record.probes >= MAX_PROBES {
                    return;
                }
                let Some((port, predicted)) = next_port(a, predict) else {
                    return;
                };
                a.record.probes += 1;
                a.record.predicted += u32::from(predicted);
                a.record.bytes += WIRE_BYTES;
                self.out
                    .push_back(BirthdayOut::Probe(SocketAddr::new(ip, port)));
            }
        }
    }

    fn end(&mut self, outcome: Outcome, now: Instant) {
        let Some(mut a) = self.attempt.take() else {
            return;
        };
        a.record.ended = Some(now);
        a.record.outcome = outcome;
        let keep = self.carried.map(|(s, _)| s);
        for socket in (0..a.record.sockets).filter(|s| Some(*s) != keep) {
            self.out.push_back(BirthdayOut::Close(socket));
        }
        self.last = Some(Box::new(a.record));
        self.last_end = Some(now);
        match outcome {
            Outcome::Failed => {
                let step = RETRY[self.failed.min(RETRY.len() - 1)];
                self.failed += 1;
                self.retry_at = Some(now + step);
            }
            Outcome::Direct { .. } => self.failed = 0,
            Outcome::Running | Outcome::Abandoned => {}
        }
    }
}

/// The prober's next port: the next predicted one while any is left, else a random one of
/// `1024..=65535` not tried yet. `None` once no untried port is found (never in practice).
fn next_port(a: &mut Attempt, predict: Option<(u16, i32)>) -> Option<(u16, bool)> {
    if let Some((base, d)) = predict {
        while a.k < PREDICT {
            a.k += 1;
            let port = i32::from(base) + d * a.k as i32;
            match u16::try_from(port) {
                Ok(p) if p >= 1024 && a.tried.insert(p) => return Some((p, true)),
                _ => {}
            }
        }
    }
    for _ in 0..64 {
        let p = a.rng.gen_range(1024..=u16::MAX);
        if a.tried.insert(p) {
            return Some((p, false));
        }
    }
    None
}

fn encode(me: ShortId, key: &[u8; 32], kind: ProbeKind, txid: u64) -> [u8; PROBE_LEN] {
    Probe {
        kind,
        from: me,
        txid,
    }
    .encode(key)
}

//! Birthday punching and port prediction towards one peer (sans-IO).
//!
//! For a pair where one side maps endpoint-dependently (a symmetric NAT: a fresh public port
//! per destination) and the other endpoint-independently but filters by address and port (a
//! home router), ordinary punching cannot work: the symmetric side's probes reach the home
//! router from a port the home side never sent to, and the home side probes a port the
//! symmetric NAT gave to someone else. Two things can still meet:
//!
//! - the **opener** (the endpoint-dependent side) opens up to [`MAX_SOCKETS`] side sockets,
//!   each sending one probe to the other side's public endpoint: [`MAX_SOCKETS`] fresh
//!   mappings on its NAT, each open to that one endpoint;
//! - the **prober** (the endpoint-independent side) probes ports of the opener's public IP
//!   from its main socket (its one mapping), at most [`MAX_PROBES`] at [`PROBE_RATE`] a second:
//!   each probe also opens its own router's filter for that port. A sequential NAT (the
//!   opener's netcheck saw consecutive mappings `port_delta` apart) is tried by **prediction**
//!   first: the [`PREDICT`] ports after the opener's reported one, `port_delta` apart; then
//!   random ports of `1024..=65535` (a random NAT's range), each at most once.
//!
//! A probe that hits one of the opener's mappings arrives on that side socket; the opener acks
//! it and probes back from the same socket; the ack of that probe-back proves the path. The
//! socket that connects **carries** that peer's WireGuard traffic from then on
//! ([`BirthdayOut::Carry`]: the driver sends everything for that address from it and hands
//! what it receives to the main path), and the other sockets are closed. With 256 mappings
//! among 64 512 ports, 1 024 probes find one with a chance of 1 − (1 − 256/64 512)^1024 ≈ 98 %.
//!
//! Attempts start only from a punch the control plane coordinated (both sides arm at the same
//! start), [`AFTER_PUNCH`] after it with no direct path proven; a failed attempt is retried
//! after [`RETRY`] (the node asks the control plane for a fresh coordinated punch then).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rally_proto::probe::{Probe, ProbeKind, LEN as PROBE_LEN};
use rally_proto::relay::ShortId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod role;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests;

pub use role::Role;

/// Most side sockets the opener opens per attempt.
pub const MAX_SOCKETS: u16 = 256;
/// Sockets opened per tick of [`TICK`] (400 a second: all 256 in 0.64 s).
const OPEN_PER_TICK: u16 = 4;
/// Most probes the prober sends per attempt.
pub const MAX_PROBES: u32 = 1024;
/// Probes per second.
pub const PROBE_RATE: u32 = 100;
const TICK: Duration = Duration::from_millis(10);
/// Ports predicted (`port_delta` apart) before random ones, for a sequential NAT.
pub const PREDICT: u32 = 256;
/// Most `|port_delta|` believed to be a sequential NAT's step.
pub const MAX_DELTA: i32 = 16;
/// An attempt lasts this long on both sides (the prober's 1024 probes at 100/s, then a
/// second for the last answers).
pub const ATTEMPT_FOR: Duration = Duration::from_millis(11_300);
/// An attempt starts this long after the coordinated punch it was armed by, if that punch
/// proved nothing by then: ten rounds of its fast phase (100 ms apart), many round trips.
pub const AFTER_PUNCH: Duration = Duration::from_secs(1);
/// After the n-th failed attempt in a row, ask for another this much later (the last repeats).
pub const RETRY: [Duration; 3] = [
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(900),
];
/// Most attempts armed or running at once over all peers of an agent (each opener holds up
/// to 256 sockets, each prober sends 100 probes a second); a punch that would arm more asks
/// again [`MIN_GAP`] later.
pub const MAX_CONCURRENT: usize = 2;
/// A coordinated punch arms no attempt sooner than this after the last one ended (duplicate
/// punch messages right after an attempt); otherwise every coordinated punch arms one, so a
/// side that had to wait ([`MAX_CONCURRENT`]) pulls its peer in when it asks again.
pub const MIN_GAP: Duration = Duration::from_secs(5);
/// Bytes on the wire per probe: 36 bytes of probe, 8 of UDP, 20 of IPv4.
pub const WIRE_BYTES: u64 = PROBE_LEN as u64 + 28;
/// Most bytes one side sends in an attempt (the prober's probes, or the opener's probes,
/// probe-backs and acks): 1024 · 64 B = 64 KiB, well under 300 KB.
pub const MAX_BYTES: u64 = MAX_PROBES as u64 * WIRE_BYTES;

/// What the machine asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BirthdayOut {
    /// Send `payload` from side socket `socket` (opened on first use) to `to`.
    SideSend {
        socket: u16,
        to: SocketAddr,
        payload: [u8; PROBE_LEN],
    },
    /// Close side socket `socket`.
    Close(u16),
    /// From now on the peer's direct traffic to `to` goes through side socket `socket`, and
    /// what that socket receives is handled as if it came on the main socket.
    Carry { socket: u16, to: SocketAddr },
    /// The prober's probe to `to` from the main socket (the puncher sends it, so its ack
    /// proves the path like any other).
    Probe(SocketAddr),
    /// The opener proved `to` through the socket it carries: a direct path.
    Proven(SocketAddr),
    /// Ask the control plane for a coordinated punch (a retry is due).
    WantPunch,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Running,
    /// A direct path was proven (`predicted`: by a predicted port).
    Direct {
        predicted: bool,
    },
    Failed,
    /// Stopped before its end (the peer left, the NAT reports changed, a direct path came
    /// another way).
    Abandoned,
}

/// One attempt, for `rally peer why`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub role: Role,
    pub started: Instant,
    pub ended: Option<Instant>,
    pub outcome: Outcome,
    /// Probes sent (prober) or sockets opened (opener).
    pub probes: u32,
    pub sockets: u16,
    /// Bytes this side sent in the attempt.
    pub bytes: u64,
    /// Of `probes`, how many were predicted ports.
    pub predicted: u32,
}

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
struct Inner {
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
    fn new(me: ShortId, key: [u8; 32], seed: u64) -> Self {
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

/// Birthday punching towards one peer. Every peer has one, so idle it is three words and a
/// key: the state is created the first time the pair looks like a birthday pair.
pub struct Birthday {
    me: ShortId,
    key: [u8; 32],
    seed: u64,
    inner: Option<Box<Inner>>,
}

impl Birthday {
    pub fn new(me: ShortId, key: [u8; 32], seed: u64) -> Self {
        Birthday {
            me,
            key,
            seed,
            inner: None,
        }
    }

    fn state(&mut self) -> &mut Inner {
        let (me, key, seed) = (self.me, self.key, self.seed);
        self.inner
            .get_or_insert_with(|| Box::new(Inner::new(me, key, seed)))
    }

    /// The running attempt or the last one.
    pub fn record(&self) -> Option<Record> {
        self.inner.as_ref()?.record()
    }

    /// Attempts in a row that failed.
    pub fn failures(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.failures())
    }

    pub fn is_running(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_running())
    }

    /// An attempt is armed or running.
    pub fn is_busy(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_busy())
    }

    /// The side socket carrying the peer's direct path, and its address.
    pub fn carried(&self) -> Option<(u16, SocketAddr)> {
        self.inner.as_ref()?.carried()
    }

    /// Too many attempts elsewhere: ask for another coordinated punch at `at` instead.
    pub fn defer(&mut self, at: Instant) {
        self.state().defer(at);
    }

    /// A coordinated punch starts at `start` and `role` is what the NAT reports give (none:
    /// birthday punching is not for this pair). Arms an attempt [`AFTER_PUNCH`] later unless
    /// one runs or the last ended less than [`MIN_GAP`] ago.
    pub fn arm(&mut self, start: Instant, role: Option<Role>) {
        if role.is_none() && self.inner.is_none() {
            return;
        }
        self.state().arm(start, role);
    }

    /// The NAT reports now call for birthday punching (`role`): the first time, ask for a
    /// coordinated punch (the punches at the peer's arrival usually come before both reports
    /// are in).
    pub fn reports_changed(&mut self, role: Option<Role>) {
        if role.is_some() {
            self.state().reports_changed(role);
        }
    }

    /// A direct path is known (any way): no attempt is wanted; a running one ends.
    pub fn direct_proven(&mut self, addr: SocketAddr, now: Instant) {
        if let Some(i) = self.inner.as_mut() {
            i.direct_proven(addr, now);
        }
    }

    /// The direct path at `addr` was lost: the socket carrying it (if any) closes.
    pub fn direct_lost(&mut self, addr: SocketAddr) {
        if let Some(i) = self.inner.as_mut() {
            i.direct_lost(addr);
        }
    }

    /// Stops everything (the peer left, or birthday punching no longer fits the pair).
    pub fn stop(&mut self, now: Instant) {
        if let Some(i) = self.inner.as_mut() {
            i.stop(now);
        }
    }

    /// An authenticated probe from the peer arrived on side socket `socket` from `from`.
    pub fn handle_probe(&mut self, socket: u16, from: SocketAddr, probe: Probe, now: Instant) {
        if let Some(i) = self.inner.as_mut() {
            i.handle_probe(socket, from, probe, now);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(i) = self.inner.as_mut() {
            i.handle_timeout(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inner.as_ref()?.poll_timeout()
    }

    pub fn poll(&mut self) -> Option<BirthdayOut> {
        self.inner.as_mut()?.poll()
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

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
//! after [`RETRY`] (the node asks the control plane for a fresh coordinated punch then): 6 s
//! later, then after a minute and longer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rally_proto::probe::{Probe, LEN as PROBE_LEN};
use rally_proto::relay::ShortId;

mod role;
mod state;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests;

pub use role::Role;
use state::Inner;

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
/// The first retry follows at once (just past [`MIN_GAP`], so the punch it asks for arms both
/// sides): a miss is mostly the budget's 1.7 % chance, and a second attempt with fresh sockets
/// and ports misses with it again only 0.03 % of the time.
pub const RETRY: [Duration; 4] = [
    MIN_GAP.saturating_add(Duration::from_secs(1)),
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

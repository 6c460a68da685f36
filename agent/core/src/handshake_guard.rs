//! WireGuard's defence against handshake floods, in front of every Diffie-Hellman the data
//! plane would compute (sans-IO: time is a parameter).
//!
//! A handshake message (initiation or response) costs the data plane one or more X25519
//! operations; anyone can send one. So before any of that, in this order:
//! 1. **mac1**, keyed by our own public key: a message from someone who does not know our key
//!    (or random bytes) costs one BLAKE2s and is dropped.
//! 2. **Load**: beyond [`LOAD_RATE`] direct handshakes per second we are *under load*, and a
//!    message from an address must also carry **mac2**, made with a cookie that only that address can
//!    have received: without it, the answer is a 64-byte cookie reply (never more bytes than
//!    came in, and at most [`COOKIE_REPLY_RATE`] per second) and nothing else. A flood from
//!    spoofed addresses ends here.
//! 3. **Per-source budget** ([`SOURCE_RATE`] per second per IP, or per relayed sender):
//!    one member flooding from its own address gets no more than that.
//! 4. **Global budget** ([`GLOBAL_RATE`] per second): however many sources, the data plane
//!    never computes more handshakes than that in a second, a bounded share of its time.
//!
//! mac1, mac2 and the cookie reply are WireGuard's ([`Cookies`]; boringtun's initiator takes
//! our cookie replies), and every budget is the shared token bucket ([`rally_proto::limit`]),
//! all on the caller's `now`.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rally_proto::limit::{KeyedLimiter, TokenBucket};
use rally_proto::relay::ShortId;

use crate::wg_cookie::Cookies;

/// Handshake messages per second before mac2 (a cookie) is required.
pub const LOAD_RATE: f64 = 50.0;
/// Handshake messages per second from one source (IP address, or relayed sender).
pub const SOURCE_RATE: f64 = 10.0;
/// Burst of one source's budget.
pub const SOURCE_BURST: f64 = 20.0;
/// Handshake messages per second the data plane handles at all.
pub const GLOBAL_RATE: f64 = 200.0;
/// Cookie replies per second.
pub const COOKIE_REPLY_RATE: f64 = 500.0;
/// Sources whose budgets are remembered (a full table shares one budget among new sources).
const MAX_SOURCES: usize = 4096;

/// Who sent a handshake message, as far as the budgets are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Directly, from this address (which a cookie can prove).
    Addr(SocketAddr),
    /// Through a relay, which vouches for the sender's short id.
    Relayed(ShortId),
}

/// What a source's budget is kept under: its IP (all ports of a host share one budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum BudgetKey {
    Ip(IpAddr),
    Relayed(ShortId),
}

impl Source {
    fn budget_key(self) -> BudgetKey {
        match self {
            Source::Addr(a) => BudgetKey::Ip(a.ip().to_canonical()),
            Source::Relayed(id) => BudgetKey::Relayed(id),
        }
    }
}

/// What to do with a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Not a handshake message, or one within every budget: go on.
    Pass,
    /// Under load and without a valid mac2: send this cookie reply to the source, nothing more.
    CookieReply(&'a [u8]),
    /// Counted and dropped.
    Drop(GuardDrop),
}

/// Why a handshake message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardDrop {
    /// mac1 is not made with our public key (or the message is malformed).
    BadMac1,
    /// Under load, without a valid mac2, and the cookie-reply budget is spent.
    UnderLoad,
    /// The source's budget is spent.
    SourceBudget,
    /// The global budget is spent.
    GlobalBudget,
}

/// What the guard has seen since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardStats {
    pub passed: u64,
    pub bad_mac1: u64,
    pub cookie_replies: u64,
    pub under_load: u64,
    pub source_budget: u64,
    pub global_budget: u64,
}

impl GuardStats {
    /// Handshake messages dropped, for any reason.
    pub fn dropped(&self) -> u64 {
        self.bad_mac1 + self.under_load + self.source_budget + self.global_budget
    }
}

pub struct HandshakeGuard {
    cookies: Cookies,
    load: TokenBucket,
    sources: KeyedLimiter<BudgetKey>,
    global: TokenBucket,
    cookie_replies: TokenBucket,
    stats: GuardStats,
}

impl HandshakeGuard {
    /// A guard for the agent whose WireGuard public key is `public`; `seed` is random.
    pub fn new(public: &[u8; 32], seed: [u8; 32], now: Instant) -> Self {
        HandshakeGuard {
            cookies: Cookies::new(public, seed, now),
            load: TokenBucket::new(LOAD_RATE, LOAD_RATE, now),
            sources: KeyedLimiter::new(SOURCE_RATE, SOURCE_BURST, MAX_SOURCES),
            global: TokenBucket::new(GLOBAL_RATE, GLOBAL_RATE, now),
            cookie_replies: TokenBucket::new(COOKIE_REPLY_RATE, COOKIE_REPLY_RATE, now),
            stats: GuardStats::default(),
        }
    }

    pub fn stats(&self) -> GuardStats {
        self.stats
    }

    /// Checks `datagram` (a WireGuard message of any kind) from `source`; a cookie reply is
    /// written into `dst` (at least 64 bytes). Only handshake messages are checked.
    pub fn check<'a>(
        &mut self,
        source: Source,
        datagram: &[u8],
        now: Instant,
        dst: &'a mut [u8],
    ) -> Verdict<'a> {
        if !is_handshake(datagram) {
            return Verdict::Pass;
        }
        let verdict = self.judge(source, datagram, now, dst);
        match &verdict {
            Verdict::Pass => self.stats.passed += 1,
            Verdict::CookieReply(_) => self.stats.cookie_replies += 1,
            Verdict::Drop(GuardDrop::BadMac1) => self.stats.bad_mac1 += 1,
            Verdict::Drop(GuardDrop::UnderLoad) => self.stats.under_load += 1,
            Verdict::Drop(GuardDrop::SourceBudget) => self.stats.source_budget += 1,
            Verdict::Drop(GuardDrop::GlobalBudget) => self.stats.global_budget += 1,
        }
        verdict
    }

    fn judge<'a>(
        &mut self,
        source: Source,
        datagram: &[u8],
        now: Instant,
        dst: &'a mut [u8],
    ) -> Verdict<'a> {
        // 1. mac1 (one BLAKE2s), before anything else.
        if !self.cookies.mac1_ok(datagram) {
            return Verdict::Drop(GuardDrop::BadMac1);
        }
        // 2. Under load, an address must prove itself with mac2. (A relayed sender is one the
        // relay has authenticated, and a cookie could not reach it: budgets only.)
        if let Source::Addr(from) = source {
            if !self.load.try_take(1.0, now) && !self.cookies.mac2_ok(datagram, from, now) {
                if self.cookie_replies.try_take(1.0, now) {
                    if let Some(n) = self.cookies.reply(datagram, from, now, dst) {
                        return Verdict::CookieReply(&dst[..n]);
                    }
                }
                return Verdict::Drop(GuardDrop::UnderLoad);
            }
        }
        // 3. and 4. Budgets.
        if !self.sources.allow(source.budget_key(), now) {
            return Verdict::Drop(GuardDrop::SourceBudget);
        }
        if !self.global.try_take(1.0, now) {
            return Verdict::Drop(GuardDrop::GlobalBudget);
        }
        Verdict::Pass
    }

    /// Forgets the budgets of sources that have refilled (call about once a second).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sources.sweep(now);
    }
}

/// Whether a datagram is a WireGuard handshake initiation or response (by type and length).
pub fn is_handshake(d: &[u8]) -> bool {
    matches!((d.first(), d.len()), (Some(1), 148) | (Some(2), 92)) && d[1..4] == [0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg_testing::{initiator, initiator_key, receive};
    use boringtun::x25519::{PublicKey, StaticSecret};
    use std::time::Duration;

    const ME: [u8; 32] = [2; 32];

    fn me() -> (StaticSecret, PublicKey) {
        let s = StaticSecret::from(ME);
        let p = PublicKey::from(&s);
        (s, p)
    }

    /// A real initiation to us from a fresh key (valid mac1, no mac2).
    fn initiation(seed: u8) -> Vec<u8> {
        let (_, public) = me();
        crate::wg_testing::initiation(&mut initiator(seed, public))
    }

    fn addr(last: u8) -> Source {
        Source::Addr(SocketAddr::from(([192, 0, 2, last], 51820)))
    }

    fn guard(public: &PublicKey, t0: Instant) -> HandshakeGuard {
        HandshakeGuard::new(public.as_bytes(), [6; 32], t0)
    }

    #[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
    fn origin() -> Instant {
        Instant::now()
    }

    #[test]
    fn random_bytes_shaped_like_an_initiation_are_dropped_on_mac1() {
        let t0 = origin();
        let (_, public) = me();
        let mut g = guard(&public, t0);
        let mut d = vec![0x5au8; 148];
        d[..4].copy_from_slice(&[1, 0, 0, 0]);
        let mut dst = [0u8; 148];
        for i in 0..1000u32 {
            d[4..8].copy_from_slice(&i.to_le_bytes());
            assert_eq!(
                g.check(addr(1), &d, t0, &mut dst),
                Verdict::Drop(GuardDrop::BadMac1)
            );
        }
        assert_eq!(g.stats().bad_mac1, 1000);
        // The load budget is untouched: a real handshake right after goes through.
        assert_eq!(
            g.check(addr(2), &initiation(7), t0, &mut dst),
            Verdict::Pass
        );
    }

    #[test]
    fn an_initiation_for_another_key_fails_mac1() {
        let t0 = origin();
        let other = PublicKey::from(&StaticSecret::from([3; 32]));
        let mut g = guard(&other, t0);
        let mut dst = [0u8; 148];
        assert_eq!(
            g.check(addr(1), &initiation(7), t0, &mut dst),
            Verdict::Drop(GuardDrop::BadMac1)
        );
    }

    #[test]
    fn under_load_an_address_gets_a_cookie_reply_instead() {
        let t0 = origin();
        let (secret, public) = me();
        let mut g = guard(&public, t0);
        let mut dst = [0u8; 148];
        let init = initiation(9);
        // Spoofed sources, each within its own budget, use up the load budget.
        let mut passed = 0;
        for i in 0..LOAD_RATE as u32 {
            let src = Source::Addr(SocketAddr::from((
                std::net::Ipv4Addr::from(0x0a00_0000 + i),
                1,
            )));
            passed += u32::from(g.check(src, &init, t0, &mut dst) == Verdict::Pass);
        }
        assert_eq!(passed, LOAD_RATE as u32);
        // Now mac2 is required: the answer is a 64-byte cookie reply, no handshake.
        let Verdict::CookieReply(reply) = g.check(addr(200), &init, t0, &mut dst) else {
            panic!("no cookie reply under load")
        };
        assert_eq!(reply.len(), 64);
        assert!(reply.len() < init.len(), "no amplification");
        assert!(initiator_key(&secret, &public, &init).is_some());
    }

    #[test]
    fn the_initiator_that_takes_the_cookie_gets_through_under_load() {
        let t0 = origin();
        let (secret, public) = me();
        let mut g = guard(&public, t0);
        let mut dst = [0u8; 148];
        for i in 0..LOAD_RATE as u32 {
            let src = Source::Addr(SocketAddr::from((
                std::net::Ipv4Addr::from(0x0a00_0000 + i),
                1,
            )));
            g.check(src, &initiation(9), t0, &mut dst);
        }
        // A real peer (boringtun) takes the cookie reply and retries with mac2.
        let mut peer = initiator(11, public);
        let init = crate::wg_testing::initiation(&mut peer);
        let Verdict::CookieReply(cookie) = g.check(addr(77), &init, t0, &mut dst) else {
            panic!("no cookie")
        };
        let cookie = cookie.to_vec();
        receive(&mut peer, &cookie);
        let init2 = crate::wg_testing::initiation(&mut peer);
        assert_eq!(g.check(addr(77), &init2, t0, &mut dst), Verdict::Pass);
        assert!(initiator_key(&secret, &public, &init2).is_some());
    }

    #[test]
    fn one_source_is_held_to_its_budget() {
        let t0 = origin();
        let (_, public) = me();
        let mut g = guard(&public, t0);
        let mut dst = [0u8; 148];
        let init = initiation(9);
        let src = Source::Relayed([4; 8]);
        let passed = (0..1000)
            .filter(|_| g.check(src, &init, t0, &mut dst) == Verdict::Pass)
            .count();
        assert_eq!(passed, SOURCE_BURST as usize);
        // Another relayed sender is not affected...
        assert_eq!(
            g.check(Source::Relayed([5; 8]), &init, t0, &mut dst),
            Verdict::Pass
        );
        // ...and the flooder gets its rate back a second later.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(g.check(src, &init, t1, &mut dst), Verdict::Pass);
    }

    #[test]
    fn handshakes_per_second_are_bounded_whatever_the_sources() {
        let t0 = origin();
        let (_, public) = me();
        let mut g = guard(&public, t0);
        let mut dst = [0u8; 148];
        let init = initiation(9);
        // 100,000 mac1-valid messages in one second from 10,000 relayed senders (which no
        // cookie can stop): at most the global budget reaches the Diffie-Hellman.
        let mut passed = 0u64;
        for i in 0..100_000u32 {
            let mut id = [0u8; 8];
            id[..4].copy_from_slice(&(i % 10_000).to_le_bytes());
            let t = t0 + Duration::from_micros(u64::from(i) * 10);
            passed += u64::from(g.check(Source::Relayed(id), &init, t, &mut dst) == Verdict::Pass);
        }
        assert!(
            passed <= (GLOBAL_RATE * 2.0) as u64,
            "{passed} handshakes in one second"
        );
        assert_eq!(g.stats().dropped() + passed, 100_000);
    }

    #[test]
    fn data_and_cookie_replies_are_not_handshakes() {
        let t0 = origin();
        let (_, public) = me();
        let mut g = guard(&public, t0);
        let mut dst = [0u8; 148];
        let mut data = vec![0u8; 80];
        data[0] = 4;
        assert_eq!(g.check(addr(1), &data, t0, &mut dst), Verdict::Pass);
        let mut cookie = vec![0u8; 64];
        cookie[0] = 3;
        assert_eq!(g.check(addr(1), &cookie, t0, &mut dst), Verdict::Pass);
        assert_eq!(g.stats(), GuardStats::default());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(
            d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            kind in 0u8..6,
            len in proptest::prop_oneof![proptest::strategy::Just(148usize), proptest::strategy::Just(92usize), 0usize..200],
        ) {
            let t0 = origin();
            let (_, public) = me();
            let mut g = guard(&public, t0);
            let mut shaped = d.clone();
            shaped.resize(len, 0);
            if let Some(b) = shaped.first_mut() {
                *b = kind;
            }
            let mut dst = [0u8; 64];
            for src in [addr(1), Source::Relayed([1; 8])] {
                let _ = g.check(src, &d, t0, &mut dst);
                let _ = g.check(src, &shaped, t0, &mut dst);
            }
        }
    }
}

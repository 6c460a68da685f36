//! The relay's protocol core: a sans-IO state machine.
//!
//! [`Relay`] takes datagrams with the time they arrived and returns what to do with each as an
//! [`Action`]; it owns no socket, reads no clock and draws no randomness (the cookie secret is
//! its seed). The forwarding thread started by [`crate::server`] performs the actions.
//!
//! Rules, in the order they are applied:
//! - `BindRequest` → `BindChallenge{cookie}`: the cookie is an HMAC of the source address and a
//!   30-second time bucket, so binding costs the relay no state until it succeeds.
//! - `Bind{cookie, signature, token}`: the cookie must be this source's; the token must be signed
//!   by the control plane and unexpired; the signature must be by the key the token names, over
//!   the cookie and the token; the token must name at least one party (a session that can reach
//!   no one is refused). Then the agent gets one session (replacing any it had, wherever from:
//!   one session per identity), subject to the global and per-IP session limits, and `BindOk`.
//!   From the cookie and the signature both sides derive the session key
//!   ([`rally_proto::relay::session_key`]) that seals `BindOk`, `Pong` and every `Error` the
//!   relay can seal (all but `NotBound` and `BadCookie`, which have no key behind them).
//! - A `Bind` of the old type (before sealed replies) is refused with `Error{Outdated}`.
//! - `Send{to}` from a bound source within its packet and byte budgets is rewritten in place to
//!   `Deliver{from}` and forwarded to `to`'s session, but only when the two tokens share a party.
//! - `Ping` from a bound source → `Pong`, and the session stays alive.
//! - STUN binding requests are answered with the source address (RFC 8489), with RFC 5780's
//!   RESPONSE-ORIGIN and OTHER-ADDRESS, and `change_port` when an alternate port is configured.
//!
//! Nothing is ever answered with more bytes than it carried, except `BindChallenge` and STUN
//! responses, which are limited per source IP (the handshake budget) so the relay is a poor
//! amplifier. Everything refused is counted by [`DropReason`].

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rally_proto::identity;
use rally_proto::relay::{
    bind_transcript, is_relay, send_to_deliver, session_key, short_id, RelayDecodeError,
    RelayErrorCode, RelayMsg, ShortId, DOMAIN_BIND, TAG_LEN,
};
use rally_proto::stun::{self, BindingRequest, BindingResponse, StunError};
use rally_proto::{Key32, RelayToken, TokenError};

use crate::cookie::{CookieJar, COOKIE_BUCKET};
use rally_proto::limit::{KeyedLimiter, TokenBucket};

/// How often [`Relay::handle_timeout`] wants to run to expire sessions.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Tunables of a relay. [`Limits::default`] gives the documented CLI defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most sessions at once (default 10000).
    pub max_sessions: usize,
    /// Most sessions from one source IP; IPv6 sources count per /64 (default 1024: a carrier
    /// NAT puts many users behind one address, and each identity holds one session anyway).
    pub max_sessions_per_ip: usize,
    /// Packets per second one session may send, with a one-second burst (default 20000).
    pub max_pps: u64,
    /// Bits per second one session may send, with a one-second burst (default 100 Mbit/s).
    pub max_bps: u64,
    /// A session that sends nothing (no `Send`, no `Ping`) for this long is removed (default 60 s).
    pub idle_timeout: Duration,
    /// Unauthenticated replies (bind challenges, bind results, STUN responses) per second per
    /// source IP (default 64), with a burst of [`Limits::handshake_burst`].
    pub handshake_rate: u32,
    /// Burst of the handshake budget (default 128).
    pub handshake_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 10_000,
            max_sessions_per_ip: 1024,
            max_pps: 20_000,
            max_bps: 100_000_000,
            idle_timeout: Duration::from_secs(60),
            handshake_rate: 64,
            handshake_burst: 128,
        }
    }
}

/// Everything a [`Relay`] is built from, besides its seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The control plane's public key: tokens must be signed by it.
    pub control_key: Key32,
    /// The address of the primary socket ([`Via::Primary`]), reported in STUN responses.
    pub local: SocketAddr,
    /// The address of the alternate-port socket ([`Via::Alt`]), if there is one.
    pub alt: Option<SocketAddr>,
    /// Session limits and rates.
    pub limits: Limits,
}

impl Config {
    /// A configuration with default limits and no alternate port.
    pub fn new(control_key: Key32, local: SocketAddr) -> Self {
        Config {
            control_key,
            local,
            alt: None,
            limits: Limits::default(),
        }
    }
}

/// Which of the relay's sockets a datagram came in on or must leave from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// The `--listen` socket.
    Primary,
    /// The `--alt-port` socket (RFC 5780).
    Alt,
}

/// A datagram the relay wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The socket to send from.
    pub via: Via,
    /// The destination.
    pub to: SocketAddr,
    /// The datagram.
    pub payload: Vec<u8>,
}

/// What to do with one received datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The datagram was a `Send` and has been rewritten in place into a `Deliver`: send its
    /// first `len` bytes (all of it) from `via` to `to`.
    Forward {
        /// The socket the destination session is bound on.
        via: Via,
        /// The destination session's address.
        to: SocketAddr,
        /// Bytes to send from the start of the datagram buffer.
        len: usize,
    },
    /// Send this answer.
    Reply(Transmit),
    /// Nothing is forwarded; the drop has been counted under `reason`. `reply`, if any, is an
    /// error message for the sender.
    Drop {
        /// Why.
        reason: DropReason,
        /// An error to send back (already rate-limited).
        reply: Option<Transmit>,
    },
}

macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// Why a datagram was not forwarded or answered as asked.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason {
            $($(#[$doc])* $variant,)*
        }

        impl DropReason {
            /// Every reason, in declaration order (so `reason as usize` indexes it).
            pub const ALL: &'static [DropReason] = &[$(DropReason::$variant,)*];

            /// The snake_case name used in logs and metrics labels.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DropReason::$variant => $name,)*
                }
            }
        }
    };
}

drop_reasons! {
    /// Neither a relay message nor STUN, or a malformed one.
    Garbage => "garbage",
    /// A well-formed message a relay never accepts (a `Deliver`, a STUN response, ...).
    Unexpected => "unexpected",
    /// `Send` or `Ping` from a source with no live session.
    NotBound => "not_bound",
    /// `Bind` with a cookie not made for this source recently.
    BadCookie => "bad_cookie",
    /// `Bind` with a token that is malformed or not signed by the control plane.
    BadToken => "bad_token",
    /// `Bind` with a token that names no party (the session could reach no one).
    NoParty => "no_party",
    /// `Bind` of the old type, from an agent older than sealed relay replies.
    OutdatedAgent => "outdated_agent",
    /// `Bind` with an expired token.
    TokenExpired => "token_expired",
    /// `Bind` whose signature is not by the key the token names.
    BadSignature => "bad_signature",
    /// `Bind` refused: the relay holds its maximum number of sessions.
    LimitSessions => "limit_sessions",
    /// `Bind` refused: the source IP holds its maximum number of sessions.
    LimitPerIp => "limit_per_ip",
    /// `Bind` refused: another live agent has the same short id.
    ShortIdTaken => "short_id_taken",
    /// A session's packet or byte budget is spent.
    RateLimited => "rate_limited",
    /// The source IP's budget for unauthenticated replies is spent.
    HandshakeRateLimited => "handshake_rate_limited",
    /// `Send` to a session that shares no party with the sender.
    NoSharedParty => "no_shared_party",
    /// `Send` to a short id with no live session.
    PeerUnavailable => "peer_unavailable",
    /// A STUN request asking for a change of address this relay cannot make.
    StunChangeUnsupported => "stun_change_unsupported",
    /// A STUN request with RESPONSE-PORT shorter than the answer would be (no amplification).
    StunUnpadded => "stun_unpadded",
}

/// Counters since the relay started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sessions alive now.
    pub sessions_active: u64,
    /// Sessions ever bound (a rebind counts again).
    pub sessions_total: u64,
    /// Binds refused, for any reason.
    pub sessions_refused: u64,
    /// `Send`s forwarded as `Deliver`s.
    pub packets_forwarded: u64,
    /// Bytes of the forwarded datagrams.
    pub bytes_forwarded: u64,
    /// STUN binding requests answered.
    pub stun_requests: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Datagrams dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Every reason with its count (zeros included), in [`DropReason::ALL`] order.
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|&r| (r, self.drops(r)))
    }

    /// All drops, whatever the reason.
    pub fn drops_total(&self) -> u64 {
        self.drops.iter().sum()
    }

    fn count_drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
}

/// The relay state machine. See the [module docs](self) for the rules.
#[derive(Debug)]
pub struct Relay {
    config: Config,
    cookies: CookieJar,
    epoch: Instant,
    next_sweep: Instant,
    /// Sessions in slots; `by_id` and `by_addr` index them. A `Send` costs one lookup by
    /// source address and one by destination id; everything else is slot indexing.
    slots: Slots,
    by_id: FastMap<ShortId, SlotId>,
    by_addr: FastMap<SocketAddr, SlotId>,
    per_ip: BTreeMap<IpKey, usize>,
    /// `NotBound`/`PeerUnavailable` errors: one per second per source address.
    error_replies: KeyedLimiter<SocketAddr>,
    /// Unauthenticated replies per source IP.
    handshakes: KeyedLimiter<IpKey>,
    stats: Stats,
}

impl Relay {
    /// A relay with no sessions. `seed` is the cookie secret: draw it from a CSPRNG.
    pub fn new(config: Config, seed: [u8; 32], now: Instant) -> Self {
        let handshakes = KeyedLimiter::new(
            f64::from(config.limits.handshake_rate),
            f64::from(config.limits.handshake_burst.max(1)),
            MAX_LIMITER_KEYS,
        );
        Relay {
            cookies: CookieJar::new(&seed),
            epoch: now,
            next_sweep: now + SWEEP_INTERVAL,
            slots: Slots::default(),
            by_id: FastMap::default(),
            by_addr: FastMap::default(),
            per_ip: BTreeMap::new(),
            error_replies: KeyedLimiter::new(1.0, 1.0, MAX_LIMITER_KEYS),
            handshakes,
            stats: Stats::default(),
            config,
        }
    }

    /// Handles one datagram that arrived on `via` from `src`. `now` is the monotonic time it
    /// arrived and `now_unix` the wall-clock time in unix seconds (for token expiry).
    ///
    /// On [`Action::Forward`] the datagram has been rewritten in place; otherwise its contents
    /// are unspecified. Never panics, whatever the bytes.
    pub fn handle_datagram(
        &mut self,
        via: Via,
        src: SocketAddr,
        datagram: &mut [u8],
        now: Instant,
        now_unix: u64,
    ) -> Action {
        let action = if is_relay(datagram) {
            self.handle_relay(via, src, datagram, now, now_unix)
        } else if stun::is_stun(datagram) {
            self.handle_stun(via, src, datagram, now)
        } else {
            Action::Drop {
                reason: DropReason::Garbage,
                reply: None,
            }
        };
        if let Action::Drop { reason, .. } = &action {
            self.stats.count_drop(*reason);
            tracing::trace!(%src, reason = reason.as_str(), "dropped");
        }
        action
    }

    /// When [`Relay::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_sweep)
    }

    /// Removes sessions that are idle or whose token has expired, and forgets rate-limiter
    /// entries that are full again.
    pub fn handle_timeout(&mut self, now: Instant, now_unix: u64) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let idle = self.config.limits.idle_timeout;
        // Slot order: deterministic for a given sequence of inputs.
        let dead: Vec<(SlotId, &'static str)> = self
            .slots
            .iter()
            .filter_map(|(slot, s)| s.death(now, now_unix, idle).map(|why| (slot, why)))
            .collect();
        for (slot, why) in dead {
            if let Some(s) = self.remove_slot(slot) {
                tracing::info!(agent = %s.agent.short(), addr = %s.addr, why, "session expired");
            }
        }
        self.error_replies.sweep(now);
        self.handshakes.sweep(now);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.sessions_active = self.by_id.len() as u64;
        s
    }

    /// The configuration the relay was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The address of the live session of the agent with this short id, if any (as of the last
    /// [`Relay::handle_timeout`]).
    pub fn session_addr(&self, id: &ShortId) -> Option<SocketAddr> {
        let slot = *self.by_id.get(id)?;
        self.slots.get(slot).map(|s| s.addr)
    }

    // ---------------------------------------------------------------------------------------

    fn handle_relay(
        &mut self,
        via: Via,
        src: SocketAddr,
        datagram: &mut [u8],
        now: Instant,
        now_unix: u64,
    ) -> Action {
        let msg = match RelayMsg::decode(datagram) {
            Ok(m) => m,
            Err(RelayDecodeError::OutdatedBind) => return self.refuse_outdated(via, src, now),
            Err(_) => return dropped(DropReason::Garbage),
        };
        match msg {
            RelayMsg::BindRequest => self.handle_bind_request(via, src, now),
            RelayMsg::Bind {
                cookie,
                signature,
                token,
            } => self.handle_bind(via, src, &cookie, &signature, token, now, now_unix),
            RelayMsg::Send { to, .. } => self.handle_send(via, src, to, datagram, now, now_unix),
            RelayMsg::Ping { nonce } => {
                self.handle_ping(via, src, nonce, datagram.len(), now, now_unix)
            }
            RelayMsg::BindChallenge { .. }
            | RelayMsg::BindOk { .. }
            | RelayMsg::Deliver { .. }
            | RelayMsg::Pong { .. }
            | RelayMsg::Error { .. } => dropped(DropReason::Unexpected),
        }
    }

    fn refuse_outdated(&mut self, via: Via, src: SocketAddr, now: Instant) -> Action {
        self.stats.sessions_refused += 1;
        let reply = self
            .handshakes
            .allow(IpKey::of(src.ip()), now)
            .then(|| error(via, src, RelayErrorCode::Outdated, None));
        tracing::debug!(%src, "bind from an outdated agent refused");
        Action::Drop {
            reason: DropReason::OutdatedAgent,
            reply,
        }
    }

    fn handle_bind_request(&mut self, via: Via, src: SocketAddr, now: Instant) -> Action {
        if !self.handshakes.allow(IpKey::of(src.ip()), now) {
            return dropped(DropReason::HandshakeRateLimited);
        }
        let cookie = self.cookies.make(src, self.bucket(now));
        Action::Reply(Transmit {
            via,
            to: src,
            payload: RelayMsg::BindChallenge { cookie }.to_vec(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_bind(
        &mut self,
        via: Via,
        src: SocketAddr,
        cookie: &[u8; 32],
        signature: &[u8; 64],
        token_bytes: &[u8],
        now: Instant,
        now_unix: u64,
    ) -> Action {
        let ip = IpKey::of(src.ip());
        if !self.handshakes.allow(ip, now) {
            return dropped(DropReason::HandshakeRateLimited);
        }
        if !self.cookies.check(cookie, src, self.bucket(now)) {
            return self.refuse_bind(via, src, DropReason::BadCookie, None);
        }
        // The cookie was this source's: from here on every answer is sealed.
        let key = session_key(cookie, signature);
        let token = match RelayToken::verify(token_bytes, &self.config.control_key, now_unix) {
            Ok(t) => t,
            Err(TokenError::Expired) => {
                return self.refuse_bind(via, src, DropReason::TokenExpired, Some(&key))
            }
            Err(_) => return self.refuse_bind(via, src, DropReason::BadToken, Some(&key)),
        };
        let transcript = bind_transcript(cookie, token_bytes);
        if identity::verify(&token.agent, DOMAIN_BIND, &transcript, signature).is_err() {
            return self.refuse_bind(via, src, DropReason::BadSignature, Some(&key));
        }
        if token.parties.is_empty() {
            return self.refuse_bind(via, src, DropReason::NoParty, Some(&key));
        }
        let expires_at = token.expires_at;
        if let Err(reason) = self.admit(via, src, ip, token, key, now) {
            return self.refuse_bind(via, src, reason, Some(&key));
        }
        Action::Reply(Transmit {
            via,
            to: src,
            payload: RelayMsg::BindOk {
                observed: src,
                expires_at,
                tag: [0; TAG_LEN],
            }
            .sealed(&key),
        })
    }

    /// Creates or moves the session for `token.agent` to `src`, within the limits.
    fn admit(
        &mut self,
        via: Via,
        src: SocketAddr,
        ip: IpKey,
        token: RelayToken,
        key: [u8; 32],
        now: Instant,
    ) -> Result<(), DropReason> {
        let id = short_id(&token.agent);
        let existing = match self.by_id.get(&id).and_then(|&slot| self.slots.get(slot)) {
            Some(s) if s.agent != token.agent => return Err(DropReason::ShortIdTaken),
            Some(s) => Some((s.addr, s.ip)),
            None => None,
        };
        // Another agent's session at this very address is replaced: one address, one session.
        let own = self.by_id.get(&id).copied();
        let displaced = self
            .by_addr
            .get(&src)
            .copied()
            .filter(|other| Some(*other) != own);

        let removed = usize::from(existing.is_some()) + usize::from(displaced.is_some());
        if self.by_id.len() + 1 - removed > self.config.limits.max_sessions {
            return Err(DropReason::LimitSessions);
        }
        let removed_here = usize::from(existing.is_some_and(|(_, eip)| eip == ip))
            + usize::from(displaced.is_some());
        let here = self.per_ip.get(&ip).copied().unwrap_or(0);
        if here + 1 - removed_here > self.config.limits.max_sessions_per_ip {
            return Err(DropReason::LimitPerIp);
        }

        if let Some(other) = displaced {
            if let Some(s) = self.remove_slot(other) {
                tracing::info!(agent = %s.agent.short(), addr = %s.addr, "session replaced by another agent at its address");
            }
        }
        let (max_pps, max_bps) = (self.config.limits.max_pps, self.config.limits.max_bps);
        let (pps, bps) = match own.and_then(|slot| self.remove_slot(slot)) {
            Some(old) => {
                if old.addr != src {
                    tracing::info!(agent = %old.agent.short(), from = %old.addr, to = %src, "session moved");
                }
                (old.pps, old.bps)
            }
            None => {
                let pps = max_pps as f64;
                let bytes = max_bps as f64 / 8.0;
                (
                    TokenBucket::new(pps, pps, now),
                    TokenBucket::new(bytes, bytes, now),
                )
            }
        };
        tracing::info!(agent = %token.agent.short(), addr = %src, expires_at = token.expires_at, parties = token.parties.len(), "session bound");
        *self.per_ip.entry(ip).or_insert(0) += 1;
        let slot = self.slots.insert(Session {
            agent: token.agent,
            id,
            addr: src,
            via,
            ip,
            token,
            key,
            last_seen: now,
            pps,
            bps,
        });
        self.by_addr.insert(src, slot);
        self.by_id.insert(id, slot);
        self.stats.sessions_total += 1;
        Ok(())
    }

    fn refuse_bind(
        &mut self,
        via: Via,
        src: SocketAddr,
        reason: DropReason,
        key: Option<&[u8; 32]>,
    ) -> Action {
        self.stats.sessions_refused += 1;
        tracing::debug!(%src, reason = reason.as_str(), "bind refused");
        let code = match reason {
            DropReason::BadCookie => RelayErrorCode::BadCookie,
            DropReason::BadToken | DropReason::NoParty => RelayErrorCode::BadToken,
            DropReason::TokenExpired => RelayErrorCode::TokenExpired,
            DropReason::BadSignature => RelayErrorCode::BadSignature,
            _ => RelayErrorCode::LimitReached,
        };
        Action::Drop {
            reason,
            reply: Some(error(via, src, code, key)),
        }
    }

    fn handle_send(
        &mut self,
        via: Via,
        src: SocketAddr,
        to: ShortId,
        datagram: &mut [u8],
        now: Instant,
        now_unix: u64,
    ) -> Action {
        let Some(from) = self.live_sender(src, now, now_unix) else {
            return self.not_bound(via, src, now);
        };
        let len = datagram.len();
        let Some(sender) = self.slots.get_mut(from) else {
            return self.not_bound(via, src, now);
        };
        sender.last_seen = now;
        if !sender.spend(len, now) {
            return dropped(DropReason::RateLimited);
        }
        let from_id = sender.id;
        let sender_key = sender.key;
        let idle = self.config.limits.idle_timeout;
        let dest = self.by_id.get(&to).and_then(|&slot| self.slots.get(slot));
        let verdict = match (self.slots.get(from), dest) {
            (Some(sender), Some(dest)) if !sender.token.shares_party(&dest.token) => {
                Err(DropReason::NoSharedParty)
            }
            (Some(_), Some(dest)) if dest.death(now, now_unix, idle).is_some() => {
                Err(DropReason::PeerUnavailable)
            }
            (Some(_), Some(dest)) => Ok((dest.via, dest.addr)),
            _ => Err(DropReason::PeerUnavailable),
        };
        match verdict {
            Ok((dest_via, dest_addr)) => {
                if send_to_deliver(datagram, &from_id).is_none() {
                    return dropped(DropReason::Garbage);
                }
                self.stats.packets_forwarded += 1;
                self.stats.bytes_forwarded += len as u64;
                Action::Forward {
                    via: dest_via,
                    to: dest_addr,
                    len,
                }
            }
            // The same answer for both, so a sender cannot probe who is bound outside its parties.
            Err(reason) => Action::Drop {
                reason,
                reply: self.error_replies.allow(src, now).then(|| {
                    // Sealed unless that would answer with more bytes than came in.
                    let key = (len >= SEALED_ERROR_LEN).then_some(&sender_key);
                    error(via, src, RelayErrorCode::PeerUnavailable, key)
                }),
            },
        }
    }

    fn handle_ping(
        &mut self,
        via: Via,
        src: SocketAddr,
        nonce: u64,
        len: usize,
        now: Instant,
        now_unix: u64,
    ) -> Action {
        let Some(slot) = self.live_sender(src, now, now_unix) else {
            return self.not_bound(via, src, now);
        };
        let Some(session) = self.slots.get_mut(slot) else {
            return self.not_bound(via, src, now);
        };
        session.last_seen = now;
        if !session.spend(len, now) {
            return dropped(DropReason::RateLimited);
        }
        Action::Reply(Transmit {
            via,
            to: src,
            payload: RelayMsg::Pong {
                nonce,
                tag: [0; TAG_LEN],
            }
            .sealed(&session.key),
        })
    }

    fn handle_stun(&mut self, via: Via, src: SocketAddr, datagram: &[u8], now: Instant) -> Action {
        let req = match BindingRequest::decode(datagram) {
            Ok(r) => r,
            Err(StunError::WrongType(_)) => return dropped(DropReason::Unexpected),
            Err(_) => return dropped(DropReason::Garbage),
        };
        let (local, other) = match via {
            Via::Primary => (Some(self.config.local), self.config.alt),
            Via::Alt => (self.config.alt, Some(self.config.local)),
        };
        if req.change_ip || (req.change_port && other.is_none()) {
            return dropped(DropReason::StunChangeUnsupported);
        }
        if !self.handshakes.allow(IpKey::of(src.ip()), now) {
            return dropped(DropReason::HandshakeRateLimited);
        }
        let (reply_via, origin) = if req.change_port {
            (flip(via), other)
        } else {
            (via, local)
        };
        self.stats.stun_requests += 1;
        let resp = BindingResponse {
            txid: req.txid,
            mapped: src,
            // A wildcard listen address says nothing useful about where we are.
            origin: origin.filter(|a| !a.ip().is_unspecified()),
            other: other.filter(|a| !a.ip().is_unspecified()),
        };
        // RFC 5780 RESPONSE-PORT: answered at another port of the same address (how an agent
        // tests its NAT's filtering), and only for a request as long as any answer.
        let to = match stun::response_port(datagram) {
            Ok(Some(port)) if datagram.len() >= stun::RESPONSE_PORT_MIN_LEN => {
                SocketAddr::new(src.ip(), port)
            }
            Ok(Some(_)) => return dropped(DropReason::StunUnpadded),
            _ => src,
        };
        Action::Reply(Transmit {
            via: reply_via,
            to,
            payload: resp.encode(),
        })
    }

    /// The slot of the live session at `src`, removing it if it died since the last sweep.
    fn live_sender(&mut self, src: SocketAddr, now: Instant, now_unix: u64) -> Option<SlotId> {
        let slot = *self.by_addr.get(&src)?;
        let dead = self.slots.get(slot).is_none_or(|s| {
            s.death(now, now_unix, self.config.limits.idle_timeout)
                .is_some()
        });
        if dead {
            if let Some(s) = self.remove_slot(slot) {
                tracing::info!(agent = %s.agent.short(), addr = %s.addr, "session expired");
            }
            return None;
        }
        Some(slot)
    }

    fn not_bound(&mut self, via: Via, src: SocketAddr, now: Instant) -> Action {
        Action::Drop {
            reason: DropReason::NotBound,
            reply: self
                .error_replies
                .allow(src, now)
                .then(|| error(via, src, RelayErrorCode::NotBound, None)),
        }
    }

    fn remove_slot(&mut self, slot: SlotId) -> Option<Session> {
        let s = self.slots.remove(slot)?;
        if self.by_addr.get(&s.addr) == Some(&slot) {
            self.by_addr.remove(&s.addr);
        }
        if self.by_id.get(&s.id) == Some(&slot) {
            self.by_id.remove(&s.id);
        }
        if let Some(n) = self.per_ip.get_mut(&s.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&s.ip);
            }
        }
        Some(s)
    }

    fn bucket(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() / COOKIE_BUCKET.as_secs()
    }
}

/// Length of a sealed `Error`: header, code, tag.
const SEALED_ERROR_LEN: usize = rally_proto::relay::HEADER_LEN + 1 + TAG_LEN;

/// Most keys each reply limiter remembers (see [`KeyedLimiter`]).
const MAX_LIMITER_KEYS: usize = 65_536;

#[derive(Debug)]
struct Session {
    agent: Key32,
    /// `short_id(&agent)`, written into every `Deliver` from this session.
    id: ShortId,
    addr: SocketAddr,
    via: Via,
    ip: IpKey,
    token: RelayToken,
    /// Seals what the relay says to this session's agent.
    key: [u8; 32],
    last_seen: Instant,
    pps: TokenBucket,
    bps: TokenBucket,
}

impl Session {
    /// Why the session is dead at this time, if it is.
    fn death(&self, now: Instant, now_unix: u64, idle: Duration) -> Option<&'static str> {
        if now_unix >= self.token.expires_at {
            Some("token expired")
        } else if now.saturating_duration_since(self.last_seen) >= idle {
            Some("idle")
        } else {
            None
        }
    }

    /// Takes one packet and `len` bytes from the session's budgets, or neither.
    fn spend(&mut self, len: usize, now: Instant) -> bool {
        self.pps.refill(now);
        self.bps.refill(now);
        let bytes = len as f64;
        if !self.pps.has(1.0) || !self.bps.has(bytes) {
            return false;
        }
        self.pps.take(1.0);
        self.bps.take(bytes);
        true
    }
}

/// A hash map with a fast, unkeyed hasher (FxHash). Unkeyed is safe here: every key in these
/// maps belongs to an authenticated session (at most `max_sessions`), so a flood from an
/// attacker can make lookups miss but cannot grow a map or lengthen its chains.
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<rustc_hash::FxHasher>>;

/// Index of a session's slot in [`Slots`].
type SlotId = usize;

/// Sessions stored by slot; freed slots are reused, so the table never outgrows the most
/// sessions ever alive at once.
#[derive(Debug, Default)]
struct Slots {
    slots: Vec<Option<Session>>,
    free: Vec<SlotId>,
}

impl Slots {
    fn insert(&mut self, session: Session) -> SlotId {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(session);
                slot
            }
            None => {
                self.slots.push(Some(session));
                self.slots.len() - 1
            }
        }
    }

    fn get(&self, slot: SlotId) -> Option<&Session> {
        self.slots.get(slot)?.as_ref()
    }

    fn get_mut(&mut self, slot: SlotId) -> Option<&mut Session> {
        self.slots.get_mut(slot)?.as_mut()
    }

    fn remove(&mut self, slot: SlotId) -> Option<Session> {
        let s = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        Some(s)
    }

    /// Live sessions in slot order.
    fn iter(&self) -> impl Iterator<Item = (SlotId, &Session)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }
}

/// What a source IP is counted as for per-IP limits: the IPv4 address, or the IPv6 /64 (one
/// host usually holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum IpKey {
    V4(Ipv4Addr),
    V6([u8; 8]),
}

impl IpKey {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpKey::V4(v4),
            IpAddr::V6(v6) => {
                let mut p = [0u8; 8];
                p.copy_from_slice(&v6.octets()[..8]);
                IpKey::V6(p)
            }
        }
    }
}

fn dropped(reason: DropReason) -> Action {
    Action::Drop {
        reason,
        reply: None,
    }
}

/// An error for `to`, sealed with `key` when there is one.
fn error(via: Via, to: SocketAddr, code: RelayErrorCode, key: Option<&[u8; 32]>) -> Transmit {
    let msg = RelayMsg::Error { code, tag: None };
    Transmit {
        via,
        to,
        payload: match key {
            Some(k) => msg.sealed(k),
            None => msg.to_vec(),
        },
    }
}

fn flip(via: Via) -> Via {
    match via {
        Via::Primary => Via::Alt,
        Via::Alt => Via::Primary,
    }
}

#[cfg(test)]
mod tests;

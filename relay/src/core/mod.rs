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
//!   no one is refused). Then the agent gets a session, subject to the global and per-IP
//!   session limits, and `BindOk`: over UDP one per identity (a bind from elsewhere moves it);
//!   over TCP one per connection and up to [`MAX_TCP_SESSIONS`] per identity (a bind on a
//!   further connection evicts the oldest).
//!   From the cookie and the signature both sides derive the session key
//!   ([`rally_proto::relay::session_key`]) that seals `BindOk`, `Pong` and every `Error` the
//!   relay can seal (all but `NotBound` and `BadCookie`, which have no key behind them).
//! - A `Bind` of the old type (before sealed replies) is refused with `Error{Outdated}`.
//! - `Send{to}` from a bound source within its packet and byte budgets is rewritten in place to
//!   `Deliver{from}` and forwarded to `to`'s session, but only when the two tokens share a party:
//!   of its sessions the live one heard from last; over TCP the newer connection, and a
//!   `Deliver` of at most [`SMALL_FRAME`] bytes carrying WireGuard data
//!   ([`rally_proto::relay_stream::is_copied`]) also to the other (so a segment lost on one
//!   connection does not hold the datagram back; bulk stays on one connection, in order).
//! - `Ping` from a bound source → `Pong`, and the session stays alive.
//! - STUN binding requests are answered with the source address (RFC 8489), with RFC 5780's
//!   RESPONSE-ORIGIN and OTHER-ADDRESS, and `change_port` when an alternate port is configured.
//!
//! Nothing is ever answered with more bytes than it carried, except `BindChallenge` and STUN
//! responses, which are limited per source IP (the handshake budget) so the relay is a poor
//! amplifier. Everything refused is counted by [`DropReason`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rally_proto::identity;
use rally_proto::relay::{
    bind_transcript, is_relay, send_to_deliver, session_key, short_id, RelayDecodeError,
    RelayErrorCode, RelayMsg, ShortId, DOMAIN_BIND, TAG_LEN,
};
use rally_proto::stun::{self, BindingRequest, BindingResponse, StunError};
use rally_proto::{RelayToken, TokenError};

use crate::cookie::{CookieJar, COOKIE_BUCKET};
use rally_proto::limit::{KeyedLimiter, TokenBucket};

/// How often [`Relay::handle_timeout`] wants to run to expire sessions.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

mod bind;
mod session;
mod types;

use session::{FastMap, IpKey, Session, SlotId, Slots};
pub use types::{
    Action, Config, DropReason, Limits, Stats, Transmit, Transport, Via, MAX_TCP_SESSIONS,
    SMALL_FRAME,
};

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
    by_id: FastMap<(ShortId, Transport), SlotId>,
    /// An agent's older TCP session, when it holds two ([`MAX_TCP_SESSIONS`]; `by_id` holds
    /// the newer).
    tcp_spare: FastMap<ShortId, SlotId>,
    by_addr: FastMap<(Transport, SocketAddr), SlotId>,
    per_ip: BTreeMap<IpKey, usize>,
    /// Channel bindings of the open TCP connections, by remote address.
    tcp_bindings: FastMap<SocketAddr, [u8; 32]>,
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
            tcp_spare: FastMap::default(),
            by_addr: FastMap::default(),
            per_ip: BTreeMap::new(),
            tcp_bindings: FastMap::default(),
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
        s.sessions_active = self.session_count() as u64;
        s.sessions_active_tcp = (self
            .by_id
            .keys()
            .filter(|(_, t)| *t == Transport::Tcp)
            .count()
            + self.tcp_spare.len()) as u64;
        s
    }

    /// The configuration the relay was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The address of the live session of the agent with this short id, if any (as of the last
    /// [`Relay::handle_timeout`]; of two TCP sessions, the newer).
    pub fn session_addr(&self, id: &ShortId) -> Option<SocketAddr> {
        Transport::ALL
            .iter()
            .find_map(|t| self.by_id.get(&(*id, *t)))
            .and_then(|&slot| self.slots.get(slot))
            .map(|s| s.addr)
    }

    /// A TCP connection from `src` completed TLS with `binding` as its exported keying
    /// material ([`rally_proto::relay_stream::BIND_EXPORTER_LABEL`]): a `Bind` from `src`
    /// over TCP may use it as its cookie (kept until [`Relay::handle_closed`]; at most one per
    /// open connection, so bounded by the connection caps).
    pub fn handle_tcp_open(&mut self, src: SocketAddr, binding: [u8; 32]) {
        self.tcp_bindings.insert(src, binding);
    }

    /// The TCP connection from `src` ended: its session, if any, goes with it.
    pub fn handle_closed(&mut self, src: SocketAddr) {
        self.tcp_bindings.remove(&src);
        if let Some(&slot) = self.by_addr.get(&(Transport::Tcp, src)) {
            if let Some(s) = self.remove_slot(slot) {
                tracing::info!(agent = %s.agent.short(), addr = %s.addr, "tcp session closed");
            }
        }
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

    fn handle_send(
        &mut self,
        via: Via,
        src: SocketAddr,
        to: ShortId,
        datagram: &mut [u8],
        now: Instant,
        now_unix: u64,
    ) -> Action {
        let Some(from) = self.live_sender(via, src, now, now_unix) else {
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
        let copied = rally_proto::relay_stream::is_copied(datagram);
        let (dest, also) = self.delivery(to, copied, now, now_unix);
        let dest = dest.and_then(|slot| self.slots.get(slot));
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
        // The copy only to a session that may hear from this sender too.
        let also = also
            .and_then(|slot| self.slots.get(slot))
            .filter(|s| {
                self.slots
                    .get(from)
                    .is_some_and(|sender| sender.token.shares_party(&s.token))
            })
            .map(|s| s.addr);
        match verdict {
            Ok((dest_via, dest_addr)) => {
                if send_to_deliver(datagram, &from_id).is_none() {
                    return dropped(DropReason::Garbage);
                }
                self.stats.packets_forwarded += 1;
                if via == Via::Tcp || dest_via == Via::Tcp {
                    self.stats.packets_forwarded_tcp += 1;
                }
                self.stats.bytes_forwarded += len as u64;
                Action::Forward {
                    via: dest_via,
                    to: dest_addr,
                    len,
                    also: also.filter(|_| dest_via == Via::Tcp),
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

    /// Where a `Deliver` to `to` goes: of its sessions (UDP, TCP, the older TCP), the live one
    /// heard from last; over TCP, the newer session while it lives (bulk stays on one
    /// connection, in order), and, when `copied` (small WireGuard data), the other live one too.
    fn delivery(
        &self,
        to: ShortId,
        copied: bool,
        now: Instant,
        now_unix: u64,
    ) -> (Option<SlotId>, Option<SlotId>) {
        let idle = self.config.limits.idle_timeout;
        let alive = |slot: &SlotId| {
            self.slots
                .get(*slot)
                .is_some_and(|s| s.death(now, now_unix, idle).is_none())
        };
        let udp = self.by_id.get(&(to, Transport::Udp)).copied();
        let tcp = self.by_id.get(&(to, Transport::Tcp)).copied();
        let spare = self.tcp_spare.get(&to).copied();
        let best = [udp, tcp, spare]
            .into_iter()
            .flatten()
            .filter_map(|slot| self.slots.get(slot).map(|s| (slot, s)))
            .max_by_key(|(slot, s)| (alive(slot), s.last_seen))
            .map(|(slot, _)| slot);
        if best.is_none() || best == udp {
            return (best, None);
        }
        let (first, second) = match (tcp.filter(alive), spare.filter(alive)) {
            (Some(t), s) => (t, s),
            (None, Some(s)) => (s, None),
            (None, None) => return (best, None),
        };
        (Some(first), second.filter(|_| copied))
    }

    /// Sessions held now, over every transport.
    fn session_count(&self) -> usize {
        self.by_id.len() + self.tcp_spare.len()
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
        let Some(slot) = self.live_sender(via, src, now, now_unix) else {
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
            // STUN tells a UDP mapping: over TCP it would only mislead.
            Via::Tcp => return dropped(DropReason::Unexpected),
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
    fn live_sender(
        &mut self,
        via: Via,
        src: SocketAddr,
        now: Instant,
        now_unix: u64,
    ) -> Option<SlotId> {
        let slot = *self.by_addr.get(&(via.transport(), src))?;
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
        let transport = s.via.transport();
        if self.by_addr.get(&(transport, s.addr)) == Some(&slot) {
            self.by_addr.remove(&(transport, s.addr));
        }
        if self.by_id.get(&(s.id, transport)) == Some(&slot) {
            self.by_id.remove(&(s.id, transport));
            // The older TCP session, if any, is the agent's only one now.
            if transport == Transport::Tcp {
                if let Some(spare) = self.tcp_spare.remove(&s.id) {
                    self.by_id.insert((s.id, transport), spare);
                }
            }
        } else if transport == Transport::Tcp && self.tcp_spare.get(&s.id) == Some(&slot) {
            self.tcp_spare.remove(&s.id);
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
        Via::Tcp => Via::Tcp,
    }
}

#[cfg(test)]
mod tests;

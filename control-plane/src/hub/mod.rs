//! The control plane's logic without IO: [`Hub::handle`] takes one agent message with the time
//! and a random source and returns [`Effect`]s (replies, messages for other sessions, wake-ups
//! of session writers); nothing here reads a clock, draws randomness or touches a socket
//! (`control-plane/clippy.toml` enforces it). The tokio driver ([`crate::server`]) owns the
//! connections and performs the effects.
//!
//! Peer maps travel as deltas. A change to one agent (registration, join, leave, endpoints, NAT
//! report) is encoded once (per distinct set of shared parties) and put, as that agent's latest
//! state, into the [`PeerOutbox`] of every connected agent that shares a party with it: O(peers)
//! per change, not O(peers²), and the recipients share one encoding. Agents and membership are
//! read from memory ([`CachedStore`]; SQLite is written first and stays the source of truth).
//! The agent that changed gets a full map (it may have gained many peers at once). The driver
//! drains a session's outbox ([`Hub::poll_pushes`]) shortly after it was woken.
//!
//! Every size and count off the network is checked at entry ([`ClientMsg::validate`]): a
//! message over a bound is refused with a typed error and never stored.

mod metrics;
pub use metrics::DriverFigures;
mod requests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_binding;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rally_proto::control::{ErrorReply, RelayEntry};
use rally_proto::identity::{register_transcript, verify, DOMAIN_REGISTER};
use rally_proto::{
    frame, ClientMsg, ErrorCode, Identity, Key32, RelayToken, ServerMsg, Sig64, PROTOCOL_VERSION,
};
use rand_core::RngCore;
use tracing::{info, warn};

use crate::directory::{CachedStore, EncodedPeer};
use crate::outbox::{Change, PeerOutbox};
use crate::ratelimit::RateLimiter;
use crate::store::{Store, StoreError};

/// How long an invite lives when the creator does not say.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Lifetime of a relay token. Agents renew at two thirds of it; a fresh one is also pushed
/// whenever the agent's own parties change.
pub const RELAY_TOKEN_TTL: Duration = Duration::from_secs(600);
/// Delay both sides wait before punching, so their first probes cross.
const PUNCH_START_MS: u32 = 200;

/// Settings of a running control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `host:port` that invite codes tell agents to dial.
    pub public_addr: String,
    /// Relays handed to agents.
    pub relays: Vec<RelayEntry>,
    /// Join attempts allowed at once per source address…
    pub join_burst: u32,
    /// …refilled at one per this interval.
    pub join_refill: Duration,
    /// New identities allowed at once per source address…
    pub register_burst: u32,
    /// …refilled at one per this interval.
    pub register_refill: Duration,
    /// Any new identity registers and stays (no per-address limit, no expiry).
    pub open_registration: bool,
    /// An identity in no party, not connected, is removed this long after it was last seen.
    pub unjoined_ttl: Duration,
    /// `punch` requests allowed at once per agent…
    pub punch_burst: u32,
    /// …refilled at one per this interval.
    pub punch_refill: Duration,
}

impl Settings {
    /// Defaults for everything but the addresses.
    pub fn new(public_addr: String, relays: Vec<RelayEntry>) -> Self {
        Settings {
            public_addr,
            relays,
            join_burst: 20,
            join_refill: Duration::from_secs(3),
            register_burst: 32,
            register_refill: Duration::from_secs(10),
            open_registration: false,
            unjoined_ttl: Duration::from_secs(600),
            punch_burst: 10,
            punch_refill: Duration::from_secs(1),
        }
    }
}

/// The time, as the driver read it: monotonic for rate limits, unix seconds for what is stored
/// or signed.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub unix: u64,
}

/// A connection's id (unique for the life of the process).
pub type SessionId = u64;

/// One connection as the hub sees it; the driver keeps it and passes it to every call.
#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub remote: SocketAddr,
    stage: Stage,
    /// The connection's channel binding ([`rally_proto::identity::REGISTER_EXPORTER_LABEL`]),
    /// which a registration may be signed over instead of the challenge's nonce.
    binding: Option<Key32>,
}

#[derive(Debug)]
enum Stage {
    New,
    Challenged { identity: Key32, nonce: Key32 },
    Registered { identity: Key32 },
}

impl Session {
    pub fn new(id: SessionId, remote: SocketAddr) -> Self {
        Session {
            id,
            remote,
            stage: Stage::New,
            binding: None,
        }
    }

    /// The same, on a connection whose channel binding is `binding`.
    pub fn with_binding(mut self, binding: Option<Key32>) -> Self {
        self.binding = binding;
        self
    }

    /// The agent, once registered.
    pub fn identity(&self) -> Option<Key32> {
        match self.stage {
            Stage::Registered { identity } => Some(identity),
            _ => None,
        }
    }
}

/// What the driver must do after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send this message to the calling session (in order, waiting for room: back-pressure).
    Reply(ServerMsg),
    /// Send this message to another session if its queue has room (else drop and count it).
    Deliver { session: SessionId, msg: ServerMsg },
    /// Send this error to the calling session, then close it.
    Close(ErrorReply),
    /// The session's outbox has something: drain it with [`Hub::poll_pushes`] soon.
    Wake(SessionId),
}

/// The control plane's state and rules.
pub struct Hub {
    store: CachedStore,
    identity: Identity,
    settings: Settings,
    sessions: HashMap<Key32, Registered>,
    join_limiter: RateLimiter<IpAddr>,
    register_limiter: RateLimiter<IpAddr>,
    punch_limiter: RateLimiter<Key32>,
    counters: metrics::Counters,
}

struct Registered {
    session: SessionId,
    outbox: PeerOutbox,
}

impl Hub {
    /// A hub over `store`, whose agents and memberships it loads into memory.
    pub fn new(
        store: Box<dyn Store>,
        identity: Identity,
        settings: Settings,
    ) -> Result<Self, StoreError> {
        Ok(Hub {
            store: CachedStore::load(store)?,
            identity,
            join_limiter: RateLimiter::new(settings.join_burst, settings.join_refill),
            register_limiter: RateLimiter::new(settings.register_burst, settings.register_refill),
            punch_limiter: RateLimiter::new(settings.punch_burst, settings.punch_refill),
            settings,
            sessions: HashMap::new(),
            counters: metrics::Counters::default(),
        })
    }

    /// Agents with a live session.
    pub fn connected_agents(&self) -> usize {
        self.sessions.len()
    }

    /// One message from `session`'s agent.
    pub fn handle(
        &mut self,
        session: &mut Session,
        msg: ClientMsg,
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        if let Err(e) = msg.validate() {
            self.counters.too_large += 1;
            match msg {
                ClientMsg::Request { id, .. } => fx.push(Effect::Reply(ServerMsg::Response {
                    id,
                    result: Err(e.into()),
                })),
                _ => fx.push(Effect::Close(e.into())),
            }
            return fx;
        }
        match (&session.stage, msg) {
            (Stage::New, ClientMsg::Hello { version, identity }) => {
                if version != PROTOCOL_VERSION {
                    fx.push(Effect::Close(ErrorReply::new(
                        ErrorCode::VersionMismatch,
                        format!(
                            "protocol version {version} is not supported (want {PROTOCOL_VERSION})"
                        ),
                    )));
                    return fx;
                }
                let mut nonce = [0u8; 32];
                rng.fill_bytes(&mut nonce);
                let nonce = Key32(nonce);
                session.stage = Stage::Challenged { identity, nonce };
                fx.push(Effect::Reply(ServerMsg::Challenge { nonce }));
            }
            (
                &Stage::Challenged { identity, nonce },
                ClientMsg::Register {
                    name,
                    wg_key,
                    endpoints,
                    signature,
                },
            ) => {
                let reg = Registration {
                    identity,
                    nonce,
                    binding: session.binding,
                    name,
                    wg_key,
                    endpoints,
                    signature,
                };
                match self.register(session, reg, now, &mut fx) {
                    Ok(()) => session.stage = Stage::Registered { identity },
                    Err(e) => fx.push(Effect::Close(e)),
                }
            }
            (&Stage::Registered { identity }, ClientMsg::Request { id, body }) => {
                let result =
                    self.handle_request(&identity, session.remote, body, now, rng, &mut fx);
                fx.insert(0, Effect::Reply(ServerMsg::Response { id, result }));
            }
            (_, ClientMsg::Request { id, .. }) => {
                fx.push(Effect::Reply(ServerMsg::Response {
                    id,
                    result: Err(ErrorReply::new(ErrorCode::NotRegistered, "register first")),
                }));
            }
            (_, _) => fx.push(Effect::Close(ErrorReply::new(
                ErrorCode::BadRequest,
                "message out of order",
            ))),
        }
        fx
    }

    /// The session ended (its connection closed).
    pub fn handle_disconnect(&mut self, session: &Session, now: Now) {
        let Some(identity) = session.identity() else {
            return;
        };
        if self
            .sessions
            .get(&identity)
            .is_some_and(|s| s.session == session.id)
        {
            self.sessions.remove(&identity);
            info!(peer = %identity.short(), remote = %session.remote, "agent disconnected");
        }
        if let Err(e) = self.store.touch_agent(&identity, now.unix) {
            warn!("storage error: {e}");
        }
    }

    /// Periodic work: removes identities that are in no party, own none and were last seen
    /// longer than the unjoined TTL ago (never with open registration). Returns how many.
    pub fn handle_timeout(&mut self, now: Now) -> usize {
        if self.settings.open_registration {
            return 0;
        }
        let before = now
            .unix
            .saturating_sub(self.settings.unjoined_ttl.as_secs());
        let candidates = match self.store.unjoined_before(before) {
            Ok(c) => c,
            Err(e) => {
                warn!("storage error: {e}");
                return 0;
            }
        };
        let mut removed = 0;
        for id in candidates {
            if self.sessions.contains_key(&id) {
                continue;
            }
            match self.store.remove_unjoined(&id) {
                Ok(true) => {
                    info!(peer = %id.short(), "removed an identity that never joined a party");
                    removed += 1;
                }
                Ok(false) => {}
                Err(e) => warn!("storage error: {e}"),
            }
        }
        self.counters.expired += removed as u64;
        removed
    }

    /// What `session`'s writer should send now, as frames: the relays and a token if due (the
    /// token only for an agent in at least one party), then its next peer-map frames (reading a full map from the
    /// store if one is due). Empty for a session that is not (or no longer) the agent's.
    pub fn poll_pushes(&mut self, session: &Session, now: Now) -> Vec<Vec<u8>> {
        let Some(id) = session.identity() else {
            return Vec::new();
        };
        let Some(reg) = self
            .sessions
            .get_mut(&id)
            .filter(|r| r.session == session.id)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let relays = reg.outbox.poll_relays();
        if reg.outbox.needs_full_read() {
            reg.outbox.handle_full(self.store.encoded_peers_of(&id));
        }
        while let Some(push) = reg.outbox.poll_message() {
            if push.full {
                self.counters.full_frames += 1;
            } else {
                self.counters.deltas += 1;
            }
            out.push(push.frame);
        }
        if relays {
            match self.relays_msg(&id, now) {
                Ok(m) => out.insert(0, frame::encode(&m)),
                Err(e) => warn!(peer = %id.short(), "cannot sign a relay token: {e}"),
            }
        }
        out
    }

    fn register(
        &mut self,
        session: &Session,
        reg: Registration,
        now: Now,
        fx: &mut Vec<Effect>,
    ) -> Result<(), ErrorReply> {
        let Registration {
            identity,
            nonce,
            binding,
            name,
            wg_key,
            endpoints,
            signature,
        } = reg;
        // Signed over the challenge's nonce, or (sent before the challenge came) over the
        // connection's channel binding.
        let signed_over = |n: &Key32| {
            let transcript = register_transcript(n, &identity, &wg_key, &name);
            verify(&identity, DOMAIN_REGISTER, &transcript, &signature.0).is_ok()
        };
        let valid = signed_over(&nonce) || binding.as_ref().is_some_and(signed_over);
        valid.then_some(()).ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::AuthFailed,
                "registration signature does not verify",
            )
        })?;
        let current = self.check_registration(session, &identity, &wg_key, now)?;
        let taken = self.store.peer_names(&identity);
        let name = crate::names::pick(&name, current.as_ref().map(|a| a.name.as_str()), &taken);
        let row = self
            .store
            .register_agent(&identity, &name, &wg_key, &endpoints, now.unix)
            .map_err(|e| match e {
                StoreError::AddressSpaceFull => {
                    ErrorReply::new(ErrorCode::AddressSpaceFull, e.to_string())
                }
                e => internal(e),
            })?;
        let old = self.sessions.insert(
            identity,
            Registered {
                session: session.id,
                outbox: PeerOutbox::new(),
            },
        );
        if let Some(old) = old {
            fx.push(Effect::Deliver {
                session: old.session,
                msg: ServerMsg::Error(ErrorReply::new(
                    ErrorCode::AuthFailed,
                    "replaced by a newer session of the same agent",
                )),
            });
        }
        self.counters.registrations += 1;
        info!(peer = %identity.short(), name = %row.name, vip = %row.virtual_ip, remote = %session.remote, "agent registered");
        fx.push(Effect::Reply(ServerMsg::Registered {
            peer_id: identity,
            name: row.name,
            virtual_ip: row.virtual_ip,
            observed: session.remote,
        }));
        let peers = self.announce(&identity, fx);
        self.refresh_own(&identity, peers, fx);
        Ok(())
    }

    /// Refuses a registration that claims another agent's WireGuard key, or a new identity over
    /// the per-address limit; returns the identity's stored row, if any.
    fn check_registration(
        &mut self,
        session: &Session,
        identity: &Key32,
        wg_key: &Key32,
        now: Now,
    ) -> Result<Option<crate::store::AgentRow>, ErrorReply> {
        let holder = self.store.wg_key_holder(wg_key).map_err(internal)?;
        if holder.is_some_and(|h| h != *identity) {
            self.counters.registrations_refused += 1;
            info!(peer = %identity.short(), remote = %session.remote, "registration refused: WireGuard key in use");
            return Err(ErrorReply::new(
                ErrorCode::KeyInUse,
                "this WireGuard key is registered by another agent",
            ));
        }
        let current = self.store.agent(identity).map_err(internal)?;
        if current.is_none() && !self.settings.open_registration {
            if let Err(wait) = self.register_limiter.check(session.remote.ip(), now.mono) {
                self.counters.registrations_refused += 1;
                return Err(ErrorReply::new(
                    ErrorCode::RegistrationRefused,
                    format!(
                        "too many new agents from {}; try again in {} s",
                        session.remote.ip(),
                        wait.as_secs().max(1)
                    ),
                ));
            }
        }
        Ok(current)
    }

    /// Puts `subject`'s current state into the outbox of every connected agent that shares a
    /// party with it, and returns the subject's own peers.
    fn announce(
        &mut self,
        subject: &Key32,
        fx: &mut Vec<Effect>,
    ) -> Vec<std::sync::Arc<EncodedPeer>> {
        let audience = self.store.audience(subject);
        audience
            .into_iter()
            .map(|(peer, me, them)| {
                if let Some(s) = self.sessions.get_mut(&peer) {
                    s.outbox.handle_change(Change::Upsert(me));
                    fx.push(Effect::Wake(s.session));
                }
                them
            })
            .collect()
    }

    /// Gives `me`'s own session its full peer list and renews its relay token.
    fn refresh_own(
        &mut self,
        me: &Key32,
        peers: Vec<std::sync::Arc<EncodedPeer>>,
        fx: &mut Vec<Effect>,
    ) {
        if let Some(s) = self.sessions.get_mut(me) {
            s.outbox.handle_full(peers);
            s.outbox.handle_parties_changed();
            fx.push(Effect::Wake(s.session));
        }
    }

    /// The relay list with a fresh token naming the agent's current parties. An agent in no
    /// party gets the list (it measures its NAT against the relays) with an empty token and
    /// `expires_at` 0: a relay forwards only within parties, so it has nothing to bind for.
    fn relays_msg(&self, id: &Key32, now: Now) -> Result<ServerMsg, ErrorReply> {
        let (token, expires_at) = self.relay_token(id, now)?.unwrap_or_default();
        Ok(ServerMsg::Relays {
            relays: self.settings.relays.clone(),
            token,
            expires_at,
        })
    }

    fn relay_token(&self, id: &Key32, now: Now) -> Result<Option<(String, u64)>, ErrorReply> {
        let parties = self.store.parties_of(id).map_err(internal)?;
        if parties.is_empty() {
            return Ok(None);
        }
        let expires_at = now.unix + RELAY_TOKEN_TTL.as_secs();
        let token = RelayToken {
            agent: *id,
            expires_at,
            parties: parties.iter().map(|p| p.id).collect(),
        };
        let signed = token.try_sign(&self.identity).map_err(|e| {
            warn!(peer = %id.short(), "relay token: {e}");
            ErrorReply::new(ErrorCode::TooManyParties, e.to_string())
        })?;
        Ok(Some((URL_SAFE_NO_PAD.encode(signed), expires_at)))
    }

    /// Counts a refused join by its reason.
    fn count_refused_join(&mut self, code: ErrorCode) {
        *self
            .counters
            .joins_refused
            .entry(code.as_str())
            .or_insert(0) += 1;
    }
}

/// A `register` message with its challenge.
struct Registration {
    identity: Key32,
    nonce: Key32,
    binding: Option<Key32>,
    name: String,
    wg_key: Key32,
    endpoints: Vec<SocketAddr>,
    signature: Sig64,
}

fn bad_request(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::BadRequest, e.to_string())
}

fn internal(e: StoreError) -> ErrorReply {
    warn!("storage error: {e}");
    ErrorReply::new(ErrorCode::Internal, "internal error in the control plane")
}

/// Reasons a join may be refused, for the metrics.
const JOIN_REFUSALS: [ErrorCode; 8] = [
    ErrorCode::InviteInvalid,
    ErrorCode::InviteUnknown,
    ErrorCode::InviteExpired,
    ErrorCode::InviteUsedUp,
    ErrorCode::WrongControlPlane,
    ErrorCode::RateLimited,
    ErrorCode::TooManyParties,
    ErrorCode::Internal,
];

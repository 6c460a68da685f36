//! The control plane's tokio layer: accepts agents over QUIC, runs the registration handshake,
//! answers requests, and pushes peer maps.
//!
//! Peer maps travel as deltas. A change to one agent (registration, join, leave, endpoints, NAT
//! report) is encoded once (per distinct set of shared parties) and put, as that agent's latest
//! state, into the [`PeerOutbox`] of every connected agent that shares a party with it: O(peers)
//! per change, not O(peers²), and the recipients share one encoding. Agents and membership are
//! read from memory ([`CachedStore`]; SQLite is written first and stays the source of truth).
//! The agent that changed gets a full map (it may have gained many peers at once). Each
//! session's writer drains its outbox [`FLUSH_DELAY`] after the first pending change, and no
//! sooner than [`PUSH_PACE`] after its previous push, so a burst of joins becomes few deltas per
//! agent, and a slow agent accumulates a bounded latest state rather than a queue of stale maps.
//!
//! Lock order: `store`, then `sessions`, then one outbox. Changes are read from the store and
//! put into outboxes under the store lock, and a full map is read under it too, so an outbox
//! never receives a change older than the map it already holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rally_proto::control::{
    validate_endpoints, validate_name, ErrorReply, PartyInfo, RelayEntry, Request,
};
use rally_proto::identity::{register_transcript, verify, DOMAIN_REGISTER};
use rally_proto::RelayToken;
use rally_proto::{
    frame, ClientMsg, ErrorCode, FrameDecoder, Identity, InviteCode, Key32, Response, ServerMsg,
    PROTOCOL_VERSION,
};
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::directory::{CachedStore, EncodedPeer};
use crate::outbox::{Change, PeerOutbox};
use crate::ratelimit::RateLimiter;
use crate::store::{InviteRefusal, NewInvite, PartyRow, Store, StoreError};

/// How long an invite lives when the creator does not say.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long after a session's first pending change its peer-map push is sent (changes within
/// it are coalesced into one message).
pub const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// While changes keep coming, a session gets at most one peer-map push per this interval (its
/// changes meanwhile coalesce into the next one).
pub const PUSH_PACE: Duration = Duration::from_millis(100);
/// How long an agent has to finish registering.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
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
}

/// Shared state of the control plane.
pub struct Hub {
    store: Mutex<CachedStore>,
    sessions: Mutex<HashMap<Key32, Session>>,
    identity: Identity,
    settings: Settings,
    join_limiter: Mutex<RateLimiter>,
    next_session: AtomicU64,
    registrations: AtomicU64,
    joins_refused: Mutex<BTreeMap<&'static str, u64>>,
    full_maps_sent: AtomicU64,
    deltas_sent: AtomicU64,
}

struct Session {
    id: u64,
    tx: mpsc::UnboundedSender<ServerMsg>,
    outbox: Arc<Outbox>,
}

/// One session's pending peer-map pushes and the signal that wakes its writer.
struct Outbox {
    /// Set once the agent has registered.
    identity: OnceLock<Key32>,
    state: Mutex<PeerOutbox>,
    wake: Notify,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            identity: OnceLock::new(),
            state: Mutex::new(PeerOutbox::new()),
            wake: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut PeerOutbox)) {
        f(&mut lock(&self.state));
        self.wake.notify_one();
    }
}

impl Hub {
    /// A hub over `store`, whose agents and memberships it loads into memory.
    pub fn new(
        store: Box<dyn Store>,
        identity: Identity,
        settings: Settings,
    ) -> Result<Arc<Self>, StoreError> {
        let store = CachedStore::load(store)?;
        let join_limiter = RateLimiter::new(settings.join_burst, settings.join_refill);
        Ok(Arc::new(Hub {
            store: Mutex::new(store),
            sessions: Mutex::new(HashMap::new()),
            identity,
            settings,
            join_limiter: Mutex::new(join_limiter),
            next_session: AtomicU64::new(1),
            registrations: AtomicU64::new(0),
            joins_refused: Mutex::new(BTreeMap::new()),
            full_maps_sent: AtomicU64::new(0),
            deltas_sent: AtomicU64::new(0),
        }))
    }

    /// Accepts connections until the endpoint is closed.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let hub = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => hub.serve_connection(conn).await,
                    Err(e) => debug!(%remote, "handshake failed: {e}"),
                }
            });
        }
    }

    pub fn connected_agents(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Prometheus text: agents connected, agents and parties stored, registrations, and
    /// joins refused by reason.
    pub fn render_metrics(&self) -> String {
        use rally_proto::http::write_metric;
        let (agents, parties) = lock(&self.store).counts().unwrap_or((0, 0));
        let one = |v: f64| vec![(String::new(), v)];
        let mut out = String::new();
        write_metric(
            &mut out,
            "rally_control_agents_connected",
            "gauge",
            "Agents with a live session.",
            &one(self.connected_agents() as f64),
        );
        write_metric(
            &mut out,
            "rally_control_agents",
            "gauge",
            "Agents ever registered.",
            &one(agents as f64),
        );
        write_metric(
            &mut out,
            "rally_control_parties",
            "gauge",
            "Parties.",
            &one(parties as f64),
        );
        write_metric(
            &mut out,
            "rally_control_registrations_total",
            "counter",
            "Successful registrations since start.",
            &one(self.registrations.load(Ordering::Relaxed) as f64),
        );
        let refused = lock(&self.joins_refused);
        let by_reason: Vec<(String, f64)> = [
            ErrorCode::InviteInvalid,
            ErrorCode::InviteUnknown,
            ErrorCode::InviteExpired,
            ErrorCode::InviteUsedUp,
            ErrorCode::WrongControlPlane,
            ErrorCode::RateLimited,
            ErrorCode::Internal,
        ]
        .iter()
        .map(|c| {
            let n = refused.get(c.as_str()).copied().unwrap_or(0);
            (format!("reason=\"{}\"", c.as_str()), n as f64)
        })
        .collect();
        write_metric(
            &mut out,
            "rally_control_joins_refused_total",
            "counter",
            "Join attempts refused, by reason.",
            &by_reason,
        );
        write_metric(
            &mut out,
            "rally_control_peer_pushes_total",
            "counter",
            "Peer-map messages pushed, by kind (full map or delta).",
            &[
                (
                    "kind=\"full\"".to_string(),
                    self.full_maps_sent.load(Ordering::Relaxed) as f64,
                ),
                (
                    "kind=\"delta\"".to_string(),
                    self.deltas_sent.load(Ordering::Relaxed) as f64,
                ),
            ],
        );
        out
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%remote, "no stream: {e}");
                return;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = Arc::new(Outbox::new());
        let writer = tokio::spawn(write_frames(self.clone(), send, rx, outbox.clone()));
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut agent = AgentSession {
            hub: &self,
            remote,
            tx: tx.clone(),
            outbox,
            session,
            stage: Stage::New,
        };
        let outcome = agent.run(recv).await;
        if let Some(identity) = agent.stage.identity() {
            let mut sessions = lock(&self.sessions);
            if sessions.get(&identity).is_some_and(|s| s.id == session) {
                sessions.remove(&identity);
                info!(peer = %identity.short(), %remote, "agent disconnected");
            }
        }
        if let Err(reply) = outcome {
            debug!(%remote, "closing session: {}", reply.message);
            let _ = tx.send(ServerMsg::Error(reply));
        }
        drop(tx);
        drop(agent);
        let _ = writer.await;
        conn.close(0u32.into(), b"bye");
    }

    /// Puts `subject`'s current state into the outbox of every connected agent that shares a
    /// party with it, and returns the subject's own peers. Call with the store locked (see the
    /// lock order above).
    fn announce(&self, store: &mut CachedStore, subject: &Key32) -> Vec<Arc<EncodedPeer>> {
        let audience = store.audience(subject);
        let sessions = lock(&self.sessions);
        audience
            .into_iter()
            .map(|(peer, me, them)| {
                if let Some(s) = sessions.get(&peer) {
                    s.outbox.update(|o| o.handle_change(Change::Upsert(me)));
                }
                them
            })
            .collect()
    }

    /// Tells `me`'s own session its full peer list and that its parties changed.
    fn refresh_own(&self, me: &Key32, peers: Vec<Arc<EncodedPeer>>) {
        if let Some(s) = lock(&self.sessions).get(me) {
            s.outbox.update(|o| {
                o.handle_full(peers);
                o.handle_parties_changed();
            });
        }
    }

    /// What a session's writer should send now, as frames: a relay token if due, then its next
    /// peer-map message (reading a full map from the store if one is due).
    fn take_pushes(&self, outbox: &Outbox) -> Vec<Vec<u8>> {
        let Some(id) = outbox.identity.get().copied() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let (relays, stale) = {
            let mut o = lock(&outbox.state);
            (o.poll_relays(), o.needs_full_read())
        };
        if relays {
            match self.relays_msg(&id) {
                Ok(m) => out.push(frame::encode(&m)),
                Err(e) => warn!(peer = %id.short(), "cannot sign a relay token: {e}"),
            }
        }
        if stale {
            let mut store = lock(&self.store);
            let mut o = lock(&outbox.state);
            if o.needs_full_read() {
                o.handle_full(store.encoded_peers_of(&id));
            }
        }
        let push = lock(&outbox.state).poll_message();
        if let Some(push) = push {
            let counter = if push.full {
                &self.full_maps_sent
            } else {
                &self.deltas_sent
            };
            counter.fetch_add(1, Ordering::Relaxed);
            out.push(push.frame);
        }
        out
    }

    /// The relay list with a fresh token naming the agent's current parties.
    fn relays_msg(&self, id: &Key32) -> Result<ServerMsg, StoreError> {
        let (token, expires_at) = self.relay_token(id)?;
        Ok(ServerMsg::Relays {
            relays: self.settings.relays.clone(),
            token,
            expires_at,
        })
    }

    fn relay_token(&self, id: &Key32) -> Result<(String, u64), StoreError> {
        let parties = lock(&self.store).parties_of(id)?;
        let expires_at = unix_now() + RELAY_TOKEN_TTL.as_secs();
        let token = RelayToken {
            agent: *id,
            expires_at,
            parties: parties.iter().map(|p| p.id).collect(),
        };
        Ok((
            URL_SAFE_NO_PAD.encode(token.sign(&self.identity)),
            expires_at,
        ))
    }

    fn party_info(&self, p: PartyRow) -> PartyInfo {
        PartyInfo {
            id: hex::encode(p.id),
            name: p.name,
            owner: p.owner,
            members: p.members,
        }
    }

    fn handle_request(
        &self,
        me: &Key32,
        remote: SocketAddr,
        req: Request,
    ) -> Result<Response, ErrorReply> {
        let now = unix_now();
        match req {
            Request::CreateParty {
                name,
                max_uses,
                expires_in_secs,
            } => {
                validate_name(&name).map_err(bad_request)?;
                let mut id = [0u8; 8];
                let mut secret = [0u8; 16];
                OsRng.fill_bytes(&mut id);
                OsRng.fill_bytes(&mut secret);
                let ttl = expires_in_secs.unwrap_or(DEFAULT_INVITE_TTL.as_secs());
                let invite = NewInvite {
                    secret,
                    expires_at: (ttl > 0).then_some(now.saturating_add(ttl)),
                    max_uses: max_uses.filter(|n| *n > 0),
                };
                let party = lock(&self.store)
                    .create_party(id, &name, me, invite, now)
                    .map_err(internal)?;
                let code = InviteCode {
                    control_addr: self.settings.public_addr.clone(),
                    control_key: self.identity.public(),
                    party_id: id,
                    secret,
                };
                info!(peer = %me.short(), party = %name, "party created");
                // The creator's relay token must name the new party.
                if let Some(s) = lock(&self.sessions).get(me) {
                    s.outbox.update(PeerOutbox::handle_parties_changed);
                }
                Ok(Response::PartyCreated {
                    party: self.party_info(party),
                    invite: code.encode(),
                })
            }
            Request::JoinParty { code } => {
                let result = self.join(me, remote, now, code);
                if let Err(e) = &result {
                    *lock(&self.joins_refused)
                        .entry(e.code.as_str())
                        .or_default() += 1;
                }
                result
            }
            Request::LeaveParty { party } => self.leave(me, party),
            Request::ListParties => {
                let parties = lock(&self.store).parties_of(me).map_err(internal)?;
                Ok(Response::Parties {
                    parties: parties.into_iter().map(|p| self.party_info(p)).collect(),
                })
            }
            other => self.handle_paths(me, other),
        }
    }

    fn join(
        &self,
        me: &Key32,
        remote: SocketAddr,
        now: u64,
        code: String,
    ) -> Result<Response, ErrorReply> {
        {
            {
                if let Err(wait) =
                    lock(&self.join_limiter).check(remote.ip(), std::time::Instant::now())
                {
                    return Err(ErrorReply::new(
                        ErrorCode::RateLimited,
                        format!(
                            "too many join attempts from {}; try again in {} s",
                            remote.ip(),
                            wait.as_secs().max(1)
                        ),
                    ));
                }
                let code = InviteCode::decode(&code)
                    .map_err(|e| ErrorReply::new(ErrorCode::InviteInvalid, e.to_string()))?;
                if code.control_key != self.identity.public() {
                    return Err(ErrorReply::new(
                        ErrorCode::WrongControlPlane,
                        "invite code belongs to another control plane",
                    ));
                }
                let mut store = lock(&self.store);
                let outcome = store
                    .redeem_invite(code.party_id, &code.secret, me, now)
                    .map_err(internal)?;
                let party = outcome.map_err(|r| {
                    info!(peer = %me.short(), %remote, refusal = ?r, "join refused");
                    match r {
                        InviteRefusal::Unknown => ErrorReply::new(
                            ErrorCode::InviteUnknown,
                            "invite code is not valid for this party (revoked or never issued)",
                        ),
                        InviteRefusal::Expired => {
                            ErrorReply::new(ErrorCode::InviteExpired, "invite code has expired")
                        }
                        InviteRefusal::UsedUp { max_uses } => ErrorReply::new(
                            ErrorCode::InviteUsedUp,
                            format!("invite code is used up ({max_uses} of {max_uses} uses)"),
                        ),
                    }
                })?;
                info!(peer = %me.short(), party = %party.name, "joined party");
                let peers = self.announce(&mut store, me);
                // Still under the store lock, so no later change is overwritten by this map.
                self.refresh_own(me, peers);
                drop(store);
                Ok(Response::Joined {
                    party: self.party_info(party),
                })
            }
        }
    }

    fn leave(&self, me: &Key32, party: String) -> Result<Response, ErrorReply> {
        {
            {
                let parties = lock(&self.store).parties_of(me).map_err(internal)?;
                let matching: Vec<PartyRow> = parties
                    .into_iter()
                    .filter(|p| p.name == party || hex::encode(p.id) == party)
                    .collect();
                let p = match <[PartyRow; 1]>::try_from(matching) {
                    Ok([p]) => p,
                    Err(v) if v.is_empty() => {
                        return Err(ErrorReply::new(
                            ErrorCode::NotFound,
                            format!("not a member of a party named {party:?}"),
                        ))
                    }
                    Err(_) => {
                        return Err(ErrorReply::new(
                            ErrorCode::BadRequest,
                            format!("several parties are named {party:?}; give the party id"),
                        ))
                    }
                };
                let mut store = lock(&self.store);
                let before = store.peer_ids(me);
                store.leave_party(p.id, me).map_err(internal)?;
                let peers = self.announce(&mut store, me);
                {
                    // Peers that no longer share any party with `me` lose it.
                    let still: HashSet<Key32> = peers.iter().map(|q| q.peer_id).collect();
                    let sessions = lock(&self.sessions);
                    for id in &before {
                        if still.contains(id) {
                            continue;
                        }
                        if let Some(s) = sessions.get(id) {
                            s.outbox.update(|o| o.handle_change(Change::Remove(*me)));
                        }
                    }
                }
                self.refresh_own(me, peers);
                drop(store);
                info!(peer = %me.short(), party = %p.name, "left party");
                Ok(Response::Left {
                    party: self.party_info(PartyRow {
                        members: p.members.saturating_sub(1),
                        ..p
                    }),
                })
            }
        }
    }

    /// Endpoint, NAT, relay-token and punch requests.
    fn handle_paths(&self, me: &Key32, req: Request) -> Result<Response, ErrorReply> {
        match req {
            Request::UpdateEndpoints { endpoints } => {
                validate_endpoints(&endpoints).map_err(bad_request)?;
                let mut store = lock(&self.store);
                store.set_endpoints(me, &endpoints).map_err(internal)?;
                self.announce(&mut store, me);
                Ok(Response::Ok)
            }
            Request::ReportNat { nat } => {
                let json = serde_json::to_string(&nat).map_err(bad_request)?;
                let mut store = lock(&self.store);
                store.set_nat(me, &json).map_err(internal)?;
                self.announce(&mut store, me);
                Ok(Response::Ok)
            }
            Request::RelayToken => {
                let (token, expires_at) = self.relay_token(me).map_err(internal)?;
                Ok(Response::RelayToken { token, expires_at })
            }
            Request::SyncPeers => {
                if let Some(s) = lock(&self.sessions).get(me) {
                    s.outbox.update(PeerOutbox::handle_resync);
                }
                Ok(Response::Ok)
            }
            Request::Punch { peer } => {
                let (mine, theirs) = {
                    let store = lock(&self.store);
                    if !store.share_party(me, &peer) {
                        return Err(ErrorReply::new(
                            ErrorCode::NotFound,
                            "no such peer in your parties",
                        ));
                    }
                    let endpoints = |id: &Key32| -> Result<Vec<SocketAddr>, ErrorReply> {
                        Ok(store
                            .agent(id)
                            .map_err(internal)?
                            .map(|a| a.endpoints)
                            .unwrap_or_default())
                    };
                    (endpoints(me)?, endpoints(&peer)?)
                };
                let sessions = lock(&self.sessions);
                if let Some(s) = sessions.get(&peer) {
                    let _ = s.tx.send(ServerMsg::Punch {
                        peer: *me,
                        candidates: mine,
                        start_in_ms: PUNCH_START_MS,
                    });
                }
                if let Some(s) = sessions.get(me) {
                    let _ = s.tx.send(ServerMsg::Punch {
                        peer,
                        candidates: theirs,
                        start_in_ms: PUNCH_START_MS,
                    });
                }
                Ok(Response::Ok)
            }
            Request::CreateParty { .. }
            | Request::JoinParty { .. }
            | Request::LeaveParty { .. }
            | Request::ListParties => {
                Err(ErrorReply::new(ErrorCode::Internal, "misrouted request"))
            }
        }
    }
}

enum Stage {
    New,
    Challenged { identity: Key32, nonce: Key32 },
    Registered { identity: Key32 },
}

impl Stage {
    fn identity(&self) -> Option<Key32> {
        match self {
            Stage::Registered { identity } => Some(*identity),
            _ => None,
        }
    }
}

struct AgentSession<'a> {
    hub: &'a Arc<Hub>,
    remote: SocketAddr,
    tx: mpsc::UnboundedSender<ServerMsg>,
    outbox: Arc<Outbox>,
    session: u64,
    stage: Stage,
}

impl AgentSession<'_> {
    async fn run(&mut self, mut recv: quinn::RecvStream) -> Result<(), ErrorReply> {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        loop {
            let read = if matches!(self.stage, Stage::Registered { .. }) {
                recv.read(&mut buf).await
            } else {
                tokio::time::timeout_at(deadline, recv.read(&mut buf))
                    .await
                    .map_err(|_| ErrorReply::new(ErrorCode::AuthFailed, "registration timed out"))?
            };
            let n = match read {
                Ok(Some(n)) => n,
                Ok(None) | Err(_) => return Ok(()),
            };
            decoder.extend(&buf[..n]);
            loop {
                let msg = decoder
                    .next_msg::<ClientMsg>()
                    .map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))?;
                let Some(msg) = msg else { break };
                self.handle(msg)?;
            }
        }
    }

    fn send(&self, msg: ServerMsg) {
        let _ = self.tx.send(msg);
    }

    fn handle(&mut self, msg: ClientMsg) -> Result<(), ErrorReply> {
        match (&self.stage, msg) {
            (Stage::New, ClientMsg::Hello { version, identity }) => {
                if version != PROTOCOL_VERSION {
                    return Err(ErrorReply::new(
                        ErrorCode::VersionMismatch,
                        format!(
                            "protocol version {version} is not supported (want {PROTOCOL_VERSION})"
                        ),
                    ));
                }
                let mut nonce = [0u8; 32];
                OsRng.fill_bytes(&mut nonce);
                let nonce = Key32(nonce);
                self.stage = Stage::Challenged { identity, nonce };
                self.send(ServerMsg::Challenge { nonce });
                Ok(())
            }
            (
                Stage::Challenged { identity, nonce },
                ClientMsg::Register {
                    name,
                    wg_key,
                    endpoints,
                    signature,
                },
            ) => {
                let identity = *identity;
                let transcript = register_transcript(nonce, &identity, &wg_key, &name);
                verify(&identity, DOMAIN_REGISTER, &transcript, &signature.0).map_err(|_| {
                    ErrorReply::new(
                        ErrorCode::AuthFailed,
                        "registration signature does not verify",
                    )
                })?;
                validate_name(&name).map_err(bad_request)?;
                validate_endpoints(&endpoints).map_err(bad_request)?;
                let mut store = lock(&self.hub.store);
                let row = store
                    .register_agent(&identity, &name, &wg_key, &endpoints, unix_now())
                    .map_err(|e| match e {
                        StoreError::AddressSpaceFull => {
                            ErrorReply::new(ErrorCode::AddressSpaceFull, e.to_string())
                        }
                        e => internal(e),
                    })?;
                self.stage = Stage::Registered { identity };
                let _ = self.outbox.identity.set(identity);
                let old = lock(&self.hub.sessions).insert(
                    identity,
                    Session {
                        id: self.session,
                        tx: self.tx.clone(),
                        outbox: self.outbox.clone(),
                    },
                );
                if let Some(old) = old {
                    let _ = old.tx.send(ServerMsg::Error(ErrorReply::new(
                        ErrorCode::AuthFailed,
                        "replaced by a newer session of the same agent",
                    )));
                }
                self.hub.registrations.fetch_add(1, Ordering::Relaxed);
                info!(peer = %identity.short(), name = %row.name, vip = %row.virtual_ip, remote = %self.remote, "agent registered");
                self.send(ServerMsg::Registered {
                    peer_id: identity,
                    name: row.name,
                    virtual_ip: row.virtual_ip,
                    observed: self.remote,
                });
                let peers = self.hub.announce(&mut store, &identity);
                self.outbox.update(|o| {
                    o.handle_full(peers);
                    o.handle_parties_changed();
                });
                drop(store);
                Ok(())
            }
            (Stage::Registered { identity }, ClientMsg::Request { id, body }) => {
                let identity = *identity;
                let result = self.hub.handle_request(&identity, self.remote, body);
                self.send(ServerMsg::Response { id, result });
                Ok(())
            }
            (_, ClientMsg::Request { id, .. }) => {
                self.send(ServerMsg::Response {
                    id,
                    result: Err(ErrorReply::new(ErrorCode::NotRegistered, "register first")),
                });
                Ok(())
            }
            (_, _) => Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "message out of order",
            )),
        }
    }
}

/// Writes a session's frames: replies and punches as they come, and peer-map pushes
/// [`FLUSH_DELAY`] after the outbox was first woken.
async fn write_frames(
    hub: Arc<Hub>,
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<ServerMsg>,
    outbox: Arc<Outbox>,
) {
    let mut flush_at: Option<tokio::time::Instant> = None;
    let mut last_push: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let last = matches!(msg, ServerMsg::Error(_));
                if send.write_all(&frame::encode(&msg)).await.is_err() {
                    return;
                }
                if last {
                    break;
                }
            }
            _ = outbox.wake.notified(), if flush_at.is_none() => {
                let soonest = tokio::time::Instant::now() + FLUSH_DELAY;
                flush_at = Some(last_push.map_or(soonest, |t| soonest.max(t + PUSH_PACE)));
            }
            _ = sleep_until(flush_at), if flush_at.is_some() => {
                flush_at = None;
                let frames = hub.take_pushes(&outbox);
                if !frames.is_empty() {
                    last_push = Some(tokio::time::Instant::now());
                }
                for f in frames {
                    if send.write_all(&f).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn bad_request(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::BadRequest, e.to_string())
}

fn internal(e: StoreError) -> ErrorReply {
    warn!("storage error: {e}");
    ErrorReply::new(ErrorCode::Internal, "internal error in the control plane")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use rally_proto::{Overlay, PeerChange, Sig64};

    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn a_joiner_gets_a_full_map_and_members_get_one_delta_for_a_burst() {
        let (_dir, hub) = hub();
        let mut owner = Agent::register(&hub, 1);
        owner.drain();
        let code = owner.create_party("lan");
        let msgs = owner.drain();
        assert!(
            matches!(&msgs[..], [ServerMsg::Relays { .. }]),
            "a new party renews the creator's relay token: {msgs:?}"
        );
        let mut joiners: Vec<Agent> = (2..=4).map(|i| Agent::register(&hub, i)).collect();
        for j in &mut joiners {
            j.join(&code);
        }
        // The owner: one delta carrying the three joiners.
        let msgs = owner.drain();
        let [ServerMsg::PeerDelta { version, changes }] = &msgs[..] else {
            panic!("expected one delta, got {msgs:?}");
        };
        assert_eq!(*version, 2);
        let names: Vec<_> = changes
            .iter()
            .map(|c| match c {
                PeerChange::Upsert { peer } => peer.name.clone(),
                PeerChange::Remove { .. } => panic!("unexpected remove"),
            })
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, ["a2", "a3", "a4"]);
        // The last joiner: a relay token and the full map of everyone before it.
        let msgs = joiners[2].drain();
        assert!(matches!(msgs[0], ServerMsg::Relays { .. }), "{msgs:?}");
        let ServerMsg::PeerMap { peers, .. } = &msgs[1] else {
            panic!("expected a full map, got {msgs:?}");
        };
        assert_eq!(peers.len(), 3);
        assert!(peers.iter().all(|p| p.parties == ["lan"]));
    }

    #[test]
    fn leaving_removes_the_agent_from_its_former_peers() {
        let (_dir, hub) = hub();
        let mut owner = Agent::register(&hub, 1);
        let code = owner.create_party("lan");
        let mut bob = Agent::register(&hub, 2);
        bob.join(&code);
        owner.drain();
        bob.drain();
        bob.request(Request::LeaveParty {
            party: "lan".into(),
        });
        let msgs = owner.drain();
        assert_eq!(
            msgs,
            vec![ServerMsg::PeerDelta {
                version: 2,
                changes: vec![PeerChange::Remove { peer_id: bob.id }]
            }]
        );
        let msgs = bob.drain();
        assert!(
            matches!(&msgs[..], [ServerMsg::Relays { .. }, ServerMsg::PeerMap { peers, .. }] if peers.is_empty()),
            "{msgs:?}"
        );
    }

    #[test]
    fn endpoint_update_is_one_upsert_and_sync_peers_sends_a_full_map() {
        let (_dir, hub) = hub();
        let mut owner = Agent::register(&hub, 1);
        let code = owner.create_party("lan");
        let mut bob = Agent::register(&hub, 2);
        bob.join(&code);
        owner.drain();
        bob.drain();
        let eps: Vec<SocketAddr> = vec!["203.0.113.7:4000".parse().unwrap()];
        bob.request(Request::UpdateEndpoints {
            endpoints: eps.clone(),
        });
        let msgs = owner.drain();
        let [ServerMsg::PeerDelta { changes, .. }] = &msgs[..] else {
            panic!("expected one delta, got {msgs:?}");
        };
        assert!(matches!(&changes[..], [PeerChange::Upsert { peer }] if peer.endpoints == eps));
        owner.request(Request::SyncPeers);
        let msgs = owner.drain();
        let [ServerMsg::PeerMap { version, peers }] = &msgs[..] else {
            panic!("expected a full map, got {msgs:?}");
        };
        assert_eq!(*version, 3);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].endpoints, eps);
    }

    /// A registered agent driven through `AgentSession` without a network.
    struct Agent<'a> {
        session: AgentSession<'a>,
        rx: mpsc::UnboundedReceiver<ServerMsg>,
        id: Key32,
        next_id: u64,
    }

    impl<'a> Agent<'a> {
        fn register(hub: &'a Arc<Hub>, seed: u8) -> Self {
            let identity = Identity::from_seed([seed; 32]);
            let id = identity.public();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut session = AgentSession {
                hub,
                remote: SocketAddr::from(([192, 0, 2, seed], 5000)),
                tx,
                outbox: Arc::new(Outbox::new()),
                session: u64::from(seed),
                stage: Stage::New,
            };
            session
                .handle(ClientMsg::Hello {
                    version: PROTOCOL_VERSION,
                    identity: id,
                })
                .unwrap();
            let Ok(ServerMsg::Challenge { nonce }) = rx.try_recv() else {
                panic!("no challenge");
            };
            let (name, wg_key) = (format!("a{seed}"), Key32([seed; 32]));
            let transcript = register_transcript(&nonce, &id, &wg_key, &name);
            session
                .handle(ClientMsg::Register {
                    signature: Sig64(identity.sign(DOMAIN_REGISTER, &transcript)),
                    name,
                    wg_key,
                    endpoints: vec![],
                })
                .unwrap();
            assert!(matches!(rx.try_recv(), Ok(ServerMsg::Registered { .. })));
            Agent {
                session,
                rx,
                id,
                next_id: 1,
            }
        }

        fn request(&mut self, body: Request) -> Response {
            let id = self.next_id;
            self.next_id += 1;
            self.session
                .handle(ClientMsg::Request { id, body })
                .unwrap();
            match self.rx.try_recv() {
                Ok(ServerMsg::Response { result: Ok(r), .. }) => r,
                other => panic!("no answer: {other:?}"),
            }
        }

        fn create_party(&mut self, name: &str) -> String {
            match self.request(Request::CreateParty {
                name: name.into(),
                max_uses: None,
                expires_in_secs: None,
            }) {
                Response::PartyCreated { invite, .. } => invite,
                other => panic!("{other:?}"),
            }
        }

        fn join(&mut self, code: &str) {
            let r = self.request(Request::JoinParty { code: code.into() });
            assert!(matches!(r, Response::Joined { .. }), "{r:?}");
        }

        /// Everything the writer would push now (as after the flush delay).
        fn drain(&mut self) -> Vec<ServerMsg> {
            let mut out = Vec::new();
            loop {
                let frames = self.session.hub.take_pushes(&self.session.outbox);
                if frames.is_empty() {
                    return out;
                }
                out.extend(frames.iter().map(|f| frame::decode(f).expect("a frame")));
            }
        }
    }

    fn hub() -> (tempfile::TempDir, Arc<Hub>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db"), Overlay::default()).unwrap();
        let hub = Hub::new(
            Box::new(store),
            Identity::from_seed([99; 32]),
            Settings {
                public_addr: "192.0.2.1:7443".into(),
                relays: vec![],
                join_burst: 100,
                join_refill: Duration::from_secs(1),
            },
        )
        .unwrap();
        (dir, hub)
    }
}

//! The control plane's tokio layer: accepts agents over QUIC, runs the registration handshake,
//! answers requests, and pushes peer maps.
//!
//! Peer maps are pushed by a single flush task: every change marks the agents whose view it
//! alters as dirty, and the task recomputes and sends their maps shortly after, so a burst of
//! joins costs one map per agent rather than one per join.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rally_proto::control::{
    validate_endpoints, validate_name, ErrorReply, PartyInfo, RelayEntry, Request,
};
use rally_proto::identity::{register_transcript, verify, DOMAIN_REGISTER};
use rally_proto::RelayToken;
use rally_proto::{
    frame, ClientMsg, ErrorCode, FrameDecoder, Identity, InviteCode, Key32, PeerInfo, Response,
    ServerMsg, PROTOCOL_VERSION,
};
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use crate::ratelimit::RateLimiter;
use crate::store::{InviteRefusal, NewInvite, PartyRow, Store, StoreError};

/// How long an invite lives when the creator does not say.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long after a change the peer maps are recomputed (changes within it are coalesced).
const FLUSH_DELAY: Duration = Duration::from_millis(20);
/// How long an agent has to finish registering.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of a relay token. Agents renew at two thirds of it; every peer-map push carries a
/// fresh one too.
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
    store: Mutex<Box<dyn Store>>,
    sessions: Mutex<HashMap<Key32, Session>>,
    dirty: Mutex<BTreeSet<Key32>>,
    flush: Notify,
    identity: Identity,
    settings: Settings,
    join_limiter: Mutex<RateLimiter>,
    next_session: AtomicU64,
    registrations: AtomicU64,
    joins_refused: Mutex<BTreeMap<&'static str, u64>>,
}

struct Session {
    id: u64,
    tx: mpsc::UnboundedSender<ServerMsg>,
}

impl Hub {
    pub fn new(store: Box<dyn Store>, identity: Identity, settings: Settings) -> Arc<Self> {
        let join_limiter = RateLimiter::new(settings.join_burst, settings.join_refill);
        Arc::new(Hub {
            store: Mutex::new(store),
            sessions: Mutex::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            flush: Notify::new(),
            identity,
            settings,
            join_limiter: Mutex::new(join_limiter),
            next_session: AtomicU64::new(1),
            registrations: AtomicU64::new(0),
            joins_refused: Mutex::new(BTreeMap::new()),
        })
    }

    /// Accepts connections until the endpoint is closed.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        tokio::spawn(self.clone().flush_loop());
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
        let writer = tokio::spawn(write_frames(send, rx));
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let mut agent = AgentSession {
            hub: &self,
            remote,
            tx: tx.clone(),
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

    fn mark_dirty(&self, ids: impl IntoIterator<Item = Key32>) {
        lock(&self.dirty).extend(ids);
        self.flush.notify_one();
    }

    async fn flush_loop(self: Arc<Self>) {
        loop {
            self.flush.notified().await;
            tokio::time::sleep(FLUSH_DELAY).await;
            let dirty = std::mem::take(&mut *lock(&self.dirty));
            for id in dirty {
                let Some(tx) = lock(&self.sessions).get(&id).map(|s| s.tx.clone()) else {
                    continue;
                };
                match self
                    .peer_map(&id)
                    .and_then(|peers| Ok((peers, self.relays_msg(&id)?)))
                {
                    Ok((peers, relays)) => {
                        let _ = tx.send(relays);
                        let _ = tx.send(ServerMsg::PeerMap { peers });
                    }
                    Err(e) => warn!(peer = %id.short(), "cannot build peer map: {e}"),
                }
            }
        }
    }

    fn peer_map(&self, id: &Key32) -> Result<Vec<PeerInfo>, StoreError> {
        let peers = lock(&self.store).peers_of(id)?;
        Ok(peers
            .into_iter()
            .map(|(a, parties)| PeerInfo {
                peer_id: a.identity,
                name: a.name,
                wg_key: a.wg_key,
                virtual_ip: a.virtual_ip,
                endpoints: a.endpoints,
                parties,
                nat: a.nat.and_then(|j| serde_json::from_str(&j).ok()),
            })
            .collect())
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

    fn peer_ids(&self, id: &Key32) -> Result<Vec<Key32>, StoreError> {
        Ok(lock(&self.store)
            .peers_of(id)?
            .into_iter()
            .map(|(a, _)| a.identity)
            .collect())
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
                let outcome = lock(&self.store)
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
                let mut ids = self.peer_ids(me).map_err(internal)?;
                ids.push(*me);
                self.mark_dirty(ids);
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
                let mut ids = self.peer_ids(me).map_err(internal)?;
                ids.push(*me);
                lock(&self.store).leave_party(p.id, me).map_err(internal)?;
                self.mark_dirty(ids);
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
                lock(&self.store)
                    .set_endpoints(me, &endpoints)
                    .map_err(internal)?;
                self.mark_dirty(self.peer_ids(me).map_err(internal)?);
                Ok(Response::Ok)
            }
            Request::ReportNat { nat } => {
                let json = serde_json::to_string(&nat).map_err(bad_request)?;
                lock(&self.store).set_nat(me, &json).map_err(internal)?;
                self.mark_dirty(self.peer_ids(me).map_err(internal)?);
                Ok(Response::Ok)
            }
            Request::RelayToken => {
                let (token, expires_at) = self.relay_token(me).map_err(internal)?;
                Ok(Response::RelayToken { token, expires_at })
            }
            Request::Punch { peer } => {
                // Both rows come from the peers of `peer`, which proves they share a party.
                let peers_of_peer = lock(&self.store).peers_of(&peer).map_err(internal)?;
                let Some((mine, _)) = peers_of_peer.into_iter().find(|(a, _)| a.identity == *me)
                else {
                    return Err(ErrorReply::new(
                        ErrorCode::NotFound,
                        "no such peer in your parties",
                    ));
                };
                let theirs = lock(&self.store)
                    .peers_of(me)
                    .map_err(internal)?
                    .into_iter()
                    .find(|(a, _)| a.identity == peer)
                    .map(|(a, _)| a.endpoints)
                    .unwrap_or_default();
                let sessions = lock(&self.sessions);
                if let Some(s) = sessions.get(&peer) {
                    let _ = s.tx.send(ServerMsg::Punch {
                        peer: *me,
                        candidates: mine.endpoints,
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
                let row = lock(&self.hub.store)
                    .register_agent(&identity, &name, &wg_key, &endpoints, unix_now())
                    .map_err(|e| match e {
                        StoreError::AddressSpaceFull => {
                            ErrorReply::new(ErrorCode::AddressSpaceFull, e.to_string())
                        }
                        e => internal(e),
                    })?;
                self.stage = Stage::Registered { identity };
                let old = lock(&self.hub.sessions).insert(
                    identity,
                    Session {
                        id: self.session,
                        tx: self.tx.clone(),
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
                let mut ids = self.hub.peer_ids(&identity).map_err(internal)?;
                ids.push(identity);
                self.hub.mark_dirty(ids);
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

async fn write_frames(mut send: quinn::SendStream, mut rx: mpsc::UnboundedReceiver<ServerMsg>) {
    while let Some(msg) = rx.recv().await {
        let last = matches!(msg, ServerMsg::Error(_));
        if send.write_all(&frame::encode(&msg)).await.is_err() {
            return;
        }
        if last {
            break;
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
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

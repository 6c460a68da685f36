//! Requests of a registered agent: parties (create, join, leave, list) and paths (endpoints,
//! NAT report, relay token, peer-map resync, punch).

use std::collections::HashSet;
use std::net::SocketAddr;

use rally_proto::control::{ErrorReply, PartyInfo, Request, MAX_PARTIES_PER_AGENT};
use rally_proto::{ErrorCode, InviteCode, Key32, Response, ServerMsg};
use rand_core::RngCore;
use tracing::info;

use super::{bad_request, internal, Effect, Hub, Now, DEFAULT_INVITE_TTL, PUNCH_START_MS};
use crate::invites::{self, Admission};
use crate::outbox::Change;
use crate::store::{NewInvite, PartyRow, Store};

impl Hub {
    pub(super) fn handle_request(
        &mut self,
        me: &Key32,
        remote: SocketAddr,
        req: Request,
        now: Now,
        rng: &mut dyn RngCore,
        fx: &mut Vec<Effect>,
    ) -> Result<Response, ErrorReply> {
        match req {
            Request::CreateParty {
                name,
                max_uses,
                expires_in_secs,
            } => self.create_party(me, name, max_uses, expires_in_secs, now, rng, fx),
            Request::JoinParty { code } => {
                let result = self.join(me, remote, &code, now, fx);
                if let Err(e) = &result {
                    self.count_refused_join(e.code);
                }
                result
            }
            Request::LeaveParty { party } => self.leave(me, &party, fx),
            Request::ListParties => {
                let parties = self.store.parties_of(me).map_err(internal)?;
                Ok(Response::Parties {
                    parties: parties.into_iter().map(party_info).collect(),
                })
            }
            other => self.handle_paths(me, other, now, fx),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create_party(
        &mut self,
        me: &Key32,
        name: String,
        max_uses: Option<u32>,
        expires_in_secs: Option<u64>,
        now: Now,
        rng: &mut dyn RngCore,
        fx: &mut Vec<Effect>,
    ) -> Result<Response, ErrorReply> {
        if max_uses == Some(0) {
            return Err(bad_request(
                "max_uses must be at least 1 (leave it out for an invite without a use limit)",
            ));
        }
        self.check_party_room(me)?;
        let mut id = [0u8; 8];
        let mut secret = [0u8; 16];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        let ttl = expires_in_secs.unwrap_or(DEFAULT_INVITE_TTL.as_secs());
        let invite = NewInvite {
            secret,
            expires_at: (ttl > 0).then_some(now.unix.saturating_add(ttl)),
            max_uses,
        };
        let party = self
            .store
            .create_party(id, &name, me, invite, now.unix)
            .map_err(internal)?;
        let code = InviteCode {
            control_addr: self.settings.public_addr.clone(),
            control_key: self.identity.public(),
            party_id: id,
            secret,
        };
        info!(peer = %me.short(), party = %name, "party created");
        // The creator's relay token must name the new party.
        if let Some(s) = self.sessions.get_mut(me) {
            s.outbox.handle_parties_changed();
            fx.push(Effect::Wake(s.session));
        }
        Ok(Response::PartyCreated {
            party: party_info(party),
            invite: code.encode(),
        })
    }

    fn join(
        &mut self,
        me: &Key32,
        remote: SocketAddr,
        code: &str,
        now: Now,
        fx: &mut Vec<Effect>,
    ) -> Result<Response, ErrorReply> {
        if let Err(wait) = self.join_limiter.check(remote.ip(), now.mono) {
            return Err(ErrorReply::new(
                ErrorCode::RateLimited,
                format!(
                    "too many join attempts from {}; try again in {} s",
                    remote.ip(),
                    wait.as_secs().max(1)
                ),
            ));
        }
        let control_key = self.identity.public();
        let store = &self.store;
        let (key, admission) =
            invites::check(code, &control_key, now.unix, |k| store.invite(k, me))
                .map_err(internal)?
                .map_err(|r| {
                    info!(peer = %me.short(), %remote, refusal = ?r, "join refused");
                    ErrorReply::from(r)
                })?;
        let mut renamed = None;
        if admission == Admission::UseOne {
            self.check_party_room(me)?;
            // A name another member of the party holds is disambiguated (`laptop-2`).
            let taken = self.store.member_names(&key.party, me);
            if let Some(row) = self.store.agent(me).map_err(internal)? {
                let name = crate::names::pick(&row.name, Some(&row.name), &taken);
                if name != row.name {
                    info!(peer = %me.short(), from = %row.name, to = %name, "renamed: name taken in the party");
                    self.store.rename_agent(me, &name).map_err(internal)?;
                    renamed = Some(name);
                }
            }
        }
        let party = self
            .store
            .admit(&key, me, admission, now.unix)
            .map_err(internal)?;
        info!(peer = %me.short(), party = %party.name, "joined party");
        let peers = self.announce(me, fx);
        self.refresh_own(me, peers, fx);
        Ok(Response::Joined {
            party: party_info(party),
            renamed,
        })
    }

    /// Refuses when `me` is in as many parties as a relay token can name.
    fn check_party_room(&self, me: &Key32) -> Result<(), ErrorReply> {
        if self.store.party_count(me) >= MAX_PARTIES_PER_AGENT {
            return Err(ErrorReply::new(
                ErrorCode::TooManyParties,
                format!("an agent may belong to at most {MAX_PARTIES_PER_AGENT} parties; leave one first"),
            ));
        }
        Ok(())
    }

    fn leave(
        &mut self,
        me: &Key32,
        party: &str,
        fx: &mut Vec<Effect>,
    ) -> Result<Response, ErrorReply> {
        let parties = self.store.parties_of(me).map_err(internal)?;
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
                return Err(bad_request(format!(
                    "several parties are named {party:?}; give the party id"
                )))
            }
        };
        let before = self.store.peer_ids(me);
        self.store.leave_party(p.id, me).map_err(internal)?;
        let peers = self.announce(me, fx);
        // Peers that no longer share any party with `me` lose it.
        let still: HashSet<Key32> = peers.iter().map(|q| q.peer_id).collect();
        for id in &before {
            if still.contains(id) {
                continue;
            }
            if let Some(s) = self.sessions.get_mut(id) {
                s.outbox.handle_change(Change::Remove(*me));
                fx.push(Effect::Wake(s.session));
            }
        }
        self.refresh_own(me, peers, fx);
        info!(peer = %me.short(), party = %p.name, "left party");
        Ok(Response::Left {
            party: party_info(PartyRow {
                members: p.members.saturating_sub(1),
                ..p
            }),
        })
    }

    /// Endpoint, NAT, relay-token, resync and punch requests.
    fn handle_paths(
        &mut self,
        me: &Key32,
        req: Request,
        now: Now,
        fx: &mut Vec<Effect>,
    ) -> Result<Response, ErrorReply> {
        match req {
            Request::UpdateEndpoints { endpoints } => {
                self.store.set_endpoints(me, &endpoints).map_err(internal)?;
                self.announce(me, fx);
                Ok(Response::Ok)
            }
            Request::ReportNat { nat } => {
                let json = serde_json::to_string(&nat).map_err(bad_request)?;
                self.store.set_nat(me, &json).map_err(internal)?;
                self.announce(me, fx);
                Ok(Response::Ok)
            }
            Request::RelayToken => match self.relay_token(me, now)? {
                Some((token, expires_at)) => Ok(Response::RelayToken { token, expires_at }),
                None => Err(ErrorReply::new(
                    ErrorCode::NotFound,
                    "no relay token for an agent in no party: create or join one first",
                )),
            },
            Request::SyncPeers => {
                if let Some(s) = self.sessions.get_mut(me) {
                    s.outbox.handle_resync();
                    fx.push(Effect::Wake(s.session));
                }
                Ok(Response::Ok)
            }
            Request::Punch { peer } => self.punch(me, peer, now, fx),
            Request::CreateParty { .. }
            | Request::JoinParty { .. }
            | Request::LeaveParty { .. }
            | Request::ListParties => {
                Err(ErrorReply::new(ErrorCode::Internal, "misrouted request"))
            }
        }
    }

    /// Tells `me` and `peer` to punch towards each other (rate limited per agent).
    fn punch(
        &mut self,
        me: &Key32,
        peer: Key32,
        now: Now,
        fx: &mut Vec<Effect>,
    ) -> Result<Response, ErrorReply> {
        if let Err(wait) = self.punch_limiter.check(*me, now.mono) {
            self.counters.punches_limited += 1;
            return Err(ErrorReply::new(
                ErrorCode::RateLimited,
                format!(
                    "too many punch requests; try again in {} ms",
                    wait.as_millis().max(1)
                ),
            ));
        }
        if !self.store.share_party(me, &peer) {
            return Err(ErrorReply::new(
                ErrorCode::NotFound,
                "no such peer in your parties",
            ));
        }
        let endpoints = |id: &Key32| -> Result<Vec<SocketAddr>, ErrorReply> {
            Ok(self
                .store
                .agent(id)
                .map_err(internal)?
                .map(|a| a.endpoints)
                .unwrap_or_default())
        };
        let (mine, theirs) = (endpoints(me)?, endpoints(&peer)?);
        if let Some(s) = self.sessions.get(&peer) {
            fx.push(Effect::Deliver {
                session: s.session,
                msg: ServerMsg::Punch {
                    peer: *me,
                    candidates: mine,
                    start_in_ms: PUNCH_START_MS,
                },
            });
        }
        if let Some(s) = self.sessions.get(me) {
            fx.push(Effect::Deliver {
                session: s.session,
                msg: ServerMsg::Punch {
                    peer,
                    candidates: theirs,
                    start_in_ms: PUNCH_START_MS,
                },
            });
        }
        Ok(Response::Ok)
    }
}

fn party_info(p: PartyRow) -> PartyInfo {
    PartyInfo {
        id: hex::encode(p.id),
        name: p.name,
        owner: p.owner,
        members: p.members,
    }
}

//! Binding: the challenge, the signed bind, admission under the session limits, refusals.

use super::*;

impl Relay {
    pub(super) fn refuse_outdated(&mut self, via: Via, src: SocketAddr, now: Instant) -> Action {
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

    pub(super) fn handle_bind_request(
        &mut self,
        via: Via,
        src: SocketAddr,
        now: Instant,
    ) -> Action {
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
    pub(super) fn handle_bind(
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
        // Over TCP the connection's channel binding is a cookie too (the TLS peer knows it:
        // comparing it in variable time tells nobody anything new).
        let bound_to_channel =
            via == Via::Tcp && self.tcp_bindings.get(&src).is_some_and(|b| b == cookie);
        if bound_to_channel {
            tracing::debug!(%src, "bind with the connection's channel binding");
        } else if !self.cookies.check(cookie, src, self.bucket(now)) {
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

    /// Creates or moves the session for `token.agent` to `src`, within the limits. Over UDP
    /// an agent holds one session (a bind from elsewhere moves it); over TCP up to
    /// [`MAX_TCP_SESSIONS`], one per connection: a bind on a connection that holds the agent's
    /// session renews it, a bind on another connection adds one and, beyond the cap, evicts
    /// the oldest.
    pub(super) fn admit(
        &mut self,
        via: Via,
        src: SocketAddr,
        ip: IpKey,
        token: RelayToken,
        key: [u8; 32],
        now: Instant,
    ) -> Result<(), DropReason> {
        let id = short_id(&token.agent);
        let transport = via.transport();
        let taken = Transport::ALL
            .iter()
            .filter_map(|t| self.by_id.get(&(id, *t)))
            .chain(self.tcp_spare.get(&id))
            .filter_map(|&slot| self.slots.get(slot))
            .any(|s| s.agent != token.agent);
        if taken {
            return Err(DropReason::ShortIdTaken);
        }
        let newest = self.by_id.get(&(id, transport)).copied();
        let spare = self.tcp_spare.get(&id).copied();
        let at_src = self.by_addr.get(&(transport, src)).copied();
        // The agent's session this bind replaces, if any: over UDP its one session; over TCP
        // the one on this connection, or the oldest when it holds as many as it may.
        let own = match transport {
            Transport::Udp => newest,
            Transport::Tcp if at_src.is_some() && (at_src == newest || at_src == spare) => at_src,
            Transport::Tcp if newest.is_some() && spare.is_some() => spare,
            Transport::Tcp => None,
        };
        let renewed = own.is_some() && own == at_src;
        let existing = own.and_then(|slot| self.slots.get(slot)).map(|s| s.ip);
        // Another agent's session at this very address is replaced: one address, one session.
        let displaced = at_src.filter(|other| Some(*other) != own);

        let removed = usize::from(existing.is_some()) + usize::from(displaced.is_some());
        if self.session_count() + 1 - removed > self.config.limits.max_sessions {
            return Err(DropReason::LimitSessions);
        }
        let removed_here = usize::from(existing == Some(ip)) + usize::from(displaced.is_some());
        let here = self.per_ip.get(&ip).copied().unwrap_or(0);
        if here + 1 - removed_here > self.config.limits.max_sessions_per_ip {
            return Err(DropReason::LimitPerIp);
        }

        if let Some(other) = displaced {
            if let Some(s) = self.remove_slot(other) {
                tracing::info!(agent = %s.agent.short(), addr = %s.addr, "session replaced by another agent at its address");
            }
        }
        // A renewed session keeps its place (newer or older); a new TCP session is the newer.
        let as_spare = transport == Transport::Tcp && renewed && own == spare;
        let (max_pps, max_bps) = (self.config.limits.max_pps, self.config.limits.max_bps);
        let (pps, bps) = match own.and_then(|slot| self.remove_slot(slot)) {
            Some(old) => {
                if old.addr != src {
                    let why = if transport == Transport::Tcp {
                        "oldest tcp session evicted"
                    } else {
                        "session moved"
                    };
                    tracing::info!(agent = %old.agent.short(), from = %old.addr, to = %src, "{why}");
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
        self.by_addr.insert((transport, src), slot);
        if as_spare {
            self.tcp_spare.insert(id, slot);
        } else {
            if let Some(older) = self.by_id.insert((id, transport), slot) {
                // Still the agent's (it was not replaced): it is the older one now.
                if transport == Transport::Tcp && self.slots.get(older).is_some() {
                    self.tcp_spare.insert(id, older);
                }
            }
        }
        self.stats.sessions_total += 1;
        Ok(())
    }

    pub(super) fn refuse_bind(
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
}

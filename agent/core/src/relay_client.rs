//! Binding at one relay (sans-IO): challenge, signed bind with the control plane's token,
//! keepalive pings that also measure latency, and re-binding when the relay forgets us or the
//! token changes.
//!
//! What the relay says about our session is believed only when sealed with the key of our bind
//! ([`rally_proto::relay::session_key`]); anything else is counted and ignored, except an
//! unsealed `NotBound` (a relay that restarted has no key to seal it with), which only makes us
//! bind again while keeping the binding we have — at most once per [`HINT_REBIND`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rally_proto::relay::{bind_transcript, session_key, RelayErrorCode, RelayMsg, DOMAIN_BIND};
use rally_proto::Identity;

use crate::conn::RelayId;

/// Time between bind attempts while unbound.
const BIND_RETRY: Duration = Duration::from_secs(1);
/// Time between pings while bound (keeps the relay session and the NAT mapping open).
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// Pings without a pong before the binding counts as lost.
const PINGS_LOST: u32 = 3;
/// Weight of a new RTT sample in the latency average.
const EWMA: f64 = 0.3;
/// Least time between re-binds prompted by an unsealed `NotBound`.
const HINT_REBIND: Duration = Duration::from_secs(1);
/// Keys of the binds in flight that a `BindOk` may answer (the cookie changes every 30 s).
const PENDING_KEYS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unbound,
    Challenged,
    Bound,
}

/// What changed at this relay.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayEvent {
    /// Bound, or bound again with a new token (which may name new parties).
    Bound {
        observed: SocketAddr,
    },
    Lost {
        reason: String,
    },
}

pub struct RelayClient {
    pub name: RelayId,
    pub addr: SocketAddr,
    identity: Arc<Identity>,
    token: Option<Vec<u8>>,
    state: State,
    next_bind: Instant,
    next_ping: Instant,
    ping: Option<(u64, Instant)>,
    unanswered: u32,
    nonce: u64,
    latency: Option<Duration>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<RelayEvent>,
    /// The session's key once bound; the keys of the binds sent since, newest last.
    key: Option<[u8; 32]>,
    pending_keys: VecDeque<[u8; 32]>,
    next_hint_rebind: Instant,
    unauthenticated: u64,
}

impl RelayClient {
    pub fn new(name: RelayId, addr: SocketAddr, identity: Arc<Identity>, now: Instant) -> Self {
        RelayClient {
            name,
            addr,
            identity,
            token: None,
            state: State::Unbound,
            next_bind: now,
            next_ping: now + PING_INTERVAL,
            ping: None,
            unanswered: 0,
            nonce: 0,
            latency: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            key: None,
            pending_keys: VecDeque::new(),
            next_hint_rebind: now,
            unauthenticated: 0,
        }
    }

    /// Messages from the relay's address that were not sealed with our key (ignored).
    pub fn unauthenticated(&self) -> u64 {
        self.unauthenticated
    }

    pub fn is_bound(&self) -> bool {
        self.state == State::Bound
    }

    /// Smoothed round-trip time to the relay, once measured.
    pub fn latency(&self) -> Option<Duration> {
        self.latency
    }

    /// A new token: bind again with it at once (the relay replaces our session).
    /// An empty token (an agent in no party gets none) means none: nothing to bind with, so
    /// no bind requests the relay would only refuse.
    pub fn set_token(&mut self, token: Vec<u8>, now: Instant) {
        if self.token.as_ref() == Some(&token) {
            return;
        }
        if token.is_empty() {
            self.token = None;
            return;
        }
        self.token = Some(token);
        self.transmits.push_back(RelayMsg::BindRequest.to_vec());
        if self.state != State::Bound {
            self.state = State::Challenged;
        }
        self.next_bind = now + BIND_RETRY;
    }

    /// A relay message that came from this relay (data messages are the caller's).
    pub fn handle_msg(&mut self, msg: &RelayMsg<'_>, now: Instant) {
        match msg {
            RelayMsg::BindChallenge { cookie } => {
                let Some(token) = &self.token else { return };
                let signature = self
                    .identity
                    .sign(DOMAIN_BIND, &bind_transcript(cookie, token));
                let key = session_key(cookie, &signature);
                if !self.pending_keys.contains(&key) {
                    self.pending_keys.push_back(key);
                    while self.pending_keys.len() > PENDING_KEYS {
                        self.pending_keys.pop_front();
                    }
                }
                self.transmits.push_back(
                    RelayMsg::Bind {
                        cookie: *cookie,
                        signature,
                        token,
                    }
                    .to_vec(),
                );
            }
            RelayMsg::BindOk { observed, .. } => {
                let Some(key) = self.pending_keys.iter().find(|k| msg.is_sealed_by(k)) else {
                    self.unauthenticated += 1;
                    return;
                };
                self.key = Some(*key);
                self.state = State::Bound;
                self.unanswered = 0;
                self.next_ping = now;
                self.events.push_back(RelayEvent::Bound {
                    observed: *observed,
                });
            }
            RelayMsg::Pong { nonce, .. } => {
                if !self.key.is_some_and(|k| msg.is_sealed_by(&k)) {
                    self.unauthenticated += 1;
                    return;
                }
                if let Some((n, sent)) = self.ping {
                    if n == *nonce {
                        let rtt = now.saturating_duration_since(sent);
                        self.latency = Some(match self.latency {
                            Some(l) => l.mul_f64(1.0 - EWMA) + rtt.mul_f64(EWMA),
                            None => rtt,
                        });
                        self.ping = None;
                        self.unanswered = 0;
                    }
                }
            }
            RelayMsg::Error { code, .. } => {
                if !self.is_sealed(msg) {
                    self.unauthenticated += 1;
                    self.hint(*code, now);
                    return;
                }
                match code {
                    RelayErrorCode::PeerUnavailable | RelayErrorCode::LimitReached
                        if self.state == State::Bound => {}
                    code => self.lose(format!("relay said {}", code.as_str()), now),
                }
            }
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Unbound | State::Challenged if now >= self.next_bind => {
                if self.token.is_some() {
                    self.transmits.push_back(RelayMsg::BindRequest.to_vec());
                    self.state = State::Challenged;
                }
                self.next_bind = now + BIND_RETRY;
            }
            State::Bound if now >= self.next_ping => {
                if self.ping.is_some() {
                    self.unanswered += 1;
                    if self.unanswered >= PINGS_LOST {
                        self.lose("relay stopped answering".into(), now);
                        return;
                    }
                }
                self.nonce = self.nonce.wrapping_add(1);
                self.ping = Some((self.nonce, now));
                self.transmits
                    .push_back(RelayMsg::Ping { nonce: self.nonce }.to_vec());
                self.next_ping = now + PING_INTERVAL;
            }
            _ => {}
        }
    }

    /// Measures latency now (used by netcheck and relay selection).
    pub fn ping_now(&mut self, now: Instant) {
        if self.state == State::Bound {
            self.next_ping = now;
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        crate::outputs::pop(&mut self.transmits)
    }

    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        crate::outputs::pop(&mut self.events)
    }

    pub fn poll_timeout(&self) -> Instant {
        match self.state {
            State::Bound => self.next_ping,
            _ => self.next_bind,
        }
    }

    /// Whether `msg` is sealed with our session's key or a pending bind's.
    fn is_sealed(&self, msg: &RelayMsg<'_>) -> bool {
        self.key
            .iter()
            .chain(self.pending_keys.iter())
            .any(|k| msg.is_sealed_by(k))
    }

    /// An unsealed error: a bound client that hears `NotBound` binds again (keeping its
    /// binding until the relay answers), at most once per [`HINT_REBIND`]; nothing else moves.
    fn hint(&mut self, code: RelayErrorCode, now: Instant) {
        if code != RelayErrorCode::NotBound || self.state != State::Bound || self.token.is_none() {
            return;
        }
        if now < self.next_hint_rebind {
            return;
        }
        self.next_hint_rebind = now + HINT_REBIND;
        self.transmits.push_back(RelayMsg::BindRequest.to_vec());
    }

    fn lose(&mut self, reason: String, now: Instant) {
        if self.state == State::Bound {
            self.events.push_back(RelayEvent::Lost { reason });
        }
        self.state = State::Unbound;
        self.ping = None;
        self.unanswered = 0;
        self.next_bind = now;
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests {
    use super::*;
    use rally_proto::relay::TAG_LEN;

    fn client(now: Instant) -> RelayClient {
        RelayClient::new(
            "r1".into(),
            "198.51.100.5:3478".parse().unwrap(),
            Arc::new(Identity::from_seed([1; 32])),
            now,
        )
    }

    fn drain(c: &mut RelayClient) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    fn bind_ok() -> RelayMsg<'static> {
        RelayMsg::BindOk {
            observed: "203.0.113.1:1".parse().unwrap(),
            expires_at: 0,
            tag: [0; TAG_LEN],
        }
    }

    /// Plays the relay's side of a bind (challenge with `cookie`, sealed `BindOk`) and returns
    /// the session key.
    fn bind(c: &mut RelayClient, cookie: [u8; 32], now: Instant) -> [u8; 32] {
        c.set_token(vec![9; 120], now);
        drain(c);
        c.handle_msg(&RelayMsg::BindChallenge { cookie }, now);
        let out = drain(c);
        let Some(Ok(RelayMsg::Bind { signature, .. })) =
            out.iter().map(|b| RelayMsg::decode(b)).next_back()
        else {
            panic!("expected a bind")
        };
        let key = session_key(&cookie, &signature);
        deliver(c, &bind_ok().sealed(&key), now);
        assert!(c.is_bound());
        assert!(matches!(c.poll_event(), Some(RelayEvent::Bound { .. })));
        drain(c);
        key
    }

    fn deliver(c: &mut RelayClient, bytes: &[u8], now: Instant) {
        let msg = RelayMsg::decode(bytes).expect("a relay message");
        c.handle_msg(&msg, now);
    }

    #[test]
    fn binds_with_a_signed_token_after_the_challenge() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.handle_timeout(t0);
        assert!(drain(&mut c).is_empty(), "no token, no bind");
        c.set_token(vec![9; 120], t0);
        assert_eq!(drain(&mut c), vec![RelayMsg::BindRequest.to_vec()]);
        c.handle_msg(&RelayMsg::BindChallenge { cookie: [5; 32] }, t0);
        let out = drain(&mut c);
        let Ok(RelayMsg::Bind {
            cookie,
            signature,
            token,
        }) = RelayMsg::decode(&out[0])
        else {
            panic!("expected a bind")
        };
        assert_eq!(cookie, [5; 32]);
        assert_eq!(token, &[9; 120][..]);
        let key = Identity::from_seed([1; 32]).public();
        assert!(rally_proto::identity::verify(
            &key,
            DOMAIN_BIND,
            &bind_transcript(&cookie, token),
            &signature
        )
        .is_ok());
        deliver(
            &mut c,
            &bind_ok().sealed(&session_key(&cookie, &signature)),
            t0,
        );
        assert!(c.is_bound());
        assert!(matches!(c.poll_event(), Some(RelayEvent::Bound { .. })));
    }

    #[test]
    fn an_unsealed_or_wrongly_sealed_bind_ok_is_ignored() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.set_token(vec![9; 120], t0);
        c.handle_msg(&RelayMsg::BindChallenge { cookie: [5; 32] }, t0);
        deliver(&mut c, &bind_ok().to_vec(), t0);
        deliver(&mut c, &bind_ok().sealed(&[7; 32]), t0);
        assert!(!c.is_bound());
        assert_eq!(c.poll_event(), None);
        assert_eq!(c.unauthenticated(), 2);
    }

    #[test]
    fn spoofed_errors_never_lose_the_binding() {
        let t0 = Instant::now();
        let mut c = client(t0);
        let key = bind(&mut c, [5; 32], t0);
        // Every error code, unsealed or sealed with another key, from the relay's address.
        let codes = [
            RelayErrorCode::NotBound,
            RelayErrorCode::BadToken,
            RelayErrorCode::TokenExpired,
            RelayErrorCode::BadSignature,
            RelayErrorCode::BadCookie,
            RelayErrorCode::LimitReached,
            RelayErrorCode::Outdated,
        ];
        for code in codes {
            let e = RelayMsg::Error { code, tag: None };
            deliver(&mut c, &e.to_vec(), t0);
            deliver(&mut c, &e.sealed(&[3; 32]), t0);
        }
        assert!(c.is_bound());
        assert_eq!(c.poll_event(), None, "no binding lost");
        assert_eq!(c.unauthenticated(), 2 * codes.len() as u64);
        // An unsealed NotBound is a hint: one re-bind (the binding stays), then no more for a
        // second however many arrive.
        assert_eq!(drain(&mut c), vec![RelayMsg::BindRequest.to_vec()]);
        for _ in 0..10 {
            deliver(
                &mut c,
                &RelayMsg::Error {
                    code: RelayErrorCode::NotBound,
                    tag: None,
                }
                .to_vec(),
                t0,
            );
        }
        assert!(drain(&mut c).is_empty());
        // The real relay's sealed error still counts.
        let real = RelayMsg::Error {
            code: RelayErrorCode::TokenExpired,
            tag: None,
        };
        deliver(&mut c, &real.sealed(&key), t0);
        assert!(!c.is_bound());
        assert!(matches!(c.poll_event(), Some(RelayEvent::Lost { .. })));
    }

    #[test]
    fn only_a_sealed_pong_sets_latency() {
        let t0 = Instant::now();
        let mut c = client(t0);
        let key = bind(&mut c, [5; 32], t0);
        c.handle_timeout(t0);
        let ping = drain(&mut c).pop().unwrap();
        let Ok(RelayMsg::Ping { nonce }) = RelayMsg::decode(&ping) else {
            panic!()
        };
        let pong = RelayMsg::Pong {
            nonce,
            tag: [0; TAG_LEN],
        };
        deliver(&mut c, &pong.to_vec(), t0 + Duration::from_millis(5));
        assert_eq!(c.latency(), None, "a forged pong measures nothing");
        deliver(&mut c, &pong.sealed(&key), t0 + Duration::from_millis(40));
        assert_eq!(c.latency(), Some(Duration::from_millis(40)));
    }

    #[test]
    fn unanswered_pings_lose_the_binding_and_rebind() {
        let t0 = Instant::now();
        let mut c = client(t0);
        bind(&mut c, [5; 32], t0);
        let mut t = t0;
        for _ in 0..=PINGS_LOST {
            c.handle_timeout(t);
            t = c.poll_timeout();
        }
        assert!(!c.is_bound());
        assert!(matches!(c.poll_event(), Some(RelayEvent::Lost { .. })));
        c.handle_timeout(t);
        assert!(drain(&mut c).contains(&RelayMsg::BindRequest.to_vec()));
    }

    #[test]
    fn a_sealed_not_bound_error_rebinds() {
        let t0 = Instant::now();
        let mut c = client(t0);
        let key = bind(&mut c, [5; 32], t0);
        let e = RelayMsg::Error {
            code: RelayErrorCode::NotBound,
            tag: None,
        };
        deliver(&mut c, &e.sealed(&key), t0);
        assert!(!c.is_bound());
        c.handle_timeout(t0);
        assert!(drain(&mut c).contains(&RelayMsg::BindRequest.to_vec()));
    }

    #[test]
    fn an_empty_token_sends_no_bind_requests() {
        let t0 = Instant::now();
        let mut c = client(t0);
        c.set_token(Vec::new(), t0);
        c.handle_timeout(t0 + Duration::from_secs(60));
        assert_eq!(c.poll_transmit(), None);
        assert_eq!(c.poll_timeout(), t0 + Duration::from_secs(60) + BIND_RETRY);
    }
}

//! Scenario tests of the relay core on a fake clock.

mod bind;
mod drops;
mod forwarding;
mod limits;
mod stun;
mod tcp;
mod tcp_pair;

use super::*;
use proptest::prelude::*;
use rally_proto::relay::{RelayErrorCode, RelayMsg};
use rally_proto::stun::{BindingRequest, BindingResponse};
use rally_proto::Identity;

const PARTY_X: [u8; 8] = *b"party-x!";
const PARTY_Y: [u8; 8] = *b"party-y!";

// --- helpers --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Bind {
        agent: usize,
        addr: usize,
    },
    Send {
        from: usize,
        to: usize,
        payload: Vec<u8>,
    },
    Advance(u64),
    Raw {
        from: usize,
        bytes: Vec<u8>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6usize, 0..5usize).prop_map(|(agent, addr)| Op::Bind { agent, addr }),
        6 => (0..5usize, 0..6usize, proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(from, to, payload)| Op::Send { from, to, payload }),
        1 => (0..15u64).prop_map(Op::Advance),
        1 => (0..5usize, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(from, bytes)| Op::Raw { from, bytes }),
    ]
}

const UNIX_START: u64 = 1_700_000_000;

/// A relay, a control-plane key and a fake clock.
struct Lab {
    relay: Relay,
    control: Identity,
    start: Instant,
    now: Instant,
    unix: u64,
}

impl Lab {
    fn new() -> Self {
        Self::with_config(|_| {})
    }

    fn with_limits(limits: Limits) -> Self {
        Self::with_config(|c| c.limits = limits)
    }

    fn with_alt() -> Self {
        Self::with_config(|c| c.alt = Some(addr("198.51.100.1:3479")))
    }

    fn with_config(f: impl FnOnce(&mut Config)) -> Self {
        let control = Identity::from_seed([200; 32]);
        let mut config = Config::new(control.public(), addr("198.51.100.1:3478"));
        f(&mut config);
        let start = clock_origin();
        Lab {
            relay: Relay::new(config, [42; 32], start),
            control,
            start,
            now: start,
            unix: UNIX_START,
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.unix = UNIX_START + (self.now - self.start).as_secs();
    }

    fn recv(&mut self, src: SocketAddr, datagram: &[u8]) -> (Action, Vec<u8>) {
        self.recv_via(Via::Primary, src, datagram)
    }

    fn recv_via(&mut self, via: Via, src: SocketAddr, datagram: &[u8]) -> (Action, Vec<u8>) {
        let mut buf = datagram.to_vec();
        let action = self
            .relay
            .handle_datagram(via, src, &mut buf, self.now, self.unix);
        (action, buf)
    }

    fn token(&self, agent: &Identity, parties: &[[u8; 8]]) -> Vec<u8> {
        self.token_until(agent, parties, self.unix + 3600)
    }

    fn token_until(&self, agent: &Identity, parties: &[[u8; 8]], expires_at: u64) -> Vec<u8> {
        RelayToken {
            agent: agent.public(),
            expires_at,
            parties: parties.to_vec(),
        }
        .sign(&self.control)
    }

    fn challenge(&mut self, src: SocketAddr) -> [u8; 32] {
        match self.recv(src, &RelayMsg::BindRequest.to_vec()).0 {
            Action::Reply(t) => match RelayMsg::decode(&t.payload) {
                Ok(RelayMsg::BindChallenge { cookie }) => cookie,
                other => panic!("not a challenge: {other:?}"),
            },
            other => panic!("no challenge: {other:?}"),
        }
    }

    fn bind_with(
        &mut self,
        src: SocketAddr,
        cookie: &[u8; 32],
        signer: &Identity,
        token: &[u8],
    ) -> Action {
        self.recv(src, &bind_msg(signer, cookie, token)).0
    }

    fn try_bind(&mut self, agent: &Identity, src: SocketAddr, parties: &[[u8; 8]]) -> Action {
        let cookie = self.challenge(src);
        let token = self.token(agent, parties);
        self.bind_with(src, &cookie, agent, &token)
    }

    fn bind(&mut self, agent: &Identity, src: SocketAddr, parties: &[[u8; 8]]) {
        let action = self.try_bind(agent, src, parties);
        let Action::Reply(t) = &action else {
            panic!("bind refused: {action:?}")
        };
        assert!(
            matches!(RelayMsg::decode(&t.payload), Ok(RelayMsg::BindOk { observed, .. }) if observed == src),
            "{action:?}"
        );
    }
}

#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
fn clock_origin() -> Instant {
    Instant::now()
}

fn agent(n: u8) -> Identity {
    Identity::from_seed([n; 32])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

fn bind_msg(signer: &Identity, cookie: &[u8; 32], token: &[u8]) -> Vec<u8> {
    RelayMsg::Bind {
        cookie: *cookie,
        signature: signer.sign(DOMAIN_BIND, &bind_transcript(cookie, token)),
        token,
    }
    .to_vec()
}

/// The session key the agent derives for this bind.
fn key_of(signer: &Identity, cookie: &[u8; 32], token: &[u8]) -> [u8; 32] {
    let signature = signer.sign(DOMAIN_BIND, &bind_transcript(cookie, token));
    rally_proto::relay::session_key(cookie, &signature)
}

fn send_to(to: &Identity, payload: &[u8]) -> Vec<u8> {
    RelayMsg::Send {
        to: short_id(&to.public()),
        payload,
    }
    .to_vec()
}

fn ping(nonce: u64) -> Vec<u8> {
    RelayMsg::Ping { nonce }.to_vec()
}

fn error_code(t: &Transmit) -> Option<RelayErrorCode> {
    match RelayMsg::decode(&t.payload) {
        Ok(RelayMsg::Error { code, .. }) => Some(code),
        _ => None,
    }
}

#[track_caller]
fn assert_refused(action: &Action, reason: DropReason, code: RelayErrorCode) {
    let Action::Drop {
        reason: got,
        reply: Some(reply),
    } = action
    else {
        panic!("expected a refusal with an error reply, got {action:?}")
    };
    assert_eq!(*got, reason);
    assert_eq!(error_code(reply), Some(code));
}

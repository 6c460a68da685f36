//! The hub driven without a network: messages in, effects out, on a fake clock and a seeded RNG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use rally_proto::control::{NatReport, RelayLatency, MAX_NAT_RELAYS, MAX_PARTIES_PER_AGENT};
use rally_proto::{InviteCode, MapPages, Overlay, PeerChange, PeerView, Request, Response, Sig64};
use rand::SeedableRng;

use super::*;
use crate::store::SqliteStore;

mod limits;
mod map;

/// The largest NAT report the bounds allow.
fn max_nat() -> NatReport {
    NatReport {
        udp: true,
        public_endpoint: Some("203.0.113.1:51820".parse().unwrap()),
        relays: (0..MAX_NAT_RELAYS)
            .map(|i| RelayLatency {
                name: format!("{i:0>64}"),
                addr: format!("{}:3478", "r".repeat(250)),
                latency_ms: Some(12.5),
            })
            .collect(),
        ..NatReport::default()
    }
}

/// A registered agent as the test drives it.
#[derive(Debug)]
struct Agent {
    session: Session,
    id: Key32,
    next_id: u64,
}

struct TestHub {
    _dir: tempfile::TempDir,
    hub: Hub,
    now: Now,
    rng: rand::rngs::StdRng,
    /// Messages delivered to each session by other sessions' effects.
    delivered: HashMap<SessionId, Vec<ServerMsg>>,
    next_session: SessionId,
}

impl TestHub {
    #[allow(clippy::disallowed_methods)] // an arbitrary start for the fake clock
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db"), Overlay::default()).unwrap();
        let hub = Hub::new(
            Box::new(store),
            Identity::from_seed([99; 32]),
            Settings {
                join_burst: 1000,
                ..Settings::new("192.0.2.1:7443".into(), vec![])
            },
        )
        .unwrap();
        TestHub {
            _dir: dir,
            hub,
            now: Now {
                mono: Instant::now(),
                unix: 1_000_000,
            },
            rng: rand::rngs::StdRng::seed_from_u64(7),
            delivered: HashMap::new(),
            next_session: 1,
        }
    }

    fn register(&mut self, seed: u8) -> Agent {
        self.try_register(seed, &format!("a{seed}"), [seed; 32], vec![])
            .unwrap()
    }

    /// Agent `n` (any number): identity and WireGuard key from `n`.
    fn register_n(&mut self, n: u32) -> Agent {
        let mut wg = [0u8; 32];
        wg[..4].copy_from_slice(&n.to_be_bytes());
        wg[31] = 0xee;
        self.try_register_n(n, wg).unwrap()
    }

    fn try_register_n(&mut self, n: u32, wg: [u8; 32]) -> Result<Agent, ErrorReply> {
        let mut seed = [1u8; 32];
        seed[..4].copy_from_slice(&n.to_be_bytes());
        self.register_with(Identity::from_seed(seed), &format!("n{n}"), wg, vec![])
            .map(|(a, _)| a)
    }

    fn try_register(
        &mut self,
        seed: u8,
        name: &str,
        wg: [u8; 32],
        endpoints: Vec<SocketAddr>,
    ) -> Result<Agent, ErrorReply> {
        self.register_with(Identity::from_seed([seed; 32]), name, wg, endpoints)
            .map(|(a, _)| a)
    }

    fn register_named(
        &mut self,
        seed: u8,
        name: &str,
        wg: [u8; 32],
    ) -> Result<(Agent, String), ErrorReply> {
        self.register_with(Identity::from_seed([seed; 32]), name, wg, vec![])
    }

    /// Hello, challenge, signed registration, all from 192.0.2.1; the name the hub gave.
    fn register_with(
        &mut self,
        identity: Identity,
        name: &str,
        wg: [u8; 32],
        endpoints: Vec<SocketAddr>,
    ) -> Result<(Agent, String), ErrorReply> {
        let id = identity.public();
        let sid = self.next_session;
        self.next_session += 1;
        let mut session = Session::new(sid, SocketAddr::from(([192, 0, 2, 1], 5000)));
        let fx = self.hub.handle(
            &mut session,
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                identity: id,
            },
            self.now,
            &mut self.rng,
        );
        let [Effect::Reply(ServerMsg::Challenge { nonce })] = fx[..] else {
            panic!("no challenge: {fx:?}");
        };
        let wg_key = Key32(wg);
        let transcript = register_transcript(&nonce, &id, &wg_key, name);
        let fx = self.hub.handle(
            &mut session,
            ClientMsg::Register {
                signature: Sig64(identity.sign(DOMAIN_REGISTER, &transcript)),
                name: name.into(),
                wg_key,
                endpoints,
            },
            self.now,
            &mut self.rng,
        );
        let mut given = None;
        for e in self.route(fx) {
            match e {
                ServerMsg::Registered { name, .. } => given = Some(name),
                ServerMsg::Error(e) => return Err(e),
                other => panic!("{other:?}"),
            }
        }
        let agent = Agent {
            session,
            id,
            next_id: 1,
        };
        Ok((agent, given.expect("registered")))
    }

    /// Performs effects as the driver would; returns what the calling session got.
    fn route(&mut self, fx: Vec<Effect>) -> Vec<ServerMsg> {
        let mut own = Vec::new();
        for e in fx {
            match e {
                Effect::Reply(m) => own.push(m),
                Effect::Close(e) => own.push(ServerMsg::Error(e)),
                Effect::Deliver { session, msg } => {
                    self.delivered.entry(session).or_default().push(msg)
                }
                Effect::Wake(_) => {}
            }
        }
        own
    }

    fn request(&mut self, a: &mut Agent, body: Request) -> Result<Response, ErrorReply> {
        let id = a.next_id;
        a.next_id += 1;
        let fx = self.hub.handle(
            &mut a.session,
            ClientMsg::Request { id, body },
            self.now,
            &mut self.rng,
        );
        match &self.route(fx)[..] {
            [ServerMsg::Response { id: got, result }] if *got == id => result.clone(),
            other => panic!("no answer: {other:?}"),
        }
    }

    fn ok(&mut self, a: &mut Agent, body: Request) -> Response {
        self.request(a, body).expect("request accepted")
    }

    fn refused(&mut self, a: &mut Agent, body: Request) -> ErrorReply {
        self.request(a, body).expect_err("request refused")
    }

    fn create_party(&mut self, a: &mut Agent, name: &str) -> String {
        match self.ok(
            a,
            Request::CreateParty {
                name: name.into(),
                max_uses: None,
                expires_in_secs: None,
            },
        ) {
            Response::PartyCreated { invite, .. } => invite,
            other => panic!("{other:?}"),
        }
    }

    /// Agents 1 (the owner) and 2 in a new party "lan", every push so far drained.
    fn owner_and_member(&mut self) -> (Agent, Agent) {
        let mut owner = self.register(1);
        let code = self.create_party(&mut owner, "lan");
        let mut member = self.register(2);
        self.join(&mut member, &code);
        self.drain(&owner);
        self.drain(&member);
        (owner, member)
    }

    /// Joins with `code`; the name the join gave the agent, if it changed it.
    fn join(&mut self, a: &mut Agent, code: &str) -> Option<String> {
        match self.ok(a, Request::JoinParty { code: code.into() }) {
            Response::Joined { renamed, .. } => renamed,
            r => panic!("not joined: {r:?}"),
        }
    }

    /// Every frame the writer would push now (as after the flush delay).
    fn frames(&mut self, a: &Agent) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let frames = self.hub.poll_pushes(&a.session, self.now);
            if frames.is_empty() {
                return out;
            }
            out.extend(frames);
        }
    }

    fn drain(&mut self, a: &Agent) -> Vec<ServerMsg> {
        self.frames(a)
            .iter()
            .map(|f| frame::decode(f).expect("a frame"))
            .collect()
    }
}

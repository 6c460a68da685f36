//! The hub driven without a network: messages in, effects out, on a fake clock and a seeded RNG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use rally_proto::control::{NatReport, RelayLatency, MAX_NAT_RELAYS, MAX_PARTIES_PER_AGENT};
use rally_proto::{InviteCode, MapPages, Overlay, PeerChange, PeerView, Request, Response, Sig64};
use rand::SeedableRng;

use super::*;
use crate::store::SqliteStore;

#[test]
fn a_joiner_gets_a_full_map_and_members_get_one_delta_for_a_burst() {
    let mut t = TestHub::new();
    let mut owner = t.register(1);
    t.drain(&owner);
    let code = t.create_party(&mut owner, "lan");
    let msgs = t.drain(&owner);
    assert!(
        matches!(&msgs[..], [ServerMsg::Relays { .. }]),
        "a new party renews the creator's relay token: {msgs:?}"
    );
    let mut joiners: Vec<Agent> = (2..=4).map(|i| t.register(i)).collect();
    for j in &mut joiners {
        t.join(j, &code);
    }
    let msgs = t.drain(&owner);
    let [ServerMsg::PeerDelta { version, changes }] = &msgs[..] else {
        panic!("expected one delta, got {msgs:?}");
    };
    assert_eq!(*version, 2);
    let mut names: Vec<_> = changes
        .iter()
        .map(|c| match c {
            PeerChange::Upsert { peer } => peer.name.clone(),
            PeerChange::Remove { .. } => panic!("unexpected remove"),
        })
        .collect();
    names.sort();
    assert_eq!(names, ["a2", "a3", "a4"]);
    let msgs = t.drain(&joiners[2]);
    assert!(matches!(msgs[0], ServerMsg::Relays { .. }), "{msgs:?}");
    let ServerMsg::PeerMap { peers, .. } = &msgs[1] else {
        panic!("expected a full map, got {msgs:?}");
    };
    assert_eq!(peers.len(), 3);
    assert!(peers.iter().all(|p| p.parties == ["lan"]));
}

#[test]
fn leaving_removes_the_agent_from_its_former_peers() {
    let mut t = TestHub::new();
    let mut owner = t.register(1);
    let code = t.create_party(&mut owner, "lan");
    let mut bob = t.register(2);
    t.join(&mut bob, &code);
    t.drain(&owner);
    t.drain(&bob);
    t.ok(
        &mut bob,
        Request::LeaveParty {
            party: "lan".into(),
        },
    );
    assert_eq!(
        t.drain(&owner),
        vec![ServerMsg::PeerDelta {
            version: 2,
            changes: vec![PeerChange::Remove { peer_id: bob.id }]
        }]
    );
    // Bob is in no party now: relays without a token, an empty map.
    let msgs = t.drain(&bob);
    assert!(
        matches!(&msgs[..], [ServerMsg::Relays { token, .. }, ServerMsg::PeerMap { peers, .. }] if token.is_empty() && peers.is_empty()),
        "{msgs:?}"
    );
}

#[test]
fn endpoint_update_is_one_upsert_and_sync_peers_sends_a_full_map() {
    let mut t = TestHub::new();
    let mut owner = t.register(1);
    let code = t.create_party(&mut owner, "lan");
    let mut bob = t.register(2);
    t.join(&mut bob, &code);
    t.drain(&owner);
    t.drain(&bob);
    let eps: Vec<SocketAddr> = vec!["203.0.113.7:4000".parse().unwrap()];
    t.ok(
        &mut bob,
        Request::UpdateEndpoints {
            endpoints: eps.clone(),
        },
    );
    let msgs = t.drain(&owner);
    let [ServerMsg::PeerDelta { changes, .. }] = &msgs[..] else {
        panic!("expected one delta, got {msgs:?}");
    };
    assert!(matches!(&changes[..], [PeerChange::Upsert { peer }] if peer.endpoints == eps));
    t.ok(&mut owner, Request::SyncPeers);
    let msgs = t.drain(&owner);
    let [ServerMsg::PeerMap { version, peers }] = &msgs[..] else {
        panic!("expected a full map, got {msgs:?}");
    };
    assert_eq!(*version, 3);
    assert_eq!(peers[0].endpoints, eps);
}

#[test]
fn an_oversized_nat_report_is_refused_and_never_reaches_the_party() {
    let mut t = TestHub::new();
    let mut owner = t.register(1);
    let code = t.create_party(&mut owner, "lan");
    let mut bob = t.register(2);
    t.join(&mut bob, &code);
    t.drain(&owner);
    let mut nat = max_nat();
    nat.relays.push(nat.relays[0].clone());
    let e = t.refused(&mut bob, Request::ReportNat { nat });
    assert_eq!(e.code, ErrorCode::TooLarge, "{e:?}");
    let mut nat = max_nat();
    nat.relays[0].addr = "x".repeat(10_000);
    assert_eq!(
        t.refused(&mut bob, Request::ReportNat { nat }).code,
        ErrorCode::TooLarge
    );
    assert!(t.drain(&owner).is_empty(), "nothing announced");
    // The largest report allowed goes through.
    t.ok(&mut bob, Request::ReportNat { nat: max_nat() });
    assert_eq!(t.drain(&owner).len(), 1);
}

#[test]
fn a_registration_over_a_bound_closes_the_session() {
    let mut t = TestHub::new();
    let e = t
        .try_register(5, "a5", [5; 32], vec!["192.0.2.1:1".parse().unwrap(); 17])
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
}

#[test]
fn a_party_too_large_for_one_frame_arrives_as_pages_the_agent_assembles() {
    // Members with the largest NAT report allowed: ~6 KB each on the wire, so 800 of them make
    // a full map over the 4 MiB frame limit.
    // Members are written to the store directly (registration is tested elsewhere).
    let mut t = TestHub::new();
    let mut owner = t.register(0);
    let code = t.create_party(&mut owner, "big");
    let party = InviteCode::decode(&code).unwrap();
    let nat = serde_json::to_string(&max_nat()).unwrap();
    for i in 1..=800u32 {
        let mut id = [7u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let id = Key32(id);
        let store = &mut t.hub.store;
        store
            .register_agent(&id, &format!("n{i}"), &id, &[], 1)
            .unwrap();
        store.set_nat(&id, &nat).unwrap();
        store
            .redeem_invite(party.party_id, &party.secret, &id, 1)
            .unwrap()
            .unwrap();
    }
    t.drain(&owner);
    t.ok(&mut owner, Request::SyncPeers);
    let frames = t.frames(&owner);
    let total: usize = frames.iter().map(Vec::len).sum();
    assert!(
        total > rally_proto::MAX_FRAME_LEN,
        "the map is {total} bytes"
    );
    assert!(frames.len() > 1);
    let mut pages = MapPages::new();
    let mut view = PeerView::new();
    for f in &frames {
        assert!(f.len() - 4 <= rally_proto::MAX_FRAME_LEN);
        match frame::decode::<ServerMsg>(f).expect("every frame decodes") {
            ServerMsg::PeerPage { version, peers } => pages.handle_page(version, peers).unwrap(),
            ServerMsg::PeerMap { version, peers } => {
                view.handle_full(version, pages.handle_map(version, peers).unwrap());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(view.len(), 800);
    assert!(view.peers().all(|p| p.nat.as_ref() == Some(&max_nat())));
}

#[test]
fn a_wireguard_key_of_another_agent_is_refused_and_the_holder_may_change_its_own() {
    let mut t = TestHub::new();
    let _alice = t.register(1);
    let e = t
        .try_register(2, "mallory", [1; 32], vec![])
        .expect_err("alice's key");
    assert_eq!(e.code, ErrorCode::KeyInUse);
    // Alice re-registers with her key, then with a new one (she signs both).
    t.try_register(1, "a1", [1; 32], vec![]).unwrap();
    t.try_register(1, "a1", [9; 32], vec![]).unwrap();
    // Her old key is free now.
    t.try_register(2, "bob", [1; 32], vec![]).unwrap();
}

#[test]
fn a_name_taken_in_the_party_is_numbered_and_kept_across_restarts() {
    let mut t = TestHub::new();
    let mut a = t.try_register(1, "laptop", [1; 32], vec![]).unwrap();
    let code = t.create_party(&mut a, "home");
    t.drain(&a);
    let mut b = t.try_register(2, "laptop", [2; 32], vec![]).unwrap();
    // Bob hears his new name in the join's answer.
    assert_eq!(t.join(&mut b, &code).as_deref(), Some("laptop-2"));
    let map = t.drain(&a);
    let names: Vec<_> = map
        .iter()
        .flat_map(|m| match m {
            ServerMsg::PeerDelta { changes, .. } => changes.clone(),
            _ => vec![],
        })
        .map(|c| match c {
            PeerChange::Upsert { peer } => peer.name,
            PeerChange::Remove { .. } => String::new(),
        })
        .collect();
    assert_eq!(names, ["laptop-2"]);
    // Bob restarts asking for "laptop" again: he stays laptop-2.
    let (_, name) = t.register_named(2, "laptop", [2; 32]).unwrap();
    assert_eq!(name, "laptop-2");
    // Alice leaves: the name is free and bob gets it back on his next registration.
    t.ok(
        &mut a,
        Request::LeaveParty {
            party: "home".into(),
        },
    );
    assert_eq!(t.register_named(2, "laptop", [2; 32]).unwrap().1, "laptop");
}

#[test]
fn an_agent_in_no_party_gets_the_relays_but_no_token() {
    let mut t = TestHub::new();
    let mut a = t.register(1);
    let msgs = t.drain(&a);
    assert!(
        msgs.iter().any(
            |m| matches!(m, ServerMsg::Relays { token, expires_at: 0, .. } if token.is_empty())
        ),
        "{msgs:?}"
    );
    assert_eq!(
        t.refused(&mut a, Request::RelayToken).code,
        ErrorCode::NotFound
    );
    t.create_party(&mut a, "x");
    assert!(matches!(
        t.request(&mut a, Request::RelayToken),
        Ok(Response::RelayToken { .. })
    ));
    let msgs = t.drain(&a);
    assert!(
        msgs.iter()
            .any(|m| matches!(m, ServerMsg::Relays { token, .. } if !token.is_empty())),
        "{msgs:?}"
    );
}

#[test]
fn max_uses_zero_is_refused() {
    let mut t = TestHub::new();
    let mut a = t.register(1);
    let e = t.refused(
        &mut a,
        Request::CreateParty {
            name: "x".into(),
            max_uses: Some(0),
            expires_in_secs: None,
        },
    );
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.contains("at least 1"), "{}", e.message);
}

#[test]
fn an_agent_is_refused_a_party_beyond_what_a_relay_token_names() {
    let mut t = TestHub::new();
    let mut a = t.register(1);
    for i in 0..MAX_PARTIES_PER_AGENT {
        t.create_party(&mut a, &format!("p{i}"));
    }
    let e = t.refused(
        &mut a,
        Request::CreateParty {
            name: "one-more".into(),
            max_uses: None,
            expires_in_secs: None,
        },
    );
    assert_eq!(e.code, ErrorCode::TooManyParties);
    let mut b = t.register(2);
    let code = t.create_party(&mut b, "bs");
    let e = t.refused(&mut a, Request::JoinParty { code });
    assert_eq!(e.code, ErrorCode::TooManyParties);
    // Every party is in the token.
    let Ok(Response::RelayToken { token, .. }) = t.request(&mut a, Request::RelayToken) else {
        panic!("no token");
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).unwrap();
    let (tok, _) = RelayToken::decode_unverified(&bytes).unwrap();
    assert_eq!(tok.parties.len(), MAX_PARTIES_PER_AGENT);
}

#[test]
fn punch_requests_are_rate_limited_per_agent() {
    let mut t = TestHub::new();
    let mut a = t.register(1);
    let code = t.create_party(&mut a, "x");
    let mut b = t.register(2);
    t.join(&mut b, &code);
    let punch = Request::Punch { peer: b.id };
    for _ in 0..t.hub.settings.punch_burst {
        t.ok(&mut a, punch.clone());
    }
    assert_eq!(
        t.refused(&mut a, punch.clone()).code,
        ErrorCode::RateLimited
    );
    t.now.mono += t.hub.settings.punch_refill;
    t.ok(&mut a, punch);
}

#[test]
fn new_identities_from_one_address_are_limited_but_known_ones_are_not() {
    let mut t = TestHub::new();
    let burst = t.hub.settings.register_burst;
    for i in 0..burst {
        t.register_n(i);
    }
    let e = t.try_register_n(burst, [0; 32]).unwrap_err();
    assert_eq!(e.code, ErrorCode::RegistrationRefused);
    // A known identity re-registers from the same address.
    t.register_n(0);
    t.now.mono += t.hub.settings.register_refill;
    t.register_n(burst);
}

#[test]
fn identities_that_never_join_expire_once_disconnected() {
    let mut t = TestHub::new();
    let idle = t.register(1);
    let mut member = t.register(2);
    t.create_party(&mut member, "x");
    let connected = t.register(3);
    t.hub.handle_disconnect(&idle.session, t.now);
    t.hub.handle_disconnect(&member.session, t.now);
    t.now.unix += t.hub.settings.unjoined_ttl.as_secs() + 1;
    assert_eq!(t.hub.handle_timeout(t.now), 1);
    assert_eq!(t.hub.store.agent(&idle.id).unwrap(), None);
    assert!(t.hub.store.agent(&member.id).unwrap().is_some());
    assert!(t.hub.store.agent(&connected.id).unwrap().is_some());
}

// ---------------------------------------------------------------------------------------------

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

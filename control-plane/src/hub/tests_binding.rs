//! Registration signed over the connection's channel binding, sent before the challenge.

use std::net::SocketAddr;
use std::time::Instant;

use rally_proto::{Overlay, Sig64};
use rand::SeedableRng;

use super::*;
use crate::store::SqliteStore;

#[test]
fn a_registration_signed_over_the_channel_binding_needs_no_challenge_round_trip() {
    let (_dir, mut hub) = hub();
    let agent = Identity::from_seed([1; 32]);
    let binding = Key32([42; 32]);
    let mut session = Session::new(1, remote()).with_binding(Some(binding));
    // Hello and the registration arrive together: the challenge is answered already.
    let mut fx = hello(&mut hub, &mut session, &agent);
    fx.extend(register(&mut hub, &mut session, &agent, &binding));
    assert!(
        matches!(fx.first(), Some(Effect::Reply(ServerMsg::Challenge { .. }))),
        "{fx:?}"
    );
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Reply(ServerMsg::Registered { .. }))),
        "{fx:?}"
    );
    assert_eq!(session.identity(), Some(agent.public()));
}

#[test]
fn a_registration_signed_over_another_connections_binding_is_refused() {
    let (_dir, mut hub) = hub();
    let agent = Identity::from_seed([1; 32]);
    for binding in [None, Some(Key32([7; 32]))] {
        let mut session = Session::new(1, remote()).with_binding(binding);
        hello(&mut hub, &mut session, &agent);
        let fx = register(&mut hub, &mut session, &agent, &Key32([42; 32]));
        assert!(
            matches!(&fx[..], [Effect::Close(e)] if e.code == ErrorCode::AuthFailed),
            "binding {binding:?}: {fx:?}"
        );
        assert_eq!(session.identity(), None);
    }
}

fn hub() -> (tempfile::TempDir, Hub) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("c.db"), Overlay::default()).unwrap();
    let settings = Settings::new("192.0.2.1:7443".into(), vec![]);
    let hub = Hub::new(Box::new(store), Identity::from_seed([99; 32]), settings).unwrap();
    (dir, hub)
}

fn hello(hub: &mut Hub, session: &mut Session, agent: &Identity) -> Vec<Effect> {
    let msg = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        identity: agent.public(),
    };
    hub.handle(session, msg, now(), &mut rng())
}

fn register(hub: &mut Hub, session: &mut Session, agent: &Identity, over: &Key32) -> Vec<Effect> {
    let wg_key = Key32([5; 32]);
    let transcript = register_transcript(over, &agent.public(), &wg_key, "a1");
    let msg = ClientMsg::Register {
        signature: Sig64(agent.sign(DOMAIN_REGISTER, &transcript)),
        name: "a1".into(),
        wg_key,
        endpoints: vec![],
    };
    hub.handle(session, msg, now(), &mut rng())
}

#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix: 1_000_000,
    }
}

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(7)
}

fn remote() -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 5000))
}

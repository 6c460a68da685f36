//! Bounds, rate limits and refusals: what the hub turns away and what it expires.

use super::*;

#[test]
fn an_oversized_nat_report_is_refused_and_never_reaches_the_party() {
    let mut t = TestHub::new();
    let (owner, mut bob) = t.owner_and_member();
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

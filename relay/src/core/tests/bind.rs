//! Binding: tokens, cookies, signatures and what the relay answers.

use super::*;

#[test]
fn bind_without_token_is_refused() {
    let mut lab = Lab::new();
    let a = agent(1);
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);

    // A token the control plane never signed (here: signed by the agent itself).
    let forged = RelayToken {
        agent: a.public(),
        expires_at: lab.unix + 3600,
        parties: vec![PARTY_X],
    }
    .sign(&a);
    let action = lab.bind_with(src, &cookie, &a, &forged);
    assert_refused(&action, DropReason::BadToken, RelayErrorCode::BadToken);

    // Bytes that are no token at all.
    let action = lab.bind_with(src, &cookie, &a, b"not a token");
    assert_refused(&action, DropReason::BadToken, RelayErrorCode::BadToken);

    // A Bind with no token bytes does not even decode.
    let mut no_token = RelayMsg::Bind {
        cookie,
        signature: [0; 64],
        token: b"x",
    }
    .to_vec();
    no_token.pop();
    let (action, _) = lab.recv(src, &no_token);
    assert_eq!(action, dropped(DropReason::Garbage));

    let (action, _) = lab.recv(src, &send_to(&agent(2), b"hi"));
    assert!(matches!(
        action,
        Action::Drop {
            reason: DropReason::NotBound,
            ..
        }
    ));
    assert_eq!(lab.relay.stats().sessions_active, 0);
    assert_eq!(lab.relay.stats().sessions_refused, 2);
}

#[test]
fn token_naming_no_party_is_refused() {
    let mut lab = Lab::new();
    let a = agent(1);
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token = lab.token(&a, &[]);

    let action = lab.bind_with(src, &cookie, &a, &token);

    assert_refused(&action, DropReason::NoParty, RelayErrorCode::BadToken);
    assert_eq!(lab.relay.stats().sessions_active, 0);
}

#[test]
fn what_the_relay_says_about_a_session_is_sealed_with_its_key() {
    let mut lab = Lab::new();
    let (a, b) = (agent(1), agent(2));
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token = lab.token(&a, &[PARTY_X]);
    let key = key_of(&a, &cookie, &token);
    assert!(matches!(
        lab.bind_with(src, &cookie, &a, &token),
        Action::Reply(_)
    ));

    let (pong, _) = lab.recv(src, &ping(7));
    let Action::Reply(pong) = pong else {
        panic!("{pong:?}")
    };
    assert!(RelayMsg::decode(&pong.payload).unwrap().is_sealed_by(&key));
    // An error about this session (its peer is not here) is sealed too.
    let (unavailable, _) = lab.recv(src, &send_to(&b, &[0; 32]));
    let Action::Drop {
        reply: Some(reply), ..
    } = unavailable
    else {
        panic!("{unavailable:?}")
    };
    let msg = RelayMsg::decode(&reply.payload).unwrap();
    assert!(matches!(
        msg,
        RelayMsg::Error {
            code: RelayErrorCode::PeerUnavailable,
            ..
        }
    ));
    assert!(msg.is_sealed_by(&key));
    // A refused bind whose cookie checked is sealed with that bind's key.
    let cookie2 = lab.challenge(src);
    let expired = lab.token_until(&a, &[PARTY_X], lab.unix);
    let Action::Drop {
        reply: Some(reply), ..
    } = lab.bind_with(src, &cookie2, &a, &expired)
    else {
        panic!("not refused")
    };
    let msg = RelayMsg::decode(&reply.payload).unwrap();
    assert!(msg.is_sealed_by(&key_of(&a, &cookie2, &expired)));
    // With no session there is no key: NotBound goes out unsealed.
    let (nb, _) = lab.recv(addr("192.0.2.9:1"), &ping(1));
    let Action::Drop {
        reply: Some(reply), ..
    } = nb
    else {
        panic!("{nb:?}")
    };
    assert_eq!(
        RelayMsg::decode(&reply.payload),
        Ok(RelayMsg::Error {
            code: RelayErrorCode::NotBound,
            tag: None
        })
    );
}

#[test]
fn an_error_is_never_longer_than_what_it_answers() {
    let mut lab = Lab::new();
    let src = addr("192.0.2.1:1000");
    lab.bind(&agent(1), src, &[PARTY_X]);
    // A Send with no payload to someone absent: 12 bytes in.
    let tiny = send_to(&agent(2), b"");

    let (action, _) = lab.recv(src, &tiny);

    let Action::Drop {
        reply: Some(reply), ..
    } = action
    else {
        panic!("{action:?}")
    };
    assert!(
        reply.payload.len() <= tiny.len(),
        "{} bytes for {}",
        reply.payload.len(),
        tiny.len()
    );
}

#[test]
fn a_bind_of_the_old_type_is_refused_as_outdated() {
    let mut lab = Lab::new();
    let a = agent(1);
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token = lab.token(&a, &[PARTY_X]);
    let mut old = bind_msg(&a, &cookie, &token);
    old[2] = 3;

    let (action, _) = lab.recv(src, &old);

    assert_refused(&action, DropReason::OutdatedAgent, RelayErrorCode::Outdated);
    assert_eq!(lab.relay.stats().sessions_active, 0);
}

#[test]
fn many_agents_behind_one_carrier_nat_address_all_bind() {
    let mut lab = Lab::new();
    // 200 users of one carrier-grade NAT share its public address (binding over a few seconds,
    // as the handshake budget of one address allows).
    for i in 0..200u16 {
        let mut seed = [9u8; 32];
        seed[..2].copy_from_slice(&i.to_be_bytes());
        let src = SocketAddr::new([203, 0, 113, 7].into(), 20_000 + i);
        lab.bind(&Identity::from_seed(seed), src, &[PARTY_X]);
        if i % 30 == 29 {
            lab.advance(Duration::from_secs(1));
        }
    }
    assert_eq!(lab.relay.stats().sessions_active, 200);
}

#[test]
fn a_full_handshake_table_still_answers_a_new_source() {
    let mut lab = Lab::new();
    // A flood from 65,536 sources fills the per-source table with half-spent buckets.
    for i in 0..MAX_LIMITER_KEYS as u32 {
        let src = SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 1);
        assert!(matches!(
            lab.recv(src, &RelayMsg::BindRequest.to_vec()).0,
            Action::Reply(_)
        ));
    }

    // A new user still gets its challenge.
    let (action, _) = lab.recv(addr("198.51.100.77:5000"), &RelayMsg::BindRequest.to_vec());

    assert!(matches!(action, Action::Reply(_)), "{action:?}");
}

#[test]
fn expired_token_is_refused() {
    let mut lab = Lab::new();
    let a = agent(1);
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token = lab.token_until(&a, &[PARTY_X], lab.unix);

    let action = lab.bind_with(src, &cookie, &a, &token);

    assert_refused(
        &action,
        DropReason::TokenExpired,
        RelayErrorCode::TokenExpired,
    );
    assert_eq!(lab.relay.stats().drops(DropReason::TokenExpired), 1);
}

#[test]
fn token_for_another_key_is_refused() {
    let mut lab = Lab::new();
    let (a, b) = (agent(1), agent(2));
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token_for_a = lab.token(&a, &[PARTY_X]);

    let action = lab.bind_with(src, &cookie, &b, &token_for_a);

    assert_refused(
        &action,
        DropReason::BadSignature,
        RelayErrorCode::BadSignature,
    );
    assert_eq!(lab.relay.session_addr(&short_id(&a.public())), None);
}

#[test]
fn signature_over_another_cookie_is_refused() {
    let mut lab = Lab::new();
    let a = agent(1);
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token = lab.token(&a, &[PARTY_X]);
    let sig = a.sign(DOMAIN_BIND, &bind_transcript(&[9; 32], &token));
    let msg = RelayMsg::Bind {
        cookie,
        signature: sig,
        token: &token,
    }
    .to_vec();

    let (action, _) = lab.recv(src, &msg);

    assert_refused(
        &action,
        DropReason::BadSignature,
        RelayErrorCode::BadSignature,
    );
}

#[test]
fn cookie_from_another_address_is_refused() {
    let mut lab = Lab::new();
    let a = agent(1);
    let cookie = lab.challenge(addr("192.0.2.1:1000"));
    let token = lab.token(&a, &[PARTY_X]);

    let other_port = lab.bind_with(addr("192.0.2.1:1001"), &cookie, &a, &token);
    let other_ip = lab.bind_with(addr("192.0.2.2:1000"), &cookie, &a, &token);

    assert_refused(
        &other_port,
        DropReason::BadCookie,
        RelayErrorCode::BadCookie,
    );
    assert_refused(&other_ip, DropReason::BadCookie, RelayErrorCode::BadCookie);
    assert_eq!(lab.relay.stats().drops(DropReason::BadCookie), 2);
}

#[test]
fn cookie_lives_one_to_two_buckets() {
    let mut lab = Lab::new();
    let a = agent(1);
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token = lab.token(&a, &[PARTY_X]);

    lab.advance(COOKIE_BUCKET + COOKIE_BUCKET / 2);
    let still_fresh = lab.bind_with(src, &cookie, &a, &token);
    lab.advance(COOKIE_BUCKET);
    let stale = lab.bind_with(src, &cookie, &a, &token);

    assert!(matches!(still_fresh, Action::Reply(_)), "{still_fresh:?}");
    assert_refused(&stale, DropReason::BadCookie, RelayErrorCode::BadCookie);
}

#[test]
fn bind_ok_reports_the_observed_address_and_expiry() {
    let mut lab = Lab::new();
    let a = agent(1);
    let src = addr("192.0.2.1:1000");
    let cookie = lab.challenge(src);
    let token = lab.token_until(&a, &[PARTY_X], lab.unix + 77);

    let action = lab.bind_with(src, &cookie, &a, &token);

    let Action::Reply(t) = action else {
        panic!("bind refused: {action:?}")
    };
    assert_eq!((t.via, t.to), (Via::Primary, src));
    let Ok(
        ok @ RelayMsg::BindOk {
            observed,
            expires_at,
            ..
        },
    ) = RelayMsg::decode(&t.payload)
    else {
        panic!("not a BindOk: {:?}", t.payload)
    };
    assert_eq!((observed, expires_at), (src, lab.unix + 77));
    assert!(
        ok.is_sealed_by(&key_of(&a, &cookie, &token)),
        "BindOk is sealed"
    );
    let stats = lab.relay.stats();
    assert_eq!((stats.sessions_active, stats.sessions_total), (1, 1));
}

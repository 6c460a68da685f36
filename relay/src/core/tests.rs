//! Scenario tests of the relay core on a fake clock.

mod tcp;

use super::*;
use proptest::prelude::*;
use rally_proto::relay::{RelayErrorCode, RelayMsg};
use rally_proto::stun::{BindingRequest, BindingResponse};
use rally_proto::Identity;

const PARTY_X: [u8; 8] = *b"party-x!";
const PARTY_Y: [u8; 8] = *b"party-y!";

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

#[test]
fn same_party_packets_are_forwarded_in_place() {
    let mut lab = Lab::new();
    let (a, b) = (agent(1), agent(2));
    let (a_addr, b_addr) = (addr("192.0.2.1:1000"), addr("198.51.100.7:2000"));
    lab.bind(&a, a_addr, &[PARTY_X]);
    lab.bind(&b, b_addr, &[PARTY_Y, PARTY_X]);

    let request = send_to(&b, b"wireguard bytes");
    let (action, buf) = lab.recv(a_addr, &request);

    assert_eq!(
        action,
        Action::Forward {
            via: Via::Primary,
            to: b_addr,
            len: request.len()
        }
    );
    assert_eq!(
        RelayMsg::decode(&buf),
        Ok(RelayMsg::Deliver {
            from: short_id(&a.public()),
            payload: b"wireguard bytes"
        })
    );
    let (back, _) = lab.recv(b_addr, &send_to(&a, b"reply"));
    assert!(matches!(back, Action::Forward { to, .. } if to == a_addr));
    let stats = lab.relay.stats();
    assert_eq!(stats.packets_forwarded, 2);
    assert_eq!(
        stats.bytes_forwarded,
        (request.len() + send_to(&a, b"reply").len()) as u64
    );
}

#[test]
fn a_reused_session_slot_answers_only_to_its_new_agent() {
    let mut lab = Lab::new();
    let (a, b, c) = (agent(1), agent(2), agent(3));
    let (a_addr, b_addr, c_addr) = (
        addr("192.0.2.1:1000"),
        addr("192.0.2.2:1000"),
        addr("192.0.2.3:1000"),
    );
    lab.bind(&a, a_addr, &[PARTY_X]);
    lab.bind(&b, b_addr, &[PARTY_X]);
    // B goes quiet and expires; C binds next and takes the freed slot.
    lab.advance(Duration::from_secs(50));
    assert!(matches!(lab.recv(a_addr, &ping(1)).0, Action::Reply(_)));
    lab.advance(Duration::from_secs(15));
    lab.relay.handle_timeout(lab.now, lab.unix);
    lab.bind(&c, c_addr, &[PARTY_X]);

    let (to_b, _) = lab.recv(a_addr, &send_to(&b, b"for b"));
    let (from_b, _) = lab.recv(b_addr, &send_to(&a, b"from b"));
    let (to_c, buf) = lab.recv(a_addr, &send_to(&c, b"for c"));

    assert!(
        matches!(
            to_b,
            Action::Drop {
                reason: DropReason::PeerUnavailable,
                ..
            }
        ),
        "{to_b:?}"
    );
    assert!(
        matches!(
            from_b,
            Action::Drop {
                reason: DropReason::NotBound,
                ..
            }
        ),
        "{from_b:?}"
    );
    assert!(
        matches!(to_c, Action::Forward { to, .. } if to == c_addr),
        "{to_c:?}"
    );
    assert_eq!(
        RelayMsg::decode(&buf),
        Ok(RelayMsg::Deliver {
            from: short_id(&a.public()),
            payload: b"for c"
        })
    );
    assert_eq!(lab.relay.stats().sessions_active, 2);
}

#[test]
fn members_of_different_parties_cannot_reach_each_other() {
    let mut lab = Lab::new();
    let (x, y, both) = (agent(1), agent(2), agent(3));
    let (x_addr, y_addr, both_addr) = (
        addr("192.0.2.1:1000"),
        addr("192.0.2.2:1000"),
        addr("192.0.2.3:1000"),
    );
    lab.bind(&x, x_addr, &[PARTY_X]);
    lab.bind(&y, y_addr, &[PARTY_Y]);
    lab.bind(&both, both_addr, &[PARTY_X, PARTY_Y]);

    let (x_to_y, _) = lab.recv(x_addr, &send_to(&y, b"hello"));
    let (y_to_x, _) = lab.recv(y_addr, &send_to(&x, b"hello"));

    for action in [&x_to_y, &y_to_x] {
        let Action::Drop { reason, reply } = action else {
            panic!("crossed parties: {action:?}")
        };
        assert_eq!(*reason, DropReason::NoSharedParty);
        // The same answer as for an absent peer: no oracle for who is bound elsewhere.
        let reply = reply.as_ref().expect("an error for the sender");
        assert_eq!(error_code(reply), Some(RelayErrorCode::PeerUnavailable));
    }
    // The member of both parties reaches each, and each reaches it.
    for (from, to, to_addr) in [
        (x_addr, &both, both_addr),
        (y_addr, &both, both_addr),
        (both_addr, &x, x_addr),
        (both_addr, &y, y_addr),
    ] {
        let (action, _) = lab.recv(from, &send_to(to, b"ok"));
        assert!(
            matches!(action, Action::Forward { to, .. } if to == to_addr),
            "{action:?}"
        );
    }
    assert_eq!(lab.relay.stats().drops(DropReason::NoSharedParty), 2);
}

#[test]
fn send_to_an_unknown_peer_is_dropped() {
    let mut lab = Lab::new();
    let a = agent(1);
    let a_addr = addr("192.0.2.1:1000");
    lab.bind(&a, a_addr, &[PARTY_X]);

    let (action, _) = lab.recv(a_addr, &send_to(&agent(9), b"anyone?"));

    let Action::Drop { reason, reply } = action else {
        panic!("{action:?}")
    };
    assert_eq!(reason, DropReason::PeerUnavailable);
    assert_eq!(
        reply.as_ref().and_then(error_code),
        Some(RelayErrorCode::PeerUnavailable)
    );
}

#[test]
fn per_ip_session_limit_holds() {
    let mut lab = Lab::with_limits(Limits {
        max_sessions_per_ip: 2,
        ..Limits::default()
    });
    lab.bind(&agent(1), addr("192.0.2.1:1001"), &[PARTY_X]);
    lab.bind(&agent(2), addr("192.0.2.1:1002"), &[PARTY_X]);

    let third = lab.try_bind(&agent(3), addr("192.0.2.1:1003"), &[PARTY_X]);
    assert_refused(&third, DropReason::LimitPerIp, RelayErrorCode::LimitReached);

    // Another IP is not affected, nor is a bound agent moving to a new port on the same IP.
    lab.bind(&agent(3), addr("192.0.2.2:1003"), &[PARTY_X]);
    lab.bind(&agent(1), addr("192.0.2.1:1004"), &[PARTY_X]);
    // IPv6 sources count per /64.
    lab.bind(&agent(4), addr("[2001:db8:0:1::1]:1"), &[PARTY_X]);
    lab.bind(&agent(5), addr("[2001:db8:0:1::2]:1"), &[PARTY_X]);
    let sixth = lab.try_bind(&agent(6), addr("[2001:db8:0:1::3]:1"), &[PARTY_X]);
    assert_refused(&sixth, DropReason::LimitPerIp, RelayErrorCode::LimitReached);
    assert_eq!(lab.relay.stats().sessions_active, 5);
}

#[test]
fn global_session_limit_holds() {
    let mut lab = Lab::with_limits(Limits {
        max_sessions: 2,
        idle_timeout: Duration::from_secs(10),
        ..Limits::default()
    });
    lab.bind(&agent(1), addr("192.0.2.1:1"), &[PARTY_X]);
    lab.advance(Duration::from_secs(5));
    lab.bind(&agent(2), addr("192.0.2.2:1"), &[PARTY_X]);

    let third = lab.try_bind(&agent(3), addr("192.0.2.3:1"), &[PARTY_X]);
    assert_refused(
        &third,
        DropReason::LimitSessions,
        RelayErrorCode::LimitReached,
    );
    // Rebinding a bound agent is not a new session.
    lab.bind(&agent(2), addr("192.0.2.2:2"), &[PARTY_X]);

    // Once agent 1 idles out, there is room again.
    lab.advance(Duration::from_secs(6));
    lab.relay.handle_timeout(lab.now, lab.unix);
    lab.bind(&agent(3), addr("192.0.2.3:1"), &[PARTY_X]);
    let stats = lab.relay.stats();
    assert_eq!(stats.sessions_active, 2);
    assert_eq!(stats.sessions_refused, 1);
    assert_eq!(stats.drops(DropReason::LimitSessions), 1);
}

#[test]
fn rate_limit_drops_and_counts() {
    let mut lab = Lab::with_limits(Limits {
        max_pps: 5,
        ..Limits::default()
    });
    let (a, b) = (agent(1), agent(2));
    let a_addr = addr("192.0.2.1:1000");
    lab.bind(&a, a_addr, &[PARTY_X]);
    lab.bind(&b, addr("192.0.2.2:1000"), &[PARTY_X]);

    let forwarded = (0..8)
        .filter(|_| {
            matches!(
                lab.recv(a_addr, &send_to(&b, b"p")).0,
                Action::Forward { .. }
            )
        })
        .count();
    assert_eq!(forwarded, 5, "a one-second burst of max_pps");
    assert_eq!(lab.relay.stats().drops(DropReason::RateLimited), 3);

    lab.advance(Duration::from_millis(400));
    let refilled = (0..8)
        .filter(|_| {
            matches!(
                lab.recv(a_addr, &send_to(&b, b"p")).0,
                Action::Forward { .. }
            )
        })
        .count();
    assert_eq!(refilled, 2, "0.4 s at 5 pps");
    assert_eq!(lab.relay.stats().packets_forwarded, 7);
}

#[test]
fn byte_rate_limit_drops_and_counts() {
    let mut lab = Lab::with_limits(Limits {
        max_bps: 8 * 1000,
        ..Limits::default()
    });
    let (a, b) = (agent(1), agent(2));
    let a_addr = addr("192.0.2.1:1000");
    lab.bind(&a, a_addr, &[PARTY_X]);
    lab.bind(&b, addr("192.0.2.2:1000"), &[PARTY_X]);
    let big = send_to(&b, &[0u8; 388]); // 400 bytes on the wire

    let results: Vec<bool> = (0..3)
        .map(|_| matches!(lab.recv(a_addr, &big).0, Action::Forward { .. }))
        .collect();

    assert_eq!(results, [true, true, false], "1000 bytes per second");
    assert_eq!(lab.relay.stats().drops(DropReason::RateLimited), 1);
    let (small, _) = lab.recv(a_addr, &send_to(&b, &[0u8; 100]));
    assert!(
        matches!(small, Action::Forward { .. }),
        "what is left still fits"
    );
}

#[test]
fn idle_session_expires() {
    let mut lab = Lab::with_limits(Limits {
        idle_timeout: Duration::from_secs(60),
        ..Limits::default()
    });
    let (a, b) = (agent(1), agent(2));
    let (a_addr, b_addr) = (addr("192.0.2.1:1000"), addr("192.0.2.2:1000"));
    lab.bind(&a, a_addr, &[PARTY_X]);
    lab.bind(&b, b_addr, &[PARTY_X]);

    // A pings at 50 s and stays; B says nothing.
    lab.advance(Duration::from_secs(50));
    assert!(matches!(lab.recv(a_addr, &ping(1)).0, Action::Reply(_)));
    lab.advance(Duration::from_secs(10));
    let (to_idle_b, _) = lab.recv(a_addr, &send_to(&b, b"there?"));
    assert!(matches!(
        to_idle_b,
        Action::Drop {
            reason: DropReason::PeerUnavailable,
            ..
        }
    ));
    lab.relay.handle_timeout(lab.now, lab.unix);

    assert_eq!(lab.relay.session_addr(&short_id(&b.public())), None);
    assert_eq!(lab.relay.session_addr(&short_id(&a.public())), Some(a_addr));
    let (from_b, _) = lab.recv(b_addr, &send_to(&a, b"back"));
    assert!(matches!(
        from_b,
        Action::Drop {
            reason: DropReason::NotBound,
            ..
        }
    ));

    lab.advance(Duration::from_secs(60));
    lab.relay.handle_timeout(lab.now, lab.unix);
    assert_eq!(lab.relay.stats().sessions_active, 0);
}

#[test]
fn session_ends_when_its_token_expires() {
    let mut lab = Lab::new();
    let (a, b) = (agent(1), agent(2));
    let (a_addr, b_addr) = (addr("192.0.2.1:1000"), addr("192.0.2.2:1000"));
    let until = lab.unix + 30;
    let cookie = lab.challenge(a_addr);
    let token = lab.token_until(&a, &[PARTY_X], until);
    assert!(matches!(
        lab.bind_with(a_addr, &cookie, &a, &token),
        Action::Reply(_)
    ));
    lab.bind(&b, b_addr, &[PARTY_X]);

    lab.advance(Duration::from_secs(29));
    assert!(matches!(
        lab.recv(a_addr, &send_to(&b, b"x")).0,
        Action::Forward { .. }
    ));
    assert!(matches!(
        lab.recv(b_addr, &send_to(&a, b"x")).0,
        Action::Forward { .. }
    ));
    lab.advance(Duration::from_secs(1));

    let (from_a, _) = lab.recv(a_addr, &send_to(&b, b"x"));
    let (to_a, _) = lab.recv(b_addr, &send_to(&a, b"x"));
    assert!(
        matches!(
            from_a,
            Action::Drop {
                reason: DropReason::NotBound,
                ..
            }
        ),
        "{from_a:?}"
    );
    assert!(
        matches!(
            to_a,
            Action::Drop {
                reason: DropReason::PeerUnavailable,
                ..
            }
        ),
        "{to_a:?}"
    );
}

#[test]
fn ping_is_answered_by_a_pong_of_the_same_size() {
    let mut lab = Lab::new();
    let src = addr("192.0.2.1:1000");
    lab.bind(&agent(1), src, &[PARTY_X]);
    let request = ping(0xfeed);

    let (action, _) = lab.recv(src, &request);

    let Action::Reply(t) = action else {
        panic!("{action:?}")
    };
    assert_eq!(t.to, src);
    assert!(matches!(
        RelayMsg::decode(&t.payload),
        Ok(RelayMsg::Pong { nonce: 0xfeed, .. })
    ));
    assert!(t.payload.len() <= request.len());
}

#[test]
fn garbage_is_dropped_and_counted() {
    let mut lab = Lab::new();
    let src = addr("192.0.2.1:1000");
    let mut stun_response = BindingResponse {
        txid: [1; 12],
        mapped: src,
        other: None,
        origin: None,
    }
    .encode();
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![1, 0, 0, 0, 7, 7, 7, 7], // a WireGuard initiation's first bytes
        vec![0x52, 0x4c, 99, 0],      // unknown relay type
        vec![0x52, 0x4c, 5, 0, 1, 2], // truncated Send
        vec![0x52, 0x4c, 1, 0, 0],    // BindRequest without its padding
    ];
    for g in &garbage {
        let (action, _) = lab.recv(src, g);
        assert_eq!(action, dropped(DropReason::Garbage), "{g:?}");
    }
    let unexpected = [
        RelayMsg::Deliver {
            from: [1; 8],
            payload: b"x",
        }
        .to_vec(),
        RelayMsg::Pong {
            nonce: 1,
            tag: [0; 16],
        }
        .to_vec(),
        RelayMsg::Error {
            code: RelayErrorCode::NotBound,
            tag: None,
        }
        .to_vec(),
        std::mem::take(&mut stun_response),
    ];
    for u in &unexpected {
        let (action, _) = lab.recv(src, u);
        assert_eq!(action, dropped(DropReason::Unexpected), "{u:?}");
    }
    let stats = lab.relay.stats();
    assert_eq!(stats.drops(DropReason::Garbage), garbage.len() as u64);
    assert_eq!(stats.drops(DropReason::Unexpected), unexpected.len() as u64);
    assert_eq!(
        stats.drops_total(),
        (garbage.len() + unexpected.len()) as u64
    );
}

#[test]
fn rebind_from_new_address_moves_the_session() {
    let mut lab = Lab::with_limits(Limits {
        max_sessions_per_ip: 1,
        ..Limits::default()
    });
    let (a, b) = (agent(1), agent(2));
    let (old, new, b_addr) = (
        addr("192.0.2.1:1000"),
        addr("203.0.113.9:4444"),
        addr("192.0.2.2:1000"),
    );
    lab.bind(&a, old, &[PARTY_X]);
    lab.bind(&b, b_addr, &[PARTY_X]);

    lab.bind(&a, new, &[PARTY_X]);

    let (to_a, _) = lab.recv(b_addr, &send_to(&a, b"x"));
    assert!(
        matches!(to_a, Action::Forward { to, .. } if to == new),
        "{to_a:?}"
    );
    let (from_old, _) = lab.recv(old, &send_to(&b, b"x"));
    assert!(matches!(
        from_old,
        Action::Drop {
            reason: DropReason::NotBound,
            ..
        }
    ));
    let (from_new, _) = lab.recv(new, &send_to(&b, b"x"));
    assert!(matches!(from_new, Action::Forward { .. }));
    // The old IP's slot is free again (the per-IP limit is 1).
    lab.bind(&agent(3), addr("192.0.2.1:1001"), &[PARTY_X]);
    let stats = lab.relay.stats();
    assert_eq!((stats.sessions_active, stats.sessions_total), (3, 4));
}

#[test]
fn another_agent_binding_at_an_address_replaces_its_session() {
    let mut lab = Lab::new();
    let (a, c) = (agent(1), agent(3));
    let shared = addr("192.0.2.1:1000");
    lab.bind(&a, shared, &[PARTY_X]);

    lab.bind(&c, shared, &[PARTY_X]);

    assert_eq!(lab.relay.session_addr(&short_id(&a.public())), None);
    assert_eq!(lab.relay.session_addr(&short_id(&c.public())), Some(shared));
    assert_eq!(lab.relay.stats().sessions_active, 1);
}

#[test]
fn unbound_sender_error_is_rate_limited() {
    let mut lab = Lab::new();
    let src = addr("192.0.2.1:1000");
    let request = send_to(&agent(2), b"");

    let first = lab.recv(src, &request).0;
    let second = lab.recv(src, &request).0;
    let other_src = lab.recv(addr("192.0.2.1:1001"), &request).0;
    lab.advance(Duration::from_millis(999));
    let too_soon = lab.recv(src, &request).0;
    lab.advance(Duration::from_millis(1));
    let a_second_later = lab.recv(src, &request).0;

    let reply = |a: &Action| match a {
        Action::Drop {
            reason: DropReason::NotBound,
            reply,
        } => reply.clone(),
        other => panic!("{other:?}"),
    };
    let first = reply(&first).expect("the first gets an error");
    assert_eq!(error_code(&first), Some(RelayErrorCode::NotBound));
    assert!(first.payload.len() <= request.len(), "never amplify");
    assert_eq!(reply(&second), None);
    assert!(reply(&other_src).is_some(), "limited per source address");
    assert_eq!(reply(&too_soon), None);
    assert!(reply(&a_second_later).is_some());
    assert_eq!(lab.relay.stats().drops(DropReason::NotBound), 5);
}

#[test]
fn handshake_replies_are_rate_limited_per_ip() {
    let mut lab = Lab::with_limits(Limits {
        handshake_rate: 2,
        handshake_burst: 3,
        ..Limits::default()
    });
    let src = addr("192.0.2.1:1000");
    let req = RelayMsg::BindRequest.to_vec();

    let answered = (0..5)
        .filter(|i| {
            let from = SocketAddr::new(src.ip(), 1000 + *i as u16);
            matches!(lab.recv(from, &req).0, Action::Reply(_))
        })
        .count();
    let other_ip = lab.recv(addr("192.0.2.2:1000"), &req).0;
    lab.advance(Duration::from_millis(500));
    let refilled = lab.recv(src, &req).0;

    assert_eq!(answered, 3, "the burst, whatever the port");
    assert!(matches!(other_ip, Action::Reply(_)));
    assert!(matches!(refilled, Action::Reply(_)));
    assert_eq!(lab.relay.stats().drops(DropReason::HandshakeRateLimited), 2);
}

#[test]
fn stun_request_is_answered_with_the_source_address() {
    let mut lab = Lab::with_alt();
    let src = addr("203.0.113.5:40000");
    let req = BindingRequest {
        txid: [7; 12],
        change_ip: false,
        change_port: false,
    }
    .encode();

    let (action, _) = lab.recv(src, &req);

    let Action::Reply(t) = action else {
        panic!("{action:?}")
    };
    assert_eq!((t.via, t.to), (Via::Primary, src));
    assert_eq!(
        BindingResponse::decode(&t.payload),
        Ok(BindingResponse {
            txid: [7; 12],
            mapped: src,
            origin: Some(lab.relay.config().local),
            other: lab.relay.config().alt,
        })
    );
    assert_eq!(lab.relay.stats().stun_requests, 1);
}

#[test]
fn stun_change_port_is_answered_from_the_other_port() {
    let mut lab = Lab::with_alt();
    let src = addr("203.0.113.5:40000");
    let req = BindingRequest {
        txid: [7; 12],
        change_ip: false,
        change_port: true,
    }
    .encode();
    let (local, alt) = (lab.relay.config().local, lab.relay.config().alt);

    let from_primary = lab.recv(src, &req).0;
    let from_alt = lab.recv_via(Via::Alt, src, &req).0;

    let Action::Reply(t) = from_primary else {
        panic!("{from_primary:?}")
    };
    assert_eq!(t.via, Via::Alt);
    let resp = BindingResponse::decode(&t.payload).expect("a response");
    assert_eq!((resp.origin, resp.other), (alt, alt));
    let Action::Reply(t) = from_alt else {
        panic!("{from_alt:?}")
    };
    assert_eq!(t.via, Via::Primary);
    let resp = BindingResponse::decode(&t.payload).expect("a response");
    assert_eq!((resp.origin, resp.other), (Some(local), Some(local)));
}

#[test]
fn stun_change_requests_the_relay_cannot_honour_are_dropped() {
    let mut no_alt = Lab::new();
    let mut with_alt = Lab::with_alt();
    let src = addr("203.0.113.5:40000");
    let port = BindingRequest {
        txid: [1; 12],
        change_ip: false,
        change_port: true,
    }
    .encode();
    let ip = BindingRequest {
        txid: [1; 12],
        change_ip: true,
        change_port: false,
    }
    .encode();

    // Answering from the same address would tell the client its NAT filters nothing.
    assert_eq!(
        no_alt.recv(src, &port).0,
        dropped(DropReason::StunChangeUnsupported)
    );
    assert_eq!(
        with_alt.recv(src, &ip).0,
        dropped(DropReason::StunChangeUnsupported)
    );
}

#[test]
fn sessions_bound_on_the_alt_port_are_reached_through_it() {
    let mut lab = Lab::with_alt();
    let (a, b) = (agent(1), agent(2));
    let (a_addr, b_addr) = (addr("192.0.2.1:1000"), addr("192.0.2.2:1000"));
    lab.bind(&a, a_addr, &[PARTY_X]);
    let cookie = match lab
        .recv_via(Via::Alt, b_addr, &RelayMsg::BindRequest.to_vec())
        .0
    {
        Action::Reply(t) => match RelayMsg::decode(&t.payload) {
            Ok(RelayMsg::BindChallenge { cookie }) => cookie,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let token = lab.token(&b, &[PARTY_X]);
    let bind = bind_msg(&b, &cookie, &token);
    assert!(
        matches!(lab.recv_via(Via::Alt, b_addr, &bind).0, Action::Reply(t) if t.via == Via::Alt)
    );

    let (action, _) = lab.recv(a_addr, &send_to(&b, b"x"));

    assert_eq!(
        action,
        Action::Forward {
            via: Via::Alt,
            to: b_addr,
            len: send_to(&b, b"x").len()
        }
    );
}

#[test]
fn every_drop_reason_has_its_own_counter_and_name() {
    let mut stats = Stats::default();
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i);
        for _ in 0..=i {
            stats.count_drop(*r);
        }
    }
    for (i, (r, n)) in stats.drops_by_reason().enumerate() {
        assert_eq!(n, i as u64 + 1, "{r:?}");
    }
    let names: std::collections::BTreeSet<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), DropReason::ALL.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Whatever agents do, every forwarded packet comes from the sender's own session and goes
    /// to a session of an agent sharing a party with it.
    #[test]
    fn no_packet_ever_crosses_parties(ops in proptest::collection::vec(op(), 1..50)) {
        let agents: Vec<(Identity, Vec<[u8; 8]>)> = (0..6u8)
            .map(|i| {
                let parties = [[b'p', 0, 0, 0, 0, 0, 0, 0], [b'q', 0, 0, 0, 0, 0, 0, 0], [b'r', 0, 0, 0, 0, 0, 0, 0]]
                    .into_iter()
                    .enumerate()
                    .filter(|(bit, _)| (i >> bit) & 1 == 1 || (i == 0 && *bit == 0))
                    .map(|(_, p)| p)
                    .collect();
                (agent(10 + i), parties)
            })
            .collect();
        let addrs: Vec<SocketAddr> = (0..5u16).map(|i| SocketAddr::new([192, 0, 2, 1 + (i % 3) as u8].into(), 1000 + i)).collect();
        let mut lab = Lab::with_limits(Limits { max_sessions_per_ip: 3, max_sessions: 4, idle_timeout: Duration::from_secs(20), ..Limits::default() });

        for op in ops {
            match op {
                Op::Bind { agent, addr } => {
                    let (id, parties) = &agents[agent];
                    let _ = lab.try_bind(id, addrs[addr], parties);
                }
                Op::Send { from, to, payload } => {
                    let src = addrs[from];
                    let msg = send_to(&agents[to].0, &payload);
                    let (action, buf) = lab.recv(src, &msg);
                    if let Action::Forward { to: dest, len, .. } = action {
                        prop_assert_eq!(len, msg.len());
                        let Ok(RelayMsg::Deliver { from: sender, payload: got }) = RelayMsg::decode(&buf) else {
                            panic!("forwarded something other than a Deliver");
                        };
                        prop_assert_eq!(got, &payload[..]);
                        let sender = agents.iter().find(|(id, _)| short_id(&id.public()) == sender).expect("a known sender");
                        prop_assert_eq!(lab.relay.session_addr(&short_id(&sender.0.public())), Some(src));
                        let receiver = agents.iter().find(|(id, _)| lab.relay.session_addr(&short_id(&id.public())) == Some(dest)).expect("a bound receiver");
                        prop_assert!(sender.1.iter().any(|p| receiver.1.contains(p)), "crossed parties");
                        prop_assert_eq!(short_id(&receiver.0.public()), short_id(&agents[to].0.public()));
                    }
                }
                Op::Advance(secs) => {
                    lab.advance(Duration::from_secs(secs));
                    lab.relay.handle_timeout(lab.now, lab.unix);
                }
                Op::Raw { from, bytes } => {
                    let (action, _) = lab.recv(addrs[from], &bytes);
                    prop_assert!(!matches!(action, Action::Forward { .. }), "raw bytes cannot be forwarded without a session: {:?}", action);
                }
            }
        }
        let stats = lab.relay.stats();
        prop_assert!(stats.sessions_active <= 4);
    }
}

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

#[test]
fn stun_response_port_is_honoured_only_for_a_padded_request() {
    let mut lab = Lab::new();
    let src = addr("203.0.113.5:40000");
    let req = BindingRequest {
        txid: [4; 12],
        change_ip: false,
        change_port: false,
    };
    let padded = rally_proto::stun::encode_to_port(&req, 41000);
    let Action::Reply(t) = lab.recv(src, &padded).0 else {
        panic!("no answer to a padded RESPONSE-PORT request")
    };
    // The same address, the asked port; the answer is no longer than the request.
    assert_eq!(t.to, addr("203.0.113.5:41000"));
    assert!(t.payload.len() <= padded.len());
    let resp = BindingResponse::decode(&t.payload).expect("a response");
    assert_eq!(resp.mapped, src);

    // Cut the padding off (keep the RESPONSE-PORT attribute): refused.
    let mut short = padded[..28].to_vec();
    short[2..4].copy_from_slice(&8u16.to_be_bytes());
    assert_eq!(
        rally_proto::stun::response_port(&short),
        Ok(Some(41000)),
        "the short request still asks for the port"
    );
    assert_eq!(lab.recv(src, &short).0, dropped(DropReason::StunUnpadded));
}

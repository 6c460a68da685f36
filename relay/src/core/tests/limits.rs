//! Session, rate and reply limits; expiry.

use super::*;

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

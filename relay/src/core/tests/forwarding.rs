//! Forwarding within a party, session slots and rebinds.

use super::*;

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
            len: request.len(),
            also: None,
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

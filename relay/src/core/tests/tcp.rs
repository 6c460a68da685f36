//! Sessions over TCP ([`Via::Tcp`]) next to sessions over UDP.

use super::*;

#[test]
fn an_agent_holds_a_udp_and_a_tcp_session_and_delivers_go_to_the_one_heard_last() {
    let mut lab = Lab::new();
    let (a, b) = (agent(1), agent(2));
    // The same numbers on both transports: they are still two sessions.
    let a_addr = addr("192.0.2.1:4000");
    let b_addr = addr("192.0.2.2:4000");
    lab.bind(&a, a_addr, &[PARTY_X]);
    bind_tcp(&mut lab, &a, a_addr);
    lab.bind(&b, b_addr, &[PARTY_X]);
    let s = lab.relay.stats();
    assert_eq!((s.sessions_active, s.sessions_active_tcp), (3, 1));

    // A bound over TCP last: B's packet goes there.
    lab.advance(Duration::from_millis(10));
    let (action, _) = lab.recv(b_addr, &send_to(&a, b"one"));
    assert!(
        matches!(action, Action::Forward { via: Via::Tcp, to, .. } if to == a_addr),
        "{action:?}"
    );

    // A is heard over UDP: now UDP.
    lab.advance(Duration::from_millis(10));
    assert!(matches!(lab.recv(a_addr, &ping(1)).0, Action::Reply(_)));
    let (action, _) = lab.recv(b_addr, &send_to(&a, b"two"));
    assert!(
        matches!(action, Action::Forward { via: Via::Primary, to, .. } if to == a_addr),
        "{action:?}"
    );

    // A sends over TCP: a TCP sender is forwarded to UDP peers, and counted per transport.
    lab.advance(Duration::from_millis(10));
    let (action, _) = lab.recv_via(Via::Tcp, a_addr, &send_to(&b, b"three"));
    assert!(matches!(action, Action::Forward { via: Via::Primary, to, .. } if to == b_addr));
    assert_eq!(lab.relay.stats().packets_forwarded_tcp, 2);

    // The TCP connection ends: its session goes, the UDP one stays.
    lab.relay.handle_closed(a_addr);
    let s = lab.relay.stats();
    assert_eq!((s.sessions_active, s.sessions_active_tcp), (2, 0));
    let (action, _) = lab.recv(b_addr, &send_to(&a, b"four"));
    assert!(matches!(
        action,
        Action::Forward {
            via: Via::Primary,
            ..
        }
    ));
}

#[test]
fn a_dead_udp_session_does_not_take_delivers_from_a_live_tcp_one() {
    let mut lab = Lab::new();
    let (a, b) = (agent(1), agent(2));
    let a_udp = addr("192.0.2.1:4000");
    let a_tcp = addr("192.0.2.1:5000");
    let b_addr = addr("192.0.2.2:4000");
    bind_tcp(&mut lab, &a, a_tcp);
    lab.advance(Duration::from_secs(1));
    lab.bind(&a, a_udp, &[PARTY_X]);
    lab.bind(&b, b_addr, &[PARTY_X]);
    // UDP goes quiet (blocked); TCP keeps pinging until the UDP session is idle.
    for n in 0..61 {
        lab.advance(Duration::from_secs(1));
        assert!(matches!(
            lab.recv_via(Via::Tcp, a_tcp, &ping(n)).0,
            Action::Reply(_)
        ));
        assert!(matches!(lab.recv(b_addr, &ping(n)).0, Action::Reply(_)));
    }
    let (action, _) = lab.recv(b_addr, &send_to(&a, b"x"));
    assert!(
        matches!(action, Action::Forward { via: Via::Tcp, to, .. } if to == a_tcp),
        "{action:?}"
    );
}

#[test]
fn stun_over_tcp_is_not_answered() {
    let mut lab = Lab::new();
    let req = BindingRequest {
        txid: [1; 12],
        change_ip: false,
        change_port: false,
    };
    let (action, _) = lab.recv_via(Via::Tcp, addr("192.0.2.1:4000"), &req.encode());
    assert_eq!(
        action,
        Action::Drop {
            reason: DropReason::Unexpected,
            reply: None
        }
    );
}

#[test]
fn a_tcp_bind_may_use_its_connections_channel_binding_as_cookie_and_no_other() {
    let mut lab = Lab::new();
    let a = agent(1);
    let (a_tcp, other_tcp, a_udp) = (
        addr("192.0.2.1:5000"),
        addr("192.0.2.1:5001"),
        addr("192.0.2.1:5000"),
    );
    let binding = [7u8; 32];
    lab.relay.handle_tcp_open(a_tcp, binding);
    lab.relay.handle_tcp_open(other_tcp, [8u8; 32]);
    let token = lab.token(&a, &[PARTY_X]);
    let bind = bind_msg(&a, &binding, &token);

    // Over UDP, or from another TCP connection, the binding is no cookie.
    let (action, _) = lab.recv(a_udp, &bind);
    assert!(
        matches!(
            action,
            Action::Drop {
                reason: DropReason::BadCookie,
                ..
            }
        ),
        "{action:?}"
    );
    let (action, _) = lab.recv_via(Via::Tcp, other_tcp, &bind);
    assert!(
        matches!(
            action,
            Action::Drop {
                reason: DropReason::BadCookie,
                ..
            }
        ),
        "{action:?}"
    );

    // From its own connection: bound at once, no challenge asked for.
    let (action, _) = lab.recv_via(Via::Tcp, a_tcp, &bind);
    let Action::Reply(t) = &action else {
        panic!("channel-bound bind refused: {action:?}")
    };
    let key = key_of(&a, &binding, &token);
    let msg = RelayMsg::decode(&t.payload).expect("a relay message");
    assert!(
        matches!(msg, RelayMsg::BindOk { .. }) && msg.is_sealed_by(&key),
        "{msg:?}"
    );
    assert_eq!(lab.relay.stats().sessions_active_tcp, 1);

    // Once the connection closed, its binding is forgotten.
    lab.relay.handle_closed(a_tcp);
    let (action, _) = lab.recv_via(Via::Tcp, a_tcp, &bind);
    assert!(
        matches!(
            action,
            Action::Drop {
                reason: DropReason::BadCookie,
                ..
            }
        ),
        "{action:?}"
    );
}

pub(super) fn bind_tcp(lab: &mut Lab, agent: &Identity, src: SocketAddr) {
    let cookie = match lab
        .recv_via(Via::Tcp, src, &RelayMsg::BindRequest.to_vec())
        .0
    {
        Action::Reply(t) if t.via == Via::Tcp => match RelayMsg::decode(&t.payload) {
            Ok(RelayMsg::BindChallenge { cookie }) => cookie,
            other => panic!("not a challenge: {other:?}"),
        },
        other => panic!("no challenge over tcp: {other:?}"),
    };
    let token = lab.token(agent, &[PARTY_X]);
    let (action, _) = lab.recv_via(Via::Tcp, src, &bind_msg(agent, &cookie, &token));
    let Action::Reply(t) = &action else {
        panic!("tcp bind refused: {action:?}")
    };
    assert_eq!((t.via, t.to), (Via::Tcp, src));
}

//! Two TCP sessions per agent: small datagrams on both, bulk on one, eviction of the oldest.

use super::tcp::bind_tcp;
use super::*;

/// A WireGuard data message of `len` bytes (what is copied when small).
fn wg(len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    d[0] = 4;
    d
}

fn forward(action: &Action) -> (Via, SocketAddr, Option<SocketAddr>) {
    match action {
        Action::Forward { via, to, also, .. } => (*via, *to, *also),
        other => panic!("not forwarded: {other:?}"),
    }
}

/// A with TCP sessions at `a1` then `a2`, B over UDP at `b_addr`.
fn two_tcp_sessions(lab: &mut Lab) -> (Identity, Identity, SocketAddr, SocketAddr, SocketAddr) {
    let (a, b) = (agent(1), agent(2));
    let (a1, a2, b_addr) = (
        addr("192.0.2.1:5000"),
        addr("192.0.2.1:5001"),
        addr("192.0.2.2:4000"),
    );
    bind_tcp(lab, &a, a1);
    lab.advance(Duration::from_millis(10));
    bind_tcp(lab, &a, a2);
    lab.bind(&b, b_addr, &[PARTY_X]);
    (a, b, a1, a2, b_addr)
}

#[test]
fn an_agent_holds_two_tcp_sessions_and_small_datagrams_go_on_both() {
    let mut lab = Lab::new();
    let (a, b, a1, a2, b_addr) = two_tcp_sessions(&mut lab);
    let s = lab.relay.stats();
    assert_eq!((s.sessions_active, s.sessions_active_tcp), (3, 2));

    // Small: to the newer session, and a copy to the older.
    let (action, buf) = lab.recv(b_addr, &send_to(&a, &wg(200)));
    assert_eq!(forward(&action), (Via::Tcp, a2, Some(a1)));
    assert!(matches!(
        RelayMsg::decode(&buf),
        Ok(RelayMsg::Deliver { payload, .. }) if payload == wg(200)
    ));
    // Small but not WireGuard data (a handshake, a probe): once.
    let mut initiation = wg(148);
    initiation[0] = 1;
    let (action, _) = lab.recv(b_addr, &send_to(&a, &initiation));
    assert_eq!(forward(&action), (Via::Tcp, a2, None));
    let (action, _) = lab.recv(b_addr, &send_to(&a, b"probe"));
    assert_eq!(forward(&action), (Via::Tcp, a2, None));
    // Bulk: on the newer only, whichever was heard from last (no reordering across the two).
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(1200)));
    assert_eq!(forward(&action), (Via::Tcp, a2, None));
    lab.advance(Duration::from_millis(10));
    assert!(matches!(
        lab.recv_via(Via::Tcp, a1, &ping(1)).0,
        Action::Reply(_)
    ));
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(1200)));
    assert_eq!(forward(&action), (Via::Tcp, a2, None));
    assert_eq!(lab.relay.stats().packets_forwarded, 5);

    // Either session can send: both are A's.
    for src in [a1, a2] {
        let (action, _) = lab.recv_via(Via::Tcp, src, &send_to(&b, b"up"));
        assert_eq!(forward(&action), (Via::Primary, b_addr, None));
    }
}

#[test]
fn the_size_limit_of_copies_is_small_frame() {
    let mut lab = Lab::new();
    let (a, _b, a1, a2, b_addr) = two_tcp_sessions(&mut lab);
    let header = send_to(&a, b"").len();
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(SMALL_FRAME - header)));
    assert_eq!(forward(&action), (Via::Tcp, a2, Some(a1)));
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(SMALL_FRAME - header + 1)));
    assert_eq!(forward(&action), (Via::Tcp, a2, None));
}

#[test]
fn when_one_tcp_session_closes_delivery_goes_to_the_other() {
    let mut lab = Lab::new();
    let (a, _b, a1, a2, b_addr) = two_tcp_sessions(&mut lab);
    // The newer goes: the older carries everything.
    lab.relay.handle_closed(a2);
    assert_eq!(lab.relay.stats().sessions_active_tcp, 1);
    for len in [100, 1200] {
        let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(len)));
        assert_eq!(forward(&action), (Via::Tcp, a1, None));
    }
    // A new connection: two again, the new one is the newer.
    let a3 = addr("192.0.2.1:5002");
    bind_tcp(&mut lab, &a, a3);
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(100)));
    assert_eq!(forward(&action), (Via::Tcp, a3, Some(a1)));
    // The older goes: the newer alone.
    lab.relay.handle_closed(a1);
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(100)));
    assert_eq!(forward(&action), (Via::Tcp, a3, None));
    assert_eq!(lab.relay.stats().sessions_active, 2);
}

#[test]
fn a_third_tcp_session_evicts_the_oldest() {
    let mut lab = Lab::new();
    let (a, _b, a1, a2, b_addr) = two_tcp_sessions(&mut lab);
    let a3 = addr("192.0.2.1:5002");
    lab.advance(Duration::from_millis(10));
    bind_tcp(&mut lab, &a, a3);
    let s = lab.relay.stats();
    assert_eq!((s.sessions_active, s.sessions_active_tcp), (3, 2));
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(100)));
    assert_eq!(forward(&action), (Via::Tcp, a3, Some(a2)));
    // The evicted connection is no longer bound.
    let (action, _) = lab.recv_via(Via::Tcp, a1, &send_to(&agent(2), b"x"));
    assert!(
        matches!(
            action,
            Action::Drop {
                reason: DropReason::NotBound,
                ..
            }
        ),
        "{action:?}"
    );
    // Closing the evicted connection later changes nothing.
    lab.relay.handle_closed(a1);
    assert_eq!(lab.relay.stats().sessions_active_tcp, 2);
}

#[test]
fn a_rebind_on_a_connection_renews_its_session_and_evicts_nothing() {
    let mut lab = Lab::new();
    let (a, _b, a1, a2, b_addr) = two_tcp_sessions(&mut lab);
    // Token refreshes on both connections, the older first.
    bind_tcp(&mut lab, &a, a1);
    bind_tcp(&mut lab, &a, a2);
    let s = lab.relay.stats();
    assert_eq!((s.sessions_active, s.sessions_active_tcp), (3, 2));
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(100)));
    assert_eq!(forward(&action), (Via::Tcp, a2, Some(a1)));
}

#[test]
fn two_tcp_sessions_count_in_the_session_limits() {
    let mut lab = Lab::with_limits(Limits {
        max_sessions: 2,
        ..Limits::default()
    });
    let a = agent(1);
    let (a1, a2) = (addr("192.0.2.1:5000"), addr("192.0.2.1:5001"));
    bind_tcp(&mut lab, &a, a1);
    bind_tcp(&mut lab, &a, a2);
    assert_eq!(lab.relay.stats().sessions_active, 2);
    // Full: another agent is refused, A's third connection replaces its oldest.
    let b = agent(2);
    let token = lab.token(&b, &[PARTY_X]);
    let cookie = [9u8; 32];
    let b_tcp = addr("192.0.2.2:5000");
    lab.relay.handle_tcp_open(b_tcp, cookie);
    let (action, _) = lab.recv_via(Via::Tcp, b_tcp, &bind_msg(&b, &cookie, &token));
    assert!(
        matches!(
            action,
            Action::Drop {
                reason: DropReason::LimitSessions,
                ..
            }
        ),
        "{action:?}"
    );
    bind_tcp(&mut lab, &a, addr("192.0.2.1:5002"));
    assert_eq!(lab.relay.stats().sessions_active, 2);

    let mut lab = Lab::with_limits(Limits {
        max_sessions_per_ip: 1,
        ..Limits::default()
    });
    bind_tcp(&mut lab, &a, a1);
    let cookie = [10u8; 32];
    lab.relay.handle_tcp_open(a2, cookie);
    let token = lab.token(&a, &[PARTY_X]);
    let (action, _) = lab.recv_via(Via::Tcp, a2, &bind_msg(&a, &cookie, &token));
    assert!(
        matches!(
            action,
            Action::Drop {
                reason: DropReason::LimitPerIp,
                ..
            }
        ),
        "{action:?}"
    );
}

#[test]
fn a_dead_tcp_session_gets_no_copy() {
    let mut lab = Lab::new();
    let (a, _b, _a1, a2, b_addr) = two_tcp_sessions(&mut lab);
    // Only a2 and B stay heard from; a1 idles out.
    for n in 0..61 {
        lab.advance(Duration::from_secs(1));
        assert!(matches!(
            lab.recv_via(Via::Tcp, a2, &ping(n)).0,
            Action::Reply(_)
        ));
        assert!(matches!(lab.recv(b_addr, &ping(n)).0, Action::Reply(_)));
    }
    let (action, _) = lab.recv(b_addr, &send_to(&a, &wg(100)));
    assert_eq!(forward(&action), (Via::Tcp, a2, None));
}

//! Relays over TLS/TCP in the simulation: an agent whose network lets out no UDP reaches its
//! peers through `relay-tcp:NAME`, moves back to UDP when UDP returns (make-before-break),
//! moves to TCP when UDP stops mid-session, and never dials TCP on an open network.

use std::time::{Duration, Instant};

use super::sim::{NatKind, Sim};
use super::{NodeEvent, TcpChange, TCP_HEAD_START, TCP_LINGER};
use crate::conn::PathId;

#[test]
fn an_agent_without_udp_reaches_its_peer_through_the_relay_over_tcp() {
    let (mut sim, t0) = tcp_pair(NatKind::Symmetric, NatKind::Symmetric, true, false);
    let up = sim.run_until(t0 + Duration::from_secs(5), |s| {
        primary(s, 0, 1) == Some(tcp("r1")) && primary(s, 1, 0).is_some()
    });
    assert!(up, "primary {:?}", primary(&sim, 0, 1));
    // Dialed after UDP's head start, bound and probed within a few round trips.
    let took = sim.now - t0;
    assert!(took >= TCP_HEAD_START, "took {took:?}");
    assert!(
        took < TCP_HEAD_START + Duration::from_millis(400),
        "took {took:?}"
    );
    // The open side stays on UDP: the relay forwards between the two transports.
    assert_eq!(primary(&sim, 1, 0), Some(PathId::Relay("r1".into())));
    let sent = stream(&mut sim, Duration::from_secs(2));
    assert_eq!(received_by(&sim, 1, sim.now - Duration::from_secs(3)), sent);
    assert!(sim.agents[0].node.nat().is_none_or(|n| !n.udp));
}

#[test]
fn a_udp_hint_dials_tcp_without_the_head_start() {
    let (mut sim, t0) = tcp_pair(NatKind::Home, NatKind::Symmetric, true, true);
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| {
        primary(s, 0, 1) == Some(tcp("r1"))
    }));
    assert!(sim.now - t0 < TCP_HEAD_START, "took {:?}", sim.now - t0);
}

#[test]
fn when_udp_returns_the_peer_moves_back_to_udp_without_losing_data() {
    let (mut sim, t0) = tcp_pair(NatKind::Symmetric, NatKind::Symmetric, true, false);
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| {
        primary(s, 0, 1) == Some(tcp("r1"))
    }));
    sim.udp_blocked.clear();
    let start = sim.now;
    let sent = stream(&mut sim, Duration::from_secs(10));
    assert_eq!(primary(&sim, 0, 1), Some(PathId::Relay("r1".into())));
    assert_eq!(received_by(&sim, 1, start), sent, "every message arrived");
    // Unused once UDP works: closed after the linger time.
    sim.run_for(TCP_LINGER + Duration::from_secs(11));
    assert!(tcp_changes(&sim, 0).contains(&TcpChange::Closed));
    assert!(sim.agents[0].node.tcp_bound().is_empty());
    assert_eq!(primary(&sim, 0, 1), Some(PathId::Relay("r1".into())));
}

#[test]
fn when_udp_stops_mid_session_data_resumes_over_tcp_within_two_seconds() {
    let (mut sim, t0) = tcp_pair(NatKind::Symmetric, NatKind::Symmetric, false, false);
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| {
        primary(s, 0, 1) == Some(PathId::Relay("r1".into()))
    }));
    stream(&mut sim, Duration::from_secs(1));
    sim.udp_blocked.insert(0);
    let blocked = sim.now;
    stream(&mut sim, Duration::from_secs(4));
    let after: Vec<Instant> = sim.agents[1]
        .received
        .iter()
        .map(|(t, _, _)| *t)
        .filter(|t| *t > blocked)
        .collect();
    let first = after.first().expect("data resumed");
    assert!(
        *first - blocked < Duration::from_secs(2),
        "gap {:?}",
        *first - blocked
    );
    assert_eq!(primary(&sim, 0, 1), Some(tcp("r1")));
}

#[test]
fn an_open_network_never_dials_tcp() {
    let (mut sim, t0) = tcp_pair(NatKind::Home, NatKind::Symmetric, false, false);
    sim.run_until(t0 + Duration::from_secs(3), |_| false);
    stream(&mut sim, Duration::from_secs(2));
    assert!(tcp_changes(&sim, 0).is_empty() && tcp_changes(&sim, 1).is_empty());
    let slot = super::tcp_slot(0);
    assert!(sim.agents[0].node.tcp_relay(&slot).is_none());
    // The same relays and token handed out again (a re-registration) dial nothing either.
    sim.start();
    sim.run_for(TCP_HEAD_START * 4);
    assert!(tcp_changes(&sim, 0).is_empty());
}

fn tcp(name: &str) -> PathId {
    PathId::RelayTcp(name.into())
}

/// Two agents and one relay that listens on TCP too; agent 0's UDP blocked if `blocked`.
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
fn tcp_pair(a: NatKind, b: NatKind, blocked: bool, hint: bool) -> (Sim, Instant) {
    let t0 = Instant::now();
    let mut sim = Sim::new(t0);
    sim.tcp = true;
    sim.add_relay("r1");
    sim.add_agent(a);
    sim.add_agent(b);
    if blocked {
        sim.udp_blocked.insert(0);
    }
    if hint {
        sim.agents[0].node.handle_udp_hint(true, t0);
    }
    sim.start();
    (sim, t0)
}

fn primary(sim: &Sim, a: usize, b: usize) -> Option<PathId> {
    let peer = sim.id(b);
    sim.agents[a].node.peer(&peer)?.conn().primary().cloned()
}

/// Agent 0 sends agent 1 a message every 50 ms for `d`; returns how many.
fn stream(sim: &mut Sim, d: Duration) -> usize {
    let end = sim.now + d;
    let mut sent = 0;
    while sim.now < end {
        sim.send_data(0, 1);
        sent += 1;
        let next = sim.now + Duration::from_millis(50);
        sim.run_until(next, |_| false);
    }
    // In flight at the end.
    sim.run_for(Duration::from_millis(500));
    sent
}

fn received_by(sim: &Sim, a: usize, since: Instant) -> usize {
    sim.agents[a]
        .received
        .iter()
        .filter(|(t, _, _)| *t >= since)
        .count()
}

fn tcp_changes(sim: &Sim, a: usize) -> Vec<TcpChange> {
    sim.agents[a]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::RelayTcp { change, .. } => Some(*change),
            _ => None,
        })
        .collect()
}

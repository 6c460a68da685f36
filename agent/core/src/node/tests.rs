//! Node behaviour: two and three nodes over the simulated network of [`super::sim`], on a fake
//! clock that jumps from event to event (each test runs in milliseconds).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rally_proto::control::{NatBehavior, NatReport};
use rally_proto::{Identity, Key32, PeerEvent, PeerInfo};

use super::sim::{NatKind, Sim};
use super::{Node, NodeConfig, NodeEvent, Route};
use crate::conn::{ConnEvent, PathId, Profile};

#[test]
fn public_agents_go_direct_within_a_second() {
    let (mut sim, t0) = pair(NatKind::Public, NatKind::Public);
    let direct = sim.run_until(t0 + Duration::from_secs(5), |s| both_direct(s, 0, 1));
    assert!(
        direct,
        "routes: {:?} / {:?}",
        sim.route(0, 1),
        sim.route(1, 0)
    );
    assert!(
        sim.now - t0 < Duration::from_secs(1),
        "took {:?}",
        sim.now - t0
    );
}

#[test]
fn every_nat_pair_takes_the_expected_route() {
    use NatKind::*;
    let kinds = [Public, FullCone, Home, Symmetric];
    for (i, a) in kinds.iter().enumerate() {
        for b in &kinds[i..] {
            let (mut sim, t0) = pair(*a, *b);
            let want_direct = punchable(*a, *b);
            let direct = sim.run_until(t0 + Duration::from_secs(20), |s| both_direct(s, 0, 1));
            assert_eq!(direct, want_direct, "{a:?} to {b:?}: {:?}", sim.route(0, 1));
            if !want_direct {
                assert!(
                    matches!(sim.route(0, 1), Some(Route::Relay { .. })),
                    "{a:?} to {b:?} is relayed"
                );
            }
        }
    }
}

#[test]
fn agents_behind_one_router_go_direct_on_the_lan() {
    let t0 = origin();
    let mut sim = Sim::new(t0);
    sim.add_relay("r1");
    sim.add_relay("r2");
    let a = sim.add_agent(NatKind::Symmetric);
    let b = sim.add_agent_beside(a);
    sim.start();
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| both_direct(s, a, b)));
    assert_eq!(sim.route(a, b), Some(Route::Direct(sim.agents[b].local)));
}

#[test]
fn a_symmetric_pair_stops_punching_once_the_reports_are_in() {
    let (mut sim, t0) = pair(NatKind::Symmetric, NatKind::Symmetric);
    sim.run_until(t0 + Duration::from_secs(5), |_| false);
    let peer = sim.id(1);
    let p = sim.agents[0].node.peer(&peer).expect("peer known");
    assert!(p.is_hopeless());
    assert!(!p.is_punching());
    assert!(matches!(sim.route(0, 1), Some(Route::Relay { .. })));
}

#[test]
fn hopeless_is_recomputed_when_this_agents_own_report_arrives() {
    // A peer restored from the cache before the first netcheck: its report says symmetric,
    // ours is unknown, so punching starts.
    let t0 = origin();
    let mut node = lone_node(t0);
    let peer = peer_info(NatBehavior::AddressAndPortDependent);
    node.handle_peer_changes(vec![PeerEvent::Added(peer.clone())], t0);
    assert!(!node.peer(&peer.peer_id).unwrap().is_hopeless());
    assert!(node.peer(&peer.peer_id).unwrap().is_punching());

    node.handle_nat_report(report(NatBehavior::AddressAndPortDependent), t0);
    let p = node.peer(&peer.peer_id).unwrap();
    assert!(p.is_hopeless(), "both sides endpoint-dependent");
    assert!(!p.is_punching());

    // Moved behind an endpoint-independent NAT: punching is worth it again, at once.
    node.handle_nat_report(report(NatBehavior::EndpointIndependent), t0);
    let p = node.peer(&peer.peer_id).unwrap();
    assert!(!p.is_hopeless());
    assert!(p.is_punching());
}

#[test]
fn hopeless_is_recomputed_when_the_peers_report_changes() {
    let t0 = origin();
    let mut node = lone_node(t0);
    node.handle_nat_report(report(NatBehavior::AddressAndPortDependent), t0);
    let peer = peer_info(NatBehavior::EndpointIndependent);
    node.handle_peer_changes(vec![PeerEvent::Added(peer.clone())], t0);
    assert!(!node.peer(&peer.peer_id).unwrap().is_hopeless());

    let mut moved = (*peer).clone();
    moved.nat = Some(report(NatBehavior::AddressAndPortDependent));
    node.handle_peer_changes(vec![PeerEvent::Updated(Arc::new(moved))], t0);
    assert!(node.peer(&peer.peer_id).unwrap().is_hopeless());
}

#[test]
fn a_peer_with_a_port_mapping_is_never_hopeless() {
    // Both sides endpoint-dependent, but the peer holds a gateway port mapping: its mapped
    // endpoint answers anyone, so punching it is worth it.
    let t0 = origin();
    let mut node = lone_node(t0);
    node.handle_nat_report(report(NatBehavior::AddressAndPortDependent), t0);
    let mut mapped = (*peer_info(NatBehavior::AddressAndPortDependent)).clone();
    let mut nat = report(NatBehavior::AddressAndPortDependent);
    nat.mapped_endpoint = Some("198.51.100.9:51820".parse().unwrap());
    mapped.nat = Some(nat);
    let id = mapped.peer_id;
    node.handle_peer_changes(vec![PeerEvent::Added(Arc::new(mapped.clone()))], t0);
    let p = node.peer(&id).unwrap();
    assert!(!p.is_hopeless());
    assert!(p.is_punching());

    // The mapping goes: now the pair is hopeless.
    mapped.nat = Some(report(NatBehavior::AddressAndPortDependent));
    node.handle_peer_changes(vec![PeerEvent::Updated(Arc::new(mapped.clone()))], t0);
    assert!(node.peer(&id).unwrap().is_hopeless());

    // And back: punching again at once.
    let mut nat = report(NatBehavior::AddressAndPortDependent);
    nat.mapped_endpoint = Some("198.51.100.9:51820".parse().unwrap());
    mapped.nat = Some(nat);
    node.handle_peer_changes(vec![PeerEvent::Updated(Arc::new(mapped))], t0);
    let p = node.peer(&id).unwrap();
    assert!(!p.is_hopeless());
    assert!(p.is_punching());
}

#[test]
fn a_cut_direct_path_fails_over_to_a_relay_on_the_silence_check() {
    let (mut sim, t0) = pair(NatKind::Public, NatKind::Public);
    sim.agents[1].echo = true;
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| both_direct(s, 0, 1)));
    // Both relays bound and measured, pings flowing every 100 ms.
    let settle = sim.now + Duration::from_secs(3);
    ping_until(&mut sim, settle);
    let cut = sim.now;
    sim.cut(0, 1);
    ping_until(&mut sim, cut + Duration::from_secs(2));

    let failover = first_event_after(&sim, 0, cut, |e| {
        matches!(
            e,
            NodeEvent::Conn {
                event: ConnEvent::Failover { .. },
                ..
            }
        )
    })
    .expect("failed over");
    // Unanswered since the first ping after the cut; silence check after 200 ms (the
    // stable profile's silence timeout, above 2 RTTs of 20 ms); its deadline is 3 RTTs +
    // 100 ms = 160 ms later.
    assert_eq!(failover - cut, Duration::from_millis(360));
    // The check's probes left at their computed times: 200 ms after the cut, 25 ms apart.
    let to = sim.agents[1].local;
    let check: Vec<Duration> = sim.agents[0]
        .direct_probes
        .iter()
        .filter(|(t, a)| *a == to && *t >= cut && *t < failover)
        .map(|(t, _)| *t - cut)
        .collect();
    assert_eq!(check, [200, 225, 250].map(Duration::from_millis));
    assert!(matches!(sim.route(0, 1), Some(Route::Relay { .. })));
    let last = sim.agents[0].received.last().expect("pings answered");
    assert!(
        matches!(last.2, PathId::Relay(_)),
        "pings resume over a relay"
    );
}

#[test]
fn a_direct_path_that_comes_back_is_primary_again_within_two_seconds() {
    let (mut sim, t0) = pair(NatKind::Home, NatKind::Home);
    sim.agents[1].echo = true;
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| both_direct(s, 0, 1)));
    let cut = sim.now;
    sim.cut(0, 1);
    ping_until(&mut sim, cut + Duration::from_secs(15));
    assert!(matches!(sim.route(0, 1), Some(Route::Relay { .. })));

    let healed = sim.now;
    sim.heal();
    let end = healed + Duration::from_secs(10);
    while sim.now < end && !both_direct(&sim, 0, 1) {
        let next = sim.now + Duration::from_millis(100);
        ping_until(&mut sim, next);
    }
    assert!(both_direct(&sim, 0, 1), "direct again");
    assert!(
        sim.now - healed < Duration::from_secs(2),
        "direct again after {:?}",
        sim.now - healed
    );
}

#[test]
fn a_path_back_after_the_punch_gave_up_is_primary_again_at_the_next_retry() {
    // Cut for 25 s: the punch started at the failover gives up after 10 s, is retried 2 s
    // later for 10 s, and next 5 s after that (at ~27.4 s). The connection manager's own
    // probes see the path up again first, which alone would take the recovery threshold (5
    // answers a second apart); the punch's answer makes it a fresh path, primary at once.
    let (mut sim, t0) = pair(NatKind::Home, NatKind::Home);
    sim.agents[1].echo = true;
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| both_direct(s, 0, 1)));
    let cut = sim.now;
    sim.cut(0, 1);
    ping_until(&mut sim, cut + Duration::from_secs(25));
    let healed = sim.now;
    sim.heal();
    while sim.now < healed + Duration::from_secs(10) && !both_direct(&sim, 0, 1) {
        let next = sim.now + Duration::from_millis(10);
        ping_until(&mut sim, next);
    }
    assert!(both_direct(&sim, 0, 1), "direct again");
    assert!(
        sim.now - healed < Duration::from_secs(3),
        "direct again after {:?}",
        sim.now - healed
    );
}

#[test]
fn a_router_with_a_new_public_address_is_direct_again_within_five_seconds() {
    let (mut sim, t0) = pair(NatKind::Home, NatKind::Home);
    sim.agents[1].echo = true;
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| both_direct(s, 0, 1)));
    let next = sim.now + Duration::from_secs(2);
    ping_until(&mut sim, next);
    let moved = sim.now;
    sim.renumber_router(0, Ipv4Addr::new(203, 0, 113, 250));
    let end = moved + Duration::from_secs(30);
    let failed_over = |sim: &Sim| {
        first_event_after(sim, 0, moved, |e| {
            matches!(
                e,
                NodeEvent::Conn {
                    event: ConnEvent::Failover { .. },
                    ..
                }
            )
        })
        .is_some()
    };
    while sim.now < end && !(failed_over(&sim) && both_direct(&sim, 0, 1)) {
        let next = sim.now + Duration::from_millis(10);
        ping_until(&mut sim, next);
    }
    // Pings carried on over a relay while the new address was punched; and the NAT report
    // learnt the new address from the relays' bind answers.
    let direct_again = sim.now;
    ping_until(&mut sim, moved + Duration::from_secs(3));
    assert!(
        both_direct(&sim, 0, 1),
        "direct again: {:?}",
        sim.route(0, 1)
    );
    assert!(
        direct_again - moved < Duration::from_secs(5),
        "direct again after {:?}",
        direct_again - moved
    );
    let nat = sim.agents[0].node.nat().expect("a report");
    assert_eq!(
        nat.public_endpoint.map(|e| e.ip()),
        Some(Ipv4Addr::new(203, 0, 113, 250).into()),
        "the relays' bind answers updated the public address"
    );
}

#[test]
fn a_relayed_pair_moves_off_a_relay_that_slows_down() {
    let (mut sim, t0) = pair(NatKind::Symmetric, NatKind::Symmetric);
    sim.agents[1].echo = true;
    ping_until(&mut sim, t0 + Duration::from_secs(5));
    let first = relay_of(&sim);
    let slow = if first == "r1" { 0 } else { 1 };
    let slowed = sim.now;
    sim.relay_delay.insert(slow, Duration::from_millis(150));
    ping_until(&mut sim, slowed + Duration::from_secs(20));

    let switched = first_event_after(&sim, 0, slowed, |e| {
        matches!(
            e,
            NodeEvent::Conn {
                event: ConnEvent::RelaySwitch { revert: false, .. },
                ..
            }
        )
    });
    assert!(switched.is_some(), "switched relays");
    assert_ne!(relay_of(&sim), first, "traffic left the slow relay");
}

#[test]
fn reconnect_and_new_endpoints_punch_again_even_while_direct() {
    let (mut sim, t0) = pair(NatKind::Home, NatKind::Home);
    assert!(sim.run_until(t0 + Duration::from_secs(5), |s| both_direct(s, 0, 1)));
    let peer = sim.id(1);
    assert!(!sim.agents[0].node.peer(&peer).unwrap().is_punching());

    let now = sim.now;
    sim.agents[0].node.handle_reconnect(Some(peer), now);
    assert!(sim.agents[0].node.peer(&peer).unwrap().is_punching());

    sim.run_for(Duration::from_secs(15));
    assert!(!sim.agents[0].node.peer(&peer).unwrap().is_punching());
    let mut moved = (*sim.info(1)).clone();
    moved.endpoints.push("203.0.113.77:40001".parse().unwrap());
    let now = sim.now;
    sim.agents[0]
        .node
        .handle_peer_changes(vec![PeerEvent::Updated(Arc::new(moved))], now);
    assert!(sim.agents[0].node.peer(&peer).unwrap().is_punching());
}

#[test]
fn three_agents_all_reach_each_other() {
    let t0 = origin();
    let mut sim = Sim::new(t0);
    sim.add_relay("r1");
    sim.add_relay("r2");
    sim.add_agent(NatKind::Home);
    sim.add_agent(NatKind::Symmetric);
    sim.add_agent(NatKind::FullCone);
    sim.start();
    sim.run_for(Duration::from_secs(15));
    // Home-symmetric goes direct by birthday punching; the full cone punches with both.
    assert!(both_direct(&sim, 0, 1));
    assert!(both_direct(&sim, 0, 2));
    assert!(both_direct(&sim, 1, 2));
}

#[test]
fn an_idle_agent_with_five_peers_wakes_rarely() {
    let per_second = idle_wakes(5);
    println!("idle agent, 5 peers: {per_second:.2} node wake-ups per second");
    // The node's own share (its timers, and the datagrams it receives; those arriving at one
    // instant count once). WireGuard's 1 s timer slot and keepalives come on top in the
    // engine. (50 peers, same setup: 7.1 per second, too slow a simulation for a unit test.)
    assert!(per_second <= 2.0, "{per_second:.2} wake-ups per second");
}

#[test]
fn an_idle_agents_probes_and_relay_pings_wait_for_the_idle_grid() {
    let (mut sim, t0) = pair(NatKind::Public, NatKind::Public);
    // Past the first 30 s (busy while connecting) and one idle interval after.
    sim.run_for(Duration::from_secs(90));
    let mut reasons = HashSet::new();
    for _ in 0..60 {
        let (at, reason) = sim.agents[0].node.poll_timeout().expect("a deadline");
        // On a slot of the node's grid (from the node's creation, `IDLE_GRID` apart).
        assert_eq!(
            sim.agents[0].node.idle_slot(at),
            at,
            "{reason:?} at {:?}: off the grid",
            at.duration_since(t0)
        );
        reasons.insert(format!("{reason:?}"));
        sim.run_for(Duration::from_secs(1));
    }
    // Both kinds of routine work came due in the minute, each on a grid slot.
    assert!(reasons.iter().any(|r| r.contains("Relay")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("Probe")), "{reasons:?}");
}

#[test]
fn an_idle_burst_holds_the_socket_briefly_and_traffic_ends_the_hold() {
    let t0 = origin();
    let mut sim = Sim::new(t0);
    sim.add_relay("r1");
    sim.add_relay("r2");
    for _ in 0..5 {
        sim.add_agent(NatKind::Public);
    }
    sim.start();
    sim.run_for(Duration::from_secs(60));
    // The socket is never held while a peer is busy (over several grid slots).
    let held = |s: &Sim| s.agents[0].node.read_socket_at(s.now).is_some();
    sim.send_data(0, 1);
    assert!(!sim.run_until(sim.now + Duration::from_secs(12), held));
    sim.run_for(Duration::from_secs(60));
    // Idle: a grid slot's probes hold the socket for `SOCKET_HOLD` from the slot.
    assert!(sim.run_until(sim.now + Duration::from_secs(30), held));
    let slot = sim.now;
    assert_eq!(
        sim.agents[0].node.idle_slot(slot),
        slot,
        "a burst off the grid"
    );
    assert_eq!(
        sim.agents[0].node.read_socket_at(slot),
        Some(slot + super::SOCKET_HOLD)
    );
    assert_eq!(
        sim.agents[0].node.read_socket_at(slot + super::SOCKET_HOLD),
        None
    );
    // A packet to any peer: read at once again.
    sim.send_data(0, 1);
    assert_eq!(sim.agents[0].node.read_socket_at(sim.now), None);
}

// ----- helpers -----

/// Node wake-ups per second of agent 0 among `peers + 1` idle public agents, over the second
/// minute (the first settles punching and the netcheck).
fn idle_wakes(peers: usize) -> f64 {
    let t0 = origin();
    let mut sim = Sim::new(t0);
    sim.add_relay("r1");
    sim.add_relay("r2");
    for _ in 0..=peers {
        sim.add_agent(NatKind::Public);
    }
    sim.start();
    sim.run_for(Duration::from_secs(60));
    let before = sim.agents[0].wakes;
    sim.run_for(Duration::from_secs(60));
    (sim.agents[0].wakes - before) as f64 / 60.0
}

#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
fn origin() -> Instant {
    Instant::now()
}

fn pair(a: NatKind, b: NatKind) -> (Sim, Instant) {
    let t0 = origin();
    let mut sim = Sim::new(t0);
    sim.add_relay("r1");
    sim.add_relay("r2");
    sim.add_agent(a);
    sim.add_agent(b);
    sim.start();
    (sim, t0)
}

/// The relay agent 0's primary path to agent 1 goes through.
fn relay_of(sim: &Sim) -> String {
    let peer = sim.id(1);
    let p = sim.agents[0].node.peer(&peer).expect("peer known");
    match p.conn().primary() {
        Some(PathId::Relay(r)) => r.to_string(),
        other => panic!("not relayed: {other:?}"),
    }
}

fn both_direct(sim: &Sim, a: usize, b: usize) -> bool {
    matches!(sim.route(a, b), Some(Route::Direct(_)))
        && matches!(sim.route(b, a), Some(Route::Direct(_)))
}

/// Agent 0 pings agent 1 every 100 ms until `end`.
fn ping_until(sim: &mut Sim, end: Instant) {
    while sim.now < end {
        sim.send_data(0, 1);
        let next = (sim.now + Duration::from_millis(100)).min(end);
        sim.run_until(next, |_| false);
    }
}

fn first_event_after(
    sim: &Sim,
    a: usize,
    after: Instant,
    f: impl Fn(&NodeEvent) -> bool,
) -> Option<Instant> {
    sim.agents[a]
        .events
        .iter()
        .find(|(t, e)| *t >= after && f(e))
        .map(|(t, _)| *t)
}

/// The lab's rule (tests/src/router.rs `punchable`): a symmetric NAT reaches every
/// endpoint-independent kind (a home router by birthday punching), not another symmetric one.
fn punchable(a: NatKind, b: NatKind) -> bool {
    let dependent = |k| matches!(k, NatKind::Symmetric | NatKind::SymmetricRandom);
    !(dependent(a) && dependent(b))
}

fn lone_node(t0: Instant) -> Node {
    Node::new(
        NodeConfig {
            identity: Arc::new(Identity::from_seed([1; 32])),
            wg_secret: [2; 32],
            profile: Profile::stable(),
            local_port: 51820,
            local_ips: vec!["192.168.1.2".parse().unwrap()],
        },
        [3; 32],
        t0,
    )
}

fn peer_info(mapping: NatBehavior) -> Arc<PeerInfo> {
    Arc::new(PeerInfo {
        peer_id: Identity::from_seed([9; 32]).public(),
        name: "peer".into(),
        wg_key: Key32([8; 32]),
        virtual_ip: Ipv4Addr::new(100, 64, 0, 9),
        endpoints: vec!["203.0.113.9:51820".parse().unwrap()],
        parties: vec!["p".into()],
        nat: Some(report(mapping)),
    })
}

fn report(mapping: NatBehavior) -> NatReport {
    NatReport {
        udp: true,
        mapping,
        filtering: NatBehavior::AddressAndPortDependent,
        port_preserving: false,
        public_endpoint: Some("198.51.100.77:40001".parse().unwrap()),
        relays: Vec::new(),
        mapped_endpoint: None,
        port_delta: None,
    }
}

//! Birthday punching and port prediction between a home router and a symmetric NAT, over the
//! simulated network (sequential and random port allocation).

use std::time::{Duration, Instant};

use super::sim::{NatKind, Sim};
use super::Route;
use crate::birthday::{
    Outcome, AFTER_PUNCH, ATTEMPT_FOR, MAX_BYTES, MAX_PROBES, MAX_SOCKETS, RETRY,
};

fn origin() -> Instant {
    Instant::now()
}

fn pair(a: NatKind, b: NatKind, nat_seed: u64) -> (Sim, Instant) {
    let t0 = origin();
    let mut sim = Sim::new(t0);
    sim.nat_seed = nat_seed;
    sim.add_relay("r1");
    sim.add_relay("r2");
    sim.add_agent(a);
    sim.add_agent(b);
    sim.start();
    (sim, t0)
}

fn both_direct(sim: &Sim) -> bool {
    matches!(sim.route(0, 1), Some(Route::Direct(_)))
        && matches!(sim.route(1, 0), Some(Route::Direct(_)))
}

/// Agent `a`'s birthday record towards agent `b`.
fn record(sim: &Sim, a: usize, b: usize) -> Option<crate::birthday::Record> {
    sim.agents[a].node.peer(&sim.id(b))?.birthday().record()
}

/// Runs the pair until direct (at most `secs`), then exchanges data both ways on it.
fn go_direct(sim: &mut Sim, t0: Instant, secs: u64) -> Option<Duration> {
    if !sim.run_until(t0 + Duration::from_secs(secs), both_direct) {
        return None;
    }
    Some(sim.now - t0)
}

#[test]
fn a_sequential_symmetric_nat_is_reached_by_prediction() {
    let (mut sim, t0) = pair(NatKind::Home, NatKind::Symmetric, 1);
    let took = go_direct(&mut sim, t0, 20).expect("direct");
    let prober = record(&sim, 0, 1).expect("the home side probed");
    let opener = record(&sim, 1, 0).expect("the symmetric side opened sockets");
    assert_eq!(
        prober.outcome,
        Outcome::Direct { predicted: true },
        "{prober:?}"
    );
    assert!(
        matches!(opener.outcome, Outcome::Direct { .. }),
        "{opener:?}"
    );
    assert!(
        prober.probes <= prober.predicted,
        "found among the predicted ports"
    );
    println!(
        "sequential: direct after {took:?}, {} probes, {} sockets",
        prober.probes, opener.sockets
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn the_connecting_socket_carries_the_traffic_both_ways() {
    let (mut sim, t0) = pair(NatKind::Home, NatKind::SymmetricRandom, 7);
    go_direct(&mut sim, t0, 30).expect("direct");
    let carried = sim.agents[1]
        .node
        .peer(&sim.id(0))
        .unwrap()
        .birthday()
        .carried()
        .expect("the symmetric side carries the path on a side socket");
    assert_eq!(sim.route(1, 0), Some(Route::Direct(carried.1)));
    let before = (sim.agents[0].received.len(), sim.agents[1].received.len());
    for _ in 0..5 {
        sim.send_data(0, 1);
        sim.send_data(1, 0);
        let end = sim.now + Duration::from_millis(100);
        sim.run_until(end, |_| false);
    }
    let direct = |a: usize, from: usize| {
        sim.agents[a]
            .received
            .iter()
            .skip(if a == 0 { before.0 } else { before.1 })
            .filter(|(_, p, path)| {
                *p == sim.id(from) && matches!(path, crate::conn::PathId::Direct(_))
            })
            .count()
    };
    assert_eq!(direct(0, 1), 5);
    assert_eq!(direct(1, 0), 5);
    // The path stays up (the connection manager's own probes go through the socket).
    sim.run_for(Duration::from_secs(30));
    assert!(both_direct(&sim));
}

#[test]
fn a_random_symmetric_nat_goes_direct_in_most_attempts_within_budget() {
    let runs = 20;
    let mut direct = 0;
    let mut times = Vec::new();
    let mut probes = Vec::new();
    for seed in 0..runs {
        let (mut sim, t0) = pair(NatKind::Home, NatKind::SymmetricRandom, 1000 + seed);
        let took = go_direct(&mut sim, t0, 16);
        let prober = record(&sim, 0, 1).expect("the home side probed");
        let opener = record(&sim, 1, 0).expect("the symmetric side opened sockets");
        assert!(prober.probes <= MAX_PROBES && prober.bytes <= MAX_BYTES);
        assert!(opener.sockets <= MAX_SOCKETS && opener.bytes <= MAX_BYTES);
        probes.push(prober.probes);
        if let Some(t) = took {
            direct += 1;
            times.push(t);
        }
    }
    times.sort();
    probes.sort();
    println!(
        "random symmetric: {direct}/{runs} direct within 16 s, median {:?}, probes median {}",
        times.get(times.len() / 2),
        probes[probes.len() / 2]
    );
    // 1 − (1 − 256/64512)^1024 ≈ 98 % per attempt.
    assert!(direct >= 17, "{direct}/{runs}");
}

#[test]
fn a_full_cone_needs_no_birthday() {
    let (mut sim, t0) = pair(NatKind::FullCone, NatKind::SymmetricRandom, 3);
    go_direct(&mut sim, t0, 10).expect("direct");
    sim.run_for(Duration::from_secs(5));
    assert!(record(&sim, 0, 1).is_none() && record(&sim, 1, 0).is_none());
}

#[test]
fn at_most_two_attempts_run_at_once_and_the_others_follow() {
    let t0 = origin();
    let mut sim = Sim::new(t0);
    sim.add_relay("r1");
    sim.add_relay("r2");
    // One home router, four symmetric NATs: four birthday pairs for agent 0.
    sim.add_agent(NatKind::Home);
    for _ in 0..4 {
        sim.add_agent(NatKind::SymmetricRandom);
    }
    sim.start();
    let mut most = 0;
    let all_direct = |s: &Sim| {
        (1..5).all(|b| {
            matches!(s.route(0, b), Some(Route::Direct(_)))
                && matches!(s.route(b, 0), Some(Route::Direct(_)))
        })
    };
    let end = t0 + Duration::from_secs(120);
    while sim.now < end && !all_direct(&sim) {
        let t = sim.now + Duration::from_millis(50);
        sim.run_until(t, |_| false);
        let running = (1..5)
            .filter(|b| {
                sim.agents[0]
                    .node
                    .peer(&sim.id(*b))
                    .is_some_and(|p| p.birthday().is_running())
            })
            .count();
        most = most.max(running);
    }
    assert!(most <= crate::birthday::MAX_CONCURRENT, "{most} at once");
    // Every pair got its attempt (the deferred ones after the first two) and went direct.
    for b in 1..5 {
        assert!(record(&sim, 0, b).is_some(), "pair 0–{b} never tried");
    }
    assert!(all_direct(&sim), "every pair went direct in the end");
}

#[test]
fn a_missed_attempt_is_tried_again_within_seconds_with_fresh_ports() {
    let (mut sim, t0) = pair(NatKind::Home, NatKind::SymmetricRandom, 7);
    // Nothing gets through between the two NATs until the first attempt has failed on both
    // sides (as if its 1024 probes had all missed the 256 mappings).
    sim.cut(0, 1);
    let failed = |s: &Sim| {
        [(0, 1), (1, 0)]
            .iter()
            .all(|&(a, b)| record(s, a, b).is_some_and(|r| r.outcome == Outcome::Failed))
    };
    assert!(
        sim.run_until(t0 + Duration::from_secs(30), failed),
        "no attempt failed"
    );
    let first = record(&sim, 0, 1).expect("the home side probed");
    let ended = first.ended.expect("ended");
    sim.heal();
    // The second attempt follows within seconds (not the minute a user would wait on a
    // relay): the retry's coordinated punch, a second of it, then the probes.
    let budget = Duration::from_secs(20);
    assert!(RETRY[0] + AFTER_PUNCH + ATTEMPT_FOR <= budget);
    assert!(
        sim.run_until(ended + budget, both_direct),
        "not direct within {budget:?} of the first attempt's end"
    );
    let second = record(&sim, 0, 1).expect("the home side probed again");
    assert!(
        second.started >= ended + RETRY[0],
        "{second:?} after {first:?}"
    );
    assert!(
        matches!(second.outcome, Outcome::Direct { .. }),
        "{second:?}"
    );
    println!("direct {:?} after the first attempt ended", sim.now - ended);
}

//! Failover, recovery, relay switching and the primary's latency.

use super::*;

#[test]
fn failover_after_exactly_the_failure_threshold() {
    // Only the peer talks, so no silence check runs: the probes alone judge the path.
    let mut sim = Sim::direct_and_relay();
    sim.stop_sending();
    sim.cut(&direct());
    let cut = sim.mark();

    let failover_at = sim.run_until_event(is_failover, secs(30));

    let lost = sim.lost_probes(&direct(), cut.at, failover_at);
    assert_eq!(lost.len(), 3, "exactly failure_threshold probes were lost");
    assert_eq!(failover_at, lost[2] + sim.profile().probe_timeout);
    assert_eq!(
        sim.events_since(&cut),
        [
            ConnEvent::PathDown { path: direct() },
            ConnEvent::Failover {
                from: direct(),
                to: relay("eu")
            },
            ConnEvent::PrimaryChange {
                from: Some(direct()),
                to: Some(relay("eu")),
                reason: PrimaryReason::Failover
            },
        ]
    );
    assert_eq!(sim.conn.primary(), Some(&relay("eu")));
    assert_eq!(sim.conn.metrics().failovers, 1);
}

#[test]
fn no_failover_on_a_single_lost_probe() {
    let mut sim = Sim::direct_and_relay();
    sim.link(&direct(), Link::script([None], Some(ms(20))));
    let mark = sim.mark();

    sim.run_for(secs(60));

    assert_eq!(sim.events_since(&mark), []);
    assert_eq!(sim.conn.primary(), Some(&direct()));
    let m = sim.path_metrics(&direct());
    assert_eq!((m.probes_failed, m.consecutive_failures), (1, 0));
}

#[test]
fn recovery_only_after_the_recovery_threshold() {
    let mut sim = Sim::direct_and_relay();
    sim.cut(&direct());
    sim.run_until_event(is_failover, secs(30));
    sim.link(&direct(), Link::up(ms(20)));
    let restored = sim.now;

    let back_at = sim.run_until_event(
        |e| {
            matches!(e, ConnEvent::PrimaryChange { to: Some(to), reason: PrimaryReason::Recovery, .. }
                if *to == direct())
        },
        secs(60),
    );

    let acks = sim.acks(&direct(), restored, back_at);
    assert_eq!(acks.len(), sim.profile().recovery_threshold as usize);
    assert_eq!(back_at, *acks.last().unwrap());
    assert_eq!(
        sim.conn.metrics().failovers,
        1,
        "recovery is not a failover"
    );
}

#[test]
fn no_flapping_under_alternating_loss() {
    // We send, the peer does not: silence checks run all along, and must ride out the loss.
    let mut sim = Sim::direct_and_relay();
    sim.stop_receiving();
    sim.link(&direct(), Link::alternating(ms(20)));
    let mark = sim.mark();
    sim.run_for(secs(300));
    assert_eq!(sim.primary_changes_since(&mark), 0, "the primary holds");

    sim.link(&direct(), Link::down());
    sim.run_until_event(is_failover, secs(30));
    sim.link(&direct(), Link::alternating(ms(20)));
    let mark = sim.mark();
    sim.run_for(secs(300));

    assert_eq!(sim.primary_changes_since(&mark), 0, "and never comes back");
    assert_eq!(sim.conn.primary(), Some(&relay("eu")));
    assert_eq!(sim.conn.metrics().failovers, 1);
}

#[test]
fn relay_switch_when_latency_crosses_200ms() {
    let mut sim = Sim::relays(ms(100), ms(150));
    sim.link(&relay("a"), Link::up(ms(400)));
    let mark = sim.mark();

    let switched_at = sim.run_until_event(is_relay_switch, secs(30));

    // EWMA 100 → 175 → 231.25 ms: the second slow ack crosses 200 ms.
    let slow_acks = sim.acks_taking(&relay("a"), ms(400));
    assert_eq!(slow_acks.len(), 2);
    assert_eq!(switched_at, slow_acks[1]);
    assert_eq!(
        sim.events_since(&mark),
        [
            ConnEvent::RelaySwitch {
                from: relay("a"),
                to: relay("b"),
                revert: false
            },
            ConnEvent::PrimaryChange {
                from: Some(relay("a")),
                to: Some(relay("b")),
                reason: PrimaryReason::RelaySwitch
            },
        ]
    );
}

#[test]
fn relay_switch_reverts_when_the_new_relay_is_worse() {
    let mut sim = Sim::relays(ms(100), ms(150));
    sim.link(&relay("a"), Link::up(ms(300)));
    let mark = sim.mark();
    sim.run_until_event(is_relay_switch, secs(30));
    sim.link(&relay("b"), Link::up(ms(450)));

    let reverted_at = sim.run_until_event(is_relay_switch, secs(30));

    let switches: Vec<ConnEvent> = sim
        .events_since(&mark)
        .into_iter()
        .filter(is_relay_switch)
        .collect();
    assert_eq!(
        switches,
        [
            ConnEvent::RelaySwitch {
                from: relay("a"),
                to: relay("b"),
                revert: false
            },
            ConnEvent::RelaySwitch {
                from: relay("b"),
                to: relay("a"),
                revert: true
            },
        ]
    );
    assert_eq!(sim.conn.primary(), Some(&relay("a")));

    // b looks fast again, but is held out for a while before it is tried again.
    sim.link(&relay("b"), Link::up(ms(150)));
    let retried_at = sim.run_until_event(is_relay_switch, secs(120));
    assert!(retried_at >= reverted_at + RELAY_REVERT_HOLD);
    assert_eq!(sim.conn.primary(), Some(&relay("b")));
}

#[test]
fn a_new_direct_path_takes_over_from_a_relay_at_once() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(relay("eu"), Link::up(ms(40)));
    sim.run_for(secs(5));
    assert_eq!(sim.conn.primary(), Some(&relay("eu")));

    let punched = sim.now;
    sim.add(direct(), Link::up(ms(20)));
    let at = sim.run_until_event(
        |e| {
            matches!(
                e,
                ConnEvent::PrimaryChange {
                    reason: PrimaryReason::Recovery,
                    ..
                }
            )
        },
        secs(5),
    );

    assert_eq!(at, punched + ms(20));
    assert_eq!(sim.conn.primary(), Some(&direct()));
}

#[test]
fn removing_the_primary_fails_over_at_once() {
    let mut sim = Sim::direct_and_relay();
    let mark = sim.mark();
    sim.conn.remove_path(&direct(), mark.at);
    sim.drain();
    assert_eq!(sim.conn.primary(), Some(&relay("eu")));
    assert!(sim.events_since(&mark).contains(&ConnEvent::Failover {
        from: direct(),
        to: relay("eu")
    }));
}

#[test]
fn degraded_while_the_primary_latency_is_above_the_limit() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(relay("eu"), Link::up(ms(250)));
    sim.run_for(secs(5));
    assert_eq!(sim.conn.state(), ConnState::Degraded);

    sim.link(&relay("eu"), Link::up(ms(40)));
    sim.run_for(secs(30));
    assert_eq!(sim.conn.state(), ConnState::Connected);
}

#[test]
fn a_path_slower_than_max_latency_fails_like_a_lost_one() {
    let mut sim = Sim::direct_and_relay();
    sim.link(&direct(), Link::up(ms(700)));
    sim.run_until_event(is_failover, secs(30));
    assert_eq!(sim.conn.primary(), Some(&relay("eu")));
    assert!(
        sim.conn.latency(&direct()) > Some(ms(200)),
        "late acks are measured"
    );
}

#[test]
fn every_profile_survives_a_failover_and_a_recovery() {
    for kind in ProfileKind::ALL {
        let mut sim = Sim::new(kind.profile());
        sim.add(direct(), Link::up(ms(20)));
        sim.add(relay("eu"), Link::up(ms(40)));
        sim.send_every(ms(100));
        sim.run_for(secs(30));
        sim.link(&direct(), Link::down());
        sim.run_until_event(is_failover, secs(120));
        sim.link(&direct(), Link::up(ms(20)));
        sim.run_for(secs(120));
        assert_eq!(sim.conn.primary(), Some(&direct()), "{kind}");
    }
}

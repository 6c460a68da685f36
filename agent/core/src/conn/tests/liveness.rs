//! Traffic as liveness, silence checks on busy paths, the idle probing cadence.

use super::*;

#[test]
fn traffic_counts_as_liveness() {
    let mut sim = Sim::direct_and_relay();
    sim.link(&direct(), Link::down());
    sim.receive_every(&direct(), ms(150));
    let mark = sim.mark();

    sim.run_for(secs(60));

    assert_eq!(sim.primary_changes_since(&mark), 0);
    assert!(sim.lost_probes(&direct(), mark.at, sim.now).len() >= 50);
    assert_eq!(sim.path_metrics(&direct()).health, PathHealth::Up);

    sim.stop_receiving();
    let quiet = sim.now;
    let failover_at = sim.run_until_event(is_failover, secs(30));
    assert!(failover_at <= quiet + sim.profile().probe_interval * 4);
}

#[test]
fn silence_on_a_busy_path_is_noticed_within_one_probe_interval() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(direct(), Link::up(ms(20)));
    sim.run_for(secs(60)); // idle: probes 25 s apart
    sim.receive_every(&direct(), ms(50));
    sim.run_for(secs(20) + ms(500)); // out of step with the probes
    sim.link(&direct(), Link::down());
    sim.stop_receiving();
    let silent_since = sim.now;
    let pi = sim.profile().probe_interval;

    sim.run_for(pi);

    let probes = sim.lost_probes(&direct(), silent_since, sim.now);
    assert_eq!(probes.len(), 1, "a probe within one interval of silence");
    sim.run_until(probes[0] + sim.profile().probe_timeout);
    assert_eq!(
        sim.path_metrics(&direct()).consecutive_failures,
        1,
        "and its loss counts"
    );
}

#[test]
fn a_busy_path_that_goes_silent_fails_over_within_a_second() {
    let mut sim = Sim::direct_and_relay();
    let heard = sim.now;
    sim.cut(&direct());
    let cut = sim.mark();

    let failover_at = sim.run_until_event(is_failover, secs(30));

    // The first packet sent after the last one heard starts the silence clock; a check of
    // three probes 25 ms apart follows after the silence timeout, and its deadline (three
    // smoothed RTTs of 20 ms, plus 100 ms) takes the path down.
    let check = sim.lost_probes(&direct(), cut.at, failover_at);
    let start = check[0];
    assert_eq!(
        check,
        [start, start + CHECK_SPACING, start + CHECK_SPACING * 2]
    );
    let silence = start - heard;
    let profile = sim.profile();
    assert!(
        silence >= profile.silence_timeout && silence <= profile.silence_timeout + ms(100),
        "checked {silence:?} after the last packet heard"
    );
    assert_eq!(failover_at, start + ms(3 * 20) + CHECK_MARGIN);
    assert!(failover_at - cut.at < secs(1));
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
    let m = sim.path_metrics(&direct());
    assert_eq!(m.probes_failed, u64::from(CHECK_PROBES));
}

#[test]
fn one_lost_probe_of_a_silence_check_is_no_failure() {
    let mut sim = Sim::direct_and_relay();
    sim.stop_receiving();
    // One probe is lost, most likely a check's (they are the most frequent); the next is
    // answered.
    sim.run_for(secs(5));
    let mark = sim.mark();
    sim.link(&direct(), Link::script([None], Some(ms(20))));

    sim.run_for(secs(60));

    assert_eq!(sim.events_since(&mark), []);
    assert_eq!(sim.conn.primary(), Some(&direct()));
    let checks = sim.probes_on(&direct(), mark.at, sim.now).len();
    assert!(
        checks > 120,
        "a one-way sender's path is checked a few times a second ({checks} probes in 60 s)"
    );
}

#[test]
fn a_silence_check_ends_as_soon_as_data_arrives() {
    let mut sim = Sim::direct_and_relay();
    sim.stop_receiving();
    sim.link(&direct(), Link::down());
    let quiet = sim.now;
    while sim
        .lost_probes(&direct(), quiet, sim.now + ms(1))
        .is_empty()
    {
        assert!(sim.advance(quiet + secs(1)), "no check within a second");
    }
    // The peer's data resumes 50 ms into the check, before its deadline.
    let started = sim.now;
    sim.run_until(started + ms(50));
    assert_eq!(sim.path_metrics(&direct()).health, PathHealth::Up);
    sim.receive_every(&direct(), ms(50));
    let mark = sim.mark();

    sim.run_for(secs(2));

    assert_eq!(
        sim.primary_changes_since(&mark),
        0,
        "no failover at the deadline"
    );
    assert_eq!(sim.path_metrics(&direct()).health, PathHealth::Up);
}

#[test]
fn idle_peer_probes_rarely() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(direct(), Link::up(ms(20)));

    sim.run_for(secs(310));

    // The first probe's answer makes the path the primary; the next waits an idle interval.
    let sent = sim.probes_on(&direct(), sim.t0, sim.now);
    assert!(sent.windows(2).all(|w| w[1] - w[0] == secs(25)));
    assert_eq!(sent.len(), 13);

    // Traffic makes it busy: the next probe comes one probe interval later, not 16 s later;
    // and a packet sent with nothing back within the silence timeout is checked on at once
    // (the check's first probe is answered in 20 ms, so the other two are not sent).
    let busy = sim.now;
    sim.conn.handle_tx(busy);
    sim.run_for(secs(1));
    assert_eq!(
        sim.probes_on(&direct(), busy, sim.now + ms(1)),
        [busy + sim.profile().silence_timeout, busy + secs(1)]
    );
}

#[test]
fn an_idle_path_the_peer_probes_is_not_probed_by_us_too() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(direct(), Link::up(ms(20)));
    sim.add(relay("eu"), Link::up(ms(40)));
    sim.run_for(secs(440));
    // Idle: the primary every 25 s, the standby eight times as rarely (every 200 s).
    let (from, to) = (sim.now - secs(200), sim.now);
    assert_eq!(sim.probes_on(&direct(), from, to).len(), 8);
    assert_eq!(sim.probes_on(&relay("eu"), from, to).len(), 1);

    // The peer's own probes arrive on the direct path every 24 s: it watches the path, so
    // ours there stop (the relay's go on at their own cadence).
    let watched = sim.now;
    for _ in 0..9 {
        assert!(sim.conn.handle_peer_probe(&direct(), sim.now));
        sim.run_for(secs(24));
    }
    assert!(sim.probes_on(&direct(), watched, sim.now).is_empty());
    assert!(!sim.probes_on(&relay("eu"), watched, sim.now).is_empty());

    // The peer stops probing: ours resume one idle interval after its last probe.
    let last = sim.now - secs(24);
    sim.run_for(secs(25));
    assert_eq!(
        sim.probes_on(&direct(), watched, sim.now),
        [last + secs(25)]
    );

    // A busy peer probes at its own cadence whatever the other side does.
    sim.conn.handle_tx(sim.now);
    assert!(!sim.conn.handle_peer_probe(&direct(), sim.now));
}

#[test]
fn data_through_a_relay_checks_a_direct_primary_at_once() {
    let mut sim = Sim::direct_and_relay();
    sim.run_for(secs(5));
    // (No ack of an earlier probe still on its way: it would end the check, as any answer.)
    while !sim.in_flight.is_empty() {
        sim.run_for(ms(5));
    }
    // The peer's address changed: our direct path is dead, and the peer, no longer hearing
    // us, sends through the relay.
    let cut = sim.now;
    sim.cut(&direct());
    sim.receive_every(&relay("eu"), ms(10));
    let failover = sim.run_until_event(is_failover, secs(5));
    // The check starts with the first relayed packet, without waiting out the silence
    // timeout, and fails after its wait: three smoothed RTTs plus the margin.
    let wait = (ms(20) * 3 + CHECK_MARGIN).clamp(CHECK_MIN_WAIT, sim.profile().max_latency);
    assert!(
        failover - cut <= ms(10) + wait + ms(1),
        "failed over {:?} after the cut",
        failover - cut
    );
    assert_eq!(sim.conn.primary(), Some(&relay("eu")));
}

#[test]
fn a_path_the_peer_just_reached_us_by_is_probed_back_at_once() {
    let t0 = Instant::now();
    let mut conn = Connection::new(Profile::stable(), t0, [3; 32]);
    let path = relay("r1");
    conn.add_path(path.clone(), t0);
    conn.handle_timeout(t0);
    let first = conn.poll_transmit().expect("the first probe");
    assert!(conn.poll_transmit().is_none());
    // The peer's probe comes while ours has just left: ours is left to its answer.
    assert!(!conn.handle_peer_probe(&path, t0 + ms(100)));
    assert!(conn.poll_timeout().is_some_and(|t| t > t0 + ms(100)));
    // Long after ours left (before the path worked): a fresh probe goes at once.
    let t = t0 + ms(300);
    assert!(!conn.handle_peer_probe(&path, t));
    assert_eq!(conn.poll_timeout(), Some(t));
    conn.handle_timeout(t);
    let again = conn.poll_transmit().expect("probed back");
    assert_eq!(again.path, path);
    assert_ne!(again.txid, first.txid);
}

#[test]
fn a_peer_going_idle_waits_an_idle_interval_after_its_last_busy_probes() {
    let mut sim = Sim::direct_and_relay();
    sim.stop_sending();
    sim.stop_receiving();
    let stopped = sim.now;
    let idle_from = stopped + sim.profile().idle_after;

    sim.run_for(secs(400));

    // Busy, every path is probed every second; idle, no path is probed before an idle
    // interval has passed since its last (busy) probe: the primary 25 s, the standby 200 s.
    let idle = sim.profile().idle_probe_interval;
    let primary = sim.probes_on(&direct(), stopped, sim.now);
    for w in primary.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            (gap == secs(1) && w[1] < idle_from) || gap == idle,
            "a probe {gap:?} after the one before, {:?} after the data stopped",
            w[1] - stopped
        );
    }
    let standby = sim.probes_on(&relay("eu"), idle_from, sim.now);
    assert_eq!(standby.len(), 1, "{standby:?}");
    let busy = sim.probes_on(&relay("eu"), stopped, idle_from);
    assert!(standby[0] - *busy.last().unwrap() >= idle * IDLE_STANDBY_FACTOR);
}

#[test]
fn a_handshake_is_liveness_but_leaves_an_idle_peer_idle() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(direct(), Link::up(ms(20)));
    sim.add(relay("eu"), Link::up(ms(40)));
    sim.run_for(secs(100));
    assert!(sim.conn.is_idle(sim.now));

    // An idle session's rekey: the path is heard, the peer stays idle (no busy probing).
    let rekey = sim.now;
    assert!(sim.conn.handle_handshake(&direct(), rekey));
    sim.run_for(secs(20));
    assert!(sim.conn.is_idle(sim.now));
    assert!(sim.probes_on(&direct(), rekey, sim.now).len() <= 1);
    assert!(sim.probes_on(&relay("eu"), rekey, sim.now).len() <= 1);

    // Data does make it busy: every path every probe interval.
    let data = sim.now;
    assert!(sim.conn.handle_rx(&direct(), data));
    sim.run_for(secs(5));
    assert!(!sim.conn.is_idle(sim.now));
    assert!(sim.probes_on(&relay("eu"), data, sim.now).len() >= 4);
}

//! Reconnecting, queueing, pinning a path, metrics and closing.

use super::*;

#[test]
fn backoff_deadlines_match_the_formula_within_the_jitter_band() {
    let policy = Profile::stable().backoff;

    let (attempts, failed_at) = reconnect_schedule([3; 32]);

    let numbers: Vec<u32> = attempts.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=10).collect::<Vec<u32>>());
    let times: Vec<Duration> = attempts
        .iter()
        .map(|(_, t)| *t)
        .chain([failed_at])
        .collect();
    let mut jittered = 0;
    for (n, pair) in (1..).zip(times.windows(2)) {
        let gap = (pair[1] - pair[0]).as_secs_f64();
        let nominal = policy.nominal(n).as_secs_f64();
        assert!(
            (nominal * 0.7 - 1e-6..=nominal * 1.3 + 1e-6).contains(&gap),
            "wait after attempt {n}: {gap}s outside {nominal}s ±30%"
        );
        jittered += usize::from((gap - nominal).abs() > 1e-3);
    }
    assert!(jittered > 5, "the jitter is applied");
    assert_eq!(
        reconnect_schedule([3; 32]),
        (attempts, failed_at),
        "same seed, same schedule"
    );
}

#[test]
fn reconnect_gives_up_after_the_last_attempt_and_resume_restarts() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(relay("eu"), Link::up(ms(40)));
    sim.run_for(secs(5));
    sim.link(&relay("eu"), Link::down());
    let mark = sim.mark();

    sim.run_until_event(|e| matches!(e, ConnEvent::Failed { .. }), secs(3600));

    assert_eq!(sim.conn.state(), ConnState::Failed);
    assert_eq!(sim.commands_since(&mark).len(), 10);
    assert_eq!(
        sim.events_since(&mark).last(),
        Some(&ConnEvent::Failed { attempts: 10 })
    );
    let failed = sim.mark();
    sim.run_for(secs(3600));
    assert_eq!(
        sim.commands_since(&failed),
        [],
        "no attempts after the last"
    );

    sim.link(&relay("eu"), Link::up(ms(40)));
    let resumed = sim.mark();
    sim.conn.resume(resumed.at);
    sim.drain();
    assert_eq!(
        sim.commands_since(&resumed),
        [Command::Reconnect { attempt: 1 }]
    );
    assert_eq!(sim.conn.state(), ConnState::Reconnecting);
    let up_at = sim.run_until_event(|e| matches!(e, ConnEvent::Connected { .. }), secs(5));
    assert_eq!(up_at, resumed.at + ms(40), "resume probes at once");
    assert_eq!(sim.conn.state(), ConnState::Connected);
}

#[test]
fn queue_drops_oldest_when_full_and_flushes_in_order() {
    let mut sim = Sim::new(Profile::stable());
    for i in 0..300u16 {
        sim.conn.enqueue(i.to_be_bytes().to_vec());
    }
    assert_eq!(sim.conn.queued(), 256);
    assert_eq!(sim.conn.metrics().queue_dropped, 44);
    assert_eq!(sim.conn.poll_flush(), None, "nothing leaves without a path");

    sim.add(relay("eu"), Link::up(ms(40)));
    sim.run_until_event(|e| matches!(e, ConnEvent::Connected { .. }), secs(5));

    let flushed: Vec<u16> = std::iter::from_fn(|| sim.conn.poll_flush())
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .collect();
    assert_eq!(flushed, (44..300).collect::<Vec<u16>>());
    assert_eq!(sim.conn.queued(), 0);
}

#[test]
fn set_primary_is_honoured_until_the_path_fails() {
    let mut sim = Sim::direct_and_relay();
    assert_eq!(
        sim.conn.set_primary(&relay("nowhere")),
        Err(SetPrimaryError::UnknownPath(relay("nowhere")))
    );
    let mark = sim.mark();

    sim.conn.set_primary(&relay("eu")).unwrap();
    sim.drain();
    sim.run_for(secs(60));

    assert_eq!(
        sim.events_since(&mark),
        [ConnEvent::PrimaryChange {
            from: Some(direct()),
            to: Some(relay("eu")),
            reason: PrimaryReason::Manual
        }]
    );
    assert_eq!(
        sim.conn.primary(),
        Some(&relay("eu")),
        "no recovery to direct"
    );

    sim.link(&relay("eu"), Link::down());
    sim.run_until_event(is_failover, secs(30));
    assert_eq!(sim.conn.primary(), Some(&direct()));
    assert_eq!(sim.conn.pinned(), None, "the pin ends when its path fails");
    sim.link(&relay("eu"), Link::up(ms(40)));
    let mark = sim.mark();
    sim.run_for(secs(60));
    assert_eq!(sim.primary_changes_since(&mark), 0);
    assert_eq!(
        sim.conn.set_primary(&direct()),
        Ok(()),
        "an up path can be pinned again"
    );
}

#[test]
fn connecting_without_any_path_starts_reconnecting_at_the_connect_timeout() {
    let mut sim = Sim::new(Profile::stable());
    let start = sim.mark();
    let at = sim.run_until_event(
        |e| matches!(e, ConnEvent::Reconnecting { attempt: 1, .. }),
        secs(60),
    );
    assert_eq!(at, start.at + sim.profile().connect_timeout);
    assert_eq!(
        sim.commands_since(&start),
        [Command::Reconnect { attempt: 1 }]
    );
}

#[test]
fn a_foreign_or_stale_ack_changes_nothing() {
    let mut sim = Sim::new(Profile::stable());
    sim.add(direct(), Link::down());
    sim.run_for(ms(1));
    let txid = sim.txids_on(&direct())[0];
    let now = sim.now;
    assert!(!sim
        .conn
        .handle_probe_ack(&direct(), txid.wrapping_add(1), now));
    assert!(!sim.conn.handle_probe_ack(&relay("eu"), txid, now));
    assert!(sim.conn.handle_probe_ack(&direct(), txid, now));
    assert!(
        !sim.conn.handle_probe_ack(&direct(), txid, now),
        "an ack is used once"
    );
}

#[test]
fn metrics_list_paths_in_priority_order() {
    let mut sim = Sim::direct_and_relay();
    sim.add(relay("us"), Link::up(ms(90)));
    sim.run_for(secs(5));

    let m = sim.conn.metrics();

    let order: Vec<(String, u32, bool)> = m
        .paths
        .iter()
        .map(|p| (p.path.to_string(), p.priority, p.is_primary))
        .collect();
    assert_eq!(
        order,
        [
            ("direct:203.0.113.2:51820".to_string(), 0, true),
            ("relay:eu".to_string(), 1, false),
            ("relay:us".to_string(), 2, false),
        ]
    );
    assert_eq!(m.strategy, Some(PathKind::Direct));
    assert_eq!(m.latency_ms, Some(20.0));
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["state"], "connected");
    assert_eq!(json["paths"][1]["health"], "up");
}

#[test]
fn close_disconnects_and_silences_the_machine() {
    let mut sim = Sim::direct_and_relay();
    sim.conn.enqueue(vec![1]);
    let mark = sim.mark();
    sim.conn.close();
    sim.drain();
    assert_eq!(sim.conn.state(), ConnState::Disconnected);
    assert_eq!(sim.conn.poll_timeout(), None);
    assert_eq!(sim.conn.queued(), 0);
    assert_eq!(
        sim.events_since(&mark).last(),
        Some(&ConnEvent::Disconnected)
    );
}

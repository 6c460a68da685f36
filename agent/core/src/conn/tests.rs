//! Scenario tests on a fake clock: a simulated link answers each probe (or not) after a
//! scripted RTT, and the clock jumps from one deadline to the next.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

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
    sim.run_for(secs(60)); // idle: probes 15 s apart
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

    let sent = sim.probes_on(&direct(), sim.t0, sim.now);
    assert_eq!(sent[1] - sent[0], secs(1), "quick until a primary is up");
    assert!(sent[1..].windows(2).all(|w| w[1] - w[0] == secs(15)));
    assert_eq!(sent.len(), 22);

    // Traffic makes it busy: the next probe comes one probe interval later, not 6 s later;
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

// ----- more behaviour -----

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

// ----- helpers -----

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn direct() -> PathId {
    PathId::Direct("203.0.113.2:51820".parse().unwrap())
}

fn relay(name: &str) -> PathId {
    PathId::Relay(name.into())
}

fn is_failover(e: &ConnEvent) -> bool {
    matches!(e, ConnEvent::Failover { .. })
}

fn is_relay_switch(e: &ConnEvent) -> bool {
    matches!(e, ConnEvent::RelaySwitch { .. })
}

/// A single relay path that dies; returns the reconnect attempts and when the connection failed.
fn reconnect_schedule(seed: [u8; 32]) -> (Vec<(u32, Duration)>, Duration) {
    let mut sim = Sim::with_seed(Profile::stable(), seed);
    sim.add(relay("eu"), Link::up(ms(40)));
    sim.send_every(ms(100));
    sim.run_for(secs(5));
    sim.link(&relay("eu"), Link::down());
    let failed_at = sim.run_until_event(|e| matches!(e, ConnEvent::Failed { .. }), secs(3600));
    let attempts = sim
        .commands
        .iter()
        .map(|(t, Command::Reconnect { attempt })| (*attempt, *t - sim.t0))
        .collect();
    (attempts, failed_at - sim.t0)
}

/// How a simulated path answers probes: each probe takes the next outcome (`None`: lost,
/// `Some(rtt)`: acked after `rtt`); at the end the script repeats its last entry, or starts
/// over if it cycles.
#[derive(Debug, Clone)]
struct Link {
    outcomes: Vec<Option<Duration>>,
    cycle: bool,
    next: usize,
}

impl Link {
    fn up(rtt: Duration) -> Link {
        Link::script([], Some(rtt))
    }

    fn down() -> Link {
        Link::script([], None)
    }

    fn script<const N: usize>(first: [Option<Duration>; N], then: Option<Duration>) -> Link {
        Link {
            outcomes: first.into_iter().chain([then]).collect(),
            cycle: false,
            next: 0,
        }
    }

    /// Lost, answered, lost, answered, ...
    fn alternating(rtt: Duration) -> Link {
        Link {
            outcomes: vec![None, Some(rtt)],
            cycle: true,
            next: 0,
        }
    }

    fn outcome(&mut self) -> Option<Duration> {
        let o = self.outcomes[self.next.min(self.outcomes.len() - 1)];
        self.next += 1;
        if self.cycle {
            self.next %= self.outcomes.len();
        }
        o
    }
}

/// A point in a simulation: its time and how much had been recorded.
struct Mark {
    at: Instant,
    events: usize,
    commands: usize,
}

/// A connection, a fake clock and simulated links, with a record of everything that happened.
struct Sim {
    conn: Connection,
    t0: Instant,
    now: Instant,
    links: BTreeMap<PathId, Link>,
    /// Acks on their way: (arrival, path, txid, rtt).
    in_flight: VecDeque<(Instant, PathId, u64, Duration)>,
    /// (sent, path, txid, outcome)
    probes: Vec<(Instant, PathId, u64, Option<Duration>)>,
    /// Acks the connection accepted: (arrival, path, rtt).
    acks: Vec<(Instant, PathId, Duration)>,
    events: Vec<(Instant, ConnEvent)>,
    commands: Vec<(Instant, Command)>,
    receiving: Option<(PathId, Duration, Instant)>,
    sending: Option<(Duration, Instant)>,
}

impl Sim {
    fn new(profile: Profile) -> Sim {
        Sim::with_seed(profile, [9; 32])
    }

    fn with_seed(profile: Profile, seed: [u8; 32]) -> Sim {
        let t0 = Instant::now();
        Sim {
            conn: Connection::new(profile, t0, seed),
            t0,
            now: t0,
            links: BTreeMap::new(),
            in_flight: VecDeque::new(),
            probes: Vec::new(),
            acks: Vec::new(),
            events: Vec::new(),
            commands: Vec::new(),
            receiving: None,
            sending: None,
        }
    }

    /// A busy peer (data both ways every 100 ms, on the direct path) with a direct path
    /// (20 ms) as primary and a relay `eu` (40 ms) standing by.
    fn direct_and_relay() -> Sim {
        let mut sim = Sim::new(Profile::stable());
        sim.add(direct(), Link::up(ms(20)));
        sim.add(relay("eu"), Link::up(ms(40)));
        sim.send_every(ms(100));
        sim.receive_every(&direct(), ms(100));
        sim.run_for(secs(10));
        assert_eq!(sim.conn.primary(), Some(&direct()));
        sim
    }

    /// A busy peer (data both ways every 100 ms, on relay `a`) with relays `a` (primary) and
    /// `b` only.
    fn relays(a: Duration, b: Duration) -> Sim {
        let mut sim = Sim::new(Profile::stable());
        sim.add(relay("a"), Link::up(a));
        sim.add(relay("b"), Link::up(b));
        sim.send_every(ms(100));
        sim.receive_every(&relay("a"), ms(100));
        sim.run_for(secs(10));
        assert_eq!(sim.conn.primary(), Some(&relay("a")));
        sim
    }

    fn profile(&self) -> Profile {
        self.conn.profile().clone()
    }

    fn add(&mut self, path: PathId, link: Link) {
        self.links.insert(path.clone(), link);
        assert!(self.conn.add_path(path, self.now));
        self.drain();
    }

    /// From now on, probes on `path` fare as `link` says.
    fn link(&mut self, path: &PathId, link: Link) {
        self.links.insert(path.clone(), link);
    }

    fn receive_every(&mut self, path: &PathId, every: Duration) {
        self.receiving = Some((path.clone(), every, self.now));
    }

    fn stop_receiving(&mut self) {
        self.receiving = None;
    }

    fn stop_sending(&mut self) {
        self.sending = None;
    }

    /// The path stops working both ways: probes are lost and the peer's data on it stops.
    fn cut(&mut self, path: &PathId) {
        self.link(path, Link::down());
        if self.receiving.as_ref().is_some_and(|r| r.0 == *path) {
            self.stop_receiving();
        }
    }

    fn send_every(&mut self, every: Duration) {
        self.sending = Some((every, self.now));
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Jumps from deadline to deadline (timers, acks, traffic) up to and including `end`.
    fn run_until(&mut self, end: Instant) {
        while self.advance(end) {}
        self.now = end.max(self.now);
    }

    /// Runs until an event matches; returns when it happened. Panics after `limit`.
    fn run_until_event(&mut self, pred: impl Fn(&ConnEvent) -> bool, limit: Duration) -> Instant {
        let seen = self.events.len();
        let end = self.now + limit;
        loop {
            if let Some((t, _)) = self.events[seen..].iter().find(|(_, e)| pred(e)) {
                return *t;
            }
            assert!(
                self.advance(end),
                "no matching event within {limit:?}: {:#?}",
                &self.events[seen..]
            );
        }
    }

    /// Moves the clock to the next deadline if it is at or before `end`, and runs it.
    fn advance(&mut self, end: Instant) -> bool {
        let next = [
            self.conn.poll_timeout(),
            self.in_flight.iter().map(|a| a.0).min(),
            self.receiving.as_ref().map(|r| r.2),
            self.sending.map(|s| s.1),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(t) = next.filter(|t| *t <= end) else {
            return false;
        };
        self.now = t.max(self.now);
        self.step();
        true
    }

    fn step(&mut self) {
        let now = self.now;
        while self.has_due_ack(now) {
            let i = self
                .in_flight
                .iter()
                .enumerate()
                .min_by_key(|(_, a)| a.0)
                .map(|(i, _)| i)
                .unwrap();
            let (_, path, txid, rtt) = self.in_flight.remove(i).unwrap();
            if self.conn.handle_probe_ack(&path, txid, now) {
                self.acks.push((now, path, rtt));
            }
            self.drain();
        }
        if let Some((path, every, at)) = self.receiving.clone().filter(|r| r.2 <= now) {
            self.conn.handle_rx(&path, now);
            self.receiving = Some((path, every, at + every));
        }
        if let Some((every, at)) = self.sending.filter(|s| s.1 <= now) {
            self.conn.handle_tx(now);
            self.sending = Some((every, at + every));
        }
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
            assert!(
                self.conn.poll_timeout().is_none_or(|t| t > now),
                "handle_timeout leaves no deadline in the past"
            );
        }
        self.drain();
    }

    fn has_due_ack(&self, now: Instant) -> bool {
        self.in_flight.iter().any(|a| a.0 <= now)
    }

    fn drain(&mut self) {
        let now = self.now;
        while let Some(tx) = self.conn.poll_transmit() {
            let outcome = self.links.get_mut(&tx.path).and_then(Link::outcome);
            if let Some(rtt) = outcome {
                self.in_flight
                    .push_back((now + rtt, tx.path.clone(), tx.txid, rtt));
            }
            self.probes.push((now, tx.path, tx.txid, outcome));
        }
        while let Some(e) = self.conn.poll_event() {
            self.events.push((now, e));
        }
        while let Some(c) = self.conn.poll_command() {
            self.commands.push((now, c));
        }
    }

    /// The present moment, to compare with later.
    fn mark(&self) -> Mark {
        Mark {
            at: self.now,
            events: self.events.len(),
            commands: self.commands.len(),
        }
    }

    /// Events since `mark`, without the chatter of state changes and paths coming up.
    fn events_since(&self, mark: &Mark) -> Vec<ConnEvent> {
        self.events[mark.events..]
            .iter()
            .map(|(_, e)| e.clone())
            .filter(|e| !matches!(e, ConnEvent::StateChange { .. } | ConnEvent::PathUp { .. }))
            .collect()
    }

    fn commands_since(&self, mark: &Mark) -> Vec<Command> {
        self.commands[mark.commands..]
            .iter()
            .map(|(_, c)| *c)
            .collect()
    }

    fn primary_changes_since(&self, mark: &Mark) -> usize {
        self.events[mark.events..]
            .iter()
            .filter(|(_, e)| matches!(e, ConnEvent::PrimaryChange { .. }))
            .count()
    }

    /// When probes on `path` were sent in `[from, to)`.
    fn probes_on(&self, path: &PathId, from: Instant, to: Instant) -> Vec<Instant> {
        self.probes
            .iter()
            .filter(|(t, p, ..)| p == path && *t >= from && *t < to)
            .map(|(t, ..)| *t)
            .collect()
    }

    fn lost_probes(&self, path: &PathId, from: Instant, to: Instant) -> Vec<Instant> {
        self.probes
            .iter()
            .filter(|(t, p, _, o)| p == path && o.is_none() && *t >= from && *t < to)
            .map(|(t, ..)| *t)
            .collect()
    }

    fn txids_on(&self, path: &PathId) -> Vec<u64> {
        self.probes
            .iter()
            .filter(|(_, p, ..)| p == path)
            .map(|(_, _, txid, _)| *txid)
            .collect()
    }

    /// Accepted acks on `path` that arrived in `(from, to]`.
    fn acks(&self, path: &PathId, from: Instant, to: Instant) -> Vec<Instant> {
        self.acks
            .iter()
            .filter(|(t, p, _)| p == path && *t > from && *t <= to)
            .map(|(t, ..)| *t)
            .collect()
    }

    /// When acks on `path` that took exactly `rtt` arrived.
    fn acks_taking(&self, path: &PathId, rtt: Duration) -> Vec<Instant> {
        self.acks
            .iter()
            .filter(|(_, p, r)| p == path && *r == rtt)
            .map(|(t, ..)| *t)
            .collect()
    }

    fn path_metrics(&self, path: &PathId) -> PathMetrics {
        self.conn
            .metrics()
            .paths
            .into_iter()
            .find(|m| m.path == *path)
            .unwrap()
    }
}

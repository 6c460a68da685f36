//! The punching machine on its own, on a fake clock.

use super::*;

const KEY: [u8; 32] = [4; 32];

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn drain(p: &mut PeerPaths) -> Vec<(PathId, Probe)> {
    std::iter::from_fn(|| p.poll_transmit())
        .map(|(v, b)| (v, Probe::decode(&b, &KEY).unwrap()))
        .collect()
}

fn paths() -> PeerPaths {
    PeerPaths::new(
        [1; 8],
        KEY,
        vec![addr("192.168.1.2:51820"), addr("203.0.113.2:51820")],
        100,
    )
}

#[test]
fn punching_probes_every_candidate_and_an_ack_proves_the_path() {
    let t0 = Instant::now();
    let mut p = paths();
    p.start_punch(t0);
    p.handle_timeout(t0);
    let sent = drain(&mut p);
    assert_eq!(sent.len(), 2);
    let (via, probe) = sent[1].clone();
    let ack = Probe {
        kind: ProbeKind::Ack,
        ..probe
    };
    p.handle_probe(via, ack, t0 + Duration::from_millis(30));
    assert_eq!(p.direct(), Some(addr("203.0.113.2:51820")));
    assert_eq!(
        p.poll_event(),
        Some(PathEvent::DirectUp(addr("203.0.113.2:51820")))
    );
    assert!(!p.is_punching());
}

#[test]
fn a_punch_that_gives_up_keeps_no_memory_of_its_probes() {
    let t0 = Instant::now();
    let mut p = paths();
    p.start_punch(t0);
    let mut t = t0;
    while p.is_punching() {
        p.handle_timeout(t);
        drain(&mut p);
        assert!(p.pending.len() <= 256);
        t = p.poll_timeout().unwrap();
    }
    assert!(t - t0 >= PUNCH_FOR, "gave up after {:?}", t - t0);
    assert_eq!(p.pending.capacity(), 0);
    assert_eq!(p.transmits.capacity(), 0);
}

#[test]
fn an_ack_from_another_address_proves_nothing() {
    let t0 = Instant::now();
    let mut p = paths();
    p.start_punch(t0);
    p.handle_timeout(t0);
    let (_, probe) = drain(&mut p)[0].clone();
    p.handle_probe(
        PathId::Direct(addr("198.51.100.66:1")),
        Probe {
            kind: ProbeKind::Ack,
            ..probe
        },
        t0,
    );
    assert_eq!(p.direct(), None);
}

#[test]
fn an_ack_from_another_address_is_probed_back_then_proven() {
    let t0 = Instant::now();
    let mut p = paths();
    p.start_punch(t0);
    p.handle_timeout(t0);
    let (_, probe) = drain(&mut p)[1].clone();
    // Our probe to 203.0.113.2:51820, answered from the peer's other socket.
    let other = addr("203.0.113.2:40123");
    let ack = |txid| Probe {
        kind: ProbeKind::Ack,
        from: [2; 8],
        txid,
    };
    p.handle_probe(PathId::Direct(other), ack(probe.txid), t0);
    assert_eq!(p.direct(), None, "an ack from elsewhere proves nothing");
    let sent = drain(&mut p);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, PathId::Direct(other));
    p.handle_probe(PathId::Direct(other), ack(sent[0].1.txid), t0);
    assert_eq!(p.direct(), Some(other));
    // An ack naming no probe of ours gets nothing.
    let mut q = paths();
    q.handle_probe(PathId::Direct(other), ack(12345), t0);
    assert!(drain(&mut q).is_empty());
}

#[test]
fn a_probe_is_acked_on_its_path_and_a_new_address_is_probed_back() {
    let t0 = Instant::now();
    let mut p = paths();
    let from = addr("203.0.113.2:40999");
    p.handle_probe(
        PathId::Direct(from),
        Probe {
            kind: ProbeKind::Probe,
            from: [2; 8],
            txid: 7,
        },
        t0,
    );
    let sent = drain(&mut p);
    assert_eq!(sent[0].0, PathId::Direct(from));
    assert_eq!(sent[0].1.kind, ProbeKind::Ack);
    assert_eq!(sent[0].1.txid, 7);
    assert_eq!(sent[1].0, PathId::Direct(from));
    assert_eq!(sent[1].1.kind, ProbeKind::Probe);
    assert!(p.candidates().contains(&from));
}

#[test]
fn forged_probes_from_new_addresses_get_no_more_bytes_than_they_carry() {
    let t0 = Instant::now();
    let mut p = paths();
    let victim = addr("198.51.100.99:7777");
    let mut sent_there = 0;
    for i in 0..1000u64 {
        let t = t0 + Duration::from_millis(i);
        p.handle_probe(
            PathId::Direct(victim),
            Probe {
                kind: ProbeKind::Probe,
                from: [2; 8],
                txid: i,
            },
            t,
        );
        sent_there += drain(&mut p)
            .iter()
            .filter(|(v, _)| *v == PathId::Direct(victim))
            .count();
    }
    // At most one ack per probe (the same size), within the ack budget, and at most 3
    // probes back in one second.
    let most = ACK_RATE as usize * 2 + 3;
    assert!(
        sent_there <= most,
        "{sent_there} probes for 1000 forged ones"
    );
    assert!(
        sent_there >= ACK_RATE as usize,
        "the peer's probes are still acked"
    );
}

#[test]
fn a_probe_through_a_relay_is_acked_through_it() {
    let t0 = Instant::now();
    let mut p = paths();
    p.handle_probe(
        PathId::Relay("r1".into()),
        Probe {
            kind: ProbeKind::Probe,
            from: [2; 8],
            txid: 9,
        },
        t0,
    );
    let sent = drain(&mut p);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, PathId::Relay("r1".into()));
}

#[test]
fn punching_slows_down_then_gives_up_then_retries() {
    let t0 = Instant::now();
    let mut p = paths();
    p.start_punch(t0);
    let mut t = t0;
    let mut rounds = 0;
    while p.is_punching() {
        p.handle_timeout(t);
        drain(&mut p);
        rounds += 1;
        t = p.poll_timeout().unwrap();
    }
    // 2 s at 100 ms, then 8 s at 500 ms.
    assert!((35..=40).contains(&rounds), "{rounds} rounds");
    assert_eq!(p.poll_timeout(), Some(t));
    assert!(t >= t0 + PUNCH_FOR + PUNCH_RETRY[0] - Duration::from_millis(600));
    p.handle_timeout(t);
    assert!(p.is_punching());
}

#[test]
fn hopeless_pairs_do_not_punch() {
    let t0 = Instant::now();
    let mut p = paths();
    p.set_hopeless(true);
    p.start_punch(t0);
    p.handle_timeout(t0);
    assert!(drain(&mut p).is_empty());
}

#[test]
fn forgetting_the_direct_path_punches_again() {
    let t0 = Instant::now();
    let mut p = paths();
    let a = addr("203.0.113.2:51820");
    p.handle_direct_traffic(a);
    assert_eq!(p.poll_event(), Some(PathEvent::DirectUp(a)));
    assert!(!p.is_punching());
    p.forget_direct(t0);
    assert_eq!(p.direct(), None);
    assert!(p.is_punching());
    p.handle_timeout(t0);
    assert_eq!(drain(&mut p).len(), 2, "every candidate is probed again");
}

#[test]
fn a_punch_starts_over_while_a_possibly_stale_direct_address_is_known() {
    let t0 = Instant::now();
    let mut p = paths();
    p.handle_direct_traffic(addr("203.0.113.2:51820"));
    p.poll_event();
    p.start_punch(t0);
    assert!(p.is_punching());
    p.handle_timeout(t0);
    assert_eq!(drain(&mut p).len(), 2, "every candidate is probed");
}

#[test]
fn failed_punches_are_retried_on_the_ladder() {
    let t0 = Instant::now();
    let mut p = paths();
    p.start_punch(t0);
    let mut t = t0;
    let mut retries = Vec::new();
    while retries.len() < 5 {
        let was = p.is_punching();
        p.handle_timeout(t);
        drain(&mut p);
        if was && !p.is_punching() {
            retries.push(p.poll_timeout().unwrap() - t);
        }
        t = p.poll_timeout().unwrap();
    }
    let want: Vec<Duration> = PUNCH_RETRY
        .iter()
        .copied()
        .chain([PUNCH_RETRY[PUNCH_RETRY.len() - 1]])
        .collect();
    assert_eq!(retries, want);
}

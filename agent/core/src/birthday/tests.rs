//! The birthday machine on its own, on a fake clock.

use std::collections::HashSet;
use std::net::IpAddr;

use rally_proto::control::{NatBehavior, NatReport};
use rally_proto::probe::ProbeKind;

use super::*;

const KEY: [u8; 32] = [5; 32];
const ME: ShortId = [1; 8];
const PEER_SHORT: ShortId = [2; 8];

fn report(mapping: NatBehavior, filtering: NatBehavior, public: &str) -> NatReport {
    NatReport {
        udp: true,
        mapping,
        filtering,
        public_endpoint: Some(public.parse().unwrap()),
        ..NatReport::default()
    }
}

fn home() -> NatReport {
    report(
        NatBehavior::EndpointIndependent,
        NatBehavior::AddressAndPortDependent,
        "203.0.113.10:51820",
    )
}

fn symmetric() -> NatReport {
    report(
        NatBehavior::AddressAndPortDependent,
        NatBehavior::AddressAndPortDependent,
        "203.0.113.20:40001",
    )
}

fn drain(b: &mut Birthday) -> Vec<BirthdayOut> {
    std::iter::from_fn(|| b.poll()).collect()
}

/// Runs `b` from `t0` until its attempt ends, returning every output with its time.
fn run(b: &mut Birthday, t0: Instant) -> Vec<(Instant, BirthdayOut)> {
    let mut out = Vec::new();
    let mut t = t0;
    while let Some(next) = b.poll_timeout() {
        if next > t0 + ATTEMPT_FOR + AFTER_PUNCH + Duration::from_secs(1) {
            break;
        }
        t = next.max(t);
        b.handle_timeout(t);
        out.extend(drain(b).into_iter().map(|o| (t, o)));
    }
    out
}

#[test]
fn roles_follow_the_nat_reports() {
    let (h, s) = (home(), symmetric());
    assert_eq!(
        Role::decide(Some(&s), Some(&h)),
        Some(Role::Open {
            target: "203.0.113.10:51820".parse().unwrap()
        })
    );
    assert_eq!(
        Role::decide(Some(&h), Some(&s)),
        Some(Role::Probe {
            ip: "203.0.113.20".parse().unwrap(),
            predict: None
        })
    );
    // Both symmetric, a full cone (ordinary punching works), a port mapping, no report.
    assert_eq!(Role::decide(Some(&s), Some(&s)), None);
    let cone = report(
        NatBehavior::EndpointIndependent,
        NatBehavior::EndpointIndependent,
        "203.0.113.30:51820",
    );
    assert_eq!(Role::decide(Some(&s), Some(&cone)), None);
    assert_eq!(Role::decide(Some(&cone), Some(&s)), None);
    let mapped = NatReport {
        mapped_endpoint: Some("203.0.113.20:51820".parse().unwrap()),
        ..s.clone()
    };
    assert_eq!(Role::decide(Some(&h), Some(&mapped)), None);
    assert_eq!(Role::decide(Some(&h), None), None);
    // A sequential NAT's step is used for prediction; a huge one is not believed.
    let seq = NatReport {
        port_delta: Some(2),
        ..s.clone()
    };
    assert_eq!(
        Role::decide(Some(&h), Some(&seq)),
        Some(Role::Probe {
            ip: "203.0.113.20".parse().unwrap(),
            predict: Some((40001, 2))
        })
    );
    let wild = NatReport {
        port_delta: Some(500),
        ..s
    };
    assert!(matches!(
        Role::decide(Some(&h), Some(&wild)),
        Some(Role::Probe { predict: None, .. })
    ));
}

#[test]
fn the_opener_opens_256_sockets_once_each_then_closes_them() {
    let t0 = Instant::now();
    let target: SocketAddr = "203.0.113.10:51820".parse().unwrap();
    let mut b = Birthday::new(ME, KEY, 1);
    b.arm(t0, Some(Role::Open { target }));
    let out = run(&mut b, t0);
    let sends: Vec<_> = out
        .iter()
        .filter_map(|(t, o)| match o {
            BirthdayOut::SideSend { socket, to, .. } => Some((*t, *socket, *to)),
            _ => None,
        })
        .collect();
    assert_eq!(sends.len(), MAX_SOCKETS as usize);
    assert!(sends.iter().all(|(_, _, to)| *to == target));
    let sockets: HashSet<u16> = sends.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(sockets.len(), MAX_SOCKETS as usize);
    assert!(sends[0].0 >= t0 + AFTER_PUNCH);
    assert!(sends.last().unwrap().0 < sends[0].0 + Duration::from_millis(700));
    let closed: HashSet<u16> = out
        .iter()
        .filter_map(|(_, o)| match o {
            BirthdayOut::Close(s) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(
        closed, sockets,
        "every socket is closed when the attempt fails"
    );
    let r = b.record().unwrap();
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.sockets, MAX_SOCKETS);
    assert!(r.bytes <= MAX_BYTES);
}

#[test]
fn the_prober_stays_within_its_budget_and_rate() {
    let t0 = Instant::now();
    let mut b = Birthday::new(ME, KEY, 2);
    let ip: IpAddr = "203.0.113.20".parse().unwrap();
    b.arm(t0, Some(Role::Probe { ip, predict: None }));
    let out = run(&mut b, t0);
    let probes: Vec<(Instant, SocketAddr)> = out
        .iter()
        .filter_map(|(t, o)| match o {
            BirthdayOut::Probe(a) => Some((*t, *a)),
            _ => None,
        })
        .collect();
    assert_eq!(probes.len(), MAX_PROBES as usize);
    let ports: HashSet<u16> = probes.iter().map(|(_, a)| a.port()).collect();
    assert_eq!(ports.len(), probes.len(), "each port at most once");
    assert!(probes.iter().all(|(_, a)| a.ip() == ip && a.port() >= 1024));
    // At most PROBE_RATE in any second.
    for (i, (t, _)) in probes.iter().enumerate() {
        let within = probes[i..]
            .iter()
            .take_while(|(u, _)| *u < *t + Duration::from_secs(1))
            .count();
        assert!(within <= PROBE_RATE as usize, "{within} probes in a second");
    }
    let r = b.record().unwrap();
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(
        r.bytes <= 300_000 && r.bytes == MAX_BYTES,
        "{} bytes",
        r.bytes
    );
    // A failed attempt asks for another coordinated punch after the first retry step.
    let end = r.ended.unwrap();
    let mut asked = None;
    while let Some(t) = b.poll_timeout() {
        b.handle_timeout(t);
        if drain(&mut b).contains(&BirthdayOut::WantPunch) {
            asked = Some(t);
            break;
        }
    }
    assert_eq!(asked, Some(end + RETRY[0]));
    // A punch armed within MIN_GAP of the last attempt's end starts nothing.
    let mut c = Birthday::new(ME, KEY, 2);
    c.arm(t0, Some(Role::Probe { ip, predict: None }));
    run(&mut c, t0);
    let end = c.record().unwrap().ended.unwrap();
    c.arm(
        end + Duration::from_secs(1),
        Some(Role::Probe { ip, predict: None }),
    );
    assert_eq!(c.poll_timeout(), Some(end + RETRY[0]));
}

#[test]
fn prediction_goes_first() {
    let t0 = Instant::now();
    let mut b = Birthday::new(ME, KEY, 3);
    let ip: IpAddr = "203.0.113.20".parse().unwrap();
    b.arm(
        t0,
        Some(Role::Probe {
            ip,
            predict: Some((40_001, 1)),
        }),
    );
    let ports: Vec<u16> = run(&mut b, t0)
        .into_iter()
        .filter_map(|(_, o)| match o {
            BirthdayOut::Probe(a) => Some(a.port()),
            _ => None,
        })
        .collect();
    let want: Vec<u16> = (40_002..40_002 + PREDICT as u16).collect();
    assert_eq!(&ports[..PREDICT as usize], &want[..]);
    assert_eq!(b.record().unwrap().predicted, PREDICT);
}

#[test]
fn the_socket_that_connects_carries_the_path_and_the_others_close() {
    let t0 = Instant::now();
    let target: SocketAddr = "203.0.113.10:51820".parse().unwrap();
    let mut b = Birthday::new(ME, KEY, 4);
    b.arm(t0, Some(Role::Open { target }));
    let t1 = t0 + AFTER_PUNCH + Duration::from_secs(1);
    let mut t = t0;
    while t < t1 {
        t = b.poll_timeout().unwrap();
        b.handle_timeout(t);
    }
    drain(&mut b);
    // The prober's probe hits socket 7; a probe from elsewhere is ignored.
    let probe = Probe {
        kind: ProbeKind::Probe,
        from: PEER_SHORT,
        txid: 99,
    };
    b.handle_probe(7, "198.51.100.9:1".parse().unwrap(), probe, t);
    assert!(drain(&mut b).is_empty());
    b.handle_probe(7, target, probe, t);
    let out = drain(&mut b);
    assert_eq!(out.len(), 2, "{out:?}");
    let BirthdayOut::SideSend {
        socket: 7,
        to,
        payload,
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!(*to, target);
    assert_eq!(Probe::decode(payload, &KEY).unwrap().kind, ProbeKind::Ack);
    let BirthdayOut::SideSend {
        socket: 7, payload, ..
    } = &out[1]
    else {
        panic!("{out:?}")
    };
    let back = Probe::decode(payload, &KEY).unwrap();
    assert_eq!(back.kind, ProbeKind::Probe);
    // Its ack proves the path: carried by socket 7, every other socket closed.
    let ack = Probe {
        kind: ProbeKind::Ack,
        from: PEER_SHORT,
        txid: back.txid,
    };
    b.handle_probe(7, target, ack, t);
    let out = drain(&mut b);
    assert_eq!(
        out[0],
        BirthdayOut::Carry {
            socket: 7,
            to: target
        }
    );
    assert_eq!(out[1], BirthdayOut::Proven(target));
    let closed: Vec<u16> = out
        .iter()
        .filter_map(|o| match o {
            BirthdayOut::Close(s) => Some(*s),
            _ => None,
        })
        .collect();
    assert!(!closed.contains(&7));
    assert_eq!(closed.len() + 1, b.record().unwrap().sockets as usize);
    assert_eq!(
        b.record().unwrap().outcome,
        Outcome::Direct { predicted: false }
    );
    assert_eq!(b.carried(), Some((7, target)));
    // Losing that path closes the socket.
    b.direct_lost(target);
    assert_eq!(drain(&mut b), vec![BirthdayOut::Close(7)]);
    assert_eq!(b.carried(), None);
}

#[test]
fn an_idle_machine_is_small() {
    // Every peer has one.
    assert!(std::mem::size_of::<Birthday>() <= 64);
}

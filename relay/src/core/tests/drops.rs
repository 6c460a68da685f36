//! Pings, garbage and the drop counters; a property test over random operations.

use super::*;

#[test]
fn ping_is_answered_by_a_pong_of_the_same_size() {
    let mut lab = Lab::new();
    let src = addr("192.0.2.1:1000");
    lab.bind(&agent(1), src, &[PARTY_X]);
    let request = ping(0xfeed);

    let (action, _) = lab.recv(src, &request);

    let Action::Reply(t) = action else {
        panic!("{action:?}")
    };
    assert_eq!(t.to, src);
    assert!(matches!(
        RelayMsg::decode(&t.payload),
        Ok(RelayMsg::Pong { nonce: 0xfeed, .. })
    ));
    assert!(t.payload.len() <= request.len());
}

#[test]
fn garbage_is_dropped_and_counted() {
    let mut lab = Lab::new();
    let src = addr("192.0.2.1:1000");
    let mut stun_response = BindingResponse {
        txid: [1; 12],
        mapped: src,
        other: None,
        origin: None,
    }
    .encode();
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![1, 0, 0, 0, 7, 7, 7, 7], // a WireGuard initiation's first bytes
        vec![0x52, 0x4c, 99, 0],      // unknown relay type
        vec![0x52, 0x4c, 5, 0, 1, 2], // truncated Send
        vec![0x52, 0x4c, 1, 0, 0],    // BindRequest without its padding
    ];
    for g in &garbage {
        let (action, _) = lab.recv(src, g);
        assert_eq!(action, dropped(DropReason::Garbage), "{g:?}");
    }
    let unexpected = [
        RelayMsg::Deliver {
            from: [1; 8],
            payload: b"x",
        }
        .to_vec(),
        RelayMsg::Pong {
            nonce: 1,
            tag: [0; 16],
        }
        .to_vec(),
        RelayMsg::Error {
            code: RelayErrorCode::NotBound,
            tag: None,
        }
        .to_vec(),
        std::mem::take(&mut stun_response),
    ];
    for u in &unexpected {
        let (action, _) = lab.recv(src, u);
        assert_eq!(action, dropped(DropReason::Unexpected), "{u:?}");
    }
    let stats = lab.relay.stats();
    assert_eq!(stats.drops(DropReason::Garbage), garbage.len() as u64);
    assert_eq!(stats.drops(DropReason::Unexpected), unexpected.len() as u64);
    assert_eq!(
        stats.drops_total(),
        (garbage.len() + unexpected.len()) as u64
    );
}

#[test]
fn every_drop_reason_has_its_own_counter_and_name() {
    let mut stats = Stats::default();
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(*r as usize, i);
        for _ in 0..=i {
            stats.count_drop(*r);
        }
    }
    for (i, (r, n)) in stats.drops_by_reason().enumerate() {
        assert_eq!(n, i as u64 + 1, "{r:?}");
    }
    let names: std::collections::BTreeSet<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), DropReason::ALL.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Whatever agents do, every forwarded packet comes from the sender's own session and goes
    /// to a session of an agent sharing a party with it.
    #[test]
    fn no_packet_ever_crosses_parties(ops in proptest::collection::vec(op(), 1..50)) {
        let agents: Vec<(Identity, Vec<[u8; 8]>)> = (0..6u8)
            .map(|i| {
                let parties = [[b'p', 0, 0, 0, 0, 0, 0, 0], [b'q', 0, 0, 0, 0, 0, 0, 0], [b'r', 0, 0, 0, 0, 0, 0, 0]]
                    .into_iter()
                    .enumerate()
                    .filter(|(bit, _)| (i >> bit) & 1 == 1 || (i == 0 && *bit == 0))
                    .map(|(_, p)| p)
                    .collect();
                (agent(10 + i), parties)
            })
            .collect();
        let addrs: Vec<SocketAddr> = (0..5u16).map(|i| SocketAddr::new([192, 0, 2, 1 + (i % 3) as u8].into(), 1000 + i)).collect();
        let mut lab = Lab::with_limits(Limits { max_sessions_per_ip: 3, max_sessions: 4, idle_timeout: Duration::from_secs(20), ..Limits::default() });

        for op in ops {
            match op {
                Op::Bind { agent, addr } => {
                    let (id, parties) = &agents[agent];
                    let _ = lab.try_bind(id, addrs[addr], parties);
                }
                Op::Send { from, to, payload } => {
                    let src = addrs[from];
                    let msg = send_to(&agents[to].0, &payload);
                    let (action, buf) = lab.recv(src, &msg);
                    if let Action::Forward { to: dest, len, .. } = action {
                        prop_assert_eq!(len, msg.len());
                        let Ok(RelayMsg::Deliver { from: sender, payload: got }) = RelayMsg::decode(&buf) else {
                            panic!("forwarded something other than a Deliver");
                        };
                        prop_assert_eq!(got, &payload[..]);
                        let sender = agents.iter().find(|(id, _)| short_id(&id.public()) == sender).expect("a known sender");
                        prop_assert_eq!(lab.relay.session_addr(&short_id(&sender.0.public())), Some(src));
                        let receiver = agents.iter().find(|(id, _)| lab.relay.session_addr(&short_id(&id.public())) == Some(dest)).expect("a bound receiver");
                        prop_assert!(sender.1.iter().any(|p| receiver.1.contains(p)), "crossed parties");
                        prop_assert_eq!(short_id(&receiver.0.public()), short_id(&agents[to].0.public()));
                    }
                }
                Op::Advance(secs) => {
                    lab.advance(Duration::from_secs(secs));
                    lab.relay.handle_timeout(lab.now, lab.unix);
                }
                Op::Raw { from, bytes } => {
                    let (action, _) = lab.recv(addrs[from], &bytes);
                    prop_assert!(!matches!(action, Action::Forward { .. }), "raw bytes cannot be forwarded without a session: {:?}", action);
                }
            }
        }
        let stats = lab.relay.stats();
        prop_assert!(stats.sessions_active <= 4);
    }
}

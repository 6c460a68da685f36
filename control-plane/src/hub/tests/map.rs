//! The peer map: full maps and deltas, pages, leaving, names and relays.

use super::*;

#[test]
fn a_joiner_gets_a_full_map_and_members_get_one_delta_for_a_burst() {
    let mut t = TestHub::new();
    let mut owner = t.register(1);
    t.drain(&owner);
    let code = t.create_party(&mut owner, "lan");
    let msgs = t.drain(&owner);
    assert!(
        matches!(&msgs[..], [ServerMsg::Relays { .. }]),
        "a new party renews the creator's relay token: {msgs:?}"
    );
    let mut joiners: Vec<Agent> = (2..=4).map(|i| t.register(i)).collect();
    for j in &mut joiners {
        t.join(j, &code);
    }
    let msgs = t.drain(&owner);
    let [ServerMsg::PeerDelta { version, changes }] = &msgs[..] else {
        panic!("expected one delta, got {msgs:?}");
    };
    assert_eq!(*version, 2);
    let mut names: Vec<_> = changes
        .iter()
        .map(|c| match c {
            PeerChange::Upsert { peer } => peer.name.clone(),
            PeerChange::Remove { .. } => panic!("unexpected remove"),
        })
        .collect();
    names.sort();
    assert_eq!(names, ["a2", "a3", "a4"]);
    let msgs = t.drain(&joiners[2]);
    assert!(matches!(msgs[0], ServerMsg::Relays { .. }), "{msgs:?}");
    let ServerMsg::PeerMap { peers, .. } = &msgs[1] else {
        panic!("expected a full map, got {msgs:?}");
    };
    assert_eq!(peers.len(), 3);
    assert!(peers.iter().all(|p| p.parties == ["lan"]));
}

#[test]
fn leaving_removes_the_agent_from_its_former_peers() {
    let mut t = TestHub::new();
    let (owner, mut bob) = t.owner_and_member();
    t.ok(
        &mut bob,
        Request::LeaveParty {
            party: "lan".into(),
        },
    );
    assert_eq!(
        t.drain(&owner),
        vec![ServerMsg::PeerDelta {
            version: 2,
            changes: vec![PeerChange::Remove { peer_id: bob.id }]
        }]
    );
    // Bob is in no party now: relays without a token, an empty map.
    let msgs = t.drain(&bob);
    assert!(
        matches!(&msgs[..], [ServerMsg::Relays { token, .. }, ServerMsg::PeerMap { peers, .. }] if token.is_empty() && peers.is_empty()),
        "{msgs:?}"
    );
}

#[test]
fn endpoint_update_is_one_upsert_and_sync_peers_sends_a_full_map() {
    let mut t = TestHub::new();
    let (mut owner, mut bob) = t.owner_and_member();
    let eps: Vec<SocketAddr> = vec!["203.0.113.7:4000".parse().unwrap()];
    t.ok(
        &mut bob,
        Request::UpdateEndpoints {
            endpoints: eps.clone(),
        },
    );
    let msgs = t.drain(&owner);
    let [ServerMsg::PeerDelta { changes, .. }] = &msgs[..] else {
        panic!("expected one delta, got {msgs:?}");
    };
    assert!(matches!(&changes[..], [PeerChange::Upsert { peer }] if peer.endpoints == eps));
    t.ok(&mut owner, Request::SyncPeers);
    let msgs = t.drain(&owner);
    let [ServerMsg::PeerMap { version, peers }] = &msgs[..] else {
        panic!("expected a full map, got {msgs:?}");
    };
    assert_eq!(*version, 3);
    assert_eq!(peers[0].endpoints, eps);
}

#[test]
fn a_party_too_large_for_one_frame_arrives_as_pages_the_agent_assembles() {
    // Members with the largest NAT report allowed: ~6 KB each on the wire, so 800 of them make
    // a full map over the 4 MiB frame limit.
    // Members are written to the store directly (registration is tested elsewhere).
    let mut t = TestHub::new();
    let mut owner = t.register(0);
    let code = t.create_party(&mut owner, "big");
    let party = InviteCode::decode(&code).unwrap();
    let nat = serde_json::to_string(&max_nat()).unwrap();
    for i in 1..=800u32 {
        let mut id = [7u8; 32];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let id = Key32(id);
        let store = &mut t.hub.store;
        store
            .register_agent(&id, &format!("n{i}"), &id, &[], 1)
            .unwrap();
        store.set_nat(&id, &nat).unwrap();
        store
            .redeem_invite(party.party_id, &party.secret, &id, 1)
            .unwrap()
            .unwrap();
    }
    t.drain(&owner);
    t.ok(&mut owner, Request::SyncPeers);
    let frames = t.frames(&owner);
    let total: usize = frames.iter().map(Vec::len).sum();
    assert!(
        total > rally_proto::MAX_FRAME_LEN,
        "the map is {total} bytes"
    );
    assert!(frames.len() > 1);
    let mut pages = MapPages::new();
    let mut view = PeerView::new();
    for f in &frames {
        assert!(f.len() - 4 <= rally_proto::MAX_FRAME_LEN);
        match frame::decode::<ServerMsg>(f).expect("every frame decodes") {
            ServerMsg::PeerPage { version, peers } => pages.handle_page(version, peers).unwrap(),
            ServerMsg::PeerMap { version, peers } => {
                view.handle_full(version, pages.handle_map(version, peers).unwrap());
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(view.len(), 800);
    assert!(view.peers().all(|p| p.nat.as_ref() == Some(&max_nat())));
}

#[test]
fn a_name_taken_in_the_party_is_numbered_and_kept_across_restarts() {
    let mut t = TestHub::new();
    let mut a = t.try_register(1, "laptop", [1; 32], vec![]).unwrap();
    let code = t.create_party(&mut a, "home");
    t.drain(&a);
    let mut b = t.try_register(2, "laptop", [2; 32], vec![]).unwrap();
    // Bob hears his new name in the join's answer.
    assert_eq!(t.join(&mut b, &code).as_deref(), Some("laptop-2"));
    let map = t.drain(&a);
    let names: Vec<_> = map
        .iter()
        .flat_map(|m| match m {
            ServerMsg::PeerDelta { changes, .. } => changes.clone(),
            _ => vec![],
        })
        .map(|c| match c {
            PeerChange::Upsert { peer } => peer.name,
            PeerChange::Remove { .. } => String::new(),
        })
        .collect();
    assert_eq!(names, ["laptop-2"]);
    // Bob restarts asking for "laptop" again: he stays laptop-2.
    let (_, name) = t.register_named(2, "laptop", [2; 32]).unwrap();
    assert_eq!(name, "laptop-2");
    // Alice leaves: the name is free and bob gets it back on his next registration.
    t.ok(
        &mut a,
        Request::LeaveParty {
            party: "home".into(),
        },
    );
    assert_eq!(t.register_named(2, "laptop", [2; 32]).unwrap().1, "laptop");
}

#[test]
fn an_agent_in_no_party_gets_the_relays_but_no_token() {
    let mut t = TestHub::new();
    let mut a = t.register(1);
    let msgs = t.drain(&a);
    assert!(
        msgs.iter().any(
            |m| matches!(m, ServerMsg::Relays { token, expires_at: 0, .. } if token.is_empty())
        ),
        "{msgs:?}"
    );
    assert_eq!(
        t.refused(&mut a, Request::RelayToken).code,
        ErrorCode::NotFound
    );
    t.create_party(&mut a, "x");
    assert!(matches!(
        t.request(&mut a, Request::RelayToken),
        Ok(Response::RelayToken { .. })
    ));
    let msgs = t.drain(&a);
    assert!(
        msgs.iter()
            .any(|m| matches!(m, ServerMsg::Relays { token, .. } if !token.is_empty())),
        "{msgs:?}"
    );
}

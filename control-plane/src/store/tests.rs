use super::sqlite::MIGRATIONS;
use super::*;
use rally_proto::Overlay;

fn store(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("c.db"), Overlay::default()).unwrap()
}

fn invite(secret: u8) -> NewInvite {
    NewInvite {
        secret: [secret; 16],
        expires_at: Some(1000),
        max_uses: Some(2),
    }
}

fn register(s: &mut SqliteStore, k: u8) -> AgentRow {
    s.register_agent(
        &Key32([k; 32]),
        &format!("a{k}"),
        &Key32([k + 100; 32]),
        &[],
        1,
    )
    .unwrap()
}

#[test]
fn virtual_ip_survives_reopen_and_reregistration() {
    let dir = tempfile::tempdir().unwrap();
    let ip = register(&mut store(&dir), 1).virtual_ip;
    let mut s = store(&dir);
    assert_eq!(register(&mut s, 1).virtual_ip, ip);
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
}

#[test]
fn invite_is_refused_when_expired_used_up_or_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&dir);
    let owner = register(&mut s, 1);
    for k in 2..=5 {
        register(&mut s, k);
    }
    s.create_party([9; 8], "lan", &owner.identity, invite(7), 1)
        .unwrap();
    let join = |s: &mut SqliteStore, k: u8, secret: u8, now| {
        s.redeem_invite([9; 8], &[secret; 16], &Key32([k; 32]), now)
            .unwrap()
    };
    assert_eq!(join(&mut s, 2, 8, 10), Err(InviteRefusal::Unknown));
    assert_eq!(join(&mut s, 2, 7, 1000), Err(InviteRefusal::Expired));
    assert_eq!(join(&mut s, 2, 7, 10).unwrap().members, 2);
    assert_eq!(join(&mut s, 3, 7, 10).unwrap().members, 3);
    assert_eq!(
        join(&mut s, 4, 7, 10),
        Err(InviteRefusal::UsedUp { max_uses: 2 })
    );
    // A member joining again uses nothing and is not refused.
    assert_eq!(join(&mut s, 3, 7, 10).unwrap().members, 3);
}

#[test]
fn peers_are_only_those_sharing_a_party() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&dir);
    let a = register(&mut s, 1);
    let b = register(&mut s, 2);
    let c = register(&mut s, 3);
    let stranger = register(&mut s, 4);
    s.create_party([1; 8], "x", &a.identity, invite(1), 1)
        .unwrap();
    s.create_party([2; 8], "y", &c.identity, invite(2), 1)
        .unwrap();
    s.redeem_invite([1; 8], &[1; 16], &b.identity, 1)
        .unwrap()
        .unwrap();
    let peers_of_a: Vec<_> = s.peers_of(&a.identity).unwrap();
    assert_eq!(peers_of_a.len(), 1);
    assert_eq!(peers_of_a[0].0, b);
    assert_eq!(peers_of_a[0].1, vec!["x".to_string()]);
    assert!(s.peers_of(&c.identity).unwrap().is_empty());
    assert!(s.peers_of(&stranger.identity).unwrap().is_empty());
    s.leave_party([1; 8], &b.identity).unwrap();
    assert!(s.peers_of(&a.identity).unwrap().is_empty());
}

#[test]
fn unjoined_agents_are_found_and_removed_but_members_and_owners_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&dir);
    let owner = register(&mut s, 1);
    let member = register(&mut s, 2);
    let idle = register(&mut s, 3);
    s.create_party([1; 8], "x", &owner.identity, invite(1), 1)
        .unwrap();
    s.redeem_invite([1; 8], &[1; 16], &member.identity, 1)
        .unwrap()
        .unwrap();
    // The owner leaves its party but still owns it.
    s.leave_party([1; 8], &owner.identity).unwrap();
    assert_eq!(s.unjoined_before(2).unwrap(), vec![idle.identity]);
    assert!(s.unjoined_before(1).unwrap().is_empty(), "seen at 1");
    s.touch_agent(&idle.identity, 10).unwrap();
    assert!(s.unjoined_before(5).unwrap().is_empty());
    assert!(!s.remove_unjoined(&member.identity).unwrap());
    assert!(!s.remove_unjoined(&owner.identity).unwrap());
    assert!(s.remove_unjoined(&idle.identity).unwrap());
    assert_eq!(s.agent(&idle.identity).unwrap(), None);
    // Its virtual IP is free again: the same identity gets it back.
    assert_eq!(register(&mut s, 3).virtual_ip, idle.virtual_ip);
}

#[test]
fn wg_key_holder_and_rename() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&dir);
    let a = register(&mut s, 1);
    assert_eq!(s.wg_key_holder(&a.wg_key).unwrap(), Some(a.identity));
    assert_eq!(s.wg_key_holder(&Key32([7; 32])).unwrap(), None);
    s.rename_agent(&a.identity, "a-2").unwrap();
    assert_eq!(s.agent(&a.identity).unwrap().unwrap().name, "a-2");
}

#[test]
fn endpoints_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store(&dir);
    let a = register(&mut s, 1);
    let b = register(&mut s, 2);
    s.create_party([1; 8], "x", &a.identity, invite(1), 1)
        .unwrap();
    s.redeem_invite([1; 8], &[1; 16], &b.identity, 1)
        .unwrap()
        .unwrap();
    let eps: Vec<SocketAddr> = vec![
        "198.51.100.2:51820".parse().unwrap(),
        "[2001:db8::1]:5".parse().unwrap(),
    ];
    s.set_endpoints(&b.identity, &eps).unwrap();
    assert_eq!(s.peers_of(&a.identity).unwrap()[0].0.endpoints, eps);
    assert_eq!(s.agent(&b.identity).unwrap().unwrap().endpoints, eps);
    assert_eq!(s.agent(&Key32([9; 32])).unwrap(), None);
}

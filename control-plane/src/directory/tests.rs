use super::*;
use crate::store::{InviteRefusal, SqliteStore};
use rally_proto::Overlay;

#[test]
fn joins_and_leaves_match_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = cached(&dir);
    for k in 1..=4 {
        register(&mut s, k);
    }
    s.create_party([1; 8], "x", &key(1), invite(1), 1).unwrap();
    s.create_party([2; 8], "y", &key(3), invite(2), 1).unwrap();
    join(&mut s, [1; 8], 1, 2);
    join(&mut s, [1; 8], 1, 3);
    join(&mut s, [2; 8], 2, 2);
    assert_same_as_database(&s, &dir, 4);
    assert_eq!(names(&s, 2, 3), ["x", "y"]);
    s.leave_party([1; 8], &key(2)).unwrap();
    assert_same_as_database(&s, &dir, 4);
    assert_eq!(names(&s, 2, 3), ["y"]);
    assert!(!s.share_party(&key(1), &key(2)));
    assert!(s.share_party(&key(1), &key(3)));
}

#[test]
fn a_refused_join_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = cached(&dir);
    register(&mut s, 1);
    register(&mut s, 2);
    s.create_party([1; 8], "x", &key(1), invite(1), 1).unwrap();
    let r = s.redeem_invite([1; 8], &[9; 16], &key(2), 1).unwrap();
    assert_eq!(r, Err(InviteRefusal::Unknown));
    assert!(s.peers_of(&key(1)).unwrap().is_empty());
    assert_same_as_database(&s, &dir, 2);
}

#[test]
fn a_party_everyone_left_is_gone_and_comes_back_on_a_join() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = cached(&dir);
    register(&mut s, 1);
    register(&mut s, 2);
    s.create_party([1; 8], "x", &key(1), invite(1), 1).unwrap();
    s.leave_party([1; 8], &key(1)).unwrap();
    assert!(s.parties.is_empty());
    assert!(s.parties_of(&key(1)).unwrap().is_empty());
    join(&mut s, [1; 8], 1, 2);
    join(&mut s, [1; 8], 1, 1);
    assert_eq!(s.parties_of(&key(2)).unwrap()[0].members, 2);
    assert_same_as_database(&s, &dir, 2);
}

#[test]
fn a_restart_reloads_agents_and_membership_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = cached(&dir);
        for k in 1..=3 {
            register(&mut s, k);
        }
        s.create_party([1; 8], "x", &key(1), invite(1), 1).unwrap();
        join(&mut s, [1; 8], 1, 2);
        join(&mut s, [1; 8], 1, 3);
        s.leave_party([1; 8], &key(3)).unwrap();
        let eps: Vec<SocketAddr> = vec!["198.51.100.2:51820".parse().unwrap()];
        s.set_endpoints(&key(2), &eps).unwrap();
        s.set_nat(&key(2), "{\"not\":\"a nat report\"}").unwrap();
    }
    let s = cached(&dir);
    assert_same_as_database(&s, &dir, 3);
    let peers = s.peers_of(&key(1)).unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].0.endpoints.len(), 1);
    assert!(peers[0].0.nat.is_some());
}

#[test]
fn reregistering_keeps_the_nat_report_and_renews_the_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = cached(&dir);
    register(&mut s, 1);
    register(&mut s, 2);
    s.create_party([1; 8], "x", &key(1), invite(1), 1).unwrap();
    join(&mut s, [1; 8], 1, 2);
    s.set_nat(&key(2), "{}").unwrap();
    let before = s.encoded_peers_of(&key(1));
    s.register_agent(&key(2), "renamed", &key(2), &[], 2)
        .unwrap();
    assert_same_as_database(&s, &dir, 2);
    let after = s.encoded_peers_of(&key(1));
    assert_ne!(before, after);
    let decoded: PeerInfo = serde_json::from_slice(after[0].json()).unwrap();
    assert_eq!(decoded.name, "renamed");
    assert_eq!(decoded.parties, ["x"]);
}

#[test]
fn encodings_are_shared_and_match_serde() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = cached(&dir);
    for k in 1..=3 {
        register(&mut s, k);
    }
    s.create_party([1; 8], "x", &key(1), invite(1), 1).unwrap();
    join(&mut s, [1; 8], 1, 2);
    join(&mut s, [1; 8], 1, 3);
    let audience = s.audience(&key(1));
    assert_eq!(audience.len(), 2);
    // Agent 1 as agents 2 and 3 see it: one encoding.
    assert!(Arc::ptr_eq(&audience[0].1, &audience[1].1));
    let (row, parties) = s.peers_of(&key(2)).unwrap().remove(0);
    let expected = PeerInfo {
        peer_id: row.identity,
        name: row.name,
        wg_key: row.wg_key,
        virtual_ip: row.virtual_ip,
        endpoints: row.endpoints,
        parties,
        nat: None,
    };
    assert_eq!(
        audience[0].1.json(),
        &serde_json::to_vec(&expected.wire()).unwrap()[..]
    );
}

/// Every read the cache answers from memory agrees with the database, read afresh.
fn assert_same_as_database(s: &CachedStore, dir: &tempfile::TempDir, agents: u8) {
    let db = SqliteStore::open(&dir.path().join("c.db"), Overlay::default()).unwrap();
    for k in 1..=agents {
        let id = key(k);
        assert_eq!(s.agent(&id).unwrap(), db.agent(&id).unwrap(), "agent {k}");
        assert_eq!(
            s.parties_of(&id).unwrap(),
            db.parties_of(&id).unwrap(),
            "parties of {k}"
        );
        assert_eq!(
            s.peers_of(&id).unwrap(),
            db.peers_of(&id).unwrap(),
            "peers of {k}"
        );
    }
}

fn names(s: &CachedStore, a: u8, b: u8) -> Vec<String> {
    s.peers_of(&key(a))
        .unwrap()
        .into_iter()
        .find(|(r, _)| r.identity == key(b))
        .map(|(_, p)| p)
        .unwrap_or_default()
}

fn cached(dir: &tempfile::TempDir) -> CachedStore {
    let db = SqliteStore::open(&dir.path().join("c.db"), Overlay::default()).unwrap();
    CachedStore::load(Box::new(db)).unwrap()
}

fn key(k: u8) -> Key32 {
    Key32([k; 32])
}

fn register(s: &mut CachedStore, k: u8) {
    s.register_agent(&key(k), &format!("a{k}"), &Key32([k + 100; 32]), &[], 1)
        .unwrap();
}

fn invite(secret: u8) -> NewInvite {
    NewInvite {
        secret: [secret; 16],
        expires_at: None,
        max_uses: None,
    }
}

fn join(s: &mut CachedStore, party: [u8; 8], secret: u8, k: u8) {
    s.redeem_invite(party, &[secret; 16], &key(k), 1)
        .unwrap()
        .unwrap();
}

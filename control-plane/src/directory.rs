//! The control plane's working copy of agents and party membership, in memory, in front of the
//! [`Store`].
//!
//! [`CachedStore`] is itself a [`Store`]: every write goes to the backing store first and, once
//! it succeeded, to memory; reads of agents, parties and peers are answered from memory, so a
//! join costs no SQL read. The backing store stays the source of truth: the cache is loaded from
//! it on start ([`Store::snapshot`]) and holds nothing the store does not. It assumes this
//! process is the store's only writer (a shared backend for several instances would need the
//! cache invalidated by the others' writes).
//!
//! Peers also come pre-encoded ([`EncodedPeer`]): the JSON of a peer as some recipients see it
//! is built once per change and shared by every outbox it goes to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use rally_proto::{Key32, NatReport, PeerInfo};

use crate::invites::{Admission, InviteKey, StoredInvite};
use crate::store::{AgentRow, NewInvite, PartyRow, Snapshot, Store, StoreError};

/// A peer's entry in peer maps and deltas (`[peer_id, name, …]` as JSON), for recipients that
/// share exactly `parties` with it.
#[derive(Debug, PartialEq, Eq)]
pub struct EncodedPeer {
    pub peer_id: Key32,
    /// The ids of the shared parties (what the encoding is cached by).
    party_ids: Vec<[u8; 8]>,
    json: Box<[u8]>,
}

impl EncodedPeer {
    pub fn new(peer: &PeerInfo) -> Self {
        Self::with_ids(peer, Vec::new())
    }

    fn with_ids(peer: &PeerInfo, party_ids: Vec<[u8; 8]>) -> Self {
        EncodedPeer {
            peer_id: peer.peer_id,
            party_ids,
            // Our own types serialize infallibly (no maps with non-string keys).
            json: serde_json::to_vec(&peer.wire())
                .expect("PeerInfo serializes")
                .into(),
        }
    }

    /// The peer's JSON in its wire form, exactly as `serde_json` writes [`PeerInfo::wire`].
    pub fn json(&self) -> &[u8] {
        &self.json
    }
}

/// A [`Store`] with agents and membership held in memory; see the module docs.
pub struct CachedStore {
    inner: Box<dyn Store>,
    agents: HashMap<Key32, Agent>,
    parties: HashMap<[u8; 8], Party>,
    /// The parties each agent belongs to.
    member_of: HashMap<Key32, BTreeSet<[u8; 8]>>,
    /// Which agent holds each WireGuard key.
    wg_keys: HashMap<Key32, Key32>,
}

struct Agent {
    row: AgentRow,
    /// The row's NAT report, parsed (`None` also when it does not parse, as before).
    nat: Option<NatReport>,
    /// Encodings of this agent by shared party ids (usually one); cleared when the row changes.
    encoded: Vec<Arc<EncodedPeer>>,
}

struct Party {
    name: String,
    owner: Key32,
    members: BTreeSet<Key32>,
}

/// Encodings kept per agent (one per distinct set of shared parties seen).
const ENCODINGS_PER_AGENT: usize = 4;

impl CachedStore {
    /// Loads every agent and membership from `inner`.
    pub fn load(inner: Box<dyn Store>) -> Result<Self, StoreError> {
        let Snapshot { agents, parties } = inner.snapshot()?;
        let mut s = CachedStore {
            inner,
            agents: HashMap::with_capacity(agents.len()),
            parties: HashMap::with_capacity(parties.len()),
            member_of: HashMap::new(),
            wg_keys: HashMap::new(),
        };
        for row in agents {
            s.put_agent(row);
        }
        for (p, members) in parties {
            for m in members {
                s.add_member(&p, m);
            }
        }
        Ok(s)
    }

    /// The peers of `id` (agents sharing at least one party with it), in peer-id order, each
    /// encoded with the parties they share.
    pub fn encoded_peers_of(&mut self, id: &Key32) -> Vec<Arc<EncodedPeer>> {
        self.shared_with(id)
            .into_iter()
            .filter_map(|(peer, parties)| self.encoded(&peer, &parties))
            .collect()
    }

    /// For each peer of `subject`: the peer, `subject` as that peer sees it, and the peer as
    /// `subject` sees it. In peer-id order.
    pub fn audience(
        &mut self,
        subject: &Key32,
    ) -> Vec<(Key32, Arc<EncodedPeer>, Arc<EncodedPeer>)> {
        let mut out = Vec::new();
        for (peer, parties) in self.shared_with(subject) {
            let Some(them) = self.encoded(&peer, &parties) else {
                continue;
            };
            let Some(me) = self.encoded(subject, &parties) else {
                return Vec::new();
            };
            out.push((peer, me, them));
        }
        out
    }

    /// The agents sharing a party with `id`, in peer-id order.
    pub fn peer_ids(&self, id: &Key32) -> Vec<Key32> {
        self.shared_with(id).into_keys().collect()
    }

    /// Whether `a` and `b` share a party.
    pub fn share_party(&self, a: &Key32, b: &Key32) -> bool {
        match (self.member_of.get(a), self.member_of.get(b)) {
            (Some(x), Some(y)) => a != b && !x.is_disjoint(y),
            _ => false,
        }
    }

    /// The names of the members of `party` other than `except`.
    pub fn member_names(&self, party: &[u8; 8], except: &Key32) -> BTreeSet<String> {
        let Some(p) = self.parties.get(party) else {
            return BTreeSet::new();
        };
        p.members
            .iter()
            .filter(|m| *m != except)
            .filter_map(|m| Some(self.agents.get(m)?.row.name.clone()))
            .collect()
    }

    /// The names of the agents sharing a party with `id`.
    pub fn peer_names(&self, id: &Key32) -> BTreeSet<String> {
        self.shared_with(id)
            .keys()
            .filter_map(|m| Some(self.agents.get(m)?.row.name.clone()))
            .collect()
    }

    /// How many parties `id` belongs to.
    pub fn party_count(&self, id: &Key32) -> usize {
        self.member_of.get(id).map_or(0, BTreeSet::len)
    }

    /// Whether `id` belongs to `party`.
    pub fn is_member(&self, id: &Key32, party: &[u8; 8]) -> bool {
        self.member_of.get(id).is_some_and(|s| s.contains(party))
    }

    /// Agents sharing a party with `id`, with the ids of the shared parties (in id order).
    fn shared_with(&self, id: &Key32) -> BTreeMap<Key32, Vec<[u8; 8]>> {
        let mut out: BTreeMap<Key32, Vec<[u8; 8]>> = BTreeMap::new();
        let Some(mine) = self.member_of.get(id) else {
            return out;
        };
        for pid in mine {
            let Some(p) = self.parties.get(pid) else {
                continue;
            };
            for m in &p.members {
                if m != id && self.agents.contains_key(m) {
                    out.entry(*m).or_default().push(*pid);
                }
            }
        }
        out
    }

    /// The names of parties, sorted (as peer entries list them).
    fn party_names(&self, ids: &[[u8; 8]]) -> Vec<String> {
        let mut names: Vec<String> = ids
            .iter()
            .filter_map(|id| Some(self.parties.get(id)?.name.clone()))
            .collect();
        names.sort();
        names
    }

    fn encoded(&mut self, id: &Key32, party_ids: &[[u8; 8]]) -> Option<Arc<EncodedPeer>> {
        let a = self.agents.get(id)?;
        if let Some(e) = a.encoded.iter().find(|e| e.party_ids == party_ids) {
            return Some(e.clone());
        }
        let names = self.party_names(party_ids);
        let a = self.agents.get_mut(id)?;
        let e = Arc::new(EncodedPeer::with_ids(
            &peer_info(a, names),
            party_ids.to_vec(),
        ));
        if a.encoded.len() >= ENCODINGS_PER_AGENT {
            a.encoded.remove(0);
        }
        a.encoded.push(e.clone());
        Some(e)
    }

    fn put_agent(&mut self, row: AgentRow) {
        if let Some(old) = self.agents.get(&row.identity) {
            if self.wg_keys.get(&old.row.wg_key) == Some(&row.identity) {
                self.wg_keys.remove(&old.row.wg_key);
            }
        }
        self.wg_keys.insert(row.wg_key, row.identity);
        let nat = row
            .nat
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok());
        self.agents.insert(
            row.identity,
            Agent {
                row,
                nat,
                encoded: Vec::new(),
            },
        );
    }

    fn add_member(&mut self, p: &PartyRow, agent: Key32) {
        self.parties
            .entry(p.id)
            .or_insert_with(|| Party {
                name: p.name.clone(),
                owner: p.owner,
                members: BTreeSet::new(),
            })
            .members
            .insert(agent);
        self.member_of.entry(agent).or_default().insert(p.id);
    }

    fn remove_member(&mut self, party: [u8; 8], agent: &Key32) {
        if let Some(p) = self.parties.get_mut(&party) {
            p.members.remove(agent);
            if p.members.is_empty() {
                // Nobody can see an empty party; a later join brings it back from its row.
                self.parties.remove(&party);
            }
        }
        if let Some(set) = self.member_of.get_mut(agent) {
            set.remove(&party);
            if set.is_empty() {
                self.member_of.remove(agent);
            }
        }
    }
}

impl Store for CachedStore {
    fn register_agent(
        &mut self,
        identity: &Key32,
        name: &str,
        wg_key: &Key32,
        endpoints: &[SocketAddr],
        now: u64,
    ) -> Result<AgentRow, StoreError> {
        let mut row = self
            .inner
            .register_agent(identity, name, wg_key, endpoints, now)?;
        // Registration leaves the stored NAT report as it was.
        row.nat = self.agents.get(identity).and_then(|a| a.row.nat.clone());
        self.put_agent(row.clone());
        Ok(row)
    }

    fn set_endpoints(
        &mut self,
        identity: &Key32,
        endpoints: &[SocketAddr],
    ) -> Result<(), StoreError> {
        self.inner.set_endpoints(identity, endpoints)?;
        if let Some(a) = self.agents.get_mut(identity) {
            a.row.endpoints = endpoints.to_vec();
            a.encoded.clear();
        }
        Ok(())
    }

    fn set_nat(&mut self, identity: &Key32, nat_json: &str) -> Result<(), StoreError> {
        self.inner.set_nat(identity, nat_json)?;
        if let Some(a) = self.agents.get(identity) {
            let row = AgentRow {
                nat: Some(nat_json.to_owned()),
                ..a.row.clone()
            };
            self.put_agent(row);
        }
        Ok(())
    }

    fn create_party(
        &mut self,
        id: [u8; 8],
        name: &str,
        owner: &Key32,
        invite: NewInvite,
        now: u64,
    ) -> Result<PartyRow, StoreError> {
        let row = self.inner.create_party(id, name, owner, invite, now)?;
        self.add_member(&row, *owner);
        Ok(row)
    }

    fn invite(
        &self,
        key: &InviteKey,
        identity: &Key32,
    ) -> Result<Option<StoredInvite>, StoreError> {
        self.inner.invite(key, identity)
    }

    fn admit(
        &mut self,
        key: &InviteKey,
        identity: &Key32,
        admission: Admission,
        now: u64,
    ) -> Result<PartyRow, StoreError> {
        let row = self.inner.admit(key, identity, admission, now)?;
        self.add_member(&row, *identity);
        Ok(row)
    }

    fn leave_party(&mut self, party: [u8; 8], identity: &Key32) -> Result<(), StoreError> {
        self.inner.leave_party(party, identity)?;
        self.remove_member(party, identity);
        Ok(())
    }

    fn rename_agent(&mut self, identity: &Key32, name: &str) -> Result<(), StoreError> {
        self.inner.rename_agent(identity, name)?;
        if let Some(a) = self.agents.get_mut(identity) {
            a.row.name = name.to_owned();
            a.encoded.clear();
        }
        Ok(())
    }

    fn wg_key_holder(&self, wg_key: &Key32) -> Result<Option<Key32>, StoreError> {
        Ok(self.wg_keys.get(wg_key).copied())
    }

    fn touch_agent(&mut self, identity: &Key32, now: u64) -> Result<(), StoreError> {
        self.inner.touch_agent(identity, now)
    }

    fn unjoined_before(&self, before: u64) -> Result<Vec<Key32>, StoreError> {
        self.inner.unjoined_before(before)
    }

    fn remove_unjoined(&mut self, identity: &Key32) -> Result<bool, StoreError> {
        if !self.inner.remove_unjoined(identity)? {
            return Ok(false);
        }
        if let Some(a) = self.agents.remove(identity) {
            if self.wg_keys.get(&a.row.wg_key) == Some(identity) {
                self.wg_keys.remove(&a.row.wg_key);
            }
        }
        Ok(true)
    }

    fn parties_of(&self, identity: &Key32) -> Result<Vec<PartyRow>, StoreError> {
        let mut out: Vec<PartyRow> = self
            .member_of
            .get(identity)
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let p = self.parties.get(id)?;
                Some(PartyRow {
                    id: *id,
                    name: p.name.clone(),
                    owner: p.owner,
                    members: p.members.len() as u32,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        Ok(out)
    }

    fn agent(&self, identity: &Key32) -> Result<Option<AgentRow>, StoreError> {
        Ok(self.agents.get(identity).map(|a| a.row.clone()))
    }

    fn peers_of(&self, identity: &Key32) -> Result<Vec<(AgentRow, Vec<String>)>, StoreError> {
        Ok(self
            .shared_with(identity)
            .into_iter()
            .filter_map(|(id, parties)| {
                Some((
                    self.agents.get(&id)?.row.clone(),
                    self.party_names(&parties),
                ))
            })
            .collect())
    }

    fn counts(&self) -> Result<(u64, u64), StoreError> {
        self.inner.counts()
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.inner.snapshot()
    }
}

fn peer_info(a: &Agent, parties: Vec<String>) -> PeerInfo {
    PeerInfo {
        peer_id: a.row.identity,
        name: a.row.name.clone(),
        wg_key: a.row.wg_key,
        virtual_ip: a.row.virtual_ip,
        endpoints: a.row.endpoints.clone(),
        parties,
        nat: a.nat.clone(),
    }
}

#[cfg(test)]
mod tests {
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
}

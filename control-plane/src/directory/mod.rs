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
mod tests;

//! What one session still has to push about peers: a bounded "latest state", never a queue.
//!
//! Changes are keyed by peer, so a burst of updates to one peer leaves one entry, and a session
//! that cannot keep up holds at most [`MAX_PENDING_CHANGES`] entries (beyond that the outbox
//! forgets them and asks for a full map to be read from the store instead). A full map taken in
//! absorbs later changes. Messages are numbered per session: every [`PeerOutbox::poll_message`]
//! carries the next version, which is what lets the agent detect a gap
//! ([`rally_proto::PeerView`]).
//!
//! Sans-IO: the tokio layer feeds changes in and drains messages out.

use std::collections::BTreeMap;

use rally_proto::{Key32, PeerChange, PeerInfo, ServerMsg};

/// Changes held for one session before they are replaced by a full map.
pub const MAX_PENDING_CHANGES: usize = 256;

#[derive(Debug)]
enum Full {
    /// Deltas will do.
    No,
    /// A full map is due and must be read from the store.
    Stale,
    /// A full map is due and is at hand (later changes are folded in).
    Ready(BTreeMap<Key32, PeerInfo>),
}

/// The peer-map pushes pending for one session.
#[derive(Debug)]
pub struct PeerOutbox {
    version: u64,
    full: Full,
    changes: BTreeMap<Key32, PeerChange>,
    relays: bool,
}

impl Default for PeerOutbox {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerOutbox {
    /// A new session's outbox: its first message will be a full map.
    pub fn new() -> Self {
        PeerOutbox {
            version: 0,
            full: Full::Stale,
            changes: BTreeMap::new(),
            relays: false,
        }
    }

    /// One peer changed; keeps only its latest state.
    pub fn handle_change(&mut self, change: PeerChange) {
        match &mut self.full {
            Full::Stale => {}
            Full::Ready(map) => match change {
                PeerChange::Upsert { peer } => {
                    map.insert(peer.peer_id, peer);
                }
                PeerChange::Remove { peer_id } => {
                    map.remove(&peer_id);
                }
            },
            Full::No => {
                self.changes.insert(change.peer_id(), change);
                if self.changes.len() > MAX_PENDING_CHANGES {
                    self.changes.clear();
                    self.full = Full::Stale;
                }
            }
        }
    }

    /// The session's complete peer list as the store holds it now; replaces whatever was
    /// pending.
    pub fn handle_full(&mut self, peers: Vec<PeerInfo>) {
        self.changes.clear();
        self.full = Full::Ready(peers.into_iter().map(|p| (p.peer_id, p)).collect());
    }

    /// The agent asked for a full map (or the session's view is otherwise unknown).
    pub fn handle_resync(&mut self) {
        self.changes.clear();
        self.full = Full::Stale;
    }

    /// The agent's own parties changed: its relay token must be renewed.
    pub fn handle_parties_changed(&mut self) {
        self.relays = true;
    }

    /// Whether a full map must be read from the store (and given to
    /// [`PeerOutbox::handle_full`]) before [`PeerOutbox::poll_message`] can produce one.
    pub fn needs_full_read(&self) -> bool {
        matches!(self.full, Full::Stale)
    }

    /// Whether a fresh relay token is due; clears the flag.
    pub fn poll_relays(&mut self) -> bool {
        std::mem::take(&mut self.relays)
    }

    /// The next message to push: a full map if one is due, else one delta with every pending
    /// change, each carrying the next version. `None` if nothing is pending or the full map must
    /// be read first.
    pub fn poll_message(&mut self) -> Option<ServerMsg> {
        match std::mem::replace(&mut self.full, Full::No) {
            Full::Stale => {
                self.full = Full::Stale;
                None
            }
            Full::Ready(map) => {
                self.version += 1;
                Some(ServerMsg::PeerMap {
                    version: self.version,
                    peers: map.into_values().collect(),
                })
            }
            Full::No if self.changes.is_empty() => None,
            Full::No => {
                self.version += 1;
                Some(ServerMsg::PeerDelta {
                    version: self.version,
                    changes: std::mem::take(&mut self.changes).into_values().collect(),
                })
            }
        }
    }

    /// Changes held for the next delta.
    pub fn pending_changes(&self) -> usize {
        self.changes.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn new_session_waits_for_a_full_map() {
        let mut o = PeerOutbox::new();
        o.handle_change(upsert(peer(1, "a")));
        assert!(o.needs_full_read());
        assert_eq!(o.poll_message(), None);
        o.handle_full(vec![peer(1, "a")]);
        assert_eq!(o.poll_message(), Some(full(1, vec![peer(1, "a")])));
        assert_eq!(o.poll_message(), None);
    }

    #[test]
    fn changes_to_one_peer_coalesce_to_the_latest() {
        let mut o = synced();
        o.handle_change(upsert(peer(2, "old")));
        o.handle_change(upsert(peer(2, "new")));
        o.handle_change(upsert(peer(3, "c")));
        o.handle_change(remove(3));
        assert_eq!(o.pending_changes(), 2);
        assert_eq!(
            o.poll_message(),
            Some(delta(2, vec![upsert(peer(2, "new")), remove(3)]))
        );
        assert_eq!(o.poll_message(), None);
    }

    #[test]
    fn versions_grow_by_one_per_message() {
        let mut o = synced();
        for v in 2..5 {
            o.handle_change(upsert(peer(v as u8, "x")));
            let Some(ServerMsg::PeerDelta { version, .. }) = o.poll_message() else {
                panic!("no delta");
            };
            assert_eq!(version, v);
        }
        o.handle_resync();
        o.handle_full(vec![]);
        assert_eq!(o.poll_message(), Some(full(5, vec![])));
    }

    #[test]
    fn a_pending_full_map_absorbs_later_changes() {
        let mut o = synced();
        o.handle_full(vec![peer(1, "a"), peer(2, "b")]);
        o.handle_change(remove(1));
        o.handle_change(upsert(peer(2, "b2")));
        o.handle_change(upsert(peer(3, "c")));
        assert_eq!(
            o.poll_message(),
            Some(full(2, vec![peer(2, "b2"), peer(3, "c")]))
        );
        assert_eq!(o.poll_message(), None);
    }

    #[test]
    fn too_many_pending_changes_become_a_full_read() {
        let mut o = synced();
        for i in 0..=MAX_PENDING_CHANGES {
            let mut p = peer(0, "x");
            p.peer_id.0[..8].copy_from_slice(&(i as u64).to_be_bytes());
            o.handle_change(upsert(p));
        }
        assert_eq!(o.pending_changes(), 0);
        assert!(o.needs_full_read());
        assert_eq!(o.poll_message(), None);
        o.handle_full(vec![peer(1, "a")]);
        assert_eq!(o.poll_message(), Some(full(2, vec![peer(1, "a")])));
    }

    #[test]
    fn resync_drops_pending_changes() {
        let mut o = synced();
        o.handle_change(upsert(peer(2, "b")));
        o.handle_resync();
        assert_eq!(o.pending_changes(), 0);
        assert!(o.needs_full_read());
    }

    #[test]
    fn relay_flag_is_taken_once() {
        let mut o = synced();
        assert!(!o.poll_relays());
        o.handle_parties_changed();
        assert!(o.poll_relays());
        assert!(!o.poll_relays());
    }

    /// An outbox that has sent its first full map (version 1).
    fn synced() -> PeerOutbox {
        let mut o = PeerOutbox::new();
        o.handle_full(vec![]);
        assert!(o.poll_message().is_some());
        o
    }

    fn peer(i: u8, name: &str) -> PeerInfo {
        PeerInfo {
            peer_id: Key32([i; 32]),
            name: name.into(),
            wg_key: Key32([i; 32]),
            virtual_ip: Ipv4Addr::new(10, 66, 0, i),
            endpoints: vec![],
            parties: vec!["lan".into()],
            nat: None,
        }
    }

    fn upsert(peer: PeerInfo) -> PeerChange {
        PeerChange::Upsert { peer }
    }

    fn remove(i: u8) -> PeerChange {
        PeerChange::Remove {
            peer_id: Key32([i; 32]),
        }
    }

    fn full(version: u64, peers: Vec<PeerInfo>) -> ServerMsg {
        ServerMsg::PeerMap { version, peers }
    }

    fn delta(version: u64, changes: Vec<PeerChange>) -> ServerMsg {
        ServerMsg::PeerDelta { version, changes }
    }
}

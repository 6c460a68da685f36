//! The agent's copy of its peer map, kept in step with the control plane's pushes.
//!
//! The control plane numbers the peer-map messages of one session: a full
//! [`ServerMsg::PeerMap`](crate::ServerMsg::PeerMap) sets the version, and each
//! [`ServerMsg::PeerDelta`](crate::ServerMsg::PeerDelta) must carry the next one. A delta that
//! does not follow (a gap, a repeat, or one before any full map) is refused with
//! [`DeltaError::Gap`]: the caller asks for a full map (`Request::SyncPeers`), and later deltas
//! are refused with [`DeltaError::AwaitingFull`] until it arrives.
//!
//! Applying a delta costs O(changes · log n); a full map is diffed against the view. Either way
//! the caller learns only what changed, as [`PeerEvent`]s, so it never rebuilds per-peer state
//! for peers that did not change. A peer is held once, behind an [`Arc`] the view and its events
//! share: taking a change moves the decoded peer in, it never copies it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::control::{PeerChange, PeerInfo};
use crate::key::Key32;

/// What changed in the view, one peer at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer the view did not hold.
    Added(Arc<PeerInfo>),
    /// A peer the view held, with at least one field changed; carries the new state.
    Updated(Arc<PeerInfo>),
    /// A peer the view no longer holds; carries its last state.
    Removed(Arc<PeerInfo>),
}

impl PeerEvent {
    /// The peer this event is about.
    pub fn peer_id(&self) -> Key32 {
        match self {
            PeerEvent::Added(p) | PeerEvent::Updated(p) | PeerEvent::Removed(p) => p.peer_id,
        }
    }
}

/// Why a delta was not applied. Either way the view is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta does not follow the view's version: ask for a full map.
    #[error("peer-map delta {got} does not follow version {have:?}; a full map is needed")]
    Gap { have: Option<u64>, got: u64 },
    /// A full map was already asked for; deltas wait for it.
    #[error("peer-map delta {got} ignored while a full map is awaited")]
    AwaitingFull { got: u64 },
}

/// Most peers one full map may hold: the overlay (a /16) has no room for more agents.
pub const MAX_MAP_PEERS: usize = 1 << 16;

/// Why the pages of a full map were not assembled. Either way the pages held so far are
/// dropped; the session is out of step and the caller reconnects (or asks for a full map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// A page (or the closing map) of another version than the pages before it.
    #[error("peer-map page of version {got} inside the pages of version {have}")]
    Version { have: u64, got: u64 },
    /// A delta arrived between the pages of a full map.
    #[error("peer-map delta {got} inside the pages of full map {have}")]
    DeltaInside { have: u64, got: u64 },
    /// More peers than any map may hold.
    #[error("a paged peer map of more than {MAX_MAP_PEERS} peers")]
    TooManyPeers,
}

/// Assembles a full map sent as pages ([`crate::ServerMsg::PeerPage`]s followed by the
/// [`crate::ServerMsg::PeerMap`] of the same version) into one, for [`PeerView::handle_full`].
/// Holds at most [`MAX_MAP_PEERS`] peers.
#[derive(Clone, Debug, Default)]
pub struct MapPages {
    pending: Option<(u64, Vec<PeerInfo>)>,
}

impl MapPages {
    pub fn new() -> Self {
        Self::default()
    }

    /// A page that is not the last: kept until the map that closes it.
    pub fn handle_page(&mut self, version: u64, peers: Vec<PeerInfo>) -> Result<(), PageError> {
        let (v, held) = self.pending.get_or_insert_with(|| (version, Vec::new()));
        if *v != version {
            let have = *v;
            self.pending = None;
            return Err(PageError::Version { have, got: version });
        }
        if held.len().saturating_add(peers.len()) > MAX_MAP_PEERS {
            self.pending = None;
            return Err(PageError::TooManyPeers);
        }
        held.extend(peers);
        Ok(())
    }

    /// The map that closes the pages (or a map sent whole): every peer of the map.
    pub fn handle_map(
        &mut self,
        version: u64,
        peers: Vec<PeerInfo>,
    ) -> Result<Vec<PeerInfo>, PageError> {
        let Some((v, mut held)) = self.pending.take() else {
            return Ok(peers);
        };
        if v != version {
            return Err(PageError::Version {
                have: v,
                got: version,
            });
        }
        if held.len().saturating_add(peers.len()) > MAX_MAP_PEERS {
            return Err(PageError::TooManyPeers);
        }
        held.extend(peers);
        Ok(held)
    }

    /// A delta: refused while pages are held (the control plane never sends one there).
    pub fn handle_delta(&mut self, version: u64) -> Result<(), PageError> {
        match self.pending.take() {
            Some((have, _)) => Err(PageError::DeltaInside { have, got: version }),
            None => Ok(()),
        }
    }

    /// Drops held pages (the session ended).
    pub fn reset(&mut self) {
        self.pending = None;
    }

    /// Peers held from pages not yet closed.
    pub fn held(&self) -> usize {
        self.pending.as_ref().map_or(0, |(_, p)| p.len())
    }
}

/// A versioned peer map, ordered by peer id.
#[derive(Clone, Debug, Default)]
pub struct PeerView {
    version: Option<u64>,
    awaiting_full: bool,
    peers: BTreeMap<Key32, Arc<PeerInfo>>,
}

impl PeerView {
    /// An empty view with no version: the first message it accepts is a full map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the view with peers from a local cache (no version: the next delta asks for a
    /// full map). Returns what changed.
    pub fn handle_cached(&mut self, peers: Vec<PeerInfo>) -> Vec<PeerEvent> {
        let events = self.replace(peers);
        self.version = None;
        events
    }

    /// Replaces the view with a full map at `version`. Returns what changed against the view
    /// it replaces (peers equal in every field produce nothing).
    pub fn handle_full(&mut self, version: u64, peers: Vec<PeerInfo>) -> Vec<PeerEvent> {
        let events = self.replace(peers);
        self.version = Some(version);
        self.awaiting_full = false;
        events
    }

    /// Applies a delta that must carry the version after the view's. Returns what changed.
    pub fn handle_delta(
        &mut self,
        version: u64,
        changes: Vec<PeerChange>,
    ) -> Result<Vec<PeerEvent>, DeltaError> {
        if self.awaiting_full {
            return Err(DeltaError::AwaitingFull { got: version });
        }
        let follows = self
            .version
            .and_then(|v| v.checked_add(1))
            .is_some_and(|next| next == version);
        if !follows {
            self.awaiting_full = true;
            return Err(DeltaError::Gap {
                have: self.version,
                got: version,
            });
        }
        self.version = Some(version);
        Ok(changes.into_iter().filter_map(|c| self.apply(c)).collect())
    }

    /// Whether a full map has been asked for and not yet received.
    pub fn awaiting_full(&self) -> bool {
        self.awaiting_full
    }

    /// The version of the last full map or delta applied (`None` before any, or after
    /// [`PeerView::handle_cached`]).
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn get(&self, id: &Key32) -> Option<&PeerInfo> {
        self.peers.get(id).map(|p| &**p)
    }

    /// The peers in peer-id order.
    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.values().map(|p| &**p)
    }

    /// The peers in peer-id order, as the shared handles events carry.
    pub fn shared_peers(&self) -> impl Iterator<Item = &Arc<PeerInfo>> {
        self.peers.values()
    }

    fn apply(&mut self, change: PeerChange) -> Option<PeerEvent> {
        match change {
            PeerChange::Upsert { peer } => match self.peers.get_mut(&peer.peer_id) {
                Some(old) if **old == peer => None,
                Some(old) => {
                    let peer = Arc::new(peer);
                    *old = peer.clone();
                    Some(PeerEvent::Updated(peer))
                }
                None => {
                    let peer = Arc::new(peer);
                    self.peers.insert(peer.peer_id, peer.clone());
                    Some(PeerEvent::Added(peer))
                }
            },
            PeerChange::Remove { peer_id } => self.peers.remove(&peer_id).map(PeerEvent::Removed),
        }
    }

    fn replace(&mut self, peers: Vec<PeerInfo>) -> Vec<PeerEvent> {
        let mut old = std::mem::take(&mut self.peers);
        let mut events = Vec::new();
        for peer in peers {
            let id = peer.peer_id;
            let event = match old.remove(&id) {
                // Unchanged: keep the handle the caller already has.
                Some(prev) if *prev == peer => {
                    self.peers.insert(id, prev);
                    continue;
                }
                Some(_) => PeerEvent::Updated,
                None if self.peers.contains_key(&id) => {
                    // A repeated id in one map: the later entry wins.
                    events.retain(|e: &PeerEvent| e.peer_id() != id);
                    PeerEvent::Added
                }
                None => PeerEvent::Added,
            };
            let peer = Arc::new(peer);
            events.push(event(peer.clone()));
            self.peers.insert(id, peer);
        }
        events.extend(old.into_values().map(PeerEvent::Removed));
        events
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn full_map_adds_every_peer_and_sets_the_version() {
        let mut v = PeerView::new();
        let events = v.handle_full(1, vec![peer(1), peer(2)]);
        assert_eq!(
            events,
            vec![
                PeerEvent::Added(Arc::new(peer(1))),
                PeerEvent::Added(Arc::new(peer(2)))
            ]
        );
        assert_eq!(v.version(), Some(1));
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn delta_adds_a_peer() {
        let mut v = view_at(1, &[1]);
        let events = v.handle_delta(2, vec![upsert(peer(2))]).unwrap();
        assert_eq!(events, vec![PeerEvent::Added(Arc::new(peer(2)))]);
        assert_eq!(v.len(), 2);
        assert_eq!(v.version(), Some(2));
    }

    #[test]
    fn delta_updates_a_peer() {
        let mut v = view_at(1, &[1, 2]);
        let mut moved = peer(2);
        moved.endpoints = vec!["203.0.113.9:4000".parse().unwrap()];
        let events = v.handle_delta(2, vec![upsert(moved.clone())]).unwrap();
        assert_eq!(events, vec![PeerEvent::Updated(Arc::new(moved.clone()))]);
        assert_eq!(v.get(&moved.peer_id), Some(&moved));
    }

    #[test]
    fn delta_removes_a_peer() {
        let mut v = view_at(1, &[1, 2]);
        let events = v.handle_delta(2, vec![remove(1)]).unwrap();
        assert_eq!(events, vec![PeerEvent::Removed(Arc::new(peer(1)))]);
        assert_eq!(v.peers().cloned().collect::<Vec<_>>(), vec![peer(2)]);
    }

    #[test]
    fn unchanged_upsert_and_unknown_remove_report_nothing() {
        let mut v = view_at(1, &[1]);
        let events = v.handle_delta(2, vec![upsert(peer(1)), remove(9)]).unwrap();
        assert!(events.is_empty());
        assert_eq!(v.version(), Some(2));
    }

    #[test]
    fn gap_is_refused_until_a_full_map_arrives() {
        let mut v = view_at(1, &[1]);
        assert_eq!(
            v.handle_delta(3, vec![upsert(peer(3))]),
            Err(DeltaError::Gap {
                have: Some(1),
                got: 3
            })
        );
        assert!(v.awaiting_full());
        // The delta that would have followed is no longer enough.
        assert_eq!(
            v.handle_delta(2, vec![upsert(peer(2))]),
            Err(DeltaError::AwaitingFull { got: 2 })
        );
        assert_eq!(v.len(), 1);
        let events = v.handle_full(4, vec![peer(2), peer(3)]);
        assert_eq!(
            events,
            vec![
                PeerEvent::Added(Arc::new(peer(2))),
                PeerEvent::Added(Arc::new(peer(3))),
                PeerEvent::Removed(Arc::new(peer(1)))
            ]
        );
        assert!(!v.awaiting_full());
        assert_eq!(v.handle_delta(5, vec![remove(2)]).unwrap().len(), 1);
    }

    #[test]
    fn repeated_or_old_delta_is_a_gap() {
        let mut v = view_at(5, &[1]);
        assert!(matches!(
            v.handle_delta(5, vec![remove(1)]),
            Err(DeltaError::Gap { .. })
        ));
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn delta_before_any_full_map_is_a_gap() {
        let mut v = PeerView::new();
        assert_eq!(
            v.handle_delta(1, vec![upsert(peer(1))]),
            Err(DeltaError::Gap { have: None, got: 1 })
        );
        assert!(v.is_empty());
    }

    #[test]
    fn cached_peers_need_a_full_map_before_deltas() {
        let mut v = PeerView::new();
        assert_eq!(v.handle_cached(vec![peer(1)]).len(), 1);
        assert!(matches!(
            v.handle_delta(1, vec![]),
            Err(DeltaError::Gap { have: None, .. })
        ));
        // The full map reports only what differs from the cache.
        assert_eq!(
            v.handle_full(1, vec![peer(1), peer(2)]),
            vec![PeerEvent::Added(Arc::new(peer(2)))]
        );
    }

    #[test]
    fn full_map_reports_only_differences() {
        let mut v = view_at(1, &[1, 2, 3]);
        let mut renamed = peer(2);
        renamed.name = "renamed".into();
        let events = v.handle_full(2, vec![peer(1), renamed.clone(), peer(4)]);
        assert_eq!(
            events,
            vec![
                PeerEvent::Updated(Arc::new(renamed)),
                PeerEvent::Added(Arc::new(peer(4))),
                PeerEvent::Removed(Arc::new(peer(3)))
            ]
        );
    }

    #[test]
    fn repeated_id_in_a_full_map_keeps_the_last() {
        let mut v = PeerView::new();
        let mut second = peer(1);
        second.name = "second".into();
        let events = v.handle_full(1, vec![peer(1), second.clone()]);
        assert_eq!(events, vec![PeerEvent::Added(Arc::new(second.clone()))]);
        assert_eq!(v.get(&second.peer_id), Some(&second));
    }

    #[test]
    fn pages_are_assembled_into_the_closing_map() {
        let mut pages = MapPages::new();
        pages.handle_page(4, vec![peer(1), peer(2)]).unwrap();
        pages.handle_page(4, vec![peer(3)]).unwrap();
        assert_eq!(pages.held(), 3);
        let all = pages.handle_map(4, vec![peer(4)]).unwrap();
        assert_eq!(all, vec![peer(1), peer(2), peer(3), peer(4)]);
        assert_eq!(pages.held(), 0);
        // A map sent whole passes through.
        assert_eq!(pages.handle_map(5, vec![peer(9)]).unwrap(), vec![peer(9)]);
        assert_eq!(pages.handle_delta(6), Ok(()));
    }

    #[test]
    fn pages_of_another_version_or_a_delta_inside_are_refused() {
        let mut pages = MapPages::new();
        pages.handle_page(4, vec![peer(1)]).unwrap();
        assert_eq!(
            pages.handle_page(5, vec![peer(2)]),
            Err(PageError::Version { have: 4, got: 5 })
        );
        assert_eq!(pages.held(), 0);
        pages.handle_page(6, vec![peer(1)]).unwrap();
        assert_eq!(
            pages.handle_map(7, vec![]),
            Err(PageError::Version { have: 6, got: 7 })
        );
        pages.handle_page(8, vec![peer(1)]).unwrap();
        assert_eq!(
            pages.handle_delta(9),
            Err(PageError::DeltaInside { have: 8, got: 9 })
        );
        assert_eq!(pages.held(), 0);
    }

    #[test]
    fn pages_beyond_the_largest_map_are_refused() {
        let mut pages = MapPages::new();
        let many: Vec<PeerInfo> = (0..MAX_MAP_PEERS).map(|_| peer(1)).collect();
        pages.handle_page(1, many).unwrap();
        assert_eq!(
            pages.handle_page(1, vec![peer(2)]),
            Err(PageError::TooManyPeers)
        );
        assert_eq!(pages.held(), 0);
    }

    proptest::proptest! {
        #[test]
        fn any_sequence_of_pages_maps_and_deltas_is_handled(
            ops in proptest::collection::vec((0u8..3, 0u64..4, 0u8..6), 0..40)
        ) {
            let mut pages = MapPages::new();
            let mut view = PeerView::new();
            for (kind, version, n) in ops {
                let peers: Vec<PeerInfo> = (0..n).map(peer).collect();
                match kind {
                    0 => {
                        let before = pages.held();
                        match pages.handle_page(version, peers) {
                            Ok(()) => proptest::prop_assert_eq!(pages.held(), before + n as usize),
                            Err(_) => proptest::prop_assert_eq!(pages.held(), 0),
                        }
                    }
                    1 => {
                        if let Ok(all) = pages.handle_map(version, peers) {
                            view.handle_full(version, all);
                            proptest::prop_assert_eq!(view.version(), Some(version));
                        }
                        proptest::prop_assert_eq!(pages.held(), 0);
                    }
                    _ => {
                        if pages.handle_delta(version).is_ok() {
                            let _ = view.handle_delta(version, vec![]);
                        }
                        proptest::prop_assert_eq!(pages.held(), 0);
                    }
                }
            }
        }
    }

    fn view_at(version: u64, ids: &[u8]) -> PeerView {
        let mut v = PeerView::new();
        v.handle_full(version, ids.iter().map(|&i| peer(i)).collect());
        v
    }

    fn peer(i: u8) -> PeerInfo {
        PeerInfo {
            peer_id: Key32([i; 32]),
            name: format!("p{i}"),
            wg_key: Key32([i.wrapping_add(100); 32]),
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
}

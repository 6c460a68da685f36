//! What one session still has to push about peers: a bounded "latest state", never a queue.
//!
//! Changes are keyed by peer, so a burst of updates to one peer leaves one entry, and a session
//! that cannot keep up holds at most [`MAX_PENDING_CHANGES`] entries (beyond that the outbox
//! forgets them and asks for a full map to be read from the store instead). A full map taken in
//! absorbs later changes. Messages are numbered per session: every [`PeerOutbox::poll_message`]
//! carries the next version, which is what lets the agent detect a gap
//! ([`rally_proto::PeerView`]).
//!
//! Peers are held as shared [`EncodedPeer`]s (one JSON encoding per change, whatever the number
//! of recipients), and messages come out as finished frames spliced from them: byte for byte
//! what `frame::encode` makes of the equivalent [`rally_proto::ServerMsg`].
//!
//! No frame exceeds the page budget ([`PAGE_BUDGET`], a quarter of the agents' frame limit):
//! a larger full map goes out as `peer_page`s closed by a `peer_map` of the same version, and a
//! larger batch of changes as several deltas of consecutive versions. One peer entry is bounded
//! by the request checks (name, endpoints, NAT report, parties), far below the budget.
//!
//! Sans-IO: the tokio layer feeds changes in and drains messages out.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use rally_proto::{Key32, PeerChange};

use crate::directory::EncodedPeer;

/// Changes held for one session before they are replaced by a full map.
pub const MAX_PENDING_CHANGES: usize = 256;
/// Largest frame body the outbox builds when it can split (every frame holds at least one
/// entry): a quarter of [`rally_proto::MAX_FRAME_LEN`].
pub const PAGE_BUDGET: usize = rally_proto::MAX_FRAME_LEN / 4;

/// One peer's latest state for a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The peer as it is now (added, or changed in any field).
    Upsert(Arc<EncodedPeer>),
    /// The peer no longer shares a party with the session's agent.
    Remove(Key32),
}

impl Change {
    fn peer_id(&self) -> Key32 {
        match self {
            Change::Upsert(p) => p.peer_id,
            Change::Remove(id) => *id,
        }
    }
}

/// A peer-map message ready for the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// A full `peer_map` or one of its `peer_page`s (else a `peer_delta`).
    pub full: bool,
    /// The whole frame: length prefix and JSON body.
    pub frame: Vec<u8>,
}

#[derive(Debug)]
enum Full {
    /// Deltas will do.
    No,
    /// A full map is due and must be read from the store.
    Stale,
    /// A full map is due and is at hand (later changes are folded in).
    Ready(BTreeMap<Key32, Arc<EncodedPeer>>),
}

/// The peer-map pushes pending for one session.
#[derive(Debug)]
pub struct PeerOutbox {
    version: u64,
    full: Full,
    changes: BTreeMap<Key32, Change>,
    relays: bool,
    /// Frames of the last message built, not yet taken (pages of a map, parts of a delta).
    ready: VecDeque<Push>,
    page_budget: usize,
}

impl Default for PeerOutbox {
    fn default() -> Self {
        Self::new()
    }
}

impl PeerOutbox {
    /// A new session's outbox: its first message will be a full map.
    pub fn new() -> Self {
        Self::with_page_budget(PAGE_BUDGET)
    }

    /// An outbox whose frames stay within `budget` bytes of body where they can be split.
    pub fn with_page_budget(budget: usize) -> Self {
        PeerOutbox {
            version: 0,
            full: Full::Stale,
            changes: BTreeMap::new(),
            relays: false,
            ready: VecDeque::new(),
            page_budget: budget,
        }
    }

    /// One peer changed; keeps only its latest state.
    pub fn handle_change(&mut self, change: Change) {
        match &mut self.full {
            Full::Stale => {}
            Full::Ready(map) => match change {
                Change::Upsert(peer) => {
                    map.insert(peer.peer_id, peer);
                }
                Change::Remove(peer_id) => {
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
    pub fn handle_full(&mut self, peers: Vec<Arc<EncodedPeer>>) {
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

    /// The next frame to push: the rest of a message already built, else a full map if one is
    /// due (as pages if it is large), else the pending changes (as several deltas if they are
    /// many). Each message carries the next version; the pages of one map share it. `None` if
    /// nothing is pending or the full map must be read first.
    pub fn poll_message(&mut self) -> Option<Push> {
        if let Some(p) = self.ready.pop_front() {
            return Some(p);
        }
        match std::mem::replace(&mut self.full, Full::No) {
            Full::Stale => {
                self.full = Full::Stale;
                return None;
            }
            Full::Ready(map) => {
                self.version += 1;
                let frames = full_frames(self.version, &map, self.page_budget);
                self.ready
                    .extend(frames.into_iter().map(|frame| Push { full: true, frame }));
            }
            Full::No if self.changes.is_empty() => return None,
            Full::No => {
                let changes = std::mem::take(&mut self.changes);
                for part in split_changes(changes.into_values(), self.page_budget) {
                    self.version += 1;
                    self.ready.push_back(Push {
                        full: false,
                        frame: delta_frame(self.version, &part),
                    });
                }
            }
        }
        self.ready.pop_front()
    }

    /// Changes held for the next delta.
    pub fn pending_changes(&self) -> usize {
        self.changes.len()
    }
}

/// `{"type":"peer_page","version":V,"peers":[…]}` frames, each within `budget` bytes where
/// it holds more than one peer, closed by `{"type":"peer_map","version":V,"peers":[…]}`.
fn full_frames(
    version: u64,
    peers: &BTreeMap<Key32, Arc<EncodedPeer>>,
    budget: usize,
) -> Vec<Vec<u8>> {
    let mut pages: Vec<Vec<&EncodedPeer>> = vec![Vec::new()];
    let mut size = FRAME_OVERHEAD;
    for p in peers.values() {
        let len = p.json().len() + 1;
        let page = pages.last_mut().expect("one page at least");
        if !page.is_empty() && size + len > budget {
            pages.push(Vec::new());
            size = FRAME_OVERHEAD;
        }
        size += len;
        pages.last_mut().expect("one page at least").push(p);
    }
    let last = pages.len() - 1;
    pages
        .iter()
        .enumerate()
        .map(|(i, page)| {
            let kind = if i == last { "peer_map" } else { "peer_page" };
            let size: usize = page.iter().map(|p| p.json().len() + 1).sum();
            let mut out = Vec::with_capacity(FRAME_OVERHEAD + size);
            start_frame(&mut out, kind, version, "peers");
            for (i, p) in page.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(p.json());
            }
            end_frame(out)
        })
        .collect()
}

/// Changes in peer-id order, cut into parts whose deltas stay within `budget` bytes.
fn split_changes(changes: impl Iterator<Item = Change>, budget: usize) -> Vec<Vec<Change>> {
    let mut parts: Vec<Vec<Change>> = vec![Vec::new()];
    let mut size = FRAME_OVERHEAD;
    for c in changes {
        let len = match &c {
            Change::Upsert(p) => p.json().len() + UPSERT_OVERHEAD,
            Change::Remove(_) => REMOVE_LEN,
        };
        if parts.last().is_some_and(|p| !p.is_empty()) && size + len > budget {
            parts.push(Vec::new());
            size = FRAME_OVERHEAD;
        }
        size += len;
        parts.last_mut().expect("one part at least").push(c);
    }
    parts
}

/// `{"type":"peer_delta","version":V,"changes":[…]}` as one frame.
fn delta_frame(version: u64, changes: &[Change]) -> Vec<u8> {
    let size: usize = changes
        .iter()
        .map(|c| match c {
            Change::Upsert(p) => p.json().len() + UPSERT_OVERHEAD,
            Change::Remove(_) => REMOVE_LEN,
        })
        .sum();
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + size);
    start_frame(&mut out, "peer_delta", version, "changes");
    for (i, c) in changes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match c {
            Change::Upsert(p) => {
                out.extend_from_slice(br#"{"op":"upsert","peer":"#);
                out.extend_from_slice(p.json());
                out.push(b'}');
            }
            Change::Remove(peer_id) => {
                let change = PeerChange::Remove { peer_id: *peer_id };
                serde_json::to_writer(&mut out, &change).expect("PeerChange serializes");
            }
        }
    }
    end_frame(out)
}

/// Room for a frame's length, type, version and brackets.
const FRAME_OVERHEAD: usize = 64;
/// `{"op":"upsert","peer":` … `},`
const UPSERT_OVERHEAD: usize = 25;
/// `{"op":"remove","peer_id":"<43>"},`
const REMOVE_LEN: usize = 72;

fn start_frame(out: &mut Vec<u8>, kind: &str, version: u64, list: &str) {
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(
        format!(r#"{{"type":"{kind}","version":{version},"{list}":["#).as_bytes(),
    );
}

fn end_frame(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(b"]}");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rally_proto::{frame, PeerInfo, ServerMsg};

    use super::*;

    #[test]
    fn new_session_waits_for_a_full_map() {
        let mut o = PeerOutbox::new();
        o.handle_change(upsert(peer(1, "a")));
        assert!(o.needs_full_read());
        assert_eq!(poll(&mut o), None);
        o.handle_full(vec![enc(peer(1, "a"))]);
        assert_eq!(poll(&mut o), Some(full(1, vec![peer(1, "a")])));
        assert_eq!(poll(&mut o), None);
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
            poll(&mut o),
            Some(delta(2, vec![wire_upsert(peer(2, "new")), wire_remove(3)]))
        );
        assert_eq!(poll(&mut o), None);
    }

    #[test]
    fn versions_grow_by_one_per_message() {
        let mut o = synced();
        for v in 2..5 {
            o.handle_change(upsert(peer(v as u8, "x")));
            let Some(ServerMsg::PeerDelta { version, .. }) = poll(&mut o) else {
                panic!("no delta");
            };
            assert_eq!(version, v);
        }
        o.handle_resync();
        o.handle_full(vec![]);
        assert_eq!(poll(&mut o), Some(full(5, vec![])));
    }

    #[test]
    fn a_pending_full_map_absorbs_later_changes() {
        let mut o = synced();
        o.handle_full(vec![enc(peer(1, "a")), enc(peer(2, "b"))]);
        o.handle_change(remove(1));
        o.handle_change(upsert(peer(2, "b2")));
        o.handle_change(upsert(peer(3, "c")));
        assert_eq!(
            poll(&mut o),
            Some(full(2, vec![peer(2, "b2"), peer(3, "c")]))
        );
        assert_eq!(poll(&mut o), None);
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
        assert_eq!(poll(&mut o), None);
        o.handle_full(vec![enc(peer(1, "a"))]);
        assert_eq!(poll(&mut o), Some(full(2, vec![peer(1, "a")])));
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

    #[test]
    fn a_map_larger_than_a_page_goes_out_as_pages_of_one_version() {
        let mut o = PeerOutbox::with_page_budget(600);
        let peers: Vec<PeerInfo> = (1..=20).map(|i| peer(i, "p")).collect();
        o.handle_full(peers.iter().cloned().map(enc).collect());
        let mut pages = Vec::new();
        let mut last = None;
        while let Some(push) = o.poll_message() {
            assert!(push.full);
            assert!(push.frame.len() - 4 <= 600, "{} bytes", push.frame.len());
            let msg: ServerMsg = frame::decode(&push.frame).unwrap();
            assert_eq!(push.frame, frame::encode(&msg));
            match msg {
                ServerMsg::PeerPage { version, peers } => {
                    assert_eq!(version, 1);
                    pages.extend(peers);
                }
                ServerMsg::PeerMap { version, peers } => {
                    assert_eq!(version, 1);
                    last = Some(peers);
                }
                other => panic!("{other:?}"),
            }
        }
        let last = last.expect("a closing map");
        assert!(!pages.is_empty() && !last.is_empty());
        let mut assembled = rally_proto::MapPages::new();
        let mut all = Vec::new();
        for p in pages.chunks(1) {
            assembled.handle_page(1, p.to_vec()).unwrap();
        }
        all.extend(assembled.handle_map(1, last).unwrap());
        assert_eq!(all, peers);
        // The next message follows the map's version.
        o.handle_change(remove(1));
        assert_eq!(poll(&mut o), Some(delta(2, vec![wire_remove(1)])));
    }

    #[test]
    fn many_changes_go_out_as_consecutive_deltas_within_the_budget() {
        let mut o = PeerOutbox::with_page_budget(600);
        o.handle_full(vec![]);
        assert!(poll(&mut o).is_some());
        for i in 1..=20 {
            o.handle_change(upsert(peer(i, "p")));
        }
        let mut seen = Vec::new();
        let mut version = 1;
        while let Some(push) = o.poll_message() {
            assert!(push.frame.len() - 4 <= 600);
            let Ok(ServerMsg::PeerDelta {
                version: v,
                changes,
            }) = frame::decode(&push.frame)
            else {
                panic!("not a delta");
            };
            version += 1;
            assert_eq!(v, version);
            seen.extend(changes);
        }
        assert!(version > 2, "split into several deltas");
        assert_eq!(
            seen,
            (1..=20)
                .map(|i| wire_upsert(peer(i, "p")))
                .collect::<Vec<_>>()
        );
    }

    /// An outbox that has sent its first full map (version 1).
    fn synced() -> PeerOutbox {
        let mut o = PeerOutbox::new();
        o.handle_full(vec![]);
        assert!(poll(&mut o).is_some());
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

    #[test]
    fn frames_carry_endpoints_nat_and_several_parties() {
        let mut o = PeerOutbox::new();
        let mut p = peer(4, "d");
        p.endpoints = vec!["203.0.113.9:51820".parse().unwrap()];
        p.parties = vec!["a".into(), "b\"q".into()];
        p.nat = Some(rally_proto::NatReport::default());
        o.handle_full(vec![enc(p.clone())]);
        assert_eq!(poll(&mut o), Some(full(1, vec![p.clone()])));
        o.handle_change(upsert(p.clone()));
        o.handle_change(remove(5));
        assert_eq!(
            poll(&mut o),
            Some(delta(2, vec![wire_upsert(p), wire_remove(5)]))
        );
    }

    /// The next message, decoded; its frame must be exactly what `frame::encode` makes of it.
    fn poll(o: &mut PeerOutbox) -> Option<ServerMsg> {
        let push = o.poll_message()?;
        let msg: ServerMsg = frame::decode(&push.frame).expect("a well-formed frame");
        assert_eq!(push.frame, frame::encode(&msg), "{msg:?}");
        assert_eq!(push.full, matches!(msg, ServerMsg::PeerMap { .. }));
        Some(msg)
    }

    fn enc(peer: PeerInfo) -> Arc<EncodedPeer> {
        Arc::new(EncodedPeer::new(&peer))
    }

    fn upsert(peer: PeerInfo) -> Change {
        Change::Upsert(enc(peer))
    }

    fn remove(i: u8) -> Change {
        Change::Remove(Key32([i; 32]))
    }

    fn wire_upsert(peer: PeerInfo) -> PeerChange {
        PeerChange::Upsert { peer }
    }

    fn wire_remove(i: u8) -> PeerChange {
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

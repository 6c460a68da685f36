//! The session table: one session per agent and transport (two over TCP), stored in reusable slots and
//! indexed by agent short id and by source address; per-IP counting keys.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rally_proto::limit::TokenBucket;
use rally_proto::relay::ShortId;
use rally_proto::{Key32, RelayToken};

use super::Via;

#[derive(Debug)]
pub(super) struct Session {
    pub(super) agent: Key32,
    /// `short_id(&agent)`, written into every `Deliver` from this session.
    pub(super) id: ShortId,
    pub(super) addr: SocketAddr,
    pub(super) via: Via,
    pub(super) ip: IpKey,
    pub(super) token: RelayToken,
    /// Seals what the relay says to this session's agent.
    pub(super) key: [u8; 32],
    pub(super) last_seen: Instant,
    pub(super) pps: TokenBucket,
    pub(super) bps: TokenBucket,
}

impl Session {
    /// Why the session is dead at this time, if it is.
    pub(super) fn death(
        &self,
        now: Instant,
        now_unix: u64,
        idle: Duration,
    ) -> Option<&'static str> {
        if now_unix >= self.token.expires_at {
            Some("token expired")
        } else if now.saturating_duration_since(self.last_seen) >= idle {
            Some("idle")
        } else {
            None
        }
    }

    /// Takes one packet and `len` bytes from the session's budgets, or neither.
    pub(super) fn spend(&mut self, len: usize, now: Instant) -> bool {
        self.pps.refill(now);
        self.bps.refill(now);
        let bytes = len as f64;
        if !self.pps.has(1.0) || !self.bps.has(bytes) {
            return false;
        }
        self.pps.take(1.0);
        self.bps.take(bytes);
        true
    }
}

/// A hash map with a fast, unkeyed hasher (FxHash). Unkeyed is safe here: every key in these
/// maps belongs to an authenticated session (at most `max_sessions`), so a flood from an
/// attacker can make lookups miss but cannot grow a map or lengthen its chains.
pub(super) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<rustc_hash::FxHasher>>;

/// Index of a session's slot in [`Slots`].
pub(super) type SlotId = usize;

/// Sessions stored by slot; freed slots are reused, so the table never outgrows the most
/// sessions ever alive at once.
#[derive(Debug, Default)]
pub(super) struct Slots {
    slots: Vec<Option<Session>>,
    free: Vec<SlotId>,
}

impl Slots {
    pub(super) fn insert(&mut self, session: Session) -> SlotId {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(session);
                slot
            }
            None => {
                self.slots.push(Some(session));
                self.slots.len() - 1
            }
        }
    }

    pub(super) fn get(&self, slot: SlotId) -> Option<&Session> {
        self.slots.get(slot)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, slot: SlotId) -> Option<&mut Session> {
        self.slots.get_mut(slot)?.as_mut()
    }

    pub(super) fn remove(&mut self, slot: SlotId) -> Option<Session> {
        let s = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        Some(s)
    }

    /// Live sessions in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (SlotId, &Session)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }
}

/// What a source IP is counted as for per-IP limits: the IPv4 address, or the IPv6 /64 (one
/// host usually holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum IpKey {
    V4(Ipv4Addr),
    V6([u8; 8]),
}

impl IpKey {
    pub(super) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpKey::V4(v4),
            IpAddr::V6(v6) => {
                let mut p = [0u8; 8];
                p.copy_from_slice(&v6.octets()[..8]);
                IpKey::V6(p)
            }
        }
    }
}

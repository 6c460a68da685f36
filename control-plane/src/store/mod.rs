//! Durable state of the control plane behind a trait, with the SQLite implementation.
//!
//! SQLite runs in WAL mode; the schema is versioned with `PRAGMA user_version` and migrated
//! forward on open. Times are unix seconds passed in by the caller.

mod sqlite;

use std::net::{Ipv4Addr, SocketAddr};

use rally_proto::invite::secret_hash;
use rally_proto::Key32;

pub use sqlite::SqliteStore;

/// How many virtual-IP candidates are tried before the overlay counts as full.
const VIP_ATTEMPTS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database holds a corrupt value in {0}")]
    Corrupt(&'static str),
    #[error("database schema version {0} is newer than this rally-control understands")]
    TooNew(i64),
    #[error("no free virtual IP left in the overlay")]
    AddressSpaceFull,
}

/// A registered agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRow {
    pub identity: Key32,
    pub name: String,
    pub wg_key: Key32,
    pub virtual_ip: Ipv4Addr,
    pub endpoints: Vec<SocketAddr>,
    /// The agent's last NAT report, as JSON.
    pub nat: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartyRow {
    pub id: [u8; 8],
    pub name: String,
    pub owner: Key32,
    pub members: u32,
}

pub use crate::invites::InviteRefusal;
use crate::invites::{Admission, InviteKey, StoredInvite};

/// A new invite for a party.
#[derive(Debug, Clone, Copy)]
pub struct NewInvite {
    pub secret: [u8; 16],
    pub expires_at: Option<u64>,
    pub max_uses: Option<u32>,
}

/// What the control plane needs from durable storage. One implementation (SQLite) today; the
/// trait is the seam for a shared PostgreSQL backend.
pub trait Store: Send {
    /// Creates or updates an agent, keeping its virtual IP once given.
    fn register_agent(
        &mut self,
        identity: &Key32,
        name: &str,
        wg_key: &Key32,
        endpoints: &[SocketAddr],
        now: u64,
    ) -> Result<AgentRow, StoreError>;
    fn set_endpoints(
        &mut self,
        identity: &Key32,
        endpoints: &[SocketAddr],
    ) -> Result<(), StoreError>;
    fn set_nat(&mut self, identity: &Key32, nat_json: &str) -> Result<(), StoreError>;
    fn create_party(
        &mut self,
        id: [u8; 8],
        name: &str,
        owner: &Key32,
        invite: NewInvite,
        now: u64,
    ) -> Result<PartyRow, StoreError>;
    /// The invite with this party and secret hash as `identity` would redeem it, if it exists.
    fn invite(&self, key: &InviteKey, identity: &Key32)
        -> Result<Option<StoredInvite>, StoreError>;
    /// Persists what [`crate::invites::check`] decided: for [`Admission::UseOne`], one use of
    /// the invite and the membership. Returns the party.
    fn admit(
        &mut self,
        key: &InviteKey,
        identity: &Key32,
        admission: Admission,
        now: u64,
    ) -> Result<PartyRow, StoreError>;
    /// Checks an invite by party and secret with [`crate::invites::admit`] and persists the
    /// outcome: `identity` becomes a member, using one use of the invite unless it already was.
    fn redeem_invite(
        &mut self,
        party: [u8; 8],
        secret: &[u8; 16],
        identity: &Key32,
        now: u64,
    ) -> Result<Result<PartyRow, InviteRefusal>, StoreError> {
        let key = InviteKey {
            party,
            secret_hash: secret_hash(&party, secret),
        };
        let stored = self.invite(&key, identity)?;
        match crate::invites::admit(stored, now) {
            Ok(admission) => self.admit(&key, identity, admission, now).map(Ok),
            Err(refusal) => Ok(Err(refusal)),
        }
    }
    fn leave_party(&mut self, party: [u8; 8], identity: &Key32) -> Result<(), StoreError>;
    /// Renames an agent (a name disambiguated within its parties).
    fn rename_agent(&mut self, identity: &Key32, name: &str) -> Result<(), StoreError>;
    /// The agent registered with this WireGuard key, if any.
    fn wg_key_holder(&self, wg_key: &Key32) -> Result<Option<Key32>, StoreError>;
    /// Records that the agent was last connected at `now`.
    fn touch_agent(&mut self, identity: &Key32, now: u64) -> Result<(), StoreError>;
    /// Agents in no party, owning no party, last seen before `before`.
    fn unjoined_before(&self, before: u64) -> Result<Vec<Key32>, StoreError>;
    /// Removes an agent in no party and owning none (its virtual IP becomes free); `false` if
    /// it is a member or owner after all.
    fn remove_unjoined(&mut self, identity: &Key32) -> Result<bool, StoreError>;
    fn parties_of(&self, identity: &Key32) -> Result<Vec<PartyRow>, StoreError>;
    /// The agent, if it ever registered.
    fn agent(&self, identity: &Key32) -> Result<Option<AgentRow>, StoreError>;
    /// Every agent that shares at least one party with `identity`, with the shared party names.
    fn peers_of(&self, identity: &Key32) -> Result<Vec<(AgentRow, Vec<String>)>, StoreError>;
    fn counts(&self) -> Result<(u64, u64), StoreError>;
    /// Every agent, party and membership, for a control plane that keeps them in memory
    /// ([`crate::directory::CachedStore`]).
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
}

/// Everything [`Store::snapshot`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub agents: Vec<AgentRow>,
    /// Parties with their members (owners are members too).
    pub parties: Vec<(PartyRow, Vec<Key32>)>,
}

#[cfg(test)]
mod tests;

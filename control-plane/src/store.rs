//! Durable state of the control plane behind a trait, with the SQLite implementation.
//!
//! SQLite runs in WAL mode; the schema is versioned with `PRAGMA user_version` and migrated
//! forward on open. Times are unix seconds passed in by the caller.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use rally_proto::invite::secret_hash;
use rally_proto::{Key32, Overlay};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

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

pub struct SqliteStore {
    db: Connection,
    overlay: Overlay,
}

const MIGRATIONS: &[&str] = &[
    // 1: agents, parties, members, invites.
    "CREATE TABLE agents (
        identity    BLOB PRIMARY KEY,
        name        TEXT NOT NULL,
        wg_key      BLOB NOT NULL,
        virtual_ip  INTEGER NOT NULL UNIQUE,
        endpoints   TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        seen_at     INTEGER NOT NULL
     );
     CREATE TABLE parties (
        id          BLOB PRIMARY KEY,
        name        TEXT NOT NULL,
        owner       BLOB NOT NULL REFERENCES agents(identity),
        created_at  INTEGER NOT NULL
     );
     CREATE TABLE members (
        party       BLOB NOT NULL REFERENCES parties(id) ON DELETE CASCADE,
        agent       BLOB NOT NULL REFERENCES agents(identity),
        joined_at   INTEGER NOT NULL,
        PRIMARY KEY (party, agent)
     );
     CREATE INDEX members_by_agent ON members(agent);
     CREATE TABLE invites (
        secret_hash BLOB PRIMARY KEY,
        party       BLOB NOT NULL REFERENCES parties(id) ON DELETE CASCADE,
        expires_at  INTEGER,
        max_uses    INTEGER,
        uses        INTEGER NOT NULL DEFAULT 0,
        created_at  INTEGER NOT NULL
     );",
    // 2: the agent's last NAT report (JSON).
    "ALTER TABLE agents ADD COLUMN nat TEXT;",
    // 3: WireGuard keys are looked up to keep them unique (not a UNIQUE index: a database
    // written before the rule may hold duplicates, and must still open).
    "CREATE INDEX agents_by_wg_key ON agents(wg_key);",
];

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it to the current schema.
    pub fn open(path: &Path, overlay: Overlay) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        Self::init(db, overlay)
    }

    fn init(mut db: Connection, overlay: Overlay) -> Result<Self, StoreError> {
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew(version));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = db.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(SqliteStore { db, overlay })
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .db
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }
}

impl Store for SqliteStore {
    fn register_agent(
        &mut self,
        identity: &Key32,
        name: &str,
        wg_key: &Key32,
        endpoints: &[SocketAddr],
        now: u64,
    ) -> Result<AgentRow, StoreError> {
        let overlay = self.overlay;
        let eps = endpoints_to_text(endpoints);
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<u32> = tx
            .query_row(
                "SELECT virtual_ip FROM agents WHERE identity = ?1",
                [&identity.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        let vip = match existing {
            Some(ip) => {
                tx.execute(
                    "UPDATE agents SET name = ?2, wg_key = ?3, endpoints = ?4, seen_at = ?5
                     WHERE identity = ?1",
                    params![&identity.0[..], name, &wg_key.0[..], eps, now as i64],
                )?;
                Ipv4Addr::from(ip)
            }
            None => {
                let mut taken = tx.prepare("SELECT 1 FROM agents WHERE virtual_ip = ?1")?;
                let mut err = None;
                let ip = overlay.assign(identity, VIP_ATTEMPTS, |ip| {
                    taken.exists([u32::from(ip)]).unwrap_or_else(|e| {
                        err = Some(e);
                        true
                    })
                });
                drop(taken);
                if let Some(e) = err {
                    return Err(e.into());
                }
                let ip = ip.ok_or(StoreError::AddressSpaceFull)?;
                tx.execute(
                    "INSERT INTO agents (identity, name, wg_key, virtual_ip, endpoints, created_at, seen_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                    params![&identity.0[..], name, &wg_key.0[..], u32::from(ip), eps, now as i64],
                )?;
                ip
            }
        };
        tx.commit()?;
        Ok(AgentRow {
            identity: *identity,
            name: name.to_owned(),
            wg_key: *wg_key,
            virtual_ip: vip,
            endpoints: endpoints.to_vec(),
            nat: None,
        })
    }

    fn set_endpoints(
        &mut self,
        identity: &Key32,
        endpoints: &[SocketAddr],
    ) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE agents SET endpoints = ?2 WHERE identity = ?1",
            params![&identity.0[..], endpoints_to_text(endpoints)],
        )?;
        Ok(())
    }

    fn set_nat(&mut self, identity: &Key32, nat_json: &str) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE agents SET nat = ?2 WHERE identity = ?1",
            params![&identity.0[..], nat_json],
        )?;
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
        let tx = self.db.transaction()?;
        tx.execute(
            "INSERT INTO parties (id, name, owner, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![&id[..], name, &owner.0[..], now as i64],
        )?;
        tx.execute(
            "INSERT INTO members (party, agent, joined_at) VALUES (?1, ?2, ?3)",
            params![&id[..], &owner.0[..], now as i64],
        )?;
        tx.execute(
            "INSERT INTO invites (secret_hash, party, expires_at, max_uses, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &secret_hash(&id, &invite.secret)[..],
                &id[..],
                invite.expires_at.map(|t| t as i64),
                invite.max_uses,
                now as i64
            ],
        )?;
        tx.commit()?;
        Ok(PartyRow {
            id,
            name: name.to_owned(),
            owner: *owner,
            members: 1,
        })
    }

    fn invite(
        &self,
        key: &InviteKey,
        identity: &Key32,
    ) -> Result<Option<StoredInvite>, StoreError> {
        let invite: Option<(Option<i64>, Option<u32>, u32)> = self
            .db
            .query_row(
                "SELECT expires_at, max_uses, uses FROM invites WHERE secret_hash = ?1 AND party = ?2",
                params![&key.secret_hash[..], &key.party[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((expires_at, max_uses, uses)) = invite else {
            return Ok(None);
        };
        let already_member = self
            .db
            .prepare_cached("SELECT 1 FROM members WHERE party = ?1 AND agent = ?2")?
            .exists(params![&key.party[..], &identity.0[..]])?;
        Ok(Some(StoredInvite {
            expires_at: expires_at.map(|t| t.max(0) as u64),
            max_uses,
            uses,
            already_member,
        }))
    }

    fn admit(
        &mut self,
        key: &InviteKey,
        identity: &Key32,
        admission: Admission,
        now: u64,
    ) -> Result<PartyRow, StoreError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if admission == Admission::UseOne {
            tx.execute(
                "UPDATE invites SET uses = uses + 1 WHERE secret_hash = ?1",
                [&key.secret_hash[..]],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO members (party, agent, joined_at) VALUES (?1, ?2, ?3)",
                params![&key.party[..], &identity.0[..], now as i64],
            )?;
        }
        let row = party_row(&tx, key.party)?;
        tx.commit()?;
        Ok(row)
    }

    fn leave_party(&mut self, party: [u8; 8], identity: &Key32) -> Result<(), StoreError> {
        self.db.execute(
            "DELETE FROM members WHERE party = ?1 AND agent = ?2",
            params![&party[..], &identity.0[..]],
        )?;
        Ok(())
    }

    fn rename_agent(&mut self, identity: &Key32, name: &str) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE agents SET name = ?2 WHERE identity = ?1",
            params![&identity.0[..], name],
        )?;
        Ok(())
    }

    fn wg_key_holder(&self, wg_key: &Key32) -> Result<Option<Key32>, StoreError> {
        let id: Option<Vec<u8>> = self
            .db
            .query_row(
                "SELECT identity FROM agents WHERE wg_key = ?1 LIMIT 1",
                [&wg_key.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        id.map(|b| blob(b, "agents.identity").map(Key32))
            .transpose()
    }

    fn touch_agent(&mut self, identity: &Key32, now: u64) -> Result<(), StoreError> {
        self.db.execute(
            "UPDATE agents SET seen_at = ?2 WHERE identity = ?1",
            params![&identity.0[..], now as i64],
        )?;
        Ok(())
    }

    fn unjoined_before(&self, before: u64) -> Result<Vec<Key32>, StoreError> {
        let mut q = self.db.prepare_cached(
            "SELECT a.identity FROM agents a WHERE a.seen_at < ?1
             AND NOT EXISTS (SELECT 1 FROM members m WHERE m.agent = a.identity)
             AND NOT EXISTS (SELECT 1 FROM parties p WHERE p.owner = a.identity)",
        )?;
        let rows = q.query_map([before as i64], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|r| Ok(Key32(blob(r?, "agents.identity")?)))
            .collect()
    }

    fn remove_unjoined(&mut self, identity: &Key32) -> Result<bool, StoreError> {
        let n = self.db.execute(
            "DELETE FROM agents WHERE identity = ?1
             AND NOT EXISTS (SELECT 1 FROM members m WHERE m.agent = ?1)
             AND NOT EXISTS (SELECT 1 FROM parties p WHERE p.owner = ?1)",
            [&identity.0[..]],
        )?;
        Ok(n > 0)
    }

    fn parties_of(&self, identity: &Key32) -> Result<Vec<PartyRow>, StoreError> {
        let mut q = self.db.prepare_cached(
            "SELECT p.id, p.name, p.owner, (SELECT COUNT(*) FROM members c WHERE c.party = p.id)
             FROM parties p JOIN members m ON m.party = p.id
             WHERE m.agent = ?1 ORDER BY p.name, p.id",
        )?;
        let rows = q.query_map([&identity.0[..]], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, u32>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (id, name, owner, members) = row?;
            Ok(PartyRow {
                id: blob(id, "parties.id")?,
                name,
                owner: Key32(blob(owner, "parties.owner")?),
                members,
            })
        })
        .collect()
    }

    fn agent(&self, identity: &Key32) -> Result<Option<AgentRow>, StoreError> {
        let mut q = self.db.prepare_cached(
            "SELECT name, wg_key, virtual_ip, endpoints, nat FROM agents WHERE identity = ?1",
        )?;
        let row = q
            .query_row([&identity.0[..]], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .optional()?;
        let Some((name, wg, vip, eps, nat)) = row else {
            return Ok(None);
        };
        agent_row(*identity, name, wg, vip, &eps, nat).map(Some)
    }

    fn peers_of(&self, identity: &Key32) -> Result<Vec<(AgentRow, Vec<String>)>, StoreError> {
        let mut q = self.db.prepare_cached(
            "SELECT a.identity, a.name, a.wg_key, a.virtual_ip, a.endpoints, p.name, a.nat
             FROM members me
             JOIN members them ON them.party = me.party AND them.agent != me.agent
             JOIN agents a ON a.identity = them.agent
             JOIN parties p ON p.id = me.party
             WHERE me.agent = ?1
             ORDER BY a.identity, p.name",
        )?;
        let rows = q.query_map([&identity.0[..]], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })?;
        let mut out: Vec<(AgentRow, Vec<String>)> = Vec::new();
        for row in rows {
            let (id, name, wg, vip, eps, party, nat) = row?;
            let id = Key32(blob(id, "agents.identity")?);
            if let Some((last, parties)) = out.last_mut() {
                if last.identity == id {
                    parties.push(party);
                    continue;
                }
            }
            out.push((agent_row(id, name, wg, vip, &eps, nat)?, vec![party]));
        }
        Ok(out)
    }

    fn counts(&self) -> Result<(u64, u64), StoreError> {
        let agents: i64 = self
            .db
            .query_row("SELECT COUNT(*) FROM agents", [], |r| r.get(0))?;
        let parties: i64 = self
            .db
            .query_row("SELECT COUNT(*) FROM parties", [], |r| r.get(0))?;
        Ok((agents as u64, parties as u64))
    }

    fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut q = self
            .db
            .prepare("SELECT identity, name, wg_key, virtual_ip, endpoints, nat FROM agents")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?;
        let mut agents = Vec::new();
        for row in rows {
            let (id, name, wg, vip, eps, nat) = row?;
            let id = Key32(blob(id, "agents.identity")?);
            agents.push(agent_row(id, name, wg, vip, &eps, nat)?);
        }
        let mut q = self.db.prepare(
            "SELECT p.id, p.name, p.owner, m.agent FROM parties p
             LEFT JOIN members m ON m.party = p.id ORDER BY p.id",
        )?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
            ))
        })?;
        let mut parties: Vec<(PartyRow, Vec<Key32>)> = Vec::new();
        for row in rows {
            let (id, name, owner, member) = row?;
            let id: [u8; 8] = blob(id, "parties.id")?;
            if parties.last().is_none_or(|(p, _)| p.id != id) {
                parties.push((
                    PartyRow {
                        id,
                        name,
                        owner: Key32(blob(owner, "parties.owner")?),
                        members: 0,
                    },
                    Vec::new(),
                ));
            }
            if let (Some(m), Some((p, members))) = (member, parties.last_mut()) {
                members.push(Key32(blob(m, "members.agent")?));
                p.members += 1;
            }
        }
        Ok(Snapshot { agents, parties })
    }
}

fn party_row(db: &Connection, id: [u8; 8]) -> Result<PartyRow, StoreError> {
    let (name, owner, members): (String, Vec<u8>, u32) = db.query_row(
        "SELECT p.name, p.owner, (SELECT COUNT(*) FROM members c WHERE c.party = p.id)
         FROM parties p WHERE p.id = ?1",
        [&id[..]],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(PartyRow {
        id,
        name,
        owner: Key32(blob(owner, "parties.owner")?),
        members,
    })
}

fn blob<const N: usize>(v: Vec<u8>, what: &'static str) -> Result<[u8; N], StoreError> {
    v.try_into().map_err(|_| StoreError::Corrupt(what))
}

fn endpoints_to_text(eps: &[SocketAddr]) -> String {
    eps.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// An `agents` row from its stored columns (`wg_key` as a blob, `virtual_ip` as an integer,
/// `endpoints` as text).
fn agent_row(
    identity: Key32,
    name: String,
    wg_key: Vec<u8>,
    virtual_ip: u32,
    endpoints: &str,
    nat: Option<String>,
) -> Result<AgentRow, StoreError> {
    Ok(AgentRow {
        identity,
        name,
        wg_key: Key32(blob(wg_key, "agents.wg_key")?),
        virtual_ip: Ipv4Addr::from(virtual_ip),
        endpoints: endpoints_from_text(endpoints)?,
        nat,
    })
}

fn endpoints_from_text(s: &str) -> Result<Vec<SocketAddr>, StoreError> {
    s.split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.parse()
                .map_err(|_| StoreError::Corrupt("agents.endpoints"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

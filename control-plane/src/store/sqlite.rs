//! The SQLite implementation of [`Store`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use rally_proto::{Key32, Overlay};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{AgentRow, NewInvite, PartyRow, Snapshot, Store, StoreError, VIP_ATTEMPTS};
use crate::invites::{Admission, InviteKey, StoredInvite};
use rally_proto::invite::secret_hash;

pub struct SqliteStore {
    db: Connection,
    overlay: Overlay,
}

pub(super) const MIGRATIONS: &[&str] = &[
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

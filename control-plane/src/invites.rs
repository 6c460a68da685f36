//! The invite rule, in one pure function: whether a code lets an agent into a party.
//!
//! [`check`] decides from the code's text, this control plane's key, the invite's stored state
//! and the time, everything an invite is checked for (format and checksum, control plane,
//! party and secret, expiry, uses). The store only looks the invite up and persists what the
//! rule decided ([`crate::store::Store::admit`]).

use rally_proto::invite::secret_hash;
use rally_proto::{ErrorCode, ErrorReply, InviteCode, InviteError, Key32};

/// An invite as the store holds it, seen by one joining agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredInvite {
    /// Unix seconds from which the invite is void (`None`: never).
    pub expires_at: Option<u64>,
    /// Most agents it may admit (`None`: any number).
    pub max_uses: Option<u32>,
    pub uses: u32,
    /// Whether the joining agent already belongs to the party.
    pub already_member: bool,
}

/// What the store must persist for an admitted agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The agent is a member already: nothing changes and no use is spent.
    AlreadyMember,
    /// Add the agent to the party and count one use of the invite.
    UseOne,
}

/// Why an invite was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteRefusal {
    #[error("{0}")]
    Invalid(InviteError),
    #[error("invite code belongs to another control plane")]
    WrongControlPlane,
    #[error("invite code is not valid for this party (revoked or never issued)")]
    Unknown,
    #[error("invite code has expired")]
    Expired,
    #[error("invite code is used up ({max_uses} of {max_uses} uses)")]
    UsedUp { max_uses: u32 },
}

impl InviteRefusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            InviteRefusal::Invalid(_) => ErrorCode::InviteInvalid,
            InviteRefusal::WrongControlPlane => ErrorCode::WrongControlPlane,
            InviteRefusal::Unknown => ErrorCode::InviteUnknown,
            InviteRefusal::Expired => ErrorCode::InviteExpired,
            InviteRefusal::UsedUp { .. } => ErrorCode::InviteUsedUp,
        }
    }
}

impl From<InviteRefusal> for ErrorReply {
    fn from(r: InviteRefusal) -> Self {
        ErrorReply::new(r.code(), r.to_string())
    }
}

/// Where a decoded code points in the store: its party and the hash its secret is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InviteKey {
    pub party: [u8; 8],
    pub secret_hash: [u8; 32],
}

/// The invite rule. `lookup` reads the invite the code names (`Ok(None)`: there is none); its
/// error (storage) is passed through as the outer `Err`.
pub fn check<E>(
    code: &str,
    control_key: &Key32,
    now: u64,
    lookup: impl FnOnce(&InviteKey) -> Result<Option<StoredInvite>, E>,
) -> Result<Result<(InviteKey, Admission), InviteRefusal>, E> {
    let key = match decode(code, control_key) {
        Ok(key) => key,
        Err(r) => return Ok(Err(r)),
    };
    let stored = lookup(&key)?;
    Ok(admit(stored, now).map(|a| (key, a)))
}

/// The code's format, checksum and control plane.
fn decode(code: &str, control_key: &Key32) -> Result<InviteKey, InviteRefusal> {
    let code = InviteCode::decode(code).map_err(InviteRefusal::Invalid)?;
    if code.control_key != *control_key {
        return Err(InviteRefusal::WrongControlPlane);
    }
    Ok(InviteKey {
        party: code.party_id,
        secret_hash: secret_hash(&code.party_id, &code.secret),
    })
}

/// The stored invite's state: it exists (right party and secret), and, for an agent not yet a
/// member, it has not expired and has a use left.
pub fn admit(stored: Option<StoredInvite>, now: u64) -> Result<Admission, InviteRefusal> {
    let Some(inv) = stored else {
        return Err(InviteRefusal::Unknown);
    };
    if inv.already_member {
        return Ok(Admission::AlreadyMember);
    }
    if inv.expires_at.is_some_and(|t| t <= now) {
        return Err(InviteRefusal::Expired);
    }
    if let Some(max_uses) = inv.max_uses.filter(|max| inv.uses >= *max) {
        return Err(InviteRefusal::UsedUp { max_uses });
    }
    Ok(Admission::UseOne)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn fresh() -> StoredInvite {
        StoredInvite {
            expires_at: Some(100),
            max_uses: Some(2),
            uses: 0,
            already_member: false,
        }
    }

    fn code(control: u8, party: u8, secret: u8) -> String {
        InviteCode {
            control_addr: "192.0.2.1:7443".into(),
            control_key: Key32([control; 32]),
            party_id: [party; 8],
            secret: [secret; 16],
        }
        .encode()
    }

    /// A store holding one invite: party 1, secret 2, in the state given.
    fn lookup(
        state: StoredInvite,
    ) -> impl FnOnce(&InviteKey) -> Result<Option<StoredInvite>, Infallible> {
        move |k| {
            let ours = k.party == [1; 8] && k.secret_hash == secret_hash(&[1; 8], &[2; 16]);
            Ok(ours.then_some(state))
        }
    }

    #[test]
    fn a_good_code_spends_one_use() {
        let r = check(&code(9, 1, 2), &Key32([9; 32]), 10, lookup(fresh())).unwrap();
        let (key, admission) = r.unwrap();
        assert_eq!(key.party, [1; 8]);
        assert_eq!(admission, Admission::UseOne);
    }

    #[test]
    fn damaged_foreign_wrong_secret_expired_and_used_up_codes_are_refused() {
        let key = Key32([9; 32]);
        let refused = |code: &str, state, now| check(code, &key, now, lookup(state)).unwrap();
        assert!(matches!(
            refused("rally-nope", fresh(), 10),
            Err(InviteRefusal::Invalid(_))
        ));
        assert_eq!(
            refused(&code(8, 1, 2), fresh(), 10),
            Err(InviteRefusal::WrongControlPlane)
        );
        assert_eq!(
            refused(&code(9, 1, 3), fresh(), 10),
            Err(InviteRefusal::Unknown)
        );
        assert_eq!(
            refused(&code(9, 4, 2), fresh(), 10),
            Err(InviteRefusal::Unknown)
        );
        assert_eq!(
            refused(&code(9, 1, 2), fresh(), 100),
            Err(InviteRefusal::Expired)
        );
        let used = StoredInvite { uses: 2, ..fresh() };
        assert_eq!(
            refused(&code(9, 1, 2), used, 10),
            Err(InviteRefusal::UsedUp { max_uses: 2 })
        );
    }

    #[test]
    fn a_member_is_admitted_again_even_with_an_expired_or_used_up_code() {
        let state = StoredInvite {
            uses: 2,
            expires_at: Some(1),
            already_member: true,
            ..fresh()
        };
        assert_eq!(admit(Some(state), 10), Ok(Admission::AlreadyMember));
    }

    #[test]
    fn no_expiry_and_no_limit_admit_forever() {
        let state = StoredInvite {
            expires_at: None,
            max_uses: None,
            uses: u32::MAX,
            already_member: false,
        };
        assert_eq!(admit(Some(state), u64::MAX), Ok(Admission::UseOne));
    }
}

//! Relay tokens: the control plane's signed statement that an agent may bind at a relay and to
//! which parties it belongs. The relay holds only the control plane's public key.
//!
//! Layout: `version:u8 (=1) | agent:32 | expires_at:u64 BE | n:u8 | party_id:8 × n | signature:64`,
//! the signature (ed25519, domain `rally/relay-token/v1`) covering everything before it.

use crate::identity::{verify, Identity, SignatureError};
use crate::key::Key32;

pub const DOMAIN_TOKEN: &[u8] = b"rally/relay-token/v1";
const VERSION: u8 = 1;
/// Most parties one token may name.
pub const MAX_TOKEN_PARTIES: usize = 32;
/// Longest encoded token.
pub const MAX_TOKEN_LEN: usize = 1 + 32 + 8 + 1 + 8 * MAX_TOKEN_PARTIES + 64;

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayToken {
    /// The agent's ed25519 identity key.
    pub agent: Key32,
    /// Unix seconds after which the token is void.
    pub expires_at: u64,
    /// Parties the agent belongs to: the relay forwards only between agents sharing one.
    pub parties: Vec<[u8; 8]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token truncated")]
    Truncated,
    #[error("token has trailing bytes")]
    Trailing,
    #[error("token version {0} is not supported")]
    Version(u8),
    #[error("token names {0} parties (at most {MAX_TOKEN_PARTIES})")]
    TooManyParties(usize),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

impl RelayToken {
    fn body(&self) -> Vec<u8> {
        let n = self.parties.len().min(MAX_TOKEN_PARTIES);
        let mut b = Vec::with_capacity(42 + 8 * n + 64);
        b.push(VERSION);
        b.extend_from_slice(self.agent.as_bytes());
        b.extend_from_slice(&self.expires_at.to_be_bytes());
        b.push(n as u8);
        for p in &self.parties[..n] {
            b.extend_from_slice(p);
        }
        b
    }

    /// Signs the token with the control plane's key; returns the encoded token, or
    /// [`TokenError::TooManyParties`] if it names more than [`MAX_TOKEN_PARTIES`] (never cut
    /// silently: the control plane bounds an agent's parties to that number).
    pub fn try_sign(&self, control: &Identity) -> Result<Vec<u8>, TokenError> {
        if self.parties.len() > MAX_TOKEN_PARTIES {
            return Err(TokenError::TooManyParties(self.parties.len()));
        }
        Ok(self.sign(control))
    }

    /// Signs the token with the control plane's key; returns the encoded token. For tokens
    /// known to name at most [`MAX_TOKEN_PARTIES`] parties (tests, tools); the control plane
    /// uses [`RelayToken::try_sign`].
    pub fn sign(&self, control: &Identity) -> Vec<u8> {
        debug_assert!(self.parties.len() <= MAX_TOKEN_PARTIES);
        let mut b = self.body();
        let sig = control.sign(DOMAIN_TOKEN, &b);
        b.extend_from_slice(&sig);
        b
    }

    /// Decodes a token and checks its signature against `control_key` and its expiry
    /// against `now` (unix seconds).
    pub fn verify(bytes: &[u8], control_key: &Key32, now: u64) -> Result<RelayToken, TokenError> {
        let (token, signed_len) = Self::decode_unverified(bytes)?;
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&bytes[signed_len..]);
        verify(control_key, DOMAIN_TOKEN, &bytes[..signed_len], &sig).map_err(|e| match e {
            SignatureError::BadKey | SignatureError::Mismatch => TokenError::BadSignature,
        })?;
        if token.expires_at <= now {
            return Err(TokenError::Expired);
        }
        Ok(token)
    }

    /// Decodes without checking the signature: for tests and diagnostics only.
    pub fn decode_unverified(bytes: &[u8]) -> Result<(RelayToken, usize), TokenError> {
        let version = *bytes.first().ok_or(TokenError::Truncated)?;
        if version != VERSION {
            return Err(TokenError::Version(version));
        }
        let fixed = bytes.get(1..42).ok_or(TokenError::Truncated)?;
        let mut agent = [0u8; 32];
        agent.copy_from_slice(&fixed[..32]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&fixed[32..40]);
        let n = fixed[40] as usize;
        if n > MAX_TOKEN_PARTIES {
            return Err(TokenError::TooManyParties(n));
        }
        let signed_len = 42 + 8 * n;
        let total = signed_len + 64;
        if bytes.len() < total {
            return Err(TokenError::Truncated);
        }
        if bytes.len() > total {
            return Err(TokenError::Trailing);
        }
        let parties = bytes[42..signed_len]
            .chunks_exact(8)
            .map(|c| {
                let mut p = [0u8; 8];
                p.copy_from_slice(c);
                p
            })
            .collect();
        Ok((
            RelayToken {
                agent: Key32(agent),
                expires_at: u64::from_be_bytes(exp),
                parties,
            },
            signed_len,
        ))
    }

    /// Whether two tokens name a common party.
    pub fn shares_party(&self, other: &RelayToken) -> bool {
        self.parties.iter().any(|p| other.parties.contains(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn control() -> Identity {
        Identity::from_seed([1; 32])
    }

    fn token() -> RelayToken {
        RelayToken {
            agent: Key32([2; 32]),
            expires_at: 1000,
            parties: vec![[3; 8], [4; 8]],
        }
    }

    #[test]
    fn signed_token_verifies_before_expiry() {
        let b = token().sign(&control());
        assert_eq!(
            RelayToken::verify(&b, &control().public(), 999),
            Ok(token())
        );
        assert_eq!(
            RelayToken::verify(&b, &control().public(), 1000),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn token_from_another_key_or_altered_is_refused() {
        let b = token().sign(&Identity::from_seed([9; 32]));
        assert_eq!(
            RelayToken::verify(&b, &control().public(), 1),
            Err(TokenError::BadSignature)
        );
        let mut b = token().sign(&control());
        b[5] ^= 1;
        assert_eq!(
            RelayToken::verify(&b, &control().public(), 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn truncated_oversized_and_bad_version_are_refused() {
        let b = token().sign(&control());
        assert_eq!(
            RelayToken::verify(&b[..b.len() - 1], &control().public(), 1),
            Err(TokenError::Truncated)
        );
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            RelayToken::verify(&long, &control().public(), 1),
            Err(TokenError::Trailing)
        );
        let mut v = b.clone();
        v[0] = 7;
        assert_eq!(
            RelayToken::verify(&v, &control().public(), 1),
            Err(TokenError::Version(7))
        );
        let mut many = b;
        many[41] = 200;
        assert_eq!(
            RelayToken::verify(&many, &control().public(), 1),
            Err(TokenError::TooManyParties(200))
        );
    }

    #[test]
    fn a_token_naming_more_parties_than_fit_is_refused_not_cut() {
        let mut t = token();
        t.parties = (0..=MAX_TOKEN_PARTIES as u8).map(|i| [i; 8]).collect();
        assert_eq!(
            t.try_sign(&control()),
            Err(TokenError::TooManyParties(MAX_TOKEN_PARTIES + 1))
        );
        t.parties.pop();
        let b = t.try_sign(&control()).unwrap();
        assert_eq!(RelayToken::verify(&b, &control().public(), 1), Ok(t));
    }

    #[test]
    fn shares_party_needs_a_common_id() {
        let a = token();
        let mut b = token();
        b.parties = vec![[4; 8]];
        assert!(a.shares_party(&b));
        b.parties = vec![[5; 8]];
        assert!(!a.shares_party(&b));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = RelayToken::verify(&b, &control().public(), 0);
        }
    }
}

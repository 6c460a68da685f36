//! Invite codes: everything a friend needs to join a party, in one line of text.
//!
//! Layout before encoding (all integers big-endian):
//! `version:u8 | party_id:8 | secret:16 | control_key:32 | addr_len:u8 | addr:addr_len | check:4`
//! where `check` is the first four bytes of SHA-256 over everything before it. The text form is
//! `rally-` followed by URL-safe unpadded base64 of those bytes.
//!
//! The checksum catches typos and tampering before anything is sent; the control plane still
//! checks the secret against the hash it stored.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::key::Key32;

const PREFIX: &str = "rally-";
const VERSION: u8 = 1;
/// Longest control address (host:port) an invite code may carry: its length is one byte.
pub const MAX_ADDR_LEN: usize = 255;
const FIXED_LEN: usize = 1 + 8 + 16 + 32 + 1 + 4;
/// Longest text form of an invite code.
pub const MAX_CODE_LEN: usize = PREFIX.len() + (FIXED_LEN + MAX_ADDR_LEN).div_ceil(3) * 4;

/// The decoded contents of an invite code.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct InviteCode {
    /// `host:port` of the control plane.
    pub control_addr: String,
    /// The control plane's ed25519 public key, pinned by the joining agent.
    pub control_key: Key32,
    pub party_id: [u8; 8],
    /// At least 128 bits; the control plane stores only its hash.
    pub secret: [u8; 16],
}

/// Why text was not accepted as an invite code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    #[error("not a Rally invite code (it should start with \"rally-\")")]
    Prefix,
    #[error("invite code is too long ({0} characters)")]
    TooLong(usize),
    #[error("invite code is damaged (not valid URL-safe base64); was it copied whole?")]
    Encoding,
    #[error("invite code is truncated; was it copied whole?")]
    Truncated,
    #[error("invite code has trailing bytes")]
    Trailing,
    #[error("invite code is from an unsupported version ({0}); update rally")]
    Version(u8),
    #[error("invite code is damaged or was altered (checksum mismatch)")]
    Checksum,
    #[error("invite code carries an invalid control address")]
    Address,
}

impl InviteCode {
    /// The text form: `rally-…`. The control address must be at most [`MAX_ADDR_LEN`] bytes
    /// (the control plane checks its `--public-addr` at start); a longer one is cut.
    pub fn encode(&self) -> String {
        let addr = self.control_addr.as_bytes();
        let addr = &addr[..addr.len().min(MAX_ADDR_LEN)];
        let mut b = Vec::with_capacity(FIXED_LEN + addr.len());
        b.push(VERSION);
        b.extend_from_slice(&self.party_id);
        b.extend_from_slice(&self.secret);
        b.extend_from_slice(self.control_key.as_bytes());
        b.push(addr.len() as u8);
        b.extend_from_slice(addr);
        let check = checksum(&b);
        b.extend_from_slice(&check);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b))
    }

    /// Parses and checks the text form. Surrounding white space is ignored.
    pub fn decode(text: &str) -> Result<Self, InviteError> {
        let text = text.trim();
        if text.len() > MAX_CODE_LEN {
            return Err(InviteError::TooLong(text.len()));
        }
        let body = text.strip_prefix(PREFIX).ok_or(InviteError::Prefix)?;
        let b = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| InviteError::Encoding)?;
        let mut r = Reader(&b);
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(InviteError::Version(version));
        }
        let party_id: [u8; 8] = r.array()?;
        let secret: [u8; 16] = r.array()?;
        let control_key = Key32(r.array()?);
        let addr_len = r.take(1)?[0] as usize;
        let addr = r.take(addr_len)?;
        let signed_len = b.len() - r.0.len();
        let check: [u8; 4] = r.array()?;
        if !r.0.is_empty() {
            return Err(InviteError::Trailing);
        }
        if checksum(&b[..signed_len]) != check {
            return Err(InviteError::Checksum);
        }
        let control_addr = std::str::from_utf8(addr).map_err(|_| InviteError::Address)?;
        if !valid_host_port(control_addr) {
            return Err(InviteError::Address);
        }
        Ok(InviteCode {
            control_addr: control_addr.to_owned(),
            control_key,
            party_id,
            secret,
        })
    }
}

/// The hash the control plane stores in place of an invite secret.
pub fn secret_hash(party_id: &[u8; 8], secret: &[u8; 16]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"rally/invite/v1\0");
    h.update(party_id);
    h.update(secret);
    h.finalize().into()
}

fn checksum(b: &[u8]) -> [u8; 4] {
    let d = Sha256::digest(b);
    [d[0], d[1], d[2], d[3]]
}

/// `host:port` with a non-empty host of printable ASCII and a port in 1..=65535.
fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host.bytes().all(|c| c.is_ascii_graphic())
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InviteError> {
        if self.0.len() < n {
            return Err(InviteError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], InviteError> {
        let s = self.take(N)?;
        let mut a = [0; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> InviteCode {
        InviteCode {
            control_addr: "198.51.100.10:7443".into(),
            control_key: Key32([5; 32]),
            party_id: [1, 2, 3, 4, 5, 6, 7, 8],
            secret: [0xaa; 16],
        }
    }

    #[test]
    fn round_trips() {
        let c = sample();
        assert_eq!(InviteCode::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn longest_address_round_trips() {
        let c = InviteCode {
            control_addr: format!("{}:65535", "a".repeat(MAX_ADDR_LEN - 6)),
            ..sample()
        };
        assert_eq!(c.control_addr.len(), MAX_ADDR_LEN);
        assert_eq!(InviteCode::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(InviteCode::decode("hello"), Err(InviteError::Prefix));
        assert_eq!(InviteCode::decode("rally-!!!"), Err(InviteError::Encoding));
    }

    #[test]
    fn truncated_code_is_refused() {
        let s = sample().encode();
        let cut = &s[..s.len() - 10];
        assert!(matches!(
            InviteCode::decode(cut),
            Err(InviteError::Truncated | InviteError::Checksum | InviteError::Encoding)
        ));
        assert_eq!(InviteCode::decode("rally-AQ"), Err(InviteError::Truncated));
    }

    #[test]
    fn oversized_code_is_refused() {
        let s = format!("rally-{}", "A".repeat(MAX_CODE_LEN));
        assert!(matches!(
            InviteCode::decode(&s),
            Err(InviteError::TooLong(_))
        ));
    }

    #[test]
    fn every_single_character_change_is_refused() {
        let s = sample().encode();
        for i in PREFIX.len()..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'B' { b'C' } else { b'B' };
            let t = String::from_utf8(b).unwrap();
            assert!(InviteCode::decode(&t).is_err(), "change at {i} accepted");
        }
    }

    #[test]
    fn other_version_is_refused_with_its_number() {
        let s = sample().encode();
        let mut b = URL_SAFE_NO_PAD.decode(&s[PREFIX.len()..]).unwrap();
        b[0] = 9;
        let t = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b));
        assert_eq!(InviteCode::decode(&t), Err(InviteError::Version(9)));
    }

    #[test]
    fn secret_hash_depends_on_party_and_secret() {
        let a = secret_hash(&[1; 8], &[2; 16]);
        assert_ne!(a, secret_hash(&[1; 8], &[3; 16]));
        assert_ne!(a, secret_hash(&[0; 8], &[2; 16]));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,400}") {
            let _ = InviteCode::decode(&s);
        }

        #[test]
        fn arbitrary_payload_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = InviteCode::decode(&format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(b)));
        }

        #[test]
        fn any_valid_code_round_trips(
            party_id in any::<[u8; 8]>(),
            secret in any::<[u8; 16]>(),
            key in any::<[u8; 32]>(),
            host in "[a-z0-9.-]{1,60}",
            port in 1u16..,
        ) {
            let c = InviteCode { control_addr: format!("{host}:{port}"), control_key: Key32(key), party_id, secret };
            prop_assert_eq!(InviteCode::decode(&c.encode()), Ok(c));
        }
    }
}

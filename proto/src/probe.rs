//! Path probes between two agents: sent on every candidate path (direct or through a relay) to
//! find and watch working paths. A probe is authenticated with a key only the two agents can
//! derive (from their WireGuard keys), so a spoofed probe never moves a path.
//!
//! Layout (36 bytes): `0x52 0x50 type 0x00 | from:8 | txid:u64 BE | mac:16`, where `type` is 1
//! for a probe and 2 for its acknowledgement, and `mac` is HMAC-SHA256 over the first 20 bytes,
//! truncated to 16.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::relay::ShortId;

pub const MAGIC: [u8; 2] = [0x52, 0x50];
pub const LEN: usize = 36;
const PROBE: u8 = 1;
const ACK: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Probe,
    Ack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub kind: ProbeKind,
    pub from: ShortId,
    pub txid: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("not a probe")]
    NotProbe,
    #[error("probe has the wrong length")]
    Length,
    #[error("probe authentication failed")]
    BadMac,
}

/// Whether a datagram is a probe (by header).
pub fn is_probe(d: &[u8]) -> bool {
    d.len() >= 4 && d[..2] == MAGIC && d[3] == 0 && matches!(d[2], PROBE | ACK)
}

/// The probe key of two agents, from their X25519 shared secret (the same on both sides).
pub fn probe_key(shared_secret: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"rally/probe/v1\0");
    h.update(shared_secret);
    h.finalize().into()
}

/// Reads the sender's short id without authenticating (to pick the key to check with).
pub fn peek_from(d: &[u8]) -> Result<ShortId, ProbeError> {
    if !is_probe(d) {
        return Err(ProbeError::NotProbe);
    }
    if d.len() != LEN {
        return Err(ProbeError::Length);
    }
    let mut from = [0u8; 8];
    from.copy_from_slice(&d[4..12]);
    Ok(from)
}

impl Probe {
    pub fn encode(&self, key: &[u8; 32]) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..4].copy_from_slice(&[
            MAGIC[0],
            MAGIC[1],
            match self.kind {
                ProbeKind::Probe => PROBE,
                ProbeKind::Ack => ACK,
            },
            0,
        ]);
        b[4..12].copy_from_slice(&self.from);
        b[12..20].copy_from_slice(&self.txid.to_be_bytes());
        let tag = mac(key, &b[..20]);
        b[20..].copy_from_slice(&tag);
        b
    }

    /// Decodes and authenticates a probe with `key`.
    pub fn decode(d: &[u8], key: &[u8; 32]) -> Result<Probe, ProbeError> {
        let from = peek_from(d)?;
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| ProbeError::BadMac)?;
        m.update(&d[..20]);
        m.verify_truncated_left(&d[20..])
            .map_err(|_| ProbeError::BadMac)?;
        let mut txid = [0u8; 8];
        txid.copy_from_slice(&d[12..20]);
        Ok(Probe {
            kind: if d[2] == PROBE {
                ProbeKind::Probe
            } else {
                ProbeKind::Ack
            },
            from,
            txid: u64::from_be_bytes(txid),
        })
    }
}

fn mac(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    // HMAC accepts keys of any length; a 32-byte key cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    let full = m.finalize().into_bytes();
    let mut t = [0u8; 16];
    t.copy_from_slice(&full[..16]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [7; 32];

    #[test]
    fn probe_and_ack_round_trip() {
        for kind in [ProbeKind::Probe, ProbeKind::Ack] {
            let p = Probe {
                kind,
                from: [1; 8],
                txid: 42,
            };
            assert_eq!(Probe::decode(&p.encode(&KEY), &KEY), Ok(p));
        }
    }

    #[test]
    fn probe_with_another_key_or_altered_is_refused() {
        let p = Probe {
            kind: ProbeKind::Probe,
            from: [1; 8],
            txid: 42,
        }
        .encode(&KEY);
        assert_eq!(Probe::decode(&p, &[8; 32]), Err(ProbeError::BadMac));
        let mut q = p;
        q[13] ^= 1;
        assert_eq!(Probe::decode(&q, &KEY), Err(ProbeError::BadMac));
    }

    #[test]
    fn wrong_length_and_foreign_datagrams_are_refused() {
        let p = Probe {
            kind: ProbeKind::Ack,
            from: [1; 8],
            txid: 1,
        }
        .encode(&KEY);
        assert_eq!(Probe::decode(&p[..35], &KEY), Err(ProbeError::Length));
        assert_eq!(
            Probe::decode(&[1, 0, 0, 0], &KEY),
            Err(ProbeError::NotProbe)
        );
    }

    #[test]
    fn both_sides_derive_the_same_key() {
        assert_eq!(probe_key(&[3; 32]), probe_key(&[3; 32]));
        assert_ne!(probe_key(&[3; 32]), probe_key(&[4; 32]));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Probe::decode(&b, &KEY);
            let _ = peek_from(&b);
        }
    }
}

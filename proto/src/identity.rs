//! Ed25519 identities and the signatures agents and the control plane exchange.
//!
//! Every signature is over a domain-separation tag followed by the message, so a signature made
//! for one purpose can never be replayed for another.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::key::Key32;

/// Tag for an agent's answer to the control plane's registration challenge.
pub const DOMAIN_REGISTER: &[u8] = b"rally/register/v1";

/// The TLS exporter label (RFC 8446 §7.5; QUIC's and TLS's alike) of the control channel's
/// **channel binding**: 32 bytes both ends derive from the connection's keys. An agent may
/// sign its registration over them (in place of the challenge's nonce) and send it right
/// after its `Hello`, one round trip before the challenge would come; the signature is bound
/// to this connection, so it cannot be replayed on another.
pub const REGISTER_EXPORTER_LABEL: &[u8] = b"EXPORTER-rally-control-register";

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("not a valid ed25519 public key")]
    BadKey,
    #[error("signature does not verify")]
    Mismatch,
}

/// An ed25519 key pair. The secret never leaves this type except through [`Identity::seed`],
/// which exists only so the owner can store it.
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// Builds the key pair from 32 secret bytes (the caller draws them from a CSPRNG).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> Key32 {
        Key32(self.key.verifying_key().to_bytes())
    }

    /// The PKCS#8 v1 DER encoding of the key pair (for TLS certificates).
    pub fn pkcs8_der(&self) -> Vec<u8> {
        // RFC 8410: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&self.key.to_bytes());
        der
    }

    /// Signs `msg` under the domain tag `domain`.
    pub fn sign(&self, domain: &[u8], msg: &[u8]) -> [u8; 64] {
        self.key.sign(&tagged(domain, msg)).to_bytes()
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public().short())
    }
}

/// Checks a signature made by [`Identity::sign`] with the same domain tag.
pub fn verify(
    public: &Key32,
    domain: &[u8],
    msg: &[u8],
    signature: &[u8; 64],
) -> Result<(), SignatureError> {
    let key = VerifyingKey::from_bytes(public.as_bytes()).map_err(|_| SignatureError::BadKey)?;
    let sig = Signature::from_bytes(signature);
    key.verify_strict(&tagged(domain, msg), &sig)
        .map_err(|_| SignatureError::Mismatch)
}

/// Verifies a raw ed25519 signature with no domain tag (used for TLS handshake signatures).
pub fn verify_raw(public: &Key32, msg: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
    let key = VerifyingKey::from_bytes(public.as_bytes()).map_err(|_| SignatureError::BadKey)?;
    let sig = Signature::from_slice(signature).map_err(|_| SignatureError::Mismatch)?;
    key.verify_strict(msg, &sig)
        .map_err(|_| SignatureError::Mismatch)
}

/// The bytes an agent signs to answer a registration challenge.
pub fn register_transcript(nonce: &Key32, identity: &Key32, wg_key: &Key32, name: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(96 + name.len());
    m.extend_from_slice(nonce.as_bytes());
    m.extend_from_slice(identity.as_bytes());
    m.extend_from_slice(wg_key.as_bytes());
    m.extend_from_slice(name.as_bytes());
    m
}

fn tagged(domain: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + msg.len());
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(msg);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_verifies_under_its_domain_only() {
        let id = Identity::from_seed([3; 32]);
        let sig = id.sign(DOMAIN_REGISTER, b"hello");
        assert_eq!(
            verify(&id.public(), DOMAIN_REGISTER, b"hello", &sig),
            Ok(())
        );
        assert_eq!(
            verify(&id.public(), b"other", b"hello", &sig),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&id.public(), DOMAIN_REGISTER, b"hellO", &sig),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn another_key_does_not_verify() {
        let a = Identity::from_seed([3; 32]);
        let b = Identity::from_seed([4; 32]);
        let sig = a.sign(DOMAIN_REGISTER, b"m");
        assert_eq!(
            verify(&b.public(), DOMAIN_REGISTER, b"m", &sig),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn pkcs8_carries_the_seed() {
        let id = Identity::from_seed([9; 32]);
        let der = id.pkcs8_der();
        assert_eq!(der.len(), 48);
        assert_eq!(&der[16..], &[9; 32]);
    }

    #[test]
    fn raw_signature_of_wrong_length_is_refused() {
        let id = Identity::from_seed([1; 32]);
        assert_eq!(
            verify_raw(&id.public(), b"m", &[0; 10]),
            Err(SignatureError::Mismatch)
        );
    }
}

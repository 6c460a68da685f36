//! 32-byte keys (ed25519 and x25519 public keys, nonces) and their text form.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 32-byte value shown as unpadded URL-safe base64 (43 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Key32(pub [u8; 32]);

/// Why a key string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    #[error("a key is 43 characters of URL-safe base64, got {0} characters")]
    Length(usize),
    #[error("a key is URL-safe base64 (A-Z a-z 0-9 - _)")]
    Encoding,
}

impl Key32 {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first eight characters of the text form: enough to tell peers apart in a listing.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key32({})", self.short())
    }
}

impl FromStr for Key32 {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 43 {
            return Err(KeyParseError::Length(s.len()));
        }
        // 43 characters decode to 32 bytes and two spare bits; a 33-byte buffer takes the
        // decoder's worst-case estimate without a heap copy.
        let mut buf = [0u8; 33];
        match URL_SAFE_NO_PAD.decode_slice(s, &mut buf) {
            Ok(32) => {
                let mut arr = [0u8; 32];
                arr.copy_from_slice(&buf[..32]);
                Ok(Key32(arr))
            }
            _ => Err(KeyParseError::Encoding),
        }
    }
}

impl Serialize for Key32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Key32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

/// Reads a key from a string slice, borrowed or not, without an owned copy of the text.
struct KeyVisitor;

impl serde::de::Visitor<'_> for KeyVisitor {
    type Value = Key32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key: 43 characters of URL-safe base64")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key32, E> {
        s.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let k = Key32([7; 32]);
        assert_eq!(k.to_string().parse::<Key32>(), Ok(k));
    }

    #[test]
    fn wrong_length_is_refused() {
        assert_eq!("abc".parse::<Key32>(), Err(KeyParseError::Length(3)));
    }

    #[test]
    fn non_base64_is_refused() {
        let bad = "!".repeat(43);
        assert_eq!(bad.parse::<Key32>(), Err(KeyParseError::Encoding));
    }

    #[test]
    fn non_canonical_text_is_refused() {
        // 43 characters carry 258 bits; the two spare bits must be zero.
        let text = format!("{}B", "A".repeat(42));
        assert_eq!(text.parse::<Key32>(), Err(KeyParseError::Encoding));
        let escaped = format!("\"\\u0041{}\"", "A".repeat(42));
        assert_eq!(
            serde_json::from_str::<Key32>(&escaped).unwrap(),
            Key32([0; 32])
        );
    }

    #[test]
    fn json_form_is_a_string() {
        let k = Key32([1; 32]);
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(j, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<Key32>(&j).unwrap(), k);
    }
}

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
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| KeyParseError::Encoding)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyParseError::Encoding)?;
        Ok(Key32(arr))
    }
}

impl Serialize for Key32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Key32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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
    fn json_form_is_a_string() {
        let k = Key32([1; 32]);
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(j, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<Key32>(&j).unwrap(), k);
    }
}

//! Virtual IPs: derived from an agent's identity key inside the overlay network.
//!
//! Candidate `n` for a key is the SHA-256 of a tag, the key and `n`, folded into the host part
//! of the overlay. Host parts whose last octet is 0, 1 or 255 are skipped. The control plane
//! takes the first candidate not held by another agent, so every agent's address is the same on
//! every control plane that sees the same registrations in the same order, and it is stored once
//! given.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::key::Key32;

/// The overlay network: a CIDR block of IPv4 addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

/// Why an overlay network was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OverlayError {
    #[error("overlay prefix must be between /8 and /22, got /{0}")]
    Prefix(u8),
    #[error("overlay network {0} has host bits set")]
    HostBits(Ipv4Addr),
}

impl Default for Overlay {
    fn default() -> Self {
        Overlay {
            network: Ipv4Addr::new(10, 66, 0, 0),
            prefix: 16,
        }
    }
}

impl Overlay {
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, OverlayError> {
        if !(8..=22).contains(&prefix) {
            return Err(OverlayError::Prefix(prefix));
        }
        let o = Overlay { network, prefix };
        if u32::from(network) & o.host_mask() != 0 {
            return Err(OverlayError::HostBits(network));
        }
        Ok(o)
    }

    fn host_mask(&self) -> u32 {
        u32::MAX >> self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & !self.host_mask() == u32::from(self.network)
    }

    /// Whether `ip` may be given to an agent: inside the overlay, last octet not 0, 1 or 255.
    pub fn is_assignable(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && !matches!(ip.octets()[3], 0 | 1 | 255)
    }

    /// The `attempt`-th candidate address for `key`. Every candidate is assignable.
    pub fn candidate(&self, key: &Key32, attempt: u32) -> Ipv4Addr {
        let mut round = 0u32;
        loop {
            let mut h = Sha256::new();
            h.update(b"rally/vip/v1\0");
            h.update(key.as_bytes());
            h.update(attempt.to_be_bytes());
            h.update(round.to_be_bytes());
            let d = h.finalize();
            let host = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & self.host_mask();
            let ip = Ipv4Addr::from(u32::from(self.network) | host);
            if self.is_assignable(ip) {
                return ip;
            }
            round += 1;
        }
    }

    /// The first candidate for `key` for which `taken` says no, trying at most `limit` candidates.
    pub fn assign(
        &self,
        key: &Key32,
        limit: u32,
        mut taken: impl FnMut(Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        (0..limit)
            .map(|n| self.candidate(key, n))
            .find(|ip| !taken(*ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn same_key_same_address() {
        let o = Overlay::default();
        let k = Key32([42; 32]);
        assert_eq!(o.candidate(&k, 0), o.candidate(&k, 0));
        assert_ne!(o.candidate(&k, 0), o.candidate(&k, 1));
    }

    #[test]
    fn collision_takes_the_next_candidate() {
        let o = Overlay::default();
        let k = Key32([42; 32]);
        let first = o.candidate(&k, 0);
        let got = o.assign(&k, 16, |ip| ip == first).unwrap();
        assert_eq!(got, o.candidate(&k, 1));
    }

    #[test]
    fn full_overlay_gives_none() {
        let o = Overlay::default();
        assert_eq!(o.assign(&Key32([1; 32]), 8, |_| true), None);
    }

    #[test]
    fn bad_overlays_are_refused() {
        assert_eq!(
            Overlay::new(Ipv4Addr::new(10, 66, 0, 0), 30),
            Err(OverlayError::Prefix(30))
        );
        assert_eq!(
            Overlay::new(Ipv4Addr::new(10, 66, 1, 0), 16),
            Err(OverlayError::HostBits(Ipv4Addr::new(10, 66, 1, 0)))
        );
    }

    proptest! {
        #[test]
        fn candidates_are_assignable(key in any::<[u8; 32]>(), attempt in 0u32..64, prefix in 8u8..=22) {
            let net = u32::from(Ipv4Addr::new(10, 0, 0, 0)) & !(u32::MAX >> prefix);
            let o = Overlay::new(Ipv4Addr::from(net), prefix).unwrap();
            let ip = o.candidate(&Key32(key), attempt);
            prop_assert!(o.is_assignable(ip), "{ip} not assignable in {net}/{prefix}");
        }
    }
}

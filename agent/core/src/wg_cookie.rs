//! WireGuard's mac1, mac2 and cookie replies (the protocol's §5.4.4–5.4.7), sans-IO: the cookie
//! secret is derived from a seed and the caller's `now`, rotating every two minutes.
//!
//! - mac1 = MAC(HASH("mac1----" ‖ our public key), msg up to mac1): proves the sender knows our
//!   public key; checked with one BLAKE2s before anything else.
//! - cookie = MAC(secret of the current two minutes, source IP ‖ port): only the holder of that
//!   address can learn it, from our cookie reply.
//! - mac2 = MAC(cookie, msg up to mac2): required under load.
//! - cookie reply (64 bytes): the cookie, XChaCha20-Poly1305-encrypted with
//!   HASH("cookie--" ‖ our public key) and the message's mac1 as associated data.
//!
//! boringtun's initiator takes these replies and adds mac2 to its next handshake.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// How long one cookie secret lives.
pub const COOKIE_SECRET_LIFE: Duration = Duration::from_secs(120);
/// Length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;

/// Checks mac1 and mac2 of handshake messages to one key, and makes cookie replies.
pub struct Cookies {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    seed: [u8; 32],
    origin: Instant,
    /// The secret of the current period, and the period's number.
    secret: ([u8; 32], u64),
    nonce_counter: u64,
}

impl Cookies {
    /// For the agent whose WireGuard public key is `public`; `seed` is random.
    pub fn new(public: &[u8; 32], seed: [u8; 32], now: Instant) -> Self {
        Cookies {
            mac1_key: hash(b"mac1----", public),
            cookie_key: hash(b"cookie--", public),
            secret: (derive(&seed, b"secret", 0), 0),
            seed,
            origin: now,
            nonce_counter: 0,
        }
    }

    /// Whether `msg` (a handshake message: mac1 and mac2 are its last 32 bytes) carries a
    /// valid mac1.
    pub fn mac1_ok(&self, msg: &[u8]) -> bool {
        let Some(at) = msg.len().checked_sub(32) else {
            return false;
        };
        mac16(&self.mac1_key, &msg[..at]) == msg[at..at + 16]
    }

    /// Whether `msg` carries a valid mac2 for the cookie of `from` at `now`.
    pub fn mac2_ok(&mut self, msg: &[u8], from: SocketAddr, now: Instant) -> bool {
        let Some(at) = msg.len().checked_sub(16) else {
            return false;
        };
        let cookie = self.cookie(from, now);
        mac16(&cookie, &msg[..at]) == msg[at..]
    }

    /// Writes the cookie reply to `msg` (from `from`) into `dst` (at least 64 bytes); returns
    /// its length, or `None` if `msg` is too short to answer or `dst` too small.
    pub fn reply(
        &mut self,
        msg: &[u8],
        from: SocketAddr,
        now: Instant,
        dst: &mut [u8],
    ) -> Option<usize> {
        if msg.len() < 8 + 32 || dst.len() < COOKIE_REPLY_LEN {
            return None;
        }
        let cookie = self.cookie(from, now);
        let mac1_at = msg.len() - 32;
        let mac1 = &msg[mac1_at..mac1_at + 16];
        self.nonce_counter = self.nonce_counter.wrapping_add(1);
        let nonce_full = derive(&self.seed, b"nonce", self.nonce_counter);
        let nonce = XNonce::from_slice(&nonce_full[..24]);
        let out = &mut dst[..COOKIE_REPLY_LEN];
        out[..4].copy_from_slice(&[3, 0, 0, 0]);
        // The receiver index is the sender index of the message answered.
        out[4..8].copy_from_slice(&msg[4..8]);
        out[8..32].copy_from_slice(nonce);
        out[32..48].copy_from_slice(&cookie);
        let cipher = XChaCha20Poly1305::new((&self.cookie_key).into());
        let tag = cipher
            .encrypt_in_place_detached(nonce, mac1, &mut out[32..48])
            .ok()?;
        out[48..64].copy_from_slice(&tag);
        Some(COOKIE_REPLY_LEN)
    }

    /// The cookie of `from` in the current period.
    fn cookie(&mut self, from: SocketAddr, now: Instant) -> [u8; 16] {
        let period =
            now.saturating_duration_since(self.origin).as_secs() / COOKIE_SECRET_LIFE.as_secs();
        if period != self.secret.1 {
            self.secret = (derive(&self.seed, b"secret", period), period);
        }
        let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.secret.0)
            .expect("BLAKE2s takes a 32-byte key");
        match from {
            SocketAddr::V4(a) => m.update(&a.ip().octets()),
            SocketAddr::V6(a) => m.update(&a.ip().octets()),
        }
        m.update(&from.port().to_be_bytes());
        m.finalize_fixed().into()
    }
}

/// Writes mac1 for the receiver whose public key is `public` into `msg` (a handshake message:
/// its last 32 bytes are mac1 and mac2), as an initiator does; a message shorter than that is
/// left alone. What [`Cookies::mac1_ok`] checks.
pub fn write_mac1(public: &[u8; 32], msg: &mut [u8]) {
    let Some(at) = msg.len().checked_sub(32) else {
        return;
    };
    let mac = mac16(&hash(b"mac1----", public), &msg[..at]);
    msg[at..at + 16].copy_from_slice(&mac);
}

fn hash(label: &[u8], key: &[u8; 32]) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(label)
        .chain_update(key)
        .finalize()
        .into()
}

fn mac16(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m =
        <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("BLAKE2s takes a 32-byte key");
    m.update(data);
    m.finalize_fixed().into()
}

fn derive(seed: &[u8; 32], what: &[u8], n: u64) -> [u8; 32] {
    Blake2s256::new()
        .chain_update(seed)
        .chain_update(what)
        .chain_update(n.to_le_bytes())
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg_testing::{initiation, initiator, receive};
    use boringtun::x25519::{PublicKey, StaticSecret};

    #[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
    fn origin() -> Instant {
        Instant::now()
    }

    fn our_key() -> PublicKey {
        PublicKey::from(&StaticSecret::from([2u8; 32]))
    }

    #[test]
    fn mac1_of_a_real_initiation_checks_and_any_change_breaks_it() {
        let t0 = origin();
        let c = Cookies::new(our_key().as_bytes(), [1; 32], t0);
        let m = initiation(&mut initiator(8, our_key()));
        assert!(c.mac1_ok(&m));
        let mut bad = m.clone();
        bad[40] ^= 1;
        assert!(!c.mac1_ok(&bad));
        let other = Cookies::new(&[5; 32], [1; 32], t0);
        assert!(!other.mac1_ok(&m));
    }

    #[test]
    fn write_mac1_writes_what_boringtun_writes() {
        let real = initiation(&mut initiator(8, our_key()));
        let mut ours = real.clone();
        ours[116..132].fill(0);
        write_mac1(our_key().as_bytes(), &mut ours);
        assert_eq!(ours, real);
        let mut short = [7u8; 31];
        write_mac1(our_key().as_bytes(), &mut short);
        assert_eq!(short, [7u8; 31]);
    }

    #[test]
    fn boringtun_takes_our_cookie_and_answers_with_mac2() {
        let t0 = origin();
        let mut c = Cookies::new(our_key().as_bytes(), [1; 32], t0);
        let from: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        let mut t = initiator(8, our_key());
        let first = initiation(&mut t);
        assert!(!c.mac2_ok(&first, from, t0), "no cookie yet, no mac2");
        let mut reply = [0u8; 64];
        let n = c.reply(&first, from, t0, &mut reply).unwrap();
        assert_eq!(n, 64);
        receive(&mut t, &reply);
        let second = initiation(&mut t);
        assert!(c.mac2_ok(&second, from, t0));
        // The cookie is bound to the address and to the period.
        assert!(!c.mac2_ok(&second, "192.0.2.7:51821".parse().unwrap(), t0));
        assert!(!c.mac2_ok(&second, from, t0 + COOKIE_SECRET_LIFE * 2));
    }
}

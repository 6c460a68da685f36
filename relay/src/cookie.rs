//! Stateless bind cookies: an HMAC over the source address and a coarse time bucket.

use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of one cookie time bucket. A cookie is accepted in its own bucket and the next, so it
/// lives between one and two buckets.
pub const COOKIE_BUCKET: Duration = Duration::from_secs(30);

/// Makes and checks cookies with one secret.
#[derive(Clone)]
pub(crate) struct CookieJar {
    mac: HmacSha256,
}

impl CookieJar {
    pub(crate) fn new(secret: &[u8; 32]) -> Self {
        CookieJar {
            // HMAC takes keys of any length, so this cannot fail.
            mac: <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts any key length"),
        }
    }

    /// The cookie for `src` in time bucket `bucket`.
    pub(crate) fn make(&self, src: SocketAddr, bucket: u64) -> [u8; 32] {
        self.keyed(src, bucket).finalize().into_bytes().into()
    }

    /// Whether `cookie` was made for `src` in bucket `bucket` or the one before (constant time).
    pub(crate) fn check(&self, cookie: &[u8; 32], src: SocketAddr, bucket: u64) -> bool {
        let current = self.keyed(src, bucket).verify_slice(cookie).is_ok();
        let previous = bucket
            .checked_sub(1)
            .is_some_and(|b| self.keyed(src, b).verify_slice(cookie).is_ok());
        current | previous
    }

    fn keyed(&self, src: SocketAddr, bucket: u64) -> HmacSha256 {
        let mut mac = self.mac.clone();
        match src {
            SocketAddr::V4(a) => {
                mac.update(&[4]);
                mac.update(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                mac.update(&[6]);
                mac.update(&a.ip().octets());
            }
        }
        mac.update(&src.port().to_be_bytes());
        mac.update(&bucket.to_be_bytes());
        mac
    }
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieJar(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_is_bound_to_address_bucket_and_secret() {
        let jar = CookieJar::new(&[1; 32]);
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let c = jar.make(a, 10);
        assert!(jar.check(&c, a, 10));
        assert!(jar.check(&c, a, 11), "accepted in the next bucket");
        assert!(!jar.check(&c, a, 12), "not two buckets later");
        assert!(!jar.check(&c, a, 9), "not from the future");
        assert!(!jar.check(&c, "192.0.2.1:4001".parse().unwrap(), 10));
        assert!(!jar.check(&c, "192.0.2.2:4000".parse().unwrap(), 10));
        assert!(!CookieJar::new(&[2; 32]).check(&c, a, 10));
    }
}

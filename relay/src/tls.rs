//! The relay's TLS identity for `--listen-tcp`: a self-signed certificate over its ed25519
//! key (`--tls-key`). Agents pin the key itself, which the control plane hands out with the
//! relay's TCP address, exactly as they pin the control plane's key; the certificate's other
//! contents carry no trust.

use std::sync::Arc;

use rally_proto::Identity;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// ALPN protocol id of relay sessions over TLS.
pub const ALPN: &[u8] = b"rally-relay/1";
/// The name the relay's certificate is issued for.
pub const SERVER_NAME: &str = "rally-relay";

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate could not be made.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// The secret seed of the relay's TLS key (`--tls-key`); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsKey(pub [u8; 32]);

impl TlsKey {
    /// The key pair.
    pub fn identity(&self) -> Identity {
        Identity::from_seed(self.0)
    }
}

impl std::fmt::Debug for TlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsKey({})", self.identity().public())
    }
}

/// A TLS 1.3 server configuration presenting a self-signed certificate for `identity`.
pub fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let pkcs8 = PrivatePkcs8KeyDer::from(identity.pkcs8_der());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)?;
    let cert =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?.self_signed(&key_pair)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(pkcs8),
        )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

//! The control plane's QUIC/TLS identity: a self-signed certificate over its ed25519 key.
//! Agents pin the key itself (see the agent's verifier), so the certificate's other contents
//! carry no trust.

use std::sync::Arc;

use rally_proto::Identity;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// ALPN protocol id of the control channel.
pub const ALPN: &[u8] = b"rally/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("quic: no usable initial cipher suite")]
    Quic,
}

/// The TLS 1.3 configuration presenting a certificate for `identity`: the same for QUIC and
/// for TLS over TCP, so agents pin the same key on both.
pub fn rustls_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let pkcs8 = PrivatePkcs8KeyDer::from(identity.pkcs8_der());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)?;
    let cert =
        rcgen::CertificateParams::new(vec!["rally-control".to_string()])?.self_signed(&key_pair)?;
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

/// A QUIC server configuration presenting a certificate for `identity`.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let tls = rustls_config(identity)?;
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|_| TlsError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        std::time::Duration::from_secs(30)
            .try_into()
            .map_err(|_| TlsError::Quic)?,
    ));
    transport.max_concurrent_uni_streams(0u8.into());
    transport.max_concurrent_bidi_streams(4u8.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

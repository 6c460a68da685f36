//! Pinning the control plane's ed25519 key in TLS 1.3.
//!
//! The certificate the control plane presents is self-signed and carries no trust. What counts
//! is the TLS 1.3 CertificateVerify signature over the handshake transcript: it is checked with
//! the pinned key itself, so only the holder of that key can complete the handshake.

use std::sync::Arc;

use rally_proto::identity::verify_raw;
use rally_proto::Key32;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// ALPN protocol id of the control channel.
pub const ALPN: &[u8] = b"rally/1";
/// The name the control plane's certificate is issued for.
pub const SERVER_NAME: &str = "rally-control";

#[derive(Debug)]
struct PinnedKey(Key32);

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Trust comes from the handshake signature (verify_tls13_signature), not the certificate.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        _cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature,
            ));
        }
        verify_raw(&self.0, message, dss.signature())
            .map(|()| HandshakeSignatureValid::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// ALPN protocol id of relay sessions over TLS on TCP.
pub const RELAY_ALPN: &[u8] = b"rally-relay/1";
/// The name a relay's certificate is issued for.
pub const RELAY_SERVER_NAME: &str = "rally-relay";

/// A TLS 1.3 client configuration that accepts only a server holding `key` (for QUIC and
/// for TLS over TCP alike).
pub fn rustls_config(key: Key32) -> Result<rustls::ClientConfig, rustls::Error> {
    pinned_config(key, ALPN)
}

/// A TLS 1.3 client configuration that accepts only a server holding `key`, offering `alpn`
/// (the control plane's [`ALPN`], or a relay's [`RELAY_ALPN`]).
pub fn pinned_config(key: Key32, alpn: &[u8]) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedKey(key)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// How often an idle connection to the control plane sends a QUIC PING: half the idle
/// timeout, so one lost PING (retransmitted after a probe timeout of well under a second)
/// does not end it, and well inside the 30 s that common NATs keep an idle UDP mapping.
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);
/// The idle timeout this side proposes (the control plane's is the same 30 s; the connection
/// uses the smaller of the two).
pub const IDLE_TIMEOUT_MS: u32 = 30_000;

/// A QUIC client configuration that accepts only a server holding `key`.
pub fn client_config(key: Key32) -> Result<quinn::ClientConfig, rustls::Error> {
    let tls = rustls_config(key)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|_| rustls::Error::General("no QUIC cipher suite".into()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        IDLE_TIMEOUT_MS,
    ))));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

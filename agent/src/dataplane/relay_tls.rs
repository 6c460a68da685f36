//! How a relay over TLS/TCP is verified ([`RelayTrust`], from the control plane's relay
//! entry):
//! - **pinned** (`tcp_key`, the default): the handshake must be signed with the relay's key,
//!   as the control channel pins the control plane's ([`pinned_config`]);
//! - **CA-verified** (`tcp_name`): the relay presents an operator's certificate chain, which
//!   must be valid for that DNS name under the agent's trusted roots: the system's (read once,
//!   on the first such dial; `SSL_CERT_FILE` / `SSL_CERT_DIR` point elsewhere) plus the
//!   operator's CA bundle given to `rally up --relay-ca FILE` ([`set_operator_roots`]). No
//!   certificate is ever accepted unverified.
//!
//! A refused handshake is logged at `warn` with its reason (at most once a minute per relay
//! and reason: the engine redials every frame or so).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::control::tls::{pinned_config, RELAY_ALPN, RELAY_SERVER_NAME};
use crate::node::{RelayTrust, TcpEndpoint};

/// How often one refusal reason is logged at `warn` per relay address.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why an operator's CA bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaBundleError {
    #[error("{path}: cannot read: {why}")]
    Read { path: String, why: std::io::Error },
    #[error("{path}: not a PEM certificate bundle: {why}")]
    Pem { path: String, why: String },
    #[error("{path}: no CERTIFICATE in the file")]
    Empty { path: String },
    #[error("{path}: no usable CA certificate ({bad} could not be parsed)")]
    Unusable { path: String, bad: usize },
}

/// The certificates of a PEM CA bundle (`rally up --relay-ca FILE`), each checked to parse as
/// a trust anchor.
pub fn load_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaBundleError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|why| CaBundleError::Read {
        path: shown.clone(),
        why,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaBundleError::Pem {
            path: shown.clone(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaBundleError::Empty { path: shown });
    }
    let mut store = RootCertStore::empty();
    let (_, bad) = store.add_parsable_certificates(certs.iter().cloned());
    if store.is_empty() {
        return Err(CaBundleError::Unusable { path: shown, bad });
    }
    Ok(certs)
}

static OPERATOR_ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();

/// Trusts `certs` (an operator's CA bundle) for CA-verified relays, next to the system's
/// roots. Once per process, before the first dial; later calls are ignored (returns false).
pub fn set_operator_roots(certs: Vec<CertificateDer<'static>>) -> bool {
    OPERATOR_ROOTS.set(certs).is_ok()
}

/// The roots CA-verified relays are checked against: the system's and the operator's.
fn roots() -> Arc<RootCertStore> {
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for e in &native.errors {
                debug!("system trusted roots: {e}");
            }
            let (system, _) = store.add_parsable_certificates(native.certs);
            let operator = OPERATOR_ROOTS.get().cloned().unwrap_or_default();
            let (ops, _) = store.add_parsable_certificates(operator);
            info!(
                system,
                operator = ops,
                "trusted roots for relays with an operator's certificate"
            );
            Arc::new(store)
        })
        .clone()
}

/// The client configuration and server name to dial `endpoint` with.
pub fn client_config(
    endpoint: &TcpEndpoint,
) -> Result<(rustls::ClientConfig, ServerName<'static>), String> {
    match &endpoint.trust {
        RelayTrust::Pinned(key) => {
            let config = pinned_config(*key, RELAY_ALPN).map_err(|e| e.to_string())?;
            Ok((
                config,
                ServerName::try_from(RELAY_SERVER_NAME).map_err(|e| e.to_string())?,
            ))
        }
        RelayTrust::Ca { server_name } => ca_config(roots(), server_name),
    }
}

/// A TLS 1.3 configuration that accepts only a chain valid for `server_name` under `roots`.
pub fn ca_config(
    roots: Arc<RootCertStore>,
    server_name: &str,
) -> Result<(rustls::ClientConfig, ServerName<'static>), String> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("relay name {server_name:?}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| format!("cannot verify relay {server_name}: no trusted roots ({e})"))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    Ok((tls, name))
}

/// The reason a TLS handshake with `endpoint` failed, logged at `warn` (see the module docs).
pub fn refused(endpoint: &TcpEndpoint, e: &std::io::Error) -> String {
    let how = match &endpoint.trust {
        RelayTrust::Pinned(key) => format!("pinned key {key}"),
        RelayTrust::Ca { server_name } => format!("CA-verified for {server_name}"),
    };
    let hint = match (&endpoint.trust, e.to_string().contains("UnknownIssuer")) {
        (RelayTrust::Ca { .. }, true) => {
            " (the relay's CA is not among the trusted roots: rally up --relay-ca FILE)"
        }
        _ => "",
    };
    let why = format!("relay over TLS/TCP refused ({how}): {e}{hint}");
    static LOGGED: Mutex<Option<HashMap<(SocketAddr, String), Instant>>> = Mutex::new(None);
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    let logged = logged.get_or_insert_with(HashMap::new);
    let now = Instant::now();
    let key = (endpoint.addr, why.clone());
    if logged
        .get(&key)
        .is_none_or(|t| now.duration_since(*t) >= WARN_EVERY)
    {
        logged.insert(key, now);
        warn!(addr = %endpoint.addr, "{why}");
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    const NAME: &str = "relay.rally.test";

    #[tokio::test]
    async fn a_ca_verified_relay_is_accepted_only_under_its_ca_and_name() {
        let ca = authority("trusted");
        let other_ca = authority("other");
        let addr = tls_server(&ca).await;
        let trusted = store(&ca.1);
        assert!(handshake(addr, trusted.clone(), NAME).await.is_ok());

        let e = handshake(addr, store(&other_ca.1), NAME).await.unwrap_err();
        let why = refused(&ca_endpoint(addr), &e);
        assert!(why.contains("UnknownIssuer"), "{why}");
        assert!(why.contains("--relay-ca"), "says what to do: {why}");
        assert!(why.contains("CA-verified for relay.rally.test"), "{why}");

        let e = handshake(addr, trusted, "other.rally.test")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not valid for name"), "{e}");
    }

    #[test]
    fn no_trusted_root_is_refused_before_any_dial() {
        let e = ca_config(Arc::new(RootCertStore::empty()), NAME).unwrap_err();
        assert!(e.contains("no trusted roots"), "{e}");
    }

    #[test]
    fn a_pinned_relay_keeps_the_pinned_name() {
        let key = rally_proto::Identity::from_seed([1; 32]).public();
        let endpoint = TcpEndpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], 443)),
            trust: RelayTrust::Pinned(key),
        };
        let (config, name) = client_config(&endpoint).unwrap();
        assert_eq!(name, ServerName::try_from(RELAY_SERVER_NAME).unwrap());
        assert_eq!(config.alpn_protocols, vec![RELAY_ALPN.to_vec()]);
    }

    #[test]
    fn a_ca_bundle_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ca) = authority("bundle");
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        assert_eq!(load_ca_bundle(&good).unwrap().len(), 1);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = load_ca_bundle(&empty).unwrap_err().to_string();
        assert!(
            e.contains("no CERTIFICATE") && e.contains("empty.pem"),
            "{e}"
        );
        let e = load_ca_bundle(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    type Ca = (rcgen::KeyPair, rcgen::Certificate);

    /// A CA: its key and certificate.
    fn authority(tag: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("Rally test CA {tag}"));
        let cert = params.self_signed(&key).unwrap();
        (key, cert)
    }

    fn store(ca: &rcgen::Certificate) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        Arc::new(roots)
    }

    fn ca_endpoint(addr: SocketAddr) -> TcpEndpoint {
        TcpEndpoint {
            addr,
            trust: RelayTrust::Ca {
                server_name: NAME.into(),
            },
        }
    }

    /// A TLS 1.3 server on 127.0.0.1 presenting a certificate for [`NAME`] issued by `ca`;
    /// it accepts connections until the test ends.
    async fn tls_server(ca: &Ca) -> SocketAddr {
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![NAME.to_string()])
            .unwrap()
            .signed_by(&key, &ca.1, &ca.0)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![RELAY_ALPN.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(stream).await;
                });
            }
        });
        addr
    }

    async fn handshake(
        addr: SocketAddr,
        roots: Arc<RootCertStore>,
        name: &str,
    ) -> std::io::Result<()> {
        let (config, name) = ca_config(roots, name).map_err(std::io::Error::other)?;
        let stream = tokio::net::TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map(drop)
    }
}

//! The relay's TLS identity for `--listen-tcp`, one of:
//! - a self-signed certificate over its ed25519 key (`--tls-key`). Agents pin the key itself,
//!   which the control plane hands out with the relay's TCP address, exactly as they pin the
//!   control plane's key; the certificate's other contents carry no trust;
//! - an operator's certificate chain and its private key (`--tls-cert`, `--tls-cert-key`, PEM
//!   files), e.g. from a public or company CA. The control plane's relay entry then names the
//!   DNS name the certificate is for, and agents verify the chain against their trusted roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rally_proto::Identity;
use rustls::pki_types::pem::PemObject;
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
    /// A PEM file could not be read or holds nothing usable.
    #[error("{}: {why}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The private key is not the key of the chain's first certificate.
    #[error("{} is not the private key of the first certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the operator's key or certificate.
    #[error("{} with {}: {why}", cert.display(), key.display())]
    Operator {
        /// The certificate chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        why: rustls::Error,
    },
}

/// What the relay presents on `--listen-tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsIdentity {
    /// A self-signed certificate over this key, which agents pin.
    Pinned(TlsKey),
    /// An operator's certificate chain (leaf first) and its private key.
    Operator(OperatorCert),
}

/// An operator's certificate chain and private key, read from PEM files.
pub struct OperatorCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    paths: (PathBuf, PathBuf),
}

impl Clone for OperatorCert {
    fn clone(&self) -> Self {
        OperatorCert {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            paths: self.paths.clone(),
        }
    }
}

/// Equal when the chains and the key's bytes are.
impl PartialEq for OperatorCert {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key.secret_der() == other.key.secret_der()
    }
}

impl Eq for OperatorCert {}

impl std::fmt::Debug for OperatorCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OperatorCert({} certificates from {}, key from {})",
            self.chain.len(),
            self.paths.0.display(),
            self.paths.1.display()
        )
    }
}

impl OperatorCert {
    /// Reads the chain (PEM `CERTIFICATE` blocks, leaf first) and the private key (PEM PKCS#8,
    /// PKCS#1 or SEC1), and checks that the key is the leaf's.
    pub fn load(cert: &Path, key: &Path) -> Result<OperatorCert, TlsError> {
        let pem = |path: &Path, why: String| TlsError::Pem {
            path: path.to_owned(),
            why,
        };
        let bytes = std::fs::read(cert).map_err(|e| pem(cert, format!("cannot read: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem(cert, format!("not a PEM certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(pem(cert, "no CERTIFICATE in the file".into()));
        }
        let bytes = std::fs::read(key).map_err(|e| pem(key, format!("cannot read: {e}")))?;
        let key_der = PrivateKeyDer::from_pem_slice(&bytes)
            .map_err(|e| pem(key, format!("no PEM private key: {e}")))?;
        let loaded = OperatorCert {
            chain,
            key: key_der,
            paths: (cert.to_owned(), key.to_owned()),
        };
        loaded.config()?;
        Ok(loaded)
    }

    /// A TLS 1.3 server configuration presenting this chain.
    fn config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let (cert, key) = self.paths.clone();
        let operator = |why| match why {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert.clone(),
                key: key.clone(),
            },
            why => TlsError::Operator {
                cert: cert.clone(),
                key: key.clone(),
                why,
            },
        };
        let mut tls = builder()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(operator)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        Ok(tls)
    }
}

impl TlsIdentity {
    /// The TLS 1.3 server configuration presenting this identity.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        match self {
            TlsIdentity::Pinned(key) => server_config(&key.identity()),
            TlsIdentity::Operator(cert) => cert.config(),
        }
    }
}

fn builder() -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, TlsError>
{
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?)
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
    let mut tls = builder()?.with_no_client_auth().with_single_cert(
        vec![CertificateDer::from(cert.der().to_vec())],
        PrivateKeyDer::Pkcs8(pkcs8),
    )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM.
    fn cert_pem(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rally-relay-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_operator_chain_and_its_key_make_a_tls13_config() {
        let d = tmp("ok");
        let (cert, key) = cert_pem("relay.example.com");
        let c = write(&d, "c.pem", &cert);
        let k = write(&d, "k.pem", &key);
        let loaded = OperatorCert::load(&c, &k).unwrap();
        let config = TlsIdentity::Operator(loaded).server_config().unwrap();
        assert_eq!(config.alpn_protocols, vec![ALPN.to_vec()]);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_by_name() {
        let d = tmp("mismatch");
        let (cert, _) = cert_pem("relay.example.com");
        let (_, other_key) = cert_pem("relay.example.com");
        let c = write(&d, "c.pem", &cert);
        let k = write(&d, "k.pem", &other_key);
        let e = OperatorCert::load(&c, &k).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(e
            .to_string()
            .contains("is not the private key of the first certificate"));
    }

    #[test]
    fn missing_empty_or_swapped_files_are_refused_with_the_file_named() {
        let d = tmp("bad");
        let (cert, key) = cert_pem("relay.example.com");
        let c = write(&d, "c.pem", &cert);
        let k = write(&d, "k.pem", &key);
        let empty = write(&d, "empty.pem", "");
        let missing = d.join("missing.pem");
        for (cert, key, says) in [
            (&missing, &k, "cannot read"),
            (&empty, &k, "no CERTIFICATE"),
            (&k, &k, "no CERTIFICATE"),
            (&c, &c, "no PEM private key"),
            (&c, &missing, "cannot read"),
        ] {
            let e = OperatorCert::load(cert, key).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(e.contains(".pem"), "names the file: {e}");
        }
    }
}

//! Relays that listen on TLS/TCP too (`rally-relay serve --listen-tcp HOST:443 --tls-key
//! FILE`, or `--tls-cert FILE --tls-cert-key FILE` with an operator's certificate), for agents
//! behind networks that let out only TCP 80/443.

use anyhow::{anyhow, Result};

use crate::host::Host;
use crate::rally::RelayServer;

/// The relays' TLS port: the one a UDP-blocked network lets out.
pub const RELAY_TLS_PORT: u16 = 443;

/// A relay on `host` serving UDP as [`RelayServer::start`] does and TLS on TCP port 443 with
/// a key made by `rally-relay tls-key`; its spec carries `tcp=` and `key=`.
pub fn start_tcp_relay(host: &Host, name: &str, control_key: &str) -> Result<RelayServer> {
    start_tcp_relay_on(host, name, control_key, RELAY_TLS_PORT)
}

/// Like [`start_tcp_relay`], with TLS on TCP `port`.
pub fn start_tcp_relay_on(
    host: &Host,
    name: &str,
    control_key: &str,
    port: u16,
) -> Result<RelayServer> {
    let bin = crate::bins::bin_path("rally-relay")?
        .to_string_lossy()
        .into_owned();
    let key_file = host.log_path(&format!("relay-{name}-tls.key"));
    if let Some(dir) = key_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let key_path = key_file.to_string_lossy().into_owned();
    let out = host.run_ok(&[bin.as_str(), "tls-key", key_path.as_str()])?;
    let key = out
        .lines()
        .last()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| anyhow!("rally-relay tls-key printed no key"))?
        .to_owned();
    let tcp = format!("{}:{port}", host.ip());
    RelayServer::start_with(
        host,
        name,
        control_key,
        &["--listen-tcp", tcp.as_str(), "--tls-key", key_path.as_str()],
        format!(",tcp={tcp},key={key}"),
    )
}

/// A relay like [`start_tcp_relay`] that presents an operator's certificate for `tls_name`,
/// issued by a CA made here (rcgen); its spec carries `tcp=` and `tls-name=`. Returns the relay
/// and the CA's PEM file (for `rally up --relay-ca`).
pub fn start_ca_relay(
    host: &Host,
    name: &str,
    control_key: &str,
    tls_name: &str,
) -> Result<(RelayServer, std::path::PathBuf)> {
    let file = |what: &str| host.log_path(&format!("relay-{name}-{what}"));
    let (ca_file, cert_file, key_file) = (file("ca.pem"), file("cert.pem"), file("key.pem"));
    if let Some(dir) = ca_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("Rally lab CA {name}"));
    let ca = ca.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let leaf =
        rcgen::CertificateParams::new(vec![tls_name.to_string()])?.signed_by(&key, &ca, &ca_key)?;
    std::fs::write(&ca_file, ca.pem())?;
    std::fs::write(&cert_file, leaf.pem() + &ca.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    let tcp = format!("{}:{RELAY_TLS_PORT}", host.ip());
    let (cert, key) = (cert_file.to_string_lossy(), key_file.to_string_lossy());
    let relay = RelayServer::start_with(
        host,
        name,
        control_key,
        &[
            "--listen-tcp",
            tcp.as_str(),
            "--tls-cert",
            &cert,
            "--tls-cert-key",
            &key,
        ],
        format!(",tcp={tcp},tls-name={tls_name}"),
    )?;
    Ok((relay, ca_file))
}

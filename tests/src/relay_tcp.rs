//! Relays that listen on TLS/TCP too (`rally-relay serve --listen-tcp HOST:443 --tls-key
//! FILE`), for agents behind networks that let out only TCP 80/443.

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

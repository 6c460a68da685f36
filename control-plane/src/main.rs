use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rally_control::hub::{Hub, Settings};
use rally_control::lock::DataDirLock;
use rally_control::server::{Limits, Server};
use rally_control::store::SqliteStore;
use rally_control::{db_path, key_path, keyfile, tls};
use rally_proto::control::validate_name;
use rally_proto::{Identity, Overlay, RelayEntry};
use rand_core::RngCore;
use tracing::info;

/// Rally control plane: registers agents, keeps parties and invites, introduces peers.
#[derive(Parser)]
#[command(name = "rally-control", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at startup: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Create the data directory and key; print the control key (last line of stdout).
    Init {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Serve agents over QUIC, and over TLS on TCP for networks that block UDP.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        /// Address to listen on (UDP, QUIC).
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Address to listen on for the same protocol over TLS 1.3 on TCP (default: the
        /// address of --listen, on TCP).
        #[arg(long)]
        listen_tcp: Option<SocketAddr>,
        /// Address agents dial, written into invite codes (default: --listen).
        #[arg(long)]
        public_addr: Option<String>,
        /// A relay, NAME=HOST:PORT, with ",tcp=HOST:PORT" when it serves TLS over TCP too and
        /// how agents verify it there: ",key=KEY" (its self-signed key, pinned) or
        /// ",tls-name=DNSNAME" (its operator's certificate, checked against the agents' trusted
        /// roots). Repeatable.
        #[arg(
            long = "relay",
            value_name = "NAME=HOST:PORT[,tcp=HOST:PORT,key=KEY|tls-name=DNSNAME]"
        )]
        relays: Vec<String>,
        /// Serve Prometheus metrics on this HTTP address.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Join attempts allowed at once per source address.
        #[arg(long, default_value_t = 20)]
        join_burst: u32,
        /// Seconds to regain one join attempt.
        #[arg(long, default_value_t = 3)]
        join_refill_secs: u64,
        /// Let any new identity register and stay: no per-address limit on new identities and
        /// no expiry of identities that never join a party.
        #[arg(long)]
        open_registration: bool,
        /// New identities allowed at once per source address.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        register_burst: u32,
        /// Seconds to regain one new identity per source address.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        register_refill_secs: u64,
        /// Seconds after which an identity in no party, not connected, is removed.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
        unjoined_ttl_secs: u64,
        /// Connections allowed in all (further attempts are refused).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
        max_connections: u64,
        /// Connections allowed per source address.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
        max_connections_per_ip: u64,
        /// Above this many connections, clients must first answer a QUIC Retry.
        #[arg(long, default_value_t = 1_000)]
        retry_above: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RALLY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.cmd {
        Cmd::Init { data_dir } => init(&data_dir),
        Cmd::Serve {
            data_dir,
            listen,
            listen_tcp,
            public_addr,
            relays,
            metrics,
            join_burst,
            join_refill_secs,
            open_registration,
            register_burst,
            register_refill_secs,
            unjoined_ttl_secs,
            max_connections,
            max_connections_per_ip,
            retry_above,
        } => {
            let relays = match relays
                .iter()
                .map(|r| parse_relay(r))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            let public_addr = public_addr.unwrap_or_else(|| listen.to_string());
            if public_addr.len() > rally_proto::invite::MAX_ADDR_LEN {
                eprintln!(
                    "error: --public-addr is longer than {} bytes",
                    rally_proto::invite::MAX_ADDR_LEN
                );
                std::process::exit(2);
            }
            let settings = Settings {
                join_burst: join_burst.max(1),
                join_refill: Duration::from_secs(join_refill_secs.max(1)),
                open_registration,
                register_burst,
                register_refill: Duration::from_secs(register_refill_secs),
                unjoined_ttl: Duration::from_secs(unjoined_ttl_secs),
                ..Settings::new(public_addr, relays)
            };
            let limits = Limits {
                max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
                max_connections_per_ip: usize::try_from(max_connections_per_ip)
                    .unwrap_or(usize::MAX),
                retry_above: usize::try_from(retry_above).unwrap_or(usize::MAX),
            };
            let listen_tcp = listen_tcp.unwrap_or(listen);
            serve(&data_dir, (listen, listen_tcp), metrics, settings, limits)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `--relay NAME=HOST:PORT[,tcp=HOST:PORT,key=KEY|tls-name=DNSNAME]`: the relay's UDP
/// address and, when it serves TLS over TCP too, that address and how agents verify it: the
/// key of its self-signed certificate (printed by `rally-relay tls-key`), which they pin, or
/// the DNS name of its operator's certificate, which they check against their trusted roots.
fn parse_relay(s: &str) -> Result<RelayEntry, String> {
    let usage = || format!("--relay {s:?}: expected {RELAY_SPEC}");
    let (name, rest) = s.split_once('=').ok_or_else(usage)?;
    validate_name(name).map_err(|e| format!("--relay {s:?}: {e}"))?;
    let mut parts = rest.split(',');
    let addr = parts.next().unwrap_or_default();
    let host_port = |a: &str| {
        a.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
    };
    if !host_port(addr) {
        return Err(usage());
    }
    let (mut tcp, mut tcp_key, mut tcp_name) = (None, None, None);
    for part in parts {
        match part.split_once('=') {
            Some(("tcp", a)) if host_port(a) && tcp.is_none() => tcp = Some(a.to_owned()),
            Some(("key", k)) if tcp_key.is_none() => {
                tcp_key = Some(k.parse().map_err(|e| format!("--relay {s:?}: key: {e}"))?)
            }
            Some(("tls-name", n)) if tcp_name.is_none() => {
                rustls::pki_types::ServerName::try_from(n)
                    .ok()
                    .filter(|n| matches!(n, rustls::pki_types::ServerName::DnsName(_)))
                    .ok_or_else(|| format!("--relay {s:?}: tls-name {n:?} is not a DNS name"))?;
                tcp_name = Some(n.to_owned());
            }
            _ => return Err(usage()),
        }
    }
    match (&tcp, &tcp_key, &tcp_name) {
        (None, None, None) | (Some(_), Some(_), None) | (Some(_), None, Some(_)) => {}
        (_, Some(_), Some(_)) => {
            return Err(format!(
                "--relay {s:?}: key=KEY (a pinned self-signed key) and tls-name=DNSNAME (an \
                 operator's certificate) exclude each other"
            ))
        }
        _ => {
            return Err(format!(
                "--relay {s:?}: tcp=HOST:PORT goes with key=KEY or tls-name=DNSNAME (how agents \
                 verify the relay on tcp)"
            ))
        }
    }
    Ok(RelayEntry {
        name: name.to_owned(),
        addr: addr.to_owned(),
        tcp,
        tcp_key,
        tcp_name,
    })
}

/// The shape of `--relay`.
const RELAY_SPEC: &str = "NAME=HOST:PORT[,tcp=HOST:PORT,key=KEY|tls-name=DNSNAME]";

#[allow(clippy::disallowed_types)]
fn init(data_dir: &Path) -> Result<()> {
    keyfile::private_dir(data_dir)?;
    let path = key_path(data_dir);
    let identity = if path.exists() {
        eprintln!("{} exists; keeping the existing key", path.display());
        Identity::from_seed(keyfile::read(&path)?)
    } else {
        let mut seed = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut seed);
        keyfile::write(&path, &seed)?;
        Identity::from_seed(seed)
    };
    SqliteStore::open(&db_path(data_dir), Overlay::default())
        .with_context(|| format!("creating {}", db_path(data_dir).display()))?;
    println!("control key (give it to relays, and to agents that use --control):");
    println!("{}", identity.public());
    Ok(())
}

fn serve(
    data_dir: &Path,
    (listen, listen_tcp): (SocketAddr, SocketAddr),
    metrics: Option<SocketAddr>,
    settings: Settings,
    limits: Limits,
) -> Result<()> {
    let path = key_path(data_dir);
    if !path.exists() {
        bail!(
            "{} not found; run `rally-control init --data-dir {}` first",
            path.display(),
            data_dir.display()
        );
    }
    let _lock = DataDirLock::acquire(data_dir)?;
    let identity = Identity::from_seed(keyfile::read(&path)?);
    let store = SqliteStore::open(&db_path(data_dir), Overlay::default())
        .with_context(|| format!("opening {}", db_path(data_dir).display()))?;
    let server_config = tls::server_config(&identity)?;
    let tcp_config = tls::rustls_config(&identity)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let socket = rally_control::udp::bind(listen, rally_control::udp::SOCKET_BUFFER)
            .with_context(|| format!("listening on {listen}"))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            std::sync::Arc::new(quinn::TokioRuntime),
        )
        .with_context(|| format!("listening on {listen}"))?;
        let tcp_listener = tokio::net::TcpListener::bind(listen_tcp)
            .await
            .with_context(|| format!("listening on tcp {listen_tcp}"))?;
        info!(%listen, %listen_tcp, key = %identity.public(), "control plane serving");
        let metrics_listener = match metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening for metrics on tcp {addr}"))?,
            ),
            None => None,
        };
        let hub = Hub::new(Box::new(store), identity, settings)
            .context("loading agents and parties from the database")?;
        let server = Server::new(hub, limits);
        if let Some(l) = metrics_listener {
            let s = server.clone();
            tokio::spawn(rally_control::metrics::serve(l, move || s.render_metrics()));
        }
        let serving_tcp = tokio::spawn(server.clone().serve_tcp(tcp_listener, tcp_config));
        let serving = tokio::spawn(server.serve(endpoint.clone()));
        shutdown_signal().await;
        info!("shutting down");
        endpoint.close(0u32.into(), b"control plane shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        serving.abort();
        serving_tcp.abort();
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_with_a_pinned_key_is_handed_out_with_tcp_key() {
        let key = rally_proto::Identity::from_seed([3; 32]).public();
        let r = parse_relay(&format!("r1=1.2.3.4:3478,tcp=1.2.3.4:443,key={key}")).unwrap();
        assert_eq!(r.tcp.as_deref(), Some("1.2.3.4:443"));
        assert_eq!(r.tcp_key, Some(key));
        assert_eq!(r.tcp_name, None);
    }

    #[test]
    fn a_relay_with_an_operator_certificate_is_handed_out_with_tcp_name() {
        let r = parse_relay("r1=1.2.3.4:3478,tcp=relay.example.com:443,tls-name=relay.example.com")
            .unwrap();
        assert_eq!(r.tcp.as_deref(), Some("relay.example.com:443"));
        assert_eq!(r.tcp_key, None);
        assert_eq!(r.tcp_name.as_deref(), Some("relay.example.com"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["tcp_name"], "relay.example.com");
        assert!(json.get("tcp_key").is_none(), "{json}");
    }

    #[test]
    fn tcp_needs_exactly_one_way_to_verify_the_relay() {
        let key = rally_proto::Identity::from_seed([3; 32]).public();
        let both = format!("r1=1.2.3.4:3478,tcp=1.2.3.4:443,key={key},tls-name=relay.example.com");
        assert!(parse_relay(&both)
            .unwrap_err()
            .contains("exclude each other"));
        for s in [
            "r1=1.2.3.4:3478,tcp=1.2.3.4:443",
            "r1=1.2.3.4:3478,tls-name=relay.example.com",
        ] {
            assert!(parse_relay(s).unwrap_err().contains("goes with"), "{s}");
        }
        assert!(parse_relay(&format!("r1=1.2.3.4:3478,key={key}")).is_err());
    }

    #[test]
    fn a_tls_name_must_be_a_dns_name() {
        for bad in ["1.2.3.4", "", "not a name", "relay.example.com,"] {
            let s = format!("r1=1.2.3.4:3478,tcp=1.2.3.4:443,tls-name={bad}");
            assert!(parse_relay(&s).is_err(), "{s}");
        }
        let twice = "r1=1.2.3.4:3478,tcp=1.2.3.4:443,tls-name=x,tls-name=y";
        assert!(parse_relay(twice).is_err());
    }

    #[test]
    fn a_relay_without_tcp_is_udp_only() {
        let r = parse_relay("r1=relay.example.com:3478").unwrap();
        assert_eq!((r.tcp, r.tcp_key, r.tcp_name), (None, None, None));
    }
}

//! `rally-relay`: Rally's relay and STUN server.
//!
//! ```text
//! rally-relay serve --listen ADDR:PORT --control-key KEY [--max-sessions N]
//!     [--max-sessions-per-ip N] [--metrics ADDR:PORT] [--alt-port PORT]
//!     [--max-pps N] [--max-bps N] [--idle-timeout SECS] [--coalesce-us MICROS]
//!     [--listen-tcp ADDR:PORT (--tls-key FILE | --tls-cert FILE --tls-cert-key FILE)]
//! rally-relay tls-key FILE     create FILE (mode 0600) unless it exists; print its public key
//! ```
//!
//! Exit status: 0 after SIGINT/SIGTERM, 1 on a runtime error (one `error: ...` line on stderr),
//! 2 on a usage error.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rally_proto::keyfile;
use rally_proto::Key32;
use rally_relay::tls::{OperatorCert, TlsIdentity, TlsKey};
use rally_relay::{coalesce, Limits, Options, Server};
use rand_core::{OsRng, RngCore};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "rally-relay",
    version,
    about = "Rally relay: STUN server and authenticated packet forwarding on one UDP port"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve STUN and relay sessions until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Create the TLS key for --listen-tcp (kept if it exists); print its public key, which
    /// the control plane pins (`--relay NAME=HOST:PORT,tcp=HOST:PORT,key=KEY`), last on stdout.
    TlsKey {
        /// The key file (mode 0600).
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// UDP address for STUN and relayed traffic (the usual port is 3478; 0 picks one).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The control plane's public key (printed by `rally-control init`; it may start with '-').
    #[arg(long, value_name = "KEY", allow_hyphen_values = true)]
    control_key: Key32,
    /// Most sessions at once.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_sessions)]
    max_sessions: usize,
    /// Most sessions from one source IP (IPv6: per /64).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_sessions_per_ip)]
    max_sessions_per_ip: usize,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// A second UDP port on the same IP for RFC 5780 NAT tests (0: none).
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    alt_port: u16,
    /// Packets per second one session may send.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_pps,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_pps: u64,
    /// Bits per second one session may send.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_bps,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_bps: u64,
    /// Seconds without traffic after which a session is removed.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().idle_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// Microseconds the forwarding thread waits, after a busy wake-up, before it reads again,
    /// so that busy traffic is handled in larger batches (0: never wait). Quiet traffic never
    /// waits.
    #[arg(long, value_name = "MICROS",
          default_value_t = coalesce::DEFAULT_PAUSE.as_micros() as u64,
          value_parser = clap::value_parser!(u64)
              .range(0..=coalesce::MAX_PAUSE.as_micros() as u64))]
    coalesce_us: u64,
    /// Also serve relay sessions over TLS 1.3 on TCP here (usually port 443), for agents
    /// whose network blocks UDP; with --tls-key, or --tls-cert and --tls-cert-key.
    #[arg(long, value_name = "ADDR:PORT", requires = "tls_identity")]
    listen_tcp: Option<SocketAddr>,
    /// The TLS key for --listen-tcp (made by `rally-relay tls-key FILE`): a self-signed
    /// certificate whose key the control plane pins (`--relay ...,key=KEY`).
    #[arg(long, value_name = "FILE", requires = "listen_tcp", group = "tls_identity",
          conflicts_with_all = ["tls_cert", "tls_cert_key"])]
    tls_key: Option<PathBuf>,
    /// An operator's certificate chain for --listen-tcp (PEM, leaf first), for the DNS name
    /// the control plane hands out (`--relay ...,tls-name=DNSNAME`); agents check it against
    /// their trusted roots. Read at start: restart to rotate.
    #[arg(long, value_name = "FILE", requires_all = ["listen_tcp", "tls_cert_key"],
          group = "tls_identity")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert's first certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_cert_key: Option<PathBuf>,
}

impl ServeArgs {
    /// The TCP listener and what it presents, read from the files given.
    fn tcp(&self) -> anyhow::Result<Option<(SocketAddr, TlsIdentity)>> {
        let Some(addr) = self.listen_tcp else {
            return Ok(None);
        };
        let identity = match (&self.tls_key, &self.tls_cert, &self.tls_cert_key) {
            (Some(file), _, _) => {
                let seed = keyfile::read(file).context("reading the --tls-key file")?;
                TlsIdentity::Pinned(TlsKey(seed))
            }
            (None, Some(cert), Some(key)) => TlsIdentity::Operator(
                OperatorCert::load(cert, key).context("--tls-cert/--tls-cert-key")?,
            ),
            _ => anyhow::bail!("--listen-tcp needs --tls-key, or --tls-cert and --tls-cert-key"),
        };
        Ok(Some((addr, identity)))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::TlsKey { file } => return tls_key(&file),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(*args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before anything is logged: whoever waits for "listening" may send SIGTERM at once.
    let shutdown = shutdown_signal()?;
    let mut seed = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| anyhow::anyhow!("drawing the cookie secret from the OS: {e}"))?;
    let opts = Options {
        listen: args.listen,
        alt_port: args.alt_port,
        metrics: args.metrics,
        control_key: args.control_key,
        limits: Limits {
            max_sessions: args.max_sessions,
            max_sessions_per_ip: args.max_sessions_per_ip,
            max_pps: args.max_pps,
            max_bps: args.max_bps,
            idle_timeout: Duration::from_secs(args.idle_timeout),
            ..Limits::default()
        },
        coalesce: Duration::from_micros(args.coalesce_us),
        tcp: args.tcp()?,
    };
    let server = Server::bind(opts, seed).await?;
    tracing::info!("relay listening on {}", server.local_addr());
    if let Some(a) = server.alt_addr() {
        tracing::info!("alternate STUN port on {a}");
        if a.ip().is_unspecified() {
            tracing::warn!("listening on a wildcard address: STUN responses carry no RESPONSE-ORIGIN or OTHER-ADDRESS; listen on a specific IP for RFC 5780 NAT tests");
        }
    }
    if let Some(a) = server.tcp_addr() {
        tracing::info!("relay listening on tcp {a} (TLS)");
    }
    if let Some(a) = server.metrics_addr() {
        tracing::info!("metrics listening on {a}");
    }
    let stats = server.run(shutdown).await?;
    tracing::info!(
        sessions_total = stats.sessions_total,
        packets_forwarded = stats.packets_forwarded,
        "relay stopped"
    );
    Ok(())
}

/// `rally-relay tls-key FILE`.
fn tls_key(file: &std::path::Path) -> anyhow::Result<()> {
    let seed = if file.exists() {
        eprintln!("{} exists; keeping the existing key", file.display());
        keyfile::read(file)?
    } else {
        let mut seed = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| anyhow::anyhow!("drawing the key from the OS: {e}"))?;
        keyfile::write(file, &seed)?;
        seed
    };
    println!("relay TLS key (pin it in the control plane's --relay NAME=HOST:PORT,tcp=HOST:PORT,key=KEY):");
    println!("{}", TlsKey(seed).identity().public());
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    })
}

fn init_logging() {
    let filter = EnvFilter::try_from_env("RALLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

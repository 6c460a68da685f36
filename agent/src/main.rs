//! `rally`: the agent daemon (`rally up`) and the commands that talk to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod commands;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use rally_agent::conn::Profile;
use rally_agent::daemon::{self, Config};
use rally_agent::events::EventType;
use rally_agent::state::{ControlTarget, DEFAULT_STATE_DIR};
use rally_proto::control::validate_name;
use rally_proto::Key32;

/// Rally: a virtual LAN for your party.
#[derive(Parser)]
#[command(name = "rally", version)]
struct Cli {
    /// State directory of the agent (keys, control socket).
    #[arg(long, global = true, env = "RALLY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run the agent in the foreground.
    Up(Box<UpArgs>),
    /// Stop the running agent.
    Down,
    /// Create, join, leave and list parties.
    #[command(subcommand)]
    Party(PartyCmd),
    /// This agent: name, virtual IP, control connection, parties.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The peers this agent can reach.
    Peers {
        #[arg(long)]
        json: bool,
    },
    /// Detect this machine's NAT: UDP, mapping and filtering behaviour, public endpoint,
    /// latency to each relay.
    Netcheck {
        #[arg(long)]
        json: bool,
    },
    /// Connection events: failovers, relay switches, state changes… (history, then new ones
    /// with --follow).
    Events {
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only these types, comma-separated (e.g. failover,relay_switch).
        #[arg(long = "type", value_parser = parse_types)]
        types: Option<::std::vec::Vec<EventType>>,
        /// Only events about this peer (name, virtual IP or id).
        #[arg(long)]
        peer: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Per-peer metrics: path, state, latency, bytes, failovers, every path's health.
    Metrics {
        #[arg(long)]
        json: bool,
    },
    /// Peer commands.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Path commands.
    #[command(subcommand)]
    Path(PathCmd),
    /// LAN game discovery: groups, ports, rates and last senders of what is forwarded.
    Discovery {
        #[arg(long)]
        json: bool,
    },
    /// Ping a peer over the overlay.
    Ping {
        /// Name, virtual IP or peer id.
        peer: String,
        /// Number of echo requests.
        #[arg(short = 'c', long = "count", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        count: u32,
        /// Seconds between requests (0.01 to 60).
        #[arg(short = 'i', long = "interval", default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Control plane address, HOST:PORT.
    #[arg(long, requires = "control_key")]
    control: Option<String>,
    /// The control plane's key, as printed by `rally-control init` (it may start with '-').
    #[arg(long, requires = "control", allow_hyphen_values = true)]
    control_key: Option<Key32>,
    /// This machine's name in the party (default: the host name).
    #[arg(long, value_parser = parse_name)]
    name: Option<String>,
    /// UDP port for tunnels (0: any free port).
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Name of the TUN device.
    #[arg(long, default_value = "rally0")]
    tun: String,
    /// Connection profile: how often paths are probed, when they fail, how reconnects back off.
    #[arg(long, default_value = "stable", value_parser = parse_profile)]
    profile: Profile,
    /// Serve Prometheus metrics on this HTTP address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    discovery: rally_agent::discovery::cli::DiscoveryArgs,
    /// HTTP CONNECT proxy for TCP dials, http://HOST:PORT (QUIC is still tried directly).
    #[arg(long, env = "HTTPS_PROXY", value_parser = parse_proxy)]
    proxy: Option<String>,
    /// A PEM bundle of CA certificates to trust, next to the system's, for relays that present
    /// an operator's certificate (relay entries with `tcp_name`).
    #[arg(long, value_name = "FILE", env = "RALLY_RELAY_CA")]
    relay_ca: Option<PathBuf>,
}

fn parse_proxy(s: &str) -> Result<String, String> {
    rally_agent::control::proxy::parse_proxy(s).map_err(|e| e.to_string())
}

fn parse_profile(s: &str) -> Result<Profile, String> {
    s.parse::<Profile>().map_err(|e| e.to_string())
}

/// A name for an agent or a party (1 to 64 letters, digits, '-', '_' or '.').
fn parse_name(s: &str) -> Result<String, String> {
    validate_name(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0.01 to 60")),
    }
}

#[derive(Subcommand)]
pub(crate) enum PeerCmd {
    /// Retry every path to a peer now (after `failed`, or to force a new punch).
    Reconnect { peer: String },
    /// Why a peer goes the way it goes: both sides' NAT findings, the relay reason, every
    /// path's metrics and what could be changed.
    Why { peer: String },
}

#[derive(Subcommand)]
pub(crate) enum PathCmd {
    /// Pin a peer's traffic to one path (`direct:IP:PORT`, `relay:NAME`, or `direct`) until
    /// that path fails.
    SetPrimary { peer: String, path: String },
}

fn parse_types(s: &str) -> Result<Vec<EventType>, String> {
    EventType::parse_list(s)
        .map(|set| set.into_iter().collect())
        .map_err(|e| e.to_string())
}

#[derive(Subcommand)]
pub(crate) enum PartyCmd {
    /// Create a party; prints its invite code (last line of stdout).
    Create {
        #[arg(value_parser = parse_name)]
        name: String,
        /// How many agents may join with the code (default: unlimited).
        #[arg(long)]
        max_uses: Option<u32>,
        /// How long the code is valid: e.g. 30s, 10m, 12h, 7d, or "never" (default: 7d).
        #[arg(long, value_parser = parse_expiry)]
        expires: Option<u64>,
    },
    /// Join a party with an invite code.
    Join { code: String },
    /// Leave a party (by name or id).
    Leave { party: String },
    /// The parties this agent belongs to.
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Exit status 1: a runtime error (DESIGN.md "CLI contract").
const EXIT_RUNTIME: u8 = 1;
/// Exit status 2: a usage error.
const EXIT_USAGE: u8 = 2;

/// The one way out: exit 0 on success, else one line on stderr and 1 (runtime) or 2 (usage;
/// clap's own usage errors exit 2 as well).
fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE));
        }
    };
    let result = match cli.cmd {
        Cmd::Up(args) => up(&cli.state_dir, *args),
        cmd => commands::run(&cli.state_dir, cmd),
    };
    let Err(e) = result else {
        return ExitCode::SUCCESS;
    };
    let code = if e.is::<UsageError>() {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME
    };
    eprintln!("error: {}", one_line(&format!("{e:#}")));
    ExitCode::from(code)
}

/// A usage error found after parsing (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// `text` on one line: line breaks become spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn up(state_dir: &Path, args: UpArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RALLY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let name = match args.name {
        Some(n) => n,
        None => default_name(),
    };
    if validate_name(&name).is_err() {
        return Err(UsageError(format!(
            "invalid name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.' (--name)"
        ))
        .into());
    }
    let control = match (args.control, args.control_key) {
        (Some(addr), Some(key)) => Some(ControlTarget { addr, key }),
        _ => None,
    };
    if let Some(path) = &args.relay_ca {
        let certs =
            rally_agent::dataplane::relay_tls::load_ca_bundle(path).context("--relay-ca")?;
        rally_agent::dataplane::relay_tls::set_operator_roots(certs);
    }
    let cfg = Config {
        state_dir: state_dir.to_path_buf(),
        control,
        name,
        listen_port: args.listen_port,
        tun_name: args.tun,
        profile: args.profile,
        metrics: args.metrics,
        discovery: args.discovery.config(),
        proxy: args.proxy,
    };
    // One thread: the daemon's tasks wait on the network and the CLI, never on the CPU (the
    // data plane has its own thread), and an idle runtime of one thread wakes once per timer
    // or socket event instead of also waking parked workers to steal it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(daemon::run(cfg))?;
    Ok(())
}

fn default_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "rally".into()
    } else {
        name
    }
}

/// `--expires`: seconds, with an optional s/m/h/d suffix; `never` is 0 (no expiry).
fn parse_expiry(s: &str) -> Result<u64, String> {
    if s == "never" {
        return Ok(0);
    }
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m, 12h, 7d or never"))?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    if n == 0 {
        return Err("--expires must be more than zero (or \"never\")".into());
    }
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_parses_units_and_never() {
        assert_eq!(parse_expiry("30"), Ok(30));
        assert_eq!(parse_expiry("10m"), Ok(600));
        assert_eq!(parse_expiry("7d"), Ok(604_800));
        assert_eq!(parse_expiry("never"), Ok(0));
        assert!(parse_expiry("0s").is_err());
        assert!(parse_expiry("5w").is_err());
        assert!(parse_expiry("abc").is_err());
    }
}

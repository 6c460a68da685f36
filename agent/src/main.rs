//! `rally`: the agent daemon (`rally up`) and the commands that talk to it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rally_agent::conn::Profile;
use rally_agent::daemon::{self, Config};
use rally_agent::dataplane::PeerStatus;
use rally_agent::events::EventType;
use rally_agent::ipc::{self, IpcReply, IpcRequest};
use rally_agent::state::{ControlTarget, DEFAULT_STATE_DIR};
use rally_proto::control::{validate_name, PartyInfo};
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
enum Cmd {
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
        /// Seconds between requests.
        #[arg(short = 'i', long = "interval", default_value_t = 1.0)]
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
    #[arg(long)]
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
}

fn parse_profile(s: &str) -> Result<Profile, String> {
    s.parse::<Profile>().map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum PeerCmd {
    /// Retry every path to a peer now (after `failed`, or to force a new punch).
    Reconnect { peer: String },
}

#[derive(Subcommand)]
enum PathCmd {
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
enum PartyCmd {
    /// Create a party; prints its invite code (last line of stdout).
    Create {
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

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Up(args) => up(&cli.state_dir, *args),
        cmd => client(&cli.state_dir, cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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
        eprintln!("error: invalid --name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'");
        std::process::exit(2);
    }
    let control = match (args.control, args.control_key) {
        (Some(addr), Some(key)) => Some(ControlTarget { addr, key }),
        _ => None,
    };
    let cfg = Config {
        state_dir: state_dir.to_path_buf(),
        control,
        name,
        listen_port: args.listen_port,
        tun_name: args.tun,
        profile: args.profile,
        metrics: args.metrics,
        discovery: args.discovery.config(),
    };
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
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

fn client(state_dir: &Path, cmd: Cmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run_client(state_dir, cmd))
}

async fn call(state_dir: &Path, req: IpcRequest) -> Result<IpcReply> {
    let socket = state_dir.join("rally.sock");
    ipc::call(&socket, &req).await?.map_err(|e| anyhow!(e))
}

async fn run_client(state_dir: &Path, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Up(_) => unreachable!("handled in main"),
        Cmd::Down => {
            call(state_dir, IpcRequest::Down).await?;
            println!("rally stopped");
        }
        Cmd::Party(PartyCmd::Create {
            name,
            max_uses,
            expires,
        }) => {
            validate_name(&name).map_err(|e| anyhow!("invalid party name {name:?}: {e}"))?;
            let reply = call(
                state_dir,
                IpcRequest::PartyCreate {
                    name,
                    max_uses,
                    expires_in_secs: expires,
                },
            )
            .await?;
            let IpcReply::Party {
                party,
                invite: Some(invite),
            } = reply
            else {
                bail!("unexpected reply from the daemon");
            };
            eprintln!("party {} created; share this invite code:", party.name);
            println!("{invite}");
        }
        Cmd::Party(PartyCmd::Join { code }) => {
            let IpcReply::Party { party, .. } =
                call(state_dir, IpcRequest::PartyJoin { code }).await?
            else {
                bail!("unexpected reply from the daemon");
            };
            println!("joined party {} ({} members)", party.name, party.members);
        }
        Cmd::Party(PartyCmd::Leave { party }) => {
            let IpcReply::Party { party, .. } =
                call(state_dir, IpcRequest::PartyLeave { party }).await?
            else {
                bail!("unexpected reply from the daemon");
            };
            println!("left party {}", party.name);
        }
        Cmd::Party(PartyCmd::List { json }) => {
            let IpcReply::Parties { parties } = call(state_dir, IpcRequest::PartyList).await?
            else {
                bail!("unexpected reply from the daemon");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&parties)?);
            } else {
                print_parties(&parties);
            }
        }
        Cmd::Status { json } => {
            let IpcReply::Status(s) = call(state_dir, IpcRequest::Status).await? else {
                bail!("unexpected reply from the daemon");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("name:        {}", s.name);
                println!("peer id:     {}", s.peer_id);
                println!(
                    "virtual IP:  {}",
                    s.virtual_ip
                        .map_or("(not assigned yet)".into(), |ip| ip.to_string())
                );
                println!("UDP port:    {}", s.listen_port);
                let control = match (&s.control.addr, s.control.connected) {
                    (None, _) => "none (join a party with an invite code)".to_string(),
                    (Some(a), true) => format!("{a} (connected)"),
                    (Some(a), false) => format!(
                        "{a} (disconnected: {})",
                        s.control.error.as_deref().unwrap_or("connecting")
                    ),
                };
                println!("control:     {control}");
                print_parties(&s.parties);
            }
        }
        Cmd::Peers { json } => {
            let peers = peers(state_dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                print_peers(&peers);
            }
        }
        Cmd::Events {
            follow,
            types,
            peer,
            json,
        } => {
            let socket = state_dir.join("rally.sock");
            let req = IpcRequest::Events {
                follow,
                types,
                peer,
            };
            let mut failure = None;
            ipc::call_stream(&socket, &req, |reply| match reply {
                Ok(IpcReply::Events { events, missed }) => {
                    if missed > 0 {
                        eprintln!("({missed} events missed: reading too slowly)");
                    }
                    for e in events {
                        if json {
                            println!("{}", e.to_json_line());
                        } else {
                            println!(
                                "{} {:<14} {:<12} {:<24} {}",
                                e.time,
                                e.kind.as_str(),
                                e.peer.as_deref().unwrap_or("-"),
                                e.path.as_deref().unwrap_or("-"),
                                e.message
                            );
                        }
                    }
                    true
                }
                Ok(_) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            })
            .await?;
            if let Some(e) = failure {
                bail!(e);
            }
        }
        Cmd::Metrics { json } => {
            let peers = peers(state_dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                for p in &peers {
                    println!(
                        "{} ({}) {} via {}, {} failovers, {} relay switches, {} queued ({} dropped)",
                        p.name,
                        p.virtual_ip,
                        p.state,
                        path_label(p),
                        p.failovers,
                        p.relay_switches,
                        p.queued,
                        p.queue_dropped
                    );
                    for m in &p.paths {
                        println!(
                            "  {:<28} {:<8} {:>9} priority {}{}",
                            m.path.to_string(),
                            format!("{:?}", m.health).to_lowercase(),
                            m.latency_ms.map_or("-".into(), |l| format!("{l:.1} ms")),
                            m.priority,
                            if m.is_primary { "  (primary)" } else { "" }
                        );
                    }
                }
                if let Ok(IpcReply::Discovery(d)) = call(state_dir, IpcRequest::Discovery).await {
                    rally_agent::discovery::cli::print_counters(&d);
                }
            }
        }
        Cmd::Peer(PeerCmd::Reconnect { peer }) => {
            call(state_dir, IpcRequest::PeerReconnect { peer: peer.clone() }).await?;
            println!("reconnecting to {peer}");
        }
        Cmd::Path(PathCmd::SetPrimary { peer, path }) => {
            call(
                state_dir,
                IpcRequest::SetPrimary {
                    peer: peer.clone(),
                    path: path.clone(),
                },
            )
            .await?;
            println!("{peer}: primary path pinned to {path}");
        }
        Cmd::Netcheck { json } => {
            let IpcReply::Netcheck(nat) = call(state_dir, IpcRequest::Netcheck).await? else {
                bail!("unexpected reply from the daemon");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&nat)?);
            } else {
                let behavior = |b| {
                    serde_json::to_value(b)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default()
                };
                println!(
                    "UDP:             {}",
                    if nat.udp { "yes" } else { "blocked" }
                );
                println!("mapping:         {}", behavior(nat.mapping));
                println!("filtering:       {}", behavior(nat.filtering));
                println!(
                    "port preserving: {}",
                    if nat.port_preserving { "yes" } else { "no" }
                );
                println!(
                    "public endpoint: {}",
                    nat.public_endpoint.map_or("-".into(), |e| e.to_string())
                );
                for r in &nat.relays {
                    println!(
                        "relay {:<10} {:<22} {}",
                        r.name,
                        r.addr,
                        r.latency_ms
                            .map_or("no answer".into(), |l| format!("{l:.1} ms"))
                    );
                }
            }
        }
        Cmd::Discovery { json } => {
            let IpcReply::Discovery(d) = call(state_dir, IpcRequest::Discovery).await? else {
                bail!("unexpected reply from the daemon");
            };
            rally_agent::discovery::cli::print(&d, json)?;
        }
        Cmd::Ping {
            peer,
            count,
            interval,
        } => ping(state_dir, &peer, count, interval).await?,
    }
    Ok(())
}

async fn peers(state_dir: &Path) -> Result<Vec<PeerStatus>> {
    let IpcReply::Peers { peers } = call(state_dir, IpcRequest::Peers).await? else {
        bail!("unexpected reply from the daemon");
    };
    Ok(peers)
}

fn print_parties(parties: &[PartyInfo]) {
    if parties.is_empty() {
        println!("parties:     none");
        return;
    }
    println!("parties:");
    for p in parties {
        println!("  {:<20} {:>3} members  id {}", p.name, p.members, p.id);
    }
}

fn print_peers(peers: &[PeerStatus]) {
    if peers.is_empty() {
        println!("no peers yet: create a party (`rally party create NAME`) or join one");
        return;
    }
    println!(
        "{:<16} {:<15} {:<12} {:<8} {:<22} {:>9} {:>10} {:>10}",
        "NAME", "VIRTUAL IP", "STATE", "PATH", "ENDPOINT", "LATENCY", "SENT", "RECEIVED"
    );
    for p in peers {
        println!(
            "{:<16} {:<15} {:<12} {:<8} {:<22} {:>9} {:>10} {:>10}",
            p.name,
            p.virtual_ip,
            p.state,
            path_label(p),
            p.endpoint.map_or("-".into(), |e| e.to_string()),
            p.latency_ms.map_or("-".into(), |l| format!("{l:.0} ms")),
            bytes(p.bytes_sent),
            bytes(p.bytes_received),
        );
    }
}

fn path_label(p: &PeerStatus) -> String {
    match (&p.relay, p.strategy.as_str()) {
        (Some(r), "relay") => format!("relay:{r}"),
        _ => p.strategy.clone(),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

async fn ping(state_dir: &Path, query: &str, count: u32, interval: f64) -> Result<()> {
    if !(0.01..=60.0).contains(&interval) {
        eprintln!("error: --interval must be between 0.01 and 60 seconds");
        std::process::exit(2);
    }
    let list = peers(state_dir).await?;
    let peer = ipc::resolve_peer(&list, query)
        .map_err(|e| anyhow!(e))?
        .clone();
    let client = surge_ping::Client::new(&surge_ping::Config::default())
        .context("opening an ICMP socket (needs root or CAP_NET_RAW)")?;
    let mut pinger = client
        .pinger(
            IpAddr::V4(peer.virtual_ip),
            surge_ping::PingIdentifier(std::process::id() as u16),
        )
        .await;
    pinger.timeout(Duration::from_secs(1));
    let payload = [0u8; 56];
    let mut rtts = Vec::new();
    println!("PING {} ({})", peer.name, peer.virtual_ip);
    for seq in 0..count {
        if seq > 0 {
            tokio::time::sleep(Duration::from_secs_f64(interval)).await;
        }
        match pinger
            .ping(surge_ping::PingSequence(seq as u16), &payload)
            .await
        {
            Ok((_, rtt)) => {
                let path = peers(state_dir)
                    .await
                    .ok()
                    .and_then(|ps| ps.into_iter().find(|p| p.peer_id == peer.peer_id))
                    .map(|p| describe_path(&p))
                    .unwrap_or_else(|| "unknown path".into());
                let ms = rtt.as_secs_f64() * 1000.0;
                println!(
                    "reply from {} ({}) via {path}: seq={seq} time={ms:.2} ms",
                    peer.name, peer.virtual_ip
                );
                rtts.push(ms);
            }
            Err(e) => println!(
                "no reply from {} ({}): seq={seq} {e}",
                peer.name, peer.virtual_ip
            ),
        }
    }
    let lost = count as usize - rtts.len();
    print!(
        "{count} sent, {} received, {:.0}% loss",
        rtts.len(),
        lost as f64 * 100.0 / count as f64
    );
    if rtts.is_empty() {
        println!();
        bail!("no reply from {} ({})", peer.name, peer.virtual_ip);
    }
    let min = rtts.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().cloned().fold(0.0, f64::max);
    let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
    println!("; rtt min/avg/max = {min:.2}/{avg:.2}/{max:.2} ms");
    Ok(())
}

fn describe_path(p: &PeerStatus) -> String {
    let label = path_label(p);
    match p.endpoint {
        Some(SocketAddr::V4(e)) => format!("{label} {e}"),
        Some(e) => format!("{label} {e}"),
        None => label,
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

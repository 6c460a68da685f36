//! `rally-lab`: runs lab scenarios by hand. `rally-lab demo` builds a four-host lab, forms a
//! party of three agents and pings every pair over the overlay. The STUN subcommands are the
//! tools the lab runs inside its namespaces to calibrate NAT routers.

use std::net::SocketAddr;
use std::process::{ExitCode, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rally_lab::bench::{self, Which};
use rally_lab::host::check_success;
use rally_lab::ping::{parse_path, parse_rtt_ms, parse_summary};
use rally_lab::scenario::{wait_view, World};
use rally_lab::stun::{self, ProbeOptions};
use rally_lab::{
    bins, install_interrupt_handler, interrupted, punchable, Agent, Lab, NatKind, PingPath,
};

/// How long the demo waits for everyone to see everyone.
const PEERS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the party owner may take to register with the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Pings per pair.
const PINGS: u32 = 3;
/// How long a pair may take to settle on the route its two NATs allow: two birthday attempts
/// (one misses by chance 1.7 % of the time, and the next follows 6 s after it ends).
const ROUTE_TIMEOUT: Duration = Duration::from_secs(40);
/// The demo's agents, each behind a NAT of its own. A home router and a carrier-grade NAT
/// both map endpoint-independently, so alice and carol punch through to each other; bob's
/// symmetric NAT gives every destination a fresh port that neither of their NATs lets in, so
/// bob reaches both by birthday punching (his 256 fresh ports against their probed ones).
const CAST: [(&str, NatKind); 3] = [
    ("alice", NatKind::HomeRouter),
    ("bob", NatKind::Symmetric),
    ("carol", NatKind::Cgnat),
];

#[derive(Parser)]
#[command(name = "rally-lab", about = "Rally's multi-host lab (needs root)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Control plane and two relays on the internet, alice, bob and carol behind three kinds
    /// of NAT: one party, each pair on the route its NATs allow, then every pair pings.
    Demo,
    /// Answers STUN binding requests on ADDR:PORT until killed (run inside a lab namespace).
    StunServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// An HTTP CONNECT proxy on ADDR:PORT until killed (run inside a lab namespace).
    ConnectProxy {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Sends binding requests to every server from one local socket and prints JSON lines: the
    /// mapped addresses, then any datagram received while listening, then `done`.
    StunProbe {
        /// Comma-separated ADDR:PORT list.
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<SocketAddr>,
        #[arg(long)]
        local_port: u16,
        /// How long to wait for the answers.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// After the binding phase, send one "hello" datagram to each of these.
        #[arg(long, value_delimiter = ',')]
        hello: Vec<SocketAddr>,
        /// Then report what arrives for this long.
        #[arg(long, default_value_t = 0)]
        listen_ms: u64,
    },
    /// Sends a UDP datagram (COUNT times, 50 ms apart) from a given local port.
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 0)]
        from_port: u16,
        #[arg(long, default_value = "ping")]
        payload: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Benchmarks (release builds): Rally against raw veth, boringtun-cli and wireguard-go in
    /// the same run; prints `name: median [min–max] unit (ratios)` and writes
    /// bench-results.{json,md}. Installs iperf3, wireguard-go, wireguard-tools, boringtun-cli
    /// (and linux-perf for `profile`) when missing.
    Bench {
        #[arg(value_enum, default_value = "all")]
        which: Which,
        /// Runs per figure.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Where to write the results (default: <binaries' dir>/bench).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Attempts of `bench punch`.
        #[arg(long, default_value_t = 20)]
        attempts: usize,
        /// Keep the data-path lab (throughput, latency, profile) up before measuring, until
        /// Enter: for `perf`, `bpftrace` or pings by hand; prints each path's namespace,
        /// target and processes.
        #[arg(long)]
        hold: bool,
        /// Start the latency bench's second direct pair with NAME=VALUE in its environment
        /// instead of RALLY_DATAPLANE_FIFO=1: an A/B of an agent setting (or, with
        /// RALLY_BIN_DIR, another build) in the same runs; labelled "rally ab (A/B)".
        #[arg(long, value_name = "NAME=VALUE", value_parser = parse_env_pair)]
        ab_env: Option<(String, String)>,
    },
    /// Relay load generator (run by `bench relay` inside a lab namespace).
    #[command(hide = true)]
    BenchRelayLoad(bench::relay::LoadArgs),
    /// Plain UDP forwarder, the relay benchmark's baseline (inside a lab namespace).
    #[command(hide = true)]
    BenchUdpForward {
        #[arg(long)]
        listen: std::net::SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Control-plane crowd of synthetic agents (run by `bench control` inside a lab namespace).
    #[command(hide = true)]
    BenchControlLoad(bench::control::LoadArgs),
    /// UDP echo server of `bench latency`'s game-like stream (inside a lab namespace).
    #[command(hide = true)]
    GameEcho {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Client of `bench latency`'s game-like stream: prints one RTT (ms) per echo.
    #[command(hide = true)]
    GamePing {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 60)]
        rate: u32,
        #[arg(long, default_value_t = 240)]
        count: u32,
    },
    /// Attack clients (run by `bench flood` and the attack tests inside lab namespaces).
    #[command(hide = true, subcommand)]
    Attack(rally_lab::attack::AttackCmd),
}

/// `NAME=VALUE` with a non-empty name of letters, digits and `_`.
fn parse_env_pair(s: &str) -> std::result::Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{name:?}: not an environment variable name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    exit_code(run(cli.command))
}

/// Runs one subcommand; `Ok(false)` means it ran but what it checked failed.
fn run(command: Cmd) -> Result<bool> {
    match command {
        Cmd::Demo => {
            install_interrupt_handler();
            demo()
        }
        Cmd::Bench {
            which,
            runs,
            seconds,
            out,
            attempts,
            hold,
            ab_env,
        } => {
            install_interrupt_handler();
            if let Some(pair) = ab_env {
                let _ = bench::tunnels::AB_ENV.set(pair);
            }
            bench_dir(out).and_then(|out_dir| {
                let opts = bench::Options {
                    runs: runs.max(1),
                    seconds: seconds.max(2),
                    out_dir,
                    attempts,
                    hold,
                };
                bench::run(which, &opts).map(|()| true)
            })
        }
        Cmd::BenchRelayLoad(args) => bench::relay::load(&args).map(|()| true),
        Cmd::BenchUdpForward { listen, batch } => {
            bench::relay::forward(listen, batch).map(|()| true)
        }
        Cmd::BenchControlLoad(args) => bench::control::load(&args).map(|()| true),
        Cmd::Attack(cmd) => rally_lab::attack::run(&cmd).map(|()| true),
        Cmd::GameEcho { listen } => bench::game::echo(listen).map(|()| true),
        Cmd::GamePing { to, rate, count } => bench::game::client(to, rate, count).map(|()| true),
        Cmd::StunServer { listen } => stun::serve(listen, |local| {
            println!("{}", stun::listening_line(local));
        })
        .with_context(|| format!("serving STUN on {listen}"))
        .map(|()| true),
        Cmd::ConnectProxy { listen } => rally_lab::proxy::serve(listen)
            .with_context(|| format!("serving CONNECT on {listen}"))
            .map(|()| true),
        Cmd::StunProbe {
            servers,
            local_port,
            timeout_ms,
            hello,
            listen_ms,
        } => stun_probe(ProbeOptions {
            servers,
            local_port,
            timeout: Duration::from_millis(timeout_ms),
            hello,
            listen: Duration::from_millis(listen_ms),
        }),
        Cmd::UdpSend {
            to,
            from_port,
            payload,
            count,
        } => stun::send(from_port, to, &payload, count, Duration::from_millis(50))
            .with_context(|| format!("sending to {to}"))
            .map(|()| true),
    }
}

/// `stun-probe`: probes and prints each event as a JSON line.
fn stun_probe(opts: ProbeOptions) -> Result<bool> {
    let local_port = opts.local_port;
    stun::probe(&opts, |event| {
        println!(
            "{}",
            serde_json::to_string(event).expect("events serialise")
        );
    })
    .with_context(|| format!("probing from port {local_port}"))
    .map(|()| true)
}

/// The process exit code for a subcommand's outcome (130 after Ctrl-C), printing any error.
fn exit_code(result: Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) if interrupted() => {
            eprintln!("rally-lab: interrupted ({e:#}); the lab was torn down");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("rally-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The benchmark output directory: `out`, or `bench/` next to the binaries.
fn bench_dir(out: Option<std::path::PathBuf>) -> Result<std::path::PathBuf> {
    match out {
        Some(o) => Ok(o),
        None => Ok(bins::bin_dir()?.join("bench")),
    }
}

/// A progress line.
fn say(msg: &str) {
    println!("==> {msg}");
}

/// Runs the demo; `Ok(true)` if every pair could ping. The lab is torn down on every return.
fn demo() -> Result<bool> {
    say("checking binaries…");
    bins::rally()?;
    bins::rally_control()?;
    bins::bin_path("rally-relay")?;
    say("building lab…");
    let lab = Lab::new()?;
    println!("    namespaces {}*", lab.prefix());
    let result = run_demo(&lab);
    if matches!(result, Ok(false)) {
        lab.dump_logs();
    }
    say("tearing down the lab…");
    drop(lab);
    result
}

/// The demo's steps, on a fresh lab.
fn run_demo(lab: &Lab) -> Result<bool> {
    say("starting the control plane and two relays on the internet (20 ms uplinks)…");
    let world = World::start(lab)?;
    println!(
        "    control plane {}, control key {}",
        world.cp.addr(),
        world.cp.key()
    );
    for r in &world.relays {
        println!("    relay {} at {}", r.name(), r.addr());
    }
    let hosts = place_hosts(lab)?;

    say("starting alice (with --control)…");
    let alice = Agent::start(&hosts[0], "alice", world.cp.control())?;
    alice.wait_control_connected(CONNECT_TIMEOUT)?;
    say("starting bob and carol (no --control: they learn it from the invite code)…");
    let bob = Agent::start(&hosts[1], "bob", None)?;
    let carol = Agent::start(&hosts[2], "carol", None)?;

    say("alice: rally party create lan");
    let code = alice.party_create("lan", &[])?;
    println!("    invite code: {code}");
    for joiner in [&bob, &carol] {
        say(&format!("{}: rally party join <code>", joiner.name()));
        let out = joiner.party_join(&code)?;
        check_success(&out, "rally party join")
            .with_context(|| format!("{} could not join", joiner.name()))?;
    }

    let agents = [&alice, &bob, &carol];
    say("waiting until everyone lists the other two…");
    for a in agents {
        let others: Vec<&str> = agents
            .iter()
            .map(|b| b.name())
            .filter(|n| *n != a.name())
            .collect();
        a.wait_for_peers(&others, PEERS_TIMEOUT)?;
    }
    let routes_ok = wait_routes(&agents);
    for a in agents {
        say(&format!("{}: rally peers", a.name()));
        print_indented(&a.rally_ok(&["peers"])?);
    }
    let pings_ok = ping_all_pairs(&agents)?;
    if !routes_ok {
        say("SOME PAIRS DID NOT TAKE THE ROUTE THEIR NATS ALLOW");
    }
    Ok(pings_ok && routes_ok)
}

/// Puts each of the cast behind a NAT router of its own kind; the hosts in `CAST` order.
fn place_hosts(lab: &Lab) -> Result<Vec<rally_lab::Host>> {
    say("putting alice, bob and carol behind NATs of their own…");
    let mut hosts = Vec::new();
    for (name, kind) in CAST {
        let router = lab.add_router(&format!("{name}-nat"), kind)?;
        let host = lab.add_host_behind(&router, name)?;
        println!(
            "    host {name:<6} {:<14} NAT {:<12} public address {}",
            host.ip().to_string(),
            kind.label(),
            router.wan_ip()
        );
        hosts.push(host);
    }
    Ok(hosts)
}

/// Waits for each pair to settle on the route its NATs allow; `true` if every pair did.
fn wait_routes(agents: &[&Agent]) -> bool {
    say("waiting for each pair's route (direct where the NATs let a punch through, else a relay)…");
    let mut routes_ok = true;
    for i in 0..agents.len() {
        for j in i + 1..agents.len() {
            let (a, b) = (agents[i], agents[j]);
            let direct = punchable(Some(CAST[i].1), Some(CAST[j].1));
            let want = if direct { "direct" } else { "relay" };
            let settled = wait_view(a, b.name(), &format!("go {want}"), ROUTE_TIMEOUT, |v| {
                if direct {
                    v.is_direct()
                } else {
                    v.is_relayed()
                }
            });
            let pair = format!(
                "{} ({}) ↔ {} ({})",
                a.name(),
                CAST[i].1,
                b.name(),
                CAST[j].1
            );
            match settled {
                Ok((took, v)) => println!(
                    "    {pair}: {} after {:.1} s, as expected",
                    v.route(),
                    took.as_secs_f64()
                ),
                Err(e) => {
                    routes_ok = false;
                    println!("    {pair}: NOT {want} as expected: {e}");
                    // What each side found and tried, for whoever reads a failed run (the
                    // process logs below are cut to their last lines).
                    match a.rally_ok(&["peer", "why", b.name()]) {
                        Ok(why) => why.lines().for_each(|l| println!("        {l}")),
                        Err(e) => println!("        rally peer why {}: {e:#}", b.name()),
                    }
                }
            }
        }
    }
    routes_ok
}

/// Kernel ping and `rally ping` for every ordered pair; prints results and a summary.
fn ping_all_pairs(agents: &[&Agent]) -> Result<bool> {
    let vips = agents
        .iter()
        .map(|a| a.virtual_ip())
        .collect::<Result<Vec<_>>>()?;
    let (mut ok, mut total) = (0, 0);
    for (i, from) in agents.iter().enumerate() {
        for (j, to) in agents.iter().enumerate().filter(|(j, _)| *j != i) {
            total += 1;
            say(&format!("{} → {} ({})", from.name(), to.name(), vips[j]));
            let kernel = from.kernel_ping(&vips[j].to_string(), PINGS)?;
            println!("    kernel ping: {}", describe_kernel_ping(&kernel));
            let rally = from.rally_ping(to.name(), PINGS)?;
            println!("    rally ping:  {}", describe_rally_ping(&rally));
            if kernel.status.success() && rally.status.success() {
                ok += 1;
            }
        }
    }
    let verdict = if ok == total {
        "all pairs OK"
    } else {
        "SOME PAIRS FAILED"
    };
    say(&format!("summary: {ok}/{total} pairs OK — {verdict}"));
    Ok(ok == total)
}

/// `3/3 received, rtt 0.85 ms` or the failure.
fn describe_kernel_ping(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    let counts = parse_summary(&text)
        .map(|s| format!("{}/{} received", s.received, s.transmitted))
        .unwrap_or_else(|| "no summary".to_owned());
    let rtt = parse_rtt_ms(&text)
        .map(|ms| format!(", rtt {ms} ms"))
        .unwrap_or_default();
    let verdict = if out.status.success() { "ok" } else { "FAILED" };
    format!("{verdict}: {counts}{rtt}")
}

/// `direct, rtt 1.2 ms` or the failure with stderr.
fn describe_rally_ping(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return format!("FAILED ({}): {} {}", out.status, text.trim(), err.trim());
    }
    let path = match parse_path(&text) {
        Some(PingPath::Direct) => "direct".to_owned(),
        Some(PingPath::Relay(name)) => format!("relay:{name}"),
        None => "path not reported".to_owned(),
    };
    let rtt = parse_rtt_ms(&text)
        .map(|ms| format!(", rtt {ms} ms"))
        .unwrap_or_default();
    format!("ok: {path}{rtt}")
}

/// Prints `text` indented under a progress line.
fn print_indented(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

#[cfg(test)]
mod ab_env_tests {
    use super::parse_env_pair;

    #[test]
    fn an_env_pair_needs_a_name_and_an_equals_sign() {
        assert_eq!(
            parse_env_pair("RALLY_PEER_SOCKETS=0"),
            Ok(("RALLY_PEER_SOCKETS".to_owned(), "0".to_owned()))
        );
        assert_eq!(
            parse_env_pair("RALLY_BIN_DIR=/a=b"),
            Ok(("RALLY_BIN_DIR".to_owned(), "/a=b".to_owned()))
        );
        assert_eq!(parse_env_pair("X="), Ok(("X".to_owned(), String::new())));
        for bad in ["RALLY_PEER_SOCKETS", "=1", "A B=1", ""] {
            assert!(parse_env_pair(bad).is_err(), "{bad:?} accepted");
        }
    }
}

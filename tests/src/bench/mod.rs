//! `rally-lab bench`: benchmarks of the real binaries in lab namespaces, each figure the median
//! of several runs with its range and its ratio against baselines measured in the same run
//! (LAB.md, "Measuring"). docs/benchmarks.md has the figures and how to read them.
//!
//! - `throughput`, `latency`: one lab with Rally (direct, and through a relay), boringtun-cli,
//!   wireguard-go and the raw path between the same two namespaces; iperf3 and ping.
//! - `setup`: party join → first ping reply and → direct path, across two home routers.
//! - `relay`: forwarding capacity of `rally-relay` under a synthetic protocol load.
//! - `control`: N synthetic agents registering and joining one party; an agent's memory per peer.
//! - `idle`: wake-ups and CPU per second of an idle agent with 5 and 50 peers, beside
//!   boringtun-cli and wireguard-go with as many peers.
//! - `flood`: the longest overlay ping gap under handshake, garbage and forged-probe floods,
//!   against no flood.
//! - `tcp-relay`: a 60 pps stream's p99 one-way delay with 1 % WAN loss and one-stream TCP
//!   throughput over `relay-tcp:r1` (UDP blocked) next to `relay:r1`.
//! - `tcp-join`: party join → first ping reply behind a TCP-443-only router, against an open
//!   network in the same run.
//! - `profile` (not part of `all`): `perf` on the data paths under load.
//!
//! Every figure is printed as `name: median [min–max] unit (ratio vs baseline, …)` and all of
//! them are written to `bench-results.json` and `bench-results.md` in the output directory.

pub mod control;
pub mod datapath;
pub mod flood;
pub mod game;
pub mod idle;
pub mod mmsg;
pub mod profile;
pub mod punch;
pub mod relay;
pub mod setup;
pub mod stats;
pub mod tcp_join;
pub mod tcp_relay;
pub mod tools;
pub mod tunnels;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use self::stats::Figure;
use self::tools::Tool;
use crate::{bins, Lab};

/// Which benchmarks to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Throughput,
    Latency,
    Setup,
    Relay,
    Control,
    /// Idle agents with 5 and 50 peers beside idle boringtun-cli and wireguard-go.
    Idle,
    /// Longest ping gap under floods at the agent's port, against no flood.
    Flood,
    /// The relay path over TLS/TCP next to the same relay over UDP.
    TcpRelay,
    /// Party join → first ping reply behind a TCP-443-only router, against an open network.
    TcpJoin,
    /// `perf` on the data paths under load (not part of `all`).
    Profile,
    /// Birthday punching, home router ↔ symmetric NAT, `--attempts` times (not part of `all`).
    Punch,
    All,
}

/// How much to measure and where to write it.
#[derive(Clone, Debug)]
pub struct Options {
    /// Runs per figure.
    pub runs: usize,
    /// Seconds per iperf3 run.
    pub seconds: u64,
    /// Where results go.
    pub out_dir: PathBuf,
    /// Attempts of `bench punch`.
    pub attempts: usize,
    /// Keep the data-path lab up, before measuring, until a line (or the end) on stdin.
    pub hold: bool,
}

/// Everything a `bench` invocation measured, as written to `bench-results.json`.
#[derive(Serialize)]
struct Results<'a> {
    machine: Machine,
    runs: usize,
    seconds: u64,
    installed: &'a [String],
    figures: &'a [Figure],
}

/// The machine the figures come from.
#[derive(Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            kernel,
        }
    }
}

fn say(msg: &str) {
    println!("==> {msg}");
}

/// Runs the chosen benchmarks; prints every figure and writes the results files.
pub fn run(which: Which, opts: &Options) -> Result<()> {
    if which == Which::Punch {
        // Debug builds are fine: it measures the agents' punching, not their speed.
        return punch::bench(opts.attempts);
    }
    let machine = Machine::describe();
    say(&format!(
        "machine: {} × {}, kernel {} (shared: other work runs too; read the ratios)",
        machine.nproc, machine.cpu, machine.kernel
    ));
    check_binaries()?;
    let installed = install_tools(which)?;
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;

    let mut sections = Sections::default();
    let all = which == Which::All;
    if all || matches!(which, Which::Throughput | Which::Latency | Which::Profile) {
        run_datapath(which, opts, &mut sections)?;
    }
    run_lab_benches(which, opts, &mut sections);

    say("all figures: name: median [min–max] unit (ratios vs baselines of the same run)");
    for f in &sections.figures {
        println!("{}", f.line());
    }
    let results = Results {
        machine,
        runs: opts.runs,
        seconds: opts.seconds,
        installed: &installed,
        figures: &sections.figures,
    };
    write_results(which, opts, &results)
}

/// Fails unless the binaries are built; warns when they are not release builds.
fn check_binaries() -> Result<()> {
    bins::rally()?;
    bins::rally_control()?;
    bins::bin_path("rally-relay")?;
    bins::rally_lab()?;
    if let Ok(dir) = bins::bin_dir() {
        if !dir.ends_with("release") {
            println!(
                "    warning: binaries from {} — measure release builds \
                 (cargo build --release --workspace --bins; run target/release/rally-lab)",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Installs the reference programs `which` needs; returns the ones it had to install.
fn install_tools(which: Which) -> Result<Vec<String>> {
    let all = which == Which::All;
    let datapath = all || matches!(which, Which::Throughput | Which::Latency | Which::Profile);
    let mut tools_needed = vec![Tool::Iperf3, Tool::Ping];
    if datapath || all || which == Which::Idle {
        tools_needed.extend([Tool::Wg, Tool::WireguardGo, Tool::BoringtunCli]);
    }
    if which == Which::Profile {
        tools_needed.push(Tool::Perf);
    }
    let installed = tools::ensure(&tools_needed)?;
    if installed.is_empty() {
        say("reference programs already installed (iperf3, ping, wg, wireguard-go, boringtun-cli)");
    } else {
        say(&format!("installed: {}", installed.join(", ")));
    }
    Ok(installed)
}

/// The figures of the sections run so far.
#[derive(Default)]
struct Sections {
    figures: Vec<Figure>,
}

impl Sections {
    /// Prints a section's figures and keeps them, or reports that it failed (the other
    /// sections still run).
    fn add(&mut self, name: &str, r: Result<Vec<Figure>>) {
        match r {
            Ok(fs) => {
                say(&format!("{name}: {} figures", fs.len()));
                for f in &fs {
                    println!("    {}", f.line());
                }
                self.figures.extend(fs);
            }
            Err(e) => eprintln!("rally-lab bench: {name} FAILED: {e:#}"),
        }
    }
}

/// Keeps the data-path lab up for measurements by hand (`strace`, `perf`, `bpftrace`, pings
/// from a namespace), saying where each path starts and which processes carry it, until a
/// line or the end of input arrives on stdin.
fn hold(dp: &tunnels::Datapath) {
    for p in &dp.paths {
        println!(
            "    hold: {:<15} ping from namespace {} to {}; data-plane processes {:?}",
            p.subject.label(),
            p.client.ns(),
            p.target,
            p.pids
        );
    }
    say("holding the lab: press Enter (or close stdin) to measure and tear it down");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// The data-path sections (throughput, latency, profile) on one shared lab.
fn run_datapath(which: Which, opts: &Options, sections: &mut Sections) -> Result<()> {
    let all = which == Which::All;
    say("building the data-path lab (a, b, control, relay; ra, rb cut from each other)");
    let lab = Lab::new()?;
    let built = tunnels::build(
        &lab,
        tunnels::Want {
            relay: which != Which::Profile,
            references: true,
            fifo: matches!(which, Which::Latency | Which::All),
        },
    );
    let dp = match built {
        Err(e) => {
            lab.dump_logs();
            sections.add("data path", Err(e));
            return Ok(());
        }
        Ok(dp) => dp,
    };
    for p in &dp.paths {
        println!(
            "    {:<15} {} → {} ({})",
            p.subject.label(),
            p.client.name(),
            p.server.name(),
            p.target
        );
    }
    if opts.hold {
        hold(&dp);
    }
    if all || which == Which::Throughput {
        say(&format!(
            "throughput: iperf3, {} s per run, {} runs, subjects interleaved",
            opts.seconds, opts.runs
        ));
        sections.add("throughput", datapath::throughput(&dp, opts));
    }
    if all || which == Which::Latency {
        say("latency: 300 pings 10 ms apart idle, 2 ms apart idle, and 10 ms apart under one- and four-stream loads (with a 60/s game-like UDP stream)");
        sections.add("latency", datapath::latency(&dp, opts));
    }
    if which == Which::Profile {
        if !profile::perf_works() {
            eprintln!(
                "rally-lab bench: perf cannot count here (perf stat -e task-clock true fails)"
            );
        }
        sections.add("profile", profile::run(&dp, &opts.out_dir));
    }
    Ok(())
}

/// The sections that build labs of their own (setup, relay, flood, tcp-relay, control, idle).
fn run_lab_benches(which: Which, opts: &Options, sections: &mut Sections) {
    let all = which == Which::All;
    if all || which == Which::Setup {
        say("setup: party join → first reply / direct path, two home routers, 20 ms uplinks");
        sections.add("setup", setup::run(opts));
    }
    if all || which == Which::Relay {
        say("relay: synthetic relay-protocol load, 1/10/100 pairs");
        sections.add("relay", relay::run(opts));
    }
    if all || which == Which::Flood {
        say("flood: longest gap of pings 10 ms apart while 100k datagrams/s hit the agent");
        sections.add("flood", flood::run(opts));
    }
    if all || which == Which::TcpRelay {
        say("tcp-relay: relay-tcp:r1 (UDP blocked) vs relay:r1, 20 ms uplinks, 1 % loss for the stream");
        sections.add("tcp-relay", tcp_relay::run(opts));
    }
    if all || which == Which::TcpJoin {
        say("tcp-join: party join → first ping reply, TCP-443-only network vs open network");
        sections.add("tcp-join", tcp_join::run(opts));
    }
    if all || which == Which::Control {
        say("control: N synthetic QUIC agents register and join one party");
        sections.add("control", control::run(opts));
    }

    if all || which == Which::Idle {
        say(&format!(
            "idle: wake-ups and CPU per second, {} s windows, rally / boringtun-cli / wireguard-go \
             with 5 and 50 peers (keepalive 25 s)",
            idle::WINDOW.as_secs()
        ));
        sections.add("idle", idle::run(opts));
    }
}

/// Writes `bench-results[-<which>].json` and `.md` into the output directory.
fn write_results(which: Which, opts: &Options, results: &Results<'_>) -> Result<()> {
    let suffix = match which {
        Which::All => String::new(),
        w => format!("-{}", format!("{w:?}").to_lowercase()),
    };
    let json = opts.out_dir.join(format!("bench-results{suffix}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(results)?)?;
    let md = opts.out_dir.join(format!("bench-results{suffix}.md"));
    std::fs::write(&md, stats::markdown(results.figures))?;
    say(&format!("written: {} and {}", json.display(), md.display()));
    Ok(())
}

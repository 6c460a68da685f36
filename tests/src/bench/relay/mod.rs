//! Relay forwarding capacity: a synthetic load generator speaking the relay protocol
//! (`rally_proto::relay`, tokens signed with a control key made for the run) from real UDP
//! sockets in one lab namespace, through `rally-relay` in another, for 1, 10 and 100
//! concurrent peer pairs. Baselines in the same run, on the same hosts and generator: the same
//! relay without receive coalescing (`--coalesce-us 0`, what `rally_relay::coalesce` is
//! worth), and a plain UDP forwarder doing what the relay does minus the protocol checks, once
//! with one `recvfrom`/`sendto` per packet and once batched with `recvmmsg`/`sendmmsg`. Every
//! pass measures the four the same way; CPU time is the forwarding process's (utime + stime
//! from `/proc/PID/stat`) per million datagrams forwarded.
//!
//! The passes:
//!
//! - **default** (`1 pair`, `10 pairs`, `100 pairs`): nothing pinned, the kernel's defaults.
//!   Behind veth, a send runs the receiving side's softirq in the sender's context: the bridge,
//!   the generator namespace's IP and UDP receive path and, when a GSO train reaches a socket
//!   without `UDP_GRO`, its segmentation into datagrams are all charged to the forwarder's CPU
//!   time (on a physical NIC that work happens on the receiving machines). The forwarder's own
//!   receive path is charged to the generator the same way. The figure therefore overstates
//!   what a relay host pays per packet; it is kept as the continuous series.
//! - **GRO on** (`100 pairs, GRO on`): as default, with the offloads a real deployment has: GRO
//!   on the relay host's interface (on by default on physical and virtio NICs, off on veth) and
//!   `UDP_GRO` on the generator's receiving sockets (the agent's socket has it, through
//!   quinn-udp), so the relay's GSO trains reach the receivers whole instead of being split
//!   on the way in.
//! - **pinned** (`100 pairs, pinned`, and `100 pairs, GRO on, pinned`): the forwarder under test
//!   is pinned (`taskset`) to the last CPU, the generator to the others, and RPS (`rps_cpus`) on
//!   every bridge port of the lab's internet namespace and on the generator's interface sends
//!   the receiving side's work to the generator's CPUs. The forwarder's CPU time then holds its
//!   own work down to the transmit of its interface (what a NIC driver would charge it) and not
//!   the receivers' delivery. The forwarder's own receive path is still charged to the
//!   generator, as in every pass. Needs two CPUs or more (skipped with a note otherwise).
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};
use rally_proto::identity::Identity;

use super::stats::Figure;
use super::tools;
use super::tunnels::{start_relay, start_relay_with, RELAY_METRICS_PORT};
use super::Options;
use crate::rally::RELAY_PORT;
use crate::{bins, Host, Lab, Proc};

mod forward;
mod load;
mod pinning;

pub use forward::forward;
use load::hex;
pub use load::{load, random32, LoadArgs, LoadRun, Target};
use pinning::Pinning;

/// Datagram size on the wire (relay header included): a full-size WireGuard packet is ~1450.
pub const PACKET: usize = 1200;
/// Peer-pair counts measured.
pub const PAIRS: [usize; 3] = [1, 10, 100];
/// Pair count measured again with GRO on the relay's interface and `UDP_GRO` on the receivers,
/// and again pinned (with and without those offloads).
pub const OFFLOAD_PAIRS: usize = 100;
/// The plain forwarders' port on the relay host.
const FORWARD_PORT: u16 = 4000;
/// Where the relay without coalescing (`--coalesce-us 0`) serves its metrics.
const UNCOALESCED_METRICS_PORT: u16 = 9101;
/// The subject under test, and the same relay without receive coalescing.
const RELAY: &str = "rally-relay";
const UNCOALESCED: &str = "rally-relay --coalesce-us 0";
/// Datagrams per `sendmmsg` in the generator.
const GEN_BATCH: usize = 32;
/// The query the plain forwarders answer with their count.
const STATS_QUERY: &[u8] = b"STATS?";

/// The driver: one lab, relay and generator hosts, every pair count against the relay and
/// the two plain forwarders.
pub fn run(opts: &Options) -> Result<Vec<Figure>> {
    for line in tools::ensure(&[tools::Tool::Ethtool])? {
        println!("    installed {line}");
    }
    let lab = Lab::new()?;
    let r = measure(&lab, opts);
    if r.is_err() {
        lab.dump_logs();
    }
    r
}

fn measure(lab: &Lab, opts: &Options) -> Result<Vec<Figure>> {
    let relay_host = lab.add_host("relay")?;
    let gen = lab.add_host("gen")?;
    let seed = random32();
    let key = Identity::from_seed(seed).public().to_string();
    let (relay, _) = start_relay(&relay_host, "r1", &key, true)?;
    let rig = Rig {
        lab,
        relay_host: &relay_host,
        relay: &relay,
        key: &key,
        generator: Generator {
            gen: &gen,
            lab_bin: bins::rally_lab()?.to_string_lossy().into_owned(),
            relay_ip: relay_host.ip(),
            seed_hex: hex(&seed),
            runs: opts.runs,
            seconds: opts.seconds,
        },
    };

    // (subject, case, runs); a case is a pair count, with the offloads or without.
    let mut results: Results = Vec::new();
    let mut cases: Vec<String> = Vec::new();
    let pinning = Pinning::plan();
    if pinning.is_none() {
        println!("    note: one CPU only: the pinned passes are skipped");
    }
    let pinned_cases = |offload: bool| {
        pinning
            .as_ref()
            .map(move |p| (OFFLOAD_PAIRS, offload, Some(p)))
    };
    let plan = PAIRS
        .iter()
        .map(|&p| (p, false, None))
        .chain(pinned_cases(false))
        .chain(std::iter::once((OFFLOAD_PAIRS, true, None)))
        .chain(pinned_cases(true));
    for (pairs, offload, pin) in plan {
        let case = Case {
            pairs,
            offload,
            pin,
        };
        cases.push(measure_case(&rig, case, &mut results)?);
    }
    Ok(figures(&cases, &results))
}

/// Every (subject, case, runs) measured.
type Results = Vec<(String, String, Vec<LoadRun>)>;

/// The plain forwarders, by label.
const PLAIN: &str = "plain forwarder (recvfrom/sendto)";
const BATCHED: &str = "batched forwarder (recvmmsg/sendmmsg)";

/// The hosts and processes every case runs on.
struct Rig<'a> {
    lab: &'a Lab,
    relay_host: &'a Host,
    /// The relay under test (on `RELAY_PORT`).
    relay: &'a Proc,
    /// The control key the relays accept tokens from.
    key: &'a str,
    generator: Generator<'a>,
}

/// One case: a pair count, with the offloads or without, pinned or not.
#[derive(Clone, Copy)]
struct Case<'a> {
    pairs: usize,
    offload: bool,
    pin: Option<&'a Pinning>,
}

/// Runs `rally-lab bench-relay-load` on the generator host.
struct Generator<'a> {
    gen: &'a Host,
    lab_bin: String,
    relay_ip: Ipv4Addr,
    seed_hex: String,
    runs: usize,
    seconds: u64,
}

impl Generator<'_> {
    /// Loads `to` (the process `pid`) with `case`; one result per run. `metrics`: the relay's
    /// metrics listener, for `Target::Relay`.
    fn run(
        &self,
        target: Target,
        to: SocketAddrV4,
        metrics: u16,
        pid: u32,
        case: Case<'_>,
    ) -> Result<Vec<LoadRun>> {
        let (to_s, pid_s, pairs_s, runs_s) = (
            to.to_string(),
            pid.to_string(),
            case.pairs.to_string(),
            self.runs.to_string(),
        );
        let secs = self.seconds.clamp(2, 5).to_string();
        let metrics_s = SocketAddr::new(self.relay_ip.into(), metrics).to_string();
        let mut args = Vec::new();
        if let Some(pin) = case.pin {
            args.extend(["taskset", "-c", pin.generator.as_str()]);
        }
        args.extend([
            self.lab_bin.as_str(),
            "bench-relay-load",
            "--to",
            to_s.as_str(),
            "--pid",
            pid_s.as_str(),
            "--pairs",
            pairs_s.as_str(),
            "--runs",
            runs_s.as_str(),
            "--seconds",
            secs.as_str(),
        ]);
        match target {
            Target::Relay => args.extend([
                "--target",
                "relay",
                "--control-seed",
                self.seed_hex.as_str(),
                "--metrics",
                metrics_s.as_str(),
            ]),
            Target::Plain => args.extend(["--target", "plain"]),
        }
        if case.offload {
            args.push("--gro");
        }
        let out = self.gen.run_timeout(&args, Duration::from_secs(300))?;
        crate::host::check_success(&out, "rally-lab bench-relay-load")?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).context("reading a generator line"))
            .collect()
    }
}

/// Measures one case through the relay, the relay without coalescing and both plain
/// forwarders; appends their runs to `results` and returns the case's label.
fn measure_case(rig: &Rig<'_>, case: Case<'_>, results: &mut Results) -> Result<String> {
    let label = prepare_case(rig, case)?;
    println!("==> relay: {label} through {RELAY}");
    let relay_addr = SocketAddrV4::new(rig.relay_host.ip(), RELAY_PORT);
    let runs = rig.generator.run(
        Target::Relay,
        relay_addr,
        RELAY_METRICS_PORT,
        rig.relay.pid(),
        case,
    )?;
    report(&runs);
    results.push((RELAY.into(), label.clone(), runs));
    // The same relay without receive coalescing, started for the case like the plain
    // forwarders: what the pause after a busy wake-up is worth, in the same run.
    println!("==> relay: {label} through {UNCOALESCED}");
    let (uncoalesced, _) = start_relay_with(
        rig.relay_host,
        "uncoalesced",
        rig.key,
        true,
        (FORWARD_PORT, UNCOALESCED_METRICS_PORT),
        &["--coalesce-us", "0"],
    )?;
    let runs = measure_started(
        rig,
        &uncoalesced,
        Target::Relay,
        UNCOALESCED_METRICS_PORT,
        case,
    )?;
    results.push((UNCOALESCED.into(), label.clone(), runs));
    for (name, batch) in [(PLAIN, 1usize), (BATCHED, 64)] {
        println!("==> relay: {label} through the {name}");
        let fwd = start_forwarder(rig, batch)?;
        let runs = measure_started(rig, &fwd, Target::Plain, 0, case)?;
        results.push((name.into(), label.clone(), runs));
    }
    if let Some(pin) = case.pin {
        pin.unpin(rig.relay.pid())?;
        pin.steer(rig.lab, rig.generator.gen, false)?;
    }
    Ok(label)
}

/// Turns on GRO and pinning as `case` asks; returns its label (`100 pairs, GRO on, pinned`).
fn prepare_case(rig: &Rig<'_>, case: Case<'_>) -> Result<String> {
    let pairs = case.pairs;
    let pl = if pairs == 1 { "pair" } else { "pairs" };
    let mut label = format!("{pairs} {pl}");
    if case.offload {
        rig.relay_host
            .run_ok(&["ethtool", "-K", "eth0", "gro", "on"])
            .context("turning GRO on on the relay host (is ethtool installed?)")?;
        label.push_str(", GRO on");
    }
    if let Some(pin) = case.pin {
        pin.steer(rig.lab, rig.generator.gen, true)?;
        pin.pin(rig.relay.pid())?;
        label.push_str(", pinned");
    }
    Ok(label)
}

/// Starts a plain UDP forwarder (`batch` datagrams per syscall) on the forwarder port.
fn start_forwarder(rig: &Rig<'_>, batch: usize) -> Result<Proc> {
    let batch_s = batch.to_string();
    let fwd_addr = SocketAddrV4::new(rig.relay_host.ip(), FORWARD_PORT).to_string();
    let fwd = rig.relay_host.spawn(
        &[
            rig.generator.lab_bin.as_str(),
            "bench-udp-forward",
            "--listen",
            fwd_addr.as_str(),
            "--batch",
            batch_s.as_str(),
        ],
        rig.relay_host.log_path(&format!("forward-{batch}")),
    )?;
    super::tunnels::wait_udp_bound(rig.relay_host, FORWARD_PORT, &fwd)?;
    Ok(fwd)
}

/// Measures a forwarder started for this case on the forwarder port (pinned like the relay in
/// the pinned passes), then stops it.
fn measure_started(
    rig: &Rig<'_>,
    proc: &Proc,
    target: Target,
    metrics: u16,
    case: Case<'_>,
) -> Result<Vec<LoadRun>> {
    let forward_addr = SocketAddrV4::new(rig.relay_host.ip(), FORWARD_PORT);
    let runs = match case.pin {
        Some(p) => p.pin(proc.pid()),
        None => Ok(()),
    }
    .and_then(|()| {
        rig.generator
            .run(target, forward_addr, metrics, proc.pid(), case)
    });
    proc.terminate(Duration::from_secs(2))?;
    let runs = runs?;
    report(&runs);
    Ok(runs)
}

/// The figures: per case, pps, Mbit/s and CPU per Mpkt of every subject, the relay's with
/// ratios to the three baselines.
fn figures(cases: &[String], results: &Results) -> Vec<Figure> {
    let mut figures = Vec::new();
    let series =
        |r: &[LoadRun], f: &dyn Fn(&LoadRun) -> f64| -> Vec<f64> { r.iter().map(f).collect() };
    let pps = |r: &LoadRun| r.forwarded as f64 / r.secs;
    let mbps = |r: &LoadRun| r.forwarded as f64 * PACKET as f64 * 8.0 / r.secs / 1e6;
    let cpu = |r: &LoadRun| {
        if r.forwarded == 0 {
            f64::NAN
        } else {
            r.cpu_s / (r.forwarded as f64 / 1e6)
        }
    };
    for case in cases {
        let of = |label: &str| {
            results
                .iter()
                .find(|(l, c, _)| l == label && c == case)
                .map(|(_, _, r)| r.as_slice())
                .unwrap_or(&[])
        };
        let relay_runs = of(RELAY);
        let uncoalesced = of(UNCOALESCED);
        let plain = of(PLAIN);
        let batched = of(BATCHED);
        for (metric, unit, f) in [
            ("forwarded pps", "pps", &pps as &dyn Fn(&LoadRun) -> f64),
            ("forwarded Mbit/s", "Mbit/s", &mbps),
            ("CPU per Mpkt", "CPU s", &cpu),
        ] {
            let metric = format!("{metric}, {case}");
            for (label, runs) in [
                (RELAY, relay_runs),
                (UNCOALESCED, uncoalesced),
                (PLAIN, plain),
                (BATCHED, batched),
            ] {
                let mut fig = Figure::new("relay", &metric, label, unit, series(runs, f));
                if label == RELAY {
                    fig.ratio_to("no coalescing", &series(uncoalesced, f));
                    fig.ratio_to("plain forwarder", &series(plain, f));
                    fig.ratio_to("batched forwarder", &series(batched, f));
                    if metric.starts_with("forwarded pps") {
                        let delivered: f64 = runs.iter().map(|r| r.delivered as f64).sum();
                        let offered: f64 = runs.iter().map(|r| r.offered as f64).sum();
                        let fwd: f64 = runs.iter().map(|r| r.forwarded as f64).sum();
                        let drops: u64 = runs.iter().map(|r| r.kernel_drops).sum();
                        fig = fig.with_note(format!(
                            "offered {:.0} pps, {:.0}% of offered forwarded, {:.0}% of forwarded delivered, {drops} kernel drops at the relay's socket",
                            offered / runs.iter().map(|r| r.secs).sum::<f64>().max(1e-9),
                            100.0 * fwd / offered.max(1.0),
                            100.0 * delivered / fwd.max(1.0)
                        ));
                    }
                }
                figures.push(fig);
            }
        }
    }
    figures
}

fn report(runs: &[LoadRun]) {
    for r in runs {
        println!(
            "    offered {:.0} pps ({} threads), forwarded {:.0} pps, delivered {:.0} pps, {:.2} CPU s per Mpkt, {} kernel drops at the forwarder",
            r.offered as f64 / r.secs,
            r.threads,
            r.forwarded as f64 / r.secs,
            r.delivered as f64 / r.secs,
            r.cpu_s / (r.forwarded.max(1) as f64 / 1e6),
            r.kernel_drops
        );
    }
}

#[cfg(test)]
mod tests;

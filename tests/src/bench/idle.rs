//! `bench idle` (issue 13, item 8): what an idle tunnel daemon costs the machine it runs on.
//! An idle Rally agent with 5 and one with 50 peers (each a star of parties, `crate::star`,
//! with a control plane and two relays), next to boringtun-cli and wireguard-go each with 5
//! and with 50 peers and the same persistent keepalive (25 s), all in one lab and measured in
//! the same windows.
//!
//! The WireGuard baselines: each measured daemon in its own namespace with one interface
//! listing N peers; the peers are wireguard-go daemons (one per peer, one interface each, on
//! their own ports) in one shared namespace, each listing the measured daemons it belongs to.
//! One datagram from each measured daemon to each peer's tunnel address starts the handshakes;
//! the bench waits until `wg show … latest-handshakes` has every peer, then everything is left
//! idle. Rally's peers each answer a ping over the overlay, then the agents are left idle for
//! `star::IDLE_AFTER` (a peer is busy for 30 s after its last data). Every measured host keeps
//! its neighbour (ARP) entries 10 minutes (`long_lived_neighbours`): on the lab's one bridge
//! Rally's peers are 50 neighbours and the baselines' one, where a real host has one gateway.
//!
//! Per window (`WINDOW`, one per `--runs`) and measured process: **wake-ups per second** (the
//! context switches of all its threads, voluntary and not, from `/proc/PID/task/*/status`)
//! and **CPU milliseconds per second** (the threads' run time in `/proc/PID/task/*/schedstat`,
//! to the nanosecond; utime + stime of `/proc/PID/stat` count 10 ms clock ticks, ±0.33 ms/s
//! over 30 s, which reads 0 for the baselines).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::stats::Figure;
use super::tools::{self, Tool};
use super::tunnels::{self, Subject};
use super::Options;
use crate::{netns, star, wait_until, Agent, Host, Lab};

/// One measuring window.
pub const WINDOW: Duration = Duration::from_secs(30);
/// The peer counts measured.
pub const PEER_COUNTS: [usize; 2] = [5, 50];
/// Persistent keepalive of every WireGuard peer (Rally's WireGuard sessions use the same).
const KEEPALIVE: &str = "25";
/// The measured WireGuard daemons' port, and the first peer daemon's.
const MEASURED_PORT: u16 = 51_900;
const FIRST_PEER_PORT: u16 = 52_000;
/// How long a star may take to form and connect, and the handshakes to complete.
const FORM: Duration = Duration::from_secs(180);
const HANDSHAKES: Duration = Duration::from_secs(60);
/// The goals, printed beside the figures.
const GOALS: [(usize, &str, &str); 2] = [
    (5, "goal ≤ 5/s", "goal ≤ 1 ms/s"),
    (50, "goal ≤ 10/s", "goal: no more than the baselines"),
];

/// Rally's label in the figures.
const RALLY: &str = "rally";

/// A measured daemon.
struct Measured {
    /// `rally`, `boringtun-cli`, `wireguard-go`.
    label: &'static str,
    peers: usize,
    pid: u32,
}

/// A measured WireGuard daemon while it is being set up.
struct WgStar {
    subject: Subject,
    peers: usize,
    /// Its tunnel network is 10.97.<net>.0/24 (itself .1, peer i .10+i).
    net: u8,
    host: Host,
    ifname: String,
    public: String,
    pid: u32,
}

/// Builds the lab, measures, returns the figures (the lab is torn down after).
pub fn run(opts: &Options) -> Result<Vec<Figure>> {
    let lab = Lab::new()?;
    let r = measure(&lab, opts);
    if r.is_err() {
        lab.dump_logs();
    }
    r
}

fn measure(lab: &Lab, opts: &Options) -> Result<Vec<Figure>> {
    let mut measured = Vec::new();
    println!("==> idle: boringtun-cli and wireguard-go with 5 and 50 peers (wireguard-go peers)");
    for w in wireguard_stars(lab)? {
        measured.push(Measured {
            label: w.subject.label(),
            peers: w.peers,
            pid: w.pid,
        });
    }

    println!("==> idle: control plane, two relays, rally stars of 5 and 50 peers");
    let c = lab.add_host("control")?;
    let key = tunnels::control_init(lab, &c, "idle")?;
    let mut specs = Vec::new();
    for (i, name) in ["r1", "r2"].iter().enumerate() {
        let host = lab.add_host(&format!("relay{}", i + 1))?;
        specs.push(tunnels::start_relay(&host, name, &key, false)?.1);
    }
    let control = tunnels::serve_control(lab, &c, "idle", key, &specs, &[])?;
    let mut agents: Vec<Agent> = Vec::new();
    for n in PEER_COUNTS {
        let measured_host = lab.add_host(&format!("m{n}"))?;
        long_lived_neighbours(&measured_host)?;
        let mut hosts = vec![measured_host];
        for i in 1..=n {
            hosts.push(lab.add_host(&format!("s{n}-{i}"))?);
        }
        let started = Instant::now();
        let star_agents = star::start_agents(&hosts, control.target())?;
        let owner = &star_agents[0];
        star::form(owner, &star_agents[1..], &format!("idle{n}-"), FORM)?;
        let routes = star::wait_connected(lab, owner, n, FORM)?;
        star::ping_all(owner)?;
        println!(
            "    rally with {n} peers: {routes}, each answered a ping ({} s)",
            started.elapsed().as_secs()
        );
        measured.push(Measured {
            label: RALLY,
            peers: n,
            pid: tunnels::agent_pid(owner)?,
        });
        agents.extend(star_agents);
    }
    println!(
        "==> idle: letting the agents go idle ({} s after the last pings)",
        star::IDLE_AFTER.as_secs()
    );
    std::thread::sleep(star::IDLE_AFTER);

    let mut wake: Vec<Vec<f64>> = vec![Vec::new(); measured.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); measured.len()];
    for run in 1..=opts.runs {
        println!(
            "==> idle: window {run} of {}, {} s",
            opts.runs,
            WINDOW.as_secs()
        );
        let before = measured
            .iter()
            .map(|m| sample(m.pid))
            .collect::<Result<Vec<_>>>()?;
        let threads_before = rally_threads(&measured)?;
        let t0 = Instant::now();
        std::thread::sleep(WINDOW);
        let after = measured
            .iter()
            .map(|m| sample(m.pid))
            .collect::<Result<Vec<_>>>()?;
        let secs = t0.elapsed().as_secs_f64();
        print_threads(&measured, &threads_before, &rally_threads(&measured)?, secs);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            wake[i].push(a.0.saturating_sub(b.0) as f64 / secs);
            cpu[i].push((a.1 - b.1).max(0.0) * 1000.0 / secs);
        }
    }
    // Every Rally peer still answers (the agents were idle, not dead).
    for a in agents.iter().filter(|a| a.name().starts_with('m')) {
        star::ping_all(a)?;
    }
    Ok(figures(&measured, &wake, &cpu))
}

/// Context switches and CPU seconds (all threads) of `pid` now.
fn sample(pid: u32) -> Result<(u64, f64)> {
    Ok((
        tools::context_switches(pid)?,
        tools::thread_cpu_seconds(pid)?,
    ))
}

/// Context switches per thread name of each measured Rally agent now.
fn rally_threads(measured: &[Measured]) -> Result<Vec<BTreeMap<String, u64>>> {
    measured
        .iter()
        .filter(|m| m.label == RALLY)
        .map(|m| tools::context_switches_by_thread(m.pid))
        .collect()
}

/// Which of each Rally agent's threads woke in the window, per second (a diagnostic line, not
/// a figure: it tells the data plane's wake-ups from the daemon's runtime's).
fn print_threads(
    measured: &[Measured],
    before: &[BTreeMap<String, u64>],
    after: &[BTreeMap<String, u64>],
    secs: f64,
) {
    let rally = measured.iter().filter(|m| m.label == RALLY);
    for (m, (b, a)) in rally.zip(before.iter().zip(after)) {
        let parts: Vec<String> = a
            .iter()
            .map(|(name, n)| {
                let was = b.get(name).copied().unwrap_or(0);
                format!("{name} {:.2}/s", n.saturating_sub(was) as f64 / secs)
            })
            .collect();
        println!(
            "    rally, {} peers, wake-ups by thread: {}",
            m.peers,
            parts.join(", ")
        );
    }
}

/// One wake-ups and one CPU figure per measured daemon; Rally's with ratios to both baselines
/// with the same number of peers.
fn figures(measured: &[Measured], wake: &[Vec<f64>], cpu: &[Vec<f64>]) -> Vec<Figure> {
    let base = |label: &str, peers: usize, of: &[Vec<f64>]| {
        measured
            .iter()
            .position(|m| m.label == label && m.peers == peers)
            .map(|i| of[i].clone())
    };
    let mut out = Vec::new();
    for (i, m) in measured.iter().enumerate() {
        let goal = GOALS.iter().find(|g| g.0 == m.peers);
        for (of, metric, unit, note) in [
            (wake, "wake-ups", "/s", goal.map(|g| g.1)),
            (cpu, "CPU", "ms/s", goal.map(|g| g.2)),
        ] {
            let name = format!("{metric}, {} peers", m.peers);
            let mut f = Figure::new("idle", &name, m.label, unit, of[i].clone());
            if m.label == RALLY {
                for b in [Subject::Boringtun, Subject::WireguardGo] {
                    if let Some(base) = base(b.label(), m.peers, of) {
                        f.ratio_to(b.label(), &base);
                    }
                }
                if let Some(n) = note {
                    f = f.with_note(n);
                }
            }
            out.push(f);
        }
    }
    out
}

/// The four measured WireGuard daemons (boringtun-cli and wireguard-go, 5 and 50 peers) and
/// their wireguard-go peers, handshakes done.
fn wireguard_stars(lab: &Lab) -> Result<Vec<WgStar>> {
    let max = PEER_COUNTS.iter().copied().max().unwrap_or(0);
    let peers_host = lab.add_host("wgpeers")?;
    let tag = std::process::id() % 10_000;
    let mut stars = Vec::new();
    let kinds = [Subject::Boringtun, Subject::WireguardGo];
    let peer_keys = (0..max)
        .map(|_| tools::wg_keypair())
        .collect::<Result<Vec<_>>>()?;
    for (k, (subject, peers)) in kinds
        .iter()
        .flat_map(|s| PEER_COUNTS.iter().map(move |n| (*s, *n)))
        .enumerate()
    {
        let short = if subject == Subject::Boringtun {
            "bt"
        } else {
            "wg"
        };
        let host = lab.add_host(&format!("{short}{peers}"))?;
        long_lived_neighbours(&host)?;
        let ifname = format!("ri{short}{peers}x{tag}");
        let proc = tunnels::start_wireguard(&host, subject, &ifname)?;
        let (private, public) = tools::wg_keypair()?;
        let net = u8::try_from(k).context("too many measured daemons")?;
        let mut args = wg_set_args(lab, &ifname, MEASURED_PORT, &private)?;
        for (i, (_, peer_public)) in peer_keys.iter().take(peers).enumerate() {
            args.extend([
                "peer".into(),
                peer_public.clone(),
                "allowed-ips".into(),
                format!("10.97.{net}.{}/32", 10 + i),
                "endpoint".into(),
                format!("{}:{}", peers_host.ip(), peer_port(i)?),
                "persistent-keepalive".into(),
                KEEPALIVE.into(),
            ]);
        }
        host.run_ok(&args)?;
        let addr = format!("10.97.{net}.1/24");
        host.run_ok(&["ip", "addr", "add", addr.as_str(), "dev", ifname.as_str()])?;
        host.run_ok(&["ip", "link", "set", ifname.as_str(), "up"])?;
        stars.push(WgStar {
            subject,
            peers,
            net,
            host,
            ifname,
            public,
            pid: proc.pid(),
        });
    }
    for (i, (private, _)) in peer_keys.iter().enumerate() {
        let ifname = format!("rip{i}x{tag}");
        tunnels::start_wireguard(&peers_host, Subject::WireguardGo, &ifname)?;
        let mut args = wg_set_args(lab, &ifname, peer_port(i)?, private)?;
        for s in stars.iter().filter(|s| i < s.peers) {
            args.extend([
                "peer".into(),
                s.public.clone(),
                "allowed-ips".into(),
                format!("10.97.{}.1/32", s.net),
                "endpoint".into(),
                format!("{}:{MEASURED_PORT}", s.host.ip()),
                "persistent-keepalive".into(),
                KEEPALIVE.into(),
            ]);
        }
        peers_host.run_ok(&args)?;
        peers_host.run_ok(&["ip", "link", "set", ifname.as_str(), "up"])?;
    }
    for s in &stars {
        handshake(s)?;
    }
    Ok(stars)
}

/// Neighbour entries that stay valid for the whole measurement on a measured host. The lab's
/// public hosts share one bridge, so each peer is a neighbour of its own: Rally's 50 peers are
/// 50 hosts, the baselines' 50 peer daemons one host (the lab holds 90 hosts). An entry goes
/// stale 15–45 s after its last confirmation (UDP gives none), and a send then resolves it
/// again; with 50 peers probed every 25 s, that ARP (a broadcast to every namespace on the
/// bridge, processed in the sender's system call) was up to half an idle agent's CPU in a
/// window. A real host reaches its peers through one gateway, whose entry its traffic keeps
/// fresh: every measured host gets 10-minute entries, the same for every subject.
fn long_lived_neighbours(host: &Host) -> Result<()> {
    host.run_ok(&[
        "sh",
        "-c",
        "echo 600000 > /proc/sys/net/ipv4/neigh/eth0/base_reachable_time_ms && \
         echo 600 > /proc/sys/net/ipv4/neigh/eth0/gc_stale_time",
    ])?;
    Ok(())
}

/// `wg set IFNAME listen-port PORT private-key FILE` (the key written to a 0600 file).
fn wg_set_args(lab: &Lab, ifname: &str, port: u16, private: &str) -> Result<Vec<String>> {
    let wg = tools::path(Tool::Wg)?.to_string_lossy().into_owned();
    let key_file = tunnels::write_key(lab, ifname, private)?;
    Ok(vec![
        wg,
        "set".into(),
        ifname.into(),
        "listen-port".into(),
        port.to_string(),
        "private-key".into(),
        key_file.to_string_lossy().into_owned(),
    ])
}

fn peer_port(i: usize) -> Result<u16> {
    u16::try_from(i)
        .ok()
        .and_then(|i| FIRST_PEER_PORT.checked_add(i))
        .context("too many peers")
}

/// Sends one datagram from the measured daemon's namespace to each peer's tunnel address
/// (which starts each handshake), then waits until `wg show` has a handshake with every peer.
fn handshake(s: &WgStar) -> Result<()> {
    netns::in_ns(s.host.ns(), || {
        let sock = UdpSocket::bind(("0.0.0.0", 0)).context("binding a socket")?;
        for i in 0..s.peers {
            let last = u8::try_from(10 + i).context("too many peers")?;
            sock.send_to(b"handshake", (Ipv4Addr::new(10, 97, s.net, last), 9))
                .context("sending into the tunnel")?;
        }
        Ok(())
    })?;
    let wg = tools::path(Tool::Wg)?.to_string_lossy().into_owned();
    let mut done = 0;
    wait_until(
        &format!(
            "{} with {} peers to complete its handshakes",
            s.subject.label(),
            s.peers
        ),
        HANDSHAKES,
        Duration::from_millis(250),
        || {
            let out =
                s.host
                    .run_ok(&[wg.as_str(), "show", s.ifname.as_str(), "latest-handshakes"])?;
            done = handshakes_done(&out);
            Ok(done == s.peers)
        },
    )
    .with_context(|| format!("{done} of {} handshakes done", s.peers))
    .map_err(|e| crate::with_logs(e, &s.host.logs_tail()))
}

/// Peers with a handshake in `wg show IF latest-handshakes` output (`KEY\tUNIX_TIME`, 0 for
/// none yet).
fn handshakes_done(out: &str) -> usize {
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| t.parse::<u64>().is_ok_and(|t| t > 0))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_counted_from_wg_show() {
        let out = "AAAA=\t1765000000\nBBBB=\t0\nCCCC=\t1765000001\n";
        assert_eq!(handshakes_done(out), 2);
        assert_eq!(handshakes_done(""), 0);
    }

    #[test]
    fn rally_figures_get_ratios_to_both_baselines_of_the_same_size() {
        let m = |label, peers| Measured {
            label,
            peers,
            pid: 1,
        };
        let measured = [m("boringtun-cli", 5), m("wireguard-go", 5), m(RALLY, 5)];
        let wake = vec![vec![2.0], vec![4.0], vec![8.0]];
        let cpu = vec![vec![0.5], vec![1.0], vec![2.0]];
        let f = figures(&measured, &wake, &cpu);
        assert_eq!(f.len(), 6);
        let rally = &f[4];
        assert_eq!(rally.metric, "wake-ups, 5 peers");
        assert_eq!(rally.ratios.len(), 2);
        assert!((rally.ratios[0].value - 4.0).abs() < 1e-9);
        assert!((rally.ratios[1].value - 2.0).abs() < 1e-9);
        assert_eq!(rally.note.as_deref(), Some("goal ≤ 5/s"));
        assert!(f[0].ratios.is_empty());
    }
}

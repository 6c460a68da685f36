//! Building blocks for the connection-manager scenarios (`tests/tests/failover.rs`,
//! `tests/tests/idle_cost.rs`): a control plane with two relays on emulated WAN hosts, pairs of
//! agents behind two home routers, each agent's view of a peer from `rally peers --json`, a
//! timestamped ping stream (`ping -D`) with its gap and loss analysis, a `rally events
//! --follow` reader, and the process and interface counters the idle-cost figures come from.
//!
//! Everything here measures and reports; the tests decide what to assert (behaviour, never
//! timings: the machine is shared and noisy).

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::procs::Proc;
use crate::rally::{last_line, RelayServer};
use crate::{bins, netns, wait_until, Agent, ControlPlane, Host, Lab, NatKind, Router};

/// How long an agent may take to register with the control plane.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Poll interval for `rally peers --json` while waiting for a route to change.
pub const VIEW_POLL: Duration = Duration::from_millis(100);

/// The current time as Unix seconds (the clock `ping -D` stamps replies with).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A control plane and two relays (`r1`, `r2`), each on its own emulated WAN host
/// (`control`, `relay1`, `relay2`; 20 ms per uplink by default).
pub struct World {
    pub cp: ControlPlane,
    pub relays: Vec<RelayServer>,
}

impl World {
    /// Starts the control plane and both relays (the relays need the control key, the
    /// control plane the relays: `init` first, then the relays, then `serve`).
    pub fn start(lab: &Lab) -> Result<World> {
        let cp_host = lab.add_wan_host("control")?;
        let r1_host = lab.add_wan_host("relay1")?;
        let r2_host = lab.add_wan_host("relay2")?;
        let key = init_control(&cp_host, lab)?;
        let r1 = RelayServer::start(&r1_host, "r1", &key)?;
        let r2 = RelayServer::start(&r2_host, "r2", &key)?;
        let cp = ControlPlane::start_with_relays(&cp_host, lab, &[r1.spec(), r2.spec()])?;
        Ok(World {
            cp,
            relays: vec![r1, r2],
        })
    }

    /// The relay named `name` (`r1`, `r2`).
    pub fn relay(&self, name: &str) -> Result<&RelayServer> {
        self.relays
            .iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| anyhow!("no relay named {name:?}"))
    }

    /// The relay other than `name`.
    pub fn other_relay(&self, name: &str) -> Result<&RelayServer> {
        self.relays
            .iter()
            .find(|r| r.name() != name)
            .ok_or_else(|| anyhow!("no relay other than {name:?}"))
    }
}

/// `rally-control init` in the data directory `ControlPlane::start*` will use; returns the
/// control key (init keeps an existing key, so the later `serve` uses the same one).
pub fn init_control(host: &Host, lab: &Lab) -> Result<String> {
    let bin = bins::rally_control()?.to_string_lossy().into_owned();
    let dir = lab.dir().join(format!("control-{}", host.name()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let d = dir.to_string_lossy().into_owned();
    let out = host.run_ok(&[bin.as_str(), "init", "--data-dir", d.as_str()])?;
    last_line(&out)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("rally-control init printed no key"))
}

/// Waits until the agent's netcheck has reported (a `nat_detected` event in its history), so
/// the control plane knows its public endpoint before a party forms. (Filters the history
/// itself rather than with `--type`, which scenario 6 tests.)
pub fn wait_netcheck(agent: &Agent, timeout: Duration) -> Result<()> {
    let what = format!("agent {} to finish netcheck", agent.name());
    wait_until(&what, timeout, Duration::from_millis(200), || {
        let out = agent.rally_ok(&["events", "--json"])?;
        Ok(json_lines(&out).iter().any(|e| e["type"] == "nat_detected"))
    })
}

/// Two agents, `a` and `b`, each alone behind its own home router, in one party: the direct
/// path exists, and both relays are standbys.
pub struct Pair {
    pub router_a: Router,
    pub router_b: Router,
    pub a: Agent,
    pub b: Agent,
    pub a_vip: String,
    pub b_vip: String,
}

impl Pair {
    /// Routers `<tag>-gwa` / `<tag>-gwb`, hosts and agents `<tag>a` / `<tag>b` started with
    /// `extra` flags (e.g. `--profile stable`), party `<tag>` created by `a` and joined by `b`.
    /// Returns once both list each other.
    pub fn start(lab: &Lab, world: &World, tag: &str, extra: &[&str]) -> Result<Pair> {
        Pair::start_behind(lab, world, tag, NatKind::HomeRouter, extra)
    }

    /// As [`Pair::start`], with both routers of `kind` (e.g. [`NatKind::Symmetric`]: the
    /// pair stays relayed).
    pub fn start_behind(
        lab: &Lab,
        world: &World,
        tag: &str,
        kind: NatKind,
        extra: &[&str],
    ) -> Result<Pair> {
        let router_a = lab.add_router(&format!("{tag}-gwa"), kind)?;
        let router_b = lab.add_router(&format!("{tag}-gwb"), kind)?;
        let (a_name, b_name) = (format!("{tag}a"), format!("{tag}b"));
        let a_host = lab.add_host_behind(&router_a, &a_name)?;
        let b_host = lab.add_host_behind(&router_b, &b_name)?;
        let a = Agent::start_with(&a_host, &a_name, world.cp.control(), extra)?;
        let b = Agent::start_with(&b_host, &b_name, world.cp.control(), extra)?;
        for agent in [&a, &b] {
            agent.wait_control_connected(CONTROL_TIMEOUT)?;
            wait_netcheck(agent, CONTROL_TIMEOUT)?;
        }
        let code = a.party_create(tag, &[])?;
        let out = b.party_join(&code)?;
        ensure!(
            out.status.success(),
            "{b_name} could not join party {tag}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        a.wait_for_peers(&[&b_name], CONTROL_TIMEOUT)?;
        b.wait_for_peers(&[&a_name], CONTROL_TIMEOUT)?;
        let a_vip = a.virtual_ip()?.to_string();
        let b_vip = b.virtual_ip()?.to_string();
        Ok(Pair {
            router_a,
            router_b,
            a,
            b,
            a_vip,
            b_vip,
        })
    }

    /// `a`'s view of `b`.
    pub fn a_view(&self) -> Result<View> {
        view(&self.a, self.b.name())
    }

    /// `b`'s view of `a`.
    pub fn b_view(&self) -> Result<View> {
        view(&self.b, self.a.name())
    }

    /// Waits until both agents' views of each other satisfy `pred`; returns the time it took
    /// and the two views (`a`'s, then `b`'s).
    pub fn wait_both(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&View) -> bool,
    ) -> Result<(Duration, View, View)> {
        let start = Instant::now();
        let mut last = None;
        let what = format!("{} and {} to {what}", self.a.name(), self.b.name());
        let check = || {
            let (va, vb) = (self.a_view()?, self.b_view()?);
            let ok = pred(&va) && pred(&vb);
            last = Some((va, vb));
            Ok(ok)
        };
        wait_until(&what, timeout, VIEW_POLL, check).map_err(|e| {
            let seen = last.as_ref().map_or("nothing".into(), |(va, vb)| {
                format!("a: {}, b: {}", va.describe(), vb.describe())
            });
            crate::with_logs(
                e.context(format!("last seen {seen}")),
                &self.a.host().logs_tail(),
            )
        })?;
        let (va, vb) = last.ok_or_else(|| anyhow!("no view"))?;
        Ok((start.elapsed(), va, vb))
    }

    /// A one-line summary of both views.
    pub fn describe(&self) -> String {
        let one = |v: Result<View>| v.map_or_else(|e| format!("({e:#})"), |v| v.describe());
        format!(
            "{}→{}: {}; {}→{}: {}",
            self.a.name(),
            self.b.name(),
            one(self.a_view()),
            self.b.name(),
            self.a.name(),
            one(self.b_view())
        )
    }
}

/// One path in `rally peers --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct PathView {
    /// `direct:ADDR` or `relay:NAME`.
    pub path: String,
    /// `probing`, `up` or `down`.
    pub health: String,
    #[serde(default)]
    pub latency_ms: Option<f64>,
    #[serde(default)]
    pub is_primary: bool,
    #[serde(default)]
    pub consecutive_successes: u32,
    #[serde(default)]
    pub probes_sent: u64,
    #[serde(default)]
    pub probes_failed: u64,
}

/// An agent's view of one peer from `rally peers --json` (the fields the scenarios use).
#[derive(Clone, Debug, Deserialize)]
pub struct View {
    pub name: String,
    /// `direct`, `relay` or `none`.
    pub strategy: String,
    #[serde(default)]
    pub relay: Option<String>,
    pub state: String,
    #[serde(default)]
    pub failovers: u64,
    #[serde(default)]
    pub relay_switches: u64,
    #[serde(default)]
    pub paths: Vec<PathView>,
}

impl View {
    pub fn is_direct(&self) -> bool {
        self.strategy == "direct"
    }

    pub fn is_relayed(&self) -> bool {
        self.strategy == "relay"
    }

    /// `direct`, `relay:NAME` or `none`.
    pub fn route(&self) -> String {
        match (self.strategy.as_str(), &self.relay) {
            ("relay", Some(r)) => format!("relay:{r}"),
            (s, _) => s.to_owned(),
        }
    }

    /// The path named `path` (`relay:r1`), if the peer has it.
    pub fn path(&self, path: &str) -> Option<&PathView> {
        self.paths.iter().find(|p| p.path == path)
    }

    /// The health of the path named `path` (`relay:r1`), if the peer has it.
    pub fn health_of(&self, path: &str) -> Option<&str> {
        self.path(path).map(|p| p.health.as_str())
    }

    /// `relay:r1 (connected, 1 failovers, 0 relay switches) paths direct:…=down/81ms (probes 3
    /// lost of 9) relay:r1=up/163ms* (probes 0 lost of 9) …` (`*`: the primary).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} ({}, {} failovers, {} relay switches) paths",
            self.route(),
            self.state,
            self.failovers,
            self.relay_switches
        );
        for p in &self.paths {
            let _ = write!(
                s,
                " {}={}{}{} (probes {} lost of {})",
                p.path,
                p.health,
                p.latency_ms.map_or(String::new(), |l| format!("/{l:.0}ms")),
                if p.is_primary { "*" } else { "" },
                p.probes_failed,
                p.probes_sent
            );
        }
        s
    }
}

/// `agent`'s view of the peer named `peer`.
pub fn view(agent: &Agent, peer: &str) -> Result<View> {
    let peers = agent.peers_json()?;
    let entry = peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == peer))
        .ok_or_else(|| anyhow!("{} does not list {peer}", agent.name()))?;
    serde_json::from_value(entry.clone()).context("reading a `rally peers --json` entry")
}

/// Waits until `agent`'s view of `peer` satisfies `pred`; returns the time it took and the
/// view.
pub fn wait_view(
    agent: &Agent,
    peer: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&View) -> bool,
) -> Result<(Duration, View)> {
    let start = Instant::now();
    let mut last: Option<View> = None;
    let what = format!("{}'s view of {peer} to {what}", agent.name());
    let check = || {
        let v = view(agent, peer)?;
        let ok = pred(&v);
        last = Some(v);
        Ok(ok)
    };
    wait_until(&what, timeout, VIEW_POLL, check).map_err(|e| {
        let seen = last.as_ref().map_or("nothing".into(), View::describe);
        crate::with_logs(
            e.context(format!("last seen {seen}")),
            &agent.host().logs_tail(),
        )
    })?;
    let v = last.ok_or_else(|| anyhow!("no view"))?;
    Ok((start.elapsed(), v))
}

/// One echo reply of `ping -D`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reply {
    pub seq: u32,
    /// When the reply arrived, Unix seconds.
    pub at: f64,
    pub rtt_ms: f64,
}

impl Reply {
    /// When the request left, Unix seconds.
    pub fn sent(&self) -> f64 {
        self.at - self.rtt_ms / 1000.0
    }
}

/// A kernel `ping -D -n -i INTERVAL DST` running in the background in a host's namespace, its
/// output in a log file; stopped with SIGINT, which makes ping print its summary.
pub struct PingStream {
    proc: Proc,
    log: PathBuf,
    interval: Duration,
}

impl PingStream {
    /// Starts pinging `dst` from `host` every `interval` (`ping -i`; below 200 ms needs root).
    pub fn start(host: &Host, dst: &str, interval: Duration, label: &str) -> Result<PingStream> {
        let log = host.log_path(&format!("ping-{label}"));
        let i = format!("{:.3}", interval.as_secs_f64());
        let proc = host.spawn(&["ping", "-D", "-n", "-i", i.as_str(), dst], &log)?;
        Ok(PingStream {
            proc,
            log,
            interval,
        })
    }

    /// The replies so far.
    pub fn snapshot(&self) -> Result<PingLog> {
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        Ok(PingLog::parse(&text, self.interval))
    }

    /// Stops ping (SIGINT, SIGKILL if it lingers) and returns everything it printed.
    pub fn stop(self) -> Result<PingLog> {
        self.proc.signal(libc::SIGINT)?;
        if self.proc.wait_timeout(Duration::from_secs(5))?.is_none() {
            self.proc.terminate(Duration::from_secs(1))?;
        }
        self.snapshot()
    }
}

/// Port the echo side of a [`UdpStream`] listens on.
pub const ECHO_PORT: u16 = 47_000;

/// Bytes of a [`UdpStream`] datagram (sequence number, send time, padding): the size of a
/// ping's IP payload.
const STREAM_PAYLOAD: usize = 64;

/// A constant-rate UDP stream through the overlay, timestamped by the lab itself: one datagram
/// every `interval` from a socket in `from`'s namespace to `to_ip:ECHO_PORT`, echoed back by a
/// socket in `to`'s namespace. Unlike `ping`, which slows down while its requests go
/// unanswered, it keeps its schedule through an outage, so every request lost is counted.
/// All sockets and threads belong to the test process (no traffic in the root namespace: each
/// socket is made inside its lab namespace).
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
    sent: Arc<AtomicU32>,
    replies: Arc<Mutex<Vec<Reply>>>,
    interval: Duration,
}

impl UdpStream {
    /// Starts the echo side on `to` and the sender and receiver on `from`.
    pub fn start(from: &Host, to: &Host, to_ip: &str, interval: Duration) -> Result<UdpStream> {
        let dst: SocketAddr = format!("{to_ip}:{ECHO_PORT}")
            .parse()
            .with_context(|| format!("{to_ip} is not an IPv4 address"))?;
        let tick = Duration::from_millis(100);
        let echo = netns::in_ns(to.ns(), || {
            let s = UdpSocket::bind(("0.0.0.0", ECHO_PORT)).context("binding the echo socket")?;
            s.set_read_timeout(Some(tick))?;
            Ok(s)
        })?;
        let client = netns::in_ns(from.ns(), || {
            let s = UdpSocket::bind(("0.0.0.0", 0)).context("binding the stream socket")?;
            s.set_read_timeout(Some(tick))?;
            Ok(s)
        })?;
        let receiver = client.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU32::new(0));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();

        let halt = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut buf = [0u8; 2048];
            while !halt.load(Ordering::SeqCst) {
                match echo.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        let _ = echo.send_to(&buf[..n], peer);
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => return Err(e).context("echo socket"),
                }
            }
            Ok(())
        }));

        let (halt, count) = (Arc::clone(&stop), Arc::clone(&sent));
        threads.push(std::thread::spawn(move || -> Result<()> {
            let start = Instant::now();
            let mut seq: u32 = 0;
            let mut buf = [0u8; STREAM_PAYLOAD];
            while !halt.load(Ordering::SeqCst) {
                let due = start + interval * seq;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                buf[..4].copy_from_slice(&seq.to_be_bytes());
                buf[4..12].copy_from_slice(&unix_now().to_bits().to_be_bytes());
                // A send error (no route for a moment) is a lost datagram, like any other.
                let _ = client.send_to(&buf, dst);
                count.store(seq + 1, Ordering::SeqCst);
                seq += 1;
            }
            Ok(())
        }));

        let (halt, got) = (Arc::clone(&stop), Arc::clone(&replies));
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut buf = [0u8; 2048];
            while !halt.load(Ordering::SeqCst) {
                match receiver.recv_from(&mut buf) {
                    Ok((n, _)) if n >= 12 => {
                        let at = unix_now();
                        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap_or_default());
                        let bits = u64::from_be_bytes(buf[4..12].try_into().unwrap_or_default());
                        let rtt_ms = (at - f64::from_bits(bits)) * 1000.0;
                        got.lock().unwrap_or_else(|e| e.into_inner()).push(Reply {
                            seq,
                            at,
                            rtt_ms,
                        });
                    }
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => {}
                    // ICMP errors (port unreachable while the echo side starts) are not fatal.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(e).context("stream socket"),
                }
            }
            Ok(())
        }));
        Ok(UdpStream {
            stop,
            threads,
            sent,
            replies,
            interval,
        })
    }

    /// The replies so far.
    pub fn snapshot(&self) -> PingLog {
        let replies = self
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let received = u32::try_from(replies.len()).unwrap_or(u32::MAX);
        PingLog {
            replies,
            transmitted: Some(self.sent.load(Ordering::SeqCst)),
            received: Some(received),
            interval: self.interval,
        }
    }

    /// Stops sending, waits a moment for replies still in flight, and returns the log.
    pub fn stop(mut self) -> Result<PingLog> {
        let sent = self.sent.load(Ordering::SeqCst);
        // Replies to the last requests are still on their way (a relayed RTT is ~160 ms).
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow!("a UDP stream thread panicked"))??;
        }
        let mut log = self.snapshot();
        log.transmitted = Some(log.transmitted.unwrap_or(sent));
        Ok(log)
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// What a `ping -D` printed: every reply, and the summary if it got that far.
#[derive(Clone, Debug, Default)]
pub struct PingLog {
    /// In arrival order.
    pub replies: Vec<Reply>,
    pub transmitted: Option<u32>,
    pub received: Option<u32>,
    /// The interval the requests were sent at.
    pub interval: Duration,
}

/// The worst interruption of a ping stream inside a time window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outage {
    /// The longest interval without a delivered reply, within the window.
    pub gap: Duration,
    /// Requests sent inside the window that were never answered (excluding those still in
    /// flight when ping stopped).
    pub lost: u32,
    /// When the longest gap ended (the reply that ended it arrived), Unix seconds.
    pub gap_end: Option<f64>,
    /// Replies to requests sent inside the window.
    pub delivered: u32,
}

impl PingLog {
    /// Parses iputils output with `-D`: `[1712345678.123456] 64 bytes from 10.66.0.5:
    /// icmp_seq=12 ttl=64 time=80.9 ms`; other lines are skipped, the summary is read.
    pub fn parse(text: &str, interval: Duration) -> PingLog {
        let mut replies = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix('[') else {
                continue;
            };
            let Some((stamp, rest)) = rest.split_once(']') else {
                continue;
            };
            let Ok(at) = stamp.parse::<f64>() else {
                continue;
            };
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(str::to_owned)
            };
            let seq = field("icmp_seq=").and_then(|s| s.parse::<u32>().ok());
            let rtt = field("time=").and_then(|s| s.parse::<f64>().ok());
            if let (Some(seq), Some(rtt_ms)) = (seq, rtt) {
                replies.push(Reply { seq, at, rtt_ms });
            }
        }
        let summary = crate::ping::parse_summary(text);
        PingLog {
            replies,
            transmitted: summary.map(|s| s.transmitted),
            received: summary.map(|s| s.received),
            interval,
        }
    }

    /// The worst interruption within `[from, to)` (Unix seconds): the longest interval between
    /// consecutive replies, clipped to the window (a window with no reply counts whole), and
    /// the requests sent inside it that were lost.
    pub fn outage(&self, from: f64, to: f64) -> Outage {
        let mut by_arrival: Vec<Reply> = self.replies.clone();
        by_arrival.sort_by(|x, y| x.at.total_cmp(&y.at));
        // Silences are clipped to the window, so one that began earlier (an earlier outage)
        // counts only for its part inside.
        let mut gap = 0.0f64;
        let mut gap_end = None;
        for w in by_arrival.windows(2) {
            let (x, y) = (w[0], w[1]);
            let silent = y.at.min(to) - x.at.max(from);
            if y.at >= from && x.at < to && silent > gap {
                gap = silent;
                gap_end = Some(y.at);
            }
        }
        if !by_arrival.iter().any(|r| r.at >= from) {
            gap = to - from;
            gap_end = None;
        }

        // Lost requests: missing sequence numbers between answered ones, each placed in time
        // between the send times of its answered neighbours.
        let mut by_seq: Vec<Reply> = self.replies.clone();
        by_seq.sort_by_key(|r| r.seq);
        by_seq.dedup_by_key(|r| r.seq);
        let mut lost = 0;
        for w in by_seq.windows(2) {
            let (x, y) = (w[0], w[1]);
            let missing = y.seq.saturating_sub(x.seq).saturating_sub(1);
            if missing == 0 {
                continue;
            }
            let step = (y.sent() - x.sent()) / f64::from(y.seq - x.seq);
            for k in 1..=missing {
                let sent = x.sent() + step * f64::from(k);
                if sent >= from && sent < to {
                    lost += 1;
                }
            }
        }
        let delivered = by_seq
            .iter()
            .filter(|r| r.sent() >= from && r.sent() < to)
            .count();
        Outage {
            gap: Duration::from_secs_f64(gap.max(0.0)),
            lost,
            gap_end,
            delivered: u32::try_from(delivered).unwrap_or(u32::MAX),
        }
    }

    /// Replies to requests sent in `[from, to)`.
    pub fn replies_sent_in(&self, from: f64, to: f64) -> Vec<Reply> {
        self.replies
            .iter()
            .filter(|r| r.sent() >= from && r.sent() < to)
            .copied()
            .collect()
    }

    /// The send time of the first request after `from` that starts a run of replies with RTTs
    /// below `rtt_ms` (e.g. back on the direct path) lasting at least `hold` seconds: when the
    /// stream settled there (one slow reply later, a scheduling hiccup, does not move it).
    pub fn settled_below(&self, from: f64, rtt_ms: f64, hold: f64) -> Option<f64> {
        let mut after = self.replies_sent_in(from, f64::INFINITY);
        after.sort_by(|x, y| x.sent().total_cmp(&y.sent()));
        let mut start: Option<f64> = None;
        for r in &after {
            if r.rtt_ms >= rtt_ms {
                start = None;
                continue;
            }
            let s = *start.get_or_insert(r.sent());
            if r.sent() - s >= hold {
                return Some(s);
            }
        }
        None
    }

    /// The median RTT of replies to requests sent in `[from, to)`.
    pub fn median_rtt(&self, from: f64, to: f64) -> Option<f64> {
        let mut rtts: Vec<f64> = self
            .replies_sent_in(from, to)
            .iter()
            .map(|r| r.rtt_ms)
            .collect();
        rtts.sort_by(f64::total_cmp);
        rtts.get(rtts.len() / 2).copied()
    }
}

/// `rally events … --follow` running in the background (its output in a log file).
pub struct EventFollower {
    proc: Proc,
    log: PathBuf,
}

impl EventFollower {
    /// Starts `rally --state-dir DIR events ARGS…` on the agent's host and gives it a moment
    /// to subscribe; fails if it exits.
    pub fn start(agent: &Agent, label: &str, args: &[&str]) -> Result<EventFollower> {
        let bin = bins::rally()?.to_string_lossy().into_owned();
        let dir = agent.state_dir().to_string_lossy().into_owned();
        let mut full = vec![bin.as_str(), "--state-dir", dir.as_str(), "events"];
        full.extend_from_slice(args);
        let log = agent
            .host()
            .log_path(&format!("events-{}-{label}", agent.name()));
        let proc = agent.host().spawn(&full, &log)?;
        std::thread::sleep(Duration::from_millis(700));
        if let Some(status) = proc.try_status()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("`rally events` exited at once ({status}):\n{text}");
        }
        Ok(EventFollower { proc, log })
    }

    /// The JSON events printed so far (other lines, e.g. the lab's header, are skipped).
    pub fn events(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        Ok(json_lines(&text))
    }

    /// Whether it is still following.
    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// Stops following; returns every event it printed. Fails (with what it printed) if it
    /// had stopped by itself.
    pub fn stop(self) -> Result<Vec<Value>> {
        if let Some(status) = self.proc.try_status()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("`rally events` had exited ({status}):\n{}", text.trim());
        }
        self.proc.terminate(Duration::from_secs(2))?;
        self.events()
    }
}

/// The lines of `text` that parse as JSON objects.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The pid of the `rally … up` daemon in `host`'s namespace (found with `ip netns pids`).
pub fn agent_pid(host: &Host) -> Result<u32> {
    let out = crate::netns::ip(&["netns", "pids", host.ns()])?;
    let mut found = Vec::new();
    for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_rally = args
            .first()
            .is_some_and(|a| a.rsplit('/').next() == Some("rally"));
        if is_rally && args.iter().any(|a| a == "up") {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no `rally up` process in {}'s namespace", host.name()),
        many => bail!(
            "{} `rally up` processes in {}'s namespace: {many:?}",
            many.len(),
            host.name()
        ),
    }
}

/// `VmRSS` of process `pid`, in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are
    // plain: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no field {} in /proc/{pid}/stat", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// Probes this agent has sent to all its peers, summed over every path (`probes_sent` in
/// `rally metrics --json`), split into direct and relay paths.
pub fn probes_sent(agent: &Agent) -> Result<(u64, u64)> {
    let m: Value = serde_json::from_str(&agent.rally_ok(&["metrics", "--json"])?)
        .context("reading `rally metrics --json`")?;
    let (mut direct, mut relay) = (0, 0);
    for peer in m.as_array().into_iter().flatten() {
        for path in peer["paths"].as_array().into_iter().flatten() {
            let n = path["probes_sent"].as_u64().unwrap_or(0);
            if path["kind"] == "relay" {
                relay += n;
            } else {
                direct += n;
            }
        }
    }
    Ok((direct, relay))
}

/// Bytes received and sent by `dev` in `host`'s namespace since it was made
/// (`ip -s -j link show dev DEV`).
pub fn link_bytes(host: &Host, dev: &str) -> Result<LinkBytes> {
    let out = host.run_ok(&["ip", "-s", "-j", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out).context("reading `ip -s -j link`")?;
    let stats = &v[0]["stats64"];
    let get = |dir: &str, what: &str| {
        stats[dir][what]
            .as_u64()
            .ok_or_else(|| anyhow!("no {dir}.{what} for {dev} on {}: {out}", host.name()))
    };
    Ok(LinkBytes {
        rx_bytes: get("rx", "bytes")?,
        tx_bytes: get("tx", "bytes")?,
        rx_packets: get("rx", "packets")?,
        tx_packets: get("tx", "packets")?,
    })
}

/// Interface counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBytes {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl LinkBytes {
    /// Counts from `earlier` to `self`.
    pub fn since(&self, earlier: &LinkBytes) -> LinkBytes {
        LinkBytes {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
        }
    }
}

/// `median [min–max]` of `values`, formatted by `fmt`; `-` when empty.
pub fn spread<T: Copy + PartialOrd>(values: &[T], fmt: impl Fn(T) -> String) -> String {
    let mut v: Vec<T> = values.to_vec();
    v.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(&lo), Some(&mid), Some(&hi)) => {
            format!("{} median [{}–{}]", fmt(mid), fmt(lo), fmt(hi))
        }
        _ => "-".into(),
    }
}

/// `420 ms`.
pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// `420 ms` from seconds.
pub fn secs_ms(s: f64) -> String {
    format!("{:.0} ms", s * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u32, at: f64, rtt: f64) -> String {
        format!("[{at:.6}] 64 bytes from 10.66.0.5: icmp_seq={seq} ttl=64 time={rtt} ms\n")
    }

    /// Requests every 10 ms from t=100.0; answered after 80 ms, except seqs 11..=30 (lost),
    /// then 160 ms from seq 31 on.
    fn sample() -> String {
        let mut text = String::from("PING 10.66.0.5 (10.66.0.5) 56(84) bytes of data.\n");
        for seq in 1..=50u32 {
            let sent = 100.0 + f64::from(seq) * 0.01;
            match seq {
                11..=30 => {}
                1..=10 => text.push_str(&line(seq, sent + 0.080, 80.0)),
                _ => text.push_str(&line(seq, sent + 0.160, 160.0)),
            }
        }
        text.push_str("\n--- 10.66.0.5 ping statistics ---\n");
        text.push_str("50 packets transmitted, 30 received, 40% packet loss, time 500ms\n");
        text
    }

    #[test]
    fn ping_d_lines_and_summary_are_read() {
        let log = PingLog::parse(&sample(), Duration::from_millis(10));
        assert_eq!(log.replies.len(), 30);
        assert_eq!(log.replies[0].seq, 1);
        assert!((log.replies[0].at - 100.09).abs() < 1e-6);
        assert!((log.replies[0].sent() - 100.01).abs() < 1e-6);
        assert_eq!(log.transmitted, Some(50));
        assert_eq!(log.received, Some(30));
    }

    #[test]
    fn the_outage_is_the_longest_silence_and_the_requests_lost_in_it() {
        let log = PingLog::parse(&sample(), Duration::from_millis(10));
        // Last reply before the loss: seq 10 at 100.18; first after: seq 31 at 100.47.
        let o = log.outage(100.055, 101.0);
        assert_eq!(o.lost, 20);
        assert!((o.gap.as_secs_f64() - 0.29).abs() < 1e-6, "{o:?}");
        assert!((o.gap_end.unwrap() - 100.47).abs() < 1e-6);
        assert_eq!(o.delivered, 25); // seqs 6..=10 and 31..=50
                                     // A window before the loss sees none of it.
        let before = log.outage(100.0, 100.095);
        assert_eq!(before.lost, 0);
    }

    #[test]
    fn a_window_without_replies_counts_to_its_end() {
        let log = PingLog::parse(&sample(), Duration::from_millis(10));
        let o = log.outage(101.0, 103.0);
        assert!((o.gap.as_secs_f64() - 2.0).abs() < 1e-6, "{o:?}");
        assert_eq!(o.gap_end, None);
        // A silence that began before the window counts only inside it.
        let o = log.outage(100.3, 100.6);
        assert!((o.gap.as_secs_f64() - 0.17).abs() < 1e-6, "{o:?}");
    }

    #[test]
    fn settling_finds_the_first_request_after_the_last_slow_reply() {
        let text: String = (1..=10u32)
            .map(|seq| {
                let rtt = if seq <= 6 { 160.0 } else { 80.0 };
                line(seq, 200.0 + f64::from(seq) * 0.1 + rtt / 1000.0, rtt)
            })
            .collect();
        let log = PingLog::parse(&text, Duration::from_millis(100));
        let t = log.settled_below(200.0, 120.0, 0.3).expect("settles");
        assert!((t - 200.7).abs() < 1e-6, "{t}");
        assert_eq!(log.settled_below(200.0, 120.0, 0.5), None);
        assert_eq!(log.median_rtt(200.0, 201.5), Some(160.0));
        assert_eq!(log.median_rtt(200.65, 201.5), Some(80.0));
    }

    #[test]
    fn spread_is_median_and_range() {
        let d = |n| Duration::from_millis(n);
        assert_eq!(
            spread(&[d(610), d(380), d(420), d(500), d(400)], ms),
            "420 ms median [380 ms–610 ms]"
        );
        assert_eq!(spread::<Duration>(&[], ms), "-");
    }

    #[test]
    fn json_lines_skip_other_output() {
        let text = "===== lab: starting `rally events` =====\n{\"type\":\"failover\"}\nnot json\n";
        let v = json_lines(text);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["type"], "failover");
    }
}

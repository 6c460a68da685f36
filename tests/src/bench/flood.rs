//! `bench flood`: the longest gap in an overlay ping stream (pings 10 ms apart, bob → alice)
//! while an attacker floods alice's agent port, next to the same figure with no flood, in the
//! same run. Floods (`rally-lab attack flood`, 100,000 datagrams/s by default):
//! - `handshake-random`: 148-byte datagrams shaped like handshake initiations, random bytes;
//! - `handshake-mac1`: the same with a correct mac1 for alice's key (the attacker, mallory, is a
//!   member and knows it), from forged addresses on the lab's internet;
//! - `garbage`: random bytes of random length;
//! - `probe`: path probes authenticated with mallory's probe key, from a forged address (an
//!   observer's): the bytes that reach the observer over the bytes sent are the reflection
//!   factor.
//!
//! The lab: control plane, relay, alice, bob, mallory (the attacker's host) and an observer,
//! all on the lab's internet; alice and bob on a direct path.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::stats::Figure;
use super::tunnels::{control_init, serve_control, start_relay, strategy, Control};
use super::Options;
use crate::attack::{FloodReport, ListenReport};
use crate::procs::Proc;
use crate::{bins, wait_until, Agent, Host, Lab};

/// Agents' metrics port.
pub const METRICS_PORT: u16 = 9100;
/// Port the observer of a reflection listens on.
pub const OBSERVER_PORT: u16 = 7777;
const AGENT_PORT: u16 = 51820;
const READY: Duration = Duration::from_secs(40);

/// What a flood sends (the attack client's `--kind`), or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flood {
    None,
    HandshakeRandom,
    HandshakeMac1,
    Garbage,
    Probe,
}

impl Flood {
    pub const ALL: [Flood; 5] = [
        Flood::None,
        Flood::HandshakeRandom,
        Flood::HandshakeMac1,
        Flood::Garbage,
        Flood::Probe,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Flood::None => "no flood",
            Flood::HandshakeRandom => "handshake-shaped flood (random)",
            Flood::HandshakeMac1 => "handshake flood with a valid mac1",
            Flood::Garbage => "garbage flood",
            Flood::Probe => "forged-probe flood",
        }
    }

    fn kind(self) -> Option<&'static str> {
        match self {
            Flood::None => None,
            Flood::HandshakeRandom => Some("handshake-random"),
            Flood::HandshakeMac1 => Some("handshake-mac1"),
            Flood::Garbage => Some("garbage"),
            Flood::Probe => Some("probe"),
        }
    }
}

/// The party under attack.
pub struct FloodLab {
    pub control: Control,
    pub relay: Proc,
    pub alice: Agent,
    pub bob: Agent,
    pub mallory: Agent,
    pub observer: Host,
    /// Measurements so far (each gets log files of its own).
    runs: std::sync::atomic::AtomicU32,
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub flood: Flood,
    /// Longest time without a ping reply (from the ping's start, through each reply, to its
    /// end), in ms.
    pub longest_gap_ms: f64,
    pub pings_sent: u32,
    pub replies: u32,
    /// What the attack client sent.
    pub attack: Option<FloodReport>,
    /// Bytes that reached the observer (forged-probe flood only).
    pub reflected_bytes: Option<u64>,
    /// alice's handshake drops (all reasons) during the run.
    pub handshake_drops: f64,
}

impl Outcome {
    /// Bytes reflected to the observer per byte the attacker sent.
    pub fn reflection(&self) -> Option<f64> {
        let sent = self.attack.as_ref()?.bytes;
        Some(self.reflected_bytes? as f64 / sent.max(1) as f64)
    }
}

impl FloodLab {
    /// Control plane, relay, alice and bob (direct path, ping crosses), mallory in the same
    /// party, and an observer host.
    pub fn build(lab: &Lab) -> Result<FloodLab> {
        let c = lab.add_host("control")?;
        let r = lab.add_host("relay")?;
        let key = control_init(lab, &c, "flood")?;
        let (relay, spec) = start_relay(&r, "r1", &key, false)?;
        let control = serve_control(lab, &c, "flood", key, &[spec], &[])?;
        let start = |name: &str| -> Result<Agent> {
            let h = lab.add_host(name)?;
            let metrics = format!("{}:{METRICS_PORT}", h.ip());
            Agent::start_with(&h, name, control.target(), &["--metrics", &metrics])
        };
        let alice = start("alice")?;
        let bob = start("bob")?;
        let mallory = start("mallory")?;
        let observer = lab.add_host("observer")?;
        for a in [&alice, &bob, &mallory] {
            a.wait_control_connected(READY)?;
        }
        let code = alice.party_create("flood", &[])?;
        for a in [&bob, &mallory] {
            crate::host::check_success(&a.party_join(&code)?, "rally party join")?;
        }
        alice.wait_for_peers(&["bob", "mallory"], READY)?;
        let vip = alice.virtual_ip()?.to_string();
        wait_until(
            "bob to reach alice on a direct path",
            READY,
            Duration::from_millis(250),
            || {
                Ok(strategy(&bob, "alice")? == "direct"
                    && bob.kernel_ping(&vip, 1)?.status.success())
            },
        )
        .map_err(|e| crate::with_logs(e, &lab.logs_tail()))?;
        Ok(FloodLab {
            control,
            relay,
            alice,
            bob,
            mallory,
            observer,
            runs: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Pings alice's virtual IP from bob every 10 ms for `seconds` + 1.5 s, flooding alice's
    /// agent port for `seconds` from 0.5 s in (at `rate` datagrams per second).
    pub fn measure(&self, flood: Flood, seconds: f64, rate: u64) -> Result<Outcome> {
        let vip = self.alice.virtual_ip()?.to_string();
        let window = format!("{}", (seconds + 1.5).ceil() as u64);
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self
            .bob
            .host()
            .log_path(&format!("flood-ping-{flood:?}-{n}"));
        let started = unix_now();
        let pinger = self.bob.host().spawn(
            &[
                "ping",
                "-n",
                "-D",
                "-i",
                "0.01",
                "-w",
                window.as_str(),
                vip.as_str(),
            ],
            &log,
        )?;
        std::thread::sleep(Duration::from_millis(500));
        let drops_before = handshake_drops(&self.alice)?;
        let (attack, reflected) = match flood.kind() {
            None => {
                std::thread::sleep(Duration::from_secs_f64(seconds));
                (None, None)
            }
            Some(kind) => {
                let observer = (flood == Flood::Probe)
                    .then(|| self.listen(seconds + 1.0))
                    .transpose()?;
                let report = self.attack(kind, seconds, rate, None)?;
                let reflected = match observer {
                    Some(p) => Some(listen_report(&p)?.bytes),
                    None => None,
                };
                (Some(report), reflected)
            }
        };
        let status = pinger.wait_timeout(Duration::from_secs_f64(seconds + 10.0))?;
        status.ok_or_else(|| anyhow!("the ping did not end"))?;
        // ping stops at its deadline (`-w`), measured from a moment after `started`.
        let ended = unix_now().min(started + (seconds + 1.5).ceil());
        let text = std::fs::read_to_string(&log)?;
        let (longest_gap_ms, pings_sent, replies) = ping_gaps(&text, started, ended);
        Ok(Outcome {
            flood,
            longest_gap_ms,
            pings_sent,
            replies,
            attack,
            reflected_bytes: reflected,
            handshake_drops: handshake_drops(&self.alice)? - drops_before,
        })
    }

    /// Sends `count` datagrams of `flood` at alice's agent port (at 100,000 a second) and
    /// returns once they are sent.
    pub fn send(&self, flood: Flood, count: u64) -> Result<FloodReport> {
        let kind = flood.kind().ok_or_else(|| anyhow!("no flood to send"))?;
        self.attack(kind, 10.0, 100_000, Some(count))
    }

    /// Runs `rally-lab attack flood` on mallory's host against alice's agent port.
    fn attack(
        &self,
        kind: &str,
        seconds: f64,
        rate: u64,
        count: Option<u64>,
    ) -> Result<FloodReport> {
        let lab_bin = bins::rally_lab()?.to_string_lossy().into_owned();
        let to = SocketAddrV4::new(self.alice.host().ip(), AGENT_PORT).to_string();
        let mut args: Vec<String> = [
            lab_bin.as_str(),
            "attack",
            "flood",
            "--to",
            to.as_str(),
            "--kind",
            kind,
        ]
        .map(String::from)
        .to_vec();
        args.extend([
            "--rate".into(),
            rate.to_string(),
            "--seconds".into(),
            seconds.to_string(),
        ]);
        if let Some(n) = count {
            args.extend(["--count".into(), n.to_string()]);
        }
        match kind {
            "handshake-mac1" => {
                args.extend(["--victim-key".into(), hex::encode(wg_public(&self.alice)?)]);
                // Forged sources on the lab's internet, each a new one.
                let spoof: Vec<String> =
                    (200..=250u8).map(|h| format!("198.51.100.{h}:0")).collect();
                args.extend(["--spoof".into(), spoof.join(",")]);
            }
            "probe" => {
                let (key, from) = probe_key(&self.mallory, &self.alice)?;
                let observer = SocketAddrV4::new(self.observer.ip(), OBSERVER_PORT);
                args.extend([
                    "--probe-key".into(),
                    hex::encode(key),
                    "--probe-from".into(),
                    hex::encode(from),
                    "--spoof".into(),
                    observer.to_string(),
                ]);
            }
            _ => {}
        }
        let out = self
            .mallory
            .host()
            .run_timeout(&args, Duration::from_secs_f64(seconds + 30.0))?;
        let stdout = crate::host::check_success(&out, "rally-lab attack flood")
            .map(|()| String::from_utf8_lossy(&out.stdout).into_owned())?;
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("attack report {line:?}"))
    }

    /// Starts `rally-lab attack listen` on the observer and waits until it listens.
    fn listen(&self, seconds: f64) -> Result<Proc> {
        let lab_bin = bins::rally_lab()?.to_string_lossy().into_owned();
        let bind = SocketAddrV4::new(self.observer.ip(), OBSERVER_PORT).to_string();
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.observer.log_path(&format!("observer-{n}"));
        let p = self.observer.spawn(
            &[
                lab_bin.as_str(),
                "attack",
                "listen",
                "--bind",
                bind.as_str(),
                "--seconds",
                &seconds.to_string(),
            ],
            &log,
        )?;
        wait_until(
            "the observer to listen",
            READY,
            Duration::from_millis(50),
            || Ok(p.log_text()?.contains("listening")),
        )?;
        Ok(p)
    }
}

/// The observer's report, once it has ended.
fn listen_report(p: &Proc) -> Result<ListenReport> {
    p.wait_timeout(Duration::from_secs(10))?
        .ok_or_else(|| anyhow!("the observer did not end"))?;
    let text = p.log_text()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow!("no observer report in {text:?}"))?;
    Ok(serde_json::from_str(line)?)
}

/// The longest time without a reply in `ping -D` output, from the ping's start (unix seconds)
/// through every reply to its end, in ms; the pings sent and the replies.
pub fn ping_gaps(text: &str, started: f64, ended: f64) -> (f64, u32, u32) {
    let replies: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok())
        .collect();
    let times: Vec<f64> = std::iter::once(started)
        .chain(replies.iter().copied())
        .chain(std::iter::once(ended))
        .collect();
    let longest = times
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max);
    let sent = text
        .lines()
        .find_map(|l| l.split(" packets transmitted").next()?.trim().parse().ok())
        .unwrap_or(0);
    (longest, sent, replies.len() as u32)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// alice's handshake drops so far (every `handshake_*` reason), from its metrics endpoint.
pub fn handshake_drops(agent: &Agent) -> Result<f64> {
    let text = metrics_text(agent)?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("rally_dataplane_drops_total{reason=\"handshake_"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// One series of an agent's metrics (0 when absent).
pub fn metric(agent: &Agent, series: &str) -> Result<f64> {
    let text = metrics_text(agent)?;
    Ok(text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// `GET /metrics` from the agent's metrics port, inside its namespace.
pub fn metrics_text(agent: &Agent) -> Result<String> {
    let ip = agent.host().ip();
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{METRICS_PORT}; printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3"
    );
    agent.host().run_ok(&["bash", "-c", &script])
}

/// An agent's WireGuard public key, from its state directory.
pub fn wg_public(agent: &Agent) -> Result<[u8; 32]> {
    Ok(PublicKey::from(&wg_secret(agent)?).to_bytes())
}

fn wg_secret(agent: &Agent) -> Result<StaticSecret> {
    let path = agent.state_dir().join("wireguard.key");
    let b: [u8; 32] = std::fs::read(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .try_into()
        .map_err(|_| anyhow!("{} is not a key", path.display()))?;
    Ok(StaticSecret::from(b))
}

/// The probe key `member` shares with `victim`, and `member`'s short id: what a member can
/// compute from its own state directory and the victim's public key.
pub fn probe_key(member: &Agent, victim: &Agent) -> Result<([u8; 32], [u8; 8])> {
    let shared = wg_secret(member)?.diffie_hellman(&PublicKey::from(wg_public(victim)?));
    let key = rally_proto::probe::probe_key(shared.as_bytes());
    let path = member.state_dir().join("identity.key");
    let seed: [u8; 32] = std::fs::read(&path)?
        .try_into()
        .map_err(|_| anyhow!("{} is not a key", path.display()))?;
    let from = rally_proto::relay::short_id(&rally_proto::Identity::from_seed(seed).public());
    Ok((key, from))
}

/// `bench flood`: every flood once per run, interleaved with the no-flood baseline.
pub fn run(opts: &Options) -> Result<Vec<Figure>> {
    let lab = Lab::new()?;
    let r = measure_all(&lab, opts);
    if r.is_err() {
        lab.dump_logs();
    }
    r
}

fn measure_all(lab: &Lab, opts: &Options) -> Result<Vec<Figure>> {
    let f = FloodLab::build(lab)?;
    let seconds = opts.seconds.max(2) as f64;
    let mut gaps: Vec<(Flood, Vec<f64>)> = Flood::ALL.iter().map(|&k| (k, Vec::new())).collect();
    let mut reflection = Vec::new();
    for run in 1..=opts.runs {
        for (flood, samples) in gaps.iter_mut() {
            let o = f.measure(*flood, seconds, 100_000)?;
            println!(
                "    run {run}/{}: {:<34} longest gap {:>7.1} ms, {}/{} replies, sent {}, \
                 handshake drops {:.0}{}",
                opts.runs,
                flood.label(),
                o.longest_gap_ms,
                o.replies,
                o.pings_sent,
                o.attack.as_ref().map_or("-".into(), |a| format!(
                    "{} ({:.0}/s)",
                    a.sent,
                    a.sent as f64 / a.seconds.max(0.001)
                )),
                o.handshake_drops,
                o.reflection()
                    .map_or(String::new(), |r| format!(", reflected {r:.2}× the bytes")),
            );
            samples.push(o.longest_gap_ms);
            if let Some(r) = o.reflection() {
                reflection.push(r);
            }
        }
    }
    let base = gaps[0].1.clone();
    let mut figures = Vec::new();
    for (flood, samples) in gaps {
        let mut fig = Figure::new(
            "flood",
            "longest ping gap (pings 10 ms apart)",
            flood.label(),
            "ms",
            samples,
        );
        if flood != Flood::None {
            fig.ratio_to("no flood", &base);
        }
        figures.push(fig);
    }
    figures.push(Figure::new(
        "flood",
        "bytes reflected per byte of forged probes",
        "forged-probe flood",
        "×",
        reflection,
    ));
    Ok(figures)
}

//! Attack clients for the lab: small programs that speak Rally's real protocols (WireGuard
//! handshake shapes, path probes, relay messages) with bad intent, run by `rally-lab attack …`
//! inside a lab namespace. The flood benchmark and the attack tests start them.
//!
//! - [`flood`]: datagrams of one kind at a fixed rate, from the host's own address or from
//!   forged ones ([`raw`]).
//! - [`listen`]: counts what arrives at an address (the victim of a reflection).
//! - [`wg`]: a member's modified client: WireGuard with the member's own keys, sending packets
//!   the agent would never send.
//! - [`control`]: abusive clients of the control plane (its QUIC protocol).

pub mod control;
pub mod raw;
pub mod wg;

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use self::raw::RawUdp;

/// `rally-lab attack …`.
#[derive(clap::Subcommand, Debug)]
pub enum AttackCmd {
    /// Datagrams of one kind at a fixed rate; prints a [`FloodReport`] line.
    Flood(FloodArgs),
    /// Counts what arrives at an address; prints `listening`, then a [`ListenReport`] line.
    Listen(ListenArgs),
    /// A member's modified WireGuard client; prints a [`wg::WgReport`] line.
    Wg(wg::WgArgs),
}

/// Runs one attack client.
pub fn run(cmd: &AttackCmd) -> Result<()> {
    match cmd {
        AttackCmd::Flood(a) => flood(a),
        AttackCmd::Listen(a) => listen(a),
        AttackCmd::Wg(a) => wg::run(a),
    }
}

/// What a flood sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// 148 bytes `01 00 00 00` + random: a handshake initiation's shape, no key.
    HandshakeRandom,
    /// 148-byte initiations with random contents but a correct mac1 for the victim's key (as a
    /// member who knows it can make).
    HandshakeMac1,
    /// Random bytes of random length.
    Garbage,
    /// Path probes authenticated with a member's probe key (`--probe-key`, `--probe-from`).
    Probe,
    /// 5-byte relay `Error{NotBound}`, as a relay that lost the session would send.
    RelayNotBound,
}

#[derive(clap::Args, Debug)]
pub struct FloodArgs {
    #[arg(long)]
    pub to: SocketAddrV4,
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Datagrams per second.
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Stop after this many datagrams.
    #[arg(long)]
    pub count: Option<u64>,
    /// Forged source addresses, used in turn (port 0: a random port each time). Without any,
    /// the host's own address.
    #[arg(long, value_delimiter = ',')]
    pub spoof: Vec<SocketAddrV4>,
    /// The victim's WireGuard public key, hex (for `handshake-mac1`).
    #[arg(long)]
    pub victim_key: Option<String>,
    /// The probe key a member shares with the victim, hex (for `probe`).
    #[arg(long)]
    pub probe_key: Option<String>,
    /// The member's short id, hex (for `probe`).
    #[arg(long)]
    pub probe_from: Option<String>,
}

/// What a flood did, printed as one JSON line at the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FloodReport {
    pub sent: u64,
    pub bytes: u64,
    pub errors: u64,
    pub seconds: f64,
}

/// Sends the flood; prints its [`FloodReport`].
pub fn flood(args: &FloodArgs) -> Result<()> {
    let mut make = Maker::new(args)?;
    let mut out = Output::new(&args.spoof)?;
    let mut rng = rand::thread_rng();
    let start = Instant::now();
    let limit = Duration::from_secs_f64(args.seconds);
    let total = args.count.unwrap_or(u64::MAX);
    let mut report = FloodReport {
        sent: 0,
        bytes: 0,
        errors: 0,
        seconds: 0.0,
    };
    let mut payload = Vec::with_capacity(2048);
    while report.sent < total {
        let elapsed = start.elapsed();
        if elapsed >= limit {
            break;
        }
        // Pace: as many as the rate allows by now (at most a millisecond's worth behind).
        let due = ((elapsed.as_secs_f64() * args.rate as f64) as u64 + 1).min(total);
        let behind = due.saturating_sub(report.sent).min(args.rate / 1000 + 1);
        if behind == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..behind {
            make.next(&mut payload, &mut rng);
            match out.send(args.to, &payload, &mut rng) {
                Ok(()) => {
                    report.sent += 1;
                    report.bytes += payload.len() as u64;
                }
                Err(_) => report.errors += 1,
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    #[arg(long)]
    pub bind: SocketAddrV4,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
}

/// What arrived at a listener.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListenReport {
    pub datagrams: u64,
    pub bytes: u64,
}

/// Counts the datagrams that arrive at `--bind` for `--seconds`; prints a [`ListenReport`].
pub fn listen(args: &ListenArgs) -> Result<()> {
    let sock = UdpSocket::bind(args.bind).with_context(|| format!("binding {}", args.bind))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let end = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut report = ListenReport {
        datagrams: 0,
        bytes: 0,
    };
    let mut buf = [0u8; 65_536];
    // Ready: the caller waits for this line before it starts the attack.
    println!("listening");
    while Instant::now() < end {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            report.datagrams += 1;
            report.bytes += n as u64;
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Makes the datagrams of one kind.
struct Maker {
    kind: Kind,
    mac1_key: [u8; 32],
    probe_key: [u8; 32],
    probe_from: [u8; 8],
}

impl Maker {
    fn new(args: &FloodArgs) -> Result<Maker> {
        let mut m = Maker {
            kind: args.kind,
            mac1_key: [0; 32],
            probe_key: [0; 32],
            probe_from: [0; 8],
        };
        match args.kind {
            Kind::HandshakeMac1 => {
                let key = hex32(args.victim_key.as_deref(), "--victim-key")?;
                m.mac1_key = Blake2s256::new()
                    .chain_update(b"mac1----")
                    .chain_update(key)
                    .finalize()
                    .into();
            }
            Kind::Probe => {
                m.probe_key = hex32(args.probe_key.as_deref(), "--probe-key")?;
                let from = hex::decode(args.probe_from.as_deref().unwrap_or_default())?;
                m.probe_from = from
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("--probe-from takes 8 bytes in hex"))?;
            }
            _ => {}
        }
        Ok(m)
    }

    fn next(&mut self, out: &mut Vec<u8>, rng: &mut impl RngCore) {
        out.clear();
        match self.kind {
            Kind::HandshakeRandom | Kind::HandshakeMac1 => {
                out.resize(148, 0);
                rng.fill_bytes(&mut out[4..]);
                out[..4].copy_from_slice(&[1, 0, 0, 0]);
                if self.kind == Kind::HandshakeMac1 {
                    let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.mac1_key)
                        .expect("BLAKE2s takes a 32-byte key");
                    mac.update(&out[..116]);
                    let tag: [u8; 16] = mac.finalize_fixed().into();
                    out[116..132].copy_from_slice(&tag);
                    out[132..].fill(0);
                }
            }
            Kind::Garbage => {
                let n = rng.gen_range(1..1400);
                out.resize(n, 0);
                rng.fill_bytes(out);
            }
            Kind::Probe => {
                let p = rally_proto::probe::Probe {
                    kind: rally_proto::probe::ProbeKind::Probe,
                    from: self.probe_from,
                    txid: rng.next_u64(),
                };
                out.extend_from_slice(&p.encode(&self.probe_key));
            }
            Kind::RelayNotBound => {
                rally_proto::relay::RelayMsg::Error {
                    code: rally_proto::relay::RelayErrorCode::NotBound,
                    tag: None,
                }
                .encode(out);
            }
        }
    }
}

/// A plain socket, or a raw one with forged sources.
enum Output {
    Plain(UdpSocket),
    Spoofed {
        raw: RawUdp,
        sources: Vec<SocketAddrV4>,
        next: usize,
    },
}

impl Output {
    fn new(spoof: &[SocketAddrV4]) -> Result<Output> {
        if spoof.is_empty() {
            return Ok(Output::Plain(UdpSocket::bind("0.0.0.0:0")?));
        }
        let raw = RawUdp::new().context("a raw socket (needs root)")?;
        Ok(Output::Spoofed {
            raw,
            sources: spoof.to_vec(),
            next: 0,
        })
    }

    fn send(&mut self, to: SocketAddrV4, payload: &[u8], rng: &mut impl Rng) -> Result<()> {
        match self {
            Output::Plain(s) => {
                s.send_to(payload, to)?;
            }
            Output::Spoofed { raw, sources, next } => {
                let mut src = sources[*next % sources.len()];
                *next += 1;
                if src.port() == 0 {
                    src.set_port(rng.gen_range(1024..65535));
                }
                raw.send(src, to, payload)?;
            }
        }
        Ok(())
    }
}

fn hex32(v: Option<&str>, what: &str) -> Result<[u8; 32]> {
    let Some(v) = v else {
        bail!("{what} is required for this kind");
    };
    let b = hex::decode(v).with_context(|| format!("{what} is not hex"))?;
    b.try_into()
        .map_err(|_| anyhow::anyhow!("{what} takes 32 bytes in hex"))
}

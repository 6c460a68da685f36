//! The load generator (the hidden `bench-relay-load` subcommand): agent pairs bound to the
//! relay (or a plain forwarder) from real UDP sockets, blasting datagrams and counting what
//! arrives.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rally_proto::identity::Identity;
use rally_proto::relay::{
    bind_transcript, short_id, write_send_header, RelayMsg, ShortId, DATA_HEADER_LEN, DOMAIN_BIND,
};
use rally_proto::RelayToken;
use serde::{Deserialize, Serialize};

use crate::bench::mmsg::{self, send_batch, RecvBatch};
use crate::bench::tools;

use super::{GEN_BATCH, PACKET, STATS_QUERY};

/// What the generator is pointed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Target {
    /// `rally-relay` (binds with tokens, counts from its metrics).
    Relay,
    /// A plain forwarder (`rally-lab bench-udp-forward`).
    Plain,
}

/// The generator's arguments (the hidden `bench-relay-load` subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub to: SocketAddrV4,
    #[arg(long, value_enum)]
    pub target: Target,
    /// Hex of the control identity's seed (relay target): tokens are signed with it.
    #[arg(long, default_value = "")]
    pub control_seed: String,
    /// The relay's metrics address (relay target).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[arg(long)]
    pub pairs: usize,
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The forwarding process, whose CPU time is read from /proc around each run.
    #[arg(long)]
    pub pid: u32,
    /// Receive with `UDP_GRO` (as the agent does) and count the datagrams in each train.
    #[arg(long)]
    pub gro: bool,
    /// Sending threads (the pairs are split between them); one more thread reads. 0: one per
    /// CPU but one, which is left to the forwarder under test (the lab runs both on this
    /// machine: more senders than that overload it, and the kernel's work on the datagrams it
    /// drops is then charged to the forwarder's CPU time).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// One run of the generator (a JSON line on stdout).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadRun {
    pub pairs: usize,
    pub secs: f64,
    /// Datagrams the generator's kernel accepted.
    pub offered: u64,
    /// Datagrams the forwarder says it forwarded.
    pub forwarded: u64,
    /// Datagrams the generator's receiving sockets read.
    pub delivered: u64,
    /// CPU seconds the forwarder used.
    pub cpu_s: f64,
    /// Datagrams the kernel dropped on the forwarder's socket (receive buffer full), from the
    /// relay's `rally_relay_socket_drops_total` or the plain forwarder's `/proc/PID/net/udp`.
    #[serde(default)]
    pub kernel_drops: u64,
    /// Sending threads.
    #[serde(default)]
    pub threads: usize,
}

/// Random bytes from the kernel.
pub fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    f.read_exact(&mut b).expect("reading /dev/urandom");
    b
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn unhex32(s: &str) -> Result<[u8; 32]> {
    if s.len() != 64 {
        bail!("expected 64 hex digits");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One synthetic agent: a socket connected to the forwarder and its short id.
struct Agent {
    sock: UdpSocket,
    id: ShortId,
}

fn new_agent(to: SocketAddrV4) -> Result<(Agent, Identity)> {
    let identity = Identity::from_seed(random32());
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(to)?;
    mmsg::set_buffer(sock.as_raw_fd(), true, 4 << 20);
    mmsg::set_buffer(sock.as_raw_fd(), false, 4 << 20);
    let id = short_id(&identity.public());
    Ok((Agent { sock, id }, identity))
}

/// Binds at the relay: BindRequest → BindChallenge → Bind → BindOk, retrying through the
/// relay's handshake rate limit. Late answers to an earlier attempt are skipped, never taken
/// for the current step's.
fn bind(agent: &Agent, identity: &Identity, token: &[u8]) -> Result<()> {
    for _ in 0..100 {
        drain_one(&agent.sock)?;
        agent.sock.send(&RelayMsg::BindRequest.to_vec())?;
        let Some(cookie) = wait_for(&agent.sock, |m| match m {
            RelayMsg::BindChallenge { cookie } => Some(cookie),
            _ => None,
        })?
        else {
            continue;
        };
        let signature = identity.sign(DOMAIN_BIND, &bind_transcript(&cookie, token));
        agent.sock.send(
            &RelayMsg::Bind {
                cookie,
                signature,
                token,
            }
            .to_vec(),
        )?;
        let answer = wait_for(&agent.sock, |m| match m {
            RelayMsg::BindOk { .. } => Some(Ok(())),
            RelayMsg::Error { code, .. } => Some(Err(code)),
            _ => None,
        })?;
        match answer {
            Some(Ok(())) => return Ok(()),
            Some(Err(code)) => eprintln!("bind refused: {}", code.as_str()),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("could not bind at the relay (100 attempts)")
}

/// Discards whatever is waiting on a (blocking) socket.
fn drain_one(sock: &UdpSocket) -> Result<()> {
    let mut buf = [0u8; 2048];
    sock.set_nonblocking(true)?;
    while sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false)?;
    Ok(())
}

/// The first relay message within 300 ms that `want` accepts.
fn wait_for<T>(sock: &UdpSocket, want: impl Fn(RelayMsg<'_>) -> Option<T>) -> Result<Option<T>> {
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_millis(300);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        sock.set_read_timeout(Some(left))?;
        let Ok(n) = sock.recv(&mut buf) else {
            return Ok(None);
        };
        if let Some(t) = RelayMsg::decode(&buf[..n]).ok().and_then(&want) {
            return Ok(Some(t));
        }
    }
}

/// Registers at a plain forwarder: a `Send` to itself, answered by an echo.
fn hello(agent: &Agent) -> Result<()> {
    let mut d = vec![0u8; DATA_HEADER_LEN];
    write_send_header(&mut d, &agent.id);
    let mut buf = vec![0u8; 64];
    agent
        .sock
        .set_read_timeout(Some(Duration::from_millis(300)))?;
    for _ in 0..20 {
        agent.sock.send(&d)?;
        if agent.sock.recv(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("no answer from the plain forwarder")
}

/// What the forwarder has forwarded so far, and what the kernel dropped on its socket.
fn forwarded_so_far(args: &LoadArgs, probe: &UdpSocket) -> Result<(u64, u64)> {
    match args.target {
        Target::Relay => {
            let addr = args
                .metrics
                .ok_or_else(|| anyhow!("--metrics is needed for the relay"))?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let value = |l: &str| l.trim().parse::<f64>().ok().map(|v| v as u64);
            let forwarded = text
                .lines()
                .find_map(|l| l.strip_prefix("rally_relay_packets_forwarded_total "))
                .and_then(value)
                .ok_or_else(|| anyhow!("no rally_relay_packets_forwarded_total in the metrics"))?;
            let drops = text
                .lines()
                .filter(|l| l.starts_with("rally_relay_socket_drops_total{"))
                .filter_map(|l| l.rsplit(' ').next().and_then(value))
                .sum();
            Ok((forwarded, drops))
        }
        Target::Plain => {
            probe.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut buf = [0u8; 16];
            for _ in 0..10 {
                probe.send(STATS_QUERY)?;
                if let Ok(8) = probe.recv(&mut buf) {
                    let table = std::fs::read_to_string(format!("/proc/{}/net/udp", args.pid))?;
                    let drops = port_drops(&table, args.to.port()).unwrap_or(0);
                    return Ok((u64::from_le_bytes(buf[..8].try_into()?), drops));
                }
            }
            bail!("the plain forwarder does not answer STATS?")
        }
    }
}

/// The `drops` column of the socket bound to local `port` in a `/proc/net/udp` table.
pub(super) fn port_drops(table: &str, port: u16) -> Option<u64> {
    let want = format!(":{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.get(1)?
            .ends_with(&want)
            .then(|| cols.get(12)?.parse().ok())?
    })
}

/// The generator: binds `pairs` pairs of agents, then for each run blasts `Send`s from every
/// pair's first agent to its second for `seconds` (the senders split between `threads`
/// threads), reading what arrives on one more thread; prints a JSON [`LoadRun`] per run.
pub fn load(args: &LoadArgs) -> Result<()> {
    let (senders, receivers) = bind_pairs(args)?;
    if args.gro {
        for r in &receivers {
            set_udp_gro(r.sock.as_raw_fd())?;
        }
    }
    let (probe, _) = new_agent(args.to)?;
    // Each sender's datagram: a Send to its receiver, then zeros.
    let datagrams: Vec<Vec<u8>> = receivers
        .iter()
        .map(|r| {
            let mut d = vec![0u8; PACKET];
            write_send_header(&mut d, &r.id);
            d
        })
        .collect();
    let mut rx = RecvBatch::new(64, if args.gro { 65_536 } else { 2048 });
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1)),
        n => n,
    }
    .clamp(1, senders.len().max(1));
    let per_thread = senders.len().div_ceil(threads);
    for _ in 0..args.runs {
        // Keep the receivers' sessions alive (a relay forgets idle ones).
        if args.target == Target::Relay {
            for r in &receivers {
                let _ = r.sock.send(&RelayMsg::Ping { nonce: 1 }.to_vec());
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        drain(&receivers, &mut rx, args.gro);
        let (before, drops_before) = forwarded_so_far(args, &probe.sock)?;
        let cpu0 = tools::cpu_seconds(args.pid)?;
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(args.seconds);
        let sending = Senders {
            agents: &senders,
            datagrams: &datagrams,
            per_thread,
        };
        let (offered, mut delivered) =
            blast_and_count(&sending, &receivers, &mut rx, args.gro, deadline);
        let secs = start.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(200));
        delivered += drain(&receivers, &mut rx, args.gro);
        let cpu_s = tools::cpu_seconds(args.pid)? - cpu0;
        let (after, drops_after) = forwarded_so_far(args, &probe.sock)?;
        let run = LoadRun {
            pairs: args.pairs,
            secs,
            offered,
            forwarded: after.saturating_sub(before),
            delivered,
            cpu_s,
            kernel_drops: drops_after.saturating_sub(drops_before),
            threads,
        };
        println!("{}", serde_json::to_string(&run)?);
    }
    Ok(())
}

/// Binds `args.pairs` pairs of agents at `args.to` (or says hello to a plain forwarder);
/// returns the senders and the receivers, pair `i` being `(senders[i], receivers[i])`.
fn bind_pairs(args: &LoadArgs) -> Result<(Vec<Agent>, Vec<Agent>)> {
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let token_for = |identity: &Identity| -> Result<Vec<u8>> {
        let control = Identity::from_seed(unhex32(&args.control_seed)?);
        Ok(RelayToken {
            agent: identity.public(),
            expires_at: unix_now() + 3600,
            parties: vec![[7; 8]],
        }
        .sign(&control))
    };
    for _ in 0..args.pairs {
        for list in [&mut senders, &mut receivers] {
            let (agent, identity) = new_agent(args.to)?;
            match args.target {
                Target::Relay => bind(&agent, &identity, &token_for(&identity)?)?,
                Target::Plain => hello(&agent)?,
            }
            agent.sock.set_nonblocking(true)?;
            list.push(agent);
        }
    }
    Ok((senders, receivers))
}

/// The sending side of a run: each agent with its datagram, split between threads.
struct Senders<'a> {
    agents: &'a [Agent],
    datagrams: &'a [Vec<u8>],
    /// Agents per sending thread.
    per_thread: usize,
}

/// Blasts from every sender (one thread per `per_thread` of them) until `deadline` while
/// reading what reaches `receivers`; returns (datagrams offered, datagrams delivered).
fn blast_and_count(
    senders: &Senders<'_>,
    receivers: &[Agent],
    rx: &mut RecvBatch,
    gro: bool,
    deadline: Instant,
) -> (u64, u64) {
    std::thread::scope(|scope| {
        let sending: Vec<_> = senders
            .agents
            .chunks(senders.per_thread)
            .zip(senders.datagrams.chunks(senders.per_thread))
            .map(|(senders, datagrams)| scope.spawn(move || blast(senders, datagrams, deadline)))
            .collect();
        let mut delivered = 0u64;
        while Instant::now() < deadline {
            let n = drain(receivers, rx, gro);
            delivered += n;
            if n == 0 {
                // Sleep rather than spin: on a small machine a spinning reader takes CPU
                // from the forwarder under test. The receivers' 4 MiB buffers hold far
                // more than arrives in this pause.
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        let offered: u64 = sending.into_iter().map(|t| t.join().unwrap_or(0)).sum();
        (offered, delivered)
    })
}

/// Sends `Send`s from each of `senders` (its datagram from `datagrams`) in `sendmmsg` batches
/// until `deadline`; returns how many the kernel accepted.
fn blast(senders: &[Agent], datagrams: &[Vec<u8>], deadline: Instant) -> u64 {
    let mut offered = 0u64;
    while Instant::now() < deadline {
        for (s, d) in senders.iter().zip(datagrams) {
            let batch: [&[u8]; GEN_BATCH] = [d.as_slice(); GEN_BATCH];
            if let Ok(n) = send_batch(s.sock.as_raw_fd(), &batch, None, libc::MSG_DONTWAIT) {
                offered += n as u64;
            }
        }
    }
    offered
}

/// Reads everything waiting on the receivers; returns how many datagrams (pongs included).
/// With `gro`, a read may be a train of [`PACKET`]-byte datagrams: each counts.
fn drain(receivers: &[Agent], rx: &mut RecvBatch, gro: bool) -> u64 {
    let mut n = 0u64;
    for r in receivers {
        while let Ok(k) = rx.recv(r.sock.as_raw_fd(), libc::MSG_DONTWAIT) {
            n += if gro {
                rx.lens[..k]
                    .iter()
                    .map(|len| len.div_ceil(PACKET).max(1) as u64)
                    .sum()
            } else {
                k as u64
            };
            if k < 64 {
                break;
            }
        }
    }
    n
}

/// Turns on `UDP_GRO` on a socket: the kernel may hand over trains of same-sized datagrams.
fn set_udp_gro(fd: std::os::fd::RawFd) -> Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on our own socket with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting UDP_GRO");
    }
    Ok(())
}

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
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rally_proto::identity::Identity;
use rally_proto::relay::{
    bind_transcript, send_to_deliver, short_id, write_send_header, RelayMsg, ShortId,
    DATA_HEADER_LEN, DOMAIN_BIND,
};
use rally_proto::RelayToken;
use serde::{Deserialize, Serialize};

use super::mmsg::{self, send_batch, RecvBatch};
use super::stats::Figure;
use super::tools;
use super::tunnels::{start_relay, start_relay_with, RELAY_METRICS_PORT};
use super::Options;
use crate::rally::RELAY_PORT;
use crate::{bins, Lab, Proc};

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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Result<[u8; 32]> {
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
fn port_drops(table: &str, port: u16) -> Option<u64> {
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
        let (offered, mut delivered) = std::thread::scope(|scope| {
            let sending: Vec<_> = senders
                .chunks(per_thread)
                .zip(datagrams.chunks(per_thread))
                .map(|(senders, datagrams)| {
                    scope.spawn(move || blast(senders, datagrams, deadline))
                })
                .collect();
            let mut delivered = 0u64;
            while Instant::now() < deadline {
                let n = drain(&receivers, &mut rx, args.gro);
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
        });
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

/// The plain forwarder (the hidden `bench-udp-forward` subcommand): learns each source's
/// short id from its first datagram (echoing it), then rewrites `Send{to}` into
/// `Deliver{from}` and sends it to `to`'s address; `STATS?` is answered with the count.
/// `batch` 1 uses `recv_from`/`send_to`, more uses `recvmmsg`/`sendmmsg` of that many.
pub fn forward(listen: SocketAddrV4, batch: usize) -> Result<()> {
    let sock = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    mmsg::set_buffer(sock.as_raw_fd(), true, 4 << 20);
    mmsg::set_buffer(sock.as_raw_fd(), false, 4 << 20);
    println!("forwarding on {listen}, batch {batch}");
    let mut by_id: HashMap<ShortId, SocketAddrV4> = HashMap::new();
    let mut by_addr: HashMap<SocketAddrV4, ShortId> = HashMap::new();
    let mut forwarded = 0u64;
    let mut handle = |d: &mut [u8], from: SocketAddrV4| -> Option<(SocketAddrV4, bool)> {
        if d == STATS_QUERY {
            return None;
        }
        match by_addr.get(&from) {
            None => {
                if d.len() < DATA_HEADER_LEN {
                    return None;
                }
                let id: ShortId = d[4..DATA_HEADER_LEN].try_into().ok()?;
                by_id.insert(id, from);
                by_addr.insert(from, id);
                Some((from, false))
            }
            Some(from_id) => {
                let to = send_to_deliver(d, from_id)?;
                by_id.get(&to).map(|a| (*a, true))
            }
        }
    };
    if batch <= 1 {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = sock.recv_from(&mut buf)?;
            let SocketAddr::V4(from) = from else { continue };
            if &buf[..n] == STATS_QUERY {
                sock.send_to(&forwarded.to_le_bytes(), from)?;
                continue;
            }
            if let Some((to, fwd)) = handle(&mut buf[..n], from) {
                let _ = sock.send_to(&buf[..n], to);
                forwarded += u64::from(fwd);
            }
        }
    }
    let mut rx = RecvBatch::new(batch, 2048);
    let mut dest: Vec<SocketAddrV4> = Vec::with_capacity(batch);
    let mut idx: Vec<usize> = Vec::with_capacity(batch);
    loop {
        let n = rx.recv(sock.as_raw_fd(), libc::MSG_WAITFORONE)?;
        dest.clear();
        idx.clear();
        for i in 0..n {
            let from = rx.addr(i);
            if rx.buf(i) == STATS_QUERY {
                sock.send_to(&forwarded.to_le_bytes(), from)?;
                continue;
            }
            if let Some((to, fwd)) = handle(rx.buf_mut(i), from) {
                dest.push(to);
                idx.push(i);
                forwarded += u64::from(fwd);
            }
        }
        let bufs: Vec<&[u8]> = idx.iter().map(|&i| rx.buf(i)).collect();
        let mut sent = 0;
        while sent < bufs.len() {
            match send_batch(sock.as_raw_fd(), &bufs[sent..], Some(&dest[sent..]), 0) {
                Ok(k) => sent += k.max(1),
                Err(_) => break,
            }
        }
    }
}

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
    let lab_bin = bins::rally_lab()?.to_string_lossy().into_owned();
    let relay_addr = SocketAddrV4::new(relay_host.ip(), RELAY_PORT);
    let forward_addr = SocketAddrV4::new(relay_host.ip(), FORWARD_PORT);
    let seed_hex = hex(&seed);

    // `metrics`: the relay's metrics listener, for `Target::Relay`.
    let generate = |target: Target,
                    to: SocketAddrV4,
                    metrics: u16,
                    pid: u32,
                    pairs: usize,
                    gro: bool,
                    pin: Option<&Pinning>|
     -> Result<Vec<LoadRun>> {
        let (to_s, pid_s, pairs_s, runs_s) = (
            to.to_string(),
            pid.to_string(),
            pairs.to_string(),
            opts.runs.to_string(),
        );
        let secs = opts.seconds.clamp(2, 5).to_string();
        let metrics_s = SocketAddr::new(relay_host.ip().into(), metrics).to_string();
        let mut args = Vec::new();
        if let Some(pin) = pin {
            args.extend(["taskset", "-c", pin.generator.as_str()]);
        }
        args.extend([
            lab_bin.as_str(),
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
                seed_hex.as_str(),
                "--metrics",
                metrics_s.as_str(),
            ]),
            Target::Plain => args.extend(["--target", "plain"]),
        }
        if gro {
            args.push("--gro");
        }
        let out = gen.run_timeout(&args, Duration::from_secs(300))?;
        crate::host::check_success(&out, "rally-lab bench-relay-load")?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).context("reading a generator line"))
            .collect()
    };

    // (subject, case, runs); a case is a pair count, with the offloads or without.
    let mut results: Vec<(String, String, Vec<LoadRun>)> = Vec::new();
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
        let pl = if pairs == 1 { "pair" } else { "pairs" };
        let mut case = format!("{pairs} {pl}");
        if offload {
            relay_host
                .run_ok(&["ethtool", "-K", "eth0", "gro", "on"])
                .context("turning GRO on on the relay host (is ethtool installed?)")?;
            case.push_str(", GRO on");
        }
        if let Some(pin) = pin {
            pin.steer(lab, &gen, true)?;
            pin.pin(relay.pid())?;
            case.push_str(", pinned");
        }
        cases.push(case.clone());
        println!("==> relay: {case} through {RELAY}");
        let runs = generate(
            Target::Relay,
            relay_addr,
            RELAY_METRICS_PORT,
            relay.pid(),
            pairs,
            offload,
            pin,
        )?;
        report(&runs);
        results.push((RELAY.into(), case.clone(), runs));
        // Measures a forwarder started for this case on the forwarder port (pinned like the
        // relay in the pinned passes), then stops it.
        let measure_started = |proc: &Proc, target: Target, metrics: u16| {
            let runs = match pin {
                Some(p) => p.pin(proc.pid()),
                None => Ok(()),
            }
            .and_then(|()| {
                generate(
                    target,
                    forward_addr,
                    metrics,
                    proc.pid(),
                    pairs,
                    offload,
                    pin,
                )
            });
            proc.terminate(Duration::from_secs(2))?;
            let runs = runs?;
            report(&runs);
            Ok::<_, anyhow::Error>(runs)
        };
        // The same relay without receive coalescing, started for the case like the plain
        // forwarders: what the pause after a busy wake-up is worth, in the same run.
        println!("==> relay: {case} through {UNCOALESCED}");
        let (uncoalesced, _) = start_relay_with(
            &relay_host,
            "uncoalesced",
            &key,
            true,
            (FORWARD_PORT, UNCOALESCED_METRICS_PORT),
            &["--coalesce-us", "0"],
        )?;
        let runs = measure_started(&uncoalesced, Target::Relay, UNCOALESCED_METRICS_PORT)?;
        results.push((UNCOALESCED.into(), case.clone(), runs));
        for (label, batch) in [
            ("plain forwarder (recvfrom/sendto)", 1usize),
            ("batched forwarder (recvmmsg/sendmmsg)", 64),
        ] {
            println!("==> relay: {case} through the {label}");
            let batch_s = batch.to_string();
            let fwd_addr = forward_addr.to_string();
            let fwd = relay_host.spawn(
                &[
                    lab_bin.as_str(),
                    "bench-udp-forward",
                    "--listen",
                    fwd_addr.as_str(),
                    "--batch",
                    batch_s.as_str(),
                ],
                relay_host.log_path(&format!("forward-{batch}")),
            )?;
            super::tunnels::wait_udp_bound(&relay_host, FORWARD_PORT, &fwd)?;
            let runs = measure_started(&fwd, Target::Plain, 0)?;
            results.push((label.into(), case.clone(), runs));
        }
        if let Some(pin) = pin {
            pin.unpin(relay.pid())?;
            pin.steer(lab, &gen, false)?;
        }
    }

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
    for case in &cases {
        let of = |label: &str| {
            results
                .iter()
                .find(|(l, c, _)| l == label && c == case)
                .map(|(_, _, r)| r.as_slice())
                .unwrap_or(&[])
        };
        let relay_runs = of(RELAY);
        let uncoalesced = of(UNCOALESCED);
        let plain = of("plain forwarder (recvfrom/sendto)");
        let batched = of("batched forwarder (recvmmsg/sendmmsg)");
        for (metric, unit, f) in [
            ("forwarded pps", "pps", &pps as &dyn Fn(&LoadRun) -> f64),
            ("forwarded Mbit/s", "Mbit/s", &mbps),
            ("CPU per Mpkt", "CPU s", &cpu),
        ] {
            let metric = format!("{metric}, {case}");
            for (label, runs) in [
                (RELAY, relay_runs),
                (UNCOALESCED, uncoalesced),
                ("plain forwarder (recvfrom/sendto)", plain),
                ("batched forwarder (recvmmsg/sendmmsg)", batched),
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
    Ok(figures)
}

/// Where the pinned passes put the forwarder under test and the generator.
struct Pinning {
    /// The forwarder's CPU (the last one), for `taskset -c`.
    forwarder: String,
    /// Every other CPU, for `taskset -c`.
    generator: String,
    /// The same CPUs as an `rps_cpus` hex mask.
    generator_mask: String,
    /// Every CPU, to undo the pinning.
    all: String,
}

impl Pinning {
    /// `None` on a one-CPU machine.
    fn plan() -> Option<Pinning> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if n < 2 {
            return None;
        }
        let mask: u128 = (1u128 << (n - 1).min(127)) - 1;
        Some(Pinning {
            forwarder: (n - 1).to_string(),
            generator: format!("0-{}", n - 2),
            generator_mask: format!("{mask:x}"),
            all: format!("0-{}", n - 1),
        })
    }

    /// Pins every thread of `pid` to the forwarder's CPU.
    fn pin(&self, pid: u32) -> Result<()> {
        taskset(pid, &self.forwarder)
    }

    /// Lets every thread of `pid` run anywhere again.
    fn unpin(&self, pid: u32) -> Result<()> {
        taskset(pid, &self.all)
    }

    /// With `on`, steers what arrives on every bridge port of the internet namespace and on the
    /// generator's interface to the generator's CPUs (RPS); without, back to the default (no
    /// RPS: the softirq runs on the CPU that transmitted).
    fn steer(&self, lab: &Lab, gen: &crate::Host, on: bool) -> Result<()> {
        let mask = if on {
            self.generator_mask.as_str()
        } else {
            "0"
        };
        let script = format!(
            "for q in /sys/class/net/*/queues/rx-*/rps_cpus; do echo {mask} > $q || exit 1; done"
        );
        crate::netns::exec(lab.internet_ns(), &["sh", "-c", script.as_str()])
            .context("setting rps_cpus in the internet namespace")?;
        gen.run_ok(&["sh", "-c", script.as_str()])
            .context("setting rps_cpus on the generator host")?;
        Ok(())
    }
}

fn taskset(pid: u32, cpus: &str) -> Result<()> {
    let pid_s = pid.to_string();
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, pid_s.as_str()])
        .output()
        .context("running taskset")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn port_drops_reads_the_row_bound_to_the_port() {
        let table = "  sl local_address rem_address st tx_queue:rx_queue tr:tm retr uid timeout inode ref pointer drops
  1: 0A000002:0D96 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 111 2 0000000000000000 17
  2: 0A000002:0FA0 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 222 2 0000000000000000 5
";
        assert_eq!(port_drops(table, 3478), Some(17));
        assert_eq!(port_drops(table, 4000), Some(5));
        assert_eq!(port_drops(table, 4001), None);
    }

    #[test]
    fn hex_round_trips() {
        let b = random32();
        assert_eq!(unhex32(&hex(&b)).expect("hex"), b);
        assert!(unhex32("zz").is_err());
    }
}

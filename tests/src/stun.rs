//! STUN for calibrating the lab's NAT routers, until the real relay binary answers STUN:
//! a server (`rally-lab stun-server`), a probe that asks several servers from one local socket
//! and then listens (`rally-lab stun-probe`), and a datagram sender (`rally-lab udp-send`).
//! The codec is `rally_proto::stun`; the sockets are real UDP sockets in lab namespaces.
//!
//! The first half of this module is what the subcommands run; the second half starts them on
//! lab hosts and reads their output.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rally_proto::stun::{self as codec, BindingRequest, BindingResponse};
use serde::{Deserialize, Serialize};

use crate::host::Host;
use crate::procs::Proc;
use crate::{bins, wait_until};

/// The port the lab's STUN servers listen on.
pub const STUN_PORT: u16 = 3478;

/// How often the probe resends an unanswered binding request.
const RETRANSMIT: Duration = Duration::from_millis(250);

/// What `stun-server` prints once its socket is bound.
const LISTENING: &str = "stun-server: listening on";

/// One line of `rally-lab stun-probe` output (JSON lines).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProbeEvent {
    /// The binding phase is over: what each server said.
    Mapped {
        local_port: u16,
        results: Vec<ProbeResult>,
    },
    /// A datagram (not STUN) arrived on the probe's socket.
    Received { from: SocketAddr, payload: String },
    /// The probe is finished.
    Done,
}

/// One server's answer to the probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub server: SocketAddr,
    /// The mapped address the server saw; `None` if it never answered.
    pub mapped: Option<SocketAddr>,
    /// From the first request to the answer.
    pub rtt_ms: Option<f64>,
}

/// What `stun-probe` does.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOptions {
    /// Servers to ask, all from the same local socket.
    pub servers: Vec<SocketAddr>,
    /// The local UDP port (on 0.0.0.0).
    pub local_port: u16,
    /// How long to wait for the servers' answers.
    pub timeout: Duration,
    /// After the binding phase, send one `hello` datagram to each of these.
    pub hello: Vec<SocketAddr>,
    /// After that, report every datagram arriving for this long.
    pub listen: Duration,
}

impl ProbeOptions {
    /// Ask `servers` from `local_port`, waiting up to 2 s; no hellos, no listening.
    pub fn new(servers: &[SocketAddr], local_port: u16) -> ProbeOptions {
        ProbeOptions {
            servers: servers.to_vec(),
            local_port,
            timeout: Duration::from_secs(2),
            hello: Vec::new(),
            listen: Duration::ZERO,
        }
    }

    /// The `rally-lab stun-probe` arguments that mean these options.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "stun-probe".to_owned(),
            "--servers".to_owned(),
            join(&self.servers),
            "--local-port".to_owned(),
            self.local_port.to_string(),
            "--timeout-ms".to_owned(),
            self.timeout.as_millis().to_string(),
        ];
        if !self.hello.is_empty() {
            args.extend(["--hello".to_owned(), join(&self.hello)]);
        }
        if !self.listen.is_zero() {
            args.extend([
                "--listen-ms".to_owned(),
                self.listen.as_millis().to_string(),
            ]);
        }
        args
    }
}

/// Answers binding requests on `listen` forever. Calls `ready` once the socket is bound.
pub fn serve(listen: SocketAddr, ready: impl FnOnce(SocketAddr)) -> io::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    let local = sock.local_addr()?;
    ready(local);
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Ok(req) = BindingRequest::decode(&buf[..n]) else {
            continue;
        };
        let resp = BindingResponse {
            txid: req.txid,
            mapped: from,
            other: None,
            origin: Some(local),
        };
        // A send failing (e.g. no route for a moment) is the client's retransmit to handle.
        let _ = sock.send_to(&resp.encode(), from);
    }
}

/// Runs the probe described by `opts`, handing each event to `emit` as it happens.
pub fn probe(opts: &ProbeOptions, mut emit: impl FnMut(&ProbeEvent)) -> io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", opts.local_port))?;
    let (results, early) = bind_phase(&sock, opts)?;
    emit(&ProbeEvent::Mapped {
        local_port: opts.local_port,
        results,
    });
    early.iter().for_each(&mut emit);
    for to in &opts.hello {
        let _ = sock.send_to(b"hello", to);
    }
    listen_phase(&sock, opts.listen, &mut emit)?;
    emit(&ProbeEvent::Done);
    Ok(())
}

/// Sends a binding request to every server (retransmitting) until each has answered or
/// `opts.timeout` passes. Returns one result per server and the non-STUN datagrams that
/// arrived meanwhile, as `Received` events.
fn bind_phase(
    sock: &UdpSocket,
    opts: &ProbeOptions,
) -> io::Result<(Vec<ProbeResult>, Vec<ProbeEvent>)> {
    let mut seed = txid_seed();
    let requests: Vec<BindingRequest> = opts
        .servers
        .iter()
        .map(|_| BindingRequest {
            txid: next_txid(&mut seed),
            change_ip: false,
            change_port: false,
        })
        .collect();
    let mut results: Vec<ProbeResult> = opts
        .servers
        .iter()
        .map(|&server| ProbeResult {
            server,
            mapped: None,
            rtt_ms: None,
        })
        .collect();
    let mut early = Vec::new();
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut next_send = start;
    let mut buf = [0u8; 2048];
    while results.iter().any(|r| r.mapped.is_none()) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if now >= next_send {
            for (req, r) in requests.iter().zip(&results) {
                if r.mapped.is_none() {
                    // A send error (ICMP unreachable from an earlier try) counts as no answer.
                    let _ = sock.send_to(&req.encode(), r.server);
                }
            }
            next_send = now + RETRANSMIT;
        }
        let wait = next_send.min(deadline).saturating_duration_since(now);
        let Some((n, from)) = recv_timeout(sock, &mut buf, wait)? else {
            continue;
        };
        let data = &buf[..n];
        if !codec::is_stun(data) {
            early.push(received(from, data));
            continue;
        }
        let Ok(resp) = BindingResponse::decode(data) else {
            continue;
        };
        if let Some(i) = requests.iter().position(|q| q.txid == resp.txid) {
            if results[i].mapped.is_none() {
                results[i].mapped = Some(resp.mapped);
                results[i].rtt_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok((results, early))
}

/// Hands every non-STUN datagram that arrives within `listen` to `emit`.
fn listen_phase(
    sock: &UdpSocket,
    listen: Duration,
    emit: &mut impl FnMut(&ProbeEvent),
) -> io::Result<()> {
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + listen;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        if let Some((n, from)) = recv_timeout(sock, &mut buf, left)? {
            if !codec::is_stun(&buf[..n]) {
                emit(&received(from, &buf[..n]));
            }
        }
    }
}

/// Sends `payload` `count` times from local port `from_port` (0: any) to `to`, `interval` apart.
pub fn send(
    from_port: u16,
    to: SocketAddr,
    payload: &str,
    count: u32,
    interval: Duration,
) -> io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", from_port))?;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        sock.send_to(payload.as_bytes(), to)?;
    }
    Ok(())
}

/// A `rally-lab stun-server` running on a lab host.
pub struct StunServer {
    proc: Proc,
    addr: SocketAddr,
}

impl StunServer {
    /// Starts `rally-lab stun-server` on `host` at its address, port [`STUN_PORT`], and waits
    /// until it listens.
    pub fn start(host: &Host) -> Result<StunServer> {
        let addr = SocketAddr::from((host.ip(), STUN_PORT));
        let bin = bins::rally_lab()?;
        let proc = host.spawn(
            &[
                bin.to_string_lossy().as_ref(),
                "stun-server",
                "--listen",
                &addr.to_string(),
            ],
            host.log_path("stun-server"),
        )?;
        wait_until(
            &format!("the STUN server on {} to listen", host.name()),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                if !proc.is_running() {
                    bail!(
                        "stun-server exited:\n{}",
                        proc.log_text().unwrap_or_default()
                    );
                }
                Ok(proc.log_text()?.contains(LISTENING))
            },
        )?;
        Ok(StunServer { proc, addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process.
    pub fn proc(&self) -> &Proc {
        &self.proc
    }
}

/// The line `stun-server` prints once bound.
pub fn listening_line(addr: SocketAddr) -> String {
    format!("{LISTENING} {addr}")
}

/// Runs `rally-lab stun-probe` on `host` to completion; returns its events.
pub fn run_probe(host: &Host, opts: &ProbeOptions) -> Result<Vec<ProbeEvent>> {
    let bin = bins::rally_lab()?;
    let mut args = vec![bin.to_string_lossy().into_owned()];
    args.extend(opts.to_args());
    let timeout = opts.timeout + opts.listen + Duration::from_secs(10);
    let out = host.run_timeout(&args, timeout)?;
    crate::host::check_success(&out, "rally-lab stun-probe")?;
    parse_events(&String::from_utf8_lossy(&out.stdout))
}

/// A `rally-lab stun-probe` running in the background on a lab host.
pub struct RunningProbe {
    proc: Proc,
    opts: ProbeOptions,
}

impl RunningProbe {
    /// Starts `rally-lab stun-probe` with `opts` on `host`.
    pub fn start(host: &Host, opts: &ProbeOptions) -> Result<RunningProbe> {
        let bin = bins::rally_lab()?;
        let mut args = vec![bin.to_string_lossy().into_owned()];
        args.extend(opts.to_args());
        let log = host.log_path(&format!("stun-probe-{}", opts.local_port));
        let proc = host.spawn(&args, log)?;
        Ok(RunningProbe {
            proc,
            opts: opts.clone(),
        })
    }

    /// The events printed so far.
    pub fn events(&self) -> Result<Vec<ProbeEvent>> {
        parse_events(&self.proc.log_text()?)
    }

    /// Waits for the binding phase; returns each server's result.
    pub fn wait_mapped(&self) -> Result<Vec<ProbeResult>> {
        let mut found = None;
        wait_until(
            "the probe's binding phase",
            self.opts.timeout + Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                found = self.events()?.into_iter().find_map(|e| match e {
                    ProbeEvent::Mapped { results, .. } => Some(results),
                    _ => None,
                });
                Ok(found.is_some())
            },
        )?;
        found.ok_or_else(|| anyhow!("no mapped event"))
    }

    /// Waits for the probe to finish; returns the datagrams it received (sender, payload).
    pub fn wait_done(&self) -> Result<Vec<(SocketAddr, String)>> {
        wait_until(
            "the probe to finish",
            self.opts.timeout + self.opts.listen + Duration::from_secs(10),
            Duration::from_millis(20),
            || Ok(self.events()?.contains(&ProbeEvent::Done)),
        )?;
        Ok(self
            .events()?
            .into_iter()
            .filter_map(|e| match e {
                ProbeEvent::Received { from, payload } => Some((from, payload)),
                _ => None,
            })
            .collect())
    }
}

/// Runs `rally-lab udp-send` on `host`: `payload` from local port `from_port` to `to`, `count`
/// times 50 ms apart.
pub fn udp_send(
    host: &Host,
    from_port: u16,
    to: SocketAddr,
    payload: &str,
    count: u32,
) -> Result<()> {
    let bin = bins::rally_lab()?;
    host.run_ok(&[
        bin.to_string_lossy().as_ref(),
        "udp-send",
        "--from-port",
        &from_port.to_string(),
        "--to",
        &to.to_string(),
        "--payload",
        payload,
        "--count",
        &count.to_string(),
    ])
    .map(|_| ())
}

/// The events among `text`'s lines (other lines, such as log headers, are skipped).
pub fn parse_events(text: &str) -> Result<Vec<ProbeEvent>> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad probe output line {l:?}")))
        .collect()
}

/// Comma-separated addresses.
fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn received(from: SocketAddr, data: &[u8]) -> ProbeEvent {
    ProbeEvent::Received {
        from,
        payload: String::from_utf8_lossy(data).into_owned(),
    }
}

/// Receives one datagram, waiting at most `wait` (`None` when nothing came).
fn recv_timeout(
    sock: &UdpSocket,
    buf: &mut [u8],
    wait: Duration,
) -> io::Result<Option<(usize, SocketAddr)>> {
    sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
    match sock.recv_from(buf) {
        Ok(got) => Ok(Some(got)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::Interrupted
                    // ICMP port unreachable from an earlier send.
                    | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A seed for transaction ids: this is a test tool, not a protocol implementation, so the
/// clock and pid are enough to keep two probes apart.
fn txid_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

fn next_txid(seed: &mut u64) -> codec::TxId {
    let mut txid = [0u8; 12];
    for chunk in txid.chunks_mut(4) {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        chunk.copy_from_slice(&((*seed >> 32) as u32).to_be_bytes());
    }
    txid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_options_become_arguments() {
        let mut opts = ProbeOptions::new(
            &[
                "198.51.100.10:3478".parse().unwrap(),
                "198.51.100.11:3478".parse().unwrap(),
            ],
            40000,
        );
        assert_eq!(
            opts.to_args().join(" "),
            "stun-probe --servers 198.51.100.10:3478,198.51.100.11:3478 --local-port 40000 \
             --timeout-ms 2000"
        );
        opts.hello = vec!["198.51.100.12:9000".parse().unwrap()];
        opts.listen = Duration::from_millis(1500);
        assert!(opts
            .to_args()
            .join(" ")
            .ends_with("--hello 198.51.100.12:9000 --listen-ms 1500"));
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        let events = vec![
            ProbeEvent::Mapped {
                local_port: 40000,
                results: vec![ProbeResult {
                    server: "198.51.100.10:3478".parse().unwrap(),
                    mapped: Some("198.51.100.100:40000".parse().unwrap()),
                    rtt_ms: Some(81.5),
                }],
            },
            ProbeEvent::Received {
                from: "198.51.100.12:9000".parse().unwrap(),
                payload: "hi".into(),
            },
            ProbeEvent::Done,
        ];
        let mut text = String::from("===== lab: starting `rally-lab stun-probe` =====\n");
        for e in &events {
            text.push_str(&serde_json::to_string(e).unwrap());
            text.push('\n');
        }
        assert_eq!(parse_events(&text).unwrap(), events);
        assert!(text.contains(r#""event":"mapped""#), "{text}");
    }

    #[test]
    fn server_and_probe_agree_over_loopback() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            serve("127.0.0.1:0".parse().unwrap(), |a| tx.send(a).unwrap()).unwrap();
        });
        let server = rx.recv().unwrap();
        let local = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = local.local_addr().unwrap().port();
        drop(local);
        let mut events = Vec::new();
        let mut opts = ProbeOptions::new(&[server], port);
        opts.timeout = Duration::from_secs(5);
        probe(&opts, |e| events.push(e.clone())).unwrap();
        let ProbeEvent::Mapped { results, .. } = &events[0] else {
            panic!("{events:?}");
        };
        assert_eq!(results[0].mapped.map(|m| m.port()), Some(port));
        assert_eq!(events.last(), Some(&ProbeEvent::Done));
    }

    #[test]
    fn transaction_ids_differ() {
        let mut seed = 1;
        assert_ne!(next_txid(&mut seed), next_txid(&mut seed));
    }
}

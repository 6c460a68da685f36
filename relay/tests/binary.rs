//! The real `rally-relay` binary on 127.0.0.1, driven over real UDP sockets.
// These tests drive the real binary in real time: the sans-IO clock rule is for the library.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rally_proto::relay::{
    bind_transcript, short_id, RelayErrorCode, RelayMsg, ShortId, DOMAIN_BIND,
};
use rally_proto::stun::{BindingRequest, BindingResponse};
use rally_proto::{Identity, RelayToken};

const PARTY_X: [u8; 8] = *b"party-x!";
const PARTY_Y: [u8; 8] = *b"party-y!";

#[test]
fn two_agents_in_one_party_exchange_packets() {
    let relay = RelayProc::start(&[]);
    let (a, b) = (Agent::new(1), Agent::new(2));
    assert_eq!(a.bind(&relay, &[PARTY_X]), Ok(a.addr()));
    assert_eq!(b.bind(&relay, &[PARTY_X]), Ok(b.addr()));

    for i in 0..20u8 {
        a.send(&relay, &b, &[i; 100]);
        let got = b.recv().expect("b receives a's packet");
        assert_eq!(
            RelayMsg::decode(&got),
            Ok(RelayMsg::Deliver {
                from: a.short(),
                payload: &[i; 100]
            })
        );
        b.send(&relay, &a, b"ack");
        let got = a.recv().expect("a receives b's answer");
        assert_eq!(
            RelayMsg::decode(&got),
            Ok(RelayMsg::Deliver {
                from: b.short(),
                payload: b"ack"
            })
        );
    }

    let m = relay.metrics();
    assert_eq!(metric(&m, "rally_relay_packets_forwarded_total"), Some(40));
    assert_eq!(metric(&m, "rally_relay_sessions_active"), Some(2));
    assert_eq!(metric(&m, "rally_relay_sessions_total"), Some(2));
}

#[test]
fn a_gso_train_of_sends_arrives_as_delivers_in_order() {
    let relay = RelayProc::start(&[]);
    let (a, b) = (Agent::new(1), Agent::new(2));
    assert!(a.bind(&relay, &[PARTY_X]).is_ok());
    assert!(b.bind(&relay, &[PARTY_X]).is_ok());

    // One sendmsg with UDP_SEGMENT: the relay's socket (UDP_GRO) reads it as one train.
    let payloads: Vec<[u8; 200]> = (0..40u8).map(|i| [i; 200]).collect();
    let sends: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| {
            RelayMsg::Send {
                to: b.short(),
                payload: p,
            }
            .to_vec()
        })
        .collect();
    a.send_train(&relay, &sends);

    for p in &payloads {
        let got = b.recv().expect("b receives every datagram of the train");
        assert_eq!(
            RelayMsg::decode(&got),
            Ok(RelayMsg::Deliver {
                from: a.short(),
                payload: p
            })
        );
    }
    let m = relay.metrics();
    assert_eq!(metric(&m, "rally_relay_packets_forwarded_total"), Some(40));
}

#[test]
fn a_train_with_refused_datagrams_forwards_the_others_and_counts_the_rest() {
    let relay = RelayProc::start(&[]);
    let (a, b, y) = (Agent::new(1), Agent::new(2), Agent::new(3));
    assert!(a.bind(&relay, &[PARTY_X]).is_ok());
    assert!(b.bind(&relay, &[PARTY_X]).is_ok());
    assert!(y.bind(&relay, &[PARTY_Y]).is_ok());

    // Every third datagram is for y, in another party.
    let sends: Vec<Vec<u8>> = (0..30u8)
        .map(|i| {
            let to = if i % 3 == 1 { y.short() } else { b.short() };
            RelayMsg::Send {
                to,
                payload: &[i; 100],
            }
            .to_vec()
        })
        .collect();
    a.send_train(&relay, &sends);

    for i in (0..30u8).filter(|i| i % 3 != 1) {
        let got = b.recv().expect("b receives its datagrams");
        assert_eq!(
            RelayMsg::decode(&got),
            Ok(RelayMsg::Deliver {
                from: a.short(),
                payload: &[i; 100]
            })
        );
    }
    assert_eq!(y.recv_within(Duration::from_millis(300)), None);
    let m = relay.metrics();
    assert_eq!(metric(&m, "rally_relay_packets_forwarded_total"), Some(20));
    assert_eq!(
        metric(&m, "rally_relay_drops_total{reason=\"no_shared_party\"}"),
        Some(10)
    );
}

#[test]
fn member_of_party_x_cannot_reach_member_of_party_y() {
    let relay = RelayProc::start(&[]);
    let (x, y) = (Agent::new(1), Agent::new(2));
    assert!(x.bind(&relay, &[PARTY_X]).is_ok());
    assert!(y.bind(&relay, &[PARTY_Y]).is_ok());

    x.send(&relay, &y, b"let me in");

    assert_eq!(x.recv_relay_error(), Some(RelayErrorCode::PeerUnavailable));
    assert_eq!(
        y.recv_within(Duration::from_millis(500)),
        None,
        "y got a packet from another party"
    );
    y.send(&relay, &x, b"nor me");
    assert_eq!(
        x.recv_within(Duration::from_millis(500)),
        None,
        "x got a packet from another party"
    );
    let m = relay.metrics();
    assert_eq!(metric(&m, "rally_relay_packets_forwarded_total"), Some(0));
    assert_eq!(
        metric(&m, "rally_relay_drops_total{reason=\"no_shared_party\"}"),
        Some(2)
    );
}

#[test]
fn garbage_is_dropped_and_the_relay_keeps_serving() {
    let relay = RelayProc::start(&[]);
    let junk = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let garbage: [&[u8]; 5] = [
        b"",
        b"\xff\xff\xff",
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x52, 0x4c, 99, 0],
        &[0u8; 1400],
    ];
    for g in garbage {
        junk.send_to(g, relay.addr).expect("send");
    }

    // Still serving: binding and STUN work afterwards.
    let a = Agent::new(1);
    assert_eq!(a.bind(&relay, &[PARTY_X]), Ok(a.addr()));
    let resp = a.stun(&relay, false);
    assert_eq!(resp.mapped, a.addr());

    let m = relay.metrics();
    let garbage_drops =
        metric(&m, "rally_relay_drops_total{reason=\"garbage\"}").expect("a garbage counter");
    assert_eq!(garbage_drops, garbage.len() as u64, "metrics:\n{m}");
    assert_eq!(metric(&m, "rally_relay_stun_requests_total"), Some(1));
}

#[test]
fn per_ip_session_limit_holds() {
    let relay = RelayProc::start(&["--max-sessions-per-ip", "2"]);
    let agents: Vec<Agent> = (1..=3).map(Agent::new).collect();

    let results: Vec<_> = agents.iter().map(|a| a.bind(&relay, &[PARTY_X])).collect();

    assert_eq!(
        results,
        [
            Ok(agents[0].addr()),
            Ok(agents[1].addr()),
            Err(RelayErrorCode::LimitReached)
        ]
    );
    let m = relay.metrics();
    assert_eq!(metric(&m, "rally_relay_sessions_active"), Some(2));
    assert_eq!(metric(&m, "rally_relay_sessions_refused_total"), Some(1));
    assert_eq!(
        metric(&m, "rally_relay_drops_total{reason=\"limit_per_ip\"}"),
        Some(1)
    );
}

#[test]
fn stunclient_gets_the_mapped_address() {
    let relay = RelayProc::start(&[]);
    // stunclient reads the socket itself: it gets a socket of its own.
    let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let mut client = stunclient::StunClient::new(relay.addr);
    client.set_timeout(Duration::from_secs(5));

    let mapped = client.query_external_address(&sock).expect("a STUN answer");

    assert_eq!(mapped, sock.local_addr().expect("an address"));
    assert_eq!(
        metric(&relay.metrics(), "rally_relay_stun_requests_total"),
        Some(1)
    );
}

#[test]
fn stun_change_port_is_answered_from_the_alt_port() {
    let alt_port = free_udp_port();
    let relay = RelayProc::start(&["--alt-port", &alt_port.to_string()]);
    let alt: SocketAddr = SocketAddr::new(relay.addr.ip(), alt_port);
    let a = Agent::new(1);

    let same = a.stun(&relay, false);
    let changed = a.stun(&relay, true);

    assert_eq!(same.mapped, a.addr());
    assert_eq!((same.origin, same.other), (Some(relay.addr), Some(alt)));
    assert_eq!(changed.mapped, a.addr());
    assert_eq!((changed.origin, changed.other), (Some(alt), Some(alt)));
}

#[test]
fn bad_flags_are_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--control-key",
            "not-a-key",
        ])
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
        .args(["serve", "--control-key", &control().public().to_string()])
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2), "--listen is required");
    let key = control().public().to_string();
    for pause in ["5000", "-1", "soon"] {
        let out = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
            .args(["serve", "--listen", "127.0.0.1:0", "--control-key", &key])
            .arg(format!("--coalesce-us={pause}"))
            .output()
            .expect("the binary runs");
        assert_eq!(out.status.code(), Some(2), "--coalesce-us {pause}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--coalesce-us"), "{stderr}");
    }
}

#[test]
fn a_busy_port_is_one_error_line_and_exit_1() {
    let taken = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    let addr = taken.local_addr().expect("an address").to_string();

    let out = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
        .args([
            "serve",
            "--listen",
            &addr,
            "--control-key",
            &control().public().to_string(),
        ])
        .output()
        .expect("the binary runs");

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(&addr),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_the_relay_cleanly() {
    let mut relay = RelayProc::start(&[]);
    let status = Command::new("kill")
        .args(["-TERM", &relay.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());

    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = relay.child.try_wait().expect("waitable") {
            break s.code();
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0), "log:\n{}", relay.log());
}

// --- helpers --------------------------------------------------------------------------------

fn control() -> Identity {
    Identity::from_seed([77; 32])
}

/// A running `rally-relay serve`, killed on drop.
struct RelayProc {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl RelayProc {
    fn start(extra: &[&str]) -> RelayProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(["--control-key", &control().public().to_string()])
            .args(extra)
            .env("RALLY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rally-relay starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        // Keep draining stderr for the whole run so the relay never blocks on a full pipe.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        let mut proc = RelayProc {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            metrics: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
        };
        let (mut addr, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while addr.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!("relay did not start; log:\n{}", proc.log());
            };
            addr = addr.or_else(|| address_after(&line, "relay listening on "));
            metrics = metrics.or_else(|| address_after(&line, "metrics listening on "));
        }
        proc.addr = addr.expect("an address");
        proc.metrics = metrics.expect("a metrics address");
        proc
    }

    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The body of `GET /metrics`.
    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("metrics connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
            .expect("request");
        let mut response = String::new();
        s.read_to_string(&mut response).expect("response");
        let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The value of the sample `name` (with its labels, exactly as exposed).
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    s.local_addr().expect("an address").port()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// An agent's side of the relay protocol on its own UDP socket.
struct Agent {
    id: Identity,
    sock: UdpSocket,
}

impl Agent {
    fn new(seed: u8) -> Agent {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        Agent {
            id: Identity::from_seed([seed; 32]),
            sock,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("an address")
    }

    fn short(&self) -> ShortId {
        short_id(&self.id.public())
    }

    /// Challenge, then bind; the observed address or the relay's error.
    fn bind(&self, relay: &RelayProc, parties: &[[u8; 8]]) -> Result<SocketAddr, RelayErrorCode> {
        self.sock
            .send_to(&RelayMsg::BindRequest.to_vec(), relay.addr)
            .expect("send");
        let reply = self.recv().expect("a challenge");
        let Ok(RelayMsg::BindChallenge { cookie }) = RelayMsg::decode(&reply) else {
            panic!("not a challenge: {reply:?}");
        };
        let token = RelayToken {
            agent: self.id.public(),
            expires_at: unix_now() + 3600,
            parties: parties.to_vec(),
        }
        .sign(&control());
        let bind = RelayMsg::Bind {
            cookie,
            signature: self.id.sign(DOMAIN_BIND, &bind_transcript(&cookie, &token)),
            token: &token,
        };
        self.sock.send_to(&bind.to_vec(), relay.addr).expect("send");
        let reply = self.recv().expect("a bind answer");
        match RelayMsg::decode(&reply) {
            Ok(RelayMsg::BindOk { observed, .. }) => Ok(observed),
            Ok(RelayMsg::Error { code, .. }) => Err(code),
            other => panic!("unexpected bind answer {other:?}"),
        }
    }

    fn send(&self, relay: &RelayProc, to: &Agent, payload: &[u8]) {
        let msg = RelayMsg::Send {
            to: to.short(),
            payload,
        };
        self.sock.send_to(&msg.to_vec(), relay.addr).expect("send");
    }

    /// Sends equal-sized datagrams in one UDP GSO `sendmsg`.
    fn send_train(&self, relay: &RelayProc, datagrams: &[Vec<u8>]) {
        let segment = datagrams.first().map_or(0, Vec::len);
        assert!(datagrams.iter().all(|d| d.len() == segment));
        let contents = datagrams.concat();
        let state = quinn_udp::UdpSocketState::new((&self.sock).into()).expect("udp state");
        assert!(state.max_gso_segments() >= datagrams.len(), "no GSO here");
        // quinn-udp made the socket non-blocking; the helpers here wait on it.
        self.sock.set_nonblocking(false).expect("blocking");
        state
            .send(
                (&self.sock).into(),
                &quinn_udp::Transmit {
                    destination: relay.addr,
                    ecn: None,
                    contents: &contents,
                    segment_size: Some(segment),
                    src_ip: None,
                },
            )
            .expect("a GSO send");
    }

    fn stun(&self, relay: &RelayProc, change_port: bool) -> BindingResponse {
        let req = BindingRequest {
            txid: [9; 12],
            change_ip: false,
            change_port,
        };
        self.sock.send_to(&req.encode(), relay.addr).expect("send");
        let reply = self.recv().expect("a STUN response");
        BindingResponse::decode(&reply).expect("a binding response")
    }

    fn recv(&self) -> Option<Vec<u8>> {
        self.recv_within(Duration::from_secs(3))
    }

    fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 2048];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    }

    fn recv_relay_error(&self) -> Option<RelayErrorCode> {
        match RelayMsg::decode(&self.recv()?) {
            Ok(RelayMsg::Error { code, .. }) => Some(code),
            _ => None,
        }
    }
}

#[test]
fn a_control_key_starting_with_a_hyphen_is_accepted() {
    // Base64url keys start with '-' one time in 64; clap must not take it for a flag. The port
    // is held, so a key that parses ends in the bind error (exit 1), a misparse in a usage
    // error (exit 2).
    let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let key = format!("-{}", "A".repeat(42));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rally-relay"))
        .args(["serve", "--listen", &addr, "--control-key", &key])
        .output()
        .expect("run rally-relay");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
}

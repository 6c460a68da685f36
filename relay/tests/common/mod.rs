//! What the tests of the real `rally-relay` binary share: the relay process, an agent on a UDP
//! socket speaking the real protocol, tokens and metrics.
// Each test binary uses a part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rally_proto::relay::{
    bind_transcript, short_id, RelayErrorCode, RelayMsg, ShortId, DOMAIN_BIND,
};
use rally_proto::stun::{BindingRequest, BindingResponse};
use rally_proto::{Identity, Key32, RelayToken};

pub const PARTY_X: [u8; 8] = *b"party-x!";
pub const PARTY_Y: [u8; 8] = *b"party-y!";

/// The control plane's identity: it signs the tokens the relay is told to trust.
pub fn control() -> Identity {
    Identity::from_seed([77; 32])
}

/// A relay token for `agent`, signed by [`control`].
pub fn token(agent: &Identity, expires_at: u64, parties: &[[u8; 8]]) -> Vec<u8> {
    RelayToken {
        agent: agent.public(),
        expires_at,
        parties: parties.to_vec(),
    }
    .sign(&control())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

pub fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The value of the sample `name` (with its labels, exactly as exposed).
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    s.local_addr().expect("an address").port()
}

/// A running `rally-relay serve`, killed on drop.
pub struct RelayProc {
    pub child: Child,
    /// The UDP address.
    pub addr: SocketAddr,
    /// The TLS/TCP address, with [`RelayProc::start_tcp`].
    tcp: Option<SocketAddr>,
    pub metrics: SocketAddr,
    log: Arc<Mutex<String>>,
    /// The TLS key file, removed on drop.
    key_file: Option<PathBuf>,
}

impl RelayProc {
    /// A relay on UDP only, with `extra` flags.
    pub fn start(extra: &[&str]) -> RelayProc {
        RelayProc::spawn(extra, None)
    }

    /// A relay that also listens on TLS/TCP, with a key made by `rally-relay tls-key`.
    pub fn start_tcp() -> RelayProc {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let key_file =
            std::env::temp_dir().join(format!("rally-relay-tls-{}-{nanos}", std::process::id()));
        let out = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
            .arg("tls-key")
            .arg(&key_file)
            .output()
            .expect("rally-relay tls-key runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = key_file.to_str().expect("a UTF-8 temp path").to_string();
        RelayProc::spawn(
            &["--listen-tcp", "127.0.0.1:0", "--tls-key", &key],
            Some(key_file),
        )
    }

    fn spawn(extra: &[&str], key_file: Option<PathBuf>) -> RelayProc {
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
        let unset = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut proc = RelayProc {
            child,
            addr: unset,
            tcp: None,
            metrics: unset,
            log,
            key_file,
        };
        let want_tcp = proc.key_file.is_some();
        let (mut addr, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while addr.is_none() || metrics.is_none() || (want_tcp && proc.tcp.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                panic!("relay did not start; log:\n{}", proc.log());
            };
            addr = addr.or_else(|| address_after(&line, "relay listening on "));
            proc.tcp = proc
                .tcp
                .or_else(|| address_after(&line, "relay listening on tcp "));
            metrics = metrics.or_else(|| address_after(&line, "metrics listening on "));
        }
        proc.addr = addr.expect("an address");
        proc.metrics = metrics.expect("a metrics address");
        proc
    }

    /// The TLS/TCP address (a relay from [`RelayProc::start_tcp`]).
    pub fn tcp(&self) -> SocketAddr {
        self.tcp.expect("a relay started with --listen-tcp")
    }

    /// The public key of the relay's TLS key (a relay from [`RelayProc::start_tcp`]).
    pub fn tls_public(&self) -> Key32 {
        let file = self.key_file.as_ref().expect("a TLS key file");
        let seed = rally_proto::keyfile::read(file).expect("the key file");
        Identity::from_seed(seed).public()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// The body of `GET /metrics`.
    pub fn metrics(&self) -> String {
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

    /// The metrics once `ok` holds for them (or after 20 s, for the assertions to say why).
    pub fn metrics_when(&self, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.metrics();
            if ok(&m) || Instant::now() > deadline {
                return m;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(file) = &self.key_file {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// An agent's side of the relay protocol on its own UDP socket.
pub struct Agent {
    pub id: Identity,
    pub sock: UdpSocket,
}

impl Agent {
    pub fn new(seed: u8) -> Agent {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        Agent {
            id: Identity::from_seed([seed; 32]),
            sock,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("an address")
    }

    pub fn short(&self) -> ShortId {
        short_id(&self.id.public())
    }

    /// Challenge, then bind; the observed address or the relay's error.
    pub fn bind(
        &self,
        relay: &RelayProc,
        parties: &[[u8; 8]],
    ) -> Result<SocketAddr, RelayErrorCode> {
        self.sock
            .send_to(&RelayMsg::BindRequest.to_vec(), relay.addr)
            .expect("send");
        let reply = self.recv().expect("a challenge");
        let Ok(RelayMsg::BindChallenge { cookie }) = RelayMsg::decode(&reply) else {
            panic!("not a challenge: {reply:?}");
        };
        let token = token(&self.id, unix_now() + 3600, parties);
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

    /// A `Send` to the agent with short id `to`.
    pub fn send(&self, relay: &RelayProc, to: &ShortId, payload: &[u8]) {
        let msg = RelayMsg::Send { to: *to, payload };
        self.sock.send_to(&msg.to_vec(), relay.addr).expect("send");
    }

    /// Sends equal-sized datagrams in one UDP GSO `sendmsg`.
    pub fn send_train(&self, relay: &RelayProc, datagrams: &[Vec<u8>]) {
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

    pub fn stun(&self, relay: &RelayProc, change_port: bool) -> BindingResponse {
        let req = BindingRequest {
            txid: [9; 12],
            change_ip: false,
            change_port,
        };
        self.sock.send_to(&req.encode(), relay.addr).expect("send");
        let reply = self.recv().expect("a STUN response");
        BindingResponse::decode(&reply).expect("a binding response")
    }

    pub fn recv(&self) -> Option<Vec<u8>> {
        self.recv_within(Duration::from_secs(3))
    }

    pub fn recv_within(&self, wait: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 2048];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    }

    pub fn recv_relay_error(&self) -> Option<RelayErrorCode> {
        match RelayMsg::decode(&self.recv()?) {
            Ok(RelayMsg::Error { code, .. }) => Some(code),
            _ => None,
        }
    }
}

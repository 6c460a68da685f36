//! The real `rally-relay` binary on 127.0.0.1, driven over real UDP sockets.
// These tests drive the real binary in real time: the sans-IO clock rule is for the library.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rally_proto::relay::{RelayErrorCode, RelayMsg};

#[test]
fn two_agents_in_one_party_exchange_packets() {
    let relay = RelayProc::start(&[]);
    let (a, b) = (Agent::new(1), Agent::new(2));
    assert_eq!(a.bind(&relay, &[PARTY_X]), Ok(a.addr()));
    assert_eq!(b.bind(&relay, &[PARTY_X]), Ok(b.addr()));

    for i in 0..20u8 {
        a.send(&relay, &b.short(), &[i; 100]);
        let got = b.recv().expect("b receives a's packet");
        assert_eq!(
            RelayMsg::decode(&got),
            Ok(RelayMsg::Deliver {
                from: a.short(),
                payload: &[i; 100]
            })
        );
        b.send(&relay, &a.short(), b"ack");
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

    x.send(&relay, &y.short(), b"let me in");

    assert_eq!(x.recv_relay_error(), Some(RelayErrorCode::PeerUnavailable));
    assert_eq!(
        y.recv_within(Duration::from_millis(500)),
        None,
        "y got a packet from another party"
    );
    y.send(&relay, &x.short(), b"nor me");
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

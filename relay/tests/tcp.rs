//! The real `rally-relay` binary on 127.0.0.1 with `--listen-tcp`: agents over TLS on TCP,
//! speaking the real protocol (pinned TLS 1.3, length-prefixed frames), next to agents over UDP.
// These tests drive the real binary in real time: the sans-IO clock rule is for the library.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use rally_proto::identity::verify_raw;
use rally_proto::relay::{
    bind_transcript, short_id, RelayErrorCode, RelayMsg, ShortId, DOMAIN_BIND,
};
use rally_proto::relay_stream::{write_frame, StreamDecoder, BIND_EXPORTER_LABEL};
use rally_proto::{Identity, Key32, RelayToken};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[test]
fn a_tcp_agent_and_a_udp_agent_of_one_party_exchange_packets_both_ways() {
    let relay = RelayProc::start_tcp();
    let mut t = TcpAgent::connect(&relay, 1, relay.tls_public());
    let u = Agent::new(2);
    assert!(t.bind(token(&t.id, unix_now() + 3600, &[PARTY_X])).is_ok());
    assert!(u.bind(&relay, &[PARTY_X]).is_ok());
    for i in 0..20u8 {
        t.send(&u.short(), &[i; 300]);
        let got = u
            .recv()
            .expect("the udp agent receives the tcp agent's packet");
        assert_eq!(
            RelayMsg::decode(&got),
            Ok(RelayMsg::Deliver {
                from: t.short(),
                payload: &[i; 300]
            })
        );
        u.send(&relay, &t.short(), b"ack");
        let got = t.recv().expect("the tcp agent receives the answer");
        assert_eq!(
            RelayMsg::decode(&got),
            Ok(RelayMsg::Deliver {
                from: u.short(),
                payload: b"ack"
            })
        );
    }
    let m = relay.metrics();
    assert_eq!(
        metric(&m, "rally_relay_tcp_packets_forwarded_total"),
        Some(40)
    );
    assert_eq!(metric(&m, "rally_relay_tcp_sessions_active"), Some(1));
    assert_eq!(metric(&m, "rally_relay_sessions_active"), Some(2));
}

#[test]
fn a_relay_holding_another_key_fails_the_pinned_tls_handshake() {
    let relay = RelayProc::start_tcp();
    let other = Identity::from_seed([5; 32]).public();
    let tcp = TcpStream::connect(relay.tcp()).expect("tcp connect");
    let mut tls = tls_client(tcp, other);
    let mut byte = [0u8; 1];
    assert!(tls.read(&mut byte).is_err(), "the handshake must fail");
}

#[test]
fn no_valid_expired_or_other_party_token_gets_a_frame_forwarded_over_tcp() {
    let relay = RelayProc::start_tcp();
    let victim = Agent::new(9);
    assert!(victim.bind(&relay, &[PARTY_X]).is_ok());

    // Signed by the attacker itself, not the control plane.
    let mut forged = TcpAgent::connect(&relay, 3, relay.tls_public());
    let bad = RelayToken {
        agent: forged.id.public(),
        expires_at: unix_now() + 3600,
        parties: vec![PARTY_X],
    }
    .sign(&forged.id);
    assert_eq!(forged.bind(bad), Err(RelayErrorCode::BadToken));
    forged.send(&victim.short(), b"forged");
    assert_eq!(forged.recv_error(), Some(RelayErrorCode::NotBound));

    let mut expired = TcpAgent::connect(&relay, 4, relay.tls_public());
    let old = token(&expired.id, unix_now() - 10, &[PARTY_X]);
    assert_eq!(expired.bind(old), Err(RelayErrorCode::TokenExpired));
    expired.send(&victim.short(), b"expired");

    let mut outsider = TcpAgent::connect(&relay, 5, relay.tls_public());
    assert!(outsider
        .bind(token(&outsider.id, unix_now() + 3600, &[PARTY_Y]))
        .is_ok());
    outsider.send(&victim.short(), b"outsider");
    assert_eq!(outsider.recv_error(), Some(RelayErrorCode::PeerUnavailable));

    assert_eq!(
        victim.recv_within(Duration::from_millis(500)),
        None,
        "nothing reached the victim"
    );
    let m = relay.metrics();
    assert_eq!(metric(&m, "rally_relay_packets_forwarded_total"), Some(0));
    assert_eq!(
        metric(&m, "rally_relay_drops_total{reason=\"no_shared_party\"}"),
        Some(1)
    );
    assert!(metric(&m, "rally_relay_drops_total{reason=\"not_bound\"}") >= Some(2));
}

#[test]
fn a_tcp_client_that_stops_reading_leaves_relay_memory_flat_and_drops_are_counted() {
    let relay = RelayProc::start_tcp();
    let mut slow = TcpAgent::connect(&relay, 6, relay.tls_public());
    let u = Agent::new(7);
    assert!(slow
        .bind(token(&slow.id, unix_now() + 3600, &[PARTY_X]))
        .is_ok());
    assert!(u.bind(&relay, &[PARTY_X]).is_ok());
    let before = relay.rss_kib();
    // 50 MB toward a client that reads nothing: all of it would have to be buffered.
    let payload = [0xab; 1000];
    for _ in 0..50 {
        for _ in 0..1000 {
            u.send(&relay, &slow.short(), &payload);
        }
        // Within the sender's session budgets (100 Mbit/s): about 8 MB/s.
        thread::sleep(Duration::from_millis(120));
    }
    let m = relay
        .metrics_when(|m| metric(m, "rally_relay_packets_forwarded_total").unwrap_or(0) >= 40_000);
    let after = relay.rss_kib();
    let drops = metric(&m, "rally_relay_tcp_queue_drops_total").unwrap_or(0);
    println!("relay RSS {before} KiB before, {after} KiB after 50 MB to a stalled reader; {drops} frames dropped");
    assert!(
        drops > 30_000,
        "the full queue drops the oldest frames: {drops}"
    );
    assert!(
        after < before + 16 * 1024,
        "relay memory grew from {before} KiB to {after} KiB"
    );
    // The stalled client's queue is still there and the relay still serves others.
    let v = Agent::new(8);
    assert!(v.bind(&relay, &[PARTY_X]).is_ok());
    u.send(&relay, &v.short(), b"still here");
    assert!(v.recv().is_some());
    drop(slow);
}

#[test]
fn an_agent_on_two_connections_gets_small_frames_on_both_and_a_third_evicts_the_oldest() {
    let relay = RelayProc::start_tcp();
    let u = Agent::new(2);
    assert!(u.bind(&relay, &[PARTY_X]).is_ok());
    let mut conns: Vec<TcpAgent> = (0..2)
        .map(|_| {
            let mut c = TcpAgent::connect(&relay, 1, relay.tls_public());
            let binding = c.channel_binding();
            let token = token(&c.id, unix_now() + 3600, &[PARTY_X]);
            assert!(c.bind_with(binding, &token).is_ok());
            c
        })
        .collect();
    assert_eq!(
        metric(&relay.metrics(), "rally_relay_tcp_sessions_active"),
        Some(2)
    );
    let deliver = |payload: &[u8]| {
        RelayMsg::Deliver {
            from: u.short(),
            payload,
        }
        .to_vec()
    };

    // Small WireGuard data arrives on both connections; bulk and anything else on the newer
    // only.
    u.send(&relay, &conns[0].short(), &wg(1, 200));
    u.send(&relay, &conns[0].short(), &wg(2, 1000));
    u.send(&relay, &conns[0].short(), b"not wireguard data");
    u.send(&relay, &conns[0].short(), &wg(3, 100));
    assert_eq!(
        conns[0].recv(),
        Some(deliver(&wg(1, 200))),
        "older: the copy"
    );
    assert_eq!(
        conns[0].recv(),
        Some(deliver(&wg(3, 100))),
        "older: no bulk"
    );
    assert_eq!(conns[1].recv(), Some(deliver(&wg(1, 200))));
    assert_eq!(conns[1].recv(), Some(deliver(&wg(2, 1000))));
    assert_eq!(conns[1].recv(), Some(deliver(b"not wireguard data")));
    assert_eq!(conns[1].recv(), Some(deliver(&wg(3, 100))));
    // Both connections send for the agent.
    for c in &mut conns {
        c.send(&u.short(), b"up");
        assert!(u.recv().is_some(), "the udp agent hears each connection");
    }

    // A third connection of the same agent evicts the oldest.
    let mut third = TcpAgent::connect(&relay, 1, relay.tls_public());
    let binding = third.channel_binding();
    let t = token(&third.id, unix_now() + 3600, &[PARTY_X]);
    assert!(third.bind_with(binding, &t).is_ok());
    assert_eq!(
        metric(&relay.metrics(), "rally_relay_tcp_sessions_active"),
        Some(2)
    );
    u.send(&relay, &third.short(), &wg(4, 200));
    assert_eq!(third.recv(), Some(deliver(&wg(4, 200))));
    assert_eq!(conns[1].recv(), Some(deliver(&wg(4, 200))));
    conns[0].send(&u.short(), b"evicted");
    assert_eq!(conns[0].recv_error(), Some(RelayErrorCode::NotBound));

    // The newest closes: everything goes on the one left.
    drop(third);
    let m = relay.metrics_when(|m| metric(m, "rally_relay_tcp_sessions_active") == Some(1));
    assert_eq!(metric(&m, "rally_relay_tcp_sessions_active"), Some(1));
    u.send(&relay, &conns[1].short(), &wg(5, 1000));
    assert_eq!(conns[1].recv(), Some(deliver(&wg(5, 1000))));
}

// --- helpers --------------------------------------------------------------------------------

/// Accepts only a server whose TLS 1.3 handshake signature is by the pinned key.
#[derive(Debug)]
struct Pinned(Key32);

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no TLS 1.2".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        _: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_raw(&self.0, message, dss.signature())
            .map(|()| HandshakeSignatureValid::assertion())
            .map_err(|_| rustls::Error::General("not the pinned key".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[test]
fn a_bind_over_the_connections_channel_binding_needs_no_challenge_and_no_other_connection_may_use_it(
) {
    let relay = RelayProc::start_tcp();
    let mut t = TcpAgent::connect(&relay, 1, relay.tls_public());
    let binding = t.channel_binding();
    let token = token(&t.id, unix_now() + 3600, &[PARTY_X]);
    // The first frame back answers the bind: no challenge came in between.
    assert!(t.bind_with(binding, &token).is_ok());

    let mut other = TcpAgent::connect(&relay, 1, relay.tls_public());
    assert_ne!(other.channel_binding(), binding);
    assert_eq!(
        other.bind_with(binding, &token),
        Err(RelayErrorCode::BadCookie)
    );
    assert_eq!(
        metric(&relay.metrics(), "rally_relay_tcp_sessions_active"),
        Some(1)
    );
}

/// A WireGuard data message of `len` bytes, its counter byte `n`.
fn wg(n: u8, len: usize) -> Vec<u8> {
    let mut d = vec![n; len];
    d[..4].copy_from_slice(&[4, 0, 0, 0]);
    d
}

fn tls_client(
    tcp: TcpStream,
    key: Key32,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned(key)))
        .with_no_client_auth();
    config.alpn_protocols = vec![rally_relay::tls::ALPN.to_vec()];
    let name = ServerName::try_from(rally_relay::tls::SERVER_NAME).expect("a name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a client");
    tcp.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

/// An agent's side of the relay protocol over TLS on TCP.
struct TcpAgent {
    id: Identity,
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    decoder: StreamDecoder,
}

impl TcpAgent {
    fn connect(relay: &RelayProc, seed: u8, key: Key32) -> TcpAgent {
        let tcp = TcpStream::connect(relay.tcp()).expect("tcp connect");
        TcpAgent {
            id: Identity::from_seed([seed; 32]),
            tls: tls_client(tcp, key),
            decoder: StreamDecoder::new(),
        }
    }

    fn short(&self) -> ShortId {
        short_id(&self.id.public())
    }

    fn write(&mut self, msg: &[u8]) {
        let mut frame = Vec::new();
        write_frame(&mut frame, msg).expect("fits");
        self.tls.write_all(&frame).expect("write");
        self.tls.flush().expect("flush");
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(f) = self.decoder.next_frame() {
                return Some(f.to_vec());
            }
            let n = self.tls.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            self.decoder.extend(&chunk[..n]);
        }
    }

    fn recv_error(&mut self) -> Option<RelayErrorCode> {
        match RelayMsg::decode(&self.recv()?) {
            Ok(RelayMsg::Error { code, .. }) => Some(code),
            _ => None,
        }
    }

    fn bind(&mut self, token: Vec<u8>) -> Result<SocketAddr, RelayErrorCode> {
        self.write(&RelayMsg::BindRequest.to_vec());
        let reply = self.recv().expect("a challenge");
        let Ok(RelayMsg::BindChallenge { cookie }) = RelayMsg::decode(&reply) else {
            panic!("not a challenge: {reply:?}");
        };
        self.bind_with(cookie, &token)
    }

    /// The connection's TLS exporter under the relay bind label (completing the handshake).
    fn channel_binding(&mut self) -> [u8; 32] {
        while self.tls.conn.is_handshaking() {
            self.tls
                .conn
                .complete_io(&mut self.tls.sock)
                .expect("tls handshake");
        }
        self.tls
            .conn
            .export_keying_material([0u8; 32], BIND_EXPORTER_LABEL, None)
            .expect("an exporter")
    }

    /// `Bind` with `cookie`, and the relay's answer.
    fn bind_with(&mut self, cookie: [u8; 32], token: &[u8]) -> Result<SocketAddr, RelayErrorCode> {
        let bind = RelayMsg::Bind {
            cookie,
            signature: self.id.sign(DOMAIN_BIND, &bind_transcript(&cookie, token)),
            token,
        };
        self.write(&bind.to_vec());
        let reply = self.recv().expect("a bind answer");
        match RelayMsg::decode(&reply) {
            Ok(RelayMsg::BindOk { observed, .. }) => Ok(observed),
            Ok(RelayMsg::Error { code, .. }) => Err(code),
            other => panic!("unexpected bind answer {other:?}"),
        }
    }

    fn send(&mut self, to: &ShortId, payload: &[u8]) {
        self.write(&RelayMsg::Send { to: *to, payload }.to_vec());
    }
}

//! The real `rally-relay` binary presenting an operator's certificate on `--listen-tcp`
//! (`--tls-cert`, `--tls-cert-key`): a CA and a relay certificate made here with rcgen; clients
//! verify the chain against that CA, as agents do for a relay entry with `tcp_name`.
// These tests drive the real binary in real time: the sans-IO clock rule is for the library.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rally_proto::relay::{bind_transcript, short_id, RelayMsg, DOMAIN_BIND};
use rally_proto::relay_stream::{write_frame, StreamDecoder};
use rally_proto::Identity;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;

const NAME: &str = "relay.rally.test";

#[test]
fn a_client_trusting_the_operators_ca_binds_over_tls_and_forwards_to_a_udp_agent() {
    let pki = Pki::new("ok");
    let relay = pki.start_relay(&pki.leaf_key);
    let mut tls = connect(&relay, &pki.ca_der, NAME).expect("the CA-verified handshake");
    let id = Identity::from_seed([21; 32]);
    let udp = Agent::new(22);
    assert!(udp.bind(&relay, &[PARTY_X]).is_ok());

    let mut decoder = StreamDecoder::new();
    write_msg(&mut tls, &RelayMsg::BindRequest.to_vec());
    let Ok(RelayMsg::BindChallenge { cookie }) =
        RelayMsg::decode(&read_msg(&mut tls, &mut decoder))
    else {
        panic!("no challenge");
    };
    let token = token(&id, unix_now() + 3600, &[PARTY_X]);
    let signature = id.sign(DOMAIN_BIND, &bind_transcript(&cookie, &token));
    let bind = RelayMsg::Bind {
        cookie,
        signature,
        token: &token,
    };
    write_msg(&mut tls, &bind.to_vec());
    let reply = read_msg(&mut tls, &mut decoder);
    assert!(
        matches!(RelayMsg::decode(&reply), Ok(RelayMsg::BindOk { .. })),
        "{reply:?}"
    );

    let send = RelayMsg::Send {
        to: udp.short(),
        payload: b"over a CA-verified relay",
    };
    write_msg(&mut tls, &send.to_vec());
    let got = udp.recv().expect("the udp agent receives the packet");
    assert_eq!(
        RelayMsg::decode(&got),
        Ok(RelayMsg::Deliver {
            from: short_id(&id.public()),
            payload: b"over a CA-verified relay"
        })
    );
}

#[test]
fn a_client_that_does_not_trust_the_ca_or_wants_another_name_is_refused() {
    let pki = Pki::new("refused");
    let relay = pki.start_relay(&pki.leaf_key);
    let other = Pki::new("other-ca");
    let e = connect(&relay, &other.ca_der, NAME).expect_err("an unknown CA");
    assert!(e.contains("UnknownIssuer"), "{e}");
    let e = connect(&relay, &pki.ca_der, "other.rally.test").expect_err("another name");
    assert!(e.contains("not valid for name"), "{e}");
}

#[test]
fn unreadable_or_mismatched_certificate_files_stop_the_relay_with_one_line() {
    let pki = Pki::new("bad-files");
    let other = Pki::new("bad-files-other");
    let missing = pki.dir.join("missing.pem");
    for (cert, key, says) in [
        (
            &pki.leaf_pem,
            &other.leaf_key,
            "is not the private key of the first certificate",
        ),
        (&missing, &pki.leaf_key, "cannot read"),
        (&pki.leaf_key, &pki.leaf_key, "no CERTIFICATE"),
        (&pki.leaf_pem, &pki.leaf_pem, "no PEM private key"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--listen-tcp",
                "127.0.0.1:0",
            ])
            .args(["--control-key", &control().public().to_string()])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-cert-key")
            .arg(key)
            .output()
            .expect("rally-relay runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "{stderr}");
        assert!(last.contains(says), "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rally-relay"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--listen-tcp",
            "127.0.0.1:0",
        ])
        .args(["--control-key", &control().public().to_string()])
        .arg("--tls-cert")
        .arg(&pki.leaf_pem)
        .output()
        .expect("rally-relay runs");
    assert_eq!(
        out.status.code(),
        Some(2),
        "--tls-cert without its key is a usage error"
    );
}

/// A CA and a certificate it issued for [`NAME`], as files in a temporary directory.
struct Pki {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
    leaf_pem: PathBuf,
    leaf_key: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("rally-op-cert-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("Rally test CA {tag}"));
        let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
        let key = rcgen::KeyPair::generate().expect("a relay key");
        let leaf = rcgen::CertificateParams::new(vec![NAME.to_string()])
            .expect("leaf params")
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("the relay certificate");
        // The chain file holds the leaf and then the CA, as an operator's usually does.
        let leaf_pem = write(&dir, "relay.pem", &(leaf.pem() + &ca_cert.pem()));
        let leaf_key = write(&dir, "relay.key", &key.serialize_pem());
        Pki {
            dir,
            ca_der: ca_cert.der().clone(),
            leaf_pem,
            leaf_key,
        }
    }

    fn start_relay(&self, key: &Path) -> RelayProc {
        let (cert, key) = (self.leaf_pem.to_string_lossy(), key.to_string_lossy());
        let relay = RelayProc::start(&[
            "--listen-tcp",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-cert-key",
            &key,
        ]);
        let _ = relay.tcp();
        relay
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("a temp file");
    p
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS 1.3 connection to the relay verified against `ca` for `name`, handshake done.
fn connect(relay: &RelayProc, ca: &CertificateDer<'static>, name: &str) -> Result<Tls, String> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).expect("a CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![rally_relay::tls::ALPN.to_vec()];
    let name = ServerName::try_from(name.to_owned()).expect("a name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("a client");
    let tcp = TcpStream::connect(relay.tcp()).expect("tcp connect");
    tcp.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(tls)
}

fn write_msg(tls: &mut Tls, msg: &[u8]) {
    let mut frame = Vec::new();
    write_frame(&mut frame, msg).expect("fits");
    tls.write_all(&frame).expect("write");
    tls.flush().expect("flush");
}

fn read_msg(tls: &mut Tls, decoder: &mut StreamDecoder) -> Vec<u8> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(f) = decoder.next_frame() {
            return f.to_vec();
        }
        let n = tls.read(&mut chunk).expect("a frame");
        assert!(n > 0, "closed by the relay");
        decoder.extend(&chunk[..n]);
    }
}

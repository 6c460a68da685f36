//! A member's modified client: WireGuard (boringtun) with the member's own keys, from its state
//! directory, sending the victim packets a real agent never sends — to addresses other than the
//! victim's virtual IP, e.g. a private network the victim's host routes.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use serde::{Deserialize, Serialize};

use super::raw::write_ipv4_udp;

#[derive(clap::Args, Debug)]
pub struct WgArgs {
    /// The member's WireGuard secret key file (its state directory's `wireguard.key`).
    #[arg(long)]
    pub secret_file: std::path::PathBuf,
    /// The victim's WireGuard public key, hex.
    #[arg(long)]
    pub peer_key: String,
    /// The victim agent's UDP address.
    #[arg(long)]
    pub to: SocketAddrV4,
    /// Inner source: the member's own virtual IP (anything else the victim refuses anyway).
    #[arg(long)]
    pub src: Ipv4Addr,
    /// Inner destinations, each sent `--count` UDP datagrams.
    #[arg(long, value_delimiter = ',', required = true)]
    pub dst: Vec<SocketAddrV4>,
    #[arg(long, default_value_t = 5)]
    pub count: u32,
}

/// What the client did, printed as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub struct WgReport {
    pub handshake: bool,
    pub sent: u32,
}

pub fn run(args: &WgArgs) -> Result<()> {
    let secret: [u8; 32] = std::fs::read(&args.secret_file)
        .with_context(|| format!("reading {}", args.secret_file.display()))?
        .try_into()
        .map_err(|_| anyhow::anyhow!("a WireGuard key file holds 32 bytes"))?;
    let peer: [u8; 32] = hex::decode(&args.peer_key)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("--peer-key takes 32 bytes in hex"))?;
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut tunn = Tunn::new(
        StaticSecret::from(secret),
        PublicKey::from(peer),
        None,
        None,
        rand::random::<u32>() & 0x00ff_ffff,
        None,
    );
    let handshake = handshake(&mut tunn, &sock, args.to)?;
    if !handshake {
        println!(
            "{}",
            serde_json::to_string(&WgReport { handshake, sent: 0 })?
        );
        bail!("no handshake with {}", args.to);
    }
    let mut sent = 0;
    let mut packet = Vec::new();
    let mut out = vec![0u8; 2048];
    for dst in &args.dst {
        for i in 0..args.count {
            let payload = format!("rally-attack {i}");
            write_ipv4_udp(
                &mut packet,
                SocketAddrV4::new(args.src, 40_000),
                *dst,
                payload.as_bytes(),
            );
            if let TunnResult::WriteToNetwork(b) = tunn.encapsulate(&packet, &mut out) {
                sock.send_to(b, args.to)?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    println!("{}", serde_json::to_string(&WgReport { handshake, sent })?);
    Ok(())
}

/// Runs a handshake (retrying for up to 10 s); true once a session is up.
fn handshake(tunn: &mut Tunn, sock: &UdpSocket, to: SocketAddrV4) -> Result<bool> {
    let mut buf = vec![0u8; 2048];
    let mut rx = vec![0u8; 2048];
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let TunnResult::WriteToNetwork(b) = tunn.format_handshake_initiation(&mut buf, true) {
            sock.send_to(b, to)?;
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            let Ok((n, _)) = sock.recv_from(&mut rx) else {
                continue;
            };
            let mut r = tunn.decapsulate(None, &rx[..n], &mut buf);
            while let TunnResult::WriteToNetwork(b) = r {
                sock.send_to(b, to)?;
                r = tunn.decapsulate(None, &[], &mut buf);
            }
            if tunn.time_since_last_handshake().is_some() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

//! A game-like UDP stream for `bench latency`: 60 datagrams a second of 160 bytes (a game
//! client's state updates), each echoed by the server; the client prints one round-trip time
//! (ms) per answered datagram. Both sides run as hidden `rally-lab` subcommands inside lab
//! namespaces.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::tunnels::{wait_udp_bound, Path};
use crate::bins;

/// The echo server's UDP port on the server host.
pub const GAME_PORT: u16 = 5300;
/// Datagrams per second.
pub const GAME_RATE: u32 = 60;
/// Bytes of payload per datagram.
pub const GAME_SIZE: usize = 160;

/// Echoes every datagram back to its sender, until killed.
pub fn echo(listen: SocketAddr) -> Result<()> {
    let socket = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], from);
    }
}

/// Sends `count` datagrams of [`GAME_SIZE`] bytes to `to`, `rate` a second, and prints the
/// round-trip time of each echo (ms, one per line); waits one second for the last echoes.
pub fn client(to: SocketAddr, rate: u32, count: u32) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(to)?;
    let rx = socket.try_clone()?;
    let start = Instant::now();
    let gap = Duration::from_secs(1) / rate.max(1);
    let sender = std::thread::spawn(move || -> Result<()> {
        let mut buf = [0u8; GAME_SIZE];
        for seq in 0..count {
            let due = start + gap * seq;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let sent = start.elapsed().as_nanos() as u64;
            buf[..4].copy_from_slice(&seq.to_be_bytes());
            buf[4..12].copy_from_slice(&sent.to_be_bytes());
            socket.send(&buf)?;
        }
        Ok(())
    });
    let end = start + gap * count + Duration::from_secs(1);
    let mut buf = [0u8; 2048];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        rx.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match rx.recv(&mut buf) {
            Ok(n) if n >= 12 => {
                let mut sent = [0u8; 8];
                sent.copy_from_slice(&buf[4..12]);
                let rtt = start.elapsed().as_nanos() as u64 - u64::from_be_bytes(sent);
                println!("{:.3}", rtt as f64 / 1e6);
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e.into()),
        }
    }
    match sender.join() {
        Ok(r) => r,
        Err(_) => bail!("the sending thread panicked"),
    }
}

/// Runs the game-like stream for `secs` over `path`: an echo server on the server host, the
/// client on the client host; the round-trip times (ms) of the answered datagrams.
pub fn game_rtts(path: &Path, secs: u32) -> Result<Vec<f64>> {
    let lab = bins::rally_lab()?.to_string_lossy().into_owned();
    let listen = format!("0.0.0.0:{GAME_PORT}");
    let server = path.server.spawn(
        &[lab.as_str(), "game-echo", "--listen", listen.as_str()],
        path.server.log_path("game-echo"),
    )?;
    let r = (|| {
        wait_udp_bound(&path.server, GAME_PORT, &server)?;
        let to = format!("{}:{GAME_PORT}", path.target);
        let count = (GAME_RATE * secs).to_string();
        let rate = GAME_RATE.to_string();
        let out = path.client.run_timeout(
            &[
                lab.as_str(),
                "game-ping",
                "--to",
                to.as_str(),
                "--rate",
                rate.as_str(),
                "--count",
                count.as_str(),
            ],
            Duration::from_secs(u64::from(secs) + 20),
        )?;
        let rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if rtts.is_empty() {
            bail!(
                "no echo from {to} ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(rtts)
    })();
    server.terminate(Duration::from_secs(1))?;
    r
}

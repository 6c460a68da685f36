//! A constant-rate UDP stream through the overlay, timestamped and echoed by the lab itself.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::{netns, Host};

use super::ping::{PingLog, Reply};
use super::unix_now;

/// Port the echo side of a [`UdpStream`] listens on.
pub const ECHO_PORT: u16 = 47_000;

/// Bytes of a [`UdpStream`] datagram (sequence number, send time, padding): the size of a
/// ping's IP payload.
const STREAM_PAYLOAD: usize = 64;

/// A constant-rate UDP stream through the overlay, timestamped by the lab itself: one datagram
/// every `interval` from a socket in `from`'s namespace to `to_ip:ECHO_PORT`, echoed back by a
/// socket in `to`'s namespace. Unlike `ping`, which slows down while its requests go
/// unanswered, it keeps its schedule through an outage, so every request lost is counted.
/// All sockets and threads belong to the test process (no traffic in the root namespace: each
/// socket is made inside its lab namespace).
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
    sent: Arc<AtomicU32>,
    replies: Arc<Mutex<Vec<Reply>>>,
    interval: Duration,
}

impl UdpStream {
    /// Starts the echo side on `to` and the sender and receiver on `from`.
    pub fn start(from: &Host, to: &Host, to_ip: &str, interval: Duration) -> Result<UdpStream> {
        let dst: SocketAddr = format!("{to_ip}:{ECHO_PORT}")
            .parse()
            .with_context(|| format!("{to_ip} is not an IPv4 address"))?;
        let tick = Duration::from_millis(100);
        let echo = netns::in_ns(to.ns(), || {
            let s = UdpSocket::bind(("0.0.0.0", ECHO_PORT)).context("binding the echo socket")?;
            s.set_read_timeout(Some(tick))?;
            Ok(s)
        })?;
        let client = netns::in_ns(from.ns(), || {
            let s = UdpSocket::bind(("0.0.0.0", 0)).context("binding the stream socket")?;
            s.set_read_timeout(Some(tick))?;
            Ok(s)
        })?;
        let receiver = client.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU32::new(0));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();

        let halt = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || echo_loop(&echo, &halt)));
        let (halt, count) = (Arc::clone(&stop), Arc::clone(&sent));
        threads.push(std::thread::spawn(move || {
            send_loop(&client, dst, interval, &halt, &count)
        }));
        let (halt, got) = (Arc::clone(&stop), Arc::clone(&replies));
        threads.push(std::thread::spawn(move || {
            receive_loop(&receiver, &halt, &got)
        }));
        Ok(UdpStream {
            stop,
            threads,
            sent,
            replies,
            interval,
        })
    }

    /// The replies so far.
    pub fn snapshot(&self) -> PingLog {
        let replies = self
            .replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let received = u32::try_from(replies.len()).unwrap_or(u32::MAX);
        PingLog {
            replies,
            transmitted: Some(self.sent.load(Ordering::SeqCst)),
            received: Some(received),
            interval: self.interval,
        }
    }

    /// Stops sending, waits a moment for replies still in flight, and returns the log.
    pub fn stop(mut self) -> Result<PingLog> {
        let sent = self.sent.load(Ordering::SeqCst);
        // Replies to the last requests are still on their way (a relayed RTT is ~160 ms).
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow!("a UDP stream thread panicked"))??;
        }
        let mut log = self.snapshot();
        log.transmitted = Some(log.transmitted.unwrap_or(sent));
        Ok(log)
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The echo side: sends every datagram back to where it came from, until `halt`.
fn echo_loop(echo: &UdpSocket, halt: &AtomicBool) -> Result<()> {
    let mut buf = [0u8; 2048];
    while !halt.load(Ordering::SeqCst) {
        match echo.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let _ = echo.send_to(&buf[..n], peer);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e).context("echo socket"),
        }
    }
    Ok(())
}

/// The sending side: datagram `seq` (sequence number and send time) at `interval * seq`
/// from the start, whatever came back, until `halt`; `count` is how many were sent.
fn send_loop(
    client: &UdpSocket,
    dst: SocketAddr,
    interval: Duration,
    halt: &AtomicBool,
    count: &AtomicU32,
) -> Result<()> {
    let start = Instant::now();
    let mut seq: u32 = 0;
    let mut buf = [0u8; STREAM_PAYLOAD];
    while !halt.load(Ordering::SeqCst) {
        let due = start + interval * seq;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        buf[..4].copy_from_slice(&seq.to_be_bytes());
        buf[4..12].copy_from_slice(&unix_now().to_bits().to_be_bytes());
        // A send error (no route for a moment) is a lost datagram, like any other.
        let _ = client.send_to(&buf, dst);
        count.store(seq + 1, Ordering::SeqCst);
        seq += 1;
    }
    Ok(())
}

/// The receiving side: every echo that comes back, as a [`Reply`] in `got`, until `halt`.
fn receive_loop(receiver: &UdpSocket, halt: &AtomicBool, got: &Mutex<Vec<Reply>>) -> Result<()> {
    let mut buf = [0u8; 2048];
    while !halt.load(Ordering::SeqCst) {
        match receiver.recv_from(&mut buf) {
            Ok((n, _)) if n >= 12 => {
                let at = unix_now();
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap_or_default());
                let bits = u64::from_be_bytes(buf[4..12].try_into().unwrap_or_default());
                let rtt_ms = (at - f64::from_bits(bits)) * 1000.0;
                got.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Reply { seq, at, rtt_ms });
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            // ICMP errors (port unreachable while the echo side starts) are not fatal.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e).context("stream socket"),
        }
    }
    Ok(())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

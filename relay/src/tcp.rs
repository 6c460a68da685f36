//! Relay sessions over TLS 1.3 on TCP (`--listen-tcp`), for agents whose network lets no UDP
//! out. Each connection carries relay messages as length-prefixed frames
//! ([`rally_proto::relay_stream`]); the protocol is the same as over UDP (bind, challenge,
//! token, signature, party scoping) because the frames go through the same sans-IO core, on
//! the forwarding thread, as [`Via::Tcp`](crate::Via::Tcp) datagrams from the connection's
//! remote address.
//!
//! Per connection a reader task hands whole frames to the forwarding thread (a bounded
//! channel, so a fast sender is slowed down by TCP rather than buffered) and wakes it through
//! an eventfd; a writer task drains the connection's [`OutQueue`]: a short drop-oldest queue,
//! so a client that stops reading costs the relay at most [`OUT_QUEUE`] frames and every frame
//! dropped is counted (a late game packet is worth nothing). Connections are capped like
//! sessions: in all and per source IP.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rally_proto::relay_stream::{write_frame, StreamDecoder, BIND_EXPORTER_LABEL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_rustls::TlsAcceptor;

/// Frames queued toward one client before the oldest is dropped.
pub const OUT_QUEUE: usize = 256;
/// Frames from all connections waiting for the forwarding thread.
const IN_CHANNEL: usize = 1024;
/// Time a client has for the TCP and TLS handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a connection at once.
const READ_CHUNK: usize = 16 * 1024;
/// Kernel send buffer per connection. It holds the data in flight as well as what waits, so
/// it bounds a stream to one buffer per round trip (64 KiB capped a download to an agent
/// 80 ms away at ~9 Mbit/s); 1 MiB allows ~100 Mbit/s there while bounding the kernel memory
/// a connection can hold. What waits unsent is bounded by [`NOTSENT_LOWAT`] instead, so frames
/// wait in the drop-oldest queue (where they can be dropped), not in the kernel.
const SEND_BUFFER: usize = 1024 * 1024;
/// Unsent bytes in the kernel above which a connection does not take more.
const NOTSENT_LOWAT: usize = 16 * 1024;

/// What the connections tell the forwarding thread.
#[derive(Debug)]
pub enum TcpInput {
    /// A connection completed TLS: frames for `addr` go to `queue`.
    Open {
        /// The connection's remote address (its identity in the core).
        addr: SocketAddr,
        /// Its outgoing queue.
        queue: Arc<OutQueue>,
        /// The connection's exported keying material
        /// ([`rally_proto::relay_stream::BIND_EXPORTER_LABEL`]): a cookie its agent may bind
        /// with at once.
        binding: Option<[u8; 32]>,
    },
    /// One frame from `addr`.
    Frame {
        /// The connection's remote address.
        addr: SocketAddr,
        /// The frame's body: one relay message.
        frame: Vec<u8>,
    },
    /// The connection ended.
    Closed {
        /// The connection's remote address.
        addr: SocketAddr,
    },
}

/// Counters of the TCP listener, shared with the metrics.
#[derive(Debug, Default)]
pub struct TcpCounters {
    /// Connections open now.
    pub connections_active: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections closed at once for a connection cap.
    pub connections_refused: AtomicU64,
    /// Frames dropped from a full outgoing queue (a slow reader).
    pub queue_drops: AtomicU64,
}

/// The frames waiting to be written to one connection: bounded, oldest dropped first.
#[derive(Debug)]
pub struct OutQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    ready: Notify,
    counters: Arc<TcpCounters>,
}

impl OutQueue {
    fn new(counters: Arc<TcpCounters>) -> Self {
        OutQueue {
            frames: Mutex::new(VecDeque::with_capacity(OUT_QUEUE)),
            ready: Notify::new(),
            counters,
        }
    }

    /// Queues one message for the client (dropping the oldest if the queue is full).
    pub fn push(&self, msg: &[u8]) {
        let mut frame = Vec::with_capacity(msg.len() + 2);
        if write_frame(&mut frame, msg).is_err() {
            return;
        }
        {
            let Ok(mut q) = self.frames.lock() else {
                return;
            };
            if q.len() >= OUT_QUEUE {
                q.pop_front();
                self.counters.queue_drops.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(frame);
        }
        self.ready.notify_one();
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.frames.lock().map_or(0, |q| q.len())
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take_all(&self, into: &mut Vec<u8>) {
        if let Ok(mut q) = self.frames.lock() {
            for f in q.drain(..) {
                into.extend_from_slice(&f);
            }
        }
    }
}

/// An eventfd that the connection tasks write to wake the forwarding thread.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The fd to watch for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Wakes the watcher.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: write of 8 bytes from a live u64 to our eventfd; a full counter (EAGAIN)
        // already means "wake".
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter after a wake-up.
    pub fn reset(&self) {
        let mut n: u64 = 0;
        // SAFETY: read of 8 bytes into a live u64 from our eventfd (EAGAIN when not set).
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// The forwarding thread's end: frames in, and the queues of the open connections.
#[derive(Debug)]
pub struct TcpSide {
    /// Frames and connection changes from the connection tasks.
    pub input: mpsc::Receiver<TcpInput>,
    /// Wakes the forwarding thread when `input` has something.
    pub waker: Arc<Waker>,
    /// Open connections by remote address.
    pub queues: HashMap<SocketAddr, Arc<OutQueue>>,
}

/// The listener's end, run on the tokio runtime by [`serve`].
pub struct TcpListenerSide {
    listener: TcpListener,
    tls: TlsAcceptor,
    input: mpsc::Sender<TcpInput>,
    waker: Arc<Waker>,
    counters: Arc<TcpCounters>,
    max_connections: usize,
    max_per_ip: usize,
    idle: Duration,
}

impl std::fmt::Debug for TcpListenerSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListenerSide")
            .field("listener", &self.listener)
            .field("max_connections", &self.max_connections)
            .field("max_per_ip", &self.max_per_ip)
            .finish_non_exhaustive()
    }
}

/// Builds both ends for `listener`. `max_connections` and `max_per_ip` are the session
/// limits; a connection silent for `idle` is closed.
pub fn channel(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    counters: Arc<TcpCounters>,
    limits: (usize, usize, Duration),
) -> io::Result<(TcpListenerSide, TcpSide)> {
    let (tx, rx) = mpsc::channel(IN_CHANNEL);
    let waker = Arc::new(Waker::new()?);
    let (max_connections, max_per_ip, idle) = limits;
    Ok((
        TcpListenerSide {
            listener,
            tls: TlsAcceptor::from(Arc::new(tls)),
            input: tx,
            waker: waker.clone(),
            counters,
            max_connections,
            max_per_ip,
            idle,
        },
        TcpSide {
            input: rx,
            waker,
            queues: HashMap::new(),
        },
    ))
}

/// Accepts connections until the task is dropped.
pub async fn serve(side: TcpListenerSide) {
    let side = Arc::new(side);
    let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let (stream, remote) = match side.listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = ConnSlot::take(&side, &per_ip, remote.ip()) else {
            side.counters
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, "tcp connection refused: over the connection cap");
            continue;
        };
        let side = side.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(&side, stream, remote).await {
                tracing::debug!(%remote, "tcp connection: {e}");
            }
        });
    }
}

/// One counted connection; released when dropped.
struct ConnSlot {
    side: Arc<TcpListenerSide>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ConnSlot {
    fn take(
        side: &Arc<TcpListenerSide>,
        per_ip: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
    ) -> Option<ConnSlot> {
        let mut map = per_ip.lock().ok()?;
        let active = side.counters.connections_active.load(Ordering::Relaxed) as usize;
        let here = map.get(&ip).copied().unwrap_or(0);
        if active >= side.max_connections || here >= side.max_per_ip {
            return None;
        }
        *map.entry(ip).or_insert(0) += 1;
        side.counters
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        side.counters
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        Some(ConnSlot {
            side: side.clone(),
            per_ip: per_ip.clone(),
            ip,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.per_ip.lock() {
            if let Some(n) = map.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
        self.side
            .counters
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    side: &TcpListenerSide,
    stream: TcpStream,
    remote: SocketAddr,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    set_int(&stream, libc::SOL_SOCKET, libc::SO_SNDBUF, SEND_BUFFER);
    set_int(
        &stream,
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        NOTSENT_LOWAT,
    );
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, side.tls.accept(stream))
        .await
        .map_err(|_| "tls handshake timed out".to_string())?
        .map_err(|e| format!("tls handshake: {e}"))?;
    let binding = tls
        .get_ref()
        .1
        .export_keying_material([0u8; 32], BIND_EXPORTER_LABEL, None)
        .ok();
    let queue = Arc::new(OutQueue::new(side.counters.clone()));
    let send = |input| async {
        let r = side.input.send(input).await;
        side.waker.wake();
        r.map_err(|_| "the forwarding thread stopped".to_string())
    };
    send(TcpInput::Open {
        addr: remote,
        queue: queue.clone(),
        binding,
    })
    .await?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn({
        let queue = queue.clone();
        async move {
            let mut out = Vec::new();
            loop {
                queue.ready.notified().await;
                out.clear();
                queue.take_all(&mut out);
                if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
            }
        }
    });
    let mut decoder = StreamDecoder::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let result = loop {
        let n = match tokio::time::timeout(side.idle, rd.read(&mut chunk)).await {
            Err(_) => break Ok(()),
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => break Err(e.to_string()),
        };
        decoder.extend(&chunk[..n]);
        let mut failed = None;
        while let Some(frame) = decoder.next_frame() {
            let input = TcpInput::Frame {
                addr: remote,
                frame: frame.to_vec(),
            };
            if let Err(e) = send(input).await {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
    };
    writer.abort();
    let _ = send(TcpInput::Closed { addr: remote }).await;
    result
}

fn set_int(stream: &TcpStream, level: libc::c_int, name: libc::c_int, value: usize) {
    let v = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt on a live socket with a pointer to a live c_int and its size.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

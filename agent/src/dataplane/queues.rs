//! Small packets first, bulk under CoDel: the thin driver of [`rally_agent_core::aqm`].
//!
//! Both kernel queues below the engine (the TUN device's ring, the UDP socket's receive
//! queue) are read promptly into user space. What is small ([`class_of`]) is handled as it is
//! read: encrypted and sent, or decrypted and written to the TUN device. What is bulk waits in
//! [`FlowQueues`] per direction (by inner 5-tuple when sending, by sending address when
//! receiving; deficit round robin, CoDel per flow) that the engine serves one slice at a
//! time ([`TX_SLICE`] packets, one GRO train), looking at the kernel's queues (a wait with no
//! timeout) before each slice, so that the next small packet is read before the next slice. CoDel
//! decides at each dequeue whether a bulk packet is dropped, or marked Congestion Experienced
//! if its inner packet is ECN-capable (on the receive side after decryption).
//!
//! `RALLY_DATAPLANE_FIFO=1` in the agent's environment turns all of this off (one read per
//! wake-up, everything handled in arrival order, 8 MiB socket buffers): the A/B baseline of
//! `rally-lab bench latency`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rally_agent_core::aqm::socket_buffer_bytes;
use rally_agent_core::aqm::{class_of, mark_ce, Class, Codel, Marked};
use rally_agent_core::aqm_fq::{flow_key, FlowQueues};
use tracing::{debug, info};

use super::batch::MAX_GSO_BYTES;
use super::engine::{Buffers, Engine};
use super::path_timing;
use super::queue_metrics::{SchedStat, Trace};
use super::timers::now;
use rally_udp::thread_class::RealtimeBoost;
#[cfg(doc)]
use rally_udp::thread_class::RT_HOLD;

/// Packets encrypted per slice of the send queue (one GSO send at most).
pub(super) const TX_SLICE: usize = 64;
/// TUN reads per drain before the loop looks at its other inputs again.
const TUN_READS: usize = 64;
/// A short GRO train still counts this much against the receive queue's byte limit: its buffer
/// is a 64 KiB one, and the limit also bounds memory.
const RX_MIN_WEIGHT: usize = 16 * 1024;
/// Byte limit of the receive side's queues, as large as the FIFO engine's socket buffer. One
/// peer's bulk flows share a queue there (their inner packets are unknown before decryption),
/// so an overflow drops a whole GRO train of every flow's packets and they all back off
/// together (at 2 MiB, 2.9 % of the datagrams of a two-stream transfer went so): above what the
/// inner TCP windows put in flight, the drops are left to CoDel, one datagram per verdict.
const RX_LIMIT_BYTES: usize = 8 * 1024 * 1024;
/// Byte limit of the send side's queues. The loop drains the TUN device, so the kernel's
/// backpressure on the sending TCP (a full TUN queue stops it without a loss) is gone: at
/// 2 MiB the queues overflowed under a two-stream load (1.5 % of the packets), each loss
/// halving a flow. As on the receive side, the limit is set above what the windows put in
/// flight and the drops are left to CoDel.
const TX_LIMIT_BYTES: usize = 8 * 1024 * 1024;
/// Quantum of the send side's flow queues: one GSO burst (what the sending TCP hands the TUN
/// device at once). With fq-codel's 1514 bytes the flows' packets went out interleaved one by
/// one, and the receiving agent's GRO then wrote each train to its TUN device as a coalesced
/// packet per flow instead of one.
const TX_QUANTUM: usize = 64 * 1024;
/// Quantum of the receive side's flow queues: a train is up to 64 KiB, so a peer's queue may
/// send about one train per round.
const RX_QUANTUM: usize = 64 * 1024;
/// How often the queues' counters are logged under load.
const REPORT_EVERY: Duration = Duration::from_secs(2);
/// A wait of the loop that took this long slept (an `epoll` with something ready returns in
/// a microsecond or two).
const SLEPT: Duration = Duration::from_micros(10);
/// Spare send-side buffers (2 KiB each) kept when the queue empties, for the next burst; the
/// rest are freed. Under a one-stream load the send queue empties between bursts, and with 64
/// kept every burst allocated (and zeroed, and page-faulted in) its buffers again: 2.5 % of the
/// sending agent's samples in a profile. 1024 keep 2 MiB.
const TX_POOL_KEEP: usize = 1024;
/// Spare receive-side buffers (64 KiB each, one GRO train): 32 keep 2 MiB.
const RX_POOL_KEEP: usize = 32;
/// Overrides the socket buffers' size (bytes), for A/B runs.
pub const SOCKBUF_ENV: &str = "RALLY_DATAPLANE_SOCKBUF";
/// Sets the TUN device's transmit queue length (packets), for A/B runs.
pub const TXQLEN_ENV: &str = "RALLY_DATAPLANE_TXQLEN";

/// A number from the environment.
pub(super) fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// The environment variable that turns the queues off.
pub const FIFO_ENV: &str = "RALLY_DATAPLANE_FIFO";

/// Datagrams received back to back from one address (a GRO train), waiting to be decrypted.
pub(super) struct RxTrain {
    buf: Vec<u8>,
    len: usize,
    stride: usize,
    from: SocketAddr,
}

/// Counters of the queues (logged when the data plane stops, at debug).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct QueueStats {
    pub small_rx: u64,
    pub small_tx: u64,
    pub bulk_rx: u64,
    pub bulk_tx: u64,
    pub codel_drops: u64,
    pub ce_marks: u64,
    pub overflow_drops: u64,
    pub max_sojourn_rx: Duration,
    pub max_sojourn_tx: Duration,
    /// Time between two reads of the UDP socket while it still held datagrams (the previous
    /// read stopped before draining it), by bucket: < 0.1 ms, < 1 ms, < 5 ms, < 20 ms, more.
    pub rx_read_gaps: [u64; 5],
    pub max_rx_read_gap: Duration,
    /// Times the data-plane thread took its real-time priority (a bulk transfer began).
    pub realtime_boosts: u64,
    /// Breathers it took in that class (short sleeps after running long without one).
    pub realtime_breathers: u64,
    /// Whether it holds it now.
    pub realtime: bool,
}

impl QueueStats {
    /// Records the time between two reads of a socket that still held datagrams.
    pub fn rx_read_gap(&mut self, gap: Duration) {
        let bucket = match gap.as_micros() {
            0..100 => 0,
            100..1000 => 1,
            1000..5000 => 2,
            5000..20000 => 3,
            _ => 4,
        };
        self.rx_read_gaps[bucket] += 1;
        self.max_rx_read_gap = self.max_rx_read_gap.max(gap);
    }
}

/// The engine's two sets of bulk flow queues (CoDel per flow) and buffer pools: on the send
/// side one flow is an inner 5-tuple, on the receive side a sending address (the inner packets
/// are not known before decryption).
pub(super) struct Queues {
    /// False with `RALLY_DATAPLANE_FIFO=1`: arrival order, no AQM.
    pub enabled: bool,
    rx: FlowQueues<RxTrain>,
    tx: FlowQueues<(Vec<u8>, usize)>,
    rx_pool: Vec<Vec<u8>>,
    tx_pool: Vec<Vec<u8>>,
    /// The datagram being handled was picked by CoDel: mark its inner packet or drop it.
    pub rx_congested: bool,
    /// When a read of the UDP socket last stopped before draining it.
    pub undrained_since: Option<Instant>,
    pub stats: QueueStats,
    /// Delay histograms (and, with `RALLY_DATAPLANE_TRACE=1`, ICMP echo ages).
    pub trace: Trace,
    /// When the counters were last logged, and the thread's scheduler counters then.
    reported: Option<(Instant, Option<SchedStat>)>,
    /// The thread's real-time priority while bulk traffic flows.
    boost: RealtimeBoost,
}

impl Queues {
    pub fn from_env() -> Self {
        let fifo = std::env::var(FIFO_ENV).is_ok_and(|v| v == "1");
        Queues {
            enabled: !fifo,
            rx: FlowQueues::new(RX_LIMIT_BYTES, RX_QUANTUM, Codel::default()),
            tx: FlowQueues::new(TX_LIMIT_BYTES, TX_QUANTUM, Codel::default()),
            rx_pool: Vec::new(),
            tx_pool: Vec::new(),
            rx_congested: false,
            undrained_since: None,
            stats: QueueStats::default(),
            trace: Trace::from_env(),
            reported: None,
            boost: RealtimeBoost::from_env(!fifo),
        }
    }

    /// With the queues on, raises the calling (data-plane) thread's CPU weight
    /// ([`super::thread_sched`]); best effort.
    pub fn raise_thread_priority(&self) {
        if self.enabled {
            super::thread_sched::raise_current_thread();
        }
    }

    /// Socket buffer wanted in each direction: with the queues, the bandwidth-delay product of
    /// a 1 Gbit/s path with 20 ms round trips (never below four GSO bursts), since the engine
    /// keeps the kernel's queues short; without, the 8 MiB the FIFO engine always asked for.
    pub fn socket_buffer(&self) -> usize {
        if let Some(b) = env_usize(SOCKBUF_ENV) {
            b
        } else if self.enabled {
            socket_buffer_bytes(1_000_000_000, Duration::from_millis(20), 4 * MAX_GSO_BYTES)
        } else {
            8 * 1024 * 1024
        }
    }

    /// Authenticated bulk work was served at `t` (packets from the TUN device, or a train
    /// that decrypted): the thread takes its real-time priority if it has not.
    fn bulk_served(&mut self, t: Instant) {
        let change = self.boost.on_bulk(t);
        self.class_changed(change);
    }

    /// Once per turn of the loop: gives the real-time priority back [`RT_HOLD`] after the last
    /// bulk work (no clock read while the thread does not hold it).
    pub fn settle_boost(&mut self) {
        let change = self.boost.on_turn(now);
        self.class_changed(change);
    }

    /// Whether the thread holds its real-time priority (the loop then times its waits).
    pub fn boosted(&self) -> bool {
        self.boost.is_on()
    }

    /// After a wait that started at `from` (read only while [`Self::boosted`]): sleeps a
    /// breather if the thread has held a CPU in the real-time class too long without sleeping
    /// (`rally_udp::thread_class::RT_BUSY_MAX`).
    pub fn breathe(&mut self, from: Instant) {
        let t = now();
        let slept = t.saturating_duration_since(from) >= SLEPT;
        if let Some(d) = self.boost.breather(t, slept) {
            std::thread::sleep(d);
            self.stats.realtime_breathers += 1;
        }
    }

    fn class_changed(&mut self, change: Option<std::io::Result<bool>>) {
        match change {
            None => {}
            Some(Ok(realtime)) => {
                debug!(realtime, "data-plane thread's scheduling class");
                self.stats.realtime = realtime;
                self.stats.realtime_boosts += u64::from(realtime);
            }
            Some(Err(e)) => debug!("data-plane thread stays in the fair class: {e}"),
        }
    }

    /// Bulk packets wait: the loop serves a slice before it sleeps.
    pub fn has_work(&self) -> bool {
        !self.rx.is_empty() || !self.tx.is_empty()
    }

    /// Logs the counters (info) at most every [`REPORT_EVERY`] while bulk traffic flows;
    /// called on busy turns only, so an idle agent never wakes for it.
    pub fn report(&mut self, t: Instant) {
        if !self.enabled || self.reported.is_some_and(|(r, _)| t < r + REPORT_EVERY) {
            return;
        }
        let sched = SchedStat::current();
        // How long the data-plane thread waited for a CPU since the last report, and in how
        // many turns: CPU contention rather than queueing.
        let waited = match (self.reported.and_then(|(_, s)| s), sched) {
            (Some(a), Some(b)) => format!(
                "{:?} on CPU, {:?} waiting for one over {} slices",
                b.on_cpu.saturating_sub(a.on_cpu),
                b.run_delay.saturating_sub(a.run_delay),
                b.slices.saturating_sub(a.slices)
            ),
            _ => String::new(),
        };
        self.reported = Some((t, sched));
        info!(stats = ?self.stats, trace = %self.trace.summary(), thread = %waited, "data-plane queues");
    }

    /// Stores the counters for the metrics endpoint.
    pub fn publish(&self) {
        super::queue_metrics::publish(self.stats, &self.trace);
    }

    fn queue_rx(&mut self, train: RxTrain, t: Instant) {
        self.stats.bulk_rx += (train.len / train.stride.max(1)) as u64;
        let weight = train.len.max(RX_MIN_WEIGHT);
        let key = addr_key(&train.from);
        for old in self.rx.push(key, train, weight, t) {
            self.stats.overflow_drops += (old.len / old.stride.max(1)) as u64;
            self.rx_pool.push(old.buf);
        }
    }

    fn queue_tx(&mut self, buf: Vec<u8>, size: usize, t: Instant) {
        self.stats.bulk_tx += 1;
        let key = flow_key(&buf[..size]);
        for (old, _) in self.tx.push(key, (buf, size), size, t) {
            self.stats.overflow_drops += 1;
            self.tx_pool.push(old);
        }
    }

    fn rx_buffer(&mut self, len: usize) -> Vec<u8> {
        self.rx_pool.pop().unwrap_or_else(|| vec![0u8; len])
    }

    fn tx_buffer(&mut self, len: usize) -> Vec<u8> {
        self.tx_pool.pop().unwrap_or_else(|| vec![0u8; len])
    }

    fn trim_pools(&mut self) {
        if self.rx.is_empty() {
            self.rx_pool.truncate(RX_POOL_KEEP);
        }
        if self.tx.is_empty() {
            self.tx_pool.truncate(TX_POOL_KEEP);
        }
    }
}

impl Engine {
    /// One received datagram or GRO train in `b.rx[i]`: small datagrams are handled now, bulk
    /// ones queued (the buffer moves into the queue; a pool buffer takes its place).
    pub(super) fn take_received(&mut self, b: &mut Buffers, i: usize) {
        let m = b.meta[i];
        let stride = if m.stride == 0 { m.len } else { m.stride }.max(1);
        if !self.queues.enabled || class_of(stride) == Class::Small {
            self.queues.stats.small_rx += (m.len / stride) as u64;
            for d in b.rx[i][..m.len].chunks(stride) {
                self.handle_datagram(m.addr, d, &mut b.out);
            }
            return;
        }
        // A train's last datagram may be shorter than the rest, and small: it goes first.
        let tail = m.len % stride;
        let bulk_len = m.len - tail;
        if tail > 0 && class_of(tail) == Class::Small {
            self.queues.stats.small_rx += 1;
            self.handle_datagram(m.addr, &b.rx[i][bulk_len..m.len], &mut b.out);
        }
        let keep = if class_of(tail) == Class::Small {
            bulk_len
        } else {
            m.len
        };
        let fresh = self.queues.rx_buffer(b.rx[i].len());
        let buf = std::mem::replace(&mut b.rx[i], fresh);
        let train = RxTrain {
            buf,
            len: keep,
            stride,
            from: m.addr,
        };
        self.queues.queue_rx(train, now());
    }

    /// Reads the TUN device until it is empty (at most [`TUN_READS`] reads): small packets are
    /// encrypted and sent now, bulk ones queued. Without the queues, one read, all handled.
    /// What the first read held is sent before the second read: a lone packet (a ping, a
    /// game's update) leaves without waiting for the read that finds the device empty.
    pub(super) fn drain_tun(&mut self, b: &mut Buffers) {
        let reads = if self.queues.enabled { TUN_READS } else { 1 };
        for read in 0..reads {
            if read == 1 {
                super::tx::flush_gso(&self.udp, &self.udp_state, &mut self.gso);
            }
            path_timing::mark("tun_read_start");
            let n =
                match self
                    .tun
                    .recv_multiple(&mut b.tun_raw, &mut b.tun_bufs, &mut b.tun_sizes, 0)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!("tun receive: {e}");
                        break;
                    }
                };
            path_timing::mark("tun_read");
            if !self.queues.enabled {
                self.handle_tun_batch(b, n);
                return;
            }
            let t = now();
            for i in 0..n {
                let size = b.tun_sizes[i];
                if class_of(size) == Class::Small {
                    self.queues.stats.small_tx += 1;
                    self.handle_tun_packet(&b.tun_bufs[i][..size], &mut b.out);
                } else {
                    let fresh = self.queues.tx_buffer(b.tun_bufs[i].len());
                    let buf = std::mem::replace(&mut b.tun_bufs[i], fresh);
                    self.queues.queue_tx(buf, size, t);
                }
            }
        }
        super::tx::flush_gso(&self.udp, &self.udp_state, &mut self.gso);
    }

    /// One slice of each bulk queue: up to [`TX_SLICE`] packets to encrypt and one train to
    /// decrypt, CoDel deciding at each dequeue.
    pub(super) fn serve_bulk(&mut self, b: &mut Buffers) {
        self.serve_tx_slice(b);
        self.serve_rx_train(b);
        self.queues.trim_pools();
    }

    fn serve_tx_slice(&mut self, b: &mut Buffers) {
        // One clock read per slice (a slice takes well under CoDel's 2 ms target): a read per
        // packet was 2 % of the sending agent's samples.
        let t = now();
        for i in 0..TX_SLICE {
            let Some(d) = self.queues.tx.pop(t) else {
                break;
            };
            if i == 0 {
                self.queues.bulk_served(t);
            }
            let (mut buf, size) = d.item;
            let q = &mut self.queues;
            q.stats.max_sojourn_tx = q.stats.max_sojourn_tx.max(d.sojourn);
            q.trace.sojourn_tx.record_delay(d.sojourn);
            if !d.congested || self.congestion_allows(&mut buf[..size]) {
                self.handle_tun_packet(&buf[..size], &mut b.out);
            }
            self.queues.tx_pool.push(buf);
        }
        super::tx::flush_gso(&self.udp, &self.udp_state, &mut self.gso);
    }

    /// One train of the receive side's flow queues. When CoDel picks the train, its first
    /// datagram is marked or dropped (one drop per verdict, as for a single packet).
    fn serve_rx_train(&mut self, b: &mut Buffers) {
        let t = now();
        let Some(d) = self.queues.rx.pop(t) else {
            return;
        };
        let train = d.item;
        let q = &mut self.queues;
        q.stats.max_sojourn_rx = q.stats.max_sojourn_rx.max(d.sojourn);
        q.trace.sojourn_rx.record_delay(d.sojourn);
        let mut congested = d.congested;
        for datagram in train.buf[..train.len].chunks(train.stride) {
            self.queues.rx_congested = std::mem::take(&mut congested);
            self.handle_datagram(train.from, datagram, &mut b.out);
            self.queues.rx_congested = false;
        }
        if !self.tun_tx.is_empty() {
            self.queues.bulk_served(t);
        }
        super::tx::flush_tun(&self.tun, &mut self.tun_tx, &mut self.gro);
        self.queues.rx_pool.push(train.buf);
    }

    /// A packet CoDel picked: true if it was ECN-capable and is now marked (send it on), false
    /// if it must be dropped.
    pub(super) fn congestion_allows(&mut self, packet: &mut [u8]) -> bool {
        match mark_ce(packet) {
            Marked::Ce => {
                self.queues.stats.ce_marks += 1;
                true
            }
            Marked::NotEct => {
                self.queues.stats.codel_drops += 1;
                false
            }
        }
    }
}

/// The receive side's flow: the sending address (one peer's path, or a relay).
fn addr_key(addr: &SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut h);
    h.finish()
}

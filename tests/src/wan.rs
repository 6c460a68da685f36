//! The WAN emulator: one-way delay and random loss on an uplink, in userspace.
//!
//! This kernel has no `netem`, so every emulated uplink is cut in two inside the internet
//! namespace and spliced back together by a thread of the lab's own process:
//!
//! ```text
//!  node ns            internet ns
//!  ┌──────┐   veth   ┌──────┐  emulator  ┌──────┐   veth   ┌──────┐
//!  │ wan  │──────────│ uNa  │◄══thread══►│ uNb  │──────────│ uNp  │── br0
//!  └──────┘          └──────┘            └──────┘          └──────┘
//! ```
//!
//! The thread reads whole Ethernet frames from `uNa` and `uNb` with AF_PACKET raw sockets
//! (promiscuous, outgoing frames ignored so nothing loops), holds each in a fixed ring for the
//! configured delay, drops the configured fraction, and writes it to the other end. Both
//! directions get the same profile, so a round trip across two uplinks of 20 ms takes
//! 2 × (20 + 20) = 80 ms. Segmentation and checksum offloads are off on every device that
//! transmits into `uNa`/`uNb`, so frames are whole (≤ MTU) and their checksums are filled in.
//!
//! The profile lives in atomics and applies to frames arriving after the change; frames already
//! held keep their due time and the queue stays first-in first-out (a shorter delay never
//! reorders).
//!
//! **Distance to some destinations** ([`Link::set_far`], `Lab::set_wan_far`): IPv4 frames to or
//! from up to [`MAX_FAR`] addresses get an extra delay on top of the profile's, in both
//! directions, so a host can be near one agent and far from another (a relay's uplink with
//! +50 ms to agent B's public address). Those frames wait in a second ring of their own per
//! direction, first-in first-out within it, so they never hold back the other frames (no
//! head-of-line blocking); the thread sleeps until the earliest due frame of the four rings. Steady state allocates nothing: frames are received straight into ring slots
//! with `recvmmsg` and sent from them with `sendmmsg`; the thread sleeps in `ppoll` until a
//! frame arrives or the earliest held frame is due. Dropping the [`Link`] stops the thread.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns;

mod sys;

pub(crate) use sys::disable_offloads;
#[cfg(test)]
use sys::ifname_array;
use sys::{wait, Batch, PacketSocket};

/// The delay every emulated uplink starts with, in each direction.
pub const DEFAULT_DELAY: Duration = Duration::from_millis(20);

/// Longest delay `set_wan` accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Addresses an uplink may be far from ([`Link::set_far`]).
pub const MAX_FAR: usize = 4;

/// Frames held per direction. At 1514 bytes that is 12 MiB in flight: 5 Gbit/s at 20 ms,
/// 330 Mbit/s at 300 ms. Beyond that the queue tail-drops, like a router's buffer. (2048 was
/// measured too small: four TCP streams at 20 ms lost 8% of their frames to tail drops.)
const QUEUE_FRAMES: usize = 8192;

/// Bytes per ring slot: an Ethernet frame at MTU 1500 is 1514; larger ones are dropped.
const SLOT: usize = 2048;

/// Frames per `recvmmsg`/`sendmmsg` call.
const BATCH: usize = 64;

/// `recvmmsg` calls per wake-up and socket, so one busy direction cannot starve the other.
const BATCHES_PER_WAKE: usize = 4;

/// Socket buffers for the AF_PACKET sockets.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Delay and loss of one uplink, applied in each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WanProfile {
    /// One-way delay added to every frame.
    pub delay: Duration,
    /// Fraction of frames dropped, 0.0 ..= 1.0, independently per frame and direction.
    pub loss: f64,
}

impl WanProfile {
    /// `delay` each way, no loss.
    pub fn delay(delay: Duration) -> WanProfile {
        WanProfile { delay, loss: 0.0 }
    }

    /// This profile with `loss` (a fraction, 0.0 ..= 1.0).
    pub fn with_loss(self, loss: f64) -> WanProfile {
        WanProfile { loss, ..self }
    }

    /// Fails unless the delay is at most [`MAX_DELAY`] and the loss a fraction.
    pub fn validate(&self) -> Result<()> {
        if self.delay > MAX_DELAY {
            bail!(
                "WAN delay {:?} is longer than the emulator's limit {MAX_DELAY:?}",
                self.delay
            );
        }
        if !(0.0..=1.0).contains(&self.loss) {
            bail!("WAN loss {} is not a fraction in 0.0..=1.0", self.loss);
        }
        Ok(())
    }
}

impl Default for WanProfile {
    /// [`DEFAULT_DELAY`] each way, no loss.
    fn default() -> WanProfile {
        WanProfile::delay(DEFAULT_DELAY)
    }
}

/// Frame counts of one direction of an uplink since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Frames passed on.
    pub forwarded: u64,
    /// Frames dropped by the loss setting.
    pub lost: u64,
    /// Frames dropped because the queue was full (tail drop).
    pub overflowed: u64,
    /// Frames the far end refused when they were due (its backlog was full or it was down).
    pub refused: u64,
    /// Frames dropped because they were larger than a slot (offloads left on?) or runts.
    pub malformed: u64,
}

/// Frame counts of an uplink: `up` is node → internet, `down` internet → node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WanStats {
    pub up: DirectionStats,
    pub down: DirectionStats,
}

/// A running emulator on one uplink. Dropping it stops and joins the thread.
pub(crate) struct Link {
    label: String,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Link {
    /// Starts the emulator thread for the uplink whose halves are `node_end` and `bridge_end`
    /// in namespace `inet`; returns once both sockets are open. `seed` drives the loss draws.
    pub(crate) fn start(
        inet: &str,
        node_end: &str,
        bridge_end: &str,
        profile: WanProfile,
        seed: u64,
        label: &str,
    ) -> Result<Link> {
        profile.validate()?;
        let control = Arc::new(Control::new(profile)?);
        let ns = File::open(netns::path(inet))
            .with_context(|| format!("opening namespace {inet} for the WAN emulator"))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (node_end, bridge_end) = (node_end.to_owned(), bridge_end.to_owned());
        let thread_control = Arc::clone(&control);
        let thread = std::thread::Builder::new()
            .name(format!("wan-{label}"))
            .spawn(move || {
                let sockets = netns::enter(&ns).and_then(|()| {
                    Ok((
                        PacketSocket::open(&node_end)?,
                        PacketSocket::open(&bridge_end)?,
                    ))
                });
                match sockets {
                    Ok((node, bridge)) => {
                        let _ = ready_tx.send(Ok(()));
                        run(&thread_control, &node, &bridge, seed);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting a WAN emulator thread")?;
        let mut link = Link {
            label: label.to_owned(),
            control,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(link),
            Ok(Err(e)) => {
                link.stop();
                Err(e.context(format!("setting up the WAN emulator for {label}")))
            }
            Err(_) => {
                link.stop();
                bail!("the WAN emulator for {label} did not start")
            }
        }
    }

    /// The uplink's current profile.
    pub(crate) fn profile(&self) -> WanProfile {
        self.control.profile()
    }

    /// Applies `profile` to frames arriving from now on.
    pub(crate) fn set(&self, profile: WanProfile) -> Result<()> {
        profile.validate()?;
        self.control.set(profile);
        Ok(())
    }

    /// Frames to or from any of `ips` (IPv4 source or destination) get `extra` on top of the
    /// profile's delay, each way, from now on; an empty `ips` ends it. At most [`MAX_FAR`]
    /// addresses; frames already held keep their due time.
    pub(crate) fn set_far(&self, ips: &[Ipv4Addr], extra: Duration) -> Result<()> {
        validate_far(ips, extra)?;
        self.control.set_far(ips, extra);
        Ok(())
    }

    /// Frame counts so far.
    pub(crate) fn stats(&self) -> WanStats {
        WanStats {
            up: self.control.stats[UP].snapshot(),
            down: self.control.stats[DOWN].snapshot(),
        }
    }

    /// Tells the thread to stop (without waiting for it).
    pub(crate) fn signal_stop(&self) {
        self.control.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.control.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                8,
            );
        }
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("rally-lab: the WAN emulator for {} panicked", self.label);
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop();
    }
}

const UP: usize = 0;
const DOWN: usize = 1;

/// What the lab and the thread share.
struct Control {
    delay_ns: AtomicU64,
    /// A frame is lost when a uniform 32-bit draw falls below this (2^32 loses every frame).
    loss_threshold: AtomicU64,
    /// The loss fraction as set (`f64` bits), for reading back.
    loss_bits: AtomicU64,
    /// Extra delay of frames to or from the `far` addresses.
    far_ns: AtomicU64,
    /// IPv4 addresses (host order; 0: unused) whose frames get `far_ns` more.
    far: [AtomicU32; MAX_FAR],
    stop: AtomicBool,
    /// An eventfd that wakes the thread for `stop`.
    wake: OwnedFd,
    stats: [Counters; 2],
}

impl Control {
    fn new(profile: WanProfile) -> Result<Control> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("creating an eventfd");
        }
        let control = Control {
            delay_ns: AtomicU64::new(0),
            loss_threshold: AtomicU64::new(0),
            loss_bits: AtomicU64::new(0),
            far_ns: AtomicU64::new(0),
            far: Default::default(),
            stop: AtomicBool::new(false),
            // SAFETY: `fd` was just created and is owned by nothing else.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            stats: Default::default(),
        };
        control.set(profile);
        Ok(control)
    }

    fn set(&self, profile: WanProfile) {
        let delay = u64::try_from(profile.delay.as_nanos()).unwrap_or(u64::MAX);
        self.delay_ns.store(delay, Ordering::Relaxed);
        self.loss_threshold
            .store(loss_threshold(profile.loss), Ordering::Relaxed);
        self.loss_bits
            .store(profile.loss.to_bits(), Ordering::Relaxed);
    }

    fn set_far(&self, ips: &[Ipv4Addr], extra: Duration) {
        let extra = u64::try_from(extra.as_nanos()).unwrap_or(u64::MAX);
        self.far_ns.store(extra, Ordering::Relaxed);
        for (i, slot) in self.far.iter().enumerate() {
            let ip = ips.get(i).map_or(0, |ip| u32::from(*ip));
            slot.store(ip, Ordering::Relaxed);
        }
    }

    /// The far addresses as set, and their extra delay.
    fn far(&self) -> ([u32; MAX_FAR], Duration) {
        (
            self.far.each_ref().map(|a| a.load(Ordering::Relaxed)),
            Duration::from_nanos(self.far_ns.load(Ordering::Relaxed)),
        )
    }

    fn profile(&self) -> WanProfile {
        WanProfile {
            delay: Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed)),
            loss: f64::from_bits(self.loss_bits.load(Ordering::Relaxed)),
        }
    }
}

/// Fails unless `ips` fit [`MAX_FAR`], none is 0.0.0.0, and `extra` is within [`MAX_DELAY`].
fn validate_far(ips: &[Ipv4Addr], extra: Duration) -> Result<()> {
    if ips.len() > MAX_FAR {
        bail!(
            "{} far addresses; the WAN emulator takes at most {MAX_FAR}",
            ips.len()
        );
    }
    if ips.iter().any(Ipv4Addr::is_unspecified) {
        bail!("0.0.0.0 cannot be a far address");
    }
    if extra > MAX_DELAY {
        bail!("extra delay {extra:?} is longer than the emulator's limit {MAX_DELAY:?}");
    }
    Ok(())
}

/// Whether Ethernet frame `frame` is IPv4 from or to one of `far` (0 entries are unused).
fn is_far(frame: &[u8], far: &[u32; MAX_FAR]) -> bool {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || far.iter().all(|&ip| ip == 0) {
        return false;
    }
    let word =
        |at: usize| u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let (src, dst) = (word(26), word(30));
    far.iter().any(|&ip| ip != 0 && (ip == src || ip == dst))
}

/// `loss` as a threshold for 32-bit draws.
fn loss_threshold(loss: f64) -> u64 {
    (loss.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    overflowed: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// The emulator loop: until told to stop, moves frames node → bridge (`up`) and
/// bridge → node (`down`), each after the delay.
fn run(control: &Control, node: &PacketSocket, bridge: &PacketSocket, seed: u64) {
    let mut up = Lane::new();
    let mut down = Lane::new();
    let mut rng = SplitMix64(seed);
    let mut io = Batch::new();
    let wake = control.wake.as_raw_fd();
    while !control.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        up.release(now, bridge, &control.stats[UP], &mut io);
        down.release(now, node, &control.stats[DOWN], &mut io);
        let next_due = match (up.next_due(), down.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = next_due.map(|due| due.saturating_duration_since(now));
        let ready = match wait([node.fd(), bridge.fd(), wake], timeout) {
            Ok(ready) => ready,
            Err(e) => {
                eprintln!("rally-lab: WAN emulator: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let now = Instant::now();
        let delay = Duration::from_nanos(control.delay_ns.load(Ordering::Relaxed));
        let loss = control.loss_threshold.load(Ordering::Relaxed);
        let (far, far_extra) = control.far();
        let arrival = Arrival {
            due: now + delay,
            loss,
            far,
            far_due: now + delay + far_extra,
        };
        if ready[0] {
            up.receive(node, arrival, &mut rng, &control.stats[UP], &mut io);
        }
        if ready[1] {
            down.receive(bridge, arrival, &mut rng, &control.stats[DOWN], &mut io);
        }
        if ready[2] {
            let mut buf = 0u64;
            // SAFETY: reads 8 bytes into a live u64 from our eventfd.
            unsafe {
                libc::read(wake, (&mut buf as *mut u64).cast(), 8);
            }
        }
    }
}

/// How frames arriving now are treated.
#[derive(Clone, Copy)]
struct Arrival {
    due: Instant,
    loss: u64,
    /// The far addresses ([`Link::set_far`]) and the due time of their frames.
    far: [u32; MAX_FAR],
    far_due: Instant,
}

/// One direction of an uplink: the ring every frame is received into, and the ring that
/// frames to or from a far address move to, so their longer wait holds back nothing else.
struct Lane {
    near: Queue,
    far: Queue,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            near: Queue::new(QUEUE_FRAMES),
            far: Queue::new(QUEUE_FRAMES),
        }
    }

    fn next_due(&self) -> Option<Instant> {
        match (self.near.next_due(), self.far.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn receive(
        &mut self,
        sock: &PacketSocket,
        arrival: Arrival,
        rng: &mut SplitMix64,
        counters: &Counters,
        io: &mut Batch,
    ) {
        self.near
            .receive(sock, arrival, rng, counters, io, &mut self.far);
    }

    fn release(&mut self, now: Instant, sock: &PacketSocket, counters: &Counters, io: &mut Batch) {
        self.near.release(now, sock, counters, io);
        self.far.release(now, sock, counters, io);
    }
}

/// Frames held for one direction: a ring of fixed slots, first in first out.
struct Queue {
    buf: Vec<u8>,
    len: Vec<u16>,
    due: Vec<Instant>,
    head: usize,
    count: usize,
}

impl Queue {
    fn new(frames: usize) -> Queue {
        // Zeroed memory is mapped lazily, and the ring restarts at slot 0 whenever it empties,
        // so an idle uplink only ever touches its first few slots.
        Queue {
            buf: vec![0; frames * SLOT],
            len: vec![0; frames],
            due: vec![Instant::now(); frames],
            head: 0,
            count: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.len.len()
    }

    fn next_due(&self) -> Option<Instant> {
        (self.count > 0).then(|| self.due[self.head])
    }

    /// Reads what `sock` has (a few batches at most) into free slots; drops what the loss
    /// setting or a full queue says to drop.
    fn receive(
        &mut self,
        sock: &PacketSocket,
        arrival: Arrival,
        rng: &mut SplitMix64,
        counters: &Counters,
        io: &mut Batch,
        far: &mut Queue,
    ) {
        for _ in 0..BATCHES_PER_WAKE {
            let cap = self.capacity();
            let tail = (self.head + self.count) % cap;
            let free = cap - self.count;
            let room = free.min(cap - tail).min(BATCH);
            let wanted = if room == 0 { BATCH } else { room };
            let received = if room == 0 {
                // Full: read into one scratch slot and discard, so the socket does not stay
                // readable and the loop does not spin.
                let n = io.recv_scratch(sock.fd());
                Counters::add(&counters.overflowed, n);
                n
            } else {
                let base = self.buf[tail * SLOT..].as_mut_ptr();
                let n = io.recv(sock.fd(), base, room);
                let mut kept = 0;
                let (mut lost, mut malformed) = (0, 0);
                for i in 0..n {
                    let (len, truncated, outgoing) = io.received(i);
                    if outgoing {
                        continue;
                    }
                    if truncated || len < 14 {
                        malformed += 1;
                        continue;
                    }
                    if u64::from(rng.next_u32()) < arrival.loss {
                        lost += 1;
                        continue;
                    }
                    let frame = &self.buf[(tail + i) * SLOT..(tail + i) * SLOT + len];
                    if is_far(frame, &arrival.far) {
                        if !far.push(frame, arrival.far_due) {
                            Counters::add(&counters.overflowed, 1);
                        }
                        continue;
                    }
                    let (from, to) = (tail + i, tail + kept);
                    if from != to {
                        self.buf
                            .copy_within(from * SLOT..from * SLOT + len, to * SLOT);
                    }
                    self.len[to] = len as u16;
                    self.due[to] = arrival.due;
                    kept += 1;
                }
                self.count += kept;
                Counters::add(&counters.lost, lost);
                Counters::add(&counters.malformed, malformed);
                n
            };
            if received < wanted {
                return;
            }
        }
    }

    /// Copies `frame` into the tail slot, due at `due`; false if the ring is full.
    fn push(&mut self, frame: &[u8], due: Instant) -> bool {
        let cap = self.capacity();
        if self.count == cap {
            return false;
        }
        let tail = (self.head + self.count) % cap;
        self.buf[tail * SLOT..tail * SLOT + frame.len()].copy_from_slice(frame);
        self.len[tail] = frame.len() as u16;
        self.due[tail] = due;
        self.count += 1;
        true
    }

    /// Sends every frame that is due to `sock`.
    fn release(&mut self, now: Instant, sock: &PacketSocket, counters: &Counters, io: &mut Batch) {
        while self.count > 0 && self.due[self.head] <= now {
            let cap = self.capacity();
            let limit = self.count.min(cap - self.head).min(BATCH);
            let mut n = 1;
            while n < limit && self.due[self.head + n] <= now {
                n += 1;
            }
            let sent = io.send(sock.fd(), &self.buf, &self.len, self.head, n);
            let advanced = match sent {
                Ok(sent) => {
                    Counters::add(&counters.forwarded, sent);
                    sent
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
                Err(_) => {
                    // Refused by the far end (backlog full, device down): that frame is lost.
                    Counters::add(&counters.refused, 1);
                    1
                }
            };
            self.head = (self.head + advanced) % cap;
            self.count -= advanced;
        }
        if self.count == 0 {
            self.head = 0;
        }
    }
}

/// A small seeded generator for the loss draws (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
}

#[cfg(test)]
mod tests;

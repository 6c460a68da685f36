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

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns;

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

/// Turns off segmentation, receive coalescing, scatter-gather and checksum offload on device
/// `ifname` of the calling thread's namespace, so frames crossing the emulator are whole and
/// carry real checksums (`ethtool -K IF tso off gso off gro off sg off tx off`, without
/// needing ethtool).
pub(crate) fn disable_offloads(ifname: &str) -> Result<()> {
    // Legacy ethtool commands; the kernel maps each onto the matching netdev feature.
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const ETHTOOL_SSG: u32 = 0x19;
    const ETHTOOL_STSO: u32 = 0x1f;
    const ETHTOOL_SGSO: u32 = 0x24;
    const ETHTOOL_SGRO: u32 = 0x2c;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;

    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfreqData {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }

    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let mut req = IfreqData {
        name: ifname_array(ifname)?,
        data: std::ptr::null_mut(),
        _pad: [0; 16],
    };
    for cmd in [
        ETHTOOL_STSO,
        ETHTOOL_SGSO,
        ETHTOOL_SGRO,
        ETHTOOL_SSG,
        ETHTOOL_STXCSUM,
    ] {
        let mut value = EthtoolValue { cmd, data: 0 };
        req.data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: `req` is an ifreq-shaped struct whose data points at a live ethtool_value.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("ethtool command {cmd:#x} on {ifname}"));
        }
    }
    Ok(())
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

/// Reusable `recvmmsg`/`sendmmsg` arrays. They hold raw pointers into a `Queue`, valid only
/// during one call.
struct Batch {
    hdrs: [libc::mmsghdr; BATCH],
    iovs: [libc::iovec; BATCH],
    addrs: [libc::sockaddr_ll; BATCH],
    scratch: Box<[u8; SLOT]>,
}

impl Batch {
    fn new() -> Batch {
        // SAFETY: all three are plain C structs for which all-zero is a valid value.
        unsafe {
            Batch {
                hdrs: mem::zeroed(),
                iovs: mem::zeroed(),
                addrs: mem::zeroed(),
                scratch: Box::new([0; SLOT]),
            }
        }
    }

    /// Receives up to `room` frames into consecutive slots starting at `base`; returns how many.
    fn recv(&mut self, fd: RawFd, base: *mut u8, room: usize) -> usize {
        for i in 0..room {
            self.iovs[i] = libc::iovec {
                // SAFETY: the caller guarantees `room` slots of SLOT bytes from `base`.
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: SLOT,
            };
            self.point(i);
        }
        // SAFETY: the first `room` headers point at live iovecs, buffers and addresses.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                room as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(n).unwrap_or(0)
    }

    /// Receives and discards up to a batch of frames; returns how many.
    fn recv_scratch(&mut self, fd: RawFd) -> usize {
        let mut n = 0;
        while n < BATCH {
            // SAFETY: reads at most SLOT bytes into the scratch buffer.
            let rc = unsafe {
                libc::recv(
                    fd,
                    self.scratch.as_mut_ptr().cast(),
                    SLOT,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if rc < 0 {
                break;
            }
            n += 1;
        }
        n
    }

    /// Frame `i` of the last `recv`: (length, truncated, outgoing).
    fn received(&self, i: usize) -> (usize, bool, bool) {
        let hdr = &self.hdrs[i];
        let len = hdr.msg_len as usize;
        let truncated = len > SLOT || hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let outgoing = self.addrs[i].sll_pkttype == PACKET_OUTGOING;
        (len.min(SLOT), truncated, outgoing)
    }

    /// Sends slots `first .. first + n` of `buf` (lengths in `len`); returns how many went.
    fn send(
        &mut self,
        fd: RawFd,
        buf: &[u8],
        len: &[u16],
        first: usize,
        n: usize,
    ) -> io::Result<usize> {
        for i in 0..n {
            let slot = first + i;
            self.iovs[i] = libc::iovec {
                iov_base: buf[slot * SLOT..].as_ptr() as *mut libc::c_void,
                iov_len: usize::from(len[slot]),
            };
            self.hdrs[i] = libc::mmsghdr {
                // SAFETY: msghdr is a plain C struct; all-zero is valid.
                msg_hdr: unsafe { mem::zeroed() },
                msg_len: 0,
            };
            self.hdrs[i].msg_hdr.msg_iov = &mut self.iovs[i];
            self.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `n` headers point at live iovecs over `buf`, which the kernel only
        // reads. The socket is bound to its device, so no address is needed.
        let rc = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// Points header `i` at iovec `i` and address `i`.
    fn point(&mut self, i: usize) {
        // SAFETY: msghdr is a plain C struct; all-zero is valid.
        self.hdrs[i].msg_hdr = unsafe { mem::zeroed() };
        self.hdrs[i].msg_hdr.msg_iov = &mut self.iovs[i];
        self.hdrs[i].msg_hdr.msg_iovlen = 1;
        self.hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_ll).cast();
        self.hdrs[i].msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as u32;
        self.hdrs[i].msg_len = 0;
    }
}

/// `sll_pkttype` of frames this host sent (linux/if_packet.h).
const PACKET_OUTGOING: u8 = 4;
/// Socket option: do not deliver our own outgoing frames back to us (Linux ≥ 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// An AF_PACKET raw socket bound to one device, in promiscuous mode.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens the socket on `ifname` in the calling thread's namespace.
    fn open(ifname: &str) -> Result<PacketSocket> {
        let cname = CString::new(ifname)?;
        // SAFETY: `cname` is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("no device {ifname}"));
        }
        // Protocol 0 receives nothing until bound, so no other device's frames slip in.
        let fd = socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
        .context("opening an AF_PACKET socket")?;
        // SAFETY: sockaddr_ll is a plain C struct; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: binds to a live sockaddr_ll of the stated size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("binding to {ifname}"));
        }
        // SAFETY: packet_mreq is a plain C struct; all-zero is valid.
        let mut mreq: libc::packet_mreq = unsafe { mem::zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
            .with_context(|| format!("promiscuous mode on {ifname}"))?;
        // Best effort: frames marked outgoing are skipped in any case.
        let _ = setsockopt(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1);
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &SOCKET_BUFFER)
            .context("SO_RCVBUFFORCE")?;
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &SOCKET_BUFFER)
            .context("SO_SNDBUFFORCE")?;
        Ok(PacketSocket { fd })
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: no timeout). Returns which
/// are readable. A socket error (e.g. its device went down) is read and cleared, so it does not
/// wake the loop again.
fn wait(fds: [RawFd; 3], timeout: Option<Duration>) -> io::Result<[bool; 3]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: three live pollfds and an optional live timespec.
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), 3, ts_ptr, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok([false; 3]);
        }
        return Err(e);
    }
    for p in &pfds {
        if p.revents & libc::POLLERR != 0 {
            let mut err: libc::c_int = 0;
            let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: reads SO_ERROR into a live c_int.
            unsafe {
                libc::getsockopt(
                    p.fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut err as *mut libc::c_int).cast(),
                    &mut len,
                );
            }
        }
    }
    Ok(pfds.map(|p| p.revents & libc::POLLIN != 0))
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(domain, ty, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(2)");
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> Result<()> {
    // SAFETY: passes a live value of its own size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context(format!("setsockopt {level}/{name}"));
    }
    Ok(())
}

/// `ifname` as a NUL-padded `IFNAMSIZ` array.
fn ifname_array(ifname: &str) -> Result<[libc::c_char; libc::IFNAMSIZ]> {
    if ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        return Err(anyhow!("bad device name {ifname:?}"));
    }
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(name)
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
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_twenty_ms_without_loss() {
        let p = WanProfile::default();
        assert_eq!(p.delay, Duration::from_millis(20));
        assert_eq!(p.loss, 0.0);
    }

    #[test]
    fn profiles_out_of_range_are_refused() {
        assert!(WanProfile::delay(Duration::from_secs(11))
            .validate()
            .is_err());
        assert!(WanProfile::default().with_loss(1.5).validate().is_err());
        assert!(WanProfile::default().with_loss(-0.1).validate().is_err());
        assert!(WanProfile::default()
            .with_loss(f64::NAN)
            .validate()
            .is_err());
        assert!(WanProfile::default().with_loss(1.0).validate().is_ok());
    }

    #[test]
    fn loss_threshold_covers_none_to_all() {
        assert_eq!(loss_threshold(0.0), 0);
        assert_eq!(loss_threshold(1.0), 1 << 32);
        assert!(u64::from(u32::MAX) < loss_threshold(1.0));
        assert_eq!(loss_threshold(0.5), 1 << 31);
    }

    #[test]
    fn profile_round_trips_through_control() {
        let c = Control::new(WanProfile::delay(Duration::from_millis(300)).with_loss(0.05))
            .expect("eventfd");
        assert_eq!(
            c.profile(),
            WanProfile::delay(Duration::from_millis(300)).with_loss(0.05)
        );
    }

    #[test]
    fn seeded_draws_lose_about_the_configured_fraction() {
        let mut rng = SplitMix64(7);
        let threshold = loss_threshold(0.05);
        let lost = (0..100_000)
            .filter(|_| u64::from(rng.next_u32()) < threshold)
            .count();
        assert!((4_500..5_500).contains(&lost), "{lost}");
    }

    /// An Ethernet frame carrying IPv4 from `src` to `dst` (header fields beyond the
    /// addresses left zero).
    fn ipv4_frame(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f
    }

    #[test]
    fn far_frames_are_ipv4_to_or_from_a_far_address() {
        let mut far = [0u32; MAX_FAR];
        far[1] = u32::from(Ipv4Addr::new(198, 51, 100, 101));
        let b = [198, 51, 100, 101];
        let other = [198, 51, 100, 11];
        assert!(is_far(&ipv4_frame(other, b), &far), "to it");
        assert!(is_far(&ipv4_frame(b, other), &far), "from it");
        assert!(!is_far(&ipv4_frame(other, [198, 51, 100, 12]), &far));
        let mut arp = ipv4_frame(b, b);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!is_far(&arp, &far), "not IPv4");
        assert!(!is_far(&ipv4_frame(b, b)[..30], &far), "runt");
        assert!(
            !is_far(&ipv4_frame([0; 4], [0; 4]), &[0; MAX_FAR]),
            "none set"
        );
    }

    #[test]
    fn far_settings_are_checked_and_round_trip() {
        let ip = Ipv4Addr::new(203, 0, 113, 7);
        assert!(validate_far(&[ip; MAX_FAR + 1], Duration::ZERO).is_err());
        assert!(validate_far(&[Ipv4Addr::UNSPECIFIED], Duration::ZERO).is_err());
        assert!(validate_far(&[ip], Duration::from_secs(11)).is_err());
        assert!(validate_far(&[ip], Duration::from_millis(50)).is_ok());
        let c = Control::new(WanProfile::default()).expect("eventfd");
        c.set_far(&[ip], Duration::from_millis(50));
        let (far, extra) = c.far();
        assert_eq!(
            (far[0], far[1], extra),
            (u32::from(ip), 0, Duration::from_millis(50))
        );
        c.set_far(&[], Duration::ZERO);
        assert_eq!(c.far().0, [0; MAX_FAR]);
    }

    #[test]
    fn a_far_frame_held_longer_does_not_hold_back_a_later_near_one() {
        let t0 = Instant::now();
        let mut lane = Lane {
            near: Queue::new(4),
            far: Queue::new(4),
        };
        let frame = ipv4_frame([1, 2, 3, 4], [5, 6, 7, 8]);
        // The far frame arrives first, due in 70 ms; a near frame then, due in 20 ms.
        assert!(lane.far.push(&frame, t0 + Duration::from_millis(70)));
        assert!(lane.near.push(&frame, t0 + Duration::from_millis(20)));
        assert_eq!(lane.next_due(), Some(t0 + Duration::from_millis(20)));
        assert_eq!(lane.far.next_due(), Some(t0 + Duration::from_millis(70)));
        for _ in 0..3 {
            assert!(lane.far.push(&frame, t0));
        }
        assert!(!lane.far.push(&frame, t0), "a full ring refuses");
        assert_eq!(lane.far.len[lane.far.head], frame.len() as u16);
    }

    #[test]
    fn device_names_must_fit_ifnamsiz() {
        assert!(ifname_array("u12a").is_ok());
        assert!(ifname_array("a-very-long-device-name").is_err());
    }
}

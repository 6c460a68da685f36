//! The emulator thread: its loop, the two lanes (directions) it moves frames through, and
//! the loss draws.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::control::{Control, Counters, DOWN, UP};
use super::queue::Queue;
use super::sys::{wait, Batch, PacketSocket};
use super::{MAX_FAR, QUEUE_FRAMES};

/// The emulator loop: until told to stop, moves frames node → bridge (`up`) and
/// bridge → node (`down`), each after the delay.
pub(super) fn run(control: &Control, node: &PacketSocket, bridge: &PacketSocket, seed: u64) {
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
pub(super) struct Arrival {
    pub(super) due: Instant,
    pub(super) loss: u64,
    /// The far addresses ([`Link::set_far`]) and the due time of their frames.
    pub(super) far: [u32; MAX_FAR],
    pub(super) far_due: Instant,
}

/// One direction of an uplink: the ring every frame is received into, and the ring that
/// frames to or from a far address move to, so their longer wait holds back nothing else.
pub(super) struct Lane {
    pub(super) near: Queue,
    pub(super) far: Queue,
}

impl Lane {
    pub(super) fn new() -> Lane {
        Lane {
            near: Queue::new(QUEUE_FRAMES),
            far: Queue::new(QUEUE_FRAMES),
        }
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        match (self.near.next_due(), self.far.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(super) fn receive(
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

    pub(super) fn release(
        &mut self,
        now: Instant,
        sock: &PacketSocket,
        counters: &Counters,
        io: &mut Batch,
    ) {
        self.near.release(now, sock, counters, io);
        self.far.release(now, sock, counters, io);
    }
}

/// A small seeded generator for the loss draws (SplitMix64).
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(super) fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
}

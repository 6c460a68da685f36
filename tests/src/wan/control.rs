//! What the lab and an emulator thread share: the profile, the far addresses and the frame
//! counters, all in atomics.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{DirectionStats, WanProfile, MAX_DELAY, MAX_FAR};

pub(super) const UP: usize = 0;
pub(super) const DOWN: usize = 1;

/// What the lab and the thread share.
pub(super) struct Control {
    pub(super) delay_ns: AtomicU64,
    /// A frame is lost when a uniform 32-bit draw falls below this (2^32 loses every frame).
    pub(super) loss_threshold: AtomicU64,
    /// The loss fraction as set (`f64` bits), for reading back.
    loss_bits: AtomicU64,
    /// Extra delay of frames to or from the `far` addresses.
    far_ns: AtomicU64,
    /// IPv4 addresses (host order; 0: unused) whose frames get `far_ns` more.
    pub(super) far: [AtomicU32; MAX_FAR],
    pub(super) stop: AtomicBool,
    /// An eventfd that wakes the thread for `stop`.
    pub(super) wake: OwnedFd,
    pub(super) stats: [Counters; 2],
}

impl Control {
    pub(super) fn new(profile: WanProfile) -> Result<Control> {
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

    pub(super) fn set(&self, profile: WanProfile) {
        let delay = u64::try_from(profile.delay.as_nanos()).unwrap_or(u64::MAX);
        self.delay_ns.store(delay, Ordering::Relaxed);
        self.loss_threshold
            .store(loss_threshold(profile.loss), Ordering::Relaxed);
        self.loss_bits
            .store(profile.loss.to_bits(), Ordering::Relaxed);
    }

    pub(super) fn set_far(&self, ips: &[Ipv4Addr], extra: Duration) {
        let extra = u64::try_from(extra.as_nanos()).unwrap_or(u64::MAX);
        self.far_ns.store(extra, Ordering::Relaxed);
        for (i, slot) in self.far.iter().enumerate() {
            let ip = ips.get(i).map_or(0, |ip| u32::from(*ip));
            slot.store(ip, Ordering::Relaxed);
        }
    }

    /// The far addresses as set, and their extra delay.
    pub(super) fn far(&self) -> ([u32; MAX_FAR], Duration) {
        (
            self.far.each_ref().map(|a| a.load(Ordering::Relaxed)),
            Duration::from_nanos(self.far_ns.load(Ordering::Relaxed)),
        )
    }

    pub(super) fn profile(&self) -> WanProfile {
        WanProfile {
            delay: Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed)),
            loss: f64::from_bits(self.loss_bits.load(Ordering::Relaxed)),
        }
    }
}

/// Fails unless `ips` fit [`MAX_FAR`], none is 0.0.0.0, and `extra` is within [`MAX_DELAY`].
pub(super) fn validate_far(ips: &[Ipv4Addr], extra: Duration) -> Result<()> {
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
pub(super) fn is_far(frame: &[u8], far: &[u32; MAX_FAR]) -> bool {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || far.iter().all(|&ip| ip == 0) {
        return false;
    }
    let word =
        |at: usize| u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let (src, dst) = (word(26), word(30));
    far.iter().any(|&ip| ip != 0 && (ip == src || ip == dst))
}

/// `loss` as a threshold for 32-bit draws.
pub(super) fn loss_threshold(loss: f64) -> u64 {
    (loss.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) forwarded: AtomicU64,
    pub(super) lost: AtomicU64,
    pub(super) overflowed: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) malformed: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }

    pub(super) fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

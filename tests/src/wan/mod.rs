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
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns;

mod control;
mod queue;
mod sys;
mod thread;

use control::{validate_far, Control, DOWN, UP};
pub(crate) use sys::disable_offloads;
#[cfg(test)]
use sys::ifname_array;
use sys::PacketSocket;
use thread::run;

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

#[cfg(test)]
mod tests;

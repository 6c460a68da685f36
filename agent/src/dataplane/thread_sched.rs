//! The data-plane thread's place in the CPU scheduler (Linux).
//!
//! Under load the thread is always runnable, and every small packet waits for it whenever it
//! waits for a CPU. Two rules, both best effort (the agent runs as root; where the kernel
//! refuses, the thread keeps what it has):
//!
//! - With the queues on, the thread always has a higher weight ([`DATAPLANE_NICE`]).
//! - **While bulk traffic flows** it takes the lowest real-time priority
//!   ([`rally_udp::thread_class`], shared with the relay's forwarding thread): bulk here is
//!   authenticated traffic only, packets read from our TUN device or a train that decrypted.
//!
//! Tried and dropped (issue 18): a short EEVDF slice (`sched_setattr`'s `sched_runtime`,
//! 100 µs) on top of the weight: the thread waited as long for a CPU per turn (270–430 µs
//! with and without it, in alternating runs) and the round trips under load did not move.

use tracing::debug;

/// Nice value of the data-plane thread.
pub const DATAPLANE_NICE: libc::c_int = -10;

/// The environment variable that overrides [`DATAPLANE_NICE`] (A/B runs).
pub const NICE_ENV: &str = "RALLY_DATAPLANE_NICE";

/// Gives the calling thread [`DATAPLANE_NICE`] (or [`NICE_ENV`]'s value).
pub fn raise_current_thread() {
    let nice = std::env::var(NICE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<libc::c_int>().ok())
        .unwrap_or(DATAPLANE_NICE);
    // SAFETY: gettid has no preconditions; setpriority on our own thread id with a plain
    // integer; a failure only leaves the priority as it was.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if r != 0 {
        debug!(
            "data-plane thread priority unchanged: {}",
            std::io::Error::last_os_error()
        );
    }
}

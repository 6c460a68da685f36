//! Rally's multi-host lab.
//!
//! A [`Lab`] is a set of Linux network namespaces: one "internet" namespace holding a bridge
//! (198.51.100.1/24, a documentation range) and one namespace per [`Host`], joined to the bridge
//! by a veth pair and addressed 198.51.100.10, .11, … NAT [`Router`]s (one namespace each, of a
//! [`NatKind`]) sit on the bridge at 198.51.100.100, .101, … with hosts behind them on
//! 192.168.x.0/24. Routers' uplinks (and those of hosts added with `add_wan_host`) pass through
//! a userspace WAN emulator ([`wan`]) that adds delay and loss, changeable at run time. Hosts
//! run real binaries — the control plane ([`ControlPlane`]) and agents ([`Agent`]) — located by
//! [`bins`]. docs/lab.md describes the address plan and the NAT recipes.
//!
//! Everything is torn down when the `Lab` is dropped, also when a test panics: every process it
//! started is ended (SIGTERM, SIGKILL after 2 s), every namespace deleted. Namespaces are named
//! `rl<pid>x<n>-<host>`, so labs in parallel tests never collide and a later run removes the
//! leftovers of a run that was killed. When a test panics, the tail of every log is printed.
//!
//! The lab needs root and `ip netns`; [`require_root`] says so loudly when they are missing —
//! tests fail rather than skip. Traffic only ever flows between the lab's own namespaces.

pub mod attack;
pub mod bench;
pub mod bins;
pub mod host;
pub mod lab;
pub mod netns;
pub mod ping;
pub mod portmap;
pub mod procs;
pub mod proxy;
pub mod rally;
pub mod relay_tcp;
pub mod roam;
pub mod router;
pub mod scenario;
pub mod star;
pub mod stun;
pub mod wan;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

pub use host::{Host, Site};
pub use lab::Lab;
pub use ping::{PingPath, PingSummary};
pub use procs::Proc;
pub use rally::{Agent, ControlPlane, Peer, Status};
pub use router::{punchable, NatKind, Router};
pub use wan::{WanProfile, WanStats};

/// Fails, loudly, unless this process is root and `ip netns` works.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "rally-lab needs root (running as uid {euid}): the lab creates network namespaces, \
             veth pairs and bridges. Run the end-to-end tests as root (CI does). Not skipping."
        );
    }
    let out = Command::new("ip").args(["netns", "list"]).output();
    match out {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "rally-lab needs network namespaces, but `ip netns list` failed ({}): {}. Not skipping.",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!("rally-lab needs iproute2's `ip` (apt-get install iproute2): {e}. Not skipping."),
    }
}

/// Set by the SIGINT/SIGTERM handler; long waits and commands give up when it is set.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (SIGINT) or SIGTERM arrived after [`install_interrupt_handler`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

extern "C" fn on_interrupt(sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // A second signal of the same kind ends the process the default way.
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// On SIGINT or SIGTERM, sets the flag [`interrupted`] reads instead of dying, so the lab's
/// waits give up and its `Drop` tears everything down. For binaries, not tests.
pub fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches an atomic and calls an async-signal-safe function.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Builds a lab, runs `test` on it, and on an error prints the tail of every log before the lab
/// is torn down (a panic prints them from `Lab`'s `Drop`). The lab is gone when this returns.
pub fn with_lab<F>(test: F) -> Result<()>
where
    F: FnOnce(&Lab) -> Result<()>,
{
    let lab = Lab::new()?;
    let result = test(&lab);
    if let Err(e) = &result {
        eprintln!("rally-lab: test failed: {e:#}");
        lab.dump_logs();
    }
    result
}

/// `e` (its whole chain on one line) followed by `logs`, so the cause reads first and the log
/// tails after it.
pub fn with_logs(e: anyhow::Error, logs: &str) -> anyhow::Error {
    anyhow!(
        "{e:#}\n===== logs (last {} lines each) =====\n{logs}",
        lab::TAIL_LINES
    )
}

/// Marks an error returned by a [`wait_until`] condition as final: stop polling at once
/// (attach it with `err.context(Abort)`).
#[derive(Debug, Clone, Copy)]
pub struct Abort;

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("gave up waiting")
    }
}

/// Polls `f` every `poll` until it returns `Ok(true)`. An `Err` from `f` counts as "not yet"
/// (and is reported if time runs out) unless it carries [`Abort`], which ends the wait at once.
/// Fails after `timeout`, naming `what`, or when the lab is interrupted.
pub fn wait_until<F>(what: &str, timeout: Duration, poll: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if e.downcast_ref::<Abort>().is_some() => {
                return Err(e.context(format!("waiting for {what}")))
            }
            Err(e) => last_err = Some(e),
        }
        if interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if start.elapsed() >= timeout {
            let err = anyhow!(
                "timed out after {:.1}s waiting for {what}",
                timeout.as_secs_f64()
            );
            return Err(match last_err {
                Some(e) => err.context(format!("last error: {e:#}")),
                None => err,
            });
        }
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_when_true() {
        let mut n = 0;
        let r = wait_until(
            "n to reach 3",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                Ok(n >= 3)
            },
        );
        assert!(r.is_ok());
        assert_eq!(n, 3);
    }

    #[test]
    fn wait_until_times_out_with_the_last_error() {
        let err = wait_until(
            "never",
            Duration::from_millis(50),
            Duration::from_millis(5),
            || Err(anyhow!("not ready: socket missing")),
        )
        .expect_err("must time out");
        let msg = format!("{err:#}");
        assert!(msg.contains("timed out") && msg.contains("never"), "{msg}");
        assert!(msg.contains("socket missing"), "{msg}");
    }

    #[test]
    fn wait_until_stops_at_an_abort() {
        let mut calls = 0;
        let started = Instant::now();
        let err = wait_until(
            "abort",
            Duration::from_secs(30),
            Duration::from_millis(5),
            || {
                calls += 1;
                Err(anyhow!("daemon exited").context(Abort))
            },
        )
        .expect_err("must abort");
        assert_eq!(calls, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(format!("{err:#}").contains("daemon exited"));
    }
}

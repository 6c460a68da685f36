//! Network namespaces: unique names, `ip` invocations, and removal of leftovers from dead runs.
//!
//! Every namespace a lab makes is named `rl<pid>x<n>-<role>`, where `<pid>` is the process that
//! made it and `<n>` counts labs within that process. The prefix makes names unique across
//! parallel tests and lets a later run recognise (and remove) namespaces whose owner died.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::procs::run_with_timeout;

/// How long a single `ip` invocation may take before it is considered hung.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// Serialises `ip netns add` within this process: the first `ip netns add` on a machine sets up
/// the shared `/run/netns` mount, and two doing so at once can trip over each other.
static NETNS_ADD_LOCK: Mutex<()> = Mutex::new(());

/// Counts labs made by this process, for unique prefixes.
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The prefix for the next lab of this process: `rl<pid>x<n>-`.
pub fn next_prefix() -> String {
    let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
    lab_prefix(std::process::id(), n)
}

/// The prefix of lab number `n` of process `pid`.
pub fn lab_prefix(pid: u32, n: u32) -> String {
    format!("rl{pid}x{n}-")
}

/// If `ns` is a lab namespace name (`rl<pid>x<n>-…`), returns `(pid, n)`.
pub fn parse_lab_ns(ns: &str) -> Option<(u32, u32)> {
    let rest = ns.strip_prefix("rl")?;
    let (pid, rest) = rest.split_once('x')?;
    let (n, _role) = rest.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(n) {
        return None;
    }
    Some((pid.parse().ok()?, n.parse().ok()?))
}

/// Parses the output of `ip netns list` (`name (id: 3)` or just `name` per line) into names.
pub fn parse_netns_list(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Runs `ip ARGS…` in the root namespace (configuration only, never traffic) and fails with
/// its stderr if it does not succeed. Returns stdout.
pub fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = run_with_timeout(cmd, IP_TIMEOUT)
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip netns exec NS ARGS…` (configuration inside a lab namespace: nft, sysctl) and fails
/// with its stderr if it does not succeed. Returns stdout.
pub fn exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    let out = run_with_timeout(cmd, IP_TIMEOUT)
        .with_context(|| format!("running {} in {ns}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` in namespace {ns} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The file `ip netns` keeps for namespace `ns`.
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Moves the calling thread (only it) into the namespace `file` refers to.
pub fn enter(file: &File) -> Result<()> {
    // SAFETY: setns(2) on an open namespace file; it affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("setns into a lab namespace");
    }
    Ok(())
}

/// Runs `f` on a short-lived thread inside namespace `ns` and returns its result. The calling
/// thread stays where it is.
pub fn in_ns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let file = File::open(path(ns)).with_context(|| format!("opening namespace {ns}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(&file)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("a thread working in namespace {ns} panicked"))?
    })
}

/// Names of all network namespaces on the machine.
pub fn list() -> Result<Vec<String>> {
    Ok(parse_netns_list(&ip(&["netns", "list"])?))
}

/// Creates namespace `ns` with its loopback up.
pub fn add(ns: &str) -> Result<()> {
    {
        let _guard = NETNS_ADD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(first) = ip(&["netns", "add", ns]) {
            // Another process may have been setting up /run/netns at the same moment: retry once.
            std::thread::sleep(Duration::from_millis(200));
            ip(&["netns", "add", ns])
                .with_context(|| format!("creating namespace {ns} (first try: {first:#})"))?;
        }
    }
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Kills every process still inside `ns` (SIGKILL) and deletes the namespace.
pub fn delete(ns: &str) -> Result<()> {
    kill_all_in(ns);
    ip(&["netns", "del", ns]).map(|_| ())
}

/// SIGKILLs every process whose network namespace is `ns` (best effort).
fn kill_all_in(ns: &str) {
    let Ok(out) = ip(&["netns", "pids", ns]) else {
        return;
    };
    for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        if pid > 1 && pid != std::process::id() as i32 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Whether process `pid` exists (it may belong to another user).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Lab namespaces among `names` whose owning process is dead.
pub fn stale_among(names: &[String], alive: impl Fn(u32) -> bool) -> Vec<String> {
    names
        .iter()
        .filter(|ns| parse_lab_ns(ns).is_some_and(|(pid, _)| !alive(pid)))
        .cloned()
        .collect()
}

/// Deletes lab namespaces left by earlier runs whose process is dead. Returns how many.
pub fn remove_stale() -> Result<usize> {
    let stale = stale_among(&list()?, pid_alive);
    // Host namespaces before the "internet" one that holds their bridge; order is cosmetic.
    for ns in &stale {
        // Another lab may be cleaning the same leftovers right now: ignore failures.
        let _ = delete(ns);
    }
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trips() {
        let p = lab_prefix(4242, 7);
        assert_eq!(p, "rl4242x7-");
        assert_eq!(parse_lab_ns(&format!("{p}alice")), Some((4242, 7)));
        assert_eq!(parse_lab_ns(&format!("{p}inet")), Some((4242, 7)));
    }

    #[test]
    fn next_prefix_is_unique_and_names_this_process() {
        let a = next_prefix();
        let b = next_prefix();
        assert_ne!(a, b);
        let (pid, _) = parse_lab_ns(&format!("{a}x")).expect("own prefix parses");
        assert_eq!(pid, std::process::id());
    }

    #[test]
    fn foreign_names_are_not_lab_namespaces() {
        for ns in [
            "",
            "rl",
            "rlx1-a",
            "rl12x-a",
            "rl12x3",
            "rla2x3-a",
            "ns1",
            "rl12y3-a",
            "rl1 2x3-a",
        ] {
            assert_eq!(parse_lab_ns(ns), None, "{ns:?}");
        }
    }

    #[test]
    fn netns_list_output_is_parsed() {
        let out = "rl1x0-alice (id: 2)\nrl1x0-inet (id: 1)\nplain\n\n";
        assert_eq!(
            parse_netns_list(out),
            ["rl1x0-alice", "rl1x0-inet", "plain"]
        );
    }

    #[test]
    fn only_dead_owners_are_stale() {
        let names: Vec<String> = [
            "rl10x0-inet",
            "rl10x0-a",
            "rl20x1-inet",
            "other",
            "rl30x0-b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let stale = stale_among(&names, |pid| pid == 20);
        assert_eq!(stale, ["rl10x0-inet", "rl10x0-a", "rl30x0-b"]);
    }

    #[test]
    fn own_process_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}

//! The reference programs the benchmarks need, installed when missing; and small readers of
//! `/proc` for CPU time and memory of the processes under test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// What the benchmarks need from outside the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Iperf3,
    /// iputils `ping`: the latency figures and every wait for a tunnel to carry traffic.
    Ping,
    /// `wg` (wireguard-tools), to configure the userspace WireGuard daemons over UAPI.
    Wg,
    WireguardGo,
    BoringtunCli,
    Perf,
    /// To turn GRO on on a lab interface (the relay benchmark's offload pass).
    Ethtool,
}

impl Tool {
    fn binary(self) -> &'static str {
        match self {
            Tool::Iperf3 => "iperf3",
            Tool::Ping => "ping",
            Tool::Wg => "wg",
            Tool::WireguardGo => "wireguard-go",
            Tool::BoringtunCli => "boringtun-cli",
            Tool::Perf => "perf",
            Tool::Ethtool => "ethtool",
        }
    }

    /// The Debian package, or `None` for a crate installed with `cargo install`.
    fn apt_package(self) -> Option<&'static str> {
        match self {
            Tool::Iperf3 => Some("iperf3"),
            Tool::Ping => Some("iputils-ping"),
            Tool::Wg => Some("wireguard-tools"),
            Tool::WireguardGo => Some("wireguard-go"),
            Tool::Perf => Some("linux-perf"),
            Tool::Ethtool => Some("ethtool"),
            Tool::BoringtunCli => None,
        }
    }
}

/// `~/.cargo/bin` (where `cargo install` puts binaries).
fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// The path of `name` on `PATH` (or in `~/.cargo/bin`), if it is installed.
pub fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(cargo_bin_dir())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The path of `tool`, failing if it is not installed.
pub fn path(tool: Tool) -> Result<PathBuf> {
    find(tool.binary()).ok_or_else(|| anyhow!("{} is not installed", tool.binary()))
}

/// Installs whatever of `tools` is missing (apt-get for Debian packages, `cargo install` for
/// boringtun-cli), saying so. Returns one line per installed tool.
pub fn ensure(tools: &[Tool]) -> Result<Vec<String>> {
    let missing: Vec<Tool> = tools
        .iter()
        .copied()
        .filter(|t| find(t.binary()).is_none())
        .collect();
    let mut installed = Vec::new();
    let apt: Vec<&str> = missing.iter().filter_map(|t| t.apt_package()).collect();
    if !apt.is_empty() {
        println!(
            "==> installing {} with apt-get (missing: {})",
            apt.join(" "),
            missing
                .iter()
                .filter(|t| t.apt_package().is_some())
                .map(|t| t.binary())
                .collect::<Vec<_>>()
                .join(", ")
        );
        run_install(Command::new("apt-get").args(["update", "-qq"]))?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&apt)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_install(&mut cmd)?;
        installed.extend(apt.iter().map(|p| format!("{p} (apt-get)")));
    }
    if missing.contains(&Tool::BoringtunCli) {
        println!("==> installing boringtun-cli with `cargo install boringtun-cli` (a few minutes)");
        run_install(Command::new("cargo").args(["install", "boringtun-cli"]))?;
        installed.push("boringtun-cli (cargo install)".to_owned());
    }
    for t in tools {
        if find(t.binary()).is_none() {
            bail!("{} is still missing after installing it", t.binary());
        }
    }
    Ok(installed)
}

fn run_install(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// A WireGuard key pair in the base64 text form `wg` uses: (private, public).
pub fn wg_keypair() -> Result<(String, String)> {
    let wg = path(Tool::Wg)?;
    let private = Command::new(&wg)
        .arg("genkey")
        .output()
        .context("wg genkey")?;
    if !private.status.success() {
        bail!("wg genkey failed");
    }
    let private = String::from_utf8_lossy(&private.stdout).trim().to_owned();
    let mut child = Command::new(&wg)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("wg pubkey")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        writeln!(stdin, "{private}")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("wg pubkey failed");
    }
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

/// Clock ticks per second for `/proc/PID/stat` times.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time (user + system, all threads) that process `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    Ok((utime + stime) / ticks_per_sec())
}

/// Context switches (voluntary and not) of every thread of process `pid` so far: how often it
/// was woken, from `/proc/PID/task/*/status` (a thread that exits takes its count with it).
pub fn context_switches(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(task) = task else { continue };
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += switches_in_status(&status);
    }
    Ok(total)
}

/// Context switches per thread name (`/proc/PID/task/*/comm`) of process `pid` so far: which
/// threads wake (threads of one name, such as tokio's workers, are added up).
pub fn context_switches_by_thread(pid: u32) -> Result<BTreeMap<String, u64>> {
    let dir = format!("/proc/{pid}/task");
    let mut by = BTreeMap::new();
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(task) = task else { continue };
        let (Ok(status), Ok(comm)) = (
            std::fs::read_to_string(task.path().join("status")),
            std::fs::read_to_string(task.path().join("comm")),
        ) else {
            continue;
        };
        *by.entry(comm.trim().to_owned()).or_insert(0) += switches_in_status(&status);
    }
    Ok(by)
}

/// CPU time of every thread of process `pid` so far, in seconds, to the nanosecond: the sum of
/// the first field of `/proc/PID/task/*/schedstat` (`cpu_seconds` counts in clock ticks of
/// 10 ms, too coarse for a process that is nearly idle; a thread that exits takes its time
/// with it here).
pub fn thread_cpu_seconds(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(task) = task else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(ns as f64 / 1e9)
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of one `/proc/…/status`.
fn switches_in_status(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        })
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, …), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// The pid of the newest process whose command line contains every one of `needles`.
pub fn find_pid(needles: &[&str]) -> Result<u32> {
    let mut best: Option<u32> = None;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if needles.iter().all(|n| cmd.contains(n)) && best.is_none_or(|b| pid > b) {
            best = Some(pid);
        }
    }
    best.ok_or_else(|| anyhow!("no process with {needles:?} in its command line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).expect("stat") >= 0.0);
        assert!(status_kib(me, "VmRSS").expect("rss") > 0);
        assert!(status_kib(me, "VmHWM").expect("hwm") > 0);
        assert!(context_switches(me).expect("switches") > 0);
        assert!(thread_cpu_seconds(me).expect("schedstat") > 0.0);
    }

    #[test]
    fn both_kinds_of_context_switch_are_summed() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(switches_in_status(status), 127);
    }
}

//! Where the data path's time goes under a one-stream iperf3 load: `perf stat` (system calls,
//! CPU time) and `perf record` (flat profile by symbol, software clock: this VM has no hardware
//! counters) on the sending and the receiving daemon, for Rally and for the two reference
//! WireGuards, with the UDP datagram counts of each namespace (`/proc/net/snmp`) to turn them
//! into per-packet figures.

use std::path::Path as FsPath;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use super::stats::Figure;
use super::tools::{self, Tool};
use super::tunnels::{start_iperf_server, Datapath, Path, IPERF_PORT};
use crate::Host;

/// Seconds per measuring window.
const WINDOW: u64 = 3;

/// UDP datagrams in and out of a namespace so far.
fn udp_counts(host: &Host) -> Result<(u64, u64)> {
    let snmp = host.run_ok(&["cat", "/proc/net/snmp"])?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (
        lines.next().ok_or_else(|| anyhow!("no Udp: header"))?,
        lines.next().ok_or_else(|| anyhow!("no Udp: values"))?,
    );
    let field = |name: &str| -> Result<u64> {
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .ok_or_else(|| anyhow!("no {name} in /proc/net/snmp"))?;
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("bad {name} in /proc/net/snmp"))
    };
    Ok((field("InDatagrams")?, field("OutDatagrams")?))
}

/// Bytes through `eth0` of a namespace so far: (received, sent).
fn wire_bytes(host: &Host) -> Result<(u64, u64)> {
    let read = |what: &str| -> Result<u64> {
        let path = format!("/sys/class/net/eth0/statistics/{what}");
        host.run_ok(&["cat", path.as_str()])?
            .trim()
            .parse()
            .map_err(|e| anyhow!("{path}: {e}"))
    };
    Ok((read("rx_bytes")?, read("tx_bytes")?))
}

/// An Ethernet frame carrying a full-size WireGuard data packet of a 1420-byte TUN MTU:
/// 1420 + 32 (WireGuard) + 8 (UDP) + 20 (IPv4) + 14 (Ethernet).
const FULL_FRAME: f64 = 1494.0;

/// `perf stat` on `pid` for the window: (system calls, CPU ms).
fn perf_stat(pid: u32) -> Result<(f64, f64)> {
    let perf = tools::path(Tool::Perf)?;
    let out = std::process::Command::new(perf)
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,task-clock",
            "-p",
            &pid.to_string(),
            "--",
            "sleep",
            &WINDOW.to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let value = |event: &str| {
        text.lines()
            .find(|l| l.split(',').nth(2).is_some_and(|e| e.starts_with(event)))
            .and_then(|l| l.split(',').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (value("raw_syscalls:sys_enter"), value("task-clock")) {
        (Some(s), Some(ms)) => Ok((s, ms)),
        _ => bail!("perf stat gave no counts: {}", text.trim()),
    }
}

/// `perf record` on `pid` for the window; returns the report's top lines (self time by DSO and
/// symbol) and writes the full report to `report`.
fn perf_record(pid: u32, report: &FsPath) -> Result<String> {
    let perf = tools::path(Tool::Perf)?;
    let data = report.with_extension("data");
    let out = std::process::Command::new(&perf)
        .args(["record", "-q", "-e", "cpu-clock", "-F", "1999", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep", &WINDOW.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(&perf)
        .args(["report", "--stdio", "--no-children", "--sort", "dso,sym"])
        .arg("-i")
        .arg(&data)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(report, &text)?;
    let _ = std::fs::remove_file(&data);
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(25)
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Profiles every tunnel path of `dp` (Rally first) under load; writes the perf reports to
/// `out_dir` and returns per-packet figures.
pub fn run(dp: &Datapath, out_dir: &FsPath) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for path in dp.paths.iter().filter(|p| p.subject.is_tunnel()) {
        if path.pids.len() != 2 {
            continue;
        }
        println!(
            "==> profile: {} under a one-stream iperf3 a→b",
            path.subject.label()
        );
        figures.extend(profile_path(path, out_dir)?);
    }
    Ok(figures)
}

fn profile_path(path: &Path, out_dir: &FsPath) -> Result<Vec<Figure>> {
    let iperf = tools::path(Tool::Iperf3)?.to_string_lossy().into_owned();
    let target = path.target.to_string();
    let port = IPERF_PORT.to_string();
    let secs = (WINDOW * 4 + 4).to_string();
    let server = start_iperf_server(&path.server)?;
    let load = path.client.spawn(
        &[
            iperf.as_str(),
            "-c",
            target.as_str(),
            "-p",
            port.as_str(),
            "-t",
            secs.as_str(),
        ],
        path.client.log_path("iperf3-profile"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let tag = path
        .subject
        .label()
        .replace([' ', '(', ')'], "")
        .replace("-cli", "");
    let mut figures = Vec::new();
    for (side, pid, host) in [
        ("sender", path.pids[0], &path.client),
        ("receiver", path.pids[1], &path.server),
    ] {
        let (in0, out0) = udp_counts(host)?;
        let (rx0, tx0) = wire_bytes(host)?;
        let (syscalls, cpu_ms) = perf_stat(pid)?;
        let (in1, out1) = udp_counts(host)?;
        let (rx1, tx1) = wire_bytes(host)?;
        let (datagrams, bytes) = if side == "sender" {
            (out1 - out0, tx1 - tx0)
        } else {
            (in1 - in0, rx1 - rx0)
        };
        // UDP GSO/GRO count a whole train as one datagram: per-packet figures use the bytes.
        let packets = (bytes as f64 / FULL_FRAME).max(1.0);
        let per_pkt = syscalls / packets;
        let us_per_pkt = cpu_ms * 1000.0 / packets;
        let per_send = packets / (datagrams as f64).max(1.0);
        println!(
            "    {side}: {:.0} Mbit/s on the wire = {:.0} full-size packets/s in {:.0} UDP sends or receives/s \
             ({per_send:.1} packets each); {per_pkt:.3} syscalls and {us_per_pkt:.2} µs CPU per packet",
            bytes as f64 * 8.0 / WINDOW as f64 / 1e6,
            packets / WINDOW as f64,
            datagrams as f64 / WINDOW as f64,
        );
        let who = path.subject.label();
        for (metric, unit, v) in [
            ("syscalls per full-size packet", "syscalls", per_pkt),
            ("CPU per full-size packet", "µs", us_per_pkt),
            (
                "full-size packets per UDP send/receive",
                "packets",
                per_send,
            ),
            (
                "wire throughput",
                "Mbit/s",
                bytes as f64 * 8.0 / WINDOW as f64 / 1e6,
            ),
        ] {
            figures.push(Figure::new(
                "profile",
                &format!("{side}: {metric}"),
                who,
                unit,
                vec![v],
            ));
        }
        let report = out_dir.join(format!("perf-{tag}-{side}.txt"));
        let top = perf_record(pid, &report)?;
        println!(
            "    {side} profile (self time; full report {}):",
            report.display()
        );
        for l in top.lines().take(12) {
            println!("      {l}");
        }
    }
    if load.wait_timeout(Duration::from_secs(15))?.is_none() {
        load.terminate(Duration::from_secs(2))?;
    }
    if server.wait_timeout(Duration::from_secs(2))?.is_none() {
        server.terminate(Duration::from_secs(1))?;
    }
    Ok(figures)
}

/// Whether `perf` can count here at all (`perf stat -e task-clock true`).
pub fn perf_works() -> bool {
    tools::path(Tool::Perf).is_ok_and(|p| {
        std::process::Command::new(p)
            .args(["stat", "-e", "task-clock", "true"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

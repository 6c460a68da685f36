//! Process and interface counters the idle-cost figures come from: the daemon's pid, RSS and CPU
//! time, probes sent, link bytes.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::{Agent, Host};

/// The pid of the `rally … up` daemon in `host`'s namespace (found with `ip netns pids`).
pub fn agent_pid(host: &Host) -> Result<u32> {
    let out = crate::netns::ip(&["netns", "pids", host.ns()])?;
    let mut found = Vec::new();
    for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_rally = args
            .first()
            .is_some_and(|a| a.rsplit('/').next() == Some("rally"));
        if is_rally && args.iter().any(|a| a == "up") {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no `rally up` process in {}'s namespace", host.name()),
        many => bail!(
            "{} `rally up` processes in {}'s namespace: {many:?}",
            many.len(),
            host.name()
        ),
    }
}

/// `VmRSS` of process `pid`, in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time (user + system) process `pid` has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are
    // plain: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no field {} in /proc/{pid}/stat", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// Probes this agent has sent to all its peers, summed over every path (`probes_sent` in
/// `rally metrics --json`), split into direct and relay paths.
pub fn probes_sent(agent: &Agent) -> Result<(u64, u64)> {
    let m: Value = serde_json::from_str(&agent.rally_ok(&["metrics", "--json"])?)
        .context("reading `rally metrics --json`")?;
    let (mut direct, mut relay) = (0, 0);
    for peer in m.as_array().into_iter().flatten() {
        for path in peer["paths"].as_array().into_iter().flatten() {
            let n = path["probes_sent"].as_u64().unwrap_or(0);
            if path["kind"] == "relay" {
                relay += n;
            } else {
                direct += n;
            }
        }
    }
    Ok((direct, relay))
}

/// Bytes received and sent by `dev` in `host`'s namespace since it was made
/// (`ip -s -j link show dev DEV`).
pub fn link_bytes(host: &Host, dev: &str) -> Result<LinkBytes> {
    let out = host.run_ok(&["ip", "-s", "-j", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out).context("reading `ip -s -j link`")?;
    let stats = &v[0]["stats64"];
    let get = |dir: &str, what: &str| {
        stats[dir][what]
            .as_u64()
            .ok_or_else(|| anyhow!("no {dir}.{what} for {dev} on {}: {out}", host.name()))
    };
    Ok(LinkBytes {
        rx_bytes: get("rx", "bytes")?,
        tx_bytes: get("tx", "bytes")?,
        rx_packets: get("rx", "packets")?,
        tx_packets: get("tx", "packets")?,
    })
}

/// Interface counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBytes {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl LinkBytes {
    /// Counts from `earlier` to `self`.
    pub fn since(&self, earlier: &LinkBytes) -> LinkBytes {
        LinkBytes {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
        }
    }
}

//! `rally-lab bench punch --attempts N`: a home router (endpoint-independent mapping,
//! address-and-port-dependent filtering) and a symmetric NAT (`masquerade fully-random`) go
//! direct by birthday punching, attempt after attempt, each with fresh routers, agents and
//! party. Prints each attempt, the success rate, the time from `rally party join` to the direct
//! path (both sides) and the probe budget used (the home side's `birthday` in
//! `rally peers --json`). The lab test `birthday` runs a few attempts and requires all
//! but one.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use crate::scenario::World;
use crate::{Agent, ControlPlane, Lab, NatKind};

/// How long an attempt may take to go direct (the first punch, then up to 11.3 s of birthday
/// punching).
pub const DIRECT: Duration = Duration::from_secs(25);
/// The goal: direct within this long of the join.
pub const GOAL: Duration = Duration::from_secs(10);

/// One attempt's figures.
pub struct Attempt {
    /// From `rally party join` until both sides route the pair directly.
    pub direct_after: Option<Duration>,
    /// The home side's probes and bytes.
    pub probes: u64,
    pub bytes: u64,
    /// The symmetric side's sockets.
    pub sockets: u64,
}

/// What all attempts add up to.
pub struct Summary {
    pub attempts: Vec<Attempt>,
}

impl Summary {
    pub fn direct(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.direct_after.is_some())
            .count()
    }

    /// One line: success rate, within the goal, time to direct and probes (median, max).
    pub fn line(&self) -> String {
        let mut times: Vec<Duration> = self
            .attempts
            .iter()
            .filter_map(|a| a.direct_after)
            .collect();
        times.sort();
        let mut probes: Vec<u64> = self.attempts.iter().map(|a| a.probes).collect();
        probes.sort();
        let ms = |d: Option<&Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
        let n = self.attempts.len();
        format!(
            "home router ↔ symmetric: {}/{n} direct, {}/{n} within {} s; time to direct median \
             {}, max {}; probes median {}, max {} (budget 1024 at 100/s, 64 B each)",
            times.len(),
            times.iter().filter(|t| **t <= GOAL).count(),
            GOAL.as_secs(),
            ms(times.get(times.len() / 2)),
            ms(times.last()),
            probes.get(n / 2).copied().unwrap_or(0),
            probes.last().copied().unwrap_or(0),
        )
    }
}

/// Runs `attempts` attempts in `lab` (a control plane and two relays of its own), printing
/// each as it ends.
pub fn run(lab: &Lab, attempts: usize) -> Result<Summary> {
    let world = World::start(lab)?;
    let cp = &world.cp;
    let mut out = Vec::new();
    for i in 0..attempts {
        let r = attempt(lab, cp, i)?;
        println!(
            "attempt {i}: {} · {} probes, {} bytes (home side), {} sockets (symmetric side)",
            r.direct_after.map_or("relayed".into(), |d| format!(
                "direct after {} ms",
                d.as_millis()
            )),
            r.probes,
            r.bytes,
            r.sockets
        );
        out.push(r);
    }
    Ok(Summary { attempts: out })
}

/// `rally-lab bench punch`: a lab of its own, `attempts` attempts, the summary line.
pub fn bench(attempts: usize) -> Result<()> {
    let lab = Lab::new()?;
    let s = run(&lab, attempts.max(1));
    if s.is_err() {
        lab.dump_logs();
    }
    println!("{}", s?.line());
    Ok(())
}

fn attempt(lab: &Lab, cp: &ControlPlane, i: usize) -> Result<Attempt> {
    let (a_name, b_name) = (format!("bh{i}"), format!("bs{i}"));
    let home = lab.add_router(&format!("{a_name}-gw"), NatKind::HomeRouter)?;
    let sym = lab.add_router(&format!("{b_name}-gw"), NatKind::Symmetric)?;
    let a_host = lab.add_host_behind(&home, &a_name)?;
    let b_host = lab.add_host_behind(&sym, &b_name)?;
    let mut a = Agent::start(&a_host, &a_name, cp.control())?;
    let mut b = Agent::start(&b_host, &b_name, cp.control())?;
    for agent in [&a, &b] {
        agent.wait_control_connected(Duration::from_secs(20))?;
        // Both NAT reports in before the party forms (the attempt is armed from them).
        crate::scenario::wait_netcheck(agent, Duration::from_secs(20))?;
    }
    let code = a.party_create(&format!("bday{i}"), &[])?;
    let start = Instant::now();
    let out = b.party_join(&code)?;
    if !out.status.success() {
        bail!("join failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut direct_after = None;
    while start.elapsed() < DIRECT {
        if route(&a, &b_name)? == "direct" && route(&b, &a_name)? == "direct" {
            direct_after = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if direct_after.is_some() {
        // Traffic both ways on the direct path (the symmetric side's carrying socket).
        let (a_vip, b_vip) = (a.virtual_ip()?.to_string(), b.virtual_ip()?.to_string());
        for (from, to) in [(&a, &b_vip), (&b, &a_vip)] {
            if !from.kernel_ping(to, 3)?.status.success() {
                bail!("{} cannot ping {to} on the direct path", from.name());
            }
        }
    }
    if direct_after.is_some() && i == 0 {
        // `rally peer why` lists the technique that worked.
        let why = a.rally_ok(&["peer", "why", &b_name])?;
        if !why.contains("  birthday      direct") && !why.contains("  prediction    direct") {
            bail!("`rally peer why {b_name}` does not show birthday punching:\n{why}");
        }
        println!("{why}");
    }
    let prober = row(&a, &b_name)?;
    let opener = row(&b, &a_name)?;
    let n = |v: &serde_json::Value, k: &str| v["birthday"][k].as_u64().unwrap_or(0);
    let r = Attempt {
        direct_after,
        probes: n(&prober, "probes"),
        bytes: n(&prober, "bytes"),
        sockets: n(&opener, "sockets"),
    };
    if direct_after.is_none() {
        println!("home side: {prober}\nsymmetric side: {opener}");
    }
    a.stop()?;
    b.stop()?;
    Ok(r)
}

fn row(a: &Agent, name: &str) -> Result<serde_json::Value> {
    a.peers_json()?
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow!("{} does not list {name}", a.name()))
}

fn route(a: &Agent, name: &str) -> Result<String> {
    Ok(row(a, name)?["strategy"]
        .as_str()
        .unwrap_or("none")
        .to_owned())
}

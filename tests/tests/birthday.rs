//! Birthday punching in the lab: a home router (endpoint-independent mapping, address-and-port-
//! dependent filtering) and a symmetric NAT (`masquerade fully-random`) go direct, attempt
//! after attempt, each with fresh routers, agents and party. Prints the success rate, the time
//! from `rally party join` to the direct path, and the probe budget each attempt used (the home
//! side's `birthday` in `rally peers --json`). `RALLY_PUNCH_ATTEMPTS` sets the count (default
//! 3; the figure is 20); every attempt must go direct.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use rally_lab::rally::RelayServer;
use rally_lab::{with_lab, Agent, ControlPlane, Lab, NatKind};

/// How long an attempt may take to go direct (the first punch, its fast phase, then up to
/// 11.3 s of birthday punching).
const DIRECT: Duration = Duration::from_secs(25);

struct Attempt {
    direct_after: Option<Duration>,
    probes: u64,
    bytes: u64,
    sockets: u64,
}

#[test]
fn a_home_router_and_a_symmetric_nat_go_direct() -> Result<()> {
    let attempts: usize = std::env::var("RALLY_PUNCH_ATTEMPTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    with_lab(|lab| {
        let cp_host = lab.add_wan_host("control")?;
        let r1_host = lab.add_wan_host("relay1")?;
        let r2_host = lab.add_wan_host("relay2")?;
        let (key, _) = ControlPlane::init(&cp_host, lab)?;
        let r1 = RelayServer::start(&r1_host, "r1", &key)?;
        let r2 = RelayServer::start(&r2_host, "r2", &key)?;
        let cp = ControlPlane::start_with_relays(&cp_host, lab, &[r1.spec(), r2.spec()])?;
        let mut results = Vec::new();
        for i in 0..attempts {
            let r = attempt(lab, &cp, i)?;
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
            results.push(r);
        }
        let mut times: Vec<Duration> = results.iter().filter_map(|r| r.direct_after).collect();
        times.sort();
        let mut probes: Vec<u64> = results.iter().map(|r| r.probes).collect();
        probes.sort();
        println!(
            "home router ↔ symmetric: {}/{} direct; time to direct median {:?}, max {:?}; \
             probes median {}, max {} (budget 1024)",
            times.len(),
            results.len(),
            times.get(times.len() / 2),
            times.last(),
            probes[probes.len() / 2],
            probes[probes.len() - 1]
        );
        if times.len() != results.len() {
            bail!(
                "{} of {} attempts stayed relayed",
                results.len() - times.len(),
                results.len()
            );
        }
        Ok(())
    })
}

fn attempt(lab: &Lab, cp: &ControlPlane, i: usize) -> Result<Attempt> {
    let (a_name, b_name) = (format!("bh{i}"), format!("bs{i}"));
    let home = lab.add_router(&format!("{a_name}-gw"), NatKind::HomeRouter)?;
    let sym = lab.add_router(&format!("{b_name}-gw"), NatKind::Symmetric)?;
    let a_host = lab.add_host_behind(&home, &a_name)?;
    let b_host = lab.add_host_behind(&sym, &b_name)?;
    let mut a = Agent::start(&a_host, &a_name, cp.control())?;
    let mut b = Agent::start(&b_host, &b_name, cp.control())?;
    a.wait_control_connected(Duration::from_secs(20))?;
    b.wait_control_connected(Duration::from_secs(20))?;
    // Let netcheck finish on both sides before the party forms.
    std::thread::sleep(Duration::from_secs(2));
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
        // Traffic both ways on the direct path (the symmetric side's carried socket).
        let (a_vip, b_vip) = (a.virtual_ip()?.to_string(), b.virtual_ip()?.to_string());
        for (from, to) in [(&a, &b_vip), (&b, &a_vip)] {
            if !from.kernel_ping(to, 3)?.status.success() {
                bail!("{} cannot ping {to} on the direct path", from.name());
            }
        }
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

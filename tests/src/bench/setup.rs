//! Time from `rally party join` to the first ping reply over the overlay and to the direct
//! path, across two home routers with the WAN emulator's default 20 ms per uplink (80 ms
//! between the two sites). Fresh agents every run; the baseline is the sites' own RTT, so a
//! figure also reads as "so many round trips".

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Result};

use super::datapath::parse_ping_times;
use super::stats::{median, Figure};
use super::tunnels::{control_init, serve_control, start_relay, strategy};
use super::Options;
use crate::{Agent, Host, Lab, NatKind};

const LIMIT: Duration = Duration::from_secs(30);

pub fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub fn run(opts: &Options) -> Result<Vec<Figure>> {
    let lab = Lab::new()?;
    let r = measure(&lab, opts);
    if r.is_err() {
        lab.dump_logs();
    }
    r
}

fn measure(lab: &Lab, opts: &Options) -> Result<Vec<Figure>> {
    let c = lab.add_wan_host("control")?;
    let relay = lab.add_wan_host("relay")?;
    let key = control_init(lab, &c, "setup")?;
    let (_relay, spec) = start_relay(&relay, "r1", &key, false)?;
    let control = serve_control(lab, &c, "setup", key, &[spec], &[])?;
    let mut first = Vec::new();
    let mut direct = Vec::new();
    let mut base_rtt = Vec::new();
    for run in 1..=opts.runs {
        let (t_first, t_direct, rtt) = one_join(lab, control.target(), run, opts.runs)?;
        first.push(t_first);
        direct.push(t_direct);
        base_rtt.push(rtt);
    }
    let mut f1 = Figure::new(
        "setup",
        "party join → first ping reply",
        "rally (home router ↔ home router)",
        "ms",
        first,
    );
    f1.ratio_to("site RTT", &base_rtt);
    let mut f2 = Figure::new(
        "setup",
        "party join → direct path",
        "rally (home router ↔ home router)",
        "ms",
        direct,
    );
    f2.ratio_to("site RTT", &base_rtt);
    let f3 = Figure::new("setup", "site RTT (baseline)", "raw WAN", "ms", base_rtt);
    Ok(vec![f1, f2, f3])
}

/// Run `run` of `runs`: fresh agents behind fresh home routers, bob joins alice's party.
/// Returns the join's time to the first ping reply and to the direct path (ms, NaN if not
/// reached), and the sites' RTT measured just before.
fn one_join(
    lab: &Lab,
    control: Option<(&str, &str)>,
    run: usize,
    runs: usize,
) -> Result<(f64, f64, f64)> {
    let ra = lab.add_router(&format!("ha{run}"), NatKind::HomeRouter)?;
    let rb = lab.add_router(&format!("hb{run}"), NatKind::HomeRouter)?;
    let ha = lab.add_host_behind(&ra, &format!("alice{run}"))?;
    let hb = lab.add_host_behind(&rb, &format!("bob{run}"))?;
    let mut alice = Agent::start(&ha, &format!("alice{run}"), control)?;
    let mut bob = Agent::start(&hb, &format!("bob{run}"), control)?;
    alice.wait_control_connected(LIMIT)?;
    bob.wait_control_connected(LIMIT)?;
    // Let netcheck finish on both sides, as a user's agent would have long before a join.
    std::thread::sleep(Duration::from_secs(2));
    let rtt = site_rtt(&hb, &ra)?;
    let code = alice.party_create(&format!("setup{run}"), &[])?;
    let vip = alice.virtual_ip()?.to_string();
    // Ping from before the join, every 20 ms, with timestamps: the first reply is the time.
    let pinger = hb.spawn(
        &["ping", "-n", "-D", "-i", "0.02", "-w", "30", vip.as_str()],
        hb.log_path(&format!("setup-ping-{run}")),
    )?;
    std::thread::sleep(Duration::from_millis(200));
    let t0 = unix_ms();
    let out = bob.party_join(&code)?;
    crate::host::check_success(&out, "rally party join")?;
    let t_direct = wait_direct_ms(&bob, alice.name(), t0);
    // Let a few replies arrive, then read the first one's timestamp.
    let log = wait_first_reply(&pinger)?;
    pinger.terminate(Duration::from_secs(1))?;
    let t_first = first_reply_unix_ms(&log).map_or(f64::NAN, |t| t - t0);
    println!(
        "    run {run}/{runs}: first reply {t_first:.0} ms, direct after {t_direct:.0} ms, \
         site RTT {rtt:.1} ms (route now: {})",
        strategy(&bob, alice.name()).unwrap_or_else(|e| format!("{e:#}"))
    );
    // Old agents go quiet so later runs do not share the CPU with them.
    let _ = alice.stop();
    let _ = bob.stop();
    Ok((t_first, t_direct, rtt))
}

/// The sites' RTT (ms, median of five pings from `from` to `router`'s WAN address; NaN if
/// none came back).
fn site_rtt(from: &crate::Host, router: &crate::Router) -> Result<f64> {
    let wan = from.run(&[
        "ping",
        "-n",
        "-c",
        "5",
        "-i",
        "0.2",
        &router.wan_ip().to_string(),
    ])?;
    Ok(median(&parse_ping_times(&String::from_utf8_lossy(&wan.stdout))).unwrap_or(f64::NAN))
}

/// Waits (up to the limit) until `agent` lists `peer` as direct; returns when it went direct,
/// in ms after `t0` (Unix ms), or NaN if it did not.
fn wait_direct_ms(agent: &Agent, peer: &str, t0: f64) -> f64 {
    let deadline = std::time::Instant::now() + LIMIT;
    while std::time::Instant::now() < deadline {
        if let Ok(peers) = agent.peers_json() {
            let p = peers
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == peer).cloned());
            if let Some(p) = p {
                if p["strategy"] == "direct" {
                    return p["direct_since_ms"]
                        .as_f64()
                        .map_or(unix_ms() - t0, |ms| ms - t0);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f64::NAN
}

/// Waits (up to the limit) until the pinger's log has a reply; returns the log.
fn wait_first_reply(pinger: &crate::Proc) -> Result<String> {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let log = pinger.log_text()?;
        if first_reply_unix_ms(&log).is_some() || std::time::Instant::now() >= deadline {
            return Ok(log);
        }
        if !pinger.is_running() {
            return Err(anyhow!("ping exited without a reply:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `[unix.seconds]` timestamp (ms) of the first reply line of `ping -D`.
pub fn first_reply_unix_ms(log: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .find_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?;
            ts.parse::<f64>().ok().map(|s| s * 1000.0)
        })
}

/// Starts `ping -D` every 20 ms from `host` to `vip`, has `agent` join the party of `code`, and
/// returns the time from the join to the first reply, in ms (an error after `limit`).
pub fn join_to_first_reply(
    agent: &Agent,
    host: &Host,
    code: &str,
    vip: &str,
    limit: Duration,
) -> Result<f64> {
    let pinger = host.spawn(
        &["ping", "-n", "-D", "-i", "0.02", "-w", "20", vip],
        host.log_path(&format!("join-ping-{}", agent.name())),
    )?;
    let t0 = unix_ms();
    let out = agent.party_join(code)?;
    ensure!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + limit;
    let first = loop {
        if let Some(t) = first_reply_unix_ms(&pinger.log_text()?) {
            break t;
        }
        ensure!(
            Instant::now() < deadline,
            "no ping reply from {}",
            agent.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    pinger.terminate(Duration::from_secs(1))?;
    Ok(first - t0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reply_timestamp_is_read() {
        let log = "PING 10.66.1.2 (10.66.1.2) 56(84) bytes of data.\n\
                   [1700000000.250000] From 10.66.0.3 icmp_seq=1 Destination Host Unreachable\n\
                   [1700000001.500000] 64 bytes from 10.66.1.2: icmp_seq=9 ttl=64 time=90 ms\n\
                   [1700000001.520000] 64 bytes from 10.66.1.2: icmp_seq=10 ttl=64 time=81 ms\n";
        assert_eq!(first_reply_unix_ms(log), Some(1_700_000_001_500.0));
        assert_eq!(first_reply_unix_ms("nothing"), None);
    }
}

//! Relay choice by the pair's quality in the lab (issue 17): two agents behind symmetric NATs
//! (relayed for good), relays `r1` and `r2`. `r1` is near agent A (1 ms uplink against
//! `r2`'s 15 ms; A's and B's routers 5 ms each: 12 ms against 40 ms from A), so it has the
//! lower RTT from A. First it is also the better relay for the pair (24 ms against 80 ms round
//! trip), and both agents use it. Then the WAN emulator puts `r1` far from B
//! (`Lab::set_wan_far`: +45 ms each way between `r1` and B's public address, nothing more for
//! A): still the nearer relay from A, but 114 ms for the pair through it against 80 ms
//! through `r2` (far below the 200 ms of the slow-relay rule, so only the pair-quality rule
//! can move it). Both agents must end on `r2`.
//!
//! Printed: the RTT from A and from B to each relay (ICMP through the NATs), the pair's RTT
//! through each relay (`rally peers --json`), and the time from the change to both agents on
//! `r2` (≥ 10 s by the rule). No timing is asserted. Run with
//! `cargo test -p rally-lab --test relay_choice -- --nocapture` after
//! `cargo build --workspace --bins`.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use rally_lab::ping::parse_rtt_stats;
use rally_lab::scenario::{unix_now, Pair, PingStream, View, World};
use rally_lab::{with_lab, Host, NatKind, Site, WanProfile};
use serde_json::Value;

/// How long the pair may take to settle on a relay, and to move.
const SETTLE: Duration = Duration::from_secs(90);
/// One-way delays: the agents' routers, `r1`'s and `r2`'s uplinks, and `r1`'s extra to B.
const ROUTER: Duration = Duration::from_millis(5);
const NEAR: Duration = Duration::from_millis(1);
const FAR: Duration = Duration::from_millis(15);
const B_EXTRA: Duration = Duration::from_millis(45);
/// The overlay ping's interval (A → B).
const STREAM: Duration = Duration::from_millis(200);

#[test]
fn the_pair_ends_on_the_relay_better_for_it_not_the_one_nearer_this_agent() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let (r1, r2) = (world.relay("r1")?, world.relay("r2")?);
        lab.set_wan(r1.host(), WanProfile::delay(NEAR))?;
        lab.set_wan(r2.host(), WanProfile::delay(FAR))?;
        let pair = Pair::start_behind(
            lab,
            &world,
            "rc",
            NatKind::Symmetric,
            &["--profile", "stable"],
        )?;
        lab.set_wan(&pair.router_a, WanProfile::delay(ROUTER))?;
        lab.set_wan(&pair.router_b, WanProfile::delay(ROUTER))?;
        // The pair is in use (so probed every second, as the profile does for a busy peer).
        let stream = PingStream::start(pair.a.host(), &pair.b_vip, STREAM, "rc")?;

        let on = |relay: &'static str| move |v: &View| v.route() == format!("relay:{relay}");
        let (took, va0, _) = pair
            .wait_both("settle on relay r1", SETTLE, on("r1"))
            .context("r1 is best for the pair before the change")?;
        let via = |v: &View, r: &str| v.path(r).and_then(|p| p.latency_ms);
        let fmt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0} ms"));
        println!(
            "relay choice: before the change both on r1 after {:.1} s; pair RTT via r1 {}, \
             via r2 {} (A's view)",
            took.as_secs_f64(),
            fmt(via(&va0, "relay:r1")),
            fmt(via(&va0, "relay:r2"))
        );

        let before = unix_now();
        lab.set_wan_far(r1.host(), &[&pair.router_b as &dyn Site], B_EXTRA)?;
        let (switch, va, vb) = pair.wait_both("move to relay r2", SETTLE, on("r2"))?;
        let after = unix_now();

        let ping = |from: &Host, to: &Host| relay_rtt(from, to);
        let (a1, a2) = (
            ping(pair.a.host(), r1.host())?,
            ping(pair.a.host(), r2.host())?,
        );
        let (b1, b2) = (
            ping(pair.b.host(), r1.host())?,
            ping(pair.b.host(), r2.host())?,
        );
        let (va_end, vb_end) = (pair.a_view()?, pair.b_view()?);
        let log = stream.stop()?;
        let median = |from: f64, to: f64| log.median_rtt(from, to);
        println!(
            "relay choice: RTT A→r1 {a1:.0} ms, A→r2 {a2:.0} ms, B→r1 {b1:.0} ms, B→r2 {b2:.0} ms; \
             pair RTT via r1 {} / via r2 {} (A's view), {} / {} (B's); both on r2 {:.1} s after \
             r1 went far from B (A: {} relay switches, B: {}); overlay ping A→B median {} on r1 \
             far from B, {} on r2; A's netcheck: {}",
            fmt(via(&va_end, "relay:r1")),
            fmt(via(&va_end, "relay:r2")),
            fmt(via(&vb_end, "relay:r1")),
            fmt(via(&vb_end, "relay:r2")),
            switch.as_secs_f64(),
            va.relay_switches,
            vb.relay_switches,
            fmt(median(before + 2.0, before + 8.0)),
            fmt(median(after, unix_now())),
            netcheck_relays(&pair.a).unwrap_or_else(|e| format!("({e:#})")),
        );
        // The premise, as the emulator made it: r1 is the nearer relay from A, the worse for
        // the pair.
        ensure!(
            a1 < a2,
            "r1 should be nearer A: {a1:.0} ms against {a2:.0} ms"
        );
        ensure!(
            b1 > b2,
            "r1 should be far from B: {b1:.0} ms against {b2:.0} ms"
        );
        ensure!(
            va_end.route() == "relay:r2" && vb_end.route() == "relay:r2",
            "the pair left r2 again: {}",
            pair.describe()
        );
        Ok(())
    })
}

/// The average ICMP RTT from `from` to relay host `to` (5 pings, 0.2 s apart), in ms.
fn relay_rtt(from: &Host, to: &Host) -> Result<f64> {
    let ip = to.ip().to_string();
    let out = from.run(&[
        "ping",
        "-n",
        "-q",
        "-c",
        "5",
        "-i",
        "0.2",
        "-W",
        "2",
        ip.as_str(),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_rtt_stats(&text)
        .map(|s| s.avg)
        .ok_or_else(|| anyhow!("no ping reply from {} to {ip}: {text}", from.name()))
}

/// `r1 24 ms, r2 60 ms` from the agent's `rally netcheck --json`.
fn netcheck_relays(agent: &rally_lab::Agent) -> Result<String> {
    let out = agent.rally_ok(&["netcheck", "--json"])?;
    let v: Value = serde_json::from_str(&out).context("reading `rally netcheck --json`")?;
    let relays = v["relays"]
        .as_array()
        .ok_or_else(|| anyhow!("no relays in netcheck"))?;
    Ok(relays
        .iter()
        .map(|r| {
            let ms = r["latency_ms"]
                .as_f64()
                .map_or("-".into(), |l| format!("{l:.0} ms"));
            format!("{} {ms}", r["name"].as_str().unwrap_or("?"))
        })
        .collect::<Vec<_>>()
        .join(", "))
}

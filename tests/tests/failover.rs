//! The connection manager's lab scenarios (issue 4): real binaries, the WAN emulator on (20 ms
//! per uplink), a control plane and two relays on public hosts, two agents each behind its own
//! home router, so the direct path exists and both relays are warm standbys.
//!
//! 1. The direct path is cut while a UDP stream (one datagram every 10 ms, echoed back by the
//!    peer, timestamped by the lab) runs through the overlay: traffic goes on over a
//!    relay. Five pairs in one lab, each cut once: the gap (longest time without a reply) and
//!    the requests lost, median over the five.
//! 2. The direct path is restored: traffic returns to it (time reported).
//! 3. The relay in use is killed (direct path cut): traffic moves to the other relay.
//! 4. The relay in use (by both agents) gets +300 ms WAN delay (`delay(320ms)` on its uplink,
//!    which a relayed round trip crosses four times: ~1.4 s RTT, past max latency and the probe
//!    timeout): the agent moves to the other relay. 4b: +300 ms round trip (95 ms on the
//!    uplink, ~460 ms RTT, within max latency): the relay-switch rule moves it
//!    (`relay_switch`). The relay test runs 4, 4b, then 3 on one pair, with the second relay
//!    5 ms slower so that both agents share the first one.
//! 5. The control plane stops for 3 minutes (`RALLY_LAB_CONTROL_OUTAGE_SECS` to change it):
//!    no ping lost on the existing tunnel, both agents restarted meanwhile reconnect from their
//!    cached peer map, and both register again once it is back.
//! 6. `rally events --follow --type failover --json`, started before the cut of scenario 1,
//!    shows the failover from `direct:…` to `relay:…`.
//!
//! The tests assert behaviour (it fails over, it comes back, it switches relays, it keeps
//! working) and print the times, one line per scenario (`scenario 1 direct cut: …`); the
//! machine is shared and noisy, so no timing is asserted. Run with
//! `cargo test -p rally-lab --test failover -- --nocapture` after
//! `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rally_lab::scenario::{
    event_to_relay_after, failover_event, ms, spread, unix_now, wait_view, EventFollower, Outage,
    Pair, PingStream, UdpStream, View, World,
};
use rally_lab::{with_lab, Lab, WanProfile};
use serde_json::Value;

/// Scenario 1 runs on this many pairs at once (each cut once).
const RUNS: usize = 5;
/// The UDP stream's interval in scenarios 1–4.
const FLOOD: Duration = Duration::from_millis(10);
/// The slow ping of scenario 5.
const SLOW_PING: Duration = Duration::from_millis(500);
/// The connection profile under test.
const PROFILE: &[&str] = &["--profile", "stable"];
/// Scenario 1 (and 2, 6) run with this profile instead when set (e.g. `unstable`), for
/// comparison; the other scenarios always use `stable`.
const PROFILE_ENV: &str = "RALLY_LAB_FAILOVER_PROFILE";
/// How long a fresh pair may take to go direct.
const DIRECT: Duration = Duration::from_secs(30);
/// How long a failover (or relay switch) may take before the test gives up.
const FAILOVER: Duration = Duration::from_secs(30);
/// How long the direct path stays cut (traffic on the relay) before it is restored.
const HOLD_CUT: Duration = Duration::from_secs(8);
/// How long the return to the direct path may take (a direct path that failed must pass the
/// recovery threshold of probes; punching retries after 30 s).
const RECOVER: Duration = Duration::from_secs(60);
/// Replies faster than this came over the direct path (80 ms RTT: four 20 ms uplink
/// crossings), slower ones over a relay (160 ms: eight).
const DIRECT_RTT_BELOW_MS: f64 = 120.0;
/// Good probes in a row before a path that failed is trusted again (profile stable).
const RECOVERY_THRESHOLD: u32 = 5;
/// A relayed primary slower than this (smoothed) is switched away from (all profiles).
const RELAY_SWITCH_ABOVE_MS: f64 = 200.0;
/// The second relay's uplink in the relay scenarios (5 ms more than the first's), so both
/// agents rank the first relay first.
const HANDICAP: Duration = Duration::from_millis(25);
/// Length of scenario 5's control-plane outage: 3 minutes, as the issue asks
/// (`RALLY_LAB_CONTROL_OUTAGE_SECS` overrides it).
const OUTAGE_DEFAULT_SECS: u64 = 180;

/// What one cut-and-restore cycle of scenarios 1, 2 and 6 measured.
struct CutRun {
    pair: String,
    /// The relay each side failed over to.
    relays: (String, String),
    /// Scenario 1: the longest silence of the stream after the cut, and the datagrams lost.
    gap: Duration,
    lost: u32,
    /// Until both agents' `rally peers` showed the relay.
    failover_seen: Duration,
    /// The failover event's time after the cut (agent `a`).
    failover_event_after: Option<Duration>,
    rtt_direct: Option<f64>,
    rtt_relay: Option<f64>,
    /// Scenario 2: until both agents' `rally peers` showed `direct` again.
    restore_seen: Duration,
    /// Until the stream ran at direct-path RTT for a second on end (send time of the first).
    restore_rtt: Option<Duration>,
    restore_gap: Duration,
    restore_lost: u32,
    /// Scenario 6: the failover event `rally events --follow` printed.
    event: Value,
    /// Whether `rally events --follow --type failover --json` ran (else the error).
    type_filter: Result<(), String>,
}

#[test]
fn cutting_the_direct_path_fails_over_to_a_relay_and_back() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let results: Vec<Result<CutRun>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..RUNS)
                .map(|i| {
                    let world = &world;
                    s.spawn(move || cut_cycle(lab, world, i))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("run panicked"))))
                .collect()
        });
        let mut runs = Vec::new();
        let mut failures = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(run) => runs.push(run),
                Err(e) => failures.push(format!("run {i}: {e:#}")),
            }
        }
        for r in &runs {
            println!(
                "  {}: failover to {} / {}: gap {}, lost {}, seen in rally peers after {}, \
                 event after {}; RTT direct {} relay {}; restored: direct in rally peers after {}, \
                 stream at direct RTT (1 s on end) after {}, gap {}, lost {}",
                r.pair,
                r.relays.0,
                r.relays.1,
                ms(r.gap),
                r.lost,
                ms(r.failover_seen),
                r.failover_event_after.map_or("-".into(), ms),
                r.rtt_direct.map_or("-".into(), |v| format!("{v:.0} ms")),
                r.rtt_relay.map_or("-".into(), |v| format!("{v:.0} ms")),
                ms(r.restore_seen),
                r.restore_rtt.map_or("-".into(), ms),
                ms(r.restore_gap),
                r.restore_lost,
            );
        }
        if !runs.is_empty() {
            let n = runs.len();
            let profile = cut_profile();
            let gaps: Vec<Duration> = runs.iter().map(|r| r.gap).collect();
            let lost: Vec<u32> = runs.iter().map(|r| r.lost).collect();
            let seen: Vec<Duration> = runs.iter().map(|r| r.failover_seen).collect();
            println!(
                "scenario 1 direct cut: gap {} over {n} runs, lost {} datagrams (one every {} ms), \
                 both sides on a relay in rally peers after {} (profile {profile})",
                spread(&gaps, ms),
                spread(&lost, |v| v.to_string()),
                FLOOD.as_millis(),
                spread(&seen, ms),
            );
            let back: Vec<Duration> = runs.iter().map(|r| r.restore_seen).collect();
            let rtt: Vec<Duration> = runs.iter().filter_map(|r| r.restore_rtt).collect();
            let rgaps: Vec<Duration> = runs.iter().map(|r| r.restore_gap).collect();
            let rlost: Vec<u32> = runs.iter().map(|r| r.restore_lost).collect();
            println!(
                "scenario 2 direct restored: both sides direct in rally peers after {} over {n} \
                 runs; stream at direct RTT (1 s on end) after {}; gap {}, lost {} datagrams",
                spread(&back, ms),
                spread(&rtt, ms),
                spread(&rgaps, ms),
                spread(&rlost, |v| v.to_string()),
            );
            let filtered = runs.iter().filter(|r| r.type_filter.is_ok()).count();
            println!(
                "scenario 6 events --follow --type failover --json: failover from direct:… to \
                 relay:… shown in {n} of {n} runs (by `--type failover` itself in \
                 {filtered}), e.g. {}",
                runs[0].event
            );
            for r in &runs {
                if let Err(e) = &r.type_filter {
                    failures.push(format!(
                        "{}: scenario 6, `rally events --follow --type failover --json`: {e}",
                        r.pair
                    ));
                }
            }
        }
        if !failures.is_empty() {
            bail!(
                "{} of {RUNS} runs failed:\n{}",
                failures.len(),
                failures.join("\n")
            );
        }
        Ok(())
    })
}

/// Scenarios 1, 2 and 6 on pair `p<i>`: go direct, follow failover events, start the UDP
/// stream, cut, wait for the relay, hold, restore, wait for direct, stop, analyse.
fn cut_cycle(lab: &Lab, world: &World, i: usize) -> Result<CutRun> {
    let tag = format!("p{i}");
    let profile = cut_profile();
    let pair = Pair::start(lab, world, &tag, &["--profile", &profile])
        .with_context(|| format!("pair {tag}"))?;
    pair.wait_both("go direct", DIRECT, View::is_direct)?;
    // Scenario 6 as the issue words it, and an unfiltered follower beside it, so a broken
    // `--type` fails scenario 6 without hiding the other figures.
    let typed = EventFollower::start(
        &pair.a,
        "failover",
        &["--follow", "--type", "failover", "--json"],
    );
    let all = EventFollower::start(&pair.a, "all", &["--follow", "--json"])?;
    let flood = UdpStream::start(pair.a.host(), pair.b.host(), &pair.b_vip, FLOOD)?;
    // A baseline on the direct path; the pairs' cuts are a little apart.
    std::thread::sleep(Duration::from_millis(2000 + 300 * i as u64));

    let t_cut = unix_now();
    lab.cut(&pair.router_a, &pair.router_b)?;
    let cut_at = Instant::now();
    let (failover_seen, va, vb) = pair
        .wait_both("fail over to a relay", FAILOVER, View::is_relayed)
        .with_context(|| format!("{tag}: after cutting the direct path"))?;
    std::thread::sleep(HOLD_CUT.saturating_sub(cut_at.elapsed()));
    // Still relayed while the cut holds.
    let (held_a, held_b) = (pair.a_view()?, pair.b_view()?);
    ensure!(
        held_a.is_relayed() && held_b.is_relayed(),
        "{tag}: left the relay while the direct path was still cut: {}",
        pair.describe()
    );

    let t_restore = unix_now();
    lab.restore(&pair.router_a, &pair.router_b)?;
    let (restore_seen, _, _) = pair
        .wait_both("return to the direct path", RECOVER, View::is_direct)
        .with_context(|| format!("{tag}: after restoring the direct path"))?;
    std::thread::sleep(Duration::from_secs(2));
    let t_end = unix_now();
    let log = flood.stop()?;
    let events = all.stop()?;
    let type_filter = typed.and_then(EventFollower::stop).and_then(|typed| {
        failover_event(&typed, pair.b.name())?;
        let other: Vec<&Value> = typed.iter().filter(|e| e["type"] != "failover").collect();
        ensure!(
            other.is_empty(),
            "events of other types came through: {other:?}"
        );
        Ok(())
    });

    let cut = log.outage(t_cut, t_restore);
    let relayed_from = t_cut + failover_seen.as_secs_f64();
    ensure!(
        !log.replies_sent_in(relayed_from, t_restore).is_empty(),
        "{tag}: no datagram echoed over the relay while the direct path was cut ({} echoes in \
         all; {})",
        log.replies.len(),
        pair.describe()
    );
    let restored_from = t_restore + restore_seen.as_secs_f64();
    ensure!(
        !log.replies_sent_in(restored_from, t_end).is_empty(),
        "{tag}: no datagram echoed after the return to the direct path"
    );
    let restore = log.outage(t_restore, t_end);
    let event = failover_event(&events, pair.b.name())
        .with_context(|| format!("{tag}: `rally events --follow --json`"))?;
    let failover_event_after = event["time"]
        .as_u64()
        .map(|t| Duration::from_secs_f64((t as f64 / 1000.0 - t_cut).max(0.0)));

    Ok(CutRun {
        pair: tag,
        relays: (va.route(), vb.route()),
        gap: cut.gap,
        lost: cut.lost,
        failover_seen,
        failover_event_after,
        rtt_direct: log.median_rtt(t_cut - 1.5, t_cut),
        rtt_relay: log.median_rtt(relayed_from, t_restore),
        restore_seen,
        restore_rtt: log
            .settled_below(t_restore, DIRECT_RTT_BELOW_MS, 1.0)
            .map(|t| Duration::from_secs_f64((t - t_restore).max(0.0))),
        restore_gap: restore.gap,
        restore_lost: restore.lost,
        event,
        type_filter: type_filter.map_err(|e| format!("{e:#}")),
    })
}

/// The profile scenario 1 runs with: `stable` unless [`PROFILE_ENV`] names another.
fn cut_profile() -> String {
    std::env::var(PROFILE_ENV).unwrap_or_else(|_| "stable".into())
}

#[test]
fn relays_that_slow_down_or_die_are_replaced_by_the_other_relay() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        // r2 gets 5 ms more each way, so both agents rank r1 first and share it once the
        // direct path is cut (with equal relays each side picks its own, and a relay only one
        // side sends through carries half the traffic).
        let r2_host = world.relay("r2")?.host().clone();
        lab.set_wan(&r2_host, WanProfile::delay(HANDICAP))?;
        let pair = Pair::start(lab, &world, "s", PROFILE)?;
        pair.wait_both("go direct", DIRECT, View::is_direct)?;
        let follower = EventFollower::start(&pair.a, "all", &["--follow", "--json"])?;
        let stream = UdpStream::start(pair.a.host(), pair.b.host(), &pair.b_vip, FLOOD)?;
        std::thread::sleep(Duration::from_secs(1));
        lab.cut(&pair.router_a, &pair.router_b)?;
        let (_, va, vb) = pair.wait_both("fail over to a relay", FAILOVER, View::is_relayed)?;
        println!(
            "  relay scenarios: after the cut {} is on {}, {} on {}",
            pair.a.name(),
            va.route(),
            pair.b.name(),
            vb.route()
        );
        let rig = Rig {
            lab,
            world: &world,
            pair: &pair,
            follower: &follower,
            stream: &stream,
        };

        // Scenario 4 as the issue words it: the relay in use gets 300 ms more delay on its
        // uplink (320 ms each way). A relayed round trip crosses that uplink four times when
        // both sides use the relay: ~160 ms becomes ~1360 ms, past max latency (500 ms) and
        // the probe timeout (1 s).
        std::thread::sleep(Duration::from_secs(2));
        let slow = slow_relay(&rig, 320);
        match &slow {
            Ok(o) => println!(
                "scenario 4 slow relay: relay:{} +300 ms per uplink crossing (delay 320 ms; RTT \
                 through it ~1.4 s) → {} on relay:{} after {} ({}); stream gap {}, lost {}",
                o.slow,
                pair.a.name(),
                o.other,
                ms(o.took),
                o.how,
                ms(o.outage.gap),
                o.outage.lost
            ),
            Err(e) => println!("scenario 4 slow relay: FAILED: {e:#}"),
        }

        // The relay-switch rule proper: +300 ms round trip (95 ms each way on the relay's
        // uplink: ~460 ms RTT), slower than relay_switch_latency (200 ms) but within max
        // latency, so the path stays up and only a switch moves the traffic. First let the
        // previous switch's trial (three probes on the new relay) finish.
        std::thread::sleep(Duration::from_secs(4));
        let o = slow_relay(&rig, 95).context("scenario 4b")?;
        ensure!(
            o.how.starts_with("relay_switch"),
            "scenario 4b: relay:{} at ~460 ms RTT was left by {}, not by a relay switch",
            o.slow,
            o.how
        );
        println!(
            "scenario 4b slow relay: relay:{} +300 ms round trip (delay 95 ms; RTT ~460 ms) → {} \
             on relay:{} after {} ({}); stream gap {}, lost {}",
            o.slow,
            pair.a.name(),
            o.other,
            ms(o.took),
            o.how,
            ms(o.outage.gap),
            o.outage.lost
        );

        // Scenario 3: the relay now in use is killed; the other one (fast again) takes over.
        let (killed, other) = (o.other, o.slow);
        pair.wait_relay_trusted(&other, RECOVERY_THRESHOLD, RELAY_SWITCH_ABOVE_MS, FAILOVER)?;
        let t_kill = unix_now();
        world.relay(&killed)?.proc().signal(libc::SIGKILL)?;
        let (moved, _, _) = pair
            .wait_both(&format!("leave the killed relay {killed}"), FAILOVER, |v| {
                v.is_relayed() && v.relay.as_deref() == Some(other.as_str())
            })
            .context("scenario 3: after killing the relay in use")?;
        std::thread::sleep(Duration::from_secs(2));
        let t_end = unix_now();
        let log = stream.stop()?;
        let events = follower.stop()?;
        ensure!(
            !log.replies_sent_in(t_kill + moved.as_secs_f64(), t_end)
                .is_empty(),
            "no datagram echoed over relay:{other} after relay:{killed} was killed"
        );
        let kill = log.outage(t_kill, t_end);
        let how = event_to_relay_after(&events, t_kill, &other);
        println!(
            "scenario 3 relay killed: relay:{killed} killed → both sides on relay:{other} after {} \
             (rally peers; {how}); stream gap {}, lost {} (one every {} ms)",
            ms(moved),
            ms(kill.gap),
            kill.lost,
            FLOOD.as_millis()
        );
        slow.map(|_| ()).context("scenario 4")
    })
}

/// What the relay scenarios act on and watch.
#[derive(Clone, Copy)]
struct Rig<'a> {
    lab: &'a Lab,
    world: &'a World,
    pair: &'a Pair,
    follower: &'a EventFollower,
    stream: &'a UdpStream,
}

/// How traffic left a slowed relay.
struct SlowOutcome {
    /// The relay that was slowed, and the one `a` moved to.
    slow: String,
    other: String,
    took: Duration,
    /// The event that moved it (`relay_switch: …` or `failover: …`).
    how: String,
    outage: Outage,
}

/// Adds `delay_ms` each way to the uplink of the relay `a` is on (once the other relay is
/// trusted), waits until `a` is on the other relay, then gives the slowed relay its uplink
/// back. On failure the error shows both agents' views and the RTT the stream measured
/// meanwhile.
fn slow_relay(rig: &Rig<'_>, delay_ms: u64) -> Result<SlowOutcome> {
    let Rig {
        lab,
        world,
        pair,
        follower,
        stream,
    } = *rig;
    let (_, v) = wait_view(&pair.a, pair.b.name(), "be relayed", FAILOVER, |v| {
        v.is_relayed()
    })?;
    let slow = v.relay.clone().unwrap_or_default();
    let other = world.other_relay(&slow)?.name().to_owned();
    pair.wait_relay_trusted(&other, RECOVERY_THRESHOLD, RELAY_SWITCH_ABOVE_MS, FAILOVER)?;
    let host = world.relay(&slow)?.host().clone();
    let was = lab.wan(&host)?;
    let t_slow = unix_now();
    lab.set_wan(&host, WanProfile::delay(Duration::from_millis(delay_ms)))?;
    let before = pair.describe();
    let moved = wait_view(
        &pair.a,
        pair.b.name(),
        &format!("leave the slow relay {slow}"),
        FAILOVER,
        |v| v.is_relayed() && v.relay.as_deref() == Some(other.as_str()),
    );
    let after = pair.describe();
    let t_moved = unix_now();
    let rtt = stream.snapshot().median_rtt(t_slow + 2.0, t_moved - 1.5);
    lab.set_wan(&host, was)?;
    let (took, _) = moved.map_err(|e| {
        anyhow!(
            "{} stayed on relay:{slow} for {} after it got {delay_ms} ms each way, while the \
             stream through it measured a median RTT of {}; views before: {before}; after: \
             {after}; {e:#}",
            pair.a.name(),
            ms(FAILOVER),
            rtt.map_or("-".into(), |r| format!("{r:.0} ms"))
        )
    })?;
    // The stream's replies to requests sent up to the switch, plus a moment for them to arrive
    // over the slow relay.
    std::thread::sleep(Duration::from_millis(1500));
    let outage = stream.snapshot().outage(t_slow, t_moved);
    let events = follower.events()?;
    let how = event_to_relay_after(&events, t_slow, &other);
    Ok(SlowOutcome {
        slow,
        other,
        took,
        how,
        outage,
    })
}

#[test]
fn agents_keep_tunnels_and_reconnect_from_the_cached_peer_map_while_the_control_plane_is_down(
) -> Result<()> {
    let outage = Duration::from_secs(match std::env::var("RALLY_LAB_CONTROL_OUTAGE_SECS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("RALLY_LAB_CONTROL_OUTAGE_SECS={v:?}"))?,
        Err(_) => OUTAGE_DEFAULT_SECS,
    });
    with_lab(|lab| {
        let mut world = World::start(lab)?;
        let mut pair = Pair::start(lab, &world, "c", PROFILE)?;
        pair.wait_both("go direct", DIRECT, View::is_direct)?;

        // The existing tunnel through the first half of the outage.
        let ping = PingStream::start(pair.a.host(), &pair.b_vip, SLOW_PING, "slow")?;
        std::thread::sleep(Duration::from_secs(2));
        let t_stop = unix_now();
        let stopped = Instant::now();
        world.cp.stop()?;
        std::thread::sleep(outage / 2);
        let t_half = unix_now();
        let log = ping.stop()?;
        let held = log.outage(t_stop, t_half);
        ensure!(
            held.lost == 0 && held.delivered > 0,
            "the tunnel lost {} of {} pings while the control plane was down ({})",
            held.lost,
            held.lost + held.delivered,
            pair.describe()
        );
        ensure!(
            !pair.a.status()?.control.connected,
            "{} still claims a control connection with the control plane stopped",
            pair.a.name()
        );

        // Both agents restart with the control plane still down.
        let restart_began = Instant::now();
        pair.a.restart()?;
        pair.b.restart()?;
        let restarts_took = restart_began.elapsed();
        let reconnect = pair
            .wait_for_ping(FAILOVER)
            .context("restarted agents reconnecting without the control plane")?;
        let (_, va, vb) = pair.wait_both("list each other", FAILOVER, |v| {
            v.is_direct() || v.is_relayed()
        })?;
        ensure!(
            stopped.elapsed() < outage,
            "the restarted agents reconnected only after the outage was over ({} > {}); \
             lengthen RALLY_LAB_CONTROL_OUTAGE_SECS",
            ms(stopped.elapsed()),
            ms(outage)
        );

        // The rest of the outage on the new tunnel, then the control plane comes back.
        let ping = PingStream::start(pair.a.host(), &pair.b_vip, SLOW_PING, "slow2")?;
        let t_second = unix_now();
        std::thread::sleep(outage.saturating_sub(stopped.elapsed()));
        let t_back = unix_now();
        world.cp.restart()?;
        let back = Instant::now();
        pair.a.wait_control_connected(Duration::from_secs(120))?;
        let a_back = back.elapsed();
        pair.b.wait_control_connected(Duration::from_secs(120))?;
        let b_back = back.elapsed();
        let log2 = ping.stop()?;
        let second = log2.outage(t_second, t_back);
        let after = log2.outage(t_back, unix_now());
        ensure!(
            pair.a.kernel_ping(&pair.b_vip, 3)?.status.success(),
            "no ping over the overlay after the control plane returned ({})",
            pair.describe()
        );
        println!(
            "scenario 5 control plane down {} s: existing tunnel lost {} of {} pings (every {} ms) \
             in the first {} s; both agents restarted (`rally down` + `rally up`, one after the \
             other: {}) and pinging each other again {} later ({} / {}) from the cached peer \
             map; then {} of {} pings lost on the new tunnel until the control plane returned; \
             control.connected again after {} / {} ({} lost meanwhile)",
            outage.as_secs(),
            held.lost,
            held.lost + held.delivered,
            SLOW_PING.as_millis(),
            (outage / 2).as_secs(),
            ms(restarts_took),
            ms(reconnect),
            va.route(),
            vb.route(),
            second.lost,
            second.lost + second.delivered,
            ms(a_back),
            ms(b_back),
            after.lost,
        );
        Ok(())
    })
}

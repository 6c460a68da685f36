//! Discovery's subscription messages and idle peers (issue 13): a program on `a`'s host listens
//! to a multicast group (the Minecraft LAN group, `tests/assets/lan_game.py`), so `a`'s agent
//! repeats its subscription to every peer every 30 s. A subscription is not traffic: were it
//! counted as data (as it was), both agents would keep each other busy for good, and every path
//! would be probed every second instead of at the idle cadence.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rally_lab::scenario::{probes_sent, Pair, World};
use rally_lab::star::IDLE_AFTER;
use rally_lab::with_lab;
use serde_json::Value;

const GAME: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/lan_game.py");
const POLL: Duration = Duration::from_millis(50);
/// How long the probes are counted once both agents are idle.
const WINDOW: Duration = Duration::from_secs(30);
/// Probes both agents together may send in `WINDOW` while idle: the primary every 25 s (by
/// one side) and each standby relay every 200 s, about 2. Busy, every one of the three paths
/// is probed every second by each side: about 180.
const IDLE_PROBES_MAX: u64 = 20;

#[test]
fn subscriptions_do_not_keep_idle_peers_busy() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let pair = Pair::start(lab, &world, "ds", &[])?;
        let host = pair.a.host();
        let listener = host.spawn(
            &["python3", GAME, "listen", "4445", "224.0.2.60"],
            host.log_path("mc-scan"),
        )?;
        lab.wait_until(
            "the listener to start",
            Duration::from_secs(5),
            POLL,
            || Ok(listener.log_text()?.contains("listening")),
        )?;
        lab.wait_until(
            "b to learn a's group",
            Duration::from_secs(20),
            POLL,
            || {
                let out = pair.b.rally_ok(&["discovery", "--json"])?;
                let v: Value = serde_json::from_str(&out)
                    .with_context(|| format!("rally discovery --json: {out}"))?;
                Ok(v["peer_groups"].to_string().contains("224.0.2.60"))
            },
        )?;
        // Past the busy time of the tunnel's handshake, with a subscription repeated meanwhile.
        std::thread::sleep(IDLE_AFTER);
        let before = sent(&pair)?;
        std::thread::sleep(WINDOW);
        let probes = sent(&pair)? - before;
        ensure!(
            probes <= IDLE_PROBES_MAX,
            "{probes} probes in {} s from two idle agents (at most {IDLE_PROBES_MAX} at the idle \
             cadence): the subscriptions keep them busy",
            WINDOW.as_secs()
        );
        println!(
            "discovery subscriptions: two idle agents sent {probes} probes in {} s",
            WINDOW.as_secs()
        );
        Ok(())
    })
}

/// Probes both agents have sent so far, on every path.
fn sent(pair: &Pair) -> Result<u64> {
    let (ad, ar) = probes_sent(&pair.a)?;
    let (bd, br) = probes_sent(&pair.b)?;
    Ok(ad + ar + bd + br)
}

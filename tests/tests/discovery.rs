//! LAN game discovery across the party (issue 16), with real programs: `socat` broadcasting to
//! 255.255.255.255 and listening on `0.0.0.0:PORT`, a Minecraft-style LAN announcer to
//! 224.0.2.60:4445 and a listener joined to the group on its default interface
//! (`tests/assets/lan_game.py`). Three members of party `lan` behind three kinds of NAT, each
//! host with its default route on its LAN interface (as a real PC); a fourth member shares only
//! another party (`side`) with one of them.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rally_lab::scenario::{wait_netcheck, World, CONTROL_TIMEOUT};
use rally_lab::{with_lab, Agent, Host, Lab, NatKind, Proc};
use serde_json::Value;

const GAME: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/lan_game.py");
const PORT: &str = "7777";
const REPLY_PORT: &str = "7778";
const POLL: Duration = Duration::from_millis(20);

struct Party {
    alice: Agent,
    bob: Agent,
    carol: Agent,
    dave: Agent,
    /// In `lan` with `--discovery off`.
    erin: Agent,
    alice_vip: String,
    bob_vip: String,
    carol_vip: String,
    _world: World,
}

fn start_agent(
    lab: &Lab,
    world: &World,
    name: &str,
    nat: NatKind,
    extra: &[&str],
) -> Result<Agent> {
    let router = lab.add_router(&format!("{name}-gw"), nat)?;
    let host = lab.add_host_behind(&router, name)?;
    let agent = Agent::start_with(&host, name, world.cp.control(), extra)?;
    agent.wait_control_connected(CONTROL_TIMEOUT)?;
    wait_netcheck(&agent, CONTROL_TIMEOUT)?;
    Ok(agent)
}

fn join(agent: &Agent, code: &str) -> Result<()> {
    let out = agent.party_join(code)?;
    ensure!(
        out.status.success(),
        "{} could not join: {}",
        agent.name(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// alice (home router), bob (full cone), carol (carrier NAT) in `lan`; dave (home router)
/// shares `side` with carol only. Every pair of `lan` has exchanged a ping, so tunnels are up.
fn party(lab: &Lab, alice_extra: &[&str], bob_extra: &[&str]) -> Result<Party> {
    let world = World::start(lab)?;
    let alice = start_agent(lab, &world, "alice", NatKind::HomeRouter, alice_extra)?;
    let bob = start_agent(lab, &world, "bob", NatKind::FullCone, bob_extra)?;
    let carol = start_agent(lab, &world, "carol", NatKind::Cgnat, &[])?;
    let dave = start_agent(lab, &world, "dave", NatKind::HomeRouter, &[])?;
    let erin = start_agent(
        lab,
        &world,
        "erin",
        NatKind::HomeRouter,
        &["--discovery", "off"],
    )?;
    let lan = alice.party_create("lan", &[])?;
    join(&bob, &lan)?;
    join(&carol, &lan)?;
    join(&erin, &lan)?;
    let side = dave.party_create("side", &[])?;
    join(&carol, &side)?;
    alice.wait_for_peers(&["bob", "carol", "erin"], CONTROL_TIMEOUT)?;
    bob.wait_for_peers(&["alice", "carol", "erin"], CONTROL_TIMEOUT)?;
    carol.wait_for_peers(&["alice", "bob", "dave", "erin"], CONTROL_TIMEOUT)?;
    erin.wait_for_peers(&["alice", "bob", "carol"], CONTROL_TIMEOUT)?;
    dave.wait_for_peers(&["carol"], CONTROL_TIMEOUT)?;
    let (alice_vip, bob_vip, carol_vip) = (
        alice.virtual_ip()?.to_string(),
        bob.virtual_ip()?.to_string(),
        carol.virtual_ip()?.to_string(),
    );
    for (from, to) in [
        (&alice, &bob_vip),
        (&alice, &carol_vip),
        (&bob, &carol_vip),
        (&dave, &carol_vip),
        (&erin, &carol_vip),
    ] {
        ensure!(
            from.kernel_ping(to, 3)?.status.success(),
            "{} cannot ping {to}",
            from.name()
        );
    }
    Ok(Party {
        alice,
        bob,
        carol,
        dave,
        erin,
        alice_vip,
        bob_vip,
        carol_vip,
        _world: world,
    })
}

/// `socat` on `0.0.0.0:port`, printing `SRC:SPORT PAYLOAD` per datagram.
fn socat_listener(host: &Host, port: &str) -> Result<Proc> {
    let p = host.spawn(
        &[
            "socat",
            "-u",
            &format!("UDP-RECVFROM:{port},reuseaddr,fork"),
            // With -u the program's stdout is not read: print on stderr, the log.
            "SYSTEM:{ printf '%s:%s ' \"$SOCAT_PEERADDR\" \"$SOCAT_PEERPORT\"; cat; echo; } >&2",
        ],
        host.log_path(&format!("socat-{port}")),
    )?;
    Ok(p)
}

/// socat has no "ready" line: a local datagram shows the listener on [`PORT`] is bound.
fn wait_socat(lab: &Lab, host: &Host, l: &Proc) -> Result<()> {
    lab.wait_until("socat to listen", Duration::from_secs(5), POLL, || {
        host.run_ok(&[
            "sh",
            "-c",
            &format!("echo ready | socat -u STDIN UDP-SENDTO:127.0.0.1:{PORT}"),
        ])?;
        Ok(!from_with(l, "ready")?.is_empty())
    })
}

fn game(host: &Host, args: &[&str], label: &str) -> Result<Proc> {
    let mut cmd = vec!["python3", GAME];
    cmd.extend_from_slice(args);
    host.spawn(&cmd, host.log_path(label))
}

/// Lines `SRC:SPORT PAYLOAD` a listener printed.
fn received(p: &Proc) -> Result<Vec<(String, String)>> {
    Ok(p.log_text()?
        .lines()
        .filter_map(|l| {
            let (src, payload) = l.split_once(' ')?;
            let (ip, port) = src.split_once(':')?;
            (port.parse::<u16>().is_ok() && !payload.is_empty())
                .then(|| (ip.to_string(), payload.trim().to_string()))
        })
        .collect())
}

fn from_with(p: &Proc, payload: &str) -> Result<Vec<String>> {
    Ok(received(p)?
        .into_iter()
        .filter(|(_, m)| m == payload)
        .map(|(ip, _)| ip)
        .collect())
}

fn wait_listening(lab: &Lab, p: &Proc) -> Result<()> {
    lab.wait_until("a listener to start", Duration::from_secs(5), POLL, || {
        Ok(p.log_text()?.contains("listening"))
    })
}

fn broadcast(host: &Host, payload: &str) -> Result<()> {
    host.run_ok(&[
        "sh",
        "-c",
        &format!(
            "printf '%s\\n' {payload} | socat -u STDIN UDP-DATAGRAM:255.255.255.255:{PORT},broadcast"
        ),
    ])?;
    Ok(())
}

fn discovery(agent: &Agent) -> Result<Value> {
    let out = agent.rally_ok(&["discovery", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("rally discovery --json: {out}"))
}

/// Every agent's `rally discovery`, for a failure's message.
fn shown_discovery(agents: &[&Agent]) -> String {
    agents
        .iter()
        .map(|a| {
            let text = a.rally_ok(&["discovery"]).unwrap_or_else(|e| e.to_string());
            format!("{}:\n{text}", a.name())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap_or(0)
}

/// Packets the agent wrote into the TUN device (the kernel counts them as received).
fn tun_rx_packets(host: &Host) -> Result<u64> {
    let out = host.run_ok(&["cat", "/sys/class/net/rally0/statistics/rx_packets"])?;
    out.trim().parse().context("rx_packets")
}

#[test]
fn broadcasts_and_multicasts_reach_the_party_and_only_it() -> Result<()> {
    with_lab(|lab| {
        let p = party(lab, &[], &[])?;
        let (a, b, c, d) = (p.alice.host(), p.bob.host(), p.carol.host(), p.dave.host());
        let listeners = [
            socat_listener(a, PORT)?,
            socat_listener(b, PORT)?,
            socat_listener(c, PORT)?,
            socat_listener(d, PORT)?,
        ];
        let reply_listener = socat_listener(a, REPLY_PORT)?;
        for (host, l) in [a, b, c, d].into_iter().zip(&listeners) {
            wait_socat(lab, host, l)?;
        }

        limited_and_directed_broadcasts(lab, &p, &listeners, &reply_listener)?;
        party_scope_and_no_loop(lab, &p, &listeners)?;
        minecraft_announcement(lab, &p)?;
        Ok(())
    })
}

/// Step 1: a limited broadcast from alice reaches bob and carol within 1 s from her virtual IP
/// (each once), a unicast reply comes back over the overlay, and so does a directed broadcast.
fn limited_and_directed_broadcasts(
    lab: &Lab,
    p: &Party,
    listeners: &[Proc; 4],
    reply_listener: &Proc,
) -> Result<()> {
    let (a, b) = (p.alice.host(), p.bob.host());
    let at_erin = socat_listener(p.erin.host(), PORT)?;
    wait_socat(lab, p.erin.host(), &at_erin)?;
    // A limited broadcast from alice reaches bob and carol within 1 s, from alice's
    // virtual IP; a unicast reply to that source comes back over the overlay.
    for i in 1..=5 {
        let msg = format!("msg{i}");
        let sent = Instant::now();
        broadcast(a, &msg)?;
        for l in &listeners[1..3] {
            lab.wait_until(
                &format!("{msg} to arrive within 1 s"),
                Duration::from_secs(1).saturating_sub(sent.elapsed()),
                POLL,
                || Ok(!from_with(l, &msg)?.is_empty()),
            )
            .with_context(|| shown_discovery(&[&p.alice, &p.bob, &p.carol]))?;
        }
    }
    for (name, l) in [("bob", &listeners[1]), ("carol", &listeners[2])] {
        for i in 1..=5 {
            let srcs = from_with(l, &format!("msg{i}"))?;
            ensure!(
                srcs == vec![p.alice_vip.clone()],
                "{name} got msg{i} from {srcs:?}, wanted once from {}",
                p.alice_vip
            );
        }
    }
    // Erin turned discovery off: alice's copies to her were refused, none delivered.
    lab.wait_until(
        "erin to refuse alice's broadcasts",
        Duration::from_secs(2),
        POLL,
        || Ok(counter(&discovery(&p.erin)?, "dropped_disabled") >= 5),
    )?;
    let got: Vec<_> = received(&at_erin)?
        .into_iter()
        .filter(|(_, m)| m != "ready")
        .collect();
    ensure!(got.is_empty(), "erin has discovery off yet got {got:?}");
    b.run_ok(&[
        "sh",
        "-c",
        &format!(
            "echo reply | socat -u STDIN UDP-SENDTO:{}:{REPLY_PORT}",
            p.alice_vip
        ),
    ])?;
    lab.wait_until("the reply to arrive", Duration::from_secs(2), POLL, || {
        Ok(from_with(reply_listener, "reply")? == vec![p.bob_vip.clone()])
    })?;

    // The overlay's directed broadcast too (routed into the TUN device, not captured).
    a.run_ok(&[
        "sh",
        "-c",
        &format!("echo directed | socat -u STDIN UDP-DATAGRAM:10.66.255.255:{PORT},broadcast"),
    ])?;
    for l in &listeners[1..3] {
        lab.wait_until(
            "the directed broadcast",
            Duration::from_secs(1),
            POLL,
            || Ok(from_with(l, "directed")? == vec![p.alice_vip.clone()]),
        )
        .with_context(|| shown_discovery(&[&p.alice, &p.bob, &p.carol]))?;
    }

    Ok(())
}

/// Step 2: carol's broadcast reaches both her parties; alice's never reached dave; nothing came
/// back to alice.
fn party_scope_and_no_loop(lab: &Lab, p: &Party, listeners: &[Proc; 4]) -> Result<()> {
    let c = p.carol.host();
    // Carol's broadcast reaches bob and alice (party lan) and dave (party side).
    broadcast(c, "fromcarol")?;
    for (name, l) in [
        ("alice", &listeners[0]),
        ("bob", &listeners[1]),
        ("dave", &listeners[3]),
    ] {
        lab.wait_until(
            &format!("carol's broadcast at {name}"),
            Duration::from_secs(1),
            POLL,
            || Ok(from_with(l, "fromcarol")? == vec![p.carol_vip.clone()]),
        )?;
    }
    // Dave shares no party with alice: none of hers reached him, though carol has both.
    let at_dave = received(&listeners[3])?;
    ensure!(
        !at_dave
            .iter()
            .any(|(ip, m)| m.starts_with("msg") || *ip == p.alice_vip),
        "dave got alice's broadcasts: {at_dave:?}"
    );
    // Nothing came back to alice from the overlay: no loop. (Her own directed broadcast
    // reaches her once, from her kernel, as any broadcast does its sender's host.)
    let at_alice = received(&listeners[0])?;
    let looped: Vec<&String> = at_alice
        .iter()
        .filter(|(ip, _)| *ip == p.alice_vip)
        .map(|(_, m)| m)
        .collect();
    ensure!(
        looped.len() <= 1 && looped.iter().all(|m| *m == "directed"),
        "alice's broadcasts came back to her over the overlay: {at_alice:?}"
    );
    for agent in [&p.bob, &p.carol] {
        let v = discovery(agent)?;
        ensure!(counter(&v, "dropped_duplicate") == 0, "{v}");
    }

    Ok(())
}

/// Step 3: the Minecraft LAN announcement reaches a scan joined on its default interface; a
/// member without a listener gets no copy.
fn minecraft_announcement(lab: &Lab, p: &Party) -> Result<()> {
    let (a, b, c) = (p.alice.host(), p.bob.host(), p.carol.host());
    // Minecraft: bob's LAN scan joins 224.0.2.60 on its default interface; alice's
    // announcement reaches it within 3 s. Carol and dave have no listener: no copy.
    let scan = game(b, &["listen", "4445", "224.0.2.60"], "mc-scan-bob")?;
    wait_listening(lab, &scan)?;
    lab.wait_until(
        "alice to learn bob's group",
        Duration::from_secs(5),
        POLL,
        || {
            let v = discovery(&p.alice)?;
            Ok(v["peer_groups"].as_array().is_some_and(|g| {
                g.iter()
                    .any(|g| g["peer"] == "bob" && g["groups"].to_string().contains("224.0.2.60"))
            }))
        },
    )?;
    let carol_before = tun_rx_packets(c)?;
    let bob_before = tun_rx_packets(b)?;
    let started = Instant::now();
    let _announcer = game(
        a,
        &["announce", "Alice's world", "25565"],
        "mc-announce-alice",
    )?;
    let want = "[MOTD]Alice's world[/MOTD][AD]25565[/AD]";
    lab.wait_until(
        "bob's scan to see the world within 3 s",
        Duration::from_secs(3),
        POLL,
        || Ok(from_with(&scan, want)?.contains(&p.alice_vip)),
    )?;
    let took = started.elapsed();
    // Two more announcements (1.5 s apart) while carol's TUN device stays silent.
    lab.wait_until(
        "two more announcements",
        Duration::from_secs(5),
        POLL,
        || Ok(from_with(&scan, want)?.len() >= 3),
    )?;
    ensure!(
        tun_rx_packets(b)? > bob_before,
        "bob's TUN device got nothing"
    );
    let carol_after = tun_rx_packets(c)?;
    ensure!(
        carol_after == carol_before,
        "carol has no listener yet her TUN device got {} packets",
        carol_after - carol_before
    );
    let v = discovery(&p.carol)?;
    ensure!(
        counter(&v, "dropped_unsubscribed") == 0,
        "copies were sent to carol: {v}"
    );
    let v = discovery(&p.bob)?;
    ensure!(
        v["flows"].as_array().is_some_and(|f| f
            .iter()
            .any(|f| f["address"] == "224.0.2.60" && f["last_sender"] == p.alice_vip.as_str())),
        "bob's rally discovery does not show the flow: {v}"
    );
    let text = p.bob.rally_ok(&["discovery"])?;
    ensure!(text.contains("224.0.2.60:4445"), "{text}");
    println!("announcement seen after {} ms", took.as_millis());
    Ok(())
}

#[test]
fn a_broadcast_flood_is_capped_at_every_receiver() -> Result<()> {
    with_lab(|lab| {
        // Alice may send 1000/s; bob and carol take the default 20/s from each sender. Bob
        // turned port 7791 off.
        let p = party(
            lab,
            &["--discovery-rate", "1000"],
            &["--discovery-ports-off", "7791"],
        )?;
        let listeners = [
            game(p.bob.host(), &["listen", "7790"], "flood-bob")?,
            game(p.carol.host(), &["listen", "7790"], "flood-carol")?,
        ];
        for l in &listeners {
            wait_listening(lab, l)?;
        }
        let out = p.alice.host().run_timeout(
            &["python3", GAME, "flood", "7790", "10000", "2"],
            Duration::from_secs(20),
        )?;
        let summary = String::from_utf8_lossy(&out.stdout).to_string();
        let secs: f64 = summary
            .split_whitespace()
            .nth(3)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("flood printed {summary:?}"))?;
        let sent: u64 = summary
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("flood printed {summary:?}"))?;
        ensure!(
            sent as f64 >= 5_000.0 * secs,
            "the flood was too slow: {summary}"
        );
        for (agent, l) in [(&p.bob, &listeners[0]), (&p.carol, &listeners[1])] {
            // Settled: the counters stop moving.
            let mut last = u64::MAX;
            lab.wait_until(
                "the flood to settle",
                Duration::from_secs(10),
                Duration::from_millis(500),
                || {
                    let v = discovery(agent)?;
                    let now = counter(&v, "delivered") + counter(&v, "dropped_capped");
                    let settled = now == last && counter(&v, "dropped_capped") > 0;
                    last = now;
                    Ok(settled)
                },
            )?;
            let got = received(l)?;
            let mut seqs: Vec<&str> = got.iter().map(|(_, m)| m.as_str()).collect();
            let n = seqs.len() as f64;
            seqs.sort_unstable();
            seqs.dedup();
            ensure!(
                seqs.len() as f64 == n,
                "{} received duplicates",
                agent.name()
            );
            // 20/s over the flood plus one second's burst (and the time the last copies
            // travelled), and never nothing.
            let cap = 20.0 * (secs + 1.0) + 20.0;
            ensure!(
                n <= cap && n >= 20.0,
                "{} received {n} of {sent} in {secs:.2} s; the cap allows at most {cap}",
                agent.name()
            );
            // One event for the episode, naming the sender.
            let events = agent.rally_ok(&["events", "--json", "--type", "discovery_capped"])?;
            let events: Vec<Value> = events
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            ensure!(
                events.len() == 1 && events[0]["peer"] == "alice",
                "{}: discovery_capped events {events:?}",
                agent.name()
            );
            println!("{}: {n} of {sent} broadcasts in {secs:.2} s", agent.name());
        }

        port_turned_off(lab, &p)
    })
}

/// A port turned off at bob: carol gets the broadcasts, bob's listener nothing.
fn port_turned_off(lab: &Lab, p: &Party) -> Result<()> {
    let off = [
        game(p.bob.host(), &["listen", "7791"], "off-bob")?,
        game(p.carol.host(), &["listen", "7791"], "off-carol")?,
    ];
    for l in &off {
        wait_listening(lab, l)?;
    }
    let before = counter(&discovery(&p.bob)?, "dropped_disabled");
    p.alice.host().run_timeout(
        &["python3", GAME, "flood", "7791", "5", "1"],
        Duration::from_secs(10),
    )?;
    lab.wait_until(
        "carol to get port 7791",
        Duration::from_secs(2),
        POLL,
        || Ok(received(&off[1])?.len() >= 4),
    )?;
    lab.wait_until(
        "bob to refuse port 7791",
        Duration::from_secs(2),
        POLL,
        || Ok(counter(&discovery(&p.bob)?, "dropped_disabled") >= before + 4),
    )?;
    let at_bob = received(&off[0])?;
    ensure!(at_bob.is_empty(), "bob turned 7791 off yet got {at_bob:?}");
    Ok(())
}

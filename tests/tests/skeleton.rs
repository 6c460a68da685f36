//! End-to-end tests of the walking skeleton: real `rally-control` and `rally` binaries on lab
//! hosts. Each test builds its own lab, so they run in parallel. Build the binaries first:
//! `cargo build --workspace`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rally_lab::host::check_success;
use rally_lab::ping::{parse_path, parse_rtt_ms, parse_summary};
use rally_lab::rally::alter_one_char;
use rally_lab::{with_lab, Agent, ControlPlane, Lab, PingPath};

/// Registering with the control plane (generous: debug builds on two slow cores).
const CONNECT: Duration = Duration::from_secs(20);
/// Party members seeing each other, where the test does not promise a tighter bound.
const PEERS: Duration = Duration::from_secs(20);
/// The skeleton's promise: after joining, everyone lists everyone within 5 s.
const PEERS_PROMISED: Duration = Duration::from_secs(5);
/// Agents re-registering after the control plane comes back.
const RECONNECT: Duration = Duration::from_secs(20);
/// First packets over a fresh tunnel.
const TUNNEL_UP: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(200);

/// Adds host `name` and starts agent `name` on it, registered with `cp`.
fn registered_agent(lab: &Lab, cp: &ControlPlane, name: &str) -> Result<Agent> {
    let host = lab.add_host(name)?;
    let agent = Agent::start(&host, name, cp.control())?;
    agent.wait_control_connected(CONNECT)?;
    Ok(agent)
}

/// Adds host `name`, starts agent `name` on it without `--control`, and joins with `code`.
fn joining_agent(lab: &Lab, name: &str, code: &str) -> Result<Agent> {
    let host = lab.add_host(name)?;
    let agent = Agent::start(&host, name, None)?;
    let out = agent.party_join(code)?;
    check_success(&out, "rally party join").with_context(|| format!("{name} joining"))?;
    Ok(agent)
}

/// A control plane on host `control`; alice (registered) creates party `party`; every name in
/// `joiners` joins it from its own host without `--control`.
fn party(lab: &Lab, party: &str, joiners: &[&str]) -> Result<(ControlPlane, Vec<Agent>)> {
    let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
    let alice = registered_agent(lab, &cp, "alice")?;
    let code = alice.party_create(party, &[])?;
    let mut agents = vec![alice];
    for name in joiners {
        agents.push(joining_agent(lab, name, &code)?);
    }
    Ok((cp, agents))
}

/// Every agent's name, except `a`'s.
fn others<'a>(agents: &'a [Agent], a: &Agent) -> Vec<&'a str> {
    agents
        .iter()
        .map(Agent::name)
        .filter(|n| *n != a.name())
        .collect()
}

/// Waits (up to `timeout` in all) until every agent lists every other one.
fn wait_full_mesh(agents: &[Agent], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for a in agents {
        a.wait_for_peers(
            &others(agents, a),
            deadline.saturating_duration_since(Instant::now()),
        )?;
    }
    Ok(())
}

/// Waits until agent `a` has its virtual IP; returns it as text.
fn vip(lab: &Lab, a: &Agent) -> Result<String> {
    lab.wait_until(
        &format!("{} to have a virtual IP", a.name()),
        CONNECT,
        POLL,
        || Ok(a.status()?.virtual_ip.is_some()),
    )?;
    Ok(a.virtual_ip()?.to_string())
}

/// Waits until one kernel ping from `from` to `ip` is answered.
fn wait_tunnel(lab: &Lab, from: &Agent, ip: &str) -> Result<()> {
    lab.wait_until(
        &format!("{} to reach {ip} over the overlay", from.name()),
        TUNNEL_UP,
        POLL,
        || Ok(from.kernel_ping(ip, 1)?.status.success()),
    )
}

/// Asserts `out` is a refusal: exit code 1 and one line on stderr containing one of `reasons`
/// (case-insensitive).
fn assert_refused(out: &std::process::Output, reasons: &[&str], what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!(
        "{what}: exit {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr
    );
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "expected one line on stderr; {shown}"
    );
    let lower = stderr.to_lowercase();
    assert!(
        reasons.iter().any(|r| lower.contains(r)),
        "stderr names none of {reasons:?}; {shown}"
    );
}

#[test]
fn three_agents_join_and_ping_each_other() -> Result<()> {
    with_lab(|lab| {
        let (_cp, agents) = party(lab, "lan", &["bob", "carol"])?;
        wait_full_mesh(&agents, PEERS_PROMISED)?;

        let mut vips = BTreeMap::new();
        for a in &agents {
            let status = a.status()?;
            vips.insert(a.name().to_owned(), (vip(lab, a)?, status.peer_id));
        }
        for a in &agents {
            for p in a.peers()? {
                let (ip, id) = vips
                    .get(&p.name)
                    .with_context(|| format!("{} lists unknown peer {}", a.name(), p.name))?;
                assert_eq!(
                    &p.virtual_ip,
                    ip,
                    "{} lists {} with a wrong virtual IP",
                    a.name(),
                    p.name
                );
                assert_eq!(
                    &p.peer_id,
                    id,
                    "{} lists {} with a wrong peer id",
                    a.name(),
                    p.name
                );
            }
        }
        for from in &agents {
            for to in agents.iter().filter(|b| b.name() != from.name()) {
                let ip = &vips[to.name()].0;
                let out = from.kernel_ping(ip, 3)?;
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success(),
                    "kernel ping {} → {} ({ip}) failed:\n{text}",
                    from.name(),
                    to.name()
                );

                let out = from.rally_ping(to.name(), 3)?;
                let text = String::from_utf8_lossy(&out.stdout);
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success(),
                    "rally ping {} → {} failed:\n{text}\n{err}",
                    from.name(),
                    to.name()
                );
                assert_eq!(
                    parse_path(&text),
                    Some(PingPath::Direct),
                    "rally ping {} → {}:\n{text}",
                    from.name(),
                    to.name()
                );
                assert!(
                    parse_rtt_ms(&text).is_some(),
                    "rally ping {} → {} shows no RTT:\n{text}",
                    from.name(),
                    to.name()
                );
            }
        }
        Ok(())
    })
}

#[test]
fn control_plane_restart_keeps_party_and_tunnels() -> Result<()> {
    with_lab(|lab| {
        let (mut cp, agents) = party(lab, "lan", &["bob"])?;
        let (alice, bob) = (&agents[0], &agents[1]);
        wait_full_mesh(&agents, PEERS)?;
        let bob_vip = vip(lab, bob)?;
        wait_tunnel(lab, alice, &bob_vip)?;
        for a in &agents {
            a.wait_control_connected(CONNECT)?;
        }
        let before: Vec<_> = agents.iter().map(|a| a.status()).collect::<Result<_>>()?;
        for (a, status) in agents.iter().zip(&before) {
            assert_eq!(
                status.party_names(),
                ["lan"],
                "{}'s parties before the restart",
                a.name()
            );
        }

        let pinger = alice.host().spawn(
            &["ping", "-i", "0.2", "-c", "40", "-W", "1", bob_vip.as_str()],
            alice.host().log_path("background-ping"),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        cp.stop()?;
        std::thread::sleep(Duration::from_secs(2));
        cp.restart()?;
        let status = pinger.wait_timeout(Duration::from_secs(60))?;
        ensure!(status.is_some(), "the background ping did not finish");
        let log = pinger.log_text()?;
        let summary = parse_summary(&log)
            .with_context(|| format!("no summary in the background ping:\n{log}"))?;
        assert!(
            summary.ratio() >= 0.9,
            "the tunnel lost too much across the control-plane restart: {summary:?}\n{log}"
        );

        for a in &agents {
            a.wait_control_connected(RECONNECT)?;
        }
        for (a, before) in agents.iter().zip(&before) {
            let after = a.status()?;
            assert_eq!(
                after.virtual_ip,
                before.virtual_ip,
                "{}'s virtual IP changed",
                a.name()
            );
            assert_eq!(
                after.party_names(),
                before.party_names(),
                "{}'s parties changed",
                a.name()
            );
        }
        wait_full_mesh(&agents, PEERS)?;
        let alice_vip = vip(lab, alice)?;
        wait_tunnel(lab, bob, &alice_vip)?;
        Ok(())
    })
}

#[test]
fn control_plane_serves_again_after_restart() -> Result<()> {
    with_lab(|lab| {
        let mut cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let key = cp.key().to_owned();
        assert!(cp.is_running());
        cp.stop()?;
        assert!(!cp.is_running());
        cp.restart()?;
        assert!(
            cp.is_running(),
            "rally-control is not running after a restart"
        );
        assert_eq!(cp.key(), key);
        Ok(())
    })
}

#[test]
fn agent_restart_keeps_virtual_ip() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let mut alice = registered_agent(lab, &cp, "alice")?;
        let before_ip = vip(lab, &alice)?;
        let before_id = alice.status()?.peer_id;

        alice.stop()?;
        assert!(!alice.is_running());
        alice.restart()?;
        alice.wait_control_connected(RECONNECT)?;
        assert_eq!(
            vip(lab, &alice)?,
            before_ip,
            "virtual IP changed across a restart"
        );
        assert_eq!(
            alice.status()?.peer_id,
            before_id,
            "peer id changed across a restart"
        );
        Ok(())
    })
}

#[test]
fn bad_invite_codes_are_refused() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let alice = registered_agent(lab, &cp, "alice")?;
        let bob = Agent::start(&lab.add_host("bob")?, "bob", None)?;
        let carol = Agent::start(&lab.add_host("carol")?, "carol", None)?;

        let out = bob.party_join("hello-this-is-not-an-invite")?;
        assert_refused(
            &out,
            &["not a rally invite code", "invalid"],
            "garbage code",
        );

        let code = alice.party_create("valid", &[])?;
        // A character inside the secret: the code still decodes, but its checksum no longer matches.
        let altered = alter_one_char(&code, "rally-".len() + 20)?;
        let out = bob.party_join(&altered)?;
        assert_refused(
            &out,
            &["damaged", "altered"],
            "code with one character changed",
        );

        let expiring = alice.party_create("x", &["--expires", "1s"])?;
        std::thread::sleep(Duration::from_secs(2));
        let out = bob.party_join(&expiring)?;
        assert_refused(&out, &["expired"], "expired code");

        let once = alice.party_create("once", &["--max-uses", "1"])?;
        let out = bob.party_join(&once)?;
        check_success(&out, "first use of a --max-uses 1 code")?;
        let out = carol.party_join(&once)?;
        assert_refused(&out, &["used up"], "used-up code");
        Ok(())
    })
}

#[test]
fn key_file_readable_by_others_is_refused() -> Result<()> {
    with_lab(|lab| {
        let host = lab.add_host("alice")?;
        let mut alice = Agent::start(&host, "alice", None)?;
        let key = alice.state_dir().join("identity.key");
        ensure!(key.is_file(), "the agent made no {}", key.display());
        alice.stop()?;

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
        let out = host
            .run_timeout(&alice.up_args(), Duration::from_secs(15))
            .context("`rally up` with a world-readable key must exit, not run")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "rally up with a 0644 key: {}\n{stderr}",
            out.status
        );
        let lower = stderr.to_lowercase();
        assert!(
            lower.contains("identity.key"),
            "stderr does not name the key file: {stderr}"
        );
        assert!(
            ["permission", "mode", "0644", "readable"]
                .iter()
                .any(|w| lower.contains(w)),
            "stderr does not mention permissions: {stderr}"
        );
        Ok(())
    })
}

#[test]
fn strangers_and_other_parties_see_nothing() -> Result<()> {
    with_lab(|lab| {
        let (cp, members) = party(lab, "one", &["bob"])?;
        wait_full_mesh(&members, PEERS)?;
        let member_vips: Vec<String> =
            members.iter().map(|m| vip(lab, m)).collect::<Result<_>>()?;
        wait_tunnel(lab, &members[0], &member_vips[1])?;

        let stranger = registered_agent(lab, &cp, "stranger")?;
        let dave = registered_agent(lab, &cp, "dave")?;
        dave.party_create("two", &[])?;
        let outsiders = [&stranger, &dave];
        let outsider_vips: Vec<String> = outsiders
            .iter()
            .map(|o| vip(lab, o))
            .collect::<Result<_>>()?;
        // Give any wrongly pushed peer list time to arrive before looking.
        std::thread::sleep(Duration::from_secs(3));

        for o in outsiders {
            let peers = o.peers()?;
            assert!(peers.is_empty(), "{} sees peers: {peers:?}", o.name());
        }
        for m in &members {
            let names: Vec<String> = m.peers()?.into_iter().map(|p| p.name).collect();
            assert!(
                !names.iter().any(|n| n == "stranger" || n == "dave"),
                "{} sees outsiders: {names:?}",
                m.name()
            );
        }
        for (o, o_vip) in outsiders.iter().zip(&outsider_vips) {
            for (m, m_vip) in members.iter().zip(&member_vips) {
                let out = o.kernel_ping(m_vip, 2)?;
                assert!(
                    !out.status.success(),
                    "{} reached member {} at {m_vip}",
                    o.name(),
                    m.name()
                );
                let out = m.kernel_ping(o_vip, 2)?;
                assert!(
                    !out.status.success(),
                    "member {} reached {} at {o_vip}",
                    m.name(),
                    o.name()
                );
            }
        }
        Ok(())
    })
}

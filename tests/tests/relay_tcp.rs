//! Relays over TLS/TCP (issue 15): an agent behind a router that lets out only TCP 80/443 and
//! DNS (`NatKind::UdpBlocked`, 20 ms WAN uplink) reaches its party's agents on open networks
//! through `relay-tcp:r1`; when UDP comes back it moves to UDP without losing a ping; when UDP
//! stops mid-session pings resume over TCP within 2 s. Time figures are printed next to the
//! same figure on an open network, measured in the same test.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Result};
use rally_lab::bench::setup::join_to_first_reply;
use rally_lab::proxy::ConnectProxy;
use rally_lab::rally::RelayServer;
use rally_lab::relay_tcp::{start_tcp_relay, start_tcp_relay_on};
use rally_lab::scenario::{json_lines, UdpStream};
use rally_lab::{with_lab, Agent, ControlPlane, Host, Lab, NatKind};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

#[test]
fn a_tcp_only_agent_pings_every_peer_over_relay_tcp() -> Result<()> {
    with_lab(|lab| {
        let (cp, relay) = control_and_relay(lab)?;
        let owner_gw = lab.add_router("owner-gw", NatKind::HomeRouter)?;
        let owner = Agent::start(
            &lab.add_host_behind(&owner_gw, "owner")?,
            "owner",
            cp.control(),
        )?;
        owner.wait_control_connected(TIMEOUT)?;
        let code = owner.party_create("tcp", &[])?;
        let owner_vip = owner.virtual_ip()?.to_string();

        let open_gw = lab.add_router("open-gw", NatKind::HomeRouter)?;
        let open_host = lab.add_host_behind(&open_gw, "open")?;
        let open = Agent::start(&open_host, "open", None)?;
        let blocked_gw = lab.add_router("blocked-gw", NatKind::UdpBlocked)?;
        let blocked_host = lab.add_host_behind(&blocked_gw, "blocked")?;
        let blocked = Agent::start(&blocked_host, "blocked", None)?;

        let t_open = join_to_first_reply(&open, &open_host, &code, &owner_vip, TIMEOUT)?;
        let t_blocked = join_to_first_reply(&blocked, &blocked_host, &code, &owner_vip, TIMEOUT)?;
        println!(
            "party join → first ping reply to the owner: open network (UDP relay, then direct) \
             {t_open:.0} ms, TCP-443-only network (relay-tcp) {t_blocked:.0} ms \
             ({:.2}× the open network)",
            t_blocked / t_open.max(1.0)
        );
        // Sanity only (the figures go to docs/benchmarks.md): a generous bound.
        ensure!(t_blocked < 10_000.0, "first reply after {t_blocked:.0} ms");

        blocked.wait_for_peers(&["owner", "open"], TIMEOUT)?;
        for peer in [&owner, &open] {
            let vip = peer.virtual_ip()?.to_string();
            ping_ok(&blocked_host, &vip)?;
            let path = path_to(&blocked, peer.name())?;
            ensure!(path == "relay-tcp:r1", "blocked → {}: {path}", peer.name());
            // The other side stays on UDP: the relay forwards between the transports.
            let back = path_to(peer, "blocked")?;
            ensure!(back == "relay:r1", "{} → blocked: {back}", peer.name());
        }
        let text = blocked.rally_ok(&["peers"])?;
        ensure!(text.contains("relay-tcp:r1"), "rally peers:\n{text}");
        // Two connections to the relay, each bound as its own session (small frames go on
        // both): the relay logs two sessions bound from the blocked network, which has no UDP.
        let from = blocked_gw.wan_ip().to_string();
        rally_lab::wait_until(
            "two TCP sessions of the blocked agent",
            TIMEOUT,
            POLL,
            || Ok(bound_from(&relay, &from)?.len() >= 2),
        )?;
        ping_ok(&open_host, &owner_vip)?;

        let report: Value = serde_json::from_str(&blocked.rally_ok(&["netcheck", "--json"])?)?;
        println!("blocked: netcheck {report}");
        ensure!(report["udp"] == false, "udp {}", report["udp"]);
        ensure!(report["relay_transport"] == "tcp", "{report}");
        ensure!(report["control_transport"] == "tcp", "{report}");
        let events = blocked.rally_ok(&["events", "--json", "--type", "transport_change"])?;
        ensure!(
            json_lines(&events)
                .iter()
                .any(|e| e["path"] == "relay-tcp:r1"),
            "transport_change events: {events}"
        );
        Ok(())
    })
}

#[test]
fn udp_let_through_again_moves_the_peer_back_to_udp_without_a_lost_ping() -> Result<()> {
    with_lab(|lab| {
        let Pair { a, b, gw, .. } = &pair(lab, true)?;
        wait_path(lab, a, "b", |p| p == "relay-tcp:r1")?;
        let stream = UdpStream::start(a.host(), b.host(), &b.virtual_ip()?.to_string(), ms(50))?;
        std::thread::sleep(Duration::from_secs(2));
        gw.set_udp_blocked(false)?;
        let (unblocked, t0) = (unix(), Instant::now());
        wait_path(lab, a, "b", |p| !p.starts_with("relay-tcp:"))?;
        let took = t0.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let log = stream.stop()?;
        let outage = log.outage(unblocked - 2.0, unix());
        println!(
            "UDP let through → back on UDP ({}) in {} ms; pings lost meanwhile: {}, longest gap \
             {} ms",
            path_to(a, "b")?,
            took.as_millis(),
            outage.lost,
            outage.gap.as_millis()
        );
        ensure!(took < Duration::from_secs(10), "back on UDP after {took:?}");
        ensure!(outage.lost == 0, "{} pings lost", outage.lost);
        Ok(())
    })
}

#[test]
fn udp_blocked_mid_session_resumes_over_tcp_within_two_seconds() -> Result<()> {
    with_lab(|lab| {
        let Pair { a, b, gw, .. } = &pair(lab, false)?;
        wait_path(lab, a, "b", |p| !p.is_empty())?;
        let before = path_to(a, "b")?;
        let stream = UdpStream::start(a.host(), b.host(), &b.virtual_ip()?.to_string(), ms(50))?;
        std::thread::sleep(Duration::from_secs(2));
        gw.set_udp_blocked(true)?;
        let blocked = unix();
        wait_path(lab, a, "b", |p| p == "relay-tcp:r1")?;
        std::thread::sleep(Duration::from_secs(3));
        let log = stream.stop()?;
        let outage = log.outage(blocked, unix());
        println!(
            "UDP blocked mid-session ({before} before): pings resumed over relay-tcp after a \
             {} ms gap ({} lost)",
            outage.gap.as_millis(),
            outage.lost
        );
        ensure!(outage.gap < Duration::from_secs(2), "gap {:?}", outage.gap);
        Ok(())
    })
}

/// A network that lets out only TCP 443, a relay whose TLS listens on 8443 and the control
/// plane on 7443: the agent reaches both through an HTTP CONNECT proxy on 443 (`--proxy`) and
/// pings its peer over `relay-tcp:r1`.
#[test]
fn a_relay_over_tcp_is_reached_through_a_connect_proxy() -> Result<()> {
    with_lab(|lab| {
        let cp_host = lab.add_wan_host("control")?;
        let (key, _) = ControlPlane::init(&cp_host, lab)?;
        let relay = start_tcp_relay_on(&lab.add_wan_host("relay1")?, "r1", &key, 8443)?;
        let cp = ControlPlane::start_with_relays(&cp_host, lab, &[relay.spec()])?;
        let proxy = ConnectProxy::start(&lab.add_wan_host("proxy")?, 443)?;
        let open_gw = lab.add_router("open-gw", NatKind::HomeRouter)?;
        let b = Agent::start(&lab.add_host_behind(&open_gw, "b")?, "b", cp.control())?;
        b.wait_control_connected(TIMEOUT)?;
        let code = b.party_create("p", &[])?;
        let gw = lab.add_router("gw", NatKind::UdpBlocked)?;
        let url = proxy.url();
        let a_host = lab.add_host_behind(&gw, "a")?;
        let a = Agent::start_with(&a_host, "a", None, &["--proxy", url.as_str()])?;
        let out = a.party_join(&code)?;
        ensure!(
            out.status.success(),
            "join: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        a.wait_for_peers(&["b"], TIMEOUT)?;
        wait_path(lab, &a, "b", |p| p == "relay-tcp:r1")?;
        ping_ok(&a_host, &b.virtual_ip()?.to_string())?;
        let tunnels = proxy.tunnels()?;
        let relay_tls = format!("{}:8443", relay.host().ip());
        println!("through {url}: tunnels {tunnels:?}");
        ensure!(
            tunnels.contains(&relay_tls),
            "no tunnel to {relay_tls}: {tunnels:?}"
        );
        Ok(())
    })
}

/// A control plane on port 443 and relay r1 (UDP 3478, TLS on TCP 443), each on a WAN host.
fn control_and_relay(lab: &Lab) -> Result<(ControlPlane, RelayServer)> {
    let cp_host = lab.add_wan_host("control")?;
    let (key, _) = ControlPlane::init(&cp_host, lab)?;
    let relay = start_tcp_relay(&lab.add_wan_host("relay1")?, "r1", &key)?;
    let cp = ControlPlane::start_on_port(&cp_host, lab, &[relay.spec()], &[], 443)?;
    Ok((cp, relay))
}

/// Agents a (behind a home router whose UDP is blocked if `blocked`) and b (behind a home
/// router) in one party, each seeing the other.
struct Pair {
    a: Agent,
    b: Agent,
    gw: rally_lab::Router,
    _servers: (ControlPlane, RelayServer),
}

fn pair(lab: &Lab, blocked: bool) -> Result<Pair> {
    let (cp, relay) = control_and_relay(lab)?;
    let gw = lab.add_router("gw-a", NatKind::HomeRouter)?;
    if blocked {
        gw.set_udp_blocked(true)?;
    }
    let b_gw = lab.add_router("gw-b", NatKind::HomeRouter)?;
    let b = Agent::start(&lab.add_host_behind(&b_gw, "b")?, "b", cp.control())?;
    b.wait_control_connected(TIMEOUT)?;
    let code = b.party_create("p", &[])?;
    let a = Agent::start(&lab.add_host_behind(&gw, "a")?, "a", None)?;
    let out = a.party_join(&code)?;
    ensure!(
        out.status.success(),
        "join: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_for_peers(&["b"], TIMEOUT)?;
    b.wait_for_peers(&["a"], TIMEOUT)?;
    Ok(Pair {
        a,
        b,
        gw,
        _servers: (cp, relay),
    })
}

fn ping_ok(host: &Host, vip: &str) -> Result<()> {
    let out = host.run(&["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", vip])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss")
            || String::from_utf8_lossy(&out.stdout).contains("3 received"),
        "ping {vip} from {}: {}",
        host.name(),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// The primary path `agent` uses to `peer` (`rally peers --json`'s `path`), "" if none.
/// The distinct addresses from `ip` the relay's log shows a session bound at.
fn bound_from(relay: &RelayServer, ip: &str) -> Result<std::collections::BTreeSet<String>> {
    let log = std::fs::read_to_string(
        relay
            .host()
            .log_path(&format!("rally-relay-{}", relay.name())),
    )?;
    let marker = format!("addr={ip}:");
    Ok(log
        .lines()
        .filter(|l| l.contains("session bound"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with(&marker)))
        .map(str::to_owned)
        .collect())
}

fn path_to(agent: &Agent, peer: &str) -> Result<String> {
    let peers = agent.peers_json()?;
    let p = peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == peer))
        .ok_or_else(|| anyhow!("{} does not list {peer}", agent.name()))?;
    Ok(p["path"].as_str().unwrap_or_default().to_owned())
}

fn wait_path(lab: &Lab, agent: &Agent, peer: &str, want: impl Fn(&str) -> bool) -> Result<()> {
    lab.wait_until(
        &format!("{}'s path to {peer}", agent.name()),
        TIMEOUT,
        POLL,
        || Ok(want(&path_to(agent, peer)?)),
    )
}

fn unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

//! Reach where UDP is blocked: an agent behind a router that lets out only TCP 80/443 and DNS
//! (`NatKind::UdpBlocked`, with the 20 ms WAN uplink) reaches the control plane over TLS on TCP,
//! joins a party and registers; the same on an open network is the baseline, measured in the
//! same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use rally_lab::attack::control::{identity, in_ns, wg_key, ControlClient};
use rally_lab::proxy::ConnectProxy;
use rally_lab::rally::RelayServer;
use rally_lab::scenario::json_lines;
use rally_lab::{with_lab, Agent, ControlPlane, NatKind};
use rally_proto::{ErrorCode, Key32, ServerMsg};

const TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn udp_blocked_agent_joins_a_party_over_tcp() -> Result<()> {
    with_lab(|lab| {
        let cp_host = lab.add_wan_host("control")?;
        // Port 443: the only one (with 80) the blocked network lets out, on TCP.
        let (key, _) = ControlPlane::init(&cp_host, lab)?;
        let r1 = RelayServer::start(&lab.add_wan_host("relay1")?, "r1", &key)?;
        let cp = ControlPlane::start_on_port(&cp_host, lab, &[r1.spec()], &[], 443)?;

        let open_gw = lab.add_router("open-gw", NatKind::HomeRouter)?;
        let owner = Agent::start(
            &lab.add_host_behind(&open_gw, "owner")?,
            "owner",
            cp.control(),
        )?;
        owner.wait_control_connected(TIMEOUT)?;
        let code = owner.party_create("tcp", &[])?;

        // Both joiners start with no control plane: `party join` dials the invite's.
        let open = Agent::start(&lab.add_host_behind(&open_gw, "open")?, "open", None)?;
        let blocked_gw = lab.add_router("blocked-gw", NatKind::UdpBlocked)?;
        let blocked = Agent::start(
            &lab.add_host_behind(&blocked_gw, "blocked")?,
            "blocked",
            None,
        )?;

        let mut figures = Vec::new();
        for (agent, want) in [(&open, "quic"), (&blocked, "tcp")] {
            let started = Instant::now();
            let out = agent.party_join(&code)?;
            let took = started.elapsed();
            ensure!(
                out.status.success(),
                "{} could not join: {}",
                agent.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let status = agent.status()?;
            ensure!(status.control.connected, "{} not connected", agent.name());
            ensure!(
                status.control.transport.as_deref() == Some(want),
                "{}: control over {:?}, expected {want}",
                agent.name(),
                status.control.transport
            );
            ensure!(
                status.party_names().contains(&"tcp".to_string()),
                "{}: parties {:?}",
                agent.name(),
                status.party_names()
            );
            figures.push((agent.name().to_owned(), want, took));
        }
        owner.wait_for_peers(&["open", "blocked"], TIMEOUT)?;
        blocked.wait_for_peers(&["owner", "open"], TIMEOUT)?;

        let report: serde_json::Value =
            serde_json::from_str(&blocked.rally_ok(&["netcheck", "--json"])?)?;
        println!("blocked: netcheck {report}");
        ensure!(report["udp"] == false, "netcheck: udp {}", report["udp"]);
        ensure!(
            report["control_transport"] == "tcp",
            "netcheck: control_transport {}",
            report["control_transport"]
        );

        for (name, transport, took) in &figures {
            println!(
                "party join → registered and joined: {name} over {transport}: {} ms",
                took.as_millis()
            );
        }
        let ratio = figures[1].2.as_secs_f64() / figures[0].2.as_secs_f64().max(1e-3);
        println!("udp-blocked / open: {ratio:.2}×");
        Ok(())
    })
}

/// A network that blocks UDP, then stops blocking it: the agent starts on TCP and moves its
/// control channel back to QUIC on its own.
#[test]
fn control_moves_back_to_quic_when_udp_returns() -> Result<()> {
    with_lab(|lab| {
        let cp_host = lab.add_wan_host("control")?;
        let cp = ControlPlane::start_on_port(&cp_host, lab, &[], &[], 443)?;
        let gw = lab.add_router("gw", NatKind::HomeRouter)?;
        gw.set_udp_blocked(true)?;
        let agent = Agent::start(&lab.add_host_behind(&gw, "a")?, "a", cp.control())?;
        agent.wait_control_connected(TIMEOUT)?;
        let transport =
            |agent: &Agent| -> Result<Option<String>> { Ok(agent.status()?.control.transport) };
        ensure!(
            transport(&agent)?.as_deref() == Some("tcp"),
            "control over {:?} while UDP is blocked",
            transport(&agent)?
        );

        gw.set_udp_blocked(false)?;
        let unblocked = Instant::now();
        lab.wait_until(
            "the control channel back on QUIC",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || Ok(transport(&agent)?.as_deref() == Some("quic")),
        )?;
        println!(
            "UDP unblocked → control back on QUIC in {} ms",
            unblocked.elapsed().as_millis()
        );
        let out = agent.rally_ok(&["events", "--json", "--type", "transport_change"])?;
        let messages: Vec<String> = json_lines(&out)
            .iter()
            .filter_map(|e| e["message"].as_str().map(str::to_owned))
            .collect();
        ensure!(
            messages.len() == 2
                && messages[0].contains("TLS/TCP")
                && messages[1].contains("back on QUIC"),
            "transport_change events: {messages:?}"
        );
        Ok(())
    })
}

/// A network that lets out only TCP 443, with the control plane on 7443: the agent reaches it
/// through an HTTP CONNECT proxy on 443 (`--proxy`).
#[test]
fn agent_reaches_the_control_plane_through_a_connect_proxy() -> Result<()> {
    with_lab(|lab| {
        let cp_host = lab.add_wan_host("control")?;
        let cp = ControlPlane::start(&cp_host, lab)?;
        let proxy = ConnectProxy::start(&lab.add_wan_host("proxy")?, 443)?;
        let gw = lab.add_router("gw", NatKind::UdpBlocked)?;
        let url = proxy.url();
        let agent = Agent::start_with(
            &lab.add_host_behind(&gw, "a")?,
            "a",
            cp.control(),
            &["--proxy", url.as_str()],
        )?;
        agent.wait_control_connected(TIMEOUT)?;
        let status = agent.status()?;
        ensure!(
            status.control.transport.as_deref() == Some("tcp"),
            "control over {:?}",
            status.control.transport
        );
        let tunnels = proxy.tunnels()?;
        ensure!(
            tunnels.contains(&cp.addr().to_string()),
            "the proxy opened {tunnels:?}, not one to {}",
            cp.addr()
        );
        println!("through {url}: tunnels {tunnels:?}");
        Ok(())
    })
}

/// Over TLS/TCP the control plane checks what it checks over QUIC: a client pinning another key
/// gets no session, a registered client's oversized frame is refused from its length prefix.
#[test]
fn tcp_sessions_get_the_same_checks_as_quic() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_wan_host("control")?, lab)?;
        let addr: SocketAddr = cp.addr().parse()?;
        let key: Key32 = cp
            .key()
            .parse()
            .map_err(|e| anyhow!("control key: {e:?}"))?;
        let attacker = lab.add_wan_host("attacker")?;
        let (wrong_key, registered, frame) = in_ns(attacker.ns(), move || {
            Box::pin(async move {
                let wrong = ControlClient::connect_tcp(addr, Key32([7; 32])).await;
                let mut c = ControlClient::connect_tcp(addr, key).await?;
                let registered = c
                    .register(&identity(1), "mallory", wg_key(1))
                    .await?
                    .map_err(|e| anyhow!("{e:?}"))?;
                c.send_raw(&(1u32 << 20).to_be_bytes()).await?;
                let frame = loop {
                    match c.recv().await? {
                        ServerMsg::Error(e) => break e.code,
                        _ => continue,
                    }
                };
                Ok((wrong.err().map(|e| format!("{e:#}")), registered, frame))
            })
        })?;
        ensure!(
            wrong_key.is_some(),
            "a client pinning another key got a TLS session"
        );
        println!("wrong key over tcp: {}", wrong_key.unwrap_or_default());
        println!("registered over tcp: {registered:?}");
        ensure!(frame == ErrorCode::TooLarge, "oversized frame: {frame:?}");
        Ok(())
    })
}

//! Port mapping on the gateway, against a real miniupnpd (Debian's `miniupnpd-nftables`) on a
//! lab router.
//!
//! - `symmetric_nat_with_port_mapping_goes_direct_to_another_symmetric_nat`: an agent behind a
//!   symmetric NAT whose router offers PCP/NAT-PMP/UPnP, and one behind a plain symmetric NAT
//!   (a pair hole punching can never join): the first agent's `rally netcheck --json` reports
//!   the mapping (protocol, the router's WAN address), miniupnpd's nftables table holds the
//!   `dnat` rule, the pair goes direct through the mapped port, and after `rally down` the
//!   rule is gone from the router.
//! - the same against a home router and a carrier NAT (both relayed without the mapping).
//! - `a_new_address_is_mapped_again`: the host moves to another LAN address; the agent maps
//!   its port again from there, and removes that mapping on `rally down`.
//! - `a_short_lease_is_renewed_before_it_ends`: a gateway granting 12 s leases sees the agent
//!   renew at half the lease; the mapping outlives its first lease.
//! - `a_gateway_without_port_mapping_reports_none`: `"port_mapping": null`, `none` in status.
//! - `upnp_is_used_when_the_gateway_offers_only_upnp`: PCP and NAT-PMP switched off, the agent
//!   falls back to UPnP IGD; the mapping is removed again on `rally down`.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use rally_lab::portmap::{Offer, PortMapDaemon};
use rally_lab::scenario::{self, wait_netcheck, World, CONTROL_TIMEOUT};
use rally_lab::stun::StunServer;
use rally_lab::{punchable, wait_until, with_lab, Agent, Lab, NatKind, Router};
use serde_json::Value;

/// How long the agent may take to get its mapping (it starts at `rally up`, in the background).
const MAPPED: Duration = Duration::from_secs(20);
/// How long the pair may take to go direct.
const DIRECT: Duration = Duration::from_secs(30);
/// How long the mapping may take to disappear after `rally down`.
const REMOVED: Duration = Duration::from_secs(10);

#[test]
fn symmetric_nat_with_port_mapping_goes_direct_to_another_symmetric_nat() -> Result<()> {
    // Without the mapping this pair can only meet on a relay.
    assert!(!punchable(
        Some(NatKind::Symmetric),
        Some(NatKind::Symmetric)
    ));
    with_lab(|lab| mapped_pair(lab, NatKind::Symmetric))
}

#[test]
fn symmetric_nat_with_port_mapping_goes_direct_to_a_home_router() -> Result<()> {
    // Without the mapping this pair goes direct by birthday punching; with it, through the
    // mapped endpoint (no birthday attempt: the mapping makes ordinary punching work).
    with_lab(|lab| mapped_pair(lab, NatKind::HomeRouter))
}

#[test]
fn symmetric_nat_with_port_mapping_goes_direct_to_a_carrier_nat() -> Result<()> {
    with_lab(|lab| mapped_pair(lab, NatKind::Cgnat))
}

/// An agent behind a symmetric NAT with miniupnpd, one behind a `peer_kind` NAT without:
/// the mapping is reported and on the router, the pair goes direct through the mapped
/// endpoint, and `rally down` removes the mapping from the router.
fn mapped_pair(lab: &Lab, peer_kind: NatKind) -> Result<()> {
    let world = World::start(lab)?;
    let stun = StunServer::start(&lab.add_host("stun")?)?;
    let mapped_gw = lab.add_router("pm-gw", NatKind::Symmetric)?;
    let upnpd = mapped_gw.start_port_mapping(stun.addr(), Offer::All)?;
    let plain_gw = lab.add_router("plain-gw", peer_kind)?;
    let mut a = Agent::start(
        &lab.add_host_behind(&mapped_gw, "pma")?,
        "pma",
        world.cp.control(),
    )?;
    let b = Agent::start(
        &lab.add_host_behind(&plain_gw, "pmb")?,
        "pmb",
        world.cp.control(),
    )?;
    for agent in [&a, &b] {
        agent.wait_control_connected(CONTROL_TIMEOUT)?;
        wait_netcheck(agent, CONTROL_TIMEOUT)?;
    }

    let mapping = wait_mapping(&a, &upnpd)?;
    println!("pma's port mapping: {mapping}");
    let external = check_mapping(&mapping, &mapped_gw, &["pcp", "nat-pmp", "upnp"])?;
    let rules = upnpd.udp_mapping_rules(external)?;
    ensure!(
        !rules.is_empty(),
        "miniupnpd has no dnat rule for port {external}:\n{}",
        upnpd.ruleset()?
    );
    println!("router rule: {}", rules.join(" | "));
    let status = a.rally_ok(&["status"])?;
    ensure!(
        status.contains(&format!("port mapping: {}:{external}", mapped_gw.wan_ip())),
        "rally status does not show the mapping:\n{status}"
    );

    let code = a.party_create("pm", &[])?;
    let out = b.party_join(&code)?;
    ensure!(
        out.status.success(),
        "pmb could not join: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    a.wait_for_peers(&["pmb"], CONTROL_TIMEOUT)?;
    b.wait_for_peers(&["pma"], CONTROL_TIMEOUT)?;
    let (took_a, _) = scenario::wait_view(&a, "pmb", "go direct", DIRECT, |v| v.is_direct())?;
    let (took_b, vb) = scenario::wait_view(&b, "pma", "go direct", DIRECT, |v| v.is_direct())?;
    println!(
        "{peer_kind}: direct after {} (pma) / {} (pmb): {}",
        scenario::ms(took_a),
        scenario::ms(took_b),
        vb.describe()
    );
    let via = format!("direct:{}:{external}", mapped_gw.wan_ip());
    ensure!(
        vb.paths.iter().any(|p| p.path == via),
        "pmb's direct path is not the mapped endpoint {via}: {}",
        vb.describe()
    );

    a.stop()?;
    wait_removed(&upnpd, external)
}

#[test]
fn upnp_is_used_when_the_gateway_offers_only_upnp() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let stun = StunServer::start(&lab.add_host("stun")?)?;
        let gw = lab.add_router("upnp-gw", NatKind::HomeRouter)?;
        let upnpd = gw.start_port_mapping(stun.addr(), Offer::UpnpOnly)?;
        let mut agent = Agent::start(&lab.add_host_behind(&gw, "upa")?, "upa", world.cp.control())?;
        agent.wait_control_connected(CONTROL_TIMEOUT)?;
        let mapping = wait_mapping(&agent, &upnpd)?;
        println!("upa's port mapping: {mapping}");
        let external = check_mapping(&mapping, &gw, &["upnp"])?;
        ensure!(
            !upnpd.udp_mapping_rules(external)?.is_empty(),
            "miniupnpd has no dnat rule for port {external}:\n{}",
            upnpd.ruleset()?
        );
        agent.stop()?;
        wait_removed(&upnpd, external)?;
        Ok(())
    })
}

#[test]
fn a_short_lease_is_renewed_before_it_ends() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let stun = StunServer::start(&lab.add_host("stun")?)?;
        let gw = lab.add_router("lease-gw", NatKind::HomeRouter)?;
        let lease = Duration::from_secs(12);
        let upnpd = gw.start_port_mapping_with(stun.addr(), Offer::All, Some(lease))?;
        let mut agent = Agent::start(&lab.add_host_behind(&gw, "lsa")?, "lsa", world.cp.control())?;
        agent.wait_control_connected(CONTROL_TIMEOUT)?;
        let mapping = wait_mapping(&agent, &upnpd)?;
        let external = check_mapping(&mapping, &gw, &["pcp"])?;
        ensure!(
            mapping["lifetime_s"].as_u64() == Some(lease.as_secs()),
            "the gateway granted {lease:?}, the agent reports {mapping}"
        );
        let first_end = upnpd
            .lease_end(external)
            .ok_or_else(|| anyhow!("no lease for {external}: {}", upnpd.leases()))?;
        // Renewed at half the lease: the gateway's lease end moves on, and the mapping is
        // still there after the first lease would have ended.
        wait_until(
            "the lease to be renewed",
            lease * 2,
            Duration::from_millis(200),
            || Ok(upnpd.lease_end(external).is_some_and(|end| end > first_end)),
        )
        .map_err(|e| e.context(format!("leases: {}", upnpd.leases())))?;
        wait_until(
            "the first lease's end to pass",
            lease * 2,
            Duration::from_millis(200),
            || Ok(scenario::unix_now() > first_end as f64 + 1.0),
        )?;
        ensure!(
            !upnpd.udp_mapping_rules(external)?.is_empty(),
            "the mapping is gone after its first lease: {}",
            upnpd.leases()
        );
        println!(
            "lease of {} s renewed: ends {} s after the first",
            lease.as_secs(),
            upnpd
                .lease_end(external)
                .unwrap_or(0)
                .saturating_sub(first_end)
        );
        agent.stop()?;
        wait_removed(&upnpd, external)
    })
}

#[test]
fn a_gateway_without_port_mapping_reports_none() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let gw = lab.add_router("plain-gw", NatKind::HomeRouter)?;
        let agent = Agent::start(&lab.add_host_behind(&gw, "nma")?, "nma", world.cp.control())?;
        agent.wait_control_connected(CONTROL_TIMEOUT)?;
        wait_netcheck(&agent, CONTROL_TIMEOUT)?;
        let report = netcheck_json(&agent)?;
        ensure!(
            report.get("port_mapping") == Some(&Value::Null),
            "expected \"port_mapping\": null, got {report}"
        );
        let status = agent.rally_ok(&["status"])?;
        ensure!(
            status.contains("port mapping: none"),
            "rally status does not say there is no mapping:\n{status}"
        );
        Ok(())
    })
}

#[test]
fn a_new_address_is_mapped_again() -> Result<()> {
    with_lab(|lab| {
        let world = World::start(lab)?;
        let stun = StunServer::start(&lab.add_host("stun")?)?;
        let gw = lab.add_router("move-gw", NatKind::HomeRouter)?;
        let upnpd = gw.start_port_mapping(stun.addr(), Offer::All)?;
        let host = lab.add_host_behind(&gw, "mva")?;
        let mut agent = Agent::start(&host, "mva", world.cp.control())?;
        agent.wait_control_connected(CONTROL_TIMEOUT)?;
        let first = wait_mapping(&agent, &upnpd)?;
        let first_port = check_mapping(&first, &gw, &["pcp"])?;
        ensure!(
            rule_to(&upnpd, first_port, &host.ip().to_string())?,
            "no rule to {} for port {first_port}:\n{}",
            host.ip(),
            upnpd.ruleset()?
        );

        // The host moves to another address on the same LAN (as after a new DHCP lease).
        let moved = gw.lan_subnet().addr(50).to_string();
        let lan = gw.lan_subnet();
        host.run_ok(&[
            "sh",
            "-c",
            &format!(
                "ip addr del {old}/24 dev eth0 && ip addr add {moved}/24 dev eth0 && \
                 ip route add default via {gw_ip}",
                old = host.ip(),
                gw_ip = gw.lan_ip(),
            ),
        ])
        .with_context(|| format!("moving mva to {moved} on {lan}"))?;
        let mut now_port = 0;
        wait_until(
            &format!("a mapping to mva's new address {moved}"),
            MAPPED,
            Duration::from_millis(250),
            || {
                let ruleset = upnpd.ruleset()?;
                let found = ruleset
                    .lines()
                    .filter(|l| l.contains(&format!("dnat ip to {moved}:")))
                    .find_map(|l| {
                        let after = l.split("th dport ").nth(1)?;
                        after.split_whitespace().next()?.parse::<u16>().ok()
                    });
                now_port = found.unwrap_or(0);
                Ok(found.is_some())
            },
        )
        .map_err(|e| e.context(format!("ruleset:\n{}", upnpd.ruleset().unwrap_or_default())))?;
        let want = format!("{}:{now_port}", gw.wan_ip());
        let mut reported = Value::Null;
        wait_until(
            &format!("mva to report the new mapping {want}"),
            MAPPED,
            Duration::from_millis(250),
            || {
                reported = wait_mapping(&agent, &upnpd)?;
                Ok(reported["external"] == want.as_str())
            },
        )?;
        println!("mapped again from {moved}: {reported} (before: {first})");
        agent.stop()?;
        wait_removed(&upnpd, now_port)
    })
}

/// Whether miniupnpd holds a UDP rule for `external` that forwards to `ip`.
fn rule_to(upnpd: &PortMapDaemon, external: u16, ip: &str) -> Result<bool> {
    Ok(upnpd
        .udp_mapping_rules(external)?
        .iter()
        .any(|r| r.contains(&format!("dnat ip to {ip}:"))))
}

/// Waits until `rally netcheck --json` reports a port mapping; returns it.
fn wait_mapping(agent: &Agent, upnpd: &PortMapDaemon) -> Result<Value> {
    let mut mapping = Value::Null;
    wait_until(
        &format!("{} to report a port mapping", agent.name()),
        MAPPED,
        Duration::from_millis(250),
        || {
            let Ok(report) = netcheck_json(agent) else {
                return Ok(false);
            };
            ensure!(
                report.get("port_mapping").is_some(),
                "netcheck --json has no port_mapping field: {report}"
            );
            mapping = report["port_mapping"].clone();
            Ok(!mapping.is_null())
        },
    )
    .map_err(|e| e.context(format!("miniupnpd log:\n{}", upnpd.log())))?;
    Ok(mapping)
}

/// `rally netcheck --json`, parsed.
fn netcheck_json(agent: &Agent) -> Result<Value> {
    let out = agent.rally(&["netcheck", "--json"])?;
    ensure!(
        out.status.success(),
        "rally netcheck failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("netcheck printed no JSON")
}

/// Checks the reported protocol and that the external address is the router's; returns the
/// external port.
fn check_mapping(mapping: &Value, router: &Router, protocols: &[&str]) -> Result<u16> {
    let protocol = mapping["protocol"].as_str().unwrap_or("?");
    ensure!(
        protocols.contains(&protocol),
        "protocol {protocol}, expected one of {protocols:?}"
    );
    let external: std::net::SocketAddr = mapping["external"]
        .as_str()
        .ok_or_else(|| anyhow!("no external endpoint in {mapping}"))?
        .parse()
        .context("external endpoint")?;
    ensure!(
        external.ip() == router.wan_ip(),
        "mapped to {external}, not on the router's WAN address {}",
        router.wan_ip()
    );
    ensure!(
        mapping["lifetime_s"].as_u64().is_some_and(|l| l > 0),
        "no lease in {mapping}"
    );
    Ok(external.port())
}

/// Waits until miniupnpd no longer holds a rule for UDP port `external`.
fn wait_removed(upnpd: &PortMapDaemon, external: u16) -> Result<()> {
    wait_until(
        &format!("the mapping of port {external} to be removed from the router"),
        REMOVED,
        Duration::from_millis(100),
        || Ok(upnpd.udp_mapping_rules(external)?.is_empty()),
    )
    .map_err(|e| {
        e.context(format!(
            "ruleset:\n{}\nleases: {}",
            upnpd.ruleset().unwrap_or_default(),
            upnpd.leases()
        ))
    })
}

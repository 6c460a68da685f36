//! `rally peer why NAME`: why a peer goes the way it goes, from this agent's NAT findings, the
//! peer's (as it reported them to the control plane), the node's relay reason and every path's
//! metrics.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use rally_agent::api::{resolve_peer, IpcReply, IpcRequest, PeerStatus};
use rally_agent::ipc::unexpected;
use rally_proto::control::{NatBehavior, NatReport};

use super::{call, peers};

pub(super) async fn peer_why(state_dir: &Path, query: &str) -> Result<()> {
    let list = peers(state_dir).await?;
    let peer = resolve_peer(&list, query).map_err(|e| anyhow!(e))?;
    let reply = call(state_dir, IpcRequest::Status).await?;
    let IpcReply::Status(status) = reply else {
        bail!(unexpected(&reply));
    };
    print!("{}", render(status.nat.as_ref(), peer));
    Ok(())
}

fn behavior(b: NatBehavior) -> &'static str {
    match b {
        NatBehavior::EndpointIndependent => "endpoint-independent",
        NatBehavior::AddressDependent => "address-dependent",
        NatBehavior::AddressAndPortDependent => "address-and-port-dependent",
        NatBehavior::Unknown => "unknown",
    }
}

fn nat_line(n: Option<&NatReport>) -> String {
    let Some(n) = n else {
        return "no report yet".into();
    };
    if !n.udp {
        return "no UDP to the outside".into();
    }
    let mut s = format!(
        "mapping {}, filtering {}, public {}",
        behavior(n.mapping),
        behavior(n.filtering),
        n.public_endpoint
            .map_or("unknown".into(), |e| e.to_string())
    );
    if let Some(m) = n.mapped_endpoint {
        let _ = write!(s, ", port mapping {m}");
    }
    s
}

/// What the user could change, for a relay reason.
fn advice(reason: &str) -> &'static str {
    match reason {
        "pinned" => "the relay is pinned: `rally path set-primary PEER direct` lets the agent choose again",
        "udp-blocked" => "a firewall blocks outgoing UDP on one side: allow UDP out (any port) to go direct",
        "both-symmetric" => "both NATs map endpoint-dependently: enable UPnP/NAT-PMP/PCP on either router, or forward its UDP port, to go direct",
        "punching" => "punching is still running: wait a few seconds",
        "birthday-failed" => "birthday punching (the symmetric side's 256 sockets against 1024 probed ports) found no way through; it is tried again 6 s later, then after 1 and 5 minutes and every 15 minutes. Enable UPnP/NAT-PMP/PCP on the symmetric side's router, or forward its UDP port, to go direct",
        "punch-timed-out" => "punching timed out: enable UPnP/NAT-PMP/PCP on the router of the symmetric side, or forward the UDP port; `rally peer reconnect PEER` retries now",
        "nat-unknown" => "a NAT report is missing: `rally netcheck` on both sides",
        _ => "no advice for this reason",
    }
}

/// The last birthday-punching attempt: role, result, budget used and time.
fn birthday_line(b: &rally_agent::api::BirthdayStatus) -> String {
    let what = if b.role == "open" {
        format!("opened {} sockets", b.sockets)
    } else {
        format!(
            "probed {} ports ({} predicted) of 1024",
            b.probes, b.predicted
        )
    };
    let took = b.took_ms.map_or("running".into(), |t| {
        format!("after {:.1} s", t as f64 / 1000.0)
    });
    format!(
        "{} {took}; {what}, {} bytes; {} s ago{}",
        b.outcome,
        b.bytes,
        b.started_ms_ago / 1000,
        if b.failures > 0 {
            format!("; {} failed in a row", b.failures)
        } else {
            String::new()
        }
    )
}

pub(super) fn render(me: Option<&NatReport>, p: &PeerStatus) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "peer:        {} ({})", p.name, p.virtual_ip);
    let _ = writeln!(s, "path:        {}", super::print::describe_path(p));
    let _ = writeln!(s, "this agent:  {}", nat_line(me));
    let _ = writeln!(s, "the peer:    {}", nat_line(p.peer_nat.as_ref()));
    match &p.relay_reason {
        Some(r) => {
            let _ = writeln!(s, "relayed:     {r}");
            let _ = writeln!(s, "to change:   {}", advice(r));
        }
        None => {
            let _ = writeln!(s, "relayed:     no");
        }
    }
    if !p.techniques.is_empty() {
        let _ = writeln!(s, "tried:");
        for t in &p.techniques {
            let _ = writeln!(s, "  {:<13} {:<10} {}", t.technique, t.result, t.detail);
        }
    }
    if let Some(b) = &p.birthday {
        let _ = writeln!(s, "birthday:    {}", birthday_line(b));
    }
    let _ = writeln!(s, "paths:");
    for m in &p.paths {
        let _ = writeln!(
            s,
            "  {:<32} {:<8} {:>10} sent {:>6} lost {:>6}{}",
            m.path.to_string(),
            format!("{:?}", m.health).to_lowercase(),
            m.latency_ms.map_or("-".into(), |l| format!("{l:.1} ms")),
            m.probes_sent,
            m.probes_failed,
            if m.is_primary { "  (primary)" } else { "" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rally_agent::api::{PeerState, Strategy};

    fn report(mapping: NatBehavior) -> NatReport {
        NatReport {
            udp: true,
            mapping,
            filtering: NatBehavior::AddressAndPortDependent,
            public_endpoint: Some("203.0.113.7:40000".parse().unwrap()),
            ..NatReport::default()
        }
    }

    #[test]
    fn a_relayed_peer_shows_both_nats_the_reason_and_advice() {
        let p = PeerStatus {
            strategy: Strategy::Relay,
            relay: Some("r1".into()),
            latency_ms: Some(40.0),
            relay_reason: Some("both-symmetric".into()),
            peer_nat: Some(report(NatBehavior::AddressAndPortDependent)),
            ..sample()
        };
        let me = report(NatBehavior::AddressAndPortDependent);
        let text = render(Some(&me), &p);
        assert!(text.contains("path:        relay:r1"), "{text}");
        assert!(
            text.contains("this agent:  mapping address-and-port-dependent"),
            "{text}"
        );
        assert!(
            text.contains("the peer:    mapping address-and-port-dependent"),
            "{text}"
        );
        assert!(text.contains("relayed:     both-symmetric"), "{text}");
        assert!(text.contains("enable UPnP/NAT-PMP/PCP"), "{text}");
        let direct = PeerStatus {
            relay_reason: None,
            peer_nat: None,
            birthday: None,
            techniques: Vec::new(),
            ..p
        };
        let text = render(None, &direct);
        assert!(text.contains("relayed:     no"), "{text}");
        assert!(text.contains("the peer:    no report yet"), "{text}");
    }

    #[test]
    fn each_technique_tried_and_the_birthday_attempt_are_listed() {
        let p = PeerStatus {
            relay_reason: None,
            birthday: Some(rally_agent::api::BirthdayStatus {
                role: "probe".into(),
                outcome: "direct".into(),
                probes: 201,
                predicted: 0,
                sockets: 0,
                bytes: 12_864,
                started_ms_ago: 9_000,
                took_ms: Some(2_100),
                failures: 0,
            }),
            techniques: vec![rally_agent::api::TechniqueStatus {
                technique: "birthday".into(),
                result: "direct".into(),
                detail: "probed 201 ports".into(),
            }],
            ..sample()
        };
        let text = render(None, &p);
        assert!(
            text.contains("  birthday      direct     probed 201 ports"),
            "{text}"
        );
        assert!(
            text.contains("birthday:    direct after 2.1 s; probed 201 ports (0 predicted) of 1024, 12864 bytes; 9 s ago"),
            "{text}"
        );
    }

    fn sample() -> PeerStatus {
        PeerStatus {
            peer_id: "p2".into(),
            name: "bob".into(),
            virtual_ip: "10.66.0.6".parse().unwrap(),
            strategy: Strategy::Direct,
            relay: None,
            endpoint: None,
            state: PeerState::Connected,
            latency_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
            uptime_seconds: 0,
            is_primary: true,
            priority: 0,
            connected_at: None,
            parties: vec![],
            candidates: vec![],
            direct_since_ms: None,
            failovers: 0,
            relay_switches: 0,
            queued: 0,
            queue_dropped: 0,
            paths: vec![],
            relay_reason: None,
            peer_nat: None,
            path: None,
            birthday: None,
            techniques: Vec::new(),
        }
    }
}

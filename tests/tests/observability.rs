//! What operators and users watch: the agent's and the control plane's Prometheus endpoints,
//! and `rally metrics` / `rally events` on a live party.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use rally_lab::{with_lab, Agent, ControlPlane, Host};

const METRICS_PORT: u16 = 9100;

#[test]
fn metrics_endpoints_serve_prometheus_text() -> Result<()> {
    with_lab(|lab| {
        let cp_host = lab.add_host("control")?;
        let cp_metrics = format!("{}:{METRICS_PORT}", cp_host.ip());
        let cp = ControlPlane::start_with(&cp_host, lab, &[], &["--metrics", &cp_metrics])?;
        let a_host = lab.add_host("alice")?;
        let a_metrics = format!("{}:{METRICS_PORT}", a_host.ip());
        let alice = Agent::start_with(&a_host, "alice", cp.control(), &["--metrics", &a_metrics])?;
        let bob = Agent::start(&lab.add_host("bob")?, "bob", None)?;
        alice.wait_control_connected(Duration::from_secs(20))?;
        let code = alice.party_create("lan", &[])?;
        // A refused join shows in the control plane's counters.
        let bad = bob.party_join("rally-garbage")?;
        ensure!(!bad.status.success(), "a garbage code was accepted");
        let ok = bob.party_join(&code)?;
        ensure!(
            ok.status.success(),
            "join failed: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        alice.wait_for_peers(&["bob"], Duration::from_secs(20))?;
        let bob_vip = bob.virtual_ip()?.to_string();
        ensure!(
            alice.kernel_ping(&bob_vip, 3)?.status.success(),
            "no ping over the overlay"
        );

        let agent_text = http_get(&a_host, &a_metrics)?;
        for needle in [
            "rally_peers 1",
            "rally_peer_bytes_sent_total{peer=\"bob\"",
            "rally_peer_state{peer=\"bob\"",
            "path=\"direct\"",
            "rally_discovery_forwarded_total 0",
            "rally_discovery_dropped_total{reason=\"capped\"} 0",
            // The data plane's queues: the pings went first, nothing was dropped.
            "rally_dataplane_small_packets_total{direction=\"tx\"}",
            "rally_dataplane_queue_drops_total{reason=\"overflow\"} 0",
            "rally_dataplane_sojourn_seconds_count{direction=\"rx\"}",
            "rally_dataplane_thread_run_delay_seconds_total",
        ] {
            ensure!(
                agent_text.contains(needle),
                "agent metrics lack {needle:?}:\n{agent_text}"
            );
        }
        let control_text = http_get(&cp_host, &cp_metrics)?;
        for needle in [
            "rally_control_agents_connected 2",
            "rally_control_parties 1",
            "rally_control_registrations_total 2",
        ] {
            ensure!(
                control_text.contains(needle),
                "control metrics lack {needle:?}:\n{control_text}"
            );
        }

        // `rally metrics --json` names every path with its health; `rally events` has the
        // connection's history.
        let m = alice.rally_ok(&["metrics", "--json"])?;
        let m: serde_json::Value = serde_json::from_str(&m).context("metrics --json")?;
        let paths = &m[0]["paths"];
        ensure!(
            paths
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["is_primary"] == true)),
            "no primary path in {m}"
        );
        let events = alice.rally_ok(&["events", "--json", "--peer", "bob"])?;
        ensure!(
            events.lines().any(|l| l.contains("\"type\":\"connected\"")),
            "no connected event for bob:\n{events}"
        );
        Ok(())
    })
}

/// `GET /metrics` from inside `host`'s namespace, with bash's /dev/tcp (no HTTP client needed).
fn http_get(host: &Host, addr: &str) -> Result<String> {
    let (ip, port) = addr.split_once(':').context("addr")?;
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port}; printf 'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = host.run_ok(&["bash", "-c", &script])?;
    ensure!(
        out.starts_with("HTTP/1.1 200"),
        "bad answer from {addr}: {out}"
    );
    Ok(out)
}

#[test]
fn a_new_address_is_noticed_and_reaches_the_peers() -> Result<()> {
    with_lab(|lab| {
        let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
        let a_host = lab.add_host("alice")?;
        let alice = Agent::start(&a_host, "alice", cp.control())?;
        let bob = Agent::start(&lab.add_host("bob")?, "bob", cp.control())?;
        alice.wait_control_connected(Duration::from_secs(20))?;
        bob.wait_control_connected(Duration::from_secs(20))?;
        let code = alice.party_create("lan", &[])?;
        ensure!(bob.party_join(&code)?.status.success(), "join failed");
        bob.wait_for_peers(&["alice"], Duration::from_secs(20))?;

        // A second address on alice's machine, as when a laptop joins another network.
        a_host.run_ok(&["ip", "addr", "add", "198.51.100.222/24", "dev", "eth0"])?;
        let started = std::time::Instant::now();
        lab.wait_until(
            "bob to see alice's new address",
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                let peers = bob.peers_json()?;
                Ok(peers.to_string().contains("198.51.100.222:51820"))
            },
        )?;
        println!("new address reached the peer after {:?}", started.elapsed());
        Ok(())
    })
}

//! `rally netcheck --json` behind each kind of NAT: the mapping and filtering behaviour it
//! reports are the ones the router recipe implements (the recipes themselves are checked by
//! nat_calibration).

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use rally_lab::rally::RelayServer;
use rally_lab::{with_lab, Agent, ControlPlane, NatKind};
use serde_json::Value;

#[test]
fn netcheck_classifies_mapping_and_filtering_behind_each_nat() -> Result<()> {
    with_lab(|lab| {
        let cp_host = lab.add_wan_host("control")?;
        let (key, _) = ControlPlane::init(&cp_host, lab)?;
        let r1 = RelayServer::start(&lab.add_wan_host("relay1")?, "r1", &key)?;
        let r2 = RelayServer::start(&lab.add_wan_host("relay2")?, "r2", &key)?;
        let cp = ControlPlane::start_with_relays(&cp_host, lab, &[r1.spec(), r2.spec()])?;

        const EI: &str = "endpoint-independent";
        const APD: &str = "address-and-port-dependent";
        // (name, NAT, mapping, filtering)
        let cases: [(&str, Option<NatKind>, &str, &str); 5] = [
            ("public", None, EI, EI),
            ("cone", Some(NatKind::FullCone), EI, EI),
            ("home", Some(NatKind::HomeRouter), EI, APD),
            ("sym", Some(NatKind::Symmetric), APD, APD),
            ("cgnat", Some(NatKind::Cgnat), EI, APD),
        ];
        let mut failures = Vec::new();
        for (name, kind, want, want_filtering) in cases {
            let host = match kind {
                None => lab.add_wan_host(name)?,
                Some(k) => {
                    let router = lab.add_router(&format!("{name}-gw"), k)?;
                    lab.add_host_behind(&router, name)?
                }
            };
            let agent = Agent::start(&host, name, cp.control())?;
            agent.wait_control_connected(Duration::from_secs(20))?;
            let report = netcheck(&agent).with_context(|| format!("netcheck on {name}"))?;
            println!("{name}: {report}");
            let mapping = report["mapping"].as_str().unwrap_or("?");
            if !report["udp"].as_bool().unwrap_or(false) {
                failures.push(format!("{name}: UDP reported blocked"));
            } else if mapping != want {
                failures.push(format!("{name}: mapping {mapping}, expected {want}"));
            }
            let filtering = report["filtering"].as_str().unwrap_or("?");
            if filtering != want_filtering {
                failures.push(format!(
                    "{name}: filtering {filtering}, expected {want_filtering}"
                ));
            }
            let public = report["public_endpoint"].as_str().unwrap_or("");
            let expected_ip = host.public_ip().to_string();
            if !public.starts_with(&format!("{expected_ip}:")) {
                failures.push(format!(
                    "{name}: public endpoint {public}, expected {expected_ip}:…"
                ));
            }
            let relays = report["relays"].as_array().map_or(0, |r| {
                r.iter()
                    .filter(|r| r["latency_ms"].as_f64().is_some())
                    .count()
            });
            if relays != 2 {
                failures.push(format!("{name}: latency measured to {relays} of 2 relays"));
            }
        }
        ensure!(
            failures.is_empty(),
            "netcheck misclassified:\n{}",
            failures.join("\n")
        );
        Ok(())
    })
}

/// `rally netcheck --json`, retried while the agent has not received its relays yet.
fn netcheck(agent: &Agent) -> Result<Value> {
    let mut last = String::new();
    for _ in 0..20 {
        let out = agent.rally(&["netcheck", "--json"])?;
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).context("netcheck printed no JSON");
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(anyhow!("rally netcheck kept failing: {last}"))
}

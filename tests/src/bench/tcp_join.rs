//! `tcp-join`: time from `rally party join` to the first ping reply for a fresh agent behind a
//! router that lets out only TCP 80/443 and DNS (`NatKind::UdpBlocked`: control plane over
//! TLS/TCP, then `relay-tcp:r1`), against a fresh agent behind a home router (QUIC, `relay:r1`
//! then direct) measured in the same run. Both join the party of an owner behind a third home
//! router; 20 ms per uplink (80 ms RTT agent ↔ control plane and agent ↔ relay). The pings
//! (every 20 ms, `ping -D`) start before the join, so the figure includes connecting to the
//! control plane, registering, joining, binding at the relay, the path probe, the WireGuard
//! handshake and one overlay round trip. The goal: ≤ 1.5 s over TCP.

use std::time::Duration;

use anyhow::Result;

use super::setup::join_to_first_reply;
use super::stats::Figure;
use super::Options;
use crate::relay_tcp::start_tcp_relay;
use crate::{Agent, ControlPlane, Lab, NatKind};

const LIMIT: Duration = Duration::from_secs(20);

pub fn run(opts: &Options) -> Result<Vec<Figure>> {
    let lab = Lab::new()?;
    let r = measure(&lab, opts);
    if r.is_err() {
        lab.dump_logs();
    }
    r
}

fn measure(lab: &Lab, opts: &Options) -> Result<Vec<Figure>> {
    let cp_host = lab.add_wan_host("control")?;
    let (key, _) = ControlPlane::init(&cp_host, lab)?;
    let relay = start_tcp_relay(&lab.add_wan_host("relay")?, "r1", &key)?;
    let cp = ControlPlane::start_on_port(&cp_host, lab, &[relay.spec()], &[], 443)?;
    let owner_gw = lab.add_router("owner-gw", NatKind::HomeRouter)?;
    let owner = Agent::start(
        &lab.add_host_behind(&owner_gw, "owner")?,
        "owner",
        cp.control(),
    )?;
    owner.wait_control_connected(LIMIT)?;
    let code = owner.party_create("tcpjoin", &[])?;
    let owner_vip = owner.virtual_ip()?.to_string();
    let (mut open, mut blocked) = (Vec::new(), Vec::new());
    for run in 1..=opts.runs {
        let t_open = fresh_join(
            lab,
            NatKind::HomeRouter,
            &format!("o{run}"),
            &code,
            &owner_vip,
        )?;
        let t_blocked = fresh_join(
            lab,
            NatKind::UdpBlocked,
            &format!("b{run}"),
            &code,
            &owner_vip,
        )?;
        println!(
            "    run {run}/{}: party join → first ping reply: open network {t_open:.0} ms, \
             TCP-443-only network {t_blocked:.0} ms ({:.2}×)",
            opts.runs,
            t_blocked / t_open.max(1.0)
        );
        open.push(t_open);
        blocked.push(t_blocked);
    }
    let what = "party join → first ping reply";
    let mut f1 = Figure::new(
        "tcp-join",
        what,
        "rally, TCP-443-only network (relay-tcp)",
        "ms",
        blocked,
    );
    f1.ratio_to("open network (QUIC, relay, direct)", &open);
    f1.ratio_to("goal 1500 ms", &vec![1500.0; opts.runs]);
    let f2 = Figure::new(
        "tcp-join",
        what,
        "rally, open network (QUIC, relay, direct)",
        "ms",
        open,
    );
    Ok(vec![f1, f2])
}

/// A fresh agent behind a new router of `kind` joins with `code`, pinging `vip` from before
/// the join: the time to the first reply, in ms. The agent is stopped afterwards.
fn fresh_join(lab: &Lab, kind: NatKind, name: &str, code: &str, vip: &str) -> Result<f64> {
    let gw = lab.add_router(&format!("{name}-gw"), kind)?;
    let host = lab.add_host_behind(&gw, name)?;
    let agent = Agent::start(&host, name, None)?;
    let t = join_to_first_reply(&agent, &host, code, vip, LIMIT);
    drop(agent);
    t
}

//! The daemon seen from outside: `rally down` and SIGTERM stop it with its data plane joined
//! and its TUN device gone; a stale virtual IP and a moved control plane heal without the user
//! (address changes from netlink: `observability::a_new_address_is_noticed_and_reaches_the_peers`).
//! Build the binaries first: `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rally_lab::host::check_success;
use rally_lab::scenario::agent_pid;
use rally_lab::{with_lab, Agent, ControlPlane, Host, Lab};
use serde_json::Value;

/// Registering with the control plane (generous: debug builds on two slow cores).
const CONNECT: Duration = Duration::from_secs(20);
/// How long a stopping daemon may take before the test fails (the goal is well under 1 s;
/// the time is printed, not asserted).
const STOP: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
/// Polling for the end of a process, to time it.
const FINE_POLL: Duration = Duration::from_millis(2);

/// Whether `host` has the agent's TUN device.
fn tun_exists(host: &Host) -> Result<bool> {
    Ok(host
        .run(&["ip", "link", "show", "dev", "rally0"])?
        .status
        .success())
}

/// Whether process `pid` has exited (gone, or a zombie waiting to be reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// A control plane and an agent `name` registered with it, its TUN device up.
fn registered(lab: &Lab, name: &str) -> Result<(ControlPlane, Agent)> {
    let cp = ControlPlane::start(&lab.add_host("control")?, lab)?;
    let agent = Agent::start(&lab.add_host(name)?, name, cp.control())?;
    agent.wait_control_connected(CONNECT)?;
    lab.wait_until("the agent's TUN device", CONNECT, POLL, || {
        tun_exists(agent.host())
    })?;
    Ok((cp, agent))
}

/// `agent.json` of `agent`, parsed.
fn saved(agent: &Agent) -> Result<Value> {
    let path = agent.state_dir().join("agent.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: {text}", path.display()))
}

#[test]
fn rally_down_joins_the_data_plane_and_removes_the_tun() -> Result<()> {
    with_lab(|lab| {
        let (_cp, mut alice) = registered(lab, "alice")?;
        let socket = alice.state_dir().join("rally.sock");

        let start = Instant::now();
        alice.stop()?; // `rally down` answers once the daemon has stopped; then its exit
        let took = start.elapsed();

        ensure!(!tun_exists(alice.host())?, "rally0 survived `rally down`");
        ensure!(!socket.exists(), "the control socket survived `rally down`");
        println!(
            "rally down → daemon exited, TUN gone: {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        Ok(())
    })
}

#[test]
fn sigterm_joins_the_data_plane_and_removes_the_tun() -> Result<()> {
    with_lab(|lab| {
        let (_cp, alice) = registered(lab, "alice")?;
        let pid = agent_pid(alice.host())?;

        let start = Instant::now();
        // SAFETY: kill(2) on a pid of the lab's own daemon.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
        lab.wait_until("the daemon to exit on SIGTERM", STOP, FINE_POLL, || {
            Ok(exited(pid))
        })?;
        let took = start.elapsed();

        ensure!(!tun_exists(alice.host())?, "rally0 survived SIGTERM");
        println!(
            "SIGTERM → daemon exited, TUN gone: {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        Ok(())
    })
}

#[test]
fn a_stale_saved_virtual_ip_is_replaced_by_the_registered_one() -> Result<()> {
    with_lab(|lab| {
        let (_cp, mut alice) = registered(lab, "alice")?;
        let vip = alice.virtual_ip()?.to_string();
        alice.stop()?;
        let stale = if vip == "10.66.250.250" {
            "10.66.250.251"
        } else {
            "10.66.250.250"
        };
        let mut state = saved(&alice)?;
        state["virtual_ip"] = Value::from(stale);
        // Rewritten in place: the file keeps its owner and mode 0600.
        std::fs::write(
            alice.state_dir().join("agent.json"),
            serde_json::to_vec(&state)?,
        )?;

        alice.restart()?;

        let want = format!("inet {vip}/");
        lab.wait_until(
            "the registered virtual IP on rally0, in the status and saved",
            CONNECT,
            POLL,
            || {
                let addr = alice
                    .host()
                    .run_ok(&["ip", "-4", "-o", "addr", "show", "dev", "rally0"])?;
                Ok(addr.contains(&want)
                    && alice.virtual_ip()?.to_string() == vip
                    && saved(&alice)?["virtual_ip"] == vip.as_str())
            },
        )?;
        let addr = alice
            .host()
            .run_ok(&["ip", "-4", "-o", "addr", "show", "dev", "rally0"])?;
        ensure!(!addr.contains(stale), "rally0 still has {stale}: {addr}");
        Ok(())
    })
}

#[test]
fn a_fresh_invite_moves_the_agent_to_its_control_address() -> Result<()> {
    with_lab(|lab| {
        let (cp, alice) = registered(lab, "alice")?;
        let code = alice.party_create("lan", &[])?;
        // Bob knows the control plane's key, but at an address where nothing answers (as
        // after the control plane moved).
        let dead = "198.51.100.250:7443";
        let bob = Agent::start(&lab.add_host("bob")?, "bob", Some((dead, cp.key())))?;

        let out = bob.party_join(&code)?;
        check_success(&out, "rally party join").context("bob joining")?;

        bob.wait_control_connected(CONNECT)?;
        ensure!(
            saved(&bob)?["control"]["addr"] == cp.addr(),
            "agent.json keeps {}",
            saved(&bob)?["control"]
        );
        bob.wait_for_peers(&["alice"], CONNECT)?;
        // (A restart would name the dead address again with `--control`, which wins over
        // what is saved: the flags are the operator's word.)
        Ok(())
    })
}

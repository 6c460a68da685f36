//! Attacks from inside and around a party: forged relay errors from the relay's address, a
//! member's modified WireGuard client sending to a network behind the victim, and a crashed
//! agent coming back.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use rally_lab::attack::wg::WgReport;
use rally_lab::attack::ListenReport;
use rally_lab::bench::flood::{metric, wg_public, METRICS_PORT};
use rally_lab::bench::tunnels::{control_init, serve_control, start_relay, strategy, Control};
use rally_lab::{bins, wait_until, with_lab, Agent, Host, Lab, Proc};

const READY: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(200);

/// A control plane and one relay on the lab's internet.
fn infrastructure(lab: &Lab) -> Result<(Control, Proc, Host)> {
    let c = lab.add_host("control")?;
    let r = lab.add_host("relay")?;
    let key = control_init(lab, &c, "attack")?;
    let (relay, spec) = start_relay(&r, "r1", &key, false)?;
    Ok((
        serve_control(lab, &c, "attack", key, &[spec], &[])?,
        relay,
        r,
    ))
}

/// An agent with its metrics endpoint on, on a new host.
fn agent(lab: &Lab, control: &Control, name: &str) -> Result<Agent> {
    let h = lab.add_host(name)?;
    let metrics = format!("{}:{METRICS_PORT}", h.ip());
    let a = Agent::start_with(&h, name, control.target(), &["--metrics", &metrics])?;
    a.wait_control_connected(READY)?;
    Ok(a)
}

/// `owner` creates a party and every other agent joins it.
fn party(owner: &Agent, others: &[&Agent]) -> Result<()> {
    let code = owner.party_create("attack", &[])?;
    for a in others {
        rally_lab::host::check_success(&a.party_join(&code)?, "rally party join")?;
    }
    let names: Vec<&str> = others.iter().map(|a| a.name()).collect();
    owner.wait_for_peers(&names, READY)?;
    Ok(())
}

fn lab_bin() -> Result<String> {
    Ok(bins::rally_lab()?.to_string_lossy().into_owned())
}

fn relay_errors_lost(agent: &Agent) -> Result<usize> {
    let events = agent.rally_ok(&["events", "--json"])?;
    Ok(events
        .lines()
        .filter(|l| l.contains("relay binding lost"))
        .count())
}

#[test]
fn forged_relay_errors_do_not_break_the_binding() -> Result<()> {
    with_lab(|lab| {
        let (control, _relay, relay_host) = infrastructure(lab)?;
        let alice = agent(lab, &control, "alice")?;
        let bob = agent(lab, &control, "bob")?;
        let mallory = lab.add_host("mallory")?;
        // No direct path between alice and bob: they meet through the relay.
        lab.cut(alice.host(), bob.host())?;
        party(&alice, &[&bob])?;
        let vip = alice.virtual_ip()?.to_string();
        wait_until("bob to reach alice through the relay", READY, POLL, || {
            Ok(strategy(&bob, "alice")? == "relay" && bob.kernel_ping(&vip, 1)?.status.success())
        })?;
        let lost_before = relay_errors_lost(&alice)?;

        // 50 relay errors (`NotBound`) forged from the relay's address, 10 a second.
        let relay_addr = SocketAddrV4::new(relay_host.ip(), 3478).to_string();
        let to = SocketAddrV4::new(alice.host().ip(), 51820).to_string();
        let out = mallory.run_timeout(
            &[
                lab_bin()?.as_str(),
                "attack",
                "flood",
                "--to",
                &to,
                "--kind",
                "relay-not-bound",
                "--rate",
                "10",
                "--seconds",
                "6",
                "--count",
                "50",
                "--spoof",
                &relay_addr,
            ],
            Duration::from_secs(30),
        )?;
        rally_lab::host::check_success(&out, "rally-lab attack flood")?;
        println!("attack: {}", String::from_utf8_lossy(&out.stdout).trim());

        // The counters are published on the data plane's next tick: wait for all 50.
        let series = "rally_dataplane_drops_total{reason=\"relay_unauthenticated\"}";
        let _ = wait_until(
            "the forged errors to be counted",
            Duration::from_secs(5),
            POLL,
            || Ok(metric(&alice, series)? >= 50.0),
        );
        let ignored = metric(&alice, series)?;
        let lost = relay_errors_lost(&alice)? - lost_before;
        println!("forged relay errors: {ignored} ignored as unauthenticated, {lost} bindings lost");
        ensure!(lost == 0, "{lost} relay bindings lost to forged errors");
        ensure!(ignored >= 50.0, "only {ignored} forged errors counted");
        ensure!(
            strategy(&bob, "alice")? == "relay" && bob.kernel_ping(&vip, 3)?.status.success(),
            "the relayed path broke"
        );
        Ok(())
    })
}

#[test]
fn a_modified_client_cannot_send_past_the_victims_virtual_ip() -> Result<()> {
    with_lab(|lab| {
        let (control, _relay, _) = infrastructure(lab)?;
        let alice = agent(lab, &control, "alice")?;
        let mallory = agent(lab, &control, "mallory")?;
        party(&alice, &[&mallory])?;
        mallory.wait_for_peers(&["alice"], READY)?;
        let alice_vip = alice.virtual_ip()?;
        let mallory_vip = mallory.virtual_ip()?;
        // A private network on alice's host, which a real client never reaches.
        let h = alice.host();
        h.run_ok(&["ip", "addr", "add", "172.31.9.1/32", "dev", "lo"])?;
        let private = listen(h, "172.31.9.1:9999", 15.0)?;
        let own = listen(h, &format!("{alice_vip}:9998"), 15.0)?;

        // mallory's own keys, a WireGuard client of its own, packets to both addresses.
        let secret = mallory.state_dir().join("wireguard.key");
        let out = mallory.host().run_timeout(
            &[
                lab_bin()?.as_str(),
                "attack",
                "wg",
                "--secret-file",
                &secret.to_string_lossy(),
                "--peer-key",
                &hex(&wg_public(&alice)?),
                "--to",
                &SocketAddrV4::new(h.ip(), 51820).to_string(),
                "--src",
                &mallory_vip.to_string(),
                "--dst",
                &format!("172.31.9.1:9999,{alice_vip}:9998"),
                "--count",
                "5",
            ],
            Duration::from_secs(40),
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: WgReport = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .with_context(|| format!("attack wg printed {stdout:?}"))?;
        ensure!(
            report.handshake && report.sent == 10,
            "the attack client did not get through: {report:?}"
        );
        let private = report_of(&private)?;
        let own = report_of(&own)?;
        let refused = metric(
            &alice,
            "rally_dataplane_drops_total{reason=\"destination_not_ours\"}",
        )?;
        println!(
            "modified client: {} datagrams reached alice's virtual IP, {} the private network; \
             {refused} refused",
            own.datagrams, private.datagrams
        );
        ensure!(
            own.datagrams > 0,
            "nothing reached alice's virtual IP: the attack proves nothing"
        );
        ensure!(
            private.datagrams == 0,
            "{} datagrams reached the private network",
            private.datagrams
        );
        ensure!(refused >= 5.0, "only {refused} packets counted as refused");
        Ok(())
    })
}

#[test]
fn a_crashed_agent_is_reached_again_within_a_second_of_its_restart() -> Result<()> {
    with_lab(|lab| {
        let (control, _relay, _) = infrastructure(lab)?;
        let mut alice = agent(lab, &control, "alice")?;
        let bob = agent(lab, &control, "bob")?;
        party(&alice, &[&bob])?;
        let vip = alice.virtual_ip()?.to_string();
        wait_until("bob to reach alice directly", READY, POLL, || {
            Ok(strategy(&bob, "alice")? == "direct" && bob.kernel_ping(&vip, 1)?.status.success())
        })?;
        // bob pings alice every 50 ms throughout.
        let log = bob.host().log_path("crash-ping");
        let pinger = bob.host().spawn(
            &["ping", "-n", "-D", "-i", "0.05", "-w", "40", vip.as_str()],
            &log,
        )?;
        std::thread::sleep(Duration::from_secs(1));
        alice.crash()?;
        std::thread::sleep(Duration::from_secs(1));
        alice.start_again()?;
        let restarted = unix_now();
        let t = Instant::now();
        let mut resumed = None;
        while t.elapsed() < Duration::from_secs(30) && resumed.is_none() {
            std::thread::sleep(Duration::from_millis(100));
            let text = std::fs::read_to_string(&log)?;
            resumed = reply_times(&text).into_iter().find(|&r| r > restarted);
        }
        pinger.terminate(Duration::from_secs(1))?;
        let after = resumed
            .map(|r| r - restarted)
            .ok_or_else(|| anyhow!("bob's pings never reached the restarted alice"))?;
        println!(
            "bob's pings resumed {:.0} ms after alice's restart",
            after * 1000.0
        );
        ensure!(
            after < 1.0,
            "pings resumed only {after:.2} s after the restart"
        );
        Ok(())
    })
}

fn listen(h: &Host, bind: &str, seconds: f64) -> Result<Proc> {
    let p = h.spawn(
        &[
            lab_bin()?.as_str(),
            "attack",
            "listen",
            "--bind",
            bind,
            "--seconds",
            &seconds.to_string(),
        ],
        h.log_path(&format!("listen-{bind}")),
    )?;
    wait_until("the listener", READY, Duration::from_millis(50), || {
        Ok(p.log_text()?.contains("listening"))
    })?;
    Ok(p)
}

fn report_of(p: &Proc) -> Result<ListenReport> {
    p.wait_timeout(Duration::from_secs(30))?
        .ok_or_else(|| anyhow!("the listener did not end"))?;
    let text = p.log_text()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("listener printed {text:?}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Unix times of the replies in `ping -D` output.
fn reply_times(text: &str) -> Vec<f64> {
    text.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

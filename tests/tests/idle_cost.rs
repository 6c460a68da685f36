//! What idle peers cost (issue 4, scenario 7): one agent with 50 idle peers, on public hosts
//! (WAN emulator, 20 ms per uplink), beside one agent alone (0 peers) as the baseline, with a
//! control plane and two relays. 52 real agents: the measured one creates a party per peer and
//! each peer joins its own (a star: 50 pairs). One party for all 51 (`RALLY_LAB_IDLE_MESH=1`,
//! 1275 pairs) is heavier than two shared cores carry: the pairs' probing saturates them and
//! paths start failing. `RALLY_LAB_IDLE_PEERS` changes the number of peers.
//!
//! Once the peers are connected and idle, the measured agent's traffic is watched for a while
//! (`RALLY_LAB_IDLE_MEASURE_SECS`, default 30 s): bytes per second per peer on its `eth0`
//! (minus the lone agent's), the connection manager's probes per second per peer
//! (`probes_sent` in `rally metrics --json`), memory per peer (VmRSS minus the lone agent's,
//! over 50) and CPU.
//!
//! It asserts that the peers connect and stay connected (each answers a ping over the overlay)
//! and prints the figures; it asserts no cost (the machine is shared).
//! Run with `cargo test -p rally-lab --test idle_cost -- --nocapture` after
//! `cargo build --workspace --bins`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use rally_lab::scenario::{agent_pid, cpu_time, link_bytes, probes_sent, view, vm_rss_kib, World};
use rally_lab::star::{self, IDLE_AFTER};
use rally_lab::{with_lab, Agent};

/// Peers of the measured agent (the party has one agent more); `RALLY_LAB_IDLE_PEERS`
/// overrides it.
const PEERS_DEFAULT: usize = 50;
/// In a mesh, the pairs that do not include the measured agent exchange no data (a WireGuard
/// tunnel is created on its first packet, so they never handshake) but probe their paths while
/// busy after connecting: measuring starts this long after every peer is connected, so that
/// burst does not load the machine.
const MESH_SETTLE: Duration = Duration::from_secs(60);
/// Default measuring window.
const MEASURE_DEFAULT_SECS: u64 = 30;
/// How long the whole party may take to see everyone and connect.
const FORM: Duration = Duration::from_secs(120);

#[test]
fn fifty_idle_peers_cost_little_bandwidth_and_memory() -> Result<()> {
    let measure = Duration::from_secs(match std::env::var("RALLY_LAB_IDLE_MEASURE_SECS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("RALLY_LAB_IDLE_MEASURE_SECS={v:?}"))?,
        Err(_) => MEASURE_DEFAULT_SECS,
    });
    let mesh = std::env::var("RALLY_LAB_IDLE_MESH").is_ok_and(|v| v == "1");
    let peers_wanted: usize = match std::env::var("RALLY_LAB_IDLE_PEERS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("RALLY_LAB_IDLE_PEERS={v:?}"))?,
        Err(_) => PEERS_DEFAULT,
    };
    with_lab(|lab| {
        #[allow(non_snake_case)]
        let PEERS = peers_wanted;
        let started = Instant::now();
        let world = World::start(lab)?;
        let names: Vec<String> = (0..=PEERS).map(|i| format!("i{i}")).collect();
        let mut all: Vec<String> = names.clone();
        all.push("solo".into());
        let hosts = all
            .iter()
            .map(|n| lab.add_wan_host(n))
            .collect::<Result<Vec<_>>>()?;
        let mut agents = star::start_agents(&hosts, world.cp.control())?;
        let solo = agents.pop().ok_or_else(|| anyhow!("no lone agent"))?;
        let owner = &agents[0];
        // Star (default): the measured agent creates up to `star::MAX_PARTIES` parties and
        // each peer joins one, so the measured agent has 50 peers and each of them a few. Mesh
        // (`RALLY_LAB_IDLE_MESH=1`): one party for all, 1275 pairs.
        let codes: Vec<String> = if mesh {
            vec![owner.party_create("idle", &[])?; PEERS]
        } else {
            star::party_codes(owner, "idle", PEERS)?
        };
        let spokes: Vec<(&Agent, &String)> = agents[1..].iter().zip(&codes).collect();
        star::join_parties(&spokes)?;
        let joined_at = started.elapsed();

        // The measured agent lists all its peers, and each peer the measured agent (in a mesh,
        // everyone).
        for a in &agents {
            let others: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| {
                    *n != a.name() && (mesh || a.name() == owner.name() || *n == owner.name())
                })
                .collect();
            a.wait_for_peers(&others, FORM)?;
        }
        star::wait_connected(lab, owner, PEERS, FORM)?;
        let connected_at = started.elapsed();
        let connected = Instant::now();
        star::ping_all(owner)?;
        // Let every peer go idle: no data for `idle after` since those pings.
        std::thread::sleep(IDLE_AFTER);
        if mesh {
            std::thread::sleep(MESH_SETTLE.saturating_sub(connected.elapsed()));
        }

        let (pid, solo_pid) = (agent_pid(owner.host())?, agent_pid(solo.host())?);
        let (rss0, solo_rss0) = (vm_rss_kib(pid)?, vm_rss_kib(solo_pid)?);
        let (bytes0, solo_bytes0) = (
            link_bytes(owner.host(), "eth0")?,
            link_bytes(solo.host(), "eth0")?,
        );
        let (cpu0, solo_cpu0) = (cpu_time(pid)?, cpu_time(solo_pid)?);
        let probes0 = probes_sent(owner)?;
        let t0 = Instant::now();
        std::thread::sleep(measure);
        let bytes = link_bytes(owner.host(), "eth0")?.since(&bytes0);
        let solo_bytes = link_bytes(solo.host(), "eth0")?.since(&solo_bytes0);
        let probes1 = probes_sent(owner)?;
        let (cpu, solo_cpu) = (cpu_time(pid)? - cpu0, cpu_time(solo_pid)? - solo_cpu0);
        let secs = t0.elapsed().as_secs_f64();
        let (rss, solo_rss) = (vm_rss_kib(pid)?, vm_rss_kib(solo_pid)?);

        // Still all there after the window.
        let peers = owner.peers()?;
        ensure!(
            peers.len() == PEERS,
            "the measured agent lists {} peers after the window",
            peers.len()
        );
        let states: Vec<String> = names[1..]
            .iter()
            .map(|n| view(owner, n).map(|v| v.state))
            .collect::<Result<_>>()?;
        let up = states
            .iter()
            .filter(|s| *s == "connected" || *s == "degraded")
            .count();
        ensure!(
            up == PEERS,
            "only {up} of {PEERS} peers connected after the idle window: {states:?}"
        );
        let direct = peers
            .iter()
            .filter(|p| p.strategy.as_deref() == Some("direct"))
            .count();

        let n = PEERS as f64;
        let total = (bytes.rx_bytes + bytes.tx_bytes) as f64 / secs;
        let base = (solo_bytes.rx_bytes + solo_bytes.tx_bytes) as f64 / secs;
        let pkts = (bytes.rx_packets + bytes.tx_packets) as f64 / secs;
        let base_pkts = (solo_bytes.rx_packets + solo_bytes.tx_packets) as f64 / secs;
        let per_peer = (total - base) / n;
        let (pd, pr) = (probes1.0 - probes0.0, probes1.1 - probes0.1);
        let rss_per_peer = (rss as f64 - solo_rss as f64) / n;
        println!(
            "scenario 7 idle cost: {PEERS} idle peers, measured {secs:.0} s: {per_peer:.1} B/s per \
             peer on the wire (eth0 rx+tx {total:.0} B/s, {pkts:.1} packets/s, minus {base:.0} \
             B/s / {base_pkts:.1} packets/s of an agent with 0 peers); connection-manager probes \
             sent {:.3}/s per peer ({:.3} direct + {:.3} relay); memory {rss_per_peer:.0} KiB per \
             peer (VmRSS {} KiB with {PEERS} peers, {} KiB with 0; debug build); CPU {:.2} % of \
             a core ({:.2} % with 0 peers)",
            (pd + pr) as f64 / secs / n,
            pd as f64 / secs / n,
            pr as f64 / secs / n,
            rss,
            solo_rss,
            cpu.as_secs_f64() / secs * 100.0,
            solo_cpu.as_secs_f64() / secs * 100.0,
        );
        println!(
            "  {} agents joined after {} s, all {PEERS} peers connected after {} s ({direct} \
             direct); RSS before the window {rss0} KiB / {solo_rss0} KiB; total {} s",
            agents.len(),
            joined_at.as_secs(),
            connected_at.as_secs(),
            started.elapsed().as_secs()
        );
        Ok(())
    })
}

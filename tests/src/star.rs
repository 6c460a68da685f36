//! One agent with many idle peers (the idle-cost test, `tests/tests/idle_cost.rs`, and `bench
//! idle`): agents started in batches, a star of parties (the measured agent creates up to
//! [`MAX_PARTIES`] parties and each peer joins one, so the measured agent has N peers and each
//! of them the measured agent and the few peers sharing its party), and the waits until every
//! peer is connected and has carried a ping.

use std::thread::ScopedJoinHandle;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};

use crate::scenario::{wait_netcheck, CONTROL_TIMEOUT};
use crate::{Agent, Host, Lab};

/// Agents started (or joined, or pinged) at a time.
pub const BATCH: usize = 10;

/// A peer is busy (its paths probed every second) for `idle after` (30 s, profile stable)
/// after its last data, and WireGuard handshake messages count as data: measure idle cost
/// this long after the pings that open every tunnel of the measured agent.
pub const IDLE_AFTER: Duration = Duration::from_secs(32);

/// Starts an agent on each of `hosts` (named after the host), `BATCH` at a time, each waiting
/// until it is registered with `control` and has run its netcheck.
pub fn start_agents(hosts: &[Host], control: Option<(&str, &str)>) -> Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for chunk in hosts.chunks(BATCH) {
        let started: Vec<Result<Agent>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|h| {
                    s.spawn(move || {
                        let a = Agent::start(h, h.name(), control)?;
                        a.wait_control_connected(CONTROL_TIMEOUT)?;
                        wait_netcheck(&a, CONTROL_TIMEOUT)?;
                        Ok(a)
                    })
                })
                .collect();
            join_all(handles)
        });
        for a in started {
            agents.push(a?);
        }
    }
    Ok(agents)
}

/// Parties one owner creates for a star: the control plane lets an agent belong to at most 32,
/// so spokes beyond this share parties (a few spokes each, which see each other too but never
/// exchange data).
pub const MAX_PARTIES: usize = 16;

/// Invite codes for `n` spokes: `min(n, MAX_PARTIES)` new parties created by `owner`
/// (`<prefix>1` …), spoke `i` getting party `i % MAX_PARTIES`.
pub fn party_codes(owner: &Agent, prefix: &str, n: usize) -> Result<Vec<String>> {
    let mut codes = Vec::new();
    for chunk in (1..=n.min(MAX_PARTIES)).collect::<Vec<_>>().chunks(BATCH) {
        let made: Vec<Result<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|i| s.spawn(move || owner.party_create(&format!("{prefix}{i}"), &[])))
                .collect();
            join_all(handles)
        });
        codes.extend(made.into_iter().collect::<Result<Vec<_>>>()?);
    }
    Ok((0..n).map(|i| codes[i % codes.len()].clone()).collect())
}

/// Each agent joins the party of its code, `BATCH` at a time.
pub fn join_parties(joins: &[(&Agent, &String)]) -> Result<()> {
    for chunk in joins.chunks(BATCH) {
        let joined: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(a, code)| {
                    s.spawn(move || {
                        let out = a.party_join(code)?;
                        ensure!(
                            out.status.success(),
                            "{} could not join: {}",
                            a.name(),
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                        Ok(())
                    })
                })
                .collect();
            join_all(handles)
        });
        joined.into_iter().collect::<Result<Vec<()>>>()?;
    }
    Ok(())
}

/// A star: `owner` creates a party per spoke, each spoke joins its own; returns once the owner
/// lists every spoke and every spoke the owner.
pub fn form(owner: &Agent, spokes: &[Agent], prefix: &str, timeout: Duration) -> Result<()> {
    let codes = party_codes(owner, prefix, spokes.len())?;
    let joins: Vec<(&Agent, &String)> = spokes.iter().zip(&codes).collect();
    join_parties(&joins)?;
    let names: Vec<&str> = spokes.iter().map(Agent::name).collect();
    owner.wait_for_peers(&names, timeout)?;
    for s in spokes {
        s.wait_for_peers(&[owner.name()], timeout)?;
    }
    Ok(())
}

/// Waits until `owner` lists `n` peers, all connected (or degraded); returns `k of n connected,
/// d direct` as last seen.
pub fn wait_connected(lab: &Lab, owner: &Agent, n: usize, timeout: Duration) -> Result<String> {
    let mut routes = String::new();
    lab.wait_until(
        &format!("{} to reach its {n} peers", owner.name()),
        timeout,
        Duration::from_secs(1),
        || {
            let peers = owner.peers_json()?;
            let list = peers.as_array().cloned().unwrap_or_default();
            let connected = list
                .iter()
                .filter(|p| p["state"] == "connected" || p["state"] == "degraded")
                .count();
            let direct = list.iter().filter(|p| p["strategy"] == "direct").count();
            routes = format!("{connected} of {} connected, {direct} direct", list.len());
            Ok(list.len() == n && connected == n)
        },
    )
    .with_context(|| format!("last seen {routes}"))?;
    Ok(routes)
}

/// Every peer of `owner` answers a ping over the overlay (which also makes the WireGuard
/// handshakes happen now rather than at the first keepalive, 25 s in).
pub fn ping_all(owner: &Agent) -> Result<()> {
    let vips: Vec<String> = owner.peers()?.into_iter().map(|p| p.virtual_ip).collect();
    for chunk in vips.chunks(BATCH) {
        let pinged: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|vip| {
                    s.spawn(move || {
                        let out = owner.kernel_ping(vip, 3)?;
                        ensure!(
                            out.status.success(),
                            "{} got no ping answered by {vip}",
                            owner.name()
                        );
                        Ok(())
                    })
                })
                .collect();
            join_all(handles)
        });
        pinged.into_iter().collect::<Result<Vec<()>>>()?;
    }
    Ok(())
}

/// Joins scoped threads, turning a panic into an error.
pub fn join_all<T>(handles: Vec<ScopedJoinHandle<'_, Result<T>>>) -> Vec<Result<T>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow!("a thread panicked")))
        })
        .collect()
}

//! An agent's view of a peer, read from `rally peers --json`, and waiting for it to change.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::{wait_until, Agent};

use super::VIEW_POLL;

/// One path in `rally peers --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct PathView {
    /// `direct:ADDR` or `relay:NAME`.
    pub path: String,
    /// `probing`, `up` or `down`.
    pub health: String,
    #[serde(default)]
    pub latency_ms: Option<f64>,
    #[serde(default)]
    pub is_primary: bool,
    #[serde(default)]
    pub consecutive_successes: u32,
    #[serde(default)]
    pub probes_sent: u64,
    #[serde(default)]
    pub probes_failed: u64,
}

/// An agent's view of one peer from `rally peers --json` (the fields the scenarios use).
#[derive(Clone, Debug, Deserialize)]
pub struct View {
    pub name: String,
    /// `direct`, `relay` or `none`.
    pub strategy: String,
    #[serde(default)]
    pub relay: Option<String>,
    pub state: String,
    #[serde(default)]
    pub failovers: u64,
    #[serde(default)]
    pub relay_switches: u64,
    #[serde(default)]
    pub paths: Vec<PathView>,
}

impl View {
    pub fn is_direct(&self) -> bool {
        self.strategy == "direct"
    }

    pub fn is_relayed(&self) -> bool {
        self.strategy == "relay"
    }

    /// `direct`, `relay:NAME` or `none`.
    pub fn route(&self) -> String {
        match (self.strategy.as_str(), &self.relay) {
            ("relay", Some(r)) => format!("relay:{r}"),
            (s, _) => s.to_owned(),
        }
    }

    /// The path named `path` (`relay:r1`), if the peer has it.
    pub fn path(&self, path: &str) -> Option<&PathView> {
        self.paths.iter().find(|p| p.path == path)
    }

    /// The health of the path named `path` (`relay:r1`), if the peer has it.
    pub fn health_of(&self, path: &str) -> Option<&str> {
        self.path(path).map(|p| p.health.as_str())
    }

    /// `relay:r1 (connected, 1 failovers, 0 relay switches) paths direct:…=down/81ms (probes 3
    /// lost of 9) relay:r1=up/163ms* (probes 0 lost of 9) …` (`*`: the primary).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} ({}, {} failovers, {} relay switches) paths",
            self.route(),
            self.state,
            self.failovers,
            self.relay_switches
        );
        for p in &self.paths {
            let _ = write!(
                s,
                " {}={}{}{} (probes {} lost of {})",
                p.path,
                p.health,
                p.latency_ms.map_or(String::new(), |l| format!("/{l:.0}ms")),
                if p.is_primary { "*" } else { "" },
                p.probes_failed,
                p.probes_sent
            );
        }
        s
    }
}

/// `agent`'s view of the peer named `peer`.
pub fn view(agent: &Agent, peer: &str) -> Result<View> {
    let peers = agent.peers_json()?;
    let entry = peers
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == peer))
        .ok_or_else(|| anyhow!("{} does not list {peer}", agent.name()))?;
    serde_json::from_value(entry.clone()).context("reading a `rally peers --json` entry")
}

/// Waits until `agent`'s view of `peer` satisfies `pred`; returns the time it took and the
/// view.
pub fn wait_view(
    agent: &Agent,
    peer: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&View) -> bool,
) -> Result<(Duration, View)> {
    let start = Instant::now();
    let mut last: Option<View> = None;
    let what = format!("{}'s view of {peer} to {what}", agent.name());
    let check = || {
        let v = view(agent, peer)?;
        let ok = pred(&v);
        last = Some(v);
        Ok(ok)
    };
    wait_until(&what, timeout, VIEW_POLL, check).map_err(|e| {
        let seen = last.as_ref().map_or("nothing".into(), View::describe);
        crate::with_logs(
            e.context(format!("last seen {seen}")),
            &agent.host().logs_tail(),
        )
    })?;
    let v = last.ok_or_else(|| anyhow!("no view"))?;
    Ok((start.elapsed(), v))
}

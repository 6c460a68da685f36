//! `rally events --follow` in the background, and reading JSON lines from command output.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::procs::Proc;
use crate::{bins, Agent};

/// `rally events … --follow` running in the background (its output in a log file).
pub struct EventFollower {
    proc: Proc,
    log: PathBuf,
}

impl EventFollower {
    /// Starts `rally --state-dir DIR events ARGS…` on the agent's host and gives it a moment
    /// to subscribe; fails if it exits.
    pub fn start(agent: &Agent, label: &str, args: &[&str]) -> Result<EventFollower> {
        let bin = bins::rally()?.to_string_lossy().into_owned();
        let dir = agent.state_dir().to_string_lossy().into_owned();
        let mut full = vec![bin.as_str(), "--state-dir", dir.as_str(), "events"];
        full.extend_from_slice(args);
        let log = agent
            .host()
            .log_path(&format!("events-{}-{label}", agent.name()));
        let proc = agent.host().spawn(&full, &log)?;
        std::thread::sleep(Duration::from_millis(700));
        if let Some(status) = proc.try_status()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("`rally events` exited at once ({status}):\n{text}");
        }
        Ok(EventFollower { proc, log })
    }

    /// The JSON events printed so far (other lines, e.g. the lab's header, are skipped).
    pub fn events(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        Ok(json_lines(&text))
    }

    /// Whether it is still following.
    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// Stops following; returns every event it printed. Fails (with what it printed) if it
    /// had stopped by itself.
    pub fn stop(self) -> Result<Vec<Value>> {
        if let Some(status) = self.proc.try_status()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("`rally events` had exited ({status}):\n{}", text.trim());
        }
        self.proc.terminate(Duration::from_secs(2))?;
        self.events()
    }
}

/// The lines of `text` that parse as JSON objects.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The failover event about `peer` from `direct:…` to `relay:…` among `events`.
pub fn failover_event(events: &[Value], peer: &str) -> Result<Value> {
    events
        .iter()
        .find(|e| {
            e["type"] == "failover"
                && e["peer"] == peer
                && e["path"].as_str().is_some_and(|p| p.starts_with("relay:"))
                && e["message"].as_str().is_some_and(|m| m.contains("direct:"))
        })
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "no failover event about {peer} from direct:… to relay:…; printed: {}",
                events
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
}

/// The first `relay_switch` or `failover` event to `relay:<to>` at or after `since` (Unix
/// seconds), as `type: message`; `no event` if there is none.
pub fn event_to_relay_after(events: &[Value], since: f64, to: &str) -> String {
    events
        .iter()
        .filter(|e| {
            e["time"]
                .as_u64()
                .is_some_and(|t| t as f64 / 1000.0 >= since - 0.01)
        })
        .find(|e| {
            (e["type"] == "relay_switch" || e["type"] == "failover")
                && e["path"] == format!("relay:{to}")
        })
        .map_or("no event".into(), |e| {
            format!(
                "{}: {}",
                e["type"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("?")
            )
        })
}

//! A `rally up` daemon on a lab host and the `rally` commands run against it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::host::{check_success, describe, Host};
use crate::procs::Proc;
use crate::{bins, wait_until};

use super::status::{Peer, Status};
use super::{
    abort, last_line, make_private_dir, parse_json, READY_POLL, READY_TIMEOUT, STOP_GRACE,
};

/// A `rally up` daemon on one host, with its own state directory.
pub struct Agent {
    host: Host,
    name: String,
    bin: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    control: Option<(String, String)>,
    /// More `rally up` flags (e.g. `--metrics`, `--profile`).
    extra: Vec<String>,
    proc: Option<Proc>,
}

impl Agent {
    /// Spawns `rally --state-dir DIR up --name NAME [--control ADDR --control-key KEY]` on `host`
    /// (state dir mode 0700 in the lab's directory) and waits until `rally status` answers.
    pub fn start(host: &Host, name: &str, control: Option<(&str, &str)>) -> Result<Agent> {
        Self::start_with(host, name, control, &[])
    }

    /// Like `start`, with more `rally up` flags.
    pub fn start_with(
        host: &Host,
        name: &str,
        control: Option<(&str, &str)>,
        extra: &[&str],
    ) -> Result<Agent> {
        let state_dir = host
            .lab_dir()
            .join("agents")
            .join(format!("{}-{name}", host.name()));
        make_private_dir(&state_dir)?;
        let mut agent = Agent {
            host: host.clone(),
            name: name.to_owned(),
            bin: bins::rally()?,
            log: host.log_path(&format!("rally-{name}")),
            state_dir,
            control: control.map(|(a, k)| (a.to_owned(), k.to_owned())),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        agent.up()?;
        Ok(agent)
    }

    /// The full `rally … up …` command line this agent runs with.
    pub fn up_args(&self) -> Vec<String> {
        let mut args = vec![
            self.bin.to_string_lossy().into_owned(),
            "--state-dir".to_owned(),
            self.state_dir.to_string_lossy().into_owned(),
            "up".to_owned(),
            "--name".to_owned(),
            self.name.clone(),
        ];
        if let Some((addr, key)) = &self.control {
            args.extend([
                "--control".to_owned(),
                addr.clone(),
                "--control-key".to_owned(),
                key.clone(),
            ]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Spawns the daemon and waits until it is ready.
    fn up(&mut self) -> Result<()> {
        let proc = self.host.spawn(&self.up_args(), &self.log)?;
        self.proc = Some(proc);
        self.wait_ready(READY_TIMEOUT)
    }

    /// Waits until the control socket exists and `rally status --json` succeeds; fails at once
    /// if the daemon exits.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let socket = self.state_dir.join("rally.sock");
        let check = || {
            self.check_alive().map_err(abort)?;
            Ok(socket.exists() && self.rally(&["status", "--json"])?.status.success())
        };
        let what = format!("agent {} to answer `rally status`", self.name);
        wait_until(&what, timeout, READY_POLL, check).map_err(|e| self.with_logs(e))
    }

    /// Fails if the daemon process has exited.
    fn check_alive(&self) -> Result<()> {
        match &self.proc {
            Some(proc) => match proc.try_status()? {
                Some(status) => bail!("agent {} exited ({status})", self.name),
                None => Ok(()),
            },
            None => bail!("agent {} is stopped", self.name),
        }
    }

    /// `e` with the lab's log tails appended.
    fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        crate::with_logs(e, &self.host.logs_tail())
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host it runs on.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Its state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Its daemon log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the daemon process is running.
    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(Proc::is_running)
    }

    /// Runs `rally --state-dir DIR ARGS…` in the host's namespace; any exit status is returned.
    pub fn rally(&self, args: &[&str]) -> Result<Output> {
        let bin = self.bin.to_string_lossy().into_owned();
        let dir = self.state_dir.to_string_lossy().into_owned();
        let mut full = vec![bin.as_str(), "--state-dir", dir.as_str()];
        full.extend_from_slice(args);
        self.host.run(&full)
    }

    /// `rally`, failing unless it exits 0. Returns stdout.
    pub fn rally_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.rally(args)?;
        check_success(&out, &format!("rally {}", describe(args)))
            .with_context(|| format!("agent {}", self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rally status --json`, parsed.
    pub fn status_json(&self) -> Result<Value> {
        parse_json(
            &self.rally_ok(&["status", "--json"])?,
            "rally status --json",
        )
    }

    /// `rally status --json` as a `Status`.
    pub fn status(&self) -> Result<Status> {
        serde_json::from_value(self.status_json()?).context("reading `rally status --json`")
    }

    /// The agent's virtual IP from `rally status --json`.
    pub fn virtual_ip(&self) -> Result<Ipv4Addr> {
        let status = self.status()?;
        let ip = status
            .virtual_ip
            .ok_or_else(|| anyhow!("agent {} has no virtual_ip yet", self.name))?;
        ip.parse().with_context(|| {
            format!(
                "agent {}: virtual_ip {ip:?} is not an IPv4 address",
                self.name
            )
        })
    }

    /// `rally peers --json`, parsed.
    pub fn peers_json(&self) -> Result<Value> {
        parse_json(&self.rally_ok(&["peers", "--json"])?, "rally peers --json")
    }

    /// `rally peers --json` as `Peer`s.
    pub fn peers(&self) -> Result<Vec<Peer>> {
        serde_json::from_value(self.peers_json()?).context("reading `rally peers --json`")
    }

    /// `rally party create NAME EXTRA…`; returns the invite code (stdout's last line).
    pub fn party_create(&self, name: &str, extra_args: &[&str]) -> Result<String> {
        let mut args = vec!["party", "create", name];
        args.extend_from_slice(extra_args);
        let stdout = self.rally_ok(&args)?;
        last_line(&stdout)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("`rally party create {name}` printed no invite code"))
    }

    /// `rally party join CODE`; the output is returned whatever the exit status.
    pub fn party_join(&self, code: &str) -> Result<Output> {
        self.rally(&["party", "join", code])
    }

    /// `rally ping PEER -c N`; the output is returned whatever the exit status.
    pub fn rally_ping(&self, peer: &str, count: u32) -> Result<Output> {
        let count = count.to_string();
        self.rally(&["ping", peer, "-c", count.as_str()])
    }

    /// Kernel `ping -c N -W 1 IP` in the agent's namespace (over the overlay for a virtual IP).
    pub fn kernel_ping(&self, ip: &str, count: u32) -> Result<Output> {
        let c = count.to_string();
        let timeout = Duration::from_secs(u64::from(count) * 2 + 15);
        self.host
            .run_timeout(&["ping", "-c", c.as_str(), "-W", "1", ip], timeout)
    }

    /// Waits until control.connected is true in `rally status --json`.
    pub fn wait_control_connected(&self, timeout: Duration) -> Result<()> {
        let what = format!("agent {} to be connected to the control plane", self.name);
        let check = || Ok(self.status()?.control.connected);
        wait_until(&what, timeout, Duration::from_millis(200), check).map_err(|e| self.with_logs(e))
    }

    /// Waits until `rally peers --json` lists every one of `names`; returns the list.
    pub fn wait_for_peers(&self, names: &[&str], timeout: Duration) -> Result<Vec<Peer>> {
        let mut last = Vec::new();
        let what = format!("agent {} to list peers {names:?}", self.name);
        let check = || {
            last = self.peers()?;
            Ok(names.iter().all(|n| last.iter().any(|p| p.name == *n)))
        };
        wait_until(&what, timeout, Duration::from_millis(200), check)
            .map_err(|e| self.with_logs(e))?;
        Ok(last)
    }

    /// `rally down`, then waits for the daemon to exit (killing it if it does not). Fails if
    /// `rally down` failed or the daemon had to be killed — the daemon is gone either way.
    pub fn stop(&mut self) -> Result<()> {
        let Some(proc) = self.proc.take() else {
            return Ok(());
        };
        let down = self.rally(&["down"]);
        if proc.wait_timeout(STOP_GRACE)?.is_some() {
            return down.and_then(|out| check_success(&out, "rally down"));
        }
        let status = proc.terminate(Duration::from_secs(2))?;
        let down = match down {
            Ok(out) => format!(
                "exit {}, stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => format!("{e:#}"),
        };
        Err(self.with_logs(anyhow!(
            "agent {} still ran {}s after `rally down` ({down}); killed it ({status})",
            self.name,
            STOP_GRACE.as_secs()
        )))
    }

    /// Stops (if running) and starts again with the same state directory and arguments.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.up()
    }

    /// Kills the daemon with SIGKILL (a crash: no cleanup) and waits until it is gone.
    pub fn crash(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.take() {
            proc.signal(libc::SIGKILL)?;
            proc.wait_timeout(STOP_GRACE)?;
        }
        Ok(())
    }

    /// Starts the daemon again after [`Agent::crash`] (or [`Agent::stop`]).
    pub fn start_again(&mut self) -> Result<()> {
        self.up()
    }
}

//! Wrappers around the real `rally-control` and `rally` binaries, following the CLI contract in
//! DESIGN.md ("CLI contract").

use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::host::{check_success, describe, Host};
use crate::lab::Lab;
use crate::procs::Proc;
use crate::{bins, wait_until};

/// The control plane's QUIC port.
pub const CONTROL_PORT: u16 = 7443;

/// How long a freshly started daemon may take to become ready (debug builds, 2 slow cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a stopping daemon gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Poll interval for readiness checks.
const READY_POLL: Duration = Duration::from_millis(100);

/// The last non-empty line of `text`, trimmed.
pub fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rfind(|l| !l.is_empty())
}

/// Whether `key` looks like a control key: 43 characters of URL-safe base64 (32 bytes).
pub fn is_control_key(key: &str) -> bool {
    key.len() == 43
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Creates `dir` (and parents) with mode 0700.
fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// A running (or stopped) `rally-control serve` on one host.
pub struct ControlPlane {
    host: Host,
    bin: PathBuf,
    data_dir: PathBuf,
    addr: String,
    /// The port it listens on, UDP (QUIC) and TCP (TLS).
    port: u16,
    key: String,
    log: PathBuf,
    proc: Option<Proc>,
    /// `NAME=HOST:PORT` for every `--relay`.
    relays: Vec<String>,
    /// More `serve` flags (e.g. `--metrics`).
    extra: Vec<String>,
}

impl ControlPlane {
    /// `rally-control init --data-dir DIR` (the control key is stdout's last line), then
    /// `rally-control serve --data-dir DIR --listen <host ip>:7443`, waiting until it listens.
    pub fn start(host: &Host, lab: &Lab) -> Result<ControlPlane> {
        Self::start_with_relays(host, lab, &[])
    }

    /// Like `start`, handing agents the given relays (`--relay NAME=HOST:PORT` each).
    pub fn start_with_relays(host: &Host, lab: &Lab, relays: &[String]) -> Result<ControlPlane> {
        Self::start_with(host, lab, relays, &[])
    }

    /// Like `start_with_relays`, with more `serve` flags.
    pub fn start_with(
        host: &Host,
        lab: &Lab,
        relays: &[String],
        extra: &[&str],
    ) -> Result<ControlPlane> {
        Self::start_on_port(host, lab, relays, extra, CONTROL_PORT)
    }

    /// Like `start_with`, listening on `port` (UDP for QUIC and TCP for TLS) instead of 7443:
    /// 443 reaches agents behind a network that lets out only TCP 80/443.
    pub fn start_on_port(
        host: &Host,
        lab: &Lab,
        relays: &[String],
        extra: &[&str],
        port: u16,
    ) -> Result<ControlPlane> {
        let (key, data_dir) = Self::init(host, lab)?;
        let bin = bins::rally_control()?;
        let mut cp = ControlPlane {
            addr: format!("{}:{port}", host.ip()),
            port,
            key,
            log: host.log_path("rally-control"),
            host: host.clone(),
            bin,
            data_dir,
            proc: None,
            relays: relays.to_vec(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        cp.serve()?;
        Ok(cp)
    }

    /// `rally-control init` for `host`'s data directory in the lab (idempotent): the control key
    /// (stdout's last line) and the directory. Relays need the key before the control plane
    /// that lists them starts.
    pub fn init(host: &Host, lab: &Lab) -> Result<(String, PathBuf)> {
        let bin = bins::rally_control()?;
        let data_dir = lab.dir().join(format!("control-{}", host.name()));
        make_private_dir(&data_dir)?;
        let data = data_dir.to_string_lossy().into_owned();
        let bin_s = bin.to_string_lossy().into_owned();
        let stdout = host.run_ok(&[bin_s.as_str(), "init", "--data-dir", data.as_str()])?;
        let key = last_line(&stdout)
            .ok_or_else(|| anyhow!("`rally-control init` printed no control key"))?;
        if !is_control_key(key) {
            bail!("`rally-control init` printed {key:?} as its last line; expected a 43-character base64url key");
        }
        Ok((key.to_owned(), data_dir))
    }

    /// Spawns `serve` and waits until its UDP port is bound.
    fn serve(&mut self) -> Result<()> {
        let bin = self.bin.to_string_lossy().into_owned();
        let data = self.data_dir.to_string_lossy().into_owned();
        let mut args = vec![
            bin,
            "serve".into(),
            "--data-dir".into(),
            data,
            "--listen".into(),
            self.addr.clone(),
        ];
        for r in &self.relays {
            args.push("--relay".into());
            args.push(r.clone());
        }
        args.extend(self.extra.iter().cloned());
        let proc = self.host.spawn(&args, &self.log)?;
        self.proc = Some(proc.clone());
        let host = self.host.clone();
        let port = self.port;
        let check = || udp_port_bound(&host, port, &proc);
        wait_until("rally-control to listen", READY_TIMEOUT, READY_POLL, check)
            .map_err(|e| crate::with_logs(e, &self.host.logs_tail()))
    }

    /// `HOST:PORT` agents should dial.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The control key (base64url).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The running `serve` process's id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// `(addr, key)` for `Agent::start`.
    pub fn control(&self) -> Option<(&str, &str)> {
        Some((&self.addr, &self.key))
    }

    /// The data directory (kept across restarts).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The host it runs on.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the serve process is running.
    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(Proc::is_running)
    }

    /// SIGTERM and wait (SIGKILL after a grace period).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.take() {
            proc.terminate(STOP_GRACE)?;
        }
        Ok(())
    }

    /// Stops (if running) and serves again from the same data directory and address.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.serve()
    }
}

/// Whether something in `host`'s namespace listens on UDP `port`; fails if `proc` has exited.
fn udp_port_bound(host: &Host, port: u16, proc: &Proc) -> Result<bool> {
    if let Some(status) = proc.try_status()? {
        return Err(abort(anyhow!("{} exited early ({status})", proc.label())));
    }
    let filter = format!("sport = :{port}");
    let out = host.run_ok(&["ss", "-H", "-u", "-l", "-n", filter.as_str()])?;
    Ok(!out.trim().is_empty())
}

/// Marks an error so `wait_until` gives up at once instead of polling on.
fn abort(e: anyhow::Error) -> anyhow::Error {
    e.context(crate::Abort)
}

/// The `control` object of `rally status --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ControlStatus {
    pub connected: bool,
    /// `quic` or `tcp` while connected.
    #[serde(default)]
    pub transport: Option<String>,
}

/// `rally status --json` (fields relied on by the tests; more are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    pub name: String,
    pub peer_id: String,
    #[serde(default)]
    pub virtual_ip: Option<String>,
    pub control: ControlStatus,
    #[serde(default)]
    pub parties: Vec<Value>,
}

impl Status {
    /// Names of the parties, whether listed as strings or as objects with a `name`.
    pub fn party_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.parties.iter().filter_map(party_name).collect();
        names.sort();
        names
    }
}

/// A party's name from a `parties` entry (`"lan"` or `{"name": "lan", …}`).
fn party_name(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("name").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// One element of `rally peers --json` (fields relied on by the tests; more are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct Peer {
    pub peer_id: String,
    pub name: String,
    pub virtual_ip: String,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub relay: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub latency_ms: Option<f64>,
}

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

/// Parses `text` as JSON, naming `what` on failure.
fn parse_json(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text)
        .with_context(|| format!("`{what}` printed invalid JSON: {}", text.trim()))
}

/// `code` with the character at `index` replaced by a different URL-safe base64 character, so the
/// result still decodes but no longer matches its checksum.
pub fn alter_one_char(code: &str, index: usize) -> Result<String> {
    let mut chars: Vec<char> = code.chars().collect();
    let c = chars
        .get_mut(index)
        .ok_or_else(|| anyhow!("code {code:?} is shorter than {} characters", index + 1))?;
    *c = if *c == 'A' { 'B' } else { 'A' };
    Ok(chars.into_iter().collect())
}

/// Port `rally-relay` listens on in the lab, and its alternate STUN port.
pub const RELAY_PORT: u16 = 3478;
pub const RELAY_ALT_PORT: u16 = 3479;

/// A `rally-relay serve` process on a lab host.
pub struct RelayServer {
    name: String,
    host: Host,
    addr: String,
    proc: Proc,
    /// `,tcp=HOST:PORT,key=KEY` for a relay that listens on TLS/TCP too.
    spec_tcp: String,
}

impl RelayServer {
    /// `rally-relay serve --listen <host ip>:3478 --alt-port 3479 --control-key KEY`, waiting
    /// until it listens.
    pub fn start(host: &Host, name: &str, control_key: &str) -> Result<RelayServer> {
        Self::start_with(host, name, control_key, &[], String::new())
    }

    /// Like [`Self::start`], with `extra` arguments; `spec_tcp` follows the spec (see
    /// [`crate::relay_tcp`]).
    pub fn start_with(
        host: &Host,
        name: &str,
        control_key: &str,
        extra: &[&str],
        spec_tcp: String,
    ) -> Result<RelayServer> {
        let bin = bins::bin_path("rally-relay")?
            .to_string_lossy()
            .into_owned();
        let addr = format!("{}:{RELAY_PORT}", host.ip());
        let alt = RELAY_ALT_PORT.to_string();
        let args = [
            bin.as_str(),
            "serve",
            "--listen",
            addr.as_str(),
            "--alt-port",
            alt.as_str(),
            "--control-key",
            control_key,
        ];
        let args: Vec<&str> = args.iter().chain(extra).copied().collect();
        let proc = host.spawn(&args, host.log_path(&format!("rally-relay-{name}")))?;
        let check = || udp_port_bound(host, RELAY_PORT, &proc);
        wait_until("rally-relay to listen", READY_TIMEOUT, READY_POLL, check)
            .map_err(|e| crate::with_logs(e, &host.logs_tail()))?;
        Ok(RelayServer {
            name: name.to_owned(),
            host: host.clone(),
            addr,
            proc,
            spec_tcp,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// `HOST:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `NAME=HOST:PORT`, for `rally-control serve --relay`.
    pub fn spec(&self) -> String {
        format!("{}={}{}", self.name, self.addr, self.spec_tcp)
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_line_skips_trailing_blank_lines() {
        assert_eq!(
            last_line("Created party lan.\nrally-abc\n\n"),
            Some("rally-abc")
        );
        assert_eq!(last_line("  key  "), Some("key"));
        assert_eq!(last_line("\n \n"), None);
    }

    #[test]
    fn control_keys_are_recognised() {
        let key = "A".repeat(42) + "_";
        assert!(is_control_key(&key));
        assert!(!is_control_key(&"A".repeat(44)));
        assert!(!is_control_key(&("A".repeat(42) + "=")));
    }

    #[test]
    fn altering_changes_exactly_one_character() {
        let code = "rally-AQIDBAUGBwgJ";
        for i in 6..code.len() {
            let altered = alter_one_char(code, i).expect("in range");
            let diffs = code
                .chars()
                .zip(altered.chars())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(diffs, 1, "index {i}");
            assert_eq!(altered.len(), code.len());
        }
        assert!(alter_one_char(code, code.len()).is_err());
    }

    #[test]
    fn status_and_peers_json_are_read() {
        let status: Status = serde_json::from_str(
            r#"{"name":"alice","peer_id":"p1","virtual_ip":"10.66.0.5","control":{"connected":true},
               "nat":{},"parties":[{"name":"lan","id":"x"},"games"]}"#,
        )
        .expect("status parses");
        assert!(status.control.connected);
        assert_eq!(status.party_names(), ["games", "lan"]);
        let peers: Vec<Peer> = serde_json::from_str(
            r#"[{"peer_id":"p2","name":"bob","virtual_ip":"10.66.0.6","strategy":"direct","relay":null,
                 "state":"connected","endpoint":"198.51.100.11:51820","latency_ms":0.4,"bytes_sent":1}]"#,
        )
        .expect("peers parse");
        assert_eq!(peers[0].strategy.as_deref(), Some("direct"));
        assert_eq!(peers[0].latency_ms, Some(0.4));
    }
}

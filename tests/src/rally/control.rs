//! A `rally-control serve` process on a lab host.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::host::Host;
use crate::lab::Lab;
use crate::procs::Proc;
use crate::{bins, wait_until};

use super::{
    is_control_key, last_line, make_private_dir, udp_port_bound, CONTROL_PORT, READY_POLL,
    READY_TIMEOUT, STOP_GRACE,
};

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

//! A `rally-relay serve` process on a lab host.

use anyhow::Result;

use crate::host::Host;
use crate::procs::Proc;
use crate::{bins, wait_until};

use super::{udp_port_bound, READY_POLL, READY_TIMEOUT};

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

//! Wrappers around the real `rally-control` and `rally` binaries, following the CLI contract in
//! DESIGN.md ("CLI contract").

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::host::Host;
use crate::procs::Proc;

mod agent;
mod control;
mod relay;
mod status;

pub use agent::Agent;
pub use control::ControlPlane;
pub use relay::{RelayServer, RELAY_ALT_PORT, RELAY_PORT};
pub use status::{ControlStatus, Peer, Status};

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

#[cfg(test)]
mod tests;

//! A host: one network namespace with one address, on the lab's "internet" or on a router's LAN.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::lab::Shared;
use crate::procs::{run_interruptible, Proc};

/// How long `Host::run` lets a command take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable whose value becomes `RALLY_LOG` for daemons the lab spawns
/// (default: the caller's `RALLY_LOG`, else `info`).
pub const LOG_ENV: &str = "RALLY_LAB_LOG";

/// Something whose traffic reaches the lab's internet: a public host, a host behind a router,
/// or a router. `Lab::set_wan`, `Lab::cut` and `Lab::restore` take any of them.
pub trait Site {
    /// The name shown in messages.
    fn site_name(&self) -> &str;
    /// The address the internet sees its traffic come from.
    fn public_ip(&self) -> Ipv4Addr;
    /// The emulated uplink carrying its traffic (a WAN host's own, or its outermost router's);
    /// `None` for a host added with `Lab::add_host`, which sits on the bridge directly.
    fn uplink(&self) -> Option<&str>;
}

/// Where a host sits.
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    /// The address the internet sees (its own, or its outermost router's WAN address).
    pub(crate) public_ip: Ipv4Addr,
    /// The emulated uplink carrying its traffic, by name.
    pub(crate) uplink: Option<String>,
    /// The router whose LAN it is on.
    pub(crate) router: Option<String>,
}

/// A machine in the lab. Cheap to clone; all clones name the same namespace.
#[derive(Clone)]
pub struct Host {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    placement: Placement,
    shared: Arc<Shared>,
}

impl Host {
    pub(crate) fn new(
        name: &str,
        ns: String,
        ip: Ipv4Addr,
        placement: Placement,
        shared: Arc<Shared>,
    ) -> Self {
        Host {
            name: name.to_owned(),
            ns,
            ip,
            placement,
            shared,
        }
    }

    /// The name given to `Lab::add_host` (or `add_wan_host`, `add_host_behind`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace's name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The host's own address: on the lab's internet (in 198.51.100.0/24) for a public host,
    /// on its router's LAN (192.168.x.0/24) for a host behind a router.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The address the internet sees this host's traffic come from: `ip()` for a public host,
    /// the (outermost) router's WAN address for a host behind a router.
    pub fn public_ip(&self) -> Ipv4Addr {
        self.placement.public_ip
    }

    /// The name of the router whose LAN this host is on; `None` for a public host.
    pub fn router(&self) -> Option<&str> {
        self.placement.router.as_deref()
    }

    /// The lab's scratch directory (state dirs, data dirs, logs).
    pub fn lab_dir(&self) -> &Path {
        self.shared.dir()
    }

    /// The tail of every log the lab knows, for error messages.
    pub fn logs_tail(&self) -> String {
        self.shared.logs_tail(crate::lab::TAIL_LINES)
    }

    /// `ip netns exec NS ARGS…` as a `Command`.
    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Command> {
        if args.is_empty() {
            bail!("no command given to run on host {}", self.name);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).args(args);
        Ok(cmd)
    }

    /// Runs `ARGS…` inside this host's namespace and captures its output; fails only if it
    /// cannot be started or takes longer than `RUN_TIMEOUT`. A non-zero exit is returned, not
    /// an error. `RALLY_LOG` is removed so client commands print only what they mean to.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        self.run_timeout(args, RUN_TIMEOUT)
    }

    /// `run` with an explicit timeout.
    pub fn run_timeout<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Result<Output> {
        let mut cmd = self.command(args)?;
        cmd.env_remove("RALLY_LOG");
        run_interruptible(cmd, timeout).with_context(|| format!("on host {}", self.name))
    }

    /// `run`, failing (with stderr) unless the command exits 0. Returns stdout.
    pub fn run_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let out = self.run(args)?;
        check_success(&out, &describe(args)).with_context(|| format!("on host {}", self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `ARGS…` inside this host's namespace in the background, stdout and stderr appended
    /// to `log` (which the lab then includes in its log dumps). The lab ends it at teardown.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S], log: impl AsRef<Path>) -> Result<Proc> {
        let log = log.as_ref().to_path_buf();
        let shown = describe(args);
        let (out, err) = open_log(&log, &shown)?;
        let mut cmd = self.command(args)?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_BACKTRACE", "1");
        cmd.env("RALLY_LOG", daemon_log_filter())
            .env("NO_COLOR", "1");
        // Own process group: a Ctrl-C at the terminal reaches the lab, which then tears down
        // in order, instead of reaching every daemon at once.
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{shown}` on host {}", self.name))?;
        let label = format!("{}: {}", self.name, program_name(args));
        self.shared.add_log(&label, &log);
        Ok(Proc::track(self.shared.procs(), child, label, log))
    }

    /// A path for a new log file in the lab's log directory, named after `what`.
    pub fn log_path(&self, what: &str) -> PathBuf {
        self.shared
            .dir()
            .join("logs")
            .join(format!("{}-{what}.log", self.name))
    }
}

impl Site for Host {
    fn site_name(&self) -> &str {
        &self.name
    }

    fn public_ip(&self) -> Ipv4Addr {
        self.placement.public_ip
    }

    fn uplink(&self) -> Option<&str> {
        self.placement.uplink.as_deref()
    }
}

/// Opens `log` for appending (creating its directory) and writes a header naming the command.
/// Returns two handles for stdout and stderr.
fn open_log(log: &Path, shown: &str) -> Result<(std::fs::File, std::fs::File)> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    writeln!(file, "===== lab: starting `{shown}` =====")?;
    let second = file.try_clone()?;
    Ok((file, second))
}

/// `RALLY_LOG` for spawned daemons.
fn daemon_log_filter() -> String {
    std::env::var(LOG_ENV)
        .or_else(|_| std::env::var("RALLY_LOG"))
        .unwrap_or_else(|_| "info".to_owned())
}

/// The command line as one string, for messages.
pub(crate) fn describe<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The file name of the program in `args[0]`.
fn program_name<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.first()
        .map(|a| {
            Path::new(a.as_ref())
                .file_name()
                .unwrap_or(a.as_ref())
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

/// Fails with the command's exit status and stderr unless it succeeded.
pub fn check_success(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({})\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_name_is_the_file_name() {
        assert_eq!(program_name(&["/x/target/debug/rally", "up"]), "rally");
        assert_eq!(program_name(&["ping"]), "ping");
        assert_eq!(program_name::<&str>(&[]), "");
    }

    #[test]
    fn describe_joins_arguments() {
        assert_eq!(
            describe(&["rally", "party", "join", "c"]),
            "rally party join c"
        );
    }
}

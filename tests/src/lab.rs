//! The lab: an "internet" namespace holding a bridge, hosts attached to it, the processes they
//! run and the logs they write — all torn down when the `Lab` is dropped, panicking or not.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::host::Host;
use crate::procs::{tail_lines, Procs};
use crate::{netns, require_root};

/// Lines of each log shown in failure reports.
pub const TAIL_LINES: usize = 40;

/// Environment variable: when set, the lab's scratch directory is kept after teardown.
pub const KEEP_ENV: &str = "RALLY_LAB_KEEP";

/// How long tracked processes get between SIGTERM and SIGKILL at teardown.
const TEARDOWN_GRACE: Duration = Duration::from_secs(2);

/// The lab's internet: 198.51.100.0/24 (documentation range). The bridge holds `.1`.
const NET_PREFIX: [u8; 3] = [198, 51, 100];
const BRIDGE_HOST: u8 = 1;
const FIRST_HOST: u8 = 10;
const LAST_HOST: u8 = 250;

/// State shared between the lab and its hosts (and everything started on them).
pub(crate) struct Shared {
    dir: PathBuf,
    procs: Arc<Procs>,
    logs: Mutex<Vec<(String, PathBuf)>>,
}

impl Shared {
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn procs(&self) -> &Arc<Procs> {
        &self.procs
    }

    fn logs(&self) -> MutexGuard<'_, Vec<(String, PathBuf)>> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers a log file for dumps (once per path).
    pub(crate) fn add_log(&self, label: &str, path: &Path) {
        let mut logs = self.logs();
        if !logs.iter().any(|(_, p)| p == path) {
            logs.push((label.to_owned(), path.to_path_buf()));
        }
    }

    /// The last `lines` lines of every known log, each under a header.
    pub(crate) fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for (label, path) in self.logs().iter() {
            let tail = tail_lines(path, lines).unwrap_or_else(|e| format!("(unreadable: {e:#})"));
            out.push_str(&format!(
                "----- {label} ({}) -----\n{tail}\n",
                path.display()
            ));
        }
        if out.is_empty() {
            out.push_str("(no logs)\n");
        }
        out
    }
}

/// A set of network namespaces joined by one bridge. See the crate docs.
pub struct Lab {
    prefix: String,
    inet: String,
    shared: Arc<Shared>,
    /// Host namespaces made so far (the internet namespace is `inet`), with their hosts.
    hosts: Mutex<Vec<Host>>,
    /// `None` once teardown has taken it.
    tempdir: Option<tempfile::TempDir>,
}

impl Lab {
    /// Checks for root and namespaces, removes namespaces left by dead earlier runs, and creates
    /// this lab's internet namespace with its bridge.
    pub fn new() -> Result<Lab> {
        require_root()?;
        netns::remove_stale().context("removing namespaces left by earlier runs")?;
        let prefix = netns::next_prefix();
        let tempdir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .context("creating the lab's scratch directory")?;
        let shared = Arc::new(Shared {
            dir: tempdir.path().to_path_buf(),
            procs: Arc::new(Procs::default()),
            logs: Mutex::new(Vec::new()),
        });
        let lab = Lab {
            inet: format!("{prefix}inet"),
            prefix,
            shared,
            hosts: Mutex::new(Vec::new()),
            tempdir: Some(tempdir),
        };
        // From here on, Drop cleans up whatever was made.
        lab.make_internet()
            .context("creating the lab's internet namespace")?;
        Ok(lab)
    }

    /// The internet namespace with bridge `br0` at 198.51.100.1/24.
    fn make_internet(&self) -> Result<()> {
        let ns = self.inet.as_str();
        netns::add(ns)?;
        netns::ip(&[
            "-n",
            ns,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        let addr = format!("{}/24", net_addr(BRIDGE_HOST));
        netns::ip(&["-n", ns, "addr", "add", &addr, "dev", "br0"])?;
        netns::ip(&["-n", ns, "link", "set", "br0", "up"])?;
        Ok(())
    }

    /// The prefix of every namespace this lab makes (`rl<pid>x<n>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The internet namespace's name.
    pub fn internet_ns(&self) -> &str {
        &self.inet
    }

    /// The lab's scratch directory (logs, state and data dirs).
    pub fn dir(&self) -> &Path {
        self.shared.dir()
    }

    fn hosts(&self) -> MutexGuard<'_, Vec<Host>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds host `name` (lowercase letters, digits, `-`; unique in this lab): a namespace with
    /// loopback up and `eth0` on the bridge at 198.51.100.(10 + n)/24, default route via .1.
    pub fn add_host(&self, name: &str) -> Result<Host> {
        validate_host_name(name)?;
        let mut hosts = self.hosts();
        if hosts.iter().any(|h| h.name() == name) {
            bail!("host {name} already exists in this lab");
        }
        let index = hosts.len();
        let ip = host_ip(index)?;
        let ns = format!("{}{name}", self.prefix);
        netns::add(&ns)?;
        let host = Host::new(name, ns, ip, Arc::clone(&self.shared));
        // Record before configuring, so teardown removes a half-made host too.
        hosts.push(host.clone());
        drop(hosts);
        self.attach(&host, index)
            .with_context(|| format!("attaching host {name} to the bridge"))?;
        Ok(host)
    }

    /// Connects `host` to the bridge: veth `h<index>` in the internet namespace, `eth0` inside.
    fn attach(&self, host: &Host, index: usize) -> Result<()> {
        let (inet, ns) = (self.inet.as_str(), host.ns());
        let outer = format!("h{index}");
        netns::ip(&[
            "-n", inet, "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        netns::ip(&["-n", inet, "link", "set", &outer, "master", "br0", "up"])?;
        let addr = format!("{}/24", host.ip());
        netns::ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        netns::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        let gateway = net_addr(BRIDGE_HOST).to_string();
        netns::ip(&["-n", ns, "route", "add", "default", "via", &gateway])?;
        Ok(())
    }

    /// The hosts added so far.
    pub fn host_list(&self) -> Vec<Host> {
        self.hosts().clone()
    }

    /// Every namespace this lab made (hosts first, then the internet).
    pub fn namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self.hosts().iter().map(|h| h.ns().to_owned()).collect();
        all.push(self.inet.clone());
        all
    }

    /// The last `TAIL_LINES` lines of every log the lab has, each under a header.
    pub fn logs_tail(&self) -> String {
        self.shared.logs_tail(TAIL_LINES)
    }

    /// Prints `logs_tail` to stderr.
    pub fn dump_logs(&self) {
        eprintln!(
            "===== lab {} logs (last {TAIL_LINES} lines each) =====\n{}",
            self.prefix,
            self.logs_tail()
        );
    }

    /// `crate::wait_until`, with the tail of every log appended to the timeout error.
    pub fn wait_until<F>(&self, what: &str, timeout: Duration, poll: Duration, f: F) -> Result<()>
    where
        F: FnMut() -> Result<bool>,
    {
        crate::wait_until(what, timeout, poll, f)
            .map_err(|e| crate::with_logs(e, &self.logs_tail()))
    }

    /// Ends every process, deletes every namespace, removes the scratch directory (unless
    /// `RALLY_LAB_KEEP` is set). Errors are printed, not returned: teardown always runs to the end.
    fn teardown(&mut self) {
        self.shared.procs().kill_all(TEARDOWN_GRACE);
        for ns in self.namespaces() {
            if let Err(e) = netns::delete(&ns) {
                eprintln!("rally-lab: could not delete namespace {ns}: {e:#}");
            }
        }
        if let Some(dir) = self.tempdir.take() {
            if std::env::var_os(KEEP_ENV).is_some() {
                eprintln!(
                    "rally-lab: keeping {} ({KEEP_ENV} is set)",
                    dir.keep().display()
                );
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.teardown();
    }
}

/// 198.51.100.`last`.
fn net_addr(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], NET_PREFIX[2], last)
}

/// The address of the host added `index`-th (0-based): .10, .11, …
pub fn host_ip(index: usize) -> Result<Ipv4Addr> {
    let last = usize::from(FIRST_HOST) + index;
    if last > usize::from(LAST_HOST) {
        bail!("a lab holds at most {} hosts", LAST_HOST - FIRST_HOST + 1);
    }
    Ok(net_addr(last as u8))
}

/// Host names become part of namespace and file names: keep them short and plain.
pub fn validate_host_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > 20 || !ok_chars || name == "inet" {
        bail!("bad host name {name:?}: use 1-20 of a-z, 0-9, '-' (and not \"inet\")");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_get_consecutive_documentation_addresses() {
        assert_eq!(host_ip(0).expect("first"), Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(host_ip(1).expect("second"), Ipv4Addr::new(198, 51, 100, 11));
        assert_eq!(
            host_ip(240).expect("last"),
            Ipv4Addr::new(198, 51, 100, 250)
        );
        assert!(host_ip(241).is_err());
    }

    #[test]
    fn host_names_are_checked() {
        for ok in ["alice", "bob2", "nat-a"] {
            assert!(validate_host_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Alice",
            "a b",
            "a/b",
            "inet",
            "a-very-long-host-name-indeed",
        ] {
            assert!(validate_host_name(bad).is_err(), "{bad}");
        }
    }
}

//! The lab: an "internet" namespace holding a bridge, public hosts and NAT routers attached to
//! it (routers and WAN hosts through the userspace WAN emulator), hosts behind the routers, the
//! processes they run and the logs they write — all torn down when the `Lab` is dropped,
//! panicking or not. docs/lab.md has the address plan and a picture.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::host::{Host, Placement, Site};
use crate::procs::{tail_lines, Procs};
use crate::router::{NatKind, Router};
use crate::wan::Link;
use crate::{netns, require_root};

mod addr;
mod build;
mod links;

pub use addr::{host_ip, router_ip, validate_host_name};
use addr::{net_addr, next_lan_member, BRIDGE_HOST};
use build::attach_lan;

/// Lines of each log shown in failure reports.
pub const TAIL_LINES: usize = 40;

/// Environment variable: when set, the lab's scratch directory is kept after teardown.
pub const KEEP_ENV: &str = "RALLY_LAB_KEEP";

/// How long tracked processes get between SIGTERM and SIGKILL at teardown.
const TEARDOWN_GRACE: Duration = Duration::from_secs(2);

/// Routers and `Lab::cut` need nftables' `nft`.
const NFT_HINT: &str = "needs nftables: apt-get install nftables (scripts/setup.sh does)";

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
    /// Everything made so far (the internet namespace is `inet`).
    topo: Mutex<Topology>,
    /// `None` once teardown has taken it.
    tempdir: Option<tempfile::TempDir>,
}

/// The lab's hosts, routers and emulated uplinks.
#[derive(Default)]
struct Topology {
    /// Every host, public or behind a router, in the order added.
    hosts: Vec<Host>,
    /// Every router, carriers included, in the order made.
    routers: Vec<Router>,
    /// How many members each router's LAN has had, by router name.
    lan_members: BTreeMap<String, usize>,
    /// Public hosts (plain and WAN) so far: the next one's address index.
    public_hosts: usize,
    /// Routers on the internet so far: the next one's address index.
    public_routers: usize,
    /// Emulated uplinks so far: the next one's device number.
    uplinks: usize,
    /// Running emulators, by uplink name (the public host's or router's name).
    links: BTreeMap<String, Link>,
    /// Whether the internet namespace has the `cut` table yet.
    cut_table: bool,
}

impl Topology {
    fn name_taken(&self, name: &str) -> bool {
        self.hosts.iter().any(|h| h.name() == name) || self.routers.iter().any(|r| r.name() == name)
    }
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
            topo: Mutex::new(Topology::default()),
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

    fn topo(&self) -> MutexGuard<'_, Topology> {
        self.topo.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds host `name` (lowercase letters, digits, `-`; unique in this lab): a namespace with
    /// loopback up and `eth0` on the bridge at 198.51.100.(10 + n)/24, default route via .1.
    /// Its uplink is not emulated (no delay); see `add_wan_host`.
    pub fn add_host(&self, name: &str) -> Result<Host> {
        let mut topo = self.topo();
        let (host, index) = self.new_public_host(&mut topo, name, false)?;
        drop(topo);
        self.attach(&host, index)
            .with_context(|| format!("attaching host {name} to the bridge"))?;
        Ok(host)
    }

    /// Adds public host `name` like `add_host`, but its uplink passes through the WAN emulator
    /// (starting at [`WanProfile::default`], 20 ms each way), so `set_wan` and `cut` apply.
    pub fn add_wan_host(&self, name: &str) -> Result<Host> {
        let mut topo = self.topo();
        let (host, _) = self.new_public_host(&mut topo, name, true)?;
        self.make_uplink(&mut topo, host.ns(), "eth0", host.ip(), name)
            .with_context(|| format!("attaching host {name} through the WAN emulator"))?;
        Ok(host)
    }

    /// Adds router `name` of `kind` (names as for hosts, one namespace for both): its `wan`
    /// gets the next router address (198.51.100.100, .101, …) through the WAN emulator, its
    /// LAN bridge 192.168.(n + 1).1/24 where n counts this lab's routers. A
    /// [`NatKind::Cgnat`] router also gets a carrier router `NAME.cgn` on the internet with LAN
    /// 100.64.(n + 1).0/24, and sits behind it.
    pub fn add_router(&self, name: &str, kind: NatKind) -> Result<Router> {
        validate_host_name(name)?;
        let mut topo = self.topo();
        if topo.name_taken(name) {
            bail!("{name} already exists in this lab");
        }
        let made = if kind == NatKind::Cgnat {
            let carrier_name = format!("{name}.cgn");
            self.make_router(&mut topo, &carrier_name, NatKind::HomeRouter, true, None)
                .and_then(|carrier| {
                    let mut home =
                        self.make_router(&mut topo, name, NatKind::Cgnat, false, Some(&carrier))?;
                    home.carrier = Some(Box::new(carrier));
                    Ok(home)
                })
        } else {
            self.make_router(&mut topo, name, kind, false, None)
        };
        made.with_context(|| format!("making {kind} router {name}"))
    }

    /// Adds router `name` of `kind` on the LAN of `parent` (its WAN address is then a LAN
    /// address there): for example two home routers behind one carrier. Not for
    /// [`NatKind::Cgnat`], which is itself a stack.
    pub fn add_router_behind(&self, parent: &Router, name: &str, kind: NatKind) -> Result<Router> {
        validate_host_name(name)?;
        if kind == NatKind::Cgnat {
            bail!("a cgnat router brings its own carrier: use add_router");
        }
        let mut topo = self.topo();
        if topo.name_taken(name) {
            bail!("{name} already exists in this lab");
        }
        self.check_router(&topo, parent)?;
        self.make_router(&mut topo, name, kind, false, Some(parent))
            .with_context(|| format!("making {kind} router {name} behind {}", parent.name()))
    }

    /// Adds host `name` on `router`'s LAN: `eth0` at the router's next LAN address
    /// (192.168.x.10, .11, …), default route via the router. Its `ip()` is that LAN address,
    /// its `public_ip()` the router's `wan_ip()`.
    pub fn add_host_behind(&self, router: &Router, name: &str) -> Result<Host> {
        validate_host_name(name)?;
        let mut topo = self.topo();
        if topo.name_taken(name) {
            bail!("{name} already exists in this lab");
        }
        self.check_router(&topo, router)?;
        let (member, ip) = next_lan_member(&mut topo, router)?;
        let ns = format!("{}{name}", self.prefix);
        netns::add(&ns)?;
        let placement = Placement {
            public_ip: router.wan_ip(),
            uplink: Site::uplink(router).map(str::to_owned),
            router: Some(router.name().to_owned()),
        };
        let host = Host::new(name, ns, ip, placement, Arc::clone(&self.shared));
        // Record before configuring, so teardown removes a half-made host too.
        topo.hosts.push(host.clone());
        drop(topo);
        attach_lan(router, member, host.ns(), "eth0", ip)
            .with_context(|| format!("attaching host {name} to {}'s LAN", router.name()))?;
        Ok(host)
    }

    /// Reserves the next free router WAN address on the internet (198.51.100.100, .101, …):
    /// the new address of a router whose WAN is renumbered (`roam::renumber_wan`).
    pub fn reserve_router_ip(&self) -> Result<Ipv4Addr> {
        let mut topo = self.topo();
        let ip = router_ip(topo.public_routers)?;
        topo.public_routers += 1;
        Ok(ip)
    }

    /// Reserves the next member slot on `router`'s LAN (its number and address): where a host
    /// moved onto that LAN goes (`roam::move_host`).
    pub fn reserve_lan_member(&self, router: &Router) -> Result<(usize, Ipv4Addr)> {
        let mut topo = self.topo();
        self.check_router(&topo, router)?;
        next_lan_member(&mut topo, router)
    }

    /// The hosts added so far, public and behind routers.
    pub fn host_list(&self) -> Vec<Host> {
        self.topo().hosts.clone()
    }

    /// The routers made so far, carriers included.
    pub fn router_list(&self) -> Vec<Router> {
        self.topo().routers.clone()
    }

    /// Every namespace this lab made (hosts first, then routers, newest first, then the
    /// internet).
    pub fn namespaces(&self) -> Vec<String> {
        let topo = self.topo();
        let hosts = topo.hosts.iter().map(|h| h.ns().to_owned());
        let routers = topo.routers.iter().rev().map(|r| r.ns().to_owned());
        let mut all: Vec<String> = hosts.chain(routers).collect();
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

    /// Writes `text` to `<lab dir>/<dir>/<name>`; returns the path.
    fn write_file(&self, dir: &str, name: &str, text: &str) -> Result<PathBuf> {
        let dir = self.dir().join(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Ends every process, deletes every namespace, removes the scratch directory (unless
    /// `RALLY_LAB_KEEP` is set). Errors are printed, not returned: teardown always runs to the end.
    fn teardown(&mut self) {
        self.shared.procs().kill_all(TEARDOWN_GRACE);
        let links = std::mem::take(&mut self.topo().links);
        links.values().for_each(Link::signal_stop);
        drop(links);
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

#[cfg(test)]
mod tests;

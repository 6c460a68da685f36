//! The lab: an "internet" namespace holding a bridge, public hosts and NAT routers attached to
//! it (routers and WAN hosts through the userspace WAN emulator), hosts behind the routers, the
//! processes they run and the logs they write — all torn down when the `Lab` is dropped,
//! panicking or not. docs/lab.md has the address plan and a picture.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::host::{Host, Placement, Site};
use crate::procs::{tail_lines, Procs};
use crate::router::{self, NatKind, Router, Subnet, LAN_DEV, WAN_DEV};
use crate::wan::{self, Link, WanProfile, WanStats};
use crate::{netns, require_root};

/// Lines of each log shown in failure reports.
pub const TAIL_LINES: usize = 40;

/// Environment variable: when set, the lab's scratch directory is kept after teardown.
pub const KEEP_ENV: &str = "RALLY_LAB_KEEP";

/// How long tracked processes get between SIGTERM and SIGKILL at teardown.
const TEARDOWN_GRACE: Duration = Duration::from_secs(2);

/// The lab's internet: 198.51.100.0/24 (documentation range). The bridge holds `.1`, public
/// hosts get `.10`–`.99`, routers' WAN interfaces `.100`–`.249`.
const NET_PREFIX: [u8; 3] = [198, 51, 100];
const BRIDGE_HOST: u8 = 1;
const FIRST_HOST: u8 = 10;
const LAST_HOST: u8 = 99;
const FIRST_ROUTER: u8 = 100;
const LAST_ROUTER: u8 = 249;
/// On a router's LAN the router is `.1`; hosts (and routers behind it) get `.10`–`.250`.
const FIRST_LAN_HOST: u8 = 10;
const LAST_LAN_HOST: u8 = 250;
/// Routers and `Lab::cut` need nftables' `nft`.
const NFT_HINT: &str = "needs nftables: apt-get install nftables (scripts/setup.sh does)";
/// Name of the nftables table (in the internet namespace) that implements `Lab::cut`.
const CUT_TABLE: &str = "rally_lab";

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

    /// Sets the delay and loss of the uplink carrying `site`'s traffic (a WAN host's own, a
    /// router's, or for a host behind a router, that router's), in both directions. Applies
    /// to frames arriving from now on; frames already held keep their due time.
    pub fn set_wan(&self, site: &impl Site, profile: WanProfile) -> Result<()> {
        self.with_link(site, |link| link.set(profile))
    }

    /// Makes the uplink carrying `site`'s traffic far from `others`: frames between it and
    /// their public addresses get `extra` more delay each way, on top of the profile (so
    /// `site` can be near one agent and far from another); an empty `others` ends it. The
    /// other frames are not held back by these.
    pub fn set_wan_far(
        &self,
        site: &impl Site,
        others: &[&dyn Site],
        extra: Duration,
    ) -> Result<()> {
        let ips: Vec<_> = others.iter().map(|o| o.public_ip()).collect();
        self.with_link(site, |link| link.set_far(&ips, extra))
    }

    /// The current profile of the uplink carrying `site`'s traffic.
    pub fn wan(&self, site: &impl Site) -> Result<WanProfile> {
        self.with_link(site, |link| Ok(link.profile()))
    }

    /// Frame counts of the uplink carrying `site`'s traffic since it was made.
    pub fn wan_stats(&self, site: &impl Site) -> Result<WanStats> {
        self.with_link(site, |link| Ok(link.stats()))
    }

    /// Drops all traffic between `a`'s and `b`'s public addresses, both ways, on the internet
    /// bridge (nftables, bridge family, in the internet namespace), until `restore`.
    pub fn cut(&self, a: &impl Site, b: &impl Site) -> Result<()> {
        let elements = cut_elements(a, b)?;
        let mut topo = self.topo();
        if !topo.cut_table {
            let file = self.write_file("nft", "cut.nft", &cut_ruleset())?;
            netns::exec(&self.inet, &["nft", "-f", &file.to_string_lossy()])
                .with_context(|| format!("loading the cut table ({NFT_HINT})"))?;
            topo.cut_table = true;
        }
        netns::exec(
            &self.inet,
            &[
                "nft", "add", "element", "bridge", CUT_TABLE, "cut", &elements,
            ],
        )
        .with_context(|| format!("cutting {} from {}", a.site_name(), b.site_name()))?;
        Ok(())
    }

    /// Undoes `cut(a, b)`. Fails if the two were not cut.
    pub fn restore(&self, a: &impl Site, b: &impl Site) -> Result<()> {
        let elements = cut_elements(a, b)?;
        let topo = self.topo();
        if !topo.cut_table {
            bail!("{} and {} were not cut", a.site_name(), b.site_name());
        }
        netns::exec(
            &self.inet,
            &[
                "nft", "delete", "element", "bridge", CUT_TABLE, "cut", &elements,
            ],
        )
        .with_context(|| format!("restoring {} to {}", a.site_name(), b.site_name()))?;
        Ok(())
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

    /// Checks `name` and makes the namespace of the next public host. Returns the host (already
    /// recorded for teardown) and its address index.
    fn new_public_host(
        &self,
        topo: &mut Topology,
        name: &str,
        emulated: bool,
    ) -> Result<(Host, usize)> {
        validate_host_name(name)?;
        if topo.name_taken(name) {
            bail!("host {name} already exists in this lab");
        }
        let index = topo.public_hosts;
        let ip = host_ip(index)?;
        let ns = format!("{}{name}", self.prefix);
        netns::add(&ns)?;
        topo.public_hosts += 1;
        let placement = Placement {
            public_ip: ip,
            uplink: emulated.then(|| name.to_owned()),
            router: None,
        };
        let host = Host::new(name, ns, ip, placement, Arc::clone(&self.shared));
        // Record before configuring, so teardown removes a half-made host too.
        topo.hosts.push(host.clone());
        Ok((host, index))
    }

    /// Connects `host` to the bridge: veth `h<index>` in the internet namespace, `eth0` inside.
    fn attach(&self, host: &Host, index: usize) -> Result<()> {
        let (inet, ns) = (self.inet.as_str(), host.ns());
        let outer = format!("h{index}");
        netns::ip(&[
            "-n", inet, "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        netns::ip(&["-n", inet, "link", "set", &outer, "master", "br0", "up"])?;
        let gateway = net_addr(BRIDGE_HOST);
        configure_iface(ns, "eth0", host.ip(), gateway)
    }

    /// Connects device `dev` of namespace `ns` (address `ip`) to the bridge through a new WAN
    /// emulator named `uplink`: `dev` ↔ `u<n>a` ⇄ emulator ⇄ `u<n>b` ↔ `u<n>p` on `br0`.
    fn make_uplink(
        &self,
        topo: &mut Topology,
        ns: &str,
        dev: &str,
        ip: Ipv4Addr,
        uplink: &str,
    ) -> Result<()> {
        let n = topo.uplinks;
        topo.uplinks += 1;
        let inet = self.inet.as_str();
        let (a, b, p) = (format!("u{n}a"), format!("u{n}b"), format!("u{n}p"));
        netns::ip(&[
            "-n", inet, "link", "add", &a, "type", "veth", "peer", "name", dev, "netns", ns,
        ])?;
        netns::ip(&[
            "-n", inet, "link", "add", &b, "type", "veth", "peer", "name", &p,
        ])?;
        netns::ip(&["-n", inet, "link", "set", &p, "master", "br0", "up"])?;
        netns::ip(&["-n", inet, "link", "set", &a, "up"])?;
        netns::ip(&["-n", inet, "link", "set", &b, "up"])?;
        // Every device that transmits into the emulator's two ends: whole, checksummed frames.
        netns::in_ns(inet, || {
            [&a, &b, &p]
                .into_iter()
                .try_for_each(|d| wan::disable_offloads(d))
        })?;
        netns::in_ns(ns, || wan::disable_offloads(dev))?;
        let seed = 0x5eed_0000 + n as u64;
        let link = Link::start(inet, &a, &b, WanProfile::default(), seed, uplink)?;
        topo.links.insert(uplink.to_owned(), link);
        configure_iface(ns, dev, ip, net_addr(BRIDGE_HOST))
    }

    /// Makes router `name`: namespace, WAN (on the internet through an emulator, or on
    /// `parent`'s LAN), LAN bridge, forwarding and the nftables ruleset for `kind`. A
    /// `carrier` router's LAN is in 100.64.0.0/10, any other's in 192.168.0.0/16.
    fn make_router(
        &self,
        topo: &mut Topology,
        name: &str,
        kind: NatKind,
        carrier: bool,
        parent: Option<&Router>,
    ) -> Result<Router> {
        let index = topo.routers.len();
        let third = u8::try_from(index + 1)
            .ok()
            .filter(|t| *t < 255)
            .ok_or_else(|| anyhow!("a lab holds at most 254 routers"))?;
        let lan = Subnet {
            base: if carrier {
                Ipv4Addr::new(100, 64, third, 0)
            } else {
                Ipv4Addr::new(192, 168, third, 0)
            },
            len: 24,
        };
        let (ip, member, placement) = match parent {
            None => {
                let ip = router_ip(topo.public_routers)?;
                topo.public_routers += 1;
                let placement = Placement {
                    public_ip: ip,
                    uplink: Some(name.to_owned()),
                    router: None,
                };
                (ip, None, placement)
            }
            Some(parent) => {
                let (member, ip) = next_lan_member(topo, parent)?;
                let placement = Placement {
                    public_ip: parent.wan_ip(),
                    uplink: Site::uplink(parent).map(str::to_owned),
                    router: Some(parent.name().to_owned()),
                };
                (ip, Some(member), placement)
            }
        };
        let ns = format!("{}{name}", self.prefix);
        netns::add(&ns)?;
        let router = Router {
            name: name.to_owned(),
            kind,
            node: Host::new(name, ns.clone(), ip, placement, Arc::clone(&self.shared)),
            lan,
            carrier: None,
        };
        // Record before configuring, so teardown removes a half-made router too.
        topo.routers.push(router.clone());
        match (parent, member) {
            (Some(parent), Some(member)) => attach_lan(parent, member, &ns, WAN_DEV, ip)?,
            _ => self.make_uplink(topo, &ns, WAN_DEV, ip, name)?,
        }
        netns::ip(&[
            "-n",
            &ns,
            "link",
            "add",
            LAN_DEV,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        let lan_addr = format!("{}/{}", router.lan_ip(), lan.len);
        netns::ip(&["-n", &ns, "addr", "add", &lan_addr, "dev", LAN_DEV])?;
        netns::ip(&["-n", &ns, "link", "set", LAN_DEV, "up"])?;
        netns::exec(&ns, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        let rules = router::ruleset(kind, lan);
        let file = self.write_file("nft", &format!("{name}.nft"), &rules)?;
        netns::exec(&ns, &["nft", "-f", &file.to_string_lossy()])
            .with_context(|| format!("loading {} ({NFT_HINT})", file.display()))?;
        Ok(router)
    }

    /// Fails unless `router` is one of this lab's.
    fn check_router(&self, topo: &Topology, router: &Router) -> Result<()> {
        if !topo.routers.iter().any(|r| r.ns() == router.ns()) {
            bail!("router {} is not part of this lab", router.name());
        }
        Ok(())
    }

    /// Runs `f` on the emulator of the uplink carrying `site`'s traffic.
    fn with_link<T>(&self, site: &impl Site, f: impl FnOnce(&Link) -> Result<T>) -> Result<T> {
        let Some(uplink) = site.uplink() else {
            bail!(
                "{} has no emulated uplink: it was added with add_host (use add_wan_host)",
                site.site_name()
            );
        };
        let topo = self.topo();
        let link = topo
            .links
            .get(uplink)
            .ok_or_else(|| anyhow!("no WAN emulator for uplink {uplink} in this lab"))?;
        f(link)
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

/// The WAN address of the router put on the internet `index`-th (0-based): .100, .101, …
pub fn router_ip(index: usize) -> Result<Ipv4Addr> {
    let last = usize::from(FIRST_ROUTER) + index;
    if last > usize::from(LAST_ROUTER) {
        bail!(
            "a lab holds at most {} routers on its internet",
            LAST_ROUTER - FIRST_ROUTER + 1
        );
    }
    Ok(net_addr(last as u8))
}

/// The next member number on `router`'s LAN and its address (.10, .11, …), counted.
fn next_lan_member(topo: &mut Topology, router: &Router) -> Result<(usize, Ipv4Addr)> {
    let count = topo
        .lan_members
        .entry(router.name().to_owned())
        .or_default();
    let member = *count;
    let last = usize::from(FIRST_LAN_HOST) + member;
    if last > usize::from(LAST_LAN_HOST) {
        bail!(
            "router {} holds at most {} LAN members",
            router.name(),
            LAST_LAN_HOST - FIRST_LAN_HOST + 1
        );
    }
    *count += 1;
    Ok((member, router.lan_subnet().addr(last as u8)))
}

/// Connects device `dev` of namespace `ns` (address `ip`) to `router`'s LAN bridge through veth
/// `l<member>` in the router's namespace; default route via the router.
fn attach_lan(router: &Router, member: usize, ns: &str, dev: &str, ip: Ipv4Addr) -> Result<()> {
    let outer = format!("l{member}");
    let rns = router.ns();
    netns::ip(&[
        "-n", rns, "link", "add", &outer, "type", "veth", "peer", "name", dev, "netns", ns,
    ])?;
    netns::ip(&["-n", rns, "link", "set", &outer, "master", LAN_DEV, "up"])?;
    configure_iface(ns, dev, ip, router.lan_ip())
}

/// Gives `dev` in `ns` address `ip`/24, brings it up and routes everything via `gateway`.
fn configure_iface(ns: &str, dev: &str, ip: Ipv4Addr, gateway: Ipv4Addr) -> Result<()> {
    let addr = format!("{ip}/24");
    netns::ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
    netns::ip(&["-n", ns, "link", "set", dev, "up"])?;
    let gateway = gateway.to_string();
    netns::ip(&["-n", ns, "route", "add", "default", "via", &gateway])?;
    Ok(())
}

/// The bridge-family table that drops frames between cut pairs of public addresses.
fn cut_ruleset() -> String {
    format!(
        r#"table bridge {CUT_TABLE} {{
    set cut {{ type ipv4_addr . ipv4_addr; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        ether type ip ip saddr . ip daddr @cut drop
    }}
}}
"#
    )
}

/// `{ A . B, B . A }` for `nft add/delete element`.
fn cut_elements(a: &impl Site, b: &impl Site) -> Result<String> {
    let (x, y) = (a.public_ip(), b.public_ip());
    if x == y {
        bail!(
            "{} and {} share the public address {x}: nothing to cut between them",
            a.site_name(),
            b.site_name()
        );
    }
    Ok(format!("{{ {x} . {y}, {y} . {x} }}"))
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
        assert_eq!(host_ip(89).expect("last"), Ipv4Addr::new(198, 51, 100, 99));
        assert!(host_ip(90).is_err());
    }

    #[test]
    fn routers_get_their_own_range() {
        assert_eq!(
            router_ip(0).expect("first"),
            Ipv4Addr::new(198, 51, 100, 100)
        );
        assert_eq!(
            router_ip(149).expect("last"),
            Ipv4Addr::new(198, 51, 100, 249)
        );
        assert!(router_ip(150).is_err());
    }

    #[test]
    fn cut_table_drops_listed_address_pairs() {
        let rules = cut_ruleset();
        assert!(rules.contains("table bridge rally_lab {"), "{rules}");
        assert!(rules.contains("ip saddr . ip daddr @cut drop"), "{rules}");
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

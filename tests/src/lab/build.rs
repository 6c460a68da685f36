//! Making the parts of the topology: public host namespaces, their links to the internet
//! bridge, emulated uplinks, NAT routers, and LAN attachments.

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use crate::host::{Host, Placement, Site};
use crate::netns;
use crate::router::{self, NatKind, Router, Subnet, LAN_DEV, WAN_DEV};
use crate::wan::{self, Link, WanProfile};

use super::addr::{host_ip, net_addr, next_lan_member, router_ip, validate_host_name, BRIDGE_HOST};
use super::{Lab, Topology, NFT_HINT};

impl Lab {
    /// Checks `name` and makes the namespace of the next public host. Returns the host (already
    /// recorded for teardown) and its address index.
    pub(super) fn new_public_host(
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
    pub(super) fn attach(&self, host: &Host, index: usize) -> Result<()> {
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
    pub(super) fn make_uplink(
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
    pub(super) fn make_router(
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
    pub(super) fn check_router(&self, topo: &Topology, router: &Router) -> Result<()> {
        if !topo.routers.iter().any(|r| r.ns() == router.ns()) {
            bail!("router {} is not part of this lab", router.name());
        }
        Ok(())
    }
}

/// Connects device `dev` of namespace `ns` (address `ip`) to `router`'s LAN bridge through veth
/// `l<member>` in the router's namespace; default route via the router.
pub(super) fn attach_lan(
    router: &Router,
    member: usize,
    ns: &str,
    dev: &str,
    ip: Ipv4Addr,
) -> Result<()> {
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

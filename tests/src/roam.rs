//! Roaming in the lab (issue 13, item 6): a router's WAN renumbered to another public address,
//! and a host moved from one router's LAN to another's, as a laptop moves between networks.
//! Every step is checked with `ip`, `nft` and `conntrack` output (and a STUN probe from the
//! host, [`mapped_ips`]), never by what an agent does: the scenarios measure the agent.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::router::{LAN_DEV, WAN_DEV};
use crate::stun::{self, ProbeEvent, ProbeOptions};
use crate::{netns, wait_until, Host, Lab, Router};

/// How long a moved host's link may take to come up on the new LAN.
const LINK_UP: Duration = Duration::from_secs(5);

/// What `renumber_wan` did.
#[derive(Clone, Debug)]
pub struct Renumbered {
    /// The WAN address before, and the one now.
    pub old: Ipv4Addr,
    pub new: Ipv4Addr,
    /// Conntrack entries on the router before the flush, and right after it.
    pub conntrack_before: usize,
    pub conntrack_after: usize,
    /// When the first command of the change ran, and how long the change took.
    pub at: Instant,
    pub took: Duration,
}

/// Gives `router`'s WAN interface the next free public address instead of its own (flush, add,
/// default route again), flushes its conntrack table, and checks the result: `wan` holds only
/// the new address, the default route is back, the NAT rule is still `masquerade` (which
/// translates to whatever address `wan` has). The lab's records (`Router::wan_ip`, `Lab::cut`)
/// keep the old address: use the returned one.
pub fn renumber_wan(lab: &Lab, router: &Router) -> Result<Renumbered> {
    let host = router.host();
    let old = match ipv4_addrs(host, WAN_DEV)?.as_slice() {
        [one] => *one,
        other => bail!(
            "{} has {other:?} on {WAN_DEV}, not one address",
            router.name()
        ),
    };
    let gateway =
        default_gateway(host)?.ok_or_else(|| anyhow!("{} has no default route", router.name()))?;
    let new = lab.reserve_router_ip()?;
    let conntrack_before = conntrack_count(host)?;
    let (new_cidr, gw) = (format!("{new}/24"), gateway.to_string());
    let ns = router.ns();
    let at = Instant::now();
    ip_batch(
        lab,
        ns,
        &format!("renumber-{}", router.name()),
        &[
            format!("addr flush dev {WAN_DEV} scope global"),
            format!("addr add {new_cidr} dev {WAN_DEV}"),
            format!("route replace default via {gw} dev {WAN_DEV}"),
        ],
    )?;
    netns::exec(ns, &["conntrack", "-F"]).context("conntrack -F (apt-get install conntrack)")?;
    let took = at.elapsed();
    let conntrack_after = conntrack_count(host)?;

    let now = ipv4_addrs(host, WAN_DEV)?;
    ensure!(
        now == [new],
        "{}'s {WAN_DEV} holds {now:?}, not {new}",
        router.name()
    );
    ensure!(
        default_gateway(host)? == Some(gateway),
        "{} lost its default route via {gateway}",
        router.name()
    );
    let nat = host.run_ok(&["nft", "list", "table", "ip", "rally_nat"])?;
    ensure!(
        nat.contains(&format!("oifname \"{WAN_DEV}\" masquerade")),
        "{}'s NAT rule is not a plain masquerade:\n{nat}",
        router.name()
    );
    Ok(Renumbered {
        old,
        new,
        conntrack_before,
        conntrack_after,
        at,
        took,
    })
}

/// What `move_host` did.
#[derive(Clone, Debug)]
pub struct Moved {
    /// The host's LAN address before, and the one on the new LAN.
    pub old_ip: Ipv4Addr,
    pub new_ip: Ipv4Addr,
    /// The new gateway (the new router's LAN address).
    pub gateway: Ipv4Addr,
    /// When the first command of the move ran, and how long the move took.
    pub at: Instant,
    pub took: Duration,
}

/// Moves `host` (on `from`'s LAN) to `to`'s LAN as a laptop moves between networks: the outer
/// end of its `eth0` veth leaves `from`'s LAN bridge for `to`'s (so `eth0` loses its carrier
/// and gets it back), `eth0` gets the next address of `to`'s LAN in place of the old one, and
/// the default route goes via `to`. Checks the result: `eth0` is up with only the new address,
/// the default route is via `to`, the veth is on `to`'s bridge and gone from `from`. The lab's
/// records (`Host::ip`, `public_ip`) keep the old placement: use the returned addresses.
pub fn move_host(lab: &Lab, host: &Host, from: &Router, to: &Router) -> Result<Moved> {
    let old_ip = match ipv4_addrs(host, "eth0")?.as_slice() {
        [one] => *one,
        other => bail!("{} has {other:?} on eth0, not one address", host.name()),
    };
    let (peer_index, outer) = outer_veth(host, from)?;
    let (member, new_ip) = lab.reserve_lan_member(to)?;
    let moved = format!("mv{member}");
    let (cidr, gateway) = (format!("{new_ip}/24"), to.lan_ip());
    let label = format!("move-{}-{}", host.name(), to.name());
    // One `ip -batch` per namespace, so the step takes as little time as the lab can make it.
    let at = Instant::now();
    ip_batch(
        lab,
        from.ns(),
        &format!("{label}-from"),
        &[
            format!("link set {outer} nomaster"),
            format!("link set {outer} down"),
            format!("link set {outer} name {moved}"),
            format!("link set {moved} netns {}", to.ns()),
        ],
    )?;
    ip_batch(
        lab,
        to.ns(),
        &format!("{label}-to"),
        &[format!("link set {moved} master {LAN_DEV} up")],
    )?;
    ip_batch(
        lab,
        host.ns(),
        &format!("{label}-host"),
        &[
            "addr flush dev eth0 scope global".to_owned(),
            format!("addr add {cidr} dev eth0"),
            format!("route replace default via {gateway} dev eth0"),
        ],
    )?;
    let took = at.elapsed();
    check_moved(host, from, to, &moved, peer_index, new_ip)?;
    wait_until(
        &format!("{}'s eth0 to come up on {}", host.name(), to.name()),
        LINK_UP,
        Duration::from_millis(20),
        || Ok(link_json(host, "eth0")?["operstate"] == "UP"),
    )?;
    Ok(Moved {
        old_ip,
        new_ip,
        gateway,
        at,
        took,
    })
}

/// The outer end of `host`'s `eth0` veth on `from`'s side: its interface index and name.
fn outer_veth(host: &Host, from: &Router) -> Result<(u64, String)> {
    let peer_index = link_json(host, "eth0")?["link_index"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}'s eth0 is not a veth with a peer", host.name()))?;
    let outer = links(from.host())?
        .into_iter()
        .find(|l| l["ifindex"].as_u64() == Some(peer_index))
        .and_then(|l| l["ifname"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow!("{}'s eth0 has no peer on {}", host.name(), from.name()))?;
    Ok((peer_index, outer))
}

/// Checks a move: `eth0` holds only `new_ip`, the default route is via `to`, the veth
/// (`moved` now, index `peer_index` before) is on `to`'s bridge and gone from `from`.
fn check_moved(
    host: &Host,
    from: &Router,
    to: &Router,
    moved: &str,
    peer_index: u64,
    new_ip: Ipv4Addr,
) -> Result<()> {
    let gateway = to.lan_ip();
    let now = ipv4_addrs(host, "eth0")?;
    ensure!(
        now == [new_ip],
        "{}'s eth0 holds {now:?}, not {new_ip}",
        host.name()
    );
    ensure!(
        default_gateway(host)? == Some(gateway),
        "{}'s default route is not via {gateway}",
        host.name()
    );
    let on_bridge = links(to.host())?
        .iter()
        .any(|l| l["ifname"] == moved && l["master"] == LAN_DEV);
    ensure!(on_bridge, "{moved} is not on {}'s {LAN_DEV}", to.name());
    ensure!(
        !links(from.host())?
            .iter()
            .any(|l| l["ifindex"].as_u64() == Some(peer_index)),
        "{}'s veth is still on {}",
        host.name(),
        from.name()
    );
    Ok(())
}

/// Runs `lines` as one `ip -n NS -batch FILE` (the file written to the lab's directory as
/// `roam/<name>.batch`).
fn ip_batch(lab: &Lab, ns: &str, name: &str, lines: &[String]) -> Result<()> {
    let dir = lab.dir().join("roam");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(format!("{name}.batch"));
    std::fs::write(&file, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    netns::ip(&["-n", ns, "-batch", &file.to_string_lossy()])
        .with_context(|| format!("ip -batch {}:\n{}", file.display(), lines.join("\n")))?;
    Ok(())
}

/// The IPv4 addresses on `dev` in `host`'s namespace (`ip -j -4 addr show dev DEV`).
pub fn ipv4_addrs(host: &Host, dev: &str) -> Result<Vec<Ipv4Addr>> {
    let out = host.run_ok(&["ip", "-j", "-4", "addr", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out).context("reading `ip -j addr`")?;
    let mut addrs = Vec::new();
    for info in v[0]["addr_info"].as_array().into_iter().flatten() {
        let local = info["local"]
            .as_str()
            .ok_or_else(|| anyhow!("an address without `local` on {dev}: {out}"))?;
        addrs.push(
            local
                .parse()
                .with_context(|| format!("address {local:?}"))?,
        );
    }
    Ok(addrs)
}

/// The gateway of `host`'s default route, if it has one.
pub fn default_gateway(host: &Host) -> Result<Option<Ipv4Addr>> {
    let out = host.run_ok(&["ip", "-j", "-4", "route", "show", "default"])?;
    let v: Value = serde_json::from_str(&out).context("reading `ip -j route`")?;
    v[0]["gateway"]
        .as_str()
        .map(|g| g.parse().with_context(|| format!("gateway {g:?}")))
        .transpose()
}

/// `ip -j -d link show dev DEV` in `host`'s namespace (the one object).
fn link_json(host: &Host, dev: &str) -> Result<Value> {
    let out = host.run_ok(&["ip", "-j", "-d", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out).context("reading `ip -j link`")?;
    Ok(v[0].clone())
}

/// Every link in `host`'s namespace (`ip -j link show`).
fn links(host: &Host) -> Result<Vec<Value>> {
    let out = host.run_ok(&["ip", "-j", "link", "show"])?;
    let v: Value = serde_json::from_str(&out).context("reading `ip -j link`")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// How many connections the router's conntrack table holds (`conntrack -C`).
pub fn conntrack_count(host: &Host) -> Result<usize> {
    let out = host
        .run_ok(&["conntrack", "-C"])
        .context("conntrack -C (apt-get install conntrack)")?;
    out.trim()
        .parse()
        .with_context(|| format!("conntrack -C printed {out:?}"))
}

/// The UDP entries of `router`'s conntrack table translated to `public` (the reply tuple's
/// destination), from `conntrack -L -p udp`.
pub fn udp_entries_to(router: &Router, public: Ipv4Addr) -> Result<usize> {
    let out = router.host().run_ok(&["conntrack", "-L", "-p", "udp"])?;
    Ok(reply_destinations(&out)
        .iter()
        .filter(|d| **d == public)
        .count())
}

/// The reply tuple's destination (the second `dst=`) of each `conntrack -L` line.
pub fn reply_destinations(listing: &str) -> Vec<Ipv4Addr> {
    listing
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.strip_prefix("dst="))
                .nth(1)
                .and_then(|d| d.parse().ok())
        })
        .collect()
}

/// The address each of `servers` (STUN: the relays answer it) sees a fresh socket of `host`
/// come from: `rally-lab stun-probe` from local port `port`. Fails if one does not answer.
pub fn mapped_ips(host: &Host, servers: &[SocketAddr], port: u16) -> Result<Vec<Ipv4Addr>> {
    let events = stun::run_probe(host, &ProbeOptions::new(servers, port))?;
    let results = events
        .iter()
        .find_map(|e| match e {
            ProbeEvent::Mapped { results, .. } => Some(results.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow!("stun-probe on {} printed no mapping", host.name()))?;
    results
        .iter()
        .map(|r| match r.mapped {
            Some(SocketAddr::V4(a)) => Ok(*a.ip()),
            other => bail!("{} answered {other:?} to {}", r.server, host.name()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_destination_is_the_second_dst() {
        let listing = "udp      17 29 src=192.168.1.10 dst=198.51.100.11 sport=41641 \
                       dport=3478 src=198.51.100.11 dst=198.51.100.102 sport=3478 dport=41641 \
                       [ASSURED] mark=0 use=1\n\
                       conntrack v1.4.7 (conntrack-tools): 1 flow entries have been shown.\n";
        assert_eq!(
            reply_destinations(listing),
            vec![Ipv4Addr::new(198, 51, 100, 102)]
        );
    }
}

//! A real port-mapping daemon on a lab router: Debian's `miniupnpd-nftables` (PCP, NAT-PMP and
//! UPnP IGD) in the router's namespace, beside the router's own NAT (any [`crate::NatKind`]:
//! on a symmetric NAT the mapped port is the only way in).
//!
//! What it takes to make miniupnpd work in the lab (see docs/nat-traversal.md):
//! - its own nftables table (`rally_upnp`, made here before it starts), with a filter chain
//!   just before the router's and nat chains at `dstnat`/`srcnat - 1`; the router's own forward
//!   chain gets `iifname wan ct status dnat accept`, as real routers have, or nothing mapped
//!   would pass the stateful filter;
//! - its external address: the lab's "public" addresses are documentation ranges, which
//!   miniupnpd 2.3 refuses as an interface address ("port forwarding is impossible"). It does
//!   accept one learnt by STUN, so it asks a lab STUN server, and the router's own traffic is
//!   left un-NATed (`ip saddr WAN accept` before the masquerade, as a real router's own
//!   sockets are) so its STUN test sees its ports kept and finds no "restrictive NAT".
//! - pid and lease files in the lab's own directory; the lab's teardown ends the process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procs::Proc;
use crate::router::{Router, LAN_DEV, WAN_DEV};
use crate::{netns, wait_until};

/// miniupnpd's binary (Debian's `miniupnpd-nftables`; `scripts/setup.sh` installs it).
pub const MINIUPNPD: &str = "/usr/sbin/miniupnpd";

/// The nftables table miniupnpd keeps its rules in, on a port-mapping router.
pub const UPNP_TABLE: &str = "rally_upnp";

/// What miniupnpd logs once its STUN test found the external address usable.
const READY: &str = "Port forwarding is now enabled";

/// Which protocols the daemon offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// PCP, NAT-PMP and UPnP IGD (a typical home router with UPnP switched on).
    All,
    /// UPnP IGD only (NAT-PMP/PCP off), to exercise the agent's UPnP fallback.
    UpnpOnly,
}

/// miniupnpd running on a router. The lab's teardown ends it; [`PortMapDaemon::stop`] ends it
/// earlier.
pub struct PortMapDaemon {
    router: Router,
    proc: Proc,
    lease_file: PathBuf,
}

impl Router {
    /// Turns this router into a port-mapping router: starts miniupnpd offering `offer`, with
    /// `stun` (a lab STUN server on the internet) to learn its external address, and waits
    /// until it has enabled port forwarding. Only for a router directly on the internet.
    pub fn start_port_mapping(&self, stun: SocketAddr, offer: Offer) -> Result<PortMapDaemon> {
        self.start_port_mapping_with(stun, offer, None)
    }

    /// `start_port_mapping`, granting PCP leases of at most `max_lease` (miniupnpd's
    /// `max_lifetime`; its default is a day) so tests can watch renewals.
    pub fn start_port_mapping_with(
        &self,
        stun: SocketAddr,
        offer: Offer,
        max_lease: Option<Duration>,
    ) -> Result<PortMapDaemon> {
        if self.carrier().is_some() || self.own_wan_ip() != self.wan_ip() {
            bail!("port mapping needs a router whose WAN is on the internet");
        }
        let dir = self
            .host()
            .lab_dir()
            .join(format!("miniupnpd-{}", self.name()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let rules = dir.join("rules.nft");
        std::fs::write(&rules, nft_rules(self))
            .with_context(|| format!("writing {}", rules.display()))?;
        netns::exec(self.ns(), &["nft", "-f", &rules.to_string_lossy()])
            .context("adding the port-mapping rules to the router")?;
        let lease_file = dir.join("leases");
        let conf = dir.join("miniupnpd.conf");
        let mut text = config(self, stun, offer, &lease_file);
        if let Some(max) = max_lease {
            let max = max.as_secs().max(2);
            text.push_str(&format!("min_lifetime=1\nmax_lifetime={max}\n"));
        }
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        let pid = dir.join("miniupnpd.pid");
        let proc = self.host().spawn(
            &[
                MINIUPNPD,
                "-d",
                "-f",
                &conf.to_string_lossy(),
                "-P",
                &pid.to_string_lossy(),
            ],
            self.host().log_path("miniupnpd"),
        )?;
        let daemon = PortMapDaemon {
            router: self.clone(),
            proc,
            lease_file,
        };
        wait_until(
            &format!("miniupnpd on {} to enable port forwarding", self.name()),
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                let log = daemon.proc.log_text()?;
                if !daemon.proc.is_running() {
                    bail!("miniupnpd exited:\n{log}");
                }
                Ok(log.contains(READY))
            },
        )?;
        Ok(daemon)
    }
}

impl PortMapDaemon {
    /// miniupnpd's current rules: `nft list table inet rally_upnp` in the router's namespace.
    pub fn ruleset(&self) -> Result<String> {
        self.router
            .host()
            .run_ok(&["nft", "list", "table", "inet", UPNP_TABLE])
    }

    /// The `dnat` rules miniupnpd holds for UDP port `external` (empty: no such mapping).
    pub fn udp_mapping_rules(&self, external: u16) -> Result<Vec<String>> {
        Ok(mapping_rules(&self.ruleset()?, external))
    }

    /// miniupnpd's lease file (one line per mapping with a lease; empty or missing: none).
    pub fn leases(&self) -> String {
        std::fs::read_to_string(&self.lease_file).unwrap_or_default()
    }

    /// When the lease of UDP port `external` ends (Unix seconds), from the lease file.
    pub fn lease_end(&self, external: u16) -> Option<u64> {
        lease_end(&self.leases(), external)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        self.proc.log_text().unwrap_or_default()
    }

    /// Ends miniupnpd (SIGTERM, then SIGKILL).
    pub fn stop(&self) -> Result<()> {
        self.proc.terminate(Duration::from_secs(5)).map(|_| ())
    }
}

/// The UDP `dnat` rules for destination port `external` in an `nft list` text. miniupnpd
/// writes the protocol as a raw match on the IP header (`@nh,72,8 0x11`: UDP) and the port as
/// `th dport`.
pub fn mapping_rules(ruleset: &str, external: u16) -> Vec<String> {
    let port = format!("dport {external} ");
    ruleset
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(&port) && l.contains(" dnat "))
        .filter(|l| l.contains("@nh,72,8 0x11") || l.contains("udp "))
        .map(str::to_owned)
        .collect()
}

/// The end (Unix seconds) of UDP port `external`'s lease in a miniupnpd lease file, whose
/// lines are `PROTO:EXT_PORT:INT_IP:INT_PORT:END:DESCRIPTION`.
pub fn lease_end(leases: &str, external: u16) -> Option<u64> {
    leases.lines().find_map(|l| {
        let mut f = l.split(':');
        let (proto, port) = (f.next()?, f.next()?);
        let end = f.nth(2)?;
        (proto == "UDP" && port.parse() == Ok(external))
            .then(|| end.parse().ok())
            .flatten()
    })
}

/// miniupnpd's table, the forward exception for what it maps, and the router's own traffic
/// kept out of the masquerade.
fn nft_rules(router: &Router) -> String {
    let wan = WAN_DEV;
    let own = router.own_wan_ip();
    format!(
        r#"# rally-lab: port mapping on router {name}
table inet {UPNP_TABLE} {{
    chain forward {{
        type filter hook forward priority filter - 1; policy accept;
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat - 1; policy accept;
    }}
}}
# What miniupnpd forwards passes the router's stateful filter (as on a real router).
insert rule inet rally_filter forward iifname "{wan}" ct status dnat accept
# The router's own sockets (miniupnpd's STUN test) are not NATed.
insert rule ip rally_nat postrouting oifname "{wan}" ip saddr {own} accept
"#,
        name = router.name()
    )
}

/// miniupnpd 2.3's configuration. Its `enable_natpmp` switches PCP on too (2.3 has no separate
/// `enable_pcp_pmp`; it refuses the file with one).
fn config(router: &Router, stun: SocketAddr, offer: Offer, lease_file: &std::path::Path) -> String {
    let natpmp = match offer {
        Offer::All => "yes",
        Offer::UpnpOnly => "no",
    };
    let lan = router.lan_subnet();
    format!(
        "# rally-lab: miniupnpd on router {name}\n\
         ext_ifname={WAN_DEV}\n\
         listening_ip={LAN_DEV}\n\
         ext_perform_stun=yes\n\
         ext_stun_host={stun_ip}\n\
         ext_stun_port={stun_port}\n\
         enable_upnp=yes\n\
         enable_natpmp={natpmp}\n\
         secure_mode=yes\n\
         system_uptime=no\n\
         lease_file={lease}\n\
         uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n\
         upnp_table_name={UPNP_TABLE}\n\
         upnp_nat_table_name={UPNP_TABLE}\n\
         upnp_forward_chain=forward\n\
         upnp_nat_chain=prerouting\n\
         upnp_nat_postrouting_chain=postrouting\n\
         allow 1024-65535 {lan} 1024-65535\n\
         deny 0-65535 0.0.0.0/0 0-65535\n",
        name = router.name(),
        stun_ip = stun.ip(),
        stun_port = stun.port(),
        lease = lease_file.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_dnat_rule_of_a_port() {
        let ruleset = "table inet rally_upnp {\n\
            \tchain prerouting {\n\
            \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
            \t\tiif \"wan\" @nh,72,8 0x11 th dport 51820 dnat ip to 192.168.1.10:51820\n\
            \t\tiif \"wan\" @nh,72,8 0x06 th dport 51821 dnat ip to 192.168.1.10:51821\n\
            \t}\n}\n";
        assert_eq!(mapping_rules(ruleset, 51820).len(), 1);
        assert!(mapping_rules(ruleset, 5182).is_empty());
        // TCP is not ours.
        assert!(mapping_rules(ruleset, 51821).is_empty());
        assert!(mapping_rules("", 51820).is_empty());
    }

    #[test]
    fn reads_a_lease_end() {
        let leases = "TCP:51820:192.168.1.10:51820:1000:x\n\
                      UDP:51820:192.168.1.10:51820:1796534901:PCP 51820 udp\n";
        assert_eq!(lease_end(leases, 51820), Some(1_796_534_901));
        assert_eq!(lease_end(leases, 51821), None);
        assert_eq!(lease_end("UDP:x", 51820), None);
        assert_eq!(lease_end("", 51820), None);
    }
}

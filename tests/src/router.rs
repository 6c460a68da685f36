//! NAT routers: one namespace each, with a WAN interface (`wan`), a LAN bridge (`lan0`) that
//! hosts (or further routers) attach to, `ip_forward=1`, and an nftables ruleset per [`NatKind`].
//! See docs/lab.md for the recipes and how they were calibrated.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::host::{Host, Site};
use crate::netns;

/// The router's interface towards the internet (or towards its carrier, behind a CGNAT).
pub const WAN_DEV: &str = "wan";
/// The router's LAN bridge.
pub const LAN_DEV: &str = "lan0";

/// How a router translates and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NatKind {
    /// Endpoint-independent mapping (masquerade keeps the source port), address-and-port-
    /// dependent filtering (a stateful filter drops whatever is not a reply): the common home
    /// router, "port-restricted cone".
    HomeRouter,
    /// A new random external port for every destination (`masquerade fully-random`), with the
    /// same stateful filter.
    Symmetric,
    /// Endpoint-independent mapping and filtering: once an inside socket has sent anything,
    /// anyone may send to its mapped address ("full cone").
    FullCone,
    /// A home router (as [`NatKind::HomeRouter`]) whose WAN is in 100.64.0.0/10, behind a
    /// carrier router that masquerades again (with the same filter) onto the internet.
    Cgnat,
    /// Outbound UDP dropped except DNS (port 53); of TCP only ports 80 and 443 leave.
    UdpBlocked,
}

impl NatKind {
    /// Every kind, in a fixed order.
    pub const ALL: [NatKind; 5] = [
        NatKind::HomeRouter,
        NatKind::Symmetric,
        NatKind::FullCone,
        NatKind::Cgnat,
        NatKind::UdpBlocked,
    ];

    /// Whether the external port depends on the destination (a fresh port per peer).
    pub fn maps_endpoint_dependently(self) -> bool {
        self == NatKind::Symmetric
    }

    /// Whether packets from an address the inside host has not sent to are let in.
    pub fn filters_endpoint_independently(self) -> bool {
        self == NatKind::FullCone
    }

    /// A short name: `home-router`, `symmetric`, `full-cone`, `cgnat`, `udp-blocked`.
    pub fn label(self) -> &'static str {
        match self {
            NatKind::HomeRouter => "home-router",
            NatKind::Symmetric => "symmetric",
            NatKind::FullCone => "full-cone",
            NatKind::Cgnat => "cgnat",
            NatKind::UdpBlocked => "udp-blocked",
        }
    }
}

impl fmt::Display for NatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Whether hole punching can join a host behind `a` and one behind `b` (`None`: a public
/// address), which is where Rally should end up on the direct path rather than a relay. Two
/// endpoint-independent mappings always meet (their probes cross); an endpoint-dependent side
/// reaches a peer that filters endpoint-independently (its fresh port is let in and answered)
/// by ordinary punching, and any other endpoint-independent peer by birthday punching (its
/// 256 fresh ports against the peer's 1024 probed ones). Two endpoint-dependent sides do not
/// meet, and nothing punches through a network that blocks UDP.
pub fn punchable(a: Option<NatKind>, b: Option<NatKind>) -> bool {
    if [a, b].contains(&Some(NatKind::UdpBlocked)) {
        return false;
    }
    let dependent = |s: Option<NatKind>| s.is_some_and(NatKind::maps_endpoint_dependently);
    !(dependent(a) && dependent(b))
}

/// An IPv4 subnet, `base/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub len: u8,
}

impl Subnet {
    /// The address `base + n`.
    pub fn addr(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + u32::from(n))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.len)
    }
}

/// A NAT router in the lab. Cheap to clone; all clones name the same namespace.
#[derive(Clone)]
pub struct Router {
    pub(crate) name: String,
    pub(crate) kind: NatKind,
    /// The router's own namespace; its `ip()` is the router's WAN address.
    pub(crate) node: Host,
    pub(crate) lan: Subnet,
    /// The carrier router of a [`NatKind::Cgnat`] router.
    pub(crate) carrier: Option<Box<Router>>,
}

impl Router {
    /// The name given to `Lab::add_router`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kind asked for.
    pub fn kind(&self) -> NatKind {
        self.kind
    }

    /// The address the internet sees this router's traffic come from (for a CGNAT, the
    /// carrier's WAN address).
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.node.public_ip()
    }

    /// The address of this router's own `wan` interface: the same as `wan_ip`, except behind a
    /// carrier (then in 100.64.0.0/10).
    pub fn own_wan_ip(&self) -> Ipv4Addr {
        self.node.ip()
    }

    /// The router's address on its LAN (the hosts' gateway), `.1` of `lan_subnet`.
    pub fn lan_ip(&self) -> Ipv4Addr {
        self.lan.addr(1)
    }

    /// The LAN behind the router (a /24).
    pub fn lan_subnet(&self) -> Subnet {
        self.lan
    }

    /// The router's namespace as a host: run `nft list ruleset`, `conntrack -L`, ping from it.
    pub fn host(&self) -> &Host {
        &self.node
    }

    /// The router's namespace name.
    pub fn ns(&self) -> &str {
        self.node.ns()
    }

    /// The carrier router above a [`NatKind::Cgnat`] router; `None` for other kinds.
    pub fn carrier(&self) -> Option<&Router> {
        self.carrier.as_deref()
    }

    /// Sets how long this router (and its carrier) keeps an idle UDP mapping: `unreplied`
    /// before any answer came back, `assured` once traffic went both ways
    /// (`nf_conntrack_udp_timeout` and `_stream`; the kernel's defaults are 30 s and 120 s).
    /// Short values let tests check keepalives.
    pub fn set_udp_mapping_timeouts(&self, unreplied: Duration, assured: Duration) -> Result<()> {
        let script = format!(
            "echo {} > /proc/sys/net/netfilter/nf_conntrack_udp_timeout && \
             echo {} > /proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream",
            unreplied.as_secs().max(1),
            assured.as_secs().max(1)
        );
        netns::exec(self.ns(), &["sh", "-c", &script])
            .with_context(|| format!("setting UDP timeouts on router {}", self.name))?;
        if let Some(carrier) = &self.carrier {
            carrier.set_udp_mapping_timeouts(unreplied, assured)?;
        }
        Ok(())
    }
}

/// The nftables table [`Router::set_udp_blocked`] adds.
const UDP_BLOCK_TABLE: &str = "rally_udp_block";

impl Router {
    /// Blocks (or lets through again) outbound UDP but DNS at run time, as a
    /// [`NatKind::UdpBlocked`] router does, on top of this router's own rules: a network that
    /// starts or stops blocking UDP mid-session.
    pub fn set_udp_blocked(&self, blocked: bool) -> Result<()> {
        let script = if blocked {
            format!(
                "nft add table inet {UDP_BLOCK_TABLE} && \
                 nft 'add chain inet {UDP_BLOCK_TABLE} forward {{ type filter hook forward priority filter - 1; policy accept; }}' && \
                 nft add rule inet {UDP_BLOCK_TABLE} forward oifname {WAN_DEV} udp dport != 53 drop"
            )
        } else {
            format!("nft delete table inet {UDP_BLOCK_TABLE}")
        };
        netns::exec(self.ns(), &["sh", "-c", &script])
            .with_context(|| format!("setting UDP blocked={blocked} on router {}", self.name))?;
        Ok(())
    }
}

impl Site for Router {
    fn site_name(&self) -> &str {
        &self.name
    }

    fn public_ip(&self) -> Ipv4Addr {
        self.node.public_ip()
    }

    fn uplink(&self) -> Option<&str> {
        Site::uplink(&self.node)
    }
}

/// The nftables ruleset of a router of `kind` whose LAN is `lan` (the carrier of a CGNAT is a
/// [`NatKind::HomeRouter`] on 100.64.x.0/24).
pub fn ruleset(kind: NatKind, lan: Subnet) -> String {
    let wan = WAN_DEV;
    let masquerade = match kind {
        NatKind::Symmetric => "masquerade fully-random",
        _ => "masquerade",
    };
    // Full cone: let in what the map below sent to an inside host.
    let forward_dnat = match kind {
        NatKind::FullCone => format!("\n        iifname \"{wan}\" ct status dnat accept"),
        _ => String::new(),
    };
    let forward_out = match kind {
        NatKind::UdpBlocked => format!(
            "\n        oifname \"{wan}\" udp dport 53 accept\
             \n        oifname \"{wan}\" tcp dport {{ 80, 443 }} accept\
             \n        oifname \"{wan}\" drop"
        ),
        _ => String::new(),
    };
    let full_cone = match kind {
        NatKind::FullCone => format!(
            r#"
    # Endpoint-independent filtering: the external UDP port → the inside address and port that
    # last sent from it, learnt after the source NAT (so the key is the port masquerade chose).
    map fullcone {{
        type inet_service : ipv4_addr . inet_service
        flags dynamic,timeout
        timeout 5m
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{wan}" dnat ip to udp dport map @fullcone
    }}
    # `add`, not `update`: an outbound packet never overwrites a port another inside host holds.
    # When two inside hosts send from the same port at once, the second's first packet can be
    # given the same external port before the first's entry is confirmed and then be dropped as
    # a clash (it retries on another port); with `update` its learn could land after the first
    # host's reply and steal the port for good.
    chain learn {{
        type filter hook postrouting priority srcnat + 1; policy accept;
        oifname "{wan}" ct direction original ct original ip saddr {lan} meta l4proto udp add @fullcone {{ ct reply proto-dst : ct original ip saddr . ct original proto-src }}
    }}
    # Learnt again (and kept alive) from replies, which only the conntrack entry that owns the
    # external port receives: a port reused by another inside host moves to it here.
    chain relearn {{
        type filter hook prerouting priority dstnat - 1; policy accept;
        iifname "{wan}" ct direction reply ct original ip saddr {lan} meta l4proto udp update @fullcone {{ ct reply proto-dst : ct original ip saddr . ct original proto-src }}
    }}"#
        ),
        _ => String::new(),
    };
    format!(
        r#"# rally-lab router: {kind}, LAN {lan}
table inet rally_filter {{
    # The stateful filter every real router has. Without it, the first unsolicited packet from a
    # peer makes a confirmed conntrack entry; the router's own outbound packet to that peer then
    # clashes with it and gets a new source port (see LAB.md, "conntrack trap").
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{wan}" ct state established,related accept
        iifname "{wan}" icmp type echo-request accept
        iifname "{wan}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{wan}" ct state established,related accept{forward_dnat}
        iifname "{wan}" drop{forward_out}
    }}
}}
table ip rally_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" {masquerade}
    }}{full_cone}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan() -> Subnet {
        Subnet {
            base: Ipv4Addr::new(192, 168, 1, 0),
            len: 24,
        }
    }

    #[test]
    fn subnet_addresses_and_display() {
        assert_eq!(lan().addr(1), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(lan().addr(10), Ipv4Addr::new(192, 168, 1, 10));
        assert_eq!(lan().to_string(), "192.168.1.0/24");
    }

    #[test]
    fn every_kind_has_the_stateful_filter_in_input_and_forward() {
        for kind in NatKind::ALL {
            let rules = ruleset(kind, lan());
            assert_eq!(
                rules
                    .matches("iifname \"wan\" ct state established,related accept")
                    .count(),
                2,
                "{kind}: {rules}"
            );
            assert_eq!(
                rules.matches("iifname \"wan\" drop").count(),
                2,
                "{kind}: {rules}"
            );
        }
    }

    #[test]
    fn symmetric_randomises_and_the_others_keep_ports() {
        assert!(ruleset(NatKind::Symmetric, lan()).contains("masquerade fully-random"));
        for kind in [NatKind::HomeRouter, NatKind::FullCone, NatKind::Cgnat] {
            let rules = ruleset(kind, lan());
            assert!(rules.contains("oifname \"wan\" masquerade\n"), "{kind}");
        }
    }

    #[test]
    fn full_cone_learns_after_snat_and_lets_mapped_traffic_in() {
        let rules = ruleset(NatKind::FullCone, lan());
        assert!(rules.contains("priority srcnat + 1"), "{rules}");
        assert!(
            rules.contains("ct original ip saddr 192.168.1.0/24"),
            "{rules}"
        );
        assert!(
            rules.contains("dnat ip to udp dport map @fullcone"),
            "{rules}"
        );
        assert!(rules.contains("ct status dnat accept"), "{rules}");
        assert!(
            rules.contains("udp add @fullcone"),
            "outbound packets must not overwrite a held port: {rules}"
        );
        assert!(!ruleset(NatKind::HomeRouter, lan()).contains("fullcone"));
    }

    #[test]
    fn udp_blocked_lets_out_only_dns_and_web() {
        let rules = ruleset(NatKind::UdpBlocked, lan());
        let dns = rules.find("udp dport 53 accept").expect("dns");
        let web = rules.find("tcp dport { 80, 443 } accept").expect("web");
        let drop = rules.find("oifname \"wan\" drop").expect("drop");
        assert!(dns < drop && web < drop, "{rules}");
    }

    #[test]
    fn punchable_matches_the_expected_routes_table() {
        use NatKind::*;
        // docs/nat-traversal.md, "Expected routes": only this pair needs a relay.
        let relayed = [(Some(Symmetric), Some(Symmetric))];
        let sites = [
            None,
            Some(FullCone),
            Some(HomeRouter),
            Some(Symmetric),
            Some(Cgnat),
        ];
        for a in sites {
            for b in sites {
                let want = !relayed.contains(&(a, b)) && !relayed.contains(&(b, a));
                assert_eq!(punchable(a, b), want, "{a:?} ↔ {b:?}");
            }
        }
        for s in sites {
            assert!(!punchable(s, Some(UdpBlocked)), "{s:?} ↔ udp-blocked");
        }
    }
}

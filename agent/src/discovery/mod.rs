//! LAN game discovery, the IO part: the capture of limited broadcasts and multicasts leaving
//! the physical default-route interface ([`capture`]), the groups programs here listen to and
//! the agent's joins on the TUN device ([`membership`]). The rules are in
//! [`rally_agent_core::discovery`]; the engine glues the two (`dataplane/discovery.rs`).

pub mod capture;
pub mod cli;
pub mod membership;
mod procfile;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use tracing::{info, warn};

pub use rally_agent_core::discovery::{DiscoveryConfig, DiscoveryStatus, DEFAULT_RATE};

use capture::Capture;
use membership::TunJoins;
use procfile::ProcFile;

/// Largest packet read from the capture (the interface MTU bounds it; larger ones are cut
/// by the kernel and then refused as malformed).
const CAPTURE_BUF: usize = 65_536;

/// Everything discovery reads or changes outside the engine's TUN device and socket.
pub struct DiscoveryIo {
    capture: Option<Capture>,
    joins: Option<TunJoins>,
    tun: String,
    pub buf: Vec<u8>,
    /// `/proc/net/route` and `/proc/net/igmp`, kept open (read every tick).
    routes: ProcFile,
    igmp: ProcFile,
}

impl DiscoveryIo {
    /// Opens the capture on the default-route interface and the joins on `tun`; either may be
    /// missing (no default route, no `CAP_NET_RAW`): discovery then does what it can.
    pub fn open(tun: &str, enabled: bool) -> DiscoveryIo {
        let joins = match TunJoins::new(tun) {
            Ok(j) => Some(j),
            Err(e) => {
                warn!(tun, "discovery cannot join groups on the TUN device: {e}");
                None
            }
        };
        let mut io = DiscoveryIo {
            capture: None,
            joins,
            tun: tun.to_owned(),
            buf: vec![0u8; CAPTURE_BUF],
            routes: ProcFile::new("/proc/net/route"),
            igmp: ProcFile::new("/proc/net/igmp"),
        };
        if enabled {
            io.follow_default_route();
        }
        io
    }

    /// (Re)opens the capture when the default-route interface is not the captured one.
    pub fn follow_default_route(&mut self) {
        let want = self
            .routes
            .read()
            .and_then(capture::default_route_interface)
            .filter(|i| *i != self.tun);
        if want.as_deref() == self.capture.as_ref().map(|c| c.ifname.as_str()) {
            return;
        }
        self.capture = want.and_then(|ifname| match Capture::open(&ifname) {
            Ok(c) => {
                info!(interface = %ifname, "discovery captures broadcasts and multicasts leaving it");
                Some(c)
            }
            Err(e) => {
                warn!(interface = %ifname, "discovery cannot capture broadcasts: {e}");
                None
            }
        });
    }

    /// The capture's descriptor, while one is open (readable when it has a packet).
    pub fn capture_fd(&self) -> Option<std::os::fd::RawFd> {
        self.capture.as_ref().map(Capture::raw_fd)
    }

    /// Reads one captured packet into `buf`; `None` when none is queued.
    pub fn try_recv(&mut self) -> Option<usize> {
        let c = self.capture.as_ref()?;
        match c.try_recv(&mut self.buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("discovery capture: {e}");
                None
            }
        }
    }

    /// The groups programs here listen to (the agent's own joins left out).
    pub fn local_groups(&mut self) -> BTreeSet<Ipv4Addr> {
        let own = self
            .joins
            .as_ref()
            .map(|j| j.joined().clone())
            .unwrap_or_default();
        self.igmp
            .read()
            .map(|text| membership::local_groups(text, &self.tun, &own))
            .unwrap_or_default()
    }

    /// Joins exactly `groups` on the TUN device.
    pub fn sync_joins(&mut self, groups: &BTreeSet<Ipv4Addr>) {
        if let Some(j) = &mut self.joins {
            j.sync(groups);
        }
    }
}

/// Parses `--discovery-ports-off 1900,5353`.
pub fn parse_ports(s: &str) -> Result<BTreeSet<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("invalid port {p:?} (1-65535)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists() {
        assert_eq!(parse_ports("1900, 5353"), Ok(BTreeSet::from([1900, 5353])));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("http").is_err());
        assert_eq!(parse_ports(""), Ok(BTreeSet::new()));
    }
}

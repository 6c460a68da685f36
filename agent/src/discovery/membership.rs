//! Multicast memberships: which groups programs on this host listen to (the kernel's own table,
//! `/proc/net/igmp`, on every interface — Minecraft joins on its default interface, not ours),
//! and the agent's joins on the TUN device, which make the kernel accept a group's packets
//! arriving there and hand them to every socket bound to the port (`IP_MULTICAST_ALL`, on by
//! default, delivers to sockets that joined on another interface too).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;

/// An interface's index by name.
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// The agent's joins on the TUN device, through one socket that reads nothing.
pub struct TunJoins {
    socket: UdpSocket,
    ifindex: u32,
    joined: BTreeSet<Ipv4Addr>,
}

impl TunJoins {
    pub fn new(tun: &str) -> io::Result<TunJoins> {
        Ok(TunJoins {
            socket: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
            ifindex: if_index(tun)?,
            joined: BTreeSet::new(),
        })
    }

    pub fn joined(&self) -> &BTreeSet<Ipv4Addr> {
        &self.joined
    }

    /// Joins and leaves so that exactly `groups` are joined on the TUN device.
    pub fn sync(&mut self, groups: &BTreeSet<Ipv4Addr>) {
        let leave: Vec<Ipv4Addr> = self.joined.difference(groups).copied().collect();
        for g in leave {
            if let Err(e) = self.membership(g, libc::IP_DROP_MEMBERSHIP) {
                tracing::debug!(group = %g, "leaving on the TUN device: {e}");
            }
            self.joined.remove(&g);
        }
        for g in groups.difference(&self.joined.clone()) {
            match self.membership(*g, libc::IP_ADD_MEMBERSHIP) {
                Ok(()) => {
                    self.joined.insert(*g);
                }
                Err(e) => tracing::warn!(group = %g, "joining on the TUN device: {e}"),
            }
        }
    }

    fn membership(&self, group: Ipv4Addr, opt: libc::c_int) -> io::Result<()> {
        let mreq = libc::ip_mreqn {
            imr_multiaddr: libc::in_addr {
                s_addr: u32::from_ne_bytes(group.octets()),
            },
            imr_address: libc::in_addr { s_addr: 0 },
            imr_ifindex: self.ifindex as libc::c_int,
        };
        // SAFETY: `mreq` is a valid ip_mreqn for the call's duration.
        let r = unsafe {
            libc::setsockopt(
                self.socket.as_raw_fd(),
                libc::IPPROTO_IP,
                opt,
                (&mreq as *const libc::ip_mreqn).cast(),
                std::mem::size_of::<libc::ip_mreqn>() as libc::socklen_t,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The groups programs on this host listen to: every interface's memberships in
/// `/proc/net/igmp` (its text: `igmp`) but loopback's, minus the agent's own joins on the TUN
/// device `tun`.
pub fn local_groups(igmp: &str, tun: &str, own: &BTreeSet<Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
    parse_igmp(igmp, tun, own)
}

/// Parses `/proc/net/igmp`: an interface line (`2\teth0      :     1      V3`), then one
/// line per group (`\t\t\t\t3C0200E0     1 0:00000000\t\t0`): the address in memory order
/// and the number of sockets joined.
fn parse_igmp(text: &str, tun: &str, own: &BTreeSet<Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    let mut iface = String::new();
    for line in text.lines().skip(1) {
        if !line.starts_with('\t') {
            iface = line
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .trim_end_matches(':')
                .to_string();
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(hex), Some(users)) = (f.next(), f.next()) else {
            continue;
        };
        let (Ok(v), Ok(users)) = (u32::from_str_radix(hex, 16), users.parse::<u32>()) else {
            continue;
        };
        let g = Ipv4Addr::from(v.to_ne_bytes());
        let ours = u32::from(iface == tun && own.contains(&g));
        if iface != "lo" && users > ours {
            out.insert(g);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_of_every_interface_but_our_own_joins() {
        let g = |v: u32| format!("{:08X}", u32::from_ne_bytes(Ipv4Addr::from(v).octets()));
        let mc = u32::from(Ipv4Addr::new(224, 0, 2, 60));
        let ssdp = u32::from(Ipv4Addr::new(239, 255, 255, 250));
        let all = u32::from(Ipv4Addr::new(224, 0, 0, 1));
        let text = format!(
            "Idx\tDevice    : Count Querier\tGroup    Users Timer\tReporter\n\
             1\tlo        :     1      V3\n\t\t\t\t{}     1 0:00000000\t\t0\n\
             2\teth0      :     2      V3\n\t\t\t\t{}     1 0:00000000\t\t0\n\t\t\t\t{}     1 0:00000000\t\t0\n\
             3\trally0    :     2      V3\n\t\t\t\t{}     1 0:00000000\t\t0\n\t\t\t\t{}     2 0:00000000\t\t0\n",
            g(all),
            g(mc),
            g(all),
            g(mc),
            g(ssdp),
        );
        let own = BTreeSet::from([Ipv4Addr::from(mc), Ipv4Addr::from(ssdp)]);
        let got = parse_igmp(&text, "rally0", &own);
        // 224.0.2.60: a program on eth0; 239.255.255.250: two users on rally0, one is ours.
        assert_eq!(
            got,
            BTreeSet::from([
                Ipv4Addr::from(all),
                Ipv4Addr::from(mc),
                Ipv4Addr::from(ssdp)
            ])
        );
        // Only our own join on rally0: nobody listens.
        let only_ours = format!(
            "Idx\tDevice    : Count Querier\tGroup    Users Timer\tReporter\n\
             3\trally0    :     1      V3\n\t\t\t\t{}     1 0:00000000\t\t0\n",
            g(mc)
        );
        assert!(parse_igmp(&only_ours, "rally0", &own).is_empty());
    }
}

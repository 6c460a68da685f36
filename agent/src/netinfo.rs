//! The host's own addresses, reported to the control plane as direct candidates.

use std::net::{IpAddr, SocketAddr};

use rally_proto::control::MAX_ENDPOINTS;
use rally_proto::Overlay;

/// Every IPv4 address of a non-loopback interface, outside the overlay, paired with `port`.
pub fn local_endpoints(port: u16, overlay: &Overlay) -> Vec<SocketAddr> {
    let Ok(ifaces) = if_addrs::get_if_addrs() else {
        return Vec::new();
    };
    let mut eps: Vec<SocketAddr> = ifaces
        .into_iter()
        .filter(|i| !i.is_loopback())
        .filter_map(|i| match i.ip() {
            IpAddr::V4(ip) if !ip.is_link_local() && !overlay.contains(ip) => {
                Some(SocketAddr::new(IpAddr::V4(ip), port))
            }
            _ => None,
        })
        .collect();
    eps.sort();
    eps.dedup();
    eps.truncate(MAX_ENDPOINTS);
    eps
}

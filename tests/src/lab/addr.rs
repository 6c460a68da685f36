//! The lab's address plan: public hosts, router WAN addresses, LAN members, host names.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::router::Router;

use super::Topology;

/// The lab's internet: 198.51.100.0/24 (documentation range). The bridge holds `.1`, public
/// hosts get `.10`–`.99`, routers' WAN interfaces `.100`–`.249`.
const NET_PREFIX: [u8; 3] = [198, 51, 100];
pub(super) const BRIDGE_HOST: u8 = 1;
const FIRST_HOST: u8 = 10;
const LAST_HOST: u8 = 99;
const FIRST_ROUTER: u8 = 100;
const LAST_ROUTER: u8 = 249;
/// On a router's LAN the router is `.1`; hosts (and routers behind it) get `.10`–`.250`.
const FIRST_LAN_HOST: u8 = 10;
const LAST_LAN_HOST: u8 = 250;

/// 198.51.100.`last`.
pub(super) fn net_addr(last: u8) -> Ipv4Addr {
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
pub(super) fn next_lan_member(topo: &mut Topology, router: &Router) -> Result<(usize, Ipv4Addr)> {
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

//! The default IPv4 gateway, from the kernel's routing table (`/proc/net/route`), and the local
//! address that faces it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use super::PortMapError;

/// Where the kernel keeps the IPv4 routing table.
const ROUTE_TABLE: &str = "/proc/net/route";

/// `RTF_UP | RTF_GATEWAY`: a usable route through a gateway.
const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;

/// The default route's gateway and the local address the kernel would send to it from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayInfo {
    pub gateway: Ipv4Addr,
    pub local: Ipv4Addr,
}

/// Reads the routing table and asks the kernel which local address faces the gateway (a
/// connected UDP socket: no packet is sent).
pub fn find() -> Result<GatewayInfo, PortMapError> {
    let table = std::fs::read_to_string(ROUTE_TABLE)
        .map_err(|e| PortMapError::NoGateway(format!("cannot read {ROUTE_TABLE}: {e}")))?;
    let gateway = default_gateway(&table)
        .ok_or_else(|| PortMapError::NoGateway("no IPv4 default route".into()))?;
    let probe = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        .and_then(|s| s.connect((gateway, 5351)).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| PortMapError::NoGateway(format!("no route to gateway {gateway}: {e}")))?;
    match probe.ip() {
        IpAddr::V4(local) if !local.is_unspecified() => Ok(GatewayInfo { gateway, local }),
        other => Err(PortMapError::NoGateway(format!(
            "no IPv4 address faces gateway {gateway} (got {other})"
        ))),
    }
}

/// The gateway of the best (lowest-metric) IPv4 default route in a `/proc/net/route` text.
pub fn default_gateway(table: &str) -> Option<Ipv4Addr> {
    table
        .lines()
        .skip(1)
        .filter_map(parse_default_route)
        .min_by_key(|(_, metric)| *metric)
        .map(|(gw, _)| gw)
}

/// `(gateway, metric)` of a line that is an up default route through a gateway.
fn parse_default_route(line: &str) -> Option<(Ipv4Addr, u32)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [_iface, dest, gateway, flags, _refcnt, _use, metric, mask, ..] = fields.as_slice() else {
        return None;
    };
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    let flags = hex(flags)?;
    if hex(dest)? != 0 || hex(mask)? != 0 || flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY
    {
        return None;
    }
    // The kernel prints the network-order address as a native-endian number.
    let gw = Ipv4Addr::from(hex(gateway)?.to_ne_bytes());
    let metric = metric.parse().ok()?;
    (!gw.is_unspecified()).then_some((gw, metric))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT";

    #[test]
    fn finds_the_default_gateway() {
        let table = format!(
            "{HEADER}\n\
             eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
             eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        );
        assert_eq!(default_gateway(&table), Some(Ipv4Addr::new(192, 168, 1, 1)));
    }

    #[test]
    fn prefers_the_lowest_metric_and_skips_routes_that_are_down() {
        let table = format!(
            "{HEADER}\n\
             wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
             eth9\t00000000\t0109A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        );
        assert_eq!(default_gateway(&table), Some(Ipv4Addr::new(192, 168, 1, 1)));
    }

    #[test]
    fn no_default_route_and_garbage_give_none() {
        let only_link =
            format!("{HEADER}\neth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n");
        assert_eq!(default_gateway(&only_link), None);
        // A point-to-point default route without a gateway (e.g. a VPN device).
        let no_gw =
            format!("{HEADER}\ntun0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n");
        assert_eq!(default_gateway(&no_gw), None);
        assert_eq!(default_gateway(""), None);
        assert_eq!(default_gateway("x\nnot a route\n\u{0}\t\tzz"), None);
    }
}

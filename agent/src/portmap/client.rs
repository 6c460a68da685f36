//! Talking to the gateway: PCP (with NAT-PMP fallback) through `crab_nat`, UPnP IGD through
//! `igd-next`. Every request has a short timeout; nothing here retries beyond one attempt per
//! protocol (the schedule decides when to try again).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, PortMappingType, TimeoutConfig};
use igd_next::aio::tokio::{search_gateway, Tokio};
use igd_next::aio::Gateway;
use igd_next::{PortMappingProtocol, SearchOptions};
use tracing::debug;

use super::gateway::{self, GatewayInfo};
use super::{PortMapError, PortMappingStatus, Protocol};

/// The lease asked for (the NAT-PMP RFC's recommendation); the gateway may grant less.
pub const LEASE: Duration = Duration::from_secs(7200);

/// PCP/NAT-PMP: 250 ms, then 500 ms, then 1 s (1.75 s in all when nobody answers).
const PCP_TIMEOUTS: TimeoutConfig = TimeoutConfig {
    initial_timeout: Duration::from_millis(250),
    max_retries: 2,
    max_retry_timeout: Some(Duration::from_secs(1)),
};

/// How long an SSDP search for an Internet Gateway Device may take.
const UPNP_SEARCH: Duration = Duration::from_secs(2);

/// How long one UPnP SOAP request may take.
const UPNP_REQUEST: Duration = Duration::from_secs(3);

/// What the mapping is called in the gateway's UPnP list.
const UPNP_DESCRIPTION: &str = "rally";

/// A mapping held on the gateway.
pub enum Held {
    /// PCP or NAT-PMP (the mapping knows which, and renews and deletes itself).
    Pmp {
        mapping: PortMapping,
        external_ip: Ipv4Addr,
    },
    /// UPnP IGD: renewed by adding the same mapping again.
    Upnp {
        gateway: Box<Gateway<Tokio>>,
        local: SocketAddrV4,
        external: SocketAddrV4,
        lifetime: u32,
    },
}

impl Held {
    /// What `rally netcheck` shows of this mapping.
    pub fn status(&self) -> PortMappingStatus {
        match self {
            Held::Pmp {
                mapping,
                external_ip,
            } => PortMappingStatus {
                protocol: match mapping.mapping_type() {
                    PortMappingType::Pcp { .. } => Protocol::Pcp,
                    PortMappingType::NatPmp => Protocol::NatPmp,
                },
                external: SocketAddrV4::new(*external_ip, mapping.external_port().get()),
                lifetime_s: mapping.lifetime(),
            },
            Held::Upnp {
                external, lifetime, ..
            } => PortMappingStatus {
                protocol: Protocol::Upnp,
                external: *external,
                lifetime_s: *lifetime,
            },
        }
    }

    /// The lease granted.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(u64::from(self.status().lifetime_s))
    }
}

/// Maps `port` (UDP) on the default gateway: PCP, then NAT-PMP, then UPnP IGD.
pub async fn map(port: u16) -> Result<Held, PortMapError> {
    let port = NonZeroU16::new(port).ok_or(PortMapError::PortZero)?;
    let gw = gateway::find()?;
    debug!(gateway = %gw.gateway, local = %gw.local, "asking the gateway for a port mapping");
    let pmp_error = match map_pmp(gw, port).await {
        Ok(held) => return Ok(held),
        Err(e) => e,
    };
    match map_upnp(gw, port).await {
        Ok(held) => Ok(held),
        Err(upnp) => Err(PortMapError::Refused(format!(
            "PCP/NAT-PMP: {pmp_error}; UPnP: {upnp}"
        ))),
    }
}

/// Renews `held` with the protocol that made it.
pub async fn renew(held: &mut Held) -> Result<(), PortMapError> {
    match held {
        Held::Pmp { mapping, .. } => mapping
            .renew()
            .await
            .map_err(|e| PortMapError::Refused(e.to_string())),
        Held::Upnp {
            gateway,
            local,
            external,
            lifetime,
        } => {
            let add = gateway.add_port(
                PortMappingProtocol::UDP,
                external.port(),
                SocketAddr::V4(*local),
                *lifetime,
                UPNP_DESCRIPTION,
            );
            with_timeout(add)
                .await?
                .map_err(|e| PortMapError::Refused(e.to_string()))
        }
    }
}

/// Deletes `held` from the gateway.
pub async fn remove(held: Held) -> Result<(), PortMapError> {
    match held {
        Held::Pmp { mapping, .. } => mapping
            .try_drop()
            .await
            .map_err(|(e, _)| PortMapError::Refused(e.to_string())),
        Held::Upnp {
            gateway, external, ..
        } => with_timeout(gateway.remove_port(PortMappingProtocol::UDP, external.port()))
            .await?
            .map_err(|e| PortMapError::Refused(e.to_string())),
    }
}

/// PCP, falling back to NAT-PMP when the gateway answers PCP with "unsupported version" or
/// does not speak PCP at all but answers NAT-PMP.
async fn map_pmp(gw: GatewayInfo, port: NonZeroU16) -> Result<Held, String> {
    let options = PortMappingOptions {
        external_port: Some(port),
        lifetime_seconds: Some(LEASE.as_secs() as u32),
        timeout_config: Some(PCP_TIMEOUTS),
    };
    let gateway = crab_nat::GatewayAddress::from(gw.gateway);
    let client = IpAddr::V4(gw.local);
    let mapping =
        match PortMapping::new(gateway, client, InternetProtocol::Udp, port, options).await {
            Ok(m) => m,
            // Nobody answers on the PCP/NAT-PMP port: NAT-PMP would time out just the same.
            Err(crab_nat::MappingFailure::Pcp(crab_nat::pcp::Failure::Timeout)) => {
                return Err("no answer".into())
            }
            Err(pcp) => {
                debug!("PCP refused ({pcp}); trying NAT-PMP");
                crab_nat::natpmp::port_mapping(gateway, InternetProtocol::Udp, port, options)
                    .await
                    .map_err(|e| format!("{pcp}; NAT-PMP({e})"))?
            }
        };
    let external_ip = match mapping.mapping_type() {
        PortMappingType::Pcp {
            external_ip: IpAddr::V4(ip),
            ..
        } => ip,
        PortMappingType::Pcp { external_ip, .. } => {
            let _ = mapping.try_drop().await;
            return Err(format!("PCP mapped to {external_ip}, not IPv4"));
        }
        PortMappingType::NatPmp => {
            match crab_nat::natpmp::external_address(gateway, Some(PCP_TIMEOUTS)).await {
                Ok(ip) => ip,
                Err(e) => {
                    let _ = mapping.try_drop().await;
                    return Err(format!("NAT-PMP external address: {e}"));
                }
            }
        }
    };
    if external_ip.is_unspecified() {
        let _ = mapping.try_drop().await;
        return Err("the gateway has no external address".into());
    }
    Ok(Held::Pmp {
        mapping,
        external_ip,
    })
}

/// UPnP IGD: find the gateway by SSDP from the address facing it, ask for the same external
/// port first, then any.
async fn map_upnp(gw: GatewayInfo, port: NonZeroU16) -> Result<Held, String> {
    let mut options = SearchOptions::default();
    options.bind_addr = SocketAddr::from((gw.local, 0));
    options.timeout = Some(UPNP_SEARCH);
    options.single_search_timeout = Some(UPNP_SEARCH);
    let gateway = search_gateway(options)
        .await
        .map_err(|e| format!("no gateway found: {e}"))?;
    let IpAddr::V4(external_ip) = with_timeout(gateway.get_external_ip())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("external address: {e}"))?
    else {
        return Err("the gateway's external address is not IPv4".into());
    };
    if external_ip.is_unspecified() {
        return Err("the gateway has no external address".into());
    }
    let local = SocketAddrV4::new(gw.local, port.get());
    let lifetime = LEASE.as_secs() as u32;
    let same = with_timeout(gateway.add_port(
        PortMappingProtocol::UDP,
        port.get(),
        SocketAddr::V4(local),
        lifetime,
        UPNP_DESCRIPTION,
    ))
    .await
    .map_err(|e| e.to_string())?;
    let external_port = match same {
        Ok(()) => port.get(),
        Err(e) => {
            debug!("UPnP refused external port {port} ({e}); asking for any");
            with_timeout(gateway.add_any_port(
                PortMappingProtocol::UDP,
                SocketAddr::V4(local),
                lifetime,
                UPNP_DESCRIPTION,
            ))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("add port mapping: {e}"))?
        }
    };
    Ok(Held::Upnp {
        gateway: Box::new(gateway),
        local,
        external: SocketAddrV4::new(external_ip, external_port),
        lifetime,
    })
}

async fn with_timeout<T>(f: impl std::future::Future<Output = T>) -> Result<T, PortMapError> {
    tokio::time::timeout(UPNP_REQUEST, f)
        .await
        .map_err(|_| PortMapError::Refused("the gateway did not answer in time".into()))
}

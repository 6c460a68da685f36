//! The owner's view of the network: the host's addresses from netlink, the gateway port
//! mapping, the endpoints the control plane is told, and the relays handed to the data plane.

use std::net::SocketAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rally_proto::control::RelayEntry;
use rally_proto::{Request, Response};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::owner::{Msg, Owner};
use crate::dataplane::EngineCmd;
use crate::netinfo::local_endpoints;
use crate::netwatch::NetWatch;
use crate::portmap::PortMappingStatus;

/// A burst of network changes (address, then routes) is looked at once, this long after its
/// first message.
const NET_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

impl Owner {
    /// Decodes the token and looks the relays up; the data plane gets them with
    /// [`Msg::RelaysResolved`].
    pub(super) fn resolve_relays(&self, relays: Vec<RelayEntry>, token: String) {
        let Ok(token) = URL_SAFE_NO_PAD.decode(token.as_bytes()) else {
            warn!("the control plane sent a relay token that is not base64");
            return;
        };
        let me = self.me.clone();
        tokio::spawn(async move {
            let mut resolved = Vec::new();
            for r in relays {
                match tokio::net::lookup_host(&r.addr)
                    .await
                    .map(|mut a| a.find(|a| a.is_ipv4()))
                {
                    Ok(Some(addr)) => {
                        let tcp = resolve_tcp(&r).await;
                        resolved.push(crate::node::RelayConfig {
                            name: r.name.as_str().into(),
                            host: r.addr,
                            addr,
                            tcp,
                        });
                    }
                    Ok(None) => warn!(relay = %r.name, "{} has no IPv4 address", r.addr),
                    Err(e) => warn!(relay = %r.name, "cannot resolve {}: {e}", r.addr),
                }
            }
            let _ = me.send(Msg::RelaysResolved(resolved, token)).await;
        });
    }

    pub(super) fn renew_relay_token(&self) {
        if !self.link_state.borrow().connected {
            return;
        }
        let Some(link) = &self.link else { return };
        let handle = link.handle.clone();
        let me = self.me.clone();
        tokio::spawn(async move {
            if let Ok(Response::RelayToken { token, .. }) =
                handle.request(Request::RelayToken).await
            {
                let _ = me.send(Msg::RelayToken(token)).await;
            }
        });
    }

    /// Direct candidates: every local address, the public endpoint netcheck found, and the
    /// gateway's port mapping (first: behind a symmetric NAT it is the only way in).
    pub(super) fn endpoints(&self) -> Vec<SocketAddr> {
        let mut eps = self.local.clone();
        if let Some(public) = self.backlog.nat().and_then(|n| n.public_endpoint) {
            if !eps.contains(&public) {
                eps.insert(0, public);
            }
        }
        if let Some(mapped) = self.mapping.map(|m| SocketAddr::V4(m.external)) {
            eps.retain(|e| *e != mapped);
            eps.insert(0, mapped);
        }
        eps.truncate(rally_proto::control::MAX_ENDPOINTS);
        eps
    }

    /// The port mapping appeared, changed or went (`None`: the mapper ended): the control
    /// plane gets the endpoints (the mapping first) and the NAT report carrying it again.
    pub(super) fn handle_port_mapping(&mut self, news: Option<Option<PortMappingStatus>>) {
        let mapping = news.flatten();
        if news.is_none() {
            self.mapping_rx = None;
        }
        if mapping == self.mapping {
            return;
        }
        info!(
            mapping = %crate::portmap::describe(mapping.as_ref()),
            "port mapping changed"
        );
        self.mapping = mapping;
        let connected = self.link_state.borrow().connected;
        let requests = self
            .backlog
            .handle_mapped_endpoint(mapping.map(|m| m.external), connected);
        if connected {
            if let Some(link) = &self.link {
                link.handle.set_endpoints(self.endpoints());
            }
        }
        for req in requests {
            self.tell_control(req);
        }
    }

    /// A netlink message: the burst it starts is looked at [`NET_SETTLE`] later.
    pub(super) fn handle_net_change(&mut self, changed: std::io::Result<()>) {
        if let Err(e) = changed {
            warn!("netlink: {e}; address changes will no longer be noticed");
            self.netwatch = None;
            return;
        }
        self.net_settle_at
            .get_or_insert_with(|| Instant::now() + NET_SETTLE);
    }

    /// After a burst of network changes: if the host's addresses changed, the control plane
    /// gets the new endpoints, netcheck runs again and every peer punches again at once.
    pub(super) fn network_settled(&mut self) {
        self.net_settle_at = None;
        let now = local_endpoints(self.listen_port, &self.overlay);
        if now == self.local {
            debug!("network change without an address change");
            return;
        }
        info!(endpoints = ?now, "network changed");
        self.local = now;
        self.portmap.network_changed();
        if let Some(link) = &self.link {
            link.handle.set_endpoints(self.endpoints());
        }
        if let Some(engine) = &self.engine {
            engine.send(EngineCmd::Netcheck(None));
            engine.send(EngineCmd::Reconnect(None));
        }
    }
}

/// The next news of the port mapper: `Some(mapping)` when it changed, `None` once the mapper
/// has ended (then the receiver is dropped: never again).
pub(super) async fn mapping_changed(
    rx: &mut Option<watch::Receiver<Option<PortMappingStatus>>>,
) -> Option<Option<PortMappingStatus>> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    match r.changed().await {
        Ok(()) => Some(*r.borrow_and_update()),
        Err(_) => None,
    }
}

/// The next network change (never, without a netlink subscription).
pub(super) async fn net_changed(watch: &mut Option<NetWatch>) -> std::io::Result<()> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// A relay's TLS-over-TCP listener, looked up, with how to verify it: the key to pin
/// (`tcp_key`, preferred) or the name its CA-issued certificate is for (`tcp_name`). None if
/// the entry has no `tcp`, neither field, or the name does not resolve.
async fn resolve_tcp(r: &RelayEntry) -> Option<crate::node::TcpEndpoint> {
    let host = r.tcp.as_ref()?;
    let trust = match (r.tcp_key, &r.tcp_name) {
        (Some(key), _) => crate::node::RelayTrust::Pinned(key),
        (None, Some(name)) => crate::node::RelayTrust::Ca {
            server_name: name.clone(),
        },
        (None, None) => return None,
    };
    match tokio::net::lookup_host(host)
        .await
        .map(|mut a| a.find(|a| a.is_ipv4()))
    {
        Ok(Some(addr)) => Some(crate::node::TcpEndpoint { addr, trust }),
        Ok(None) => {
            warn!(relay = %r.name, "{host} has no IPv4 address");
            None
        }
        Err(e) => {
            warn!(relay = %r.name, "cannot resolve {host}: {e}");
            None
        }
    }
}

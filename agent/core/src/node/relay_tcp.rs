//! Relays over TLS on TCP, for networks that let out no UDP: one more relay client per relay
//! that has a TCP listener, whose path (`relay-tcp:NAME`) ranks below the same relay over UDP.
//!
//! The client is the same sans-IO [`RelayClient`] as over UDP (bind, challenge, token, pings,
//! `Send`/`Deliver`); only its address differs: a reserved **slot** address ([`tcp_slot`],
//! `240.0.x.y:0`, never routable and refused by a UDP send for its port 0) that the engine maps
//! to a TLS connection ([`Node::tcp_relay`]). So the node stays free of IO and of transports.
//!
//! **When it is dialed.** A TCP client is dormant (no connection, no session at the relay)
//! until UDP to its relay looks broken:
//! - its UDP client is not bound [`TCP_HEAD_START`] after the relays and token arrived (a
//!   UDP binding within the head start cancels the dial);
//! - UDP is known blocked ([`Node::handle_udp_hint`]: the control channel came up over TCP,
//!   or a netcheck heard nothing): then at once;
//! - a peer's path through the relay over UDP goes down, a peer's primary fails over, or a
//!   peer loses its last path: at once (a network that starts blocking UDP mid-session; on an
//!   open network a peer that went away costs one TLS connection for [`TCP_LINGER`]);
//! - the UDP binding is lost.
//!
//! **When it is closed.** After [`TCP_LINGER`] during which the UDP client was bound and no
//! peer's primary used the TCP path: peers are back on UDP (make-before-break: the UDP path
//! took the role back by recovery while the TCP path still carried traffic).
//!
//! TCP bindings never update the NAT report (the relay sees the TCP connection's address,
//! not the UDP mapping peers punch to) and are not used by the netcheck.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rally_proto::Key32;
use tracing::info;

use super::{Node, NodeEvent};
use crate::conn::{PathId, RelayId};
use crate::relay_client::RelayClient;

/// How long a UDP bind has before the same relay is dialed over TCP too.
pub const TCP_HEAD_START: Duration = Duration::from_millis(500);
/// How long an unused TCP binding is kept once UDP to its relay works.
pub const TCP_LINGER: Duration = Duration::from_secs(30);

/// First octet of the slot addresses (240.0.0.0/4 is reserved: never on a route).
const SLOT_OCTET: u8 = 240;

/// The reserved address that names the `index`-th TCP relay in transmits and routes.
pub fn tcp_slot(index: usize) -> SocketAddr {
    let [_, _, hi, lo] = u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(SLOT_OCTET, 0, hi, lo)), 0)
}

/// Whether `addr` is a TCP relay slot (the engine sends it over TLS, never over UDP).
pub fn is_tcp_slot(addr: &SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(a) if a.port() == 0 && a.ip().octets()[0] == SLOT_OCTET)
}

/// Where a relay listens for TLS on TCP, and how its certificate is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEndpoint {
    pub addr: SocketAddr,
    pub trust: RelayTrust,
}

/// How the engine verifies a relay's TLS certificate (the relay entry's `tcp_key` or
/// `tcp_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTrust {
    /// The handshake must be signed with this key (the relay's self-signed certificate).
    Pinned(Key32),
    /// The chain must be valid for this DNS name under the agent's trusted roots (an
    /// operator's certificate).
    Ca {
        /// The name sent in SNI and checked in the certificate.
        server_name: String,
    },
}

/// What changed about a relay over TCP (for the `transport_change` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpChange {
    /// Its client was started: the driver may open the connection now (before the first
    /// message, which waits for a token when the agent is in no party yet).
    Dialing,
    /// Bound over TLS/TCP.
    Bound,
    /// Closed: UDP to the relay works and no peer used the TCP path for [`TCP_LINGER`].
    Closed,
}

/// One relay's TCP side.
pub(super) struct TcpRelay {
    pub(super) name: RelayId,
    pub(super) slot: SocketAddr,
    pub(super) endpoint: TcpEndpoint,
    /// Present while dialed.
    pub(super) client: Option<RelayClient>,
    /// When to dial, unless UDP binds first.
    pub(super) dial_at: Option<Instant>,
    /// Since when UDP is bound and no peer's primary is this path.
    pub(super) unused_since: Option<Instant>,
}

impl TcpRelay {
    pub(super) fn new(name: RelayId, index: usize, endpoint: TcpEndpoint) -> Self {
        TcpRelay {
            name,
            slot: tcp_slot(index),
            endpoint,
            client: None,
            dial_at: None,
            unused_since: None,
        }
    }

    pub(super) fn path(&self) -> PathId {
        PathId::RelayTcp(self.name.clone())
    }

    pub(super) fn is_bound(&self) -> bool {
        self.client.as_ref().is_some_and(RelayClient::is_bound)
    }

    /// Asks for a dial by `at` (an earlier request stands).
    pub(super) fn want_dial(&mut self, at: Instant) {
        if self.client.is_none() {
            self.dial_at = Some(self.dial_at.map_or(at, |t| t.min(at)));
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        let client = self.client.as_ref().map(RelayClient::poll_timeout);
        let linger = self.unused_since.map(|t| t + TCP_LINGER);
        [client, self.dial_at, linger].into_iter().flatten().min()
    }
}

impl Node {
    /// Whether UDP is known to be blocked (the control channel came up over TCP, or a
    /// netcheck heard nothing): relays are then dialed over TCP at once, without waiting out
    /// [`TCP_HEAD_START`].
    pub fn handle_udp_hint(&mut self, udp_blocked: bool, now: Instant) {
        self.now = now;
        if self.relays.udp_blocked == udp_blocked {
            return;
        }
        self.relays.udp_blocked = udp_blocked;
        if udp_blocked {
            info!("UDP looks blocked: dialing relays over TLS/TCP");
            for t in &mut self.relays.tcp {
                t.want_dial(now);
            }
        }
    }

    /// The slot and TLS endpoint of `relay`'s TCP side, while its client is dialed.
    pub fn tcp_slot_of(&self, relay: &RelayId) -> Option<(SocketAddr, &TcpEndpoint)> {
        self.relays
            .tcp
            .iter()
            .find(|t| t.name == *relay && t.client.is_some())
            .map(|t| (t.slot, &t.endpoint))
    }

    /// The TLS endpoint a slot address stands for, while its client is dialed.
    pub fn tcp_relay(&self, slot: &SocketAddr) -> Option<&TcpEndpoint> {
        self.relays
            .tcp
            .iter()
            .find(|t| t.slot == *slot && t.client.is_some())
            .map(|t| &t.endpoint)
    }

    /// The relayed paths this agent is bound for now, over UDP and over TLS/TCP.
    pub fn relay_paths(&self) -> Vec<PathId> {
        self.relays.bound()
    }

    /// The relays bound over TLS/TCP now (for `rally netcheck`).
    pub fn tcp_bound(&self) -> Vec<RelayId> {
        self.relays
            .tcp
            .iter()
            .filter(|t| t.is_bound())
            .map(|t| t.name.clone())
            .collect()
    }

    /// Dials (when due) and closes (when unused) the TCP clients; runs their timers.
    pub(super) fn tcp_timeout(&mut self, now: Instant) {
        for i in 0..self.relays.tcp.len() {
            let udp_bound = self.relays.udp_bound(&self.relays.tcp[i].name);
            let t = &mut self.relays.tcp[i];
            if t.client.is_none() {
                if t.dial_at.is_some_and(|at| now >= at) {
                    self.dial_tcp(i, now);
                }
                continue;
            }
            if let Some(c) = t.client.as_mut().filter(|c| now >= c.poll_timeout()) {
                c.handle_timeout(now);
            }
            let path = t.path();
            let used = self.peers.values().any(|p| p.conn.primary() == Some(&path));
            let t = &mut self.relays.tcp[i];
            if !udp_bound || used {
                t.unused_since = None;
                continue;
            }
            let since = *t.unused_since.get_or_insert(now);
            if now >= since + TCP_LINGER {
                self.close_tcp(i, now);
            }
        }
    }

    fn dial_tcp(&mut self, i: usize, now: Instant) {
        let identity = self.relays.identity.clone();
        let token = self.relays.token.clone();
        let t = &mut self.relays.tcp[i];
        t.dial_at = None;
        info!(relay = %t.name, addr = %t.endpoint.addr, "dialing the relay over TLS/TCP");
        // Without a token yet (no party), the connection is opened all the same: the bind
        // follows as soon as the token comes.
        let mut client = RelayClient::new(t.name.clone(), t.slot, identity, now);
        client.set_token(token, now);
        t.client = Some(client);
        t.unused_since = None;
        self.events.push_back(NodeEvent::RelayTcp {
            relay: t.name.clone(),
            change: TcpChange::Dialing,
        });
    }

    fn close_tcp(&mut self, i: usize, now: Instant) {
        let t = &mut self.relays.tcp[i];
        info!(relay = %t.name, "UDP to the relay works: closing its TLS/TCP session");
        t.client = None;
        t.unused_since = None;
        let (relay, path) = (t.name.clone(), t.path());
        self.remove_relay_path(&path, now);
        self.events.push_back(NodeEvent::RelayTcp {
            relay,
            change: TcpChange::Closed,
        });
    }

    /// A TCP binding adds its path to every peer (never touching the NAT report).
    pub(super) fn tcp_bound_at(&mut self, relay: RelayId, now: Instant) {
        info!(relay = %relay, "bound at relay over TLS/TCP");
        self.add_relay_path(PathId::RelayTcp(relay.clone()), now);
        self.events.push_back(NodeEvent::RelayTcp {
            relay,
            change: TcpChange::Bound,
        });
    }

    /// A peer's connection lost its way through `relay` over UDP (or, `None`, its last path):
    /// dial the TCP side now.
    pub(super) fn wake_tcp(
        relays: &mut super::relays::Relays,
        relay: Option<&RelayId>,
        now: Instant,
    ) {
        for t in relays.tcp.iter_mut() {
            if relay.is_none_or(|r| *r == t.name) {
                t.want_dial(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reserved_unsendable_addresses_distinct_per_relay() {
        let (a, b) = (tcp_slot(0), tcp_slot(300));
        assert_ne!(a, b);
        assert!(is_tcp_slot(&a) && is_tcp_slot(&b));
        assert_eq!(a.port(), 0);
        assert!(!is_tcp_slot(&"240.0.0.1:3478".parse().unwrap()));
        assert!(!is_tcp_slot(&"198.51.100.5:0".parse().unwrap()));
    }
}

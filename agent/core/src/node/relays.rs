//! The relays: their clients, the datagrams from them, the netcheck that uses them as STUN
//! servers, and this agent's NAT report.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rally_proto::probe::is_probe;
use rally_proto::relay::RelayMsg;
use rally_proto::stun::BindingResponse;
use rally_proto::Identity;
use rand::RngCore;
use tracing::{info, warn};

use super::relay_tcp::{is_tcp_slot, TcpEndpoint, TcpRelay, TCP_HEAD_START};
use super::side::{SideOp, SideSocket};
use super::{DropReason, NatCause, Node, NodeError, NodeEvent, Received, TimerReason};
use crate::conn::{PathId, RelayId};
use crate::netcheck::{Netcheck, StunServer};
use crate::relay_client::{RelayClient, RelayEvent};

/// One relay as the control plane hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    pub name: RelayId,
    /// `host:port` as configured (shown in the NAT report).
    pub host: String,
    /// The resolved address.
    pub addr: SocketAddr,
    /// Its TLS-over-TCP listener and pinned key, if it has one.
    pub tcp: Option<TcpEndpoint>,
}

/// The relay clients and the netcheck.
pub(super) struct Relays {
    pub(super) identity: Arc<Identity>,
    local_port: u16,
    local_ips: Vec<IpAddr>,
    clients: Vec<RelayClient>,
    hosts: Vec<String>,
    by_addr: HashMap<SocketAddr, usize>,
    /// The TCP side of every relay that has one (see `relay_tcp.rs`).
    pub(super) tcp: Vec<TcpRelay>,
    /// The latest token (a TCP client dialed later binds with it).
    pub(super) token: Vec<u8>,
    /// UDP is known blocked: TCP clients are dialed without a head start.
    pub(super) udp_blocked: bool,
    pub(super) netcheck: Option<Netcheck>,
    /// Side-socket operations for the driver (the netcheck's socket).
    pub(super) side: VecDeque<SideOp>,
}

impl Relays {
    pub(super) fn new(identity: Arc<Identity>, local_port: u16, local_ips: Vec<IpAddr>) -> Self {
        Relays {
            identity,
            local_port,
            local_ips,
            clients: Vec::new(),
            hosts: Vec::new(),
            by_addr: HashMap::new(),
            tcp: Vec::new(),
            token: Vec::new(),
            udp_blocked: false,
            netcheck: None,
            side: VecDeque::new(),
        }
    }

    /// Relay replies ignored for a missing or wrong seal, summed over the clients.
    pub(super) fn unauthenticated(&self) -> u64 {
        self.clients.iter().map(|c| c.unauthenticated()).sum()
    }

    pub(super) fn addr(&self, relay: &RelayId) -> Option<SocketAddr> {
        self.clients
            .iter()
            .find(|c| &c.name == relay)
            .map(|c| c.addr)
    }

    /// Where a relayed path's datagrams go: the relay's UDP address, or its TCP slot while
    /// dialed.
    pub(super) fn path_addr(&self, path: &PathId) -> Option<SocketAddr> {
        match path {
            PathId::Direct(_) => None,
            PathId::Relay(r) => self.addr(r),
            PathId::RelayTcp(r) => self
                .tcp
                .iter()
                .find(|t| &t.name == r && t.client.is_some())
                .map(|t| t.slot),
        }
    }

    pub(super) fn udp_bound(&self, relay: &RelayId) -> bool {
        self.clients
            .iter()
            .any(|c| &c.name == relay && c.is_bound())
    }

    /// The relayed paths this agent is bound for (over UDP and over TCP).
    pub(super) fn bound(&self) -> Vec<PathId> {
        let udp = self
            .clients
            .iter()
            .filter(|c| c.is_bound())
            .map(|c| PathId::Relay(c.name.clone()));
        let tcp = self.tcp.iter().filter(|t| t.is_bound()).map(TcpRelay::path);
        udp.chain(tcp).collect()
    }

    /// The earliest relay or netcheck deadline. A bound client's next ping (every 10 s, three
    /// lost before the binding is) waits for the next slot of `idle_slot` (the node's idle
    /// grid), so the relays are pinged together with the idle peers' probes.
    pub(super) fn poll_timeout(
        &self,
        idle_slot: impl Fn(Instant) -> Instant,
    ) -> Option<(Instant, TimerReason)> {
        let relay = self.clients.iter().map(|c| {
            let at = c.poll_timeout();
            let at = if c.is_bound() { idle_slot(at) } else { at };
            (at, TimerReason::Relay)
        });
        let netcheck = self
            .netcheck
            .as_ref()
            .map(|n| (n.poll_timeout(), TimerReason::Netcheck));
        let tcp = self
            .tcp
            .iter()
            .filter_map(|t| Some((t.poll_timeout()?, TimerReason::Relay)));
        relay.chain(netcheck).chain(tcp).min_by_key(|(at, _)| *at)
    }
}

impl Node {
    /// Relay replies ignored because their seal was missing or wrong (see the relay client).
    pub fn relay_unauthenticated(&self) -> u64 {
        self.relays.unauthenticated()
    }

    /// The relays (name, `host:port`, resolved address) and this agent's token. A changed
    /// set replaces every client and runs a netcheck; the token goes to every client.
    pub fn handle_relays(&mut self, relays: Vec<RelayConfig>, token: Vec<u8>, now: Instant) {
        self.now = now;
        let tcp: Vec<_> = relays
            .iter()
            .filter_map(|r| Some((r.name.clone(), r.tcp.clone()?)))
            .collect();
        let same = relays.len() == self.relays.clients.len()
            && relays
                .iter()
                .zip(&self.relays.clients)
                .all(|(r, c)| r.name == c.name && r.addr == c.addr)
            && tcp.len() == self.relays.tcp.len()
            && tcp
                .iter()
                .zip(&self.relays.tcp)
                .all(|((name, e), t)| *name == t.name && *e == t.endpoint);
        if !same {
            info!(relays = ?relays.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), "relays");
            let old: Vec<RelayId> = self.relays.clients.iter().map(|c| c.name.clone()).collect();
            for name in old {
                self.remove_relay_path(&PathId::Relay(name), now);
            }
            let old_tcp: Vec<PathId> = self.relays.tcp.iter().map(TcpRelay::path).collect();
            for path in old_tcp {
                self.remove_relay_path(&path, now);
            }
            self.relays.tcp = tcp
                .into_iter()
                .enumerate()
                .map(|(i, (name, e))| TcpRelay::new(name, i, e))
                .collect();
            let identity = self.relays.identity.clone();
            self.relays.clients = relays
                .iter()
                .map(|r| RelayClient::new(r.name.clone(), r.addr, identity.clone(), now))
                .collect();
            self.relays.hosts = relays.iter().map(|r| r.host.clone()).collect();
            self.relays.by_addr = relays
                .iter()
                .enumerate()
                .map(|(i, r)| (r.addr, i))
                .collect();
            let _ = self.start_netcheck(now);
        }
        for c in &mut self.relays.clients {
            c.set_token(token.clone(), now);
        }
        let head_start = if self.relays.udp_blocked {
            Duration::ZERO
        } else {
            TCP_HEAD_START
        };
        let udp_bound: Vec<bool> = (self.relays.tcp.iter())
            .map(|t| self.relays.udp_bound(&t.name))
            .collect();
        for (t, udp_bound) in self.relays.tcp.iter_mut().zip(udp_bound) {
            if let Some(c) = &mut t.client {
                c.set_token(token.clone(), now);
            } else if (!token.is_empty() && !udp_bound) || self.relays.udp_blocked {
                // (A relay already bound over UDP needs no TCP: a token handed out again
                // must not start a dial that only a new UDP binding would cancel.)
                t.want_dial(now + head_start);
            }
        }
        self.relays.token = token;
    }

    /// Starts a NAT check (unless one runs); its report comes as [`NodeEvent::Nat`].
    pub fn start_netcheck(&mut self, now: Instant) -> Result<(), NodeError> {
        self.now = now;
        if self.relays.clients.is_empty() {
            return Err(NodeError::NoRelays);
        }
        if self.relays.netcheck.is_some() {
            return Ok(());
        }
        let servers = self
            .relays
            .clients
            .iter()
            .zip(&self.relays.hosts)
            .map(|(c, host)| StunServer {
                name: c.name.to_string(),
                host: host.clone(),
                addr: c.addr,
            })
            .collect();
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        self.relays.netcheck = Some(Netcheck::new(
            servers,
            self.relays.local_port,
            self.relays.local_ips.clone(),
            seed,
            now,
        ));
        Ok(())
    }

    pub(super) fn handle_stun<'a>(&mut self, d: &[u8], now: Instant) -> Received<'a> {
        let handled = match (&mut self.relays.netcheck, BindingResponse::decode(d)) {
            (Some(n), Ok(resp)) => n.handle_response(resp, false, now),
            _ => false,
        };
        if !handled {
            return Received::Dropped(DropReason::StrayStun);
        }
        self.finish_netcheck(now);
        Received::Handled
    }

    pub(super) fn handle_relay_datagram<'a>(
        &mut self,
        from: SocketAddr,
        d: &'a [u8],
        now: Instant,
    ) -> Received<'a> {
        let client = if is_tcp_slot(&from) {
            self.relays
                .tcp
                .iter()
                .position(|t| t.slot == from && t.client.is_some())
                .map(Client::Tcp)
        } else {
            self.relays.by_addr.get(&from).copied().map(Client::Udp)
        };
        let Some(client) = client else {
            return Received::Dropped(DropReason::RelayForeign);
        };
        match RelayMsg::decode(d) {
            Ok(RelayMsg::Deliver { from: sid, payload }) => {
                let path = match client {
                    Client::Udp(i) => PathId::Relay(self.relays.clients[i].name.clone()),
                    Client::Tcp(i) => self.relays.tcp[i].path(),
                };
                if is_probe(payload) {
                    return self.handle_probe(path, sid, payload, now);
                }
                match self.by_short.get(&sid) {
                    Some(&peer) => Received::WireGuard {
                        peer,
                        path,
                        payload,
                    },
                    None => Received::Dropped(DropReason::UnknownShortId),
                }
            }
            Ok(msg) => {
                let c = match client {
                    Client::Udp(i) => Some(&mut self.relays.clients[i]),
                    Client::Tcp(i) => self.relays.tcp[i].client.as_mut(),
                };
                if let Some(c) = c {
                    c.handle_msg(&msg, now);
                }
                Received::Handled
            }
            Err(_) => Received::Dropped(DropReason::Malformed),
        }
    }

    pub(super) fn relays_timeout(&mut self, now: Instant) {
        for c in &mut self.relays.clients {
            if now >= c.poll_timeout() {
                c.handle_timeout(now);
            }
        }
        if let Some(n) = &mut self.relays.netcheck {
            if now >= n.poll_timeout() {
                n.handle_timeout(now);
            }
        }
        self.tcp_timeout(now);
        self.finish_netcheck(now);
    }

    /// A finished netcheck's report becomes this agent's.
    pub(super) fn finish_netcheck(&mut self, now: Instant) {
        let Some(n) = &self.relays.netcheck else {
            return;
        };
        if !n.is_done(now) {
            return;
        }
        let report = n.report();
        self.relays.netcheck = None;
        self.relays
            .side
            .push_back(SideOp::Close(SideSocket::Netcheck));
        info!(
            udp = report.udp,
            mapping = ?report.mapping,
            filtering = ?report.filtering,
            public = ?report.public_endpoint,
            "netcheck"
        );
        self.handle_nat_report(report.clone(), now);
        self.events.push_back(NodeEvent::Nat {
            report,
            cause: NatCause::Netcheck,
        });
    }

    /// Relay and netcheck outputs into the node's; relay events into the peers' paths.
    pub(super) fn drain_relays(&mut self) {
        let now = self.now;
        if let Some(n) = &mut self.relays.netcheck {
            while let Some(t) = n.poll_transmit() {
                if t.side {
                    self.relays.side.push_back(SideOp::Send {
                        socket: SideSocket::Netcheck,
                        to: t.to,
                        payload: t.payload,
                    });
                } else {
                    self.transmits.push_back(super::Transmit {
                        to: t.to,
                        payload: t.payload,
                    });
                }
            }
        }
        for i in 0..self.relays.clients.len() {
            let c = &mut self.relays.clients[i];
            while let Some(payload) = c.poll_transmit() {
                self.transmits.push_back(super::Transmit {
                    to: c.addr,
                    payload,
                });
            }
            while let Some(ev) = self.relays.clients[i].poll_event() {
                let relay = self.relays.clients[i].name.clone();
                match ev {
                    RelayEvent::Bound { observed } => self.relay_bound(relay, observed, now),
                    RelayEvent::Lost { reason } => {
                        warn!(relay = %relay, "relay binding lost: {reason}");
                        self.remove_relay_path(&PathId::Relay(relay.clone()), now);
                        Node::wake_tcp(&mut self.relays, Some(&relay), now);
                        self.events.push_back(NodeEvent::RelayLost {
                            path: PathId::Relay(relay),
                            reason,
                        });
                    }
                }
            }
        }
        self.drain_tcp_relays(now);
    }

    fn drain_tcp_relays(&mut self, now: Instant) {
        for i in 0..self.relays.tcp.len() {
            let t = &mut self.relays.tcp[i];
            let (slot, path) = (t.slot, t.path());
            let Some(c) = t.client.as_mut() else {
                continue;
            };
            while let Some(payload) = c.poll_transmit() {
                self.transmits
                    .push_back(super::Transmit { to: slot, payload });
            }
            let mut events = Vec::new();
            while let Some(ev) = c.poll_event() {
                events.push(ev);
            }
            for ev in events {
                let relay = self.relays.tcp[i].name.clone();
                match ev {
                    RelayEvent::Bound { .. } => self.tcp_bound_at(relay, now),
                    RelayEvent::Lost { reason } => {
                        warn!(relay = %relay, "relay binding over TLS/TCP lost: {reason}");
                        self.remove_relay_path(&path, now);
                        self.events.push_back(NodeEvent::RelayLost {
                            path: path.clone(),
                            reason,
                        });
                    }
                }
            }
        }
    }

    /// A relay binding adds its path to every peer; a peer still waiting for its first path
    /// probes again now (probes sent before a rebind with a new token were dropped).
    fn relay_bound(&mut self, relay: RelayId, observed: SocketAddr, now: Instant) {
        info!(relay = %relay, %observed, "bound at relay");
        // UDP works: a dial still waiting out its head start is not needed.
        for t in self.relays.tcp.iter_mut().filter(|t| t.name == relay) {
            t.dial_at = None;
        }
        self.add_relay_path(PathId::Relay(relay.clone()), now);
        self.observed_public(observed);
        self.events
            .push_back(NodeEvent::RelayBound { relay, observed });
    }

    /// A relay saw this agent at `observed`: if that is a new public address (the router's
    /// WAN address changed, or the host moved), the NAT report changes at once. With an
    /// endpoint-dependent mapping each relay sees its own port, so only the address counts.
    fn observed_public(&mut self, observed: SocketAddr) {
        let Some(report) = &self.nat else {
            return;
        };
        let Some(public) = report.public_endpoint else {
            return;
        };
        let changed = if report.mapping.is_endpoint_dependent() {
            public.ip() != observed.ip()
        } else {
            public != observed
        };
        if !changed {
            return;
        }
        info!(old = %public, new = %observed, "public address changed");
        let mut report = report.clone();
        report.public_endpoint = Some(observed);
        report.port_preserving = observed.port() == self.relays.local_port;
        self.nat = Some(report.clone());
        self.events.push_back(NodeEvent::Nat {
            report,
            cause: NatCause::Observed,
        });
    }

    pub(super) fn add_relay_path(&mut self, path: PathId, now: Instant) {
        let ids: Vec<_> = self.peers.keys().copied().collect();
        for id in ids {
            if let Some(p) = self.peers.get_mut(&id) {
                p.conn.add_path(path.clone(), now);
                if p.conn.primary().is_none() {
                    p.conn.resume(now);
                }
                self.dirty.push(id);
            }
        }
    }

    pub(super) fn remove_relay_path(&mut self, path: &PathId, now: Instant) {
        let ids: Vec<_> = self.peers.keys().copied().collect();
        for id in ids {
            if let Some(p) = self.peers.get_mut(&id) {
                p.conn.remove_path(path, now);
                self.dirty.push(id);
            }
        }
    }
}

/// Which client a relay datagram is for.
#[derive(Clone, Copy)]
enum Client {
    Udp(usize),
    Tcp(usize),
}

//! NAT detection (sans-IO): STUN binding requests from the agent's own socket to every relay,
//! then to the first relay's alternate port, plus a few from a short-lived side socket,
//! classified into RFC 4787 mapping and filtering behaviour.
//!
//! - Mapping: the mapped address seen by two relays (different IPs) is equal →
//!   endpoint-independent. It differs, and the same relay's alternate port sees the mapping of
//!   its primary port → address-dependent; otherwise address-and-port-dependent.
//! - Filtering is tested on the side socket's mapping, which has talked to the first relay's
//!   primary address only (the main socket also talks to the alternate port, so its own
//!   filter would let that port in). A second relay (another IP) is asked, from the main
//!   socket, to answer at the side mapping's port (RFC 5780 RESPONSE-PORT): heard on the side
//!   socket → endpoint-independent filtering. Otherwise the first relay's change-port answer
//!   (from its alternate port) heard there → address-dependent; not heard →
//!   address-and-port-dependent. With no NAT in the way a change-port answer means open.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rally_proto::control::{NatBehavior, NatReport, RelayLatency};
use rally_proto::stun::{self, BindingRequest, BindingResponse, TxId};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How long a netcheck waits for answers.
pub const DURATION: Duration = Duration::from_millis(1500);
/// Retransmissions of unanswered requests, after these delays from the start.
const RETRANSMITS: [Duration; 2] = [Duration::from_millis(300), Duration::from_millis(700)];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunServer {
    pub name: String,
    pub host: String,
    pub addr: SocketAddr,
}

/// A request for the driver: which socket sends it (`side`: the netcheck's side socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetcheckTransmit {
    pub side: bool,
    pub to: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Main socket → each relay.
    Primary,
    /// Main socket → the first relay's alternate port (mapping).
    AltPort,
    /// Side socket → the first relay (the side mapping).
    SidePrimary,
    /// Side socket → the first relay, answered from its alternate port (port filtering).
    SideChangePort,
    /// Main socket → another relay, answered at the side mapping's port (address filtering).
    ToSide,
}

#[derive(Debug)]
struct Probe {
    server: usize,
    kind: Kind,
    to: SocketAddr,
    txid: TxId,
    payload: Vec<u8>,
    sent: Instant,
    retransmits: usize,
    answer: Option<(BindingResponse, Duration)>,
    /// The answer came in on the side socket.
    on_side: bool,
}

impl Probe {
    fn side(&self) -> bool {
        matches!(self.kind, Kind::SidePrimary | Kind::SideChangePort)
    }
}

pub struct Netcheck {
    servers: Vec<StunServer>,
    local_port: u16,
    local_ips: Vec<IpAddr>,
    start: Instant,
    probes: Vec<Probe>,
    transmits: VecDeque<NetcheckTransmit>,
    rng: ChaCha8Rng,
}

impl Netcheck {
    pub fn new(
        servers: Vec<StunServer>,
        local_port: u16,
        local_ips: Vec<IpAddr>,
        seed: [u8; 32],
        now: Instant,
    ) -> Self {
        let mut n = Netcheck {
            servers,
            local_port,
            local_ips,
            start: now,
            probes: Vec::new(),
            transmits: VecDeque::new(),
            rng: ChaCha8Rng::from_seed(seed),
        };
        for i in 0..n.servers.len() {
            let to = n.servers[i].addr;
            n.send(i, Kind::Primary, to, now);
        }
        if let Some(first) = n.servers.first().map(|s| s.addr) {
            n.send(0, Kind::SidePrimary, first, now);
        }
        n
    }

    fn send(&mut self, server: usize, kind: Kind, to: SocketAddr, now: Instant) {
        let mut txid = [0u8; 12];
        self.rng.fill_bytes(&mut txid);
        let req = BindingRequest {
            txid,
            change_ip: false,
            change_port: kind == Kind::SideChangePort,
        };
        let payload = match (kind, self.side_mapping()) {
            (Kind::ToSide, Some(side)) => stun::encode_to_port(&req, side.port()),
            _ => req.encode(),
        };
        let probe = Probe {
            server,
            kind,
            to,
            txid,
            payload,
            sent: now,
            retransmits: 0,
            answer: None,
            on_side: false,
        };
        self.queue(&probe);
        self.probes.push(probe);
    }

    fn queue(&mut self, p: &Probe) {
        self.transmits.push_back(NetcheckTransmit {
            side: p.side(),
            to: p.to,
            payload: p.payload.clone(),
        });
    }

    /// Takes a STUN response, heard on the main socket or (`on_side`) the side socket;
    /// returns false if it answers none of our requests.
    pub fn handle_response(&mut self, resp: BindingResponse, on_side: bool, now: Instant) -> bool {
        let Some(i) = self.probes.iter().position(|p| p.txid == resp.txid) else {
            return false;
        };
        if self.probes[i].answer.is_some() {
            return true;
        }
        let rtt = now.saturating_duration_since(self.probes[i].sent);
        let (server, kind) = (self.probes[i].server, self.probes[i].kind);
        self.probes[i].answer = Some((resp, rtt));
        self.probes[i].on_side = on_side;
        // The first relay's answer names its alternate address: test mapping and filtering there.
        let alt = resp.other.filter(|alt| {
            let primary = self.servers[0].addr;
            server == 0 && alt.ip() == primary.ip() && alt.port() != primary.port()
        });
        match (kind, alt) {
            (Kind::Primary, Some(alt)) => self.send(0, Kind::AltPort, alt, now),
            (Kind::SidePrimary, Some(_)) => {
                self.send(0, Kind::SideChangePort, self.servers[0].addr, now)
            }
            _ => {}
        }
        self.maybe_to_side(now);
        true
    }

    /// Once the side mapping is known, and a relay with another IP saw the main socket on the
    /// same public address: ask that relay to answer at the side mapping's port.
    fn maybe_to_side(&mut self, now: Instant) {
        if self.probes.iter().any(|p| p.kind == Kind::ToSide) {
            return;
        }
        let Some(side) = self.side_mapping() else {
            return;
        };
        let first_ip = self.servers[0].addr.ip();
        let other = (1..self.servers.len()).find(|&i| {
            self.servers[i].addr.ip() != first_ip
                && self
                    .answer(i, Kind::Primary)
                    .is_some_and(|(r, _)| r.mapped.ip() == side.ip())
        });
        if let Some(i) = other {
            let to = self.servers[i].addr;
            self.send(i, Kind::ToSide, to, now);
        }
    }

    fn side_mapping(&self) -> Option<SocketAddr> {
        self.answer(0, Kind::SidePrimary).map(|(r, _)| r.mapped)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut resend = Vec::new();
        for (i, p) in self.probes.iter_mut().enumerate() {
            if p.answer.is_some() {
                continue;
            }
            if let Some(after) = RETRANSMITS.get(p.retransmits) {
                if now >= p.sent + *after {
                    p.retransmits += 1;
                    resend.push(i);
                }
            }
        }
        for i in resend {
            let t = NetcheckTransmit {
                side: self.probes[i].side(),
                to: self.probes[i].to,
                payload: self.probes[i].payload.clone(),
            };
            self.transmits.push_back(t);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<NetcheckTransmit> {
        self.transmits.pop_front()
    }

    pub fn poll_timeout(&self) -> Instant {
        let next_resend = self
            .probes
            .iter()
            .filter(|p| p.answer.is_none())
            .filter_map(|p| RETRANSMITS.get(p.retransmits).map(|d| p.sent + *d))
            .min();
        next_resend.map_or(self.deadline(), |t| t.min(self.deadline()))
    }

    pub fn deadline(&self) -> Instant {
        self.start + DURATION
    }

    /// Done when time is up, or every request has its answer.
    pub fn is_done(&self, now: Instant) -> bool {
        now >= self.deadline() || self.probes.iter().all(|p| p.answer.is_some())
    }

    fn probe(&self, server: usize, kind: Kind) -> Option<&Probe> {
        self.probes
            .iter()
            .find(|p| p.server == server && p.kind == kind)
    }

    fn answer(&self, server: usize, kind: Kind) -> Option<&(BindingResponse, Duration)> {
        self.probe(server, kind).and_then(|p| p.answer.as_ref())
    }

    /// Filtering, from the side socket's tests (see the module's comment).
    fn filtering(&self, udp: bool, behind_nat: bool) -> NatBehavior {
        let to_side = self.probes.iter().find(|p| p.kind == Kind::ToSide);
        // An answer on the main socket: a relay that does not know RESPONSE-PORT.
        let to_side_heard = to_side.map(|p| p.answer.is_some() && p.on_side);
        let change = self
            .probe(0, Kind::SideChangePort)
            .map(|p| p.answer.is_some() && p.on_side);
        match (to_side_heard, change) {
            _ if !udp => NatBehavior::Unknown,
            (Some(true), _) => NatBehavior::EndpointIndependent,
            (_, Some(true)) if !behind_nat => NatBehavior::EndpointIndependent,
            (Some(false), Some(true)) if to_side.is_some_and(|p| p.answer.is_none()) => {
                NatBehavior::AddressDependent
            }
            (_, Some(false)) => NatBehavior::AddressAndPortDependent,
            _ => NatBehavior::Unknown,
        }
    }

    pub fn report(&self) -> NatReport {
        let primaries: Vec<(usize, SocketAddr)> = (0..self.servers.len())
            .filter_map(|i| self.answer(i, Kind::Primary).map(|(r, _)| (i, r.mapped)))
            .collect();
        let udp = !primaries.is_empty();
        let public_endpoint = primaries.first().map(|(_, m)| *m);
        let behind_nat = public_endpoint
            .is_some_and(|m| !(self.local_ips.contains(&m.ip()) && m.port() == self.local_port));

        // Two relays with different IPs.
        let pair = primaries.iter().find(|(i, _)| {
            *i != primaries[0].0
                && self.servers[*i].addr.ip() != self.servers[primaries[0].0].addr.ip()
        });
        let mapping = match (public_endpoint, pair) {
            _ if !udp => NatBehavior::Unknown,
            _ if !behind_nat => NatBehavior::EndpointIndependent,
            (Some(first), Some((_, second))) if first == *second => {
                NatBehavior::EndpointIndependent
            }
            (Some(first), Some(_)) => match self.answer(0, Kind::AltPort) {
                Some((alt, _)) if alt.mapped == first => NatBehavior::AddressDependent,
                _ => NatBehavior::AddressAndPortDependent,
            },
            _ => NatBehavior::Unknown,
        };
        let filtering = self.filtering(udp, behind_nat);
        let port_delta = match (public_endpoint, pair) {
            (Some(first), Some((_, second))) if mapping.is_endpoint_dependent() => {
                let alt = self.answer(0, Kind::AltPort).map(|(a, _)| a.mapped);
                sequential_step(first, *second, alt)
            }
            _ => None,
        };
        let port_preserving = public_endpoint.is_some_and(|m| m.port() == self.local_port);
        let relays = self
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| RelayLatency {
                name: s.name.clone(),
                addr: s.host.clone(),
                latency_ms: self
                    .answer(i, Kind::Primary)
                    .map(|(_, rtt)| rtt.as_secs_f64() * 1000.0),
            })
            .collect();
        NatReport {
            udp,
            mapping,
            filtering,
            port_preserving,
            public_endpoint,
            relays,
            mapped_endpoint: None,
            port_delta,
        }
    }
}

/// The step of a sequential NAT from the main socket's mappings in the order they were made
/// (the first relay, the second, the first relay's alternate port, with the side socket's
/// mapping made between the last two): a small step between the first two, and the third
/// further on in the same direction within a few steps. `None` when they look random.
fn sequential_step(first: SocketAddr, second: SocketAddr, alt: Option<SocketAddr>) -> Option<i16> {
    let d = i32::from(second.port()) - i32::from(first.port());
    if d == 0 || d.abs() > crate::birthday::MAX_DELTA {
        return None;
    }
    if let Some(a) = alt {
        let e = i32::from(a.port()) - i32::from(second.port());
        if e.signum() != d.signum() || e.abs() > 4 * d.abs() {
            return None;
        }
    }
    i16::try_from(d).ok()
}

#[cfg(test)]
mod tests;

//! NAT detection (sans-IO): STUN binding requests from the agent's own socket to every relay,
//! then to the first relay's alternate port and with a change-port request, classified into
//! RFC 4787 mapping and filtering behaviour.
//!
//! - Mapping: the mapped address seen by two relays (different IPs) is equal →
//!   endpoint-independent. It differs, and the same relay's alternate port sees the mapping of
//!   its primary port → address-dependent; otherwise address-and-port-dependent.
//! - Filtering: a change-port request answered from the other port means packets from a new
//!   port are let in; with no NAT in the way (mapped = local address) that is endpoint-
//!   independent filtering. Not answered → address-and-port-dependent. A relay with one IP
//!   cannot tell endpoint-independent from address-dependent filtering behind a NAT: `unknown`.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rally_proto::control::{NatBehavior, NatReport, RelayLatency};
use rally_proto::stun::{BindingRequest, BindingResponse, TxId};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Primary,
    AltPort,
    ChangePort,
}

#[derive(Debug)]
struct Probe {
    server: usize,
    kind: Kind,
    to: SocketAddr,
    txid: TxId,
    sent: Instant,
    retransmits: usize,
    answer: Option<(BindingResponse, Duration)>,
}

pub struct Netcheck {
    servers: Vec<StunServer>,
    local_port: u16,
    local_ips: Vec<IpAddr>,
    start: Instant,
    probes: Vec<Probe>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
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
        n
    }

    fn send(&mut self, server: usize, kind: Kind, to: SocketAddr, now: Instant) {
        let mut txid = [0u8; 12];
        self.rng.fill_bytes(&mut txid);
        let req = BindingRequest {
            txid,
            change_ip: false,
            change_port: kind == Kind::ChangePort,
        };
        self.transmits.push_back((to, req.encode()));
        self.probes.push(Probe {
            server,
            kind,
            to,
            txid,
            sent: now,
            retransmits: 0,
            answer: None,
        });
    }

    /// Takes a STUN response; returns false if it answers none of our requests.
    pub fn handle_response(&mut self, resp: BindingResponse, now: Instant) -> bool {
        let Some(i) = self.probes.iter().position(|p| p.txid == resp.txid) else {
            return false;
        };
        if self.probes[i].answer.is_some() {
            return true;
        }
        let rtt = now.saturating_duration_since(self.probes[i].sent);
        let (server, kind) = (self.probes[i].server, self.probes[i].kind);
        self.probes[i].answer = Some((resp, rtt));
        // The first relay's answer names its alternate address: test mapping and filtering there.
        if kind == Kind::Primary && server == 0 {
            if let Some(alt) = resp.other {
                let primary = self.servers[0].addr;
                if alt.ip() == primary.ip() && alt.port() != primary.port() {
                    self.send(0, Kind::AltPort, alt, now);
                    self.send(0, Kind::ChangePort, primary, now);
                }
            }
        }
        true
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut resend = Vec::new();
        for p in self.probes.iter_mut().filter(|p| p.answer.is_none()) {
            if let Some(after) = RETRANSMITS.get(p.retransmits) {
                if now >= p.sent + *after {
                    p.retransmits += 1;
                    resend.push((p.to, p.txid, p.kind));
                }
            }
        }
        for (to, txid, kind) in resend {
            let req = BindingRequest {
                txid,
                change_ip: false,
                change_port: kind == Kind::ChangePort,
            };
            self.transmits.push_back((to, req.encode()));
        }
    }

    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
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

    fn answer(&self, server: usize, kind: Kind) -> Option<&(BindingResponse, Duration)> {
        self.probes
            .iter()
            .find(|p| p.server == server && p.kind == kind)
            .and_then(|p| p.answer.as_ref())
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
        let change_port_tried = self.probes.iter().any(|p| p.kind == Kind::ChangePort);
        let filtering = match (change_port_tried, self.answer(0, Kind::ChangePort)) {
            (false, _) => NatBehavior::Unknown,
            (true, Some(_)) if !behind_nat => NatBehavior::EndpointIndependent,
            (true, Some(_)) => NatBehavior::Unknown,
            (true, None) => NatBehavior::AddressAndPortDependent,
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
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // an arbitrary origin for the fake clock
mod tests {
    use super::*;

    const LOCAL: &str = "192.168.1.2:51820";

    fn servers() -> Vec<StunServer> {
        vec![
            StunServer {
                name: "r1".into(),
                host: "198.51.100.5:3478".into(),
                addr: "198.51.100.5:3478".parse().unwrap(),
            },
            StunServer {
                name: "r2".into(),
                host: "198.51.100.6:3478".into(),
                addr: "198.51.100.6:3478".parse().unwrap(),
            },
        ]
    }

    fn start(now: Instant) -> Netcheck {
        let local: SocketAddr = LOCAL.parse().unwrap();
        Netcheck::new(servers(), local.port(), vec![local.ip()], [1; 32], now)
    }

    fn requests(n: &mut Netcheck) -> Vec<(SocketAddr, BindingRequest)> {
        std::iter::from_fn(|| n.poll_transmit())
            .map(|(to, b)| (to, BindingRequest::decode(&b).unwrap()))
            .collect()
    }

    fn answer(
        n: &mut Netcheck,
        req: &BindingRequest,
        mapped: &str,
        other: Option<&str>,
        now: Instant,
    ) {
        n.handle_response(
            BindingResponse {
                txid: req.txid,
                mapped: mapped.parse().unwrap(),
                other: other.map(|o| o.parse().unwrap()),
                origin: None,
            },
            now,
        );
    }

    #[test]
    fn same_mapping_at_two_relays_is_endpoint_independent() {
        let t0 = Instant::now();
        let mut n = start(t0);
        for (_, r) in requests(&mut n) {
            answer(
                &mut n,
                &r,
                "203.0.113.7:51820",
                None,
                t0 + Duration::from_millis(40),
            );
        }
        let rep = n.report();
        assert!(rep.udp);
        assert_eq!(rep.mapping, NatBehavior::EndpointIndependent);
        assert!(rep.port_preserving);
        assert_eq!(
            rep.public_endpoint,
            Some("203.0.113.7:51820".parse().unwrap())
        );
        assert_eq!(rep.relays[0].latency_ms, Some(40.0));
    }

    #[test]
    fn different_mappings_are_endpoint_dependent() {
        let t0 = Instant::now();
        let mut n = start(t0);
        let reqs = requests(&mut n);
        answer(
            &mut n,
            &reqs[0].1,
            "203.0.113.7:40001",
            Some("198.51.100.5:3479"),
            t0,
        );
        answer(&mut n, &reqs[1].1, "203.0.113.7:40002", None, t0);
        // The alternate port of relay 1 sees yet another port; change-port gets no answer.
        let more = requests(&mut n);
        assert_eq!(more.len(), 2);
        let alt = more.iter().find(|(to, _)| to.port() == 3479).unwrap();
        assert!(more.iter().any(|(_, r)| r.change_port));
        answer(&mut n, &alt.1, "203.0.113.7:40003", None, t0);
        let rep = n.report();
        assert_eq!(rep.mapping, NatBehavior::AddressAndPortDependent);
        assert_eq!(rep.filtering, NatBehavior::AddressAndPortDependent);
        assert!(!rep.port_preserving);
    }

    #[test]
    fn no_nat_with_change_port_answered_is_open() {
        let t0 = Instant::now();
        let mut n = start(t0);
        let reqs = requests(&mut n);
        answer(&mut n, &reqs[0].1, LOCAL, Some("198.51.100.5:3479"), t0);
        answer(&mut n, &reqs[1].1, LOCAL, None, t0);
        for (_, r) in requests(&mut n) {
            answer(&mut n, &r, LOCAL, None, t0);
        }
        let rep = n.report();
        assert_eq!(rep.mapping, NatBehavior::EndpointIndependent);
        assert_eq!(rep.filtering, NatBehavior::EndpointIndependent);
        assert!(n.is_done(t0));
    }

    #[test]
    fn silence_means_no_udp_and_requests_are_retransmitted() {
        let t0 = Instant::now();
        let mut n = start(t0);
        assert_eq!(requests(&mut n).len(), 2);
        let t1 = n.poll_timeout();
        assert_eq!(t1, t0 + RETRANSMITS[0]);
        n.handle_timeout(t1);
        assert_eq!(requests(&mut n).len(), 2);
        assert!(!n.is_done(t1));
        assert!(n.is_done(t0 + DURATION));
        let rep = n.report();
        assert!(!rep.udp);
        assert_eq!(rep.mapping, NatBehavior::Unknown);
    }
}

//! The simulated wire: datagrams in flight (latency, loss, cuts), through the NAT routers, to
//! the relays' real core and to the agents' nodes.

use std::cmp::Reverse;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rally_proto::Key32;
use rally_relay::core::{Action, Via as RelayVia};
use rand::Rng;

use super::Sim;
use crate::conn::PathId;
use crate::node::Received;

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct InFlight {
    pub(super) at: Instant,
    pub(super) seq: u64,
    pub(super) from: SocketAddr,
    pub(super) to: SocketAddr,
    pub(super) payload: Vec<u8>,
    /// Over TLS/TCP (never lost, never blocked; see `tcp.rs`).
    pub(super) tcp: bool,
}

impl Sim {
    /// A datagram from agent `a`'s socket to `to`, through its NAT.
    pub(super) fn send_from(&mut self, a: usize, to: SocketAddr, payload: Vec<u8>) {
        if crate::node::is_tcp_slot(&to) {
            self.send_tcp(a, to, payload);
            return;
        }
        if rally_proto::probe::is_probe(&payload) {
            let now = self.now;
            self.agents[a].direct_probes.push((now, to));
        }
        let local = match self.agents[a].carried.get(&to) {
            Some(side) => *side,
            None => self.agents[a].local,
        };
        self.send_from_addr(a, local, to, payload);
    }

    /// A datagram from agent `a`'s socket at `local` to `to`, through its NAT.
    pub(super) fn send_from_addr(
        &mut self,
        a: usize,
        local: SocketAddr,
        to: SocketAddr,
        payload: Vec<u8>,
    ) {
        let router = self.agents[a].router;
        let from = match router {
            None => local,
            // Inside the LAN: no translation.
            Some(r)
                if self
                    .agents
                    .iter()
                    .any(|x| x.local == to && x.router == Some(r)) =>
            {
                local
            }
            Some(_) if self.udp_blocked.contains(&a) => return,
            Some(r) => self.routers[r].map_out(local, to),
        };
        if router.is_none() && self.udp_blocked.contains(&a) {
            return;
        }
        self.put(from, to, payload);
    }

    fn put(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        self.put_after(from, to, payload, Duration::ZERO);
    }

    fn put_after(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>, extra: Duration) {
        let cut = self
            .cuts
            .iter()
            .any(|&(x, y)| (from.ip(), to.ip()) == (x, y) || (from.ip(), to.ip()) == (y, x));
        if cut || (self.loss > 0.0 && self.rng.gen_bool(self.loss)) {
            return;
        }
        self.seq += 1;
        self.wire.push(Reverse(InFlight {
            at: self.now + self.latency + extra,
            seq: self.seq,
            from,
            to,
            payload,
            tcp: false,
        }));
    }

    pub(super) fn deliver(&mut self, mut p: InFlight) {
        if p.tcp {
            self.deliver_tcp(p);
            return;
        }
        if let Some(r) = self
            .relays
            .iter()
            .position(|r| r.primary == p.to || r.alt == p.to)
        {
            self.deliver_to_relay(r, p);
            return;
        }
        if let Some(r) = self
            .routers
            .iter()
            .position(|r| IpAddr::from(r.public) == p.to.ip())
        {
            let Some(inside) = self.routers[r].map_in(p.to.port(), p.from) else {
                return;
            };
            p.to = inside;
        }
        if let Some(a) = self.agents.iter().position(|x| x.local == p.to) {
            let lan = self.agents.iter().any(|x| x.local == p.from);
            if self.udp_blocked.contains(&a) && !lan {
                return;
            }
            self.deliver_to_agent(a, p.from, &p.payload);
        } else if let Some((a, socket)) = self.agents.iter().enumerate().find_map(|(i, x)| {
            x.sides
                .iter()
                .find(|(_, l)| **l == p.to)
                .map(|(s, _)| (i, *s))
        }) {
            if self.agents[a].carried.values().any(|l| *l == p.to) {
                self.deliver_to_agent(a, p.from, &p.payload);
                return;
            }
            let now = self.now;
            let _ = self.agents[a]
                .node
                .handle_side_datagram(socket, p.from, &p.payload, now);
            self.drain(a);
        }
    }

    pub(super) fn deliver_to_relay(&mut self, r: usize, mut p: InFlight) {
        let (now, unix) = (self.now, self.unix());
        let relay = &mut self.relays[r];
        let (primary, alt) = (relay.primary, relay.alt);
        let via = if p.to == alt {
            RelayVia::Alt
        } else {
            RelayVia::Primary
        };
        let addr = |via: RelayVia| if via == RelayVia::Alt { alt } else { primary };
        let via = if p.tcp { RelayVia::Tcp } else { via };
        let out = match relay
            .core
            .handle_datagram(via, p.from, &mut p.payload, now, unix)
        {
            // The sim's TCP agents hold one connection per relay: a copy (`also`) has nowhere to go.
            Action::Forward {
                via: RelayVia::Tcp,
                to,
                len,
                ..
            } => {
                let payload = p.payload[..len].to_vec();
                self.tcp_from_relay(r, to, payload);
                return;
            }
            Action::Reply(t) | Action::Drop { reply: Some(t), .. } if t.via == RelayVia::Tcp => {
                self.tcp_from_relay(r, t.to, t.payload);
                return;
            }
            Action::Forward { via, to, len, .. } => {
                Some((addr(via), to, p.payload[..len].to_vec()))
            }
            Action::Reply(t) | Action::Drop { reply: Some(t), .. } => {
                Some((addr(t.via), t.to, t.payload))
            }
            Action::Drop { reply: None, .. } => None,
        };
        if let Some((from, to, payload)) = out {
            let mut extra = self.relay_delay.get(&r).copied().unwrap_or_default();
            if let Some(&jitter) = self.relay_jitter.get(&r) {
                extra += jitter.mul_f64(self.rng.gen::<f64>());
            }
            self.put_after(from, to, payload, extra);
        }
    }

    pub(super) fn deliver_to_agent(&mut self, a: usize, from: SocketAddr, d: &[u8]) {
        let now = self.now;
        let node = &mut self.agents[a].node;
        let data = |d: &[u8]| {
            (d.len() == 36 && d[..4] == [4, 0, 0, 0]).then(|| {
                let mut k = [0u8; 32];
                k.copy_from_slice(&d[4..36]);
                Key32(k)
            })
        };
        let got = match data(d) {
            Some(peer) => Some((peer, PathId::Direct(from))),
            None => match node.handle_datagram(from, d, now) {
                Received::WireGuard {
                    peer,
                    path,
                    payload,
                } if data(payload) == Some(peer) => Some((peer, path)),
                _ => None,
            },
        };
        self.agents[a].wake(now);
        if let Some((peer, path)) = got {
            self.agents[a].node.handle_tunnel_rx(&peer, &path, now);
            self.agents[a].received.push((now, peer, path));
            if self.agents[a].echo {
                if let Some(b) = self.agents.iter().position(|x| x.id == peer) {
                    self.send_data(a, b);
                }
            }
        }
        self.drain(a);
    }
}

//! Relays over TLS/TCP in the simulation: what an agent sends to a TCP slot reaches the
//! relay's core as `Via::Tcp` from the agent's connection address, and what the core sends to
//! a TCP session comes back to the agent from that slot. A stream loses nothing and no router
//! blocks it.

use std::cmp::Reverse;
use std::net::SocketAddr;

use rally_proto::Key32;

use super::wire::InFlight;
use super::{Sim, SimRelay};
use crate::node::{tcp_slot, RelayTrust, TcpEndpoint};

/// The relay's TLS listener (its certificate is not checked here: the engine does).
pub(super) fn endpoint(r: &SimRelay) -> TcpEndpoint {
    TcpEndpoint {
        addr: SocketAddr::new(r.primary.ip(), 443),
        trust: RelayTrust::Pinned(Key32([0; 32])),
    }
}

impl Sim {
    /// Agent `a`'s TCP connection address as relays see it.
    fn tcp_addr(&self, a: usize) -> SocketAddr {
        SocketAddr::new(self.public_ip(a), 30_000 + a as u16)
    }

    pub(super) fn send_tcp(&mut self, a: usize, slot: SocketAddr, payload: Vec<u8>) {
        let Some(r) = (0..self.relays.len()).find(|r| tcp_slot(*r) == slot) else {
            return;
        };
        let (from, to) = (self.tcp_addr(a), self.relays[r].primary);
        self.put_tcp(from, to, payload);
    }

    pub(super) fn tcp_from_relay(&mut self, r: usize, to: SocketAddr, payload: Vec<u8>) {
        self.put_tcp(tcp_slot(r), to, payload);
    }

    pub(super) fn deliver_tcp(&mut self, p: InFlight) {
        if let Some(r) = self.relays.iter().position(|r| r.primary == p.to) {
            self.deliver_to_relay(r, p);
        } else if let Some(a) = (0..self.agents.len()).find(|a| self.tcp_addr(*a) == p.to) {
            self.deliver_to_agent(a, p.from, &p.payload);
        }
    }

    fn put_tcp(&mut self, from: SocketAddr, to: SocketAddr, payload: Vec<u8>) {
        self.seq += 1;
        self.wire.push(Reverse(InFlight {
            at: self.now + self.latency,
            seq: self.seq,
            from,
            to,
            payload,
            tcp: true,
        }));
    }
}

//! The simulated NAT routers: the lab's kinds of mapping and filtering.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

/// The NAT in front of an agent (the lab's kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// No NAT: the agent's address is public.
    Public,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    Home,
    /// A new mapping per destination, address-and-port-dependent filtering.
    Symmetric,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Like [`NatKind::Symmetric`] (which allocates ports in sequence), but each new mapping
    /// gets a random free port of `1024..=65535` (nftables `masquerade random`).
    SymmetricRandom,
}

pub(super) struct Router {
    pub(super) public: Ipv4Addr,
    pub(super) kind: NatKind,
    pub(super) next_port: u16,
    /// (inside, destination for symmetric mapping) → public port.
    pub(super) out: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    pub(super) inside: HashMap<u16, SocketAddr>,
    /// (public port, remote) pairs the inside has sent to.
    pub(super) sent: HashSet<(u16, SocketAddr)>,
    /// The random port generator's state ([`NatKind::SymmetricRandom`]).
    pub(super) random: u64,
}

impl Router {
    pub(super) fn map_out(&mut self, inside: SocketAddr, to: SocketAddr) -> SocketAddr {
        let symmetric = matches!(self.kind, NatKind::Symmetric | NatKind::SymmetricRandom);
        let key = (inside, symmetric.then_some(to));
        let port = match self.out.get(&key) {
            Some(p) => *p,
            None => {
                let port = self.fresh_port();
                self.out.insert(key, port);
                self.inside.insert(port, inside);
                port
            }
        };
        self.sent.insert((port, to));
        SocketAddr::new(self.public.into(), port)
    }

    /// The next port in sequence, or a random free one (xorshift on `next_port`'s state).
    fn fresh_port(&mut self) -> u16 {
        if self.kind != NatKind::SymmetricRandom {
            self.next_port += 1;
            return self.next_port;
        }
        loop {
            let mut x = self.random;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.random = x;
            let port = 1024 + (x % 64_512) as u16;
            if !self.inside.contains_key(&port) {
                return port;
            }
        }
    }

    pub(super) fn map_in(&self, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        let inside = self.inside.get(&port)?;
        match self.kind {
            NatKind::FullCone | NatKind::Public => Some(*inside),
            NatKind::Home | NatKind::Symmetric | NatKind::SymmetricRandom => {
                self.sent.contains(&(port, from)).then_some(*inside)
            }
            NatKind::Restricted => self
                .sent
                .iter()
                .any(|(p, to)| *p == port && to.ip() == from.ip())
                .then_some(*inside),
        }
    }
}

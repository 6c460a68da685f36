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
}

impl Router {
    pub(super) fn map_out(&mut self, inside: SocketAddr, to: SocketAddr) -> SocketAddr {
        let key = (inside, (self.kind == NatKind::Symmetric).then_some(to));
        let port = match self.out.get(&key) {
            Some(p) => *p,
            None => {
                self.next_port += 1;
                self.out.insert(key, self.next_port);
                self.inside.insert(self.next_port, inside);
                self.next_port
            }
        };
        self.sent.insert((port, to));
        SocketAddr::new(self.public.into(), port)
    }

    pub(super) fn map_in(&self, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        let inside = self.inside.get(&port)?;
        match self.kind {
            NatKind::FullCone | NatKind::Public => Some(*inside),
            NatKind::Home | NatKind::Symmetric => {
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

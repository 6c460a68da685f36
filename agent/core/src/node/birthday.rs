//! The node's side of birthday punching ([`crate::birthday`]): arming an attempt on a
//! coordinated punch when the NAT reports call for one, its side sockets as [`SideOp`]s, the
//! prober's probes through the puncher, and the opener's proof as a direct path.

use std::net::SocketAddr;
use std::time::Instant;

use rally_proto::probe::{peek_from, Probe};
use rally_proto::Key32;

use super::peer::PeerState;
use super::{DropReason, Node, NodeEvent, Received, SideOp, SideSocket};
use crate::birthday::{BirthdayOut, Role, MAX_CONCURRENT};

/// A pair that had to wait for other attempts asks for a coordinated punch this much later
/// (an attempt lasts 11.3 s).
const DEFER: std::time::Duration = std::time::Duration::from_secs(15);

impl Node {
    /// The role the NAT reports give this agent towards `p` (none: no birthday punching).
    pub(super) fn birthday_role(&self, p: &PeerState) -> Option<Role> {
        Role::decide(self.nat.as_ref(), p.info.nat.as_ref())
    }

    /// A coordinated punch towards `id` starts at `start`: arm an attempt after it.
    pub(super) fn arm_birthday(&mut self, id: Key32, start: Instant) {
        let Some(p) = self.peers.get(&id) else {
            return;
        };
        let role = if p.direct.is_none() {
            self.birthday_role(p)
        } else {
            None
        };
        let busy = self
            .peers
            .iter()
            .filter(|(other, q)| **other != id && q.birthday.is_busy())
            .count();
        if let Some(p) = self.peers.get_mut(&id) {
            if role.is_some() && busy >= MAX_CONCURRENT {
                p.birthday.defer(start + DEFER);
                return;
            }
            p.birthday.arm(start, role);
        }
    }

    /// A datagram on birthday side socket `n` of the peer with short id `peer`: only its
    /// authenticated probes count.
    pub(super) fn handle_birthday_datagram<'a>(
        &mut self,
        peer: [u8; 8],
        n: u16,
        from: SocketAddr,
        d: &[u8],
        now: Instant,
    ) -> Received<'a> {
        let Some(&id) = self.by_short.get(&peer) else {
            return Received::Dropped(DropReason::UnknownShortId);
        };
        if peek_from(d).ok() != Some(peer) {
            return Received::Dropped(DropReason::BadProbe);
        }
        let Some(p) = self.peers.get_mut(&id) else {
            return Received::Dropped(DropReason::UnknownShortId);
        };
        let Ok(probe) = Probe::decode(d, &p.paths.key()) else {
            return Received::Dropped(DropReason::BadProbe);
        };
        p.birthday.handle_probe(n, from, probe, now);
        self.touch(id);
        Received::Handled
    }
}

/// Performs one output of a peer's birthday machine; side-socket operations go to `side`,
/// a retry's punch request to `events`.
pub(super) fn apply(
    id: Key32,
    p: &mut PeerState,
    out: BirthdayOut,
    side: &mut std::collections::VecDeque<SideOp>,
    events: &mut std::collections::VecDeque<NodeEvent>,
) {
    let socket = |n| SideSocket::Birthday { peer: p.short, n };
    match out {
        BirthdayOut::SideSend {
            socket: n,
            to,
            payload,
        } => side.push_back(SideOp::Send {
            socket: socket(n),
            to,
            payload: payload.to_vec(),
        }),
        BirthdayOut::Close(n) => side.push_back(SideOp::Close(socket(n))),
        BirthdayOut::Carry { socket: n, to } => side.push_back(SideOp::Carry {
            socket: socket(n),
            to,
        }),
        BirthdayOut::Probe(to) => p.paths.probe_extra(to),
        BirthdayOut::Proven(to) => p.paths.prove_external(to),
        BirthdayOut::WantPunch => {
            if p.direct.is_none() {
                events.push_back(NodeEvent::WantPunch(id));
            }
        }
    }
}

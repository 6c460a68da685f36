//! Side sockets: short-lived UDP sockets of the agent besides its one main socket, opened by
//! the driver on the first datagram the node asks it to send from one and closed when the node
//! says so. The netcheck uses one to test its NAT's filtering on a mapping of its own.

use std::net::SocketAddr;
use std::time::Instant;

use rally_proto::stun::BindingResponse;

use super::{DropReason, Node, Received};

/// Which side socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SideSocket {
    /// The netcheck's (see [`crate::netcheck`]).
    Netcheck,
    /// Birthday punching's socket `n` towards the peer with short id `peer`
    /// (see [`crate::birthday`]).
    Birthday { peer: [u8; 8], n: u16 },
}

/// What the driver does with side sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideOp {
    /// Send from `socket` (bound on an ephemeral port of every address the first time).
    Send {
        socket: SideSocket,
        to: SocketAddr,
        payload: Vec<u8>,
    },
    /// Close `socket`; later datagrams for it are not wanted.
    Close(SideSocket),
    /// From now on send every datagram for `to` (the peer's direct path) from `socket`, and
    /// handle what `socket` receives as if it came on the main socket, until it is closed.
    Carry { socket: SideSocket, to: SocketAddr },
}

impl Node {
    /// The next side-socket operation for the driver.
    pub fn poll_side(&mut self) -> Option<SideOp> {
        self.flush();
        crate::outputs::pop(&mut self.relays.side)
    }

    /// A datagram that arrived on a side socket.
    pub fn handle_side_datagram<'a>(
        &mut self,
        socket: SideSocket,
        from: SocketAddr,
        d: &[u8],
        now: Instant,
    ) -> Received<'a> {
        self.now = now;
        match socket {
            SideSocket::Netcheck => {
                let handled = match (&mut self.relays.netcheck, BindingResponse::decode(d)) {
                    (Some(n), Ok(resp)) => n.handle_response(resp, true, now),
                    _ => false,
                };
                if !handled {
                    return Received::Dropped(DropReason::StrayStun);
                }
                self.finish_netcheck(now);
                Received::Handled
            }
            SideSocket::Birthday { peer, n } => {
                self.handle_birthday_datagram(peer, n, from, d, now)
            }
        }
    }
}

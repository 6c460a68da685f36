//! The engine's side sockets ([`SideOp`] from the node): each bound on an ephemeral port the
//! first time the node sends from it, read by a task on the data plane's I/O thread into one
//! channel (which the engine's loop polls), written by the engine's thread directly, and closed
//! (its task ended) when the node says so or the engine stops.
//!
//! A birthday-punching socket that connected **carries** its peer's direct path
//! ([`SideOp::Carry`]): the engine sends everything for that address from it
//! ([`SideSockets::carrier`]) and handles what it receives like the main socket's datagrams.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::task::{Context, Poll};

use rally_agent_core::node::{SideOp, SideSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

/// Datagrams read per side socket are no larger (STUN answers are far smaller).
const MAX_DATAGRAM: usize = 1500;
/// Datagrams waiting for the engine, over all side sockets; more are dropped.
const QUEUE: usize = 256;

/// A datagram that arrived on a side socket.
pub struct SideDatagram {
    pub socket: SideSocket,
    pub from: SocketAddr,
    pub payload: Vec<u8>,
}

pub struct SideSockets {
    open: HashMap<SideSocket, (Arc<UdpSocket>, JoinHandle<()>)>,
    /// Direct addresses whose datagrams leave from a side socket.
    carried: HashMap<SocketAddr, (SideSocket, Arc<UdpSocket>)>,
    tx: mpsc::Sender<SideDatagram>,
    rx: mpsc::Receiver<SideDatagram>,
}

impl Default for SideSockets {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        SideSockets {
            open: HashMap::new(),
            carried: HashMap::new(),
            tx,
            rx,
        }
    }
}

impl SideSockets {
    /// Performs one operation of the node's; a socket that cannot be bound is logged and the
    /// datagram dropped (the netcheck then reports what it could not test as `unknown`).
    pub fn apply(&mut self, op: SideOp) {
        match op {
            SideOp::Send {
                socket,
                to,
                payload,
            } => {
                let Some(s) = self.socket(socket, to) else {
                    return;
                };
                if let Err(e) = rally_udp::send_to(&s, &payload, to) {
                    debug!(?socket, %to, "side socket send: {e}");
                }
            }
            SideOp::Close(socket) => {
                if let Some((_, task)) = self.open.remove(&socket) {
                    task.abort();
                }
                self.carried.retain(|_, (s, _)| *s != socket);
            }
            SideOp::Carry { socket, to } => {
                if let Some((s, _)) = self.open.get(&socket) {
                    debug!(?socket, %to, "side socket carries the direct path");
                    self.carried.insert(to, (socket, s.clone()));
                }
            }
        }
    }

    /// The side socket that carries datagrams to `to`, if one does.
    pub fn carrier(&self, to: &SocketAddr) -> Option<&Arc<UdpSocket>> {
        if self.carried.is_empty() {
            return None;
        }
        self.carried.get(to).map(|(_, s)| s)
    }

    /// Whether `socket` carries a direct path (its datagrams are the main socket's kind).
    pub fn is_carrying(&self, socket: SideSocket) -> bool {
        !self.carried.is_empty() && self.carried.values().any(|(s, _)| *s == socket)
    }

    fn socket(&mut self, socket: SideSocket, to: SocketAddr) -> Option<Arc<UdpSocket>> {
        if let Some((s, _)) = self.open.get(&socket) {
            return Some(s.clone());
        }
        let any: SocketAddr = if to.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        // The engine's thread writes the socket; a task on the I/O thread reads a twin of it
        // (the same socket, registered with that thread's runtime).
        let bound = UdpSocket::bind(any).and_then(|s| {
            s.set_nonblocking(true)?;
            let reader = tokio::net::UdpSocket::from_std(s.try_clone()?)?;
            Ok((Arc::new(s), reader))
        });
        let (s, reader) = match bound {
            Ok(pair) => pair,
            Err(e) => {
                debug!(?socket, "side socket bind: {e}");
                return None;
            }
        };
        let tx = self.tx.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let Ok((n, from)) = reader.recv_from(&mut buf).await else {
                    return;
                };
                let d = SideDatagram {
                    socket,
                    from,
                    payload: buf[..n].to_vec(),
                };
                // A full queue drops the datagram: the node retransmits what it needs.
                let _ = tx.try_send(d);
            }
        });
        self.open.insert(socket, (s.clone(), task));
        Some(s)
    }

    /// The next datagram from any side socket, if one is waiting; otherwise `cx`'s waker is
    /// woken when one arrives.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<SideDatagram>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for SideSockets {
    fn drop(&mut self) {
        for (_, (_, task)) in self.open.drain() {
            task.abort();
        }
    }
}

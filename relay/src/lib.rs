//! Rally's relay: a STUN server (RFC 8489, with RFC 5780's alternate port) and authenticated
//! packet forwarding between agents that share a party, on one UDP port.
//!
//! - [`core`] is the protocol as a sans-IO state machine ([`Relay`]): datagrams and the time in,
//!   [`Action`]s out. Everything the relay decides is decided there and tested there.
//! - [`server`] binds the sockets, runs the forwarding thread (`forwarder`: an `epoll` loop
//!   that owns the sockets and the core and performs the actions) and serves the metrics from
//!   the caller's tokio runtime.
//! - [`coalesce`] decides when the forwarding thread puts off its next wake-up so that busy
//!   traffic is read and sent in larger batches.
//! - [`tcp`] carries relay sessions over TLS 1.3 on TCP (`--listen-tcp`) with the same core,
//!   [`tls`] its certificate (self-signed over a pinned key, or an operator's).
//! - [`metrics`] renders [`Stats`] as Prometheus text.

#![warn(missing_docs)]

pub mod coalesce;
pub mod core;
pub mod metrics;
pub mod server;

pub mod tcp;
pub mod tls;

mod clock;
mod forwarder;

mod cookie;
pub use crate::cookie::COOKIE_BUCKET;
pub use crate::core::{Action, Config, DropReason, Limits, Relay, Stats, Transmit, Transport, Via};
pub use crate::server::{Options, ServeError, Server};

//! Rally's relay: a STUN server (RFC 8489, with RFC 5780's alternate port) and authenticated
//! packet forwarding between agents that share a party, on one UDP port.
//!
//! - [`core`] is the protocol as a sans-IO state machine ([`Relay`]): datagrams and the time in,
//!   [`Action`]s out. Everything the relay decides is decided there and tested there.
//! - [`server`] is the thin tokio driver: it owns the sockets, the timer and the metrics
//!   listener, and performs the actions.
//! - [`metrics`] renders [`Stats`] as Prometheus text.

#![warn(missing_docs)]

pub mod core;
pub mod metrics;
pub mod server;

mod cookie;
mod limit;

pub use crate::cookie::COOKIE_BUCKET;
pub use crate::core::{
    Action, Config, DropReason, Limits, Relay, Stats, Transmit, Via, SWEEP_INTERVAL,
};
pub use crate::server::{Options, ServeError, Server};

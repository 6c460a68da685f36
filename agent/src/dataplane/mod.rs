//! The packet path: one UDP socket, one TUN device, a WireGuard tunnel per peer, driving the
//! sans-IO [`crate::node::Node`].

pub mod batch;
pub mod demux;
mod discovery;
pub mod engine;
pub mod handshake_guard;
pub mod inbound;
pub mod restart;
mod rx;
pub mod security;
mod side;
mod status;
pub mod timers;
pub mod tunnel;
mod tx;
pub mod wg_cookie;

pub use engine::{Engine, EngineCmd, EngineConfig, EngineEvent, EngineHandle, PeerStatus};

//! The packet path: one UDP socket, one TUN device, a WireGuard tunnel per peer.

pub mod batch;
pub mod demux;
pub mod engine;
pub mod handshake_guard;
pub mod inbound;
pub mod restart;
pub mod security;
pub mod tunnel;
pub mod wg_cookie;

pub use engine::{Engine, EngineCmd, EngineConfig, EngineEvent, EngineHandle, PeerStatus};

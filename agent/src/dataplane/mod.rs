//! The packet path: one UDP socket, one TUN device, a WireGuard tunnel per peer, driving the
//! sans-IO [`crate::node::Node`]. The checks of what arrives (datagram kinds, the handshake
//! guard, the inbound destination filter) are sans-IO too, in `rally-agent-core`, under the
//! paths the data plane has always used.

pub use rally_agent_core::{demux, handshake_guard, inbound, wg_cookie};

mod activity;
pub mod batch;
mod device;
mod discovery;
pub mod engine;
mod path_timing;
mod poller;
pub mod queue_metrics;
mod queues;
pub mod relay_tcp;
pub mod relay_tls;
mod relay_twin;
pub mod restart;
mod rx;
pub mod security;
mod side;
mod status;
mod techniques;
mod thread_sched;
pub mod timers;
pub mod tunnel;
mod tx;

pub use engine::{Engine, EngineCmd, EngineConfig, EngineEvent, EngineHandle, PeerStatus};

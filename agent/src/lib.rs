//! Rally's agent: the engine behind `rally up` and the client side of the CLI.

// The sans-IO core, under the paths the rest of the agent has always used.
pub use rally_agent_core::{backoff, conn, netcheck, node, outputs, paths, relay_client};

pub mod api;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod discovery;
pub mod events;
pub mod ipc;
pub mod metrics;
pub mod netinfo;
pub mod netwatch;
pub mod portmap;
pub mod state;

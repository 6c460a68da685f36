//! Rally's agent: the engine behind `rally up` and the client side of the CLI.

pub mod api;
pub mod backoff;
pub mod conn;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod ipc;
pub mod metrics;
pub mod netcheck;
pub mod netinfo;
pub mod netwatch;
pub mod outputs;
pub mod paths;
pub mod relay_client;
pub mod state;

//! Rally's agent core: everything the agent decides, with no clock, socket, RNG or task below
//! this line (enforced by `clippy.toml`). [`node::Node`] owns the peers' connection managers
//! ([`conn`]), hole punchers ([`paths`]), relay clients ([`relay_client`]) and NAT detection
//! ([`netcheck`]); the engine in `rally-agent` drives it with datagrams and time and performs
//! the transmits it returns.

pub mod backoff;
pub mod conn;
pub mod discovery;
pub mod netcheck;
pub mod node;
pub mod outputs;
pub mod paths;
pub mod relay_client;

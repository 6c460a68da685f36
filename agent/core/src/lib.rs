//! Rally's agent core: everything the agent decides, with no clock, socket, RNG or task below
//! this line (enforced by `clippy.toml`). [`node::Node`] owns the peers' connection managers
//! ([`conn`]), hole punchers ([`paths`]), relay clients ([`relay_client`]) and NAT detection
//! ([`netcheck`]); the engine in `rally-agent` drives it with datagrams and time and performs
//! the transmits it returns. In front of the tunnels, the data plane's checks of what arrives
//! are here too: [`demux`] tells datagrams apart, [`handshake_guard`] (with WireGuard's mac1,
//! mac2 and cookies in [`wg_cookie`]) stands before every handshake's Diffie-Hellman, and
//! [`inbound`] admits decrypted packets only to this agent's virtual IP.

pub mod aqm;
pub mod aqm_fq;
pub mod aqm_trace;
pub mod backoff;
pub mod birthday;
pub mod conn;
pub mod demux;
pub mod discovery;
pub mod handshake_guard;
pub mod inbound;
pub mod netcheck;
pub mod node;
pub mod outputs;
pub mod paths;
pub mod relay_client;
pub mod wg_cookie;
#[cfg(test)]
mod wg_testing;

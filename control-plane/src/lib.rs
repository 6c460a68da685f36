//! Rally's control plane: registers agents, keeps parties and invites, introduces peers.

pub mod directory;
pub mod hub;
pub mod invites;
pub use rally_proto::keyfile;
pub mod lock;
pub mod metrics;
pub mod names;
pub mod outbox;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod tcp;
pub mod tls;
pub mod udp;

use std::path::{Path, PathBuf};

/// The control plane's identity key inside its data directory.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.key")
}

/// The SQLite database inside the data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.db")
}

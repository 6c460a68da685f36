//! The agent's state directory: keys (0600, atomic writes, refused when readable by others),
//! the control plane it belongs to, and the last registration.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rally_proto::{Identity, Key32, PeerInfo};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rally";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is readable by other users (mode {1:03o}); refusing to use it. Fix with: chmod 600 {0}")]
    KeyPermissions(String, u32),
    #[error("{0} is damaged (expected a 32-byte key)")]
    KeyCorrupt(String),
    #[error("{0} is damaged: {1}")]
    FileCorrupt(String, String),
}

/// The agent's long-lived keys.
pub struct Keys {
    /// Signs everything the agent says to the control plane and relays.
    pub identity: Identity,
    /// The x25519 WireGuard static secret.
    pub wireguard: [u8; 32],
}

impl Keys {
    pub fn wg_public(&self) -> Key32 {
        let secret = boringtun::x25519::StaticSecret::from(self.wireguard);
        Key32(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }
}

/// The control plane this agent belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlTarget {
    pub addr: String,
    pub key: Key32,
}

/// What the agent remembers between runs besides its keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Saved {
    pub control: Option<ControlTarget>,
    pub virtual_ip: Option<Ipv4Addr>,
}

pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn socket_path(&self) -> PathBuf {
        self.path.join("rally.sock")
    }

    /// Creates the directory with mode 0700 if it is missing.
    pub fn ensure(&self) -> Result<(), StateError> {
        if !self.path.exists() {
            fs::create_dir_all(&self.path).map_err(io(&self.path))?;
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
                .map_err(io(&self.path))?;
        }
        Ok(())
    }

    /// Loads both keys, creating any that are missing.
    pub fn load_or_create_keys(&self) -> Result<Keys, StateError> {
        let identity = Identity::from_seed(self.key("identity.key")?);
        let wireguard = self.key("wireguard.key")?;
        Ok(Keys {
            identity,
            wireguard,
        })
    }

    fn key(&self, name: &str) -> Result<[u8; 32], StateError> {
        let path = self.path.join(name);
        match fs::metadata(&path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(StateError::KeyPermissions(path.display().to_string(), mode));
                }
                let bytes = fs::read(&path).map_err(io(&path))?;
                bytes
                    .try_into()
                    .map_err(|_| StateError::KeyCorrupt(path.display().to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                OsRng.fill_bytes(&mut key);
                write_atomic(&path, &key)?;
                Ok(key)
            }
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }

    pub fn load_saved(&self) -> Result<Saved, StateError> {
        let path = self.path.join("agent.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StateError::FileCorrupt(path.display().to_string(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }

    /// The last peer map the control plane sent, so tunnels come back without it.
    pub fn load_peers(&self) -> Result<Vec<PeerInfo>, StateError> {
        let path = self.path.join("peers.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StateError::FileCorrupt(path.display().to_string(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(StateError::Io { path, source: e }),
        }
    }

    pub fn store_peers(&self, peers: &[PeerInfo]) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(peers)
            .map_err(|e| StateError::FileCorrupt("peers.json".into(), e.to_string()))?;
        write_atomic(&self.path.join("peers.json"), &bytes)
    }

    pub fn store_saved(&self, saved: &Saved) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(saved)
            .map_err(|e| StateError::FileCorrupt("agent.json".into(), e.to_string()))?;
        write_atomic(&self.path.join("agent.json"), &bytes)
    }
}

/// Writes a file (mode 0600) through a temporary file, fsync and rename, so a crash leaves
/// either the old or the new contents.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_and_reloaded_equal() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path().join("state"));
        s.ensure().unwrap();
        let a = s.load_or_create_keys().unwrap();
        let b = s.load_or_create_keys().unwrap();
        assert_eq!(a.identity.public(), b.identity.public());
        assert_eq!(a.wireguard, b.wireguard);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(s.path()), 0o700);
        assert_eq!(mode(&s.path().join("identity.key")), 0o600);
        assert_eq!(mode(&s.path().join("wireguard.key")), 0o600);
    }

    #[test]
    fn key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.load_or_create_keys().unwrap();
        let key = dir.path().join("identity.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = s.load_or_create_keys().err().unwrap();
        assert!(matches!(err, StateError::KeyPermissions(_, 0o644)), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn damaged_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("identity.key"), b"short").unwrap();
        let err = StateDir::new(dir.path())
            .load_or_create_keys()
            .err()
            .unwrap();
        assert!(matches!(err, StateError::KeyCorrupt(_)));
    }

    #[test]
    fn saved_state_round_trips_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        assert!(s.load_saved().unwrap().control.is_none());
        let saved = Saved {
            control: Some(ControlTarget {
                addr: "198.51.100.1:7443".into(),
                key: Key32([1; 32]),
            }),
            virtual_ip: Some(Ipv4Addr::new(10, 66, 1, 2)),
        };
        s.store_saved(&saved).unwrap();
        assert_eq!(s.load_saved().unwrap().control, saved.control);
        fs::write(dir.path().join("agent.json"), b"{").unwrap();
        assert!(matches!(s.load_saved(), Err(StateError::FileCorrupt(..))));
    }
}

//! The agent's state directory: keys (0600, atomic writes, refused when readable by others),
//! the control plane it belongs to, and the last registration.
//!
//! Nothing here trusts what it finds: the directory must belong to the agent's user (one that
//! others can write or read is repaired to 0700 first); every file is opened without following
//! a symbolic link and must belong to the agent's user; key files must not be readable by
//! anyone else. Every file is written by [`write_atomic`] alone.

use std::fs;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rally_proto::{Identity, Key32, PeerInfo};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rally";
/// The largest state file read back (the peer cache of a very large party fits many times).
const MAX_FILE_LEN: u64 = 64 * 1024 * 1024;

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
    #[error("{path} belongs to uid {owner}, not to this user (uid {uid}); refusing to use it")]
    NotOwned { path: String, owner: u32, uid: u32 },
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("{0} is not a regular file (a symbolic link?); refusing to use it")]
    NotAFile(String),
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

    /// Creates the directory (mode 0700) if it is missing; refuses one that belongs to another
    /// user, and takes away every permission of group and others from one that has any.
    pub fn ensure(&self) -> Result<(), StateError> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&self.path)(e)),
        }
        // Checked and repaired through one descriptor, so the path cannot be swapped between.
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOTDIR) => StateError::NotADirectory(self.path.display().to_string()),
                _ => io(&self.path)(e),
            })?;
        let meta = dir.metadata().map_err(io(&self.path))?;
        check_owner(&self.path, &meta)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            dir.set_permissions(fs::Permissions::from_mode(0o700))
                .map_err(io(&self.path))?;
            warn!(
                dir = %self.path.display(),
                "the state directory was open to other users (mode {mode:03o}); it is 0700 now"
            );
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
        match read_private(&path, true)? {
            Some(bytes) => bytes
                .try_into()
                .map_err(|_| StateError::KeyCorrupt(path.display().to_string())),
            None => {
                let mut key = [0u8; 32];
                OsRng.fill_bytes(&mut key);
                write_atomic(&path, &key)?;
                Ok(key)
            }
        }
    }

    pub fn load_saved(&self) -> Result<Saved, StateError> {
        let path = self.path.join("agent.json");
        match read_private(&path, false)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StateError::FileCorrupt(path.display().to_string(), e.to_string())),
            None => Ok(Saved::default()),
        }
    }

    /// The last peer map the control plane sent, so tunnels come back without it.
    pub fn load_peers(&self) -> Result<Vec<PeerInfo>, StateError> {
        let path = self.path.join("peers.json");
        match read_private(&path, false)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StateError::FileCorrupt(path.display().to_string(), e.to_string())),
            None => Ok(Vec::new()),
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
/// either the old or the new contents. The temporary file is created anew (`O_EXCL`, never
/// through a symbolic link): whatever was left or planted at its name is removed first.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let create = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
    };
    let mut f = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // unlink(2) removes a link itself, never what it points to.
            fs::remove_file(&tmp).map_err(io(&tmp))?;
            create().map_err(io(&tmp))?
        }
        other => other.map_err(io(&tmp))?,
    };
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

/// Reads a state file (`None` if it does not exist) without following a symbolic link; it must
/// be a regular file of this user, and a `key` one not readable by anyone else.
fn read_private(path: &Path, key: bool) -> Result<Option<Vec<u8>>, StateError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(StateError::NotAFile(path.display().to_string()))
        }
        Err(e) => return Err(io(path)(e)),
    };
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(StateError::NotAFile(path.display().to_string()));
    }
    check_owner(path, &meta)?;
    let mode = meta.mode() & 0o777;
    if key && mode & 0o077 != 0 {
        return Err(StateError::KeyPermissions(path.display().to_string(), mode));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(StateError::FileCorrupt(
            path.display().to_string(),
            format!("larger than {MAX_FILE_LEN} bytes"),
        ));
    }
    Ok(Some(bytes))
}

/// Refuses what does not belong to the user the agent runs as.
fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), StateError> {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(StateError::NotOwned {
            path: path.display().to_string(),
            owner: meta.uid(),
            uid,
        });
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

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Gives `path` to an unprivileged uid (the tests run as root, as CI does).
    fn give_away(path: &Path) {
        std::os::unix::fs::lchown(path, Some(4242), Some(4242))
            .expect("chown needs root: run the agent's unit tests as root, as CI does");
    }

    #[test]
    fn a_world_writable_state_dir_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o777)).unwrap();
        StateDir::new(&path).ensure().unwrap();
        assert_eq!(mode(&path), 0o700);
    }

    #[test]
    fn a_state_dir_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        give_away(&path);
        let err = StateDir::new(&path).ensure().unwrap_err();
        assert!(
            matches!(err, StateError::NotOwned { owner: 4242, .. }),
            "{err}"
        );
        assert_eq!(err.to_string().lines().count(), 1);
        assert!(err.to_string().contains("refusing"), "{err}");
    }

    #[test]
    fn a_state_path_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        fs::write(&path, b"x").unwrap();
        let err = StateDir::new(&path).ensure().unwrap_err();
        assert!(matches!(err, StateError::NotADirectory(_)), "{err}");
    }

    #[test]
    fn a_symlink_planted_at_the_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let s = StateDir::new(&state);
        s.ensure().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, state.join("identity.tmp")).unwrap();

        s.load_or_create_keys().unwrap();

        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let key = state.join("identity.key");
        assert!(fs::symlink_metadata(&key).unwrap().file_type().is_file());
        assert_eq!(fs::read(&key).unwrap().len(), 32);
        assert_eq!(mode(&key), 0o600);
        assert!(!state.join("identity.tmp").exists());
    }

    #[test]
    fn a_stale_temporary_file_does_not_stop_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json");
        fs::write(dir.path().join("agent.tmp"), b"left by a crash").unwrap();
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{}");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_key_file_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.load_or_create_keys().unwrap();
        give_away(&dir.path().join("wireguard.key"));
        let err = s.load_or_create_keys().err().unwrap();
        assert!(
            matches!(err, StateError::NotOwned { owner: 4242, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_key_file_that_is_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.key");
        write_atomic(&elsewhere, &[1; 32]).unwrap();
        let state = dir.path().join("state");
        StateDir::new(&state).ensure().unwrap();
        std::os::unix::fs::symlink(&elsewhere, state.join("identity.key")).unwrap();
        let err = StateDir::new(&state).load_or_create_keys().err().unwrap();
        assert!(matches!(err, StateError::NotAFile(_)), "{err}");
    }

    #[test]
    fn saved_state_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.store_saved(&Saved::default()).unwrap();
        give_away(&dir.path().join("agent.json"));
        assert!(matches!(s.load_saved(), Err(StateError::NotOwned { .. })));
    }
}

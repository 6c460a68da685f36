//! Secret key files (the control plane's, a relay's TLS key): 32 secret bytes, mode 0600, written
//! atomically.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is readable by other users (mode {1:o}); run: chmod 600 {0}")]
    Permissions(String, u32),
    #[error("{0} is not a key file (expected 32 bytes)")]
    Corrupt(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a 32-byte key, refusing a file that group or others may read.
pub fn read(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions(path.display().to_string(), mode));
    }
    let bytes = fs::read(path).map_err(io(path))?;
    bytes
        .try_into()
        .map_err(|_| KeyFileError::Corrupt(path.display().to_string()))
}

/// Writes `key` to `path` (mode 0600) through a temporary file and a rename.
pub fn write(path: &Path, key: &[u8; 32]) -> Result<(), KeyFileError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(key).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn private_dir(dir: &Path) -> Result<(), KeyFileError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

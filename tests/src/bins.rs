//! Locating the binaries under test (`rally`, `rally-control`, …) in the cargo target dir.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Environment variable naming the directory that holds the binaries under test.
pub const BIN_DIR_ENV: &str = "RALLY_BIN_DIR";

/// The directory holding the workspace's binaries: `$RALLY_BIN_DIR` if set, else derived from
/// the running executable (`target/debug/deps/<test>` or `target/debug/rally-lab`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("finding the running executable")?;
    dir_from_exe(&exe)
}

/// The binaries' directory for an executable at `exe`: its directory, or that directory's parent
/// when it is cargo's `deps/` (where test binaries live).
pub fn dir_from_exe(exe: &Path) -> Result<PathBuf> {
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("executable {} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(up) = dir.parent() {
            return Ok(up.to_path_buf());
        }
    }
    Ok(dir.to_path_buf())
}

/// The path of binary `name`, failing with a clear message if it has not been built.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary `{name}` not found at {}: run `cargo build --workspace` first \
             (or point {BIN_DIR_ENV} at the directory holding it)",
            path.display()
        );
    }
    Ok(path)
}

/// The agent binary, `rally`.
pub fn rally() -> Result<PathBuf> {
    bin_path("rally")
}

/// The control-plane binary, `rally-control`.
pub fn rally_control() -> Result<PathBuf> {
    bin_path("rally-control")
}

/// The lab's own binary, `rally-lab` (its `stun-server`, `stun-probe`, `udp-send`).
pub fn rally_lab() -> Result<PathBuf> {
    bin_path("rally-lab")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_binaries_in_deps_use_the_parent_dir() {
        let dir =
            dir_from_exe(Path::new("/w/target/debug/deps/skeleton-0123abcd")).expect("has parent");
        assert_eq!(dir, Path::new("/w/target/debug"));
    }

    #[test]
    fn plain_binaries_use_their_own_dir() {
        let dir = dir_from_exe(Path::new("/w/target/debug/rally-lab")).expect("has parent");
        assert_eq!(dir, Path::new("/w/target/debug"));
    }

    #[test]
    fn missing_binary_names_the_file_and_the_fix() {
        let err = bin_path("no-such-rally-binary").expect_err("must be missing");
        let msg = format!("{err:#}");
        assert!(msg.contains("no-such-rally-binary"), "{msg}");
        assert!(msg.contains("cargo build --workspace"), "{msg}");
    }
}

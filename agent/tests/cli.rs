//! The `rally` binary's exit statuses (DESIGN.md "CLI contract"): 0 on success, 1 on a runtime
//! error with one line on stderr, 2 on a usage error. No daemon is needed for these.

use std::process::{Command, Output};

fn rally(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    Command::new(env!("CARGO_BIN_EXE_rally"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(args)
        .env_remove("RALLY_STATE_DIR")
        .output()
        .expect("running rally")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn clap_usage_errors_exit_2() {
    for args in [
        &["no-such-command"][..],
        &["status", "--no-such-flag"],
        &["ping"],
        &["ping", "bob", "-c", "0"],
        &["ping", "bob", "--interval", "0"],
        &["party", "create", "bad name!"],
        &["up", "--name", ""],
        &["up", "--control", "198.51.100.1:7443"],
    ] {
        let out = rally(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} printed nothing");
    }
}

#[test]
fn help_and_version_exit_0() {
    for args in [&["--help"][..], &["--version"], &["party", "--help"]] {
        let out = rally(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_runtime_error_is_one_line_and_exits_1() {
    for args in [&["status"][..], &["peers", "--json"], &["down"]] {
        let out = rally(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("not running"), "{args:?}: {err}");
    }
}

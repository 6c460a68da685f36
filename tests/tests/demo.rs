//! The README's first command: `scripts/demo.sh` builds the workspace and runs `rally-lab demo`,
//! which this test runs as a user would (the binary, its output, its exit status).

use std::process::Command;

use anyhow::{ensure, Context, Result};

#[test]
fn the_demo_connects_every_pair_on_the_route_its_nats_allow() -> Result<()> {
    let out = Command::new(env!("CARGO_BIN_EXE_rally-lab"))
        .arg("demo")
        .output()
        .context("running rally-lab demo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    ensure!(
        out.status.success(),
        "the demo failed ({}):\n{shown}",
        out.status
    );
    for line in [
        "alice (home-router) ↔ bob (symmetric): direct after",
        "alice (home-router) ↔ carol (cgnat): direct after",
        "bob (symmetric) ↔ carol (cgnat): direct after",
        "summary: 6/6 pairs OK",
    ] {
        ensure!(
            stdout.contains(line),
            "the demo never printed {line:?}:\n{shown}"
        );
    }
    // The teardown left nothing behind: no namespace of this run's lab survives it.
    let prefix = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("namespaces "))
        .and_then(|p| p.strip_suffix('*'))
        .with_context(|| format!("the demo never named its namespaces:\n{shown}"))?;
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    let list = String::from_utf8_lossy(&list.stdout);
    ensure!(
        !list.lines().any(|ns| ns.starts_with(prefix)),
        "namespaces of the demo's lab ({prefix}*) survived it:\n{list}"
    );
    Ok(())
}

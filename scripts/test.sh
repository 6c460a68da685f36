#!/usr/bin/env bash
# Runs every check and test: format, lints, unit and property tests, the end-to-end lab
# scenarios (real binaries in network namespaces; needs root) and short fuzz runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The lab starts the real binaries: build them once, in the same target dir as the tests.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast
.ci/fuzz

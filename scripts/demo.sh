#!/usr/bin/env bash
# The lab demo: a control plane and three agents on separate hosts (network namespaces),
# a party joined with one invite code, and pings between every pair. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
exec target/debug/rally-lab demo "$@"

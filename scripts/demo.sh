#!/usr/bin/env bash
# The lab demo: a control plane and two relays on the lab's internet, three agents behind a
# home router, a symmetric NAT and a carrier-grade NAT (network namespaces, nftables), a party
# joined with one invite code, each pair on the route its NATs allow, and pings between every
# pair. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
exec target/debug/rally-lab demo "$@"

#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for Rally's lab and tests. Idempotent.
set -euo pipefail

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
# The lab's port-mapping router (PCP, NAT-PMP and UPnP IGD on nftables).
dpkg-query -W -f='${Status}' miniupnpd-nftables 2>/dev/null | grep -q 'ok installed' ||
  need+=(miniupnpd-nftables)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]} and not root; install them or run as root" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo-nextest >/dev/null 2>&1 || {
  echo "setup: installing cargo-nextest"
  cargo install cargo-nextest --locked
}

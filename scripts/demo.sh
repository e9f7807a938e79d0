#!/usr/bin/env bash
# The local demo: two nodes and an outside host in network namespaces, real daemons, real
# mTLS. Run as root on a Debian or Ubuntu machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh
cargo build --workspace --bins
exec target/debug/ztunnel-demo

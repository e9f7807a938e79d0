#!/usr/bin/env bash
# The local demo: two nodes and an outside host in network namespaces, real daemons, real
# mTLS. Run as root on a Debian or Ubuntu machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh
cargo build --bins -p ztunnel -p ztunnel-cni -p ztunnel-e2e
exec target/debug/ztunnel-demo

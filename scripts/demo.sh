#!/usr/bin/env bash
# The local demo: two nodes and five pods in network namespaces, pods wired by Debian's real
# bridge + host-local CNI plugins with ztunnel-cni chained after them, one ztunnel daemon per
# node with the embedded CA and the local discovery file; real mTLS, shown on the wire.
# Run as root on a Debian or Ubuntu machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh
cargo build --workspace --bins
exec target/debug/ztunnel-demo

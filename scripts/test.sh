#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, documentation links, unit tests,
# in-process end-to-end tests and the network-namespace tests with real daemon processes. Run
# as root (namespaces, nftables). See tests/README.md for the tiers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prereqs.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet
cargo test --workspace --no-fail-fast

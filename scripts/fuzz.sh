#!/usr/bin/env bash
# Fuzzes every target of fuzz/ (cargo-fuzz, libFuzzer) for a set time each, one after
# another, and fails if any of them finds an input that panics, breaks an invariant, runs out
# of memory or hangs. Not part of scripts/test.sh: `cargo test` only replays the committed
# corpus (see tests/README.md, "Fuzzing").
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     # default: 60 s, every target
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# New inputs go to fuzz/work/<target>/ (not committed); crashes to fuzz/artifacts/<target>/.
# FUZZ_SANITIZER picks the sanitizer (default `none`: the code is safe Rust, and without
# ASan the build is faster and each run several times quicker; `address` works too).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi
sanitizer="${FUZZ_SANITIZER:-none}"

cargo +nightly fuzz build -s "$sanitizer"

failed=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t"
    dirs=("work/$t" "corpus/$t")
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    echo "=== fuzzing $t for ${secs}s"
    if ! cargo +nightly fuzz run -s "$sanitizer" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzed ${#targets[@]} targets for ${secs}s each: nothing found"

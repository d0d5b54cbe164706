#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds the fuzz targets of fuzz/ and runs each for N seconds (default 60,
# the first argument overrides) from a scratch copy of its seed corpus
# under target/fuzz/, one target at a time. Fails if any target crashes
# (docs/fuzzing.md). Installs cargo-fuzz if it is missing.
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it take the
# -Z flags cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
targets=(request_parse chain exporter_ops control_line relay_message)
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

echo "== cargo fuzz build (${#targets[@]} targets)"
cargo fuzz build --fuzz-dir fuzz

scratch="$PWD/target/fuzz"
mkdir -p "$scratch"
failed=()
for t in "${targets[@]}"; do
    corpus="$scratch/corpus/$t"
    artifacts="$scratch/artifacts/$t/"
    rm -rf "$corpus"
    mkdir -p "$corpus" "$artifacts"
    cp fuzz/corpus/"$t"/* "$corpus"/
    echo "== $t: ${seconds} s"
    log="$scratch/$t.log"
    if nice -n 10 cargo fuzz run --fuzz-dir fuzz "$t" "$corpus" -- \
        -max_total_time="$seconds" -timeout=30 -artifact_prefix="$artifacts" -print_final_stats=1 \
        >"$log" 2>&1; then
        grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added)' "$log" || true
    else
        echo "$t: CRASH (log: $log, inputs: $artifacts)"
        tail -n 40 "$log"
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "fuzz: crashed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds} s each without a crash"

#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Line coverage of protocol/src and device/src under the workspace's own
# test run (what `cargo test --workspace` runs), measured with
# cargo-tarpaulin's llvm engine; docs/coverage.md has the figures and what
# they count. Installs cargo-tarpaulin if it is missing. Writes JSON, HTML
# and LCOV reports and summary.md (per crate, per folder, least-covered
# files) to target/coverage/report/, and prints the summary.
#
#   COVERAGE_ENGINE=ptrace .ci/coverage.sh   # the fallback engine
#   .ci/coverage.sh -- --skip some_test      # extra arguments for the tests
set -euo pipefail
cd "$(dirname "$0")/.."

TARPAULIN_VERSION=0.37.5
ENGINE=${COVERAGE_ENGINE:-llvm}
TARGET_DIR=target/coverage
OUT=$TARGET_DIR/report

if ! cargo tarpaulin --version >/dev/null 2>&1; then
    echo "== installing cargo-tarpaulin $TARPAULIN_VERSION"
    nice -n 5 cargo install cargo-tarpaulin --locked --version "$TARPAULIN_VERSION"
fi
cargo tarpaulin --version

# Profiles left by an earlier run would be merged into this one.
rm -rf "$TARGET_DIR/tarpaulin/profraws" "$OUT"
mkdir -p "$OUT"

echo "== cargo tarpaulin --engine $ENGINE (tests of the whole workspace)"
start=$(date +%s)
nice -n 5 cargo tarpaulin \
    --engine "$ENGINE" \
    --workspace \
    --locked \
    --skip-clean \
    --target-dir "$TARGET_DIR" \
    --timeout 600 \
    --include-files 'protocol/src/*' 'device/src/*' \
    --out Json --out Html --out Lcov \
    --output-dir "$OUT" \
    "$@"
end=$(date +%s)
echo "== wall time: $((end - start)) s (build and tests)"

python3 - "$OUT/tarpaulin-report.json" "$ENGINE" "$((end - start))" >"$OUT/summary.md" <<'EOF'
import json
import os
import sys

report, engine, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
root = os.getcwd()
files = []
for f in json.load(open(report))["files"]:
    path = os.path.relpath(os.path.join(*f["path"]), root)
    files.append((path, f["covered"], f["coverable"]))


def group(path):
    """protocol/src/codec/x.rs -> protocol/src/codec/; files directly in a
    crate's src/ -> protocol/src/*.rs."""
    parts = path.split("/")
    if len(parts) > 3:
        return "/".join(parts[:3]) + "/"
    return "/".join(parts[:2]) + "/*.rs"


def pct(c, t):
    return f"{100.0 * c / t:.1f}%" if t else "-"


def table(title, rows):
    print(f"| {title} | covered | coverable | % |")
    print("| --- | ---: | ---: | ---: |")
    for name, (c, t) in rows:
        print(f"| {name} | {c} | {t} | {pct(c, t)} |")
    print()


def sums(key):
    out = {}
    for path, c, t in files:
        k = key(path)
        if k is None:
            continue
        a = out.setdefault(k, [0, 0])
        a[0] += c
        a[1] += t
    return sorted(out.items())


print(f"Engine: {engine}; wall time {seconds} s (build and tests).\n")
crates = sums(lambda p: "/".join(p.split("/")[:2]) + "/")
total = [sum(v[0] for _, v in crates), sum(v[1] for _, v in crates)]
table("crate", crates + [("total", total)])
table("folder", sums(group))
least = sorted(files, key=lambda f: (f[1] / f[2] if f[2] else 1.0, -f[2]))[:10]
table("least-covered file", [(p, (c, t)) for p, c, t in least])
EOF
cat "$OUT/summary.md"
echo "== reports: $OUT/ (tarpaulin-report.html, tarpaulin-report.json, lcov.info, summary.md)"

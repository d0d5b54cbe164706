#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Short runs of the reconnect and soak programs against the real daemon
# binary (docs/soak.md has the long runs). Fails if either program fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== build daemon, dmabuf-reconnect, dmabuf-soak (release)"
cargo build --release --locked -p vhost-device-dmabuf -p dmabuf-guest-tests \
    --bin vhost-device-dmabuf --bin dmabuf-reconnect --bin dmabuf-soak

echo "== dmabuf-reconnect --count 30"
target/release/dmabuf-reconnect --count 30

echo "== dmabuf-soak --guests 8 --seconds 20 --seed 1"
target/release/dmabuf-soak --guests 8 --seconds 20 --seed 1

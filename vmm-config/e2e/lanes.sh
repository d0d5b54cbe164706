#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Both QEMU lanes from scratch: host setup (QEMU 10, kernel), QEMU 11 from
# sid, one build of the daemon, the relay and the static runner, then
# lane-qemu10.sh and lane-qemu11.sh; prints each lane's summary and exits
# non-zero if either failed.
#   usage: lanes.sh [10] [11]       (default both; env as lane-lib.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"
source "$here/lane-lib.sh"

t0=$SECONDS
lanes=("$@"); [ $# -gt 0 ] || lanes=(10 11)
"$here/host-setup.sh"
"$here/sid-qemu.sh"
t=$SECONDS
lane_build
log "build: $((SECONDS - t)) s"
export E2E_SKIP_BUILD=1

status=0
for v in "${lanes[@]}"; do
    rm -f "$E2E_DIR/lane-$v/result"
    "$here/lane-qemu$v.sh" || status=1
done

echo "==== e2e lanes ($((SECONDS - t0)) s in all)"
for v in "${lanes[@]}"; do
    cat "$E2E_DIR/lane-$v/result" 2>/dev/null || echo "qemu$v: FAIL (no result)"
done
exit $status

#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# QEMU 10 lane: the daemon (two guests' sockets, no shared memory region)
# behind two vhost-user-gpio-pci stand-ins; the guest runs the whole suite
# (--guests 2), then QEMU is killed while the guest holds state and a third
# boot must be served. Needs host-setup.sh and sid-qemu.sh; see README.md.
#   usage: lane-qemu10.sh           (env: see the header of lane-lib.sh)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/lane-lib.sh"
lane_run 10

# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Shared settings for the e2e scripts; sourced, not run.
# E2E_DIR holds every artefact (kernel, chroot, initramfs, logs).
E2E_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
E2E_DIR=${E2E_DIR:-$E2E_REPO/target/e2e}
mkdir -p "$E2E_DIR"
E2E_DIR=$(cd "$E2E_DIR" && pwd)

log() { printf '[e2e %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The Debian mirror already configured for bookworm on this host.
debian_mirror() {
    awk 'BEGIN { RS = "" }
         /(^|\n)Suites:([^\n]* )?bookworm( |\n|$)/ {
             if (match($0, /(^|\n)URIs: *[^ \n]+/)) {
                 u = substr($0, RSTART, RLENGTH); sub(/.*URIs: */, "", u); print u; exit
             }
         }' /etc/apt/sources.list.d/debian.sources
}

# Prints QEMU's error lines in console log $1; fails when there are none.
# QEMU prefixes its messages with its program name (qemu10, qemu-system-x86_64).
qemu_errors() {
    tr -d '\r' < "$1" | grep -a '^[^ :]*qemu[^ :]*: ' | grep -v ': warning: '
}

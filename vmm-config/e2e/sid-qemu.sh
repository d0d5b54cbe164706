#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Provides QEMU 11 (with vhost-user-test-device-pci) from Debian sid in a
# debootstrap chroot at $E2E_DIR/sid, and two launchers:
#   $E2E_DIR/bin/qemu11  the sid QEMU, run from the host through the chroot's
#                        dynamic loader (no chroot or bind mounts needed, so
#                        host paths and sockets work as usual)
#   $E2E_DIR/bin/qemu10  the system qemu-system-x86_64 (10.x, from host-setup.sh)
# Re-running reuses the chroot.
#   usage: sid-qemu.sh              (env: E2E_DIR)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SID=$E2E_DIR/sid
if [ ! -x "$SID/usr/bin/qemu-system-x86_64" ]; then
    if [ ! -f "$SID/.e2e-bootstrapped" ]; then
        mirror=$(debian_mirror)
        [ -n "$mirror" ] || die "no bookworm entry in debian.sources"
        log "debootstrap sid from $mirror"
        rm -rf "$SID"
        debootstrap --variant=minbase sid "$SID" "$mirror" > "$E2E_DIR/debootstrap.log" 2>&1 \
            || die "debootstrap failed, see $E2E_DIR/debootstrap.log"
        touch "$SID/.e2e-bootstrapped"
    fi
    install() {
        chroot "$SID" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends qemu-system-x86
    }
    log "installing qemu-system-x86 in the chroot"
    # debootstrap leaves usable package lists; refresh them only if needed.
    if ! install; then
        chroot "$SID" apt-get update -q -o Acquire::Check-Valid-Until=false
        install
    fi
fi

mkdir -p "$E2E_DIR/bin"
cat > "$E2E_DIR/bin/qemu11" <<'WRAP'
#!/bin/sh
# QEMU from the sid chroot next to this directory, with the chroot's libraries.
s=$(readlink -f "$(dirname "$0")/../sid")
export QEMU_MODULE_DIR="$s/usr/lib/x86_64-linux-gnu/qemu"
exec "$s/usr/lib64/ld-linux-x86-64.so.2" --library-path "$s/usr/lib/x86_64-linux-gnu" \
    --argv0 qemu-system-x86_64 "$s/usr/bin/qemu-system-x86_64" \
    -L "$s/usr/share/qemu" -L "$s/usr/share/seabios" "$@"
WRAP
chmod 755 "$E2E_DIR/bin/qemu11"
sys=$(command -v qemu-system-x86_64) || die "no system QEMU, run host-setup.sh"
ln -sfn "$sys" "$E2E_DIR/bin/qemu10"

for v in 10 11; do
    log "$E2E_DIR/bin/qemu$v: $("$E2E_DIR/bin/qemu$v" --version | head -1)"
done

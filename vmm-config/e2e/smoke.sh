#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# End-to-end smoke test of the e2e infrastructure: for QEMU 10 (device as
# vhost-user-gpio-pci, 1af4:1069) and QEMU 11 (vhost-user-test-device-pci,
# virtio ID 37, 1af4:1065) it starts the daemon, boots a guest running
# smoke-guest.sh, talks to the guest over the ttyS1 socket and prints the
# daemon's stats.
#   usage: smoke.sh [10] [11]       (default both; env E2E_DIR, DAEMON,
#                                    CARGO_TARGET_DIR)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"

daemon=${DAEMON:-${CARGO_TARGET_DIR:-$E2E_REPO/target}/release/vhost-device-dmabuf}
if [ ! -x "$daemon" ]; then
    (cd "$E2E_REPO" && cargo build --release -p vhost-device-dmabuf)
fi
run=$E2E_DIR/run
mkdir -p "$run"
initrd=$E2E_DIR/smoke.cpio.gz

lane() {
    local v=$1 want dev shm
    if [ "$v" = 10 ]; then
        want=1af4:1069 shm=0
        dev=vhost-user-gpio-pci,chardev=dmabuf0,id=dmabuf0
    else
        want=1af4:1065 shm=64M
        dev=vhost-user-test-device-pci,chardev=dmabuf0,virtio-id=37,num_vqs=2,vq_size=256,config_size=24
    fi
    local sock=$run/dmabuf-$v.sock ctl=$run/dmabuf-$v.ctl hostctl=$run/hostctl-$v.sock
    rm -f "$sock" "$ctl" "$hostctl"
    E2E_GUEST_ARGS=$want "$here/initramfs.sh" "$initrd" "$here/smoke-guest.sh=/bin/e2e-guest"

    "$daemon" --socket-path "$sock" --control-socket "$ctl" --shm-size "$shm" \
        > "$E2E_DIR/logs/daemon-$v.log" 2>&1 &
    local dpid=$!
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    [ -S "$sock" ] || die "daemon did not create $sock"

    # Host end of the guest's /dev/ttyS1: answer "ready" with a ping.
    python3 - "$hostctl" > "$E2E_DIR/logs/hostctl-$v.log" 2>&1 <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
for _ in range(300):
    try:
        s.connect(sys.argv[1]); break
    except OSError:
        time.sleep(0.1)
f = s.makefile("rwb", buffering=0)
for line in f:
    print("guest:", line.decode().strip(), flush=True)
    if line.startswith(b"ready"):
        f.write(b"ping\n")
    if line.startswith(b"pong"):
        break
PY
    local ppid=$!

    local rc=0 t=$SECONDS
    "$here/boot.sh" --qemu "$v" --initrd "$initrd" --timeout 180 --ctl-socket "$hostctl" \
        --log "$E2E_DIR/logs/smoke-$v.log" -- \
        -chardev "socket,id=dmabuf0,path=$sock" -device "$dev" || rc=$?
    log "QEMU $v lane: guest status $rc, $((SECONDS - t)) s"
    wait "$ppid" || true
    sed 's/^/hostctl: /' "$E2E_DIR/logs/hostctl-$v.log"
    "$daemon" ctl --control-socket "$ctl" --json stats || rc=1
    echo
    kill "$dpid"; wait "$dpid" || true
    return "$rc"
}

mkdir -p "$E2E_DIR/logs"
lanes=("$@"); [ $# -gt 0 ] || lanes=(10 11)
status=0
for v in "${lanes[@]}"; do lane "$v" || status=1; done
exit $status

#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The real-kernel lane: the daemon and the loopback suite inside a TCG guest
# running the Debian 6.12 kernel from host-setup.sh (udmabuf and the system
# dma-heap built in, vgem loaded as a module), so udmabuf, dma-heap and a
# vgem (GPU stand-in) dma-buf are real, and every row of the section 9
# table must reach a real DMA_BUF_IOCTL_SYNC.
#
# Builds the workspace's test binaries statically, puts the device crate's
# lib unit tests and the conformance suite in an initramfs with
# guest/kernel-lane.sh as /bin/e2e-guest, boots it (2 vCPUs, 2G) and checks
# the console: the guest's verdict, each run's pass line, the vgem scenario,
# the section 9 lines. Not run in the guest, as they add nothing a real
# kernel changes: the protocol, ring and model test binaries (every
# device/tests/*.rs and guest-tests/tests/rings.rs run on memfd or no host
# memory at all), and the suite's transport and quota modes (no-event-idx,
# split, small-quotas, short-fence-timeout: same host memory calls as full/).
# The host fence scenarios (docs/protocol.md, "Host fences") run in full/
# on a vgem, a udmabuf and a dma-heap buffer, and in short-fence-timeout/
# for the timeout; each must pass, not skip.
#   usage: lane-kernel.sh [SCENARIO FILTER...]
#          (default: full/ no-shm-daemon/ short-fence-timeout/host_fences)
#   env:   E2E_DIR, E2E_QEMU (default: the system qemu-system-x86_64),
#          E2E_TIMEOUT (boot timeout, 600 s), E2E_SKIP_BUILD=1 (reuse the
#          binaries of the last build), CARGO_TARGET_DIR
# Writes its summary to $E2E_DIR/lane-kernel/result.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lib.sh"

t0=$SECONDS
DIR=$E2E_DIR/lane-kernel
mkdir -p "$DIR"
rm -f "$DIR/result" "$DIR"/console.log.stalled-*
failures=() notes=()
fail() { log "FAIL: $*"; failures+=("$*"); }
note() { log "$*"; notes+=("$*"); }

finish() {
    local rc=$? verdict=PASS
    [ "$rc" -eq 0 ] || failures+=("aborted (status $rc)")
    [ ${#failures[@]} -eq 0 ] || verdict=FAIL
    {
        echo "kernel: $verdict in $((SECONDS - t0)) s"
        [ ${#notes[@]} -eq 0 ] || printf '  %s\n' "${notes[@]}"
        [ ${#failures[@]} -eq 0 ] || printf '  FAIL: %s\n' "${failures[@]}"
    } > "$DIR/result"
    log "lane summary:"; cat "$DIR/result" >&2
    [ "$verdict" = PASS ]
}
trap finish EXIT

"$here/host-setup.sh"
grep -qx 'vgem.ko' "$E2E_DIR/kernel/modules.order" \
    || die "$E2E_DIR/kernel has no vgem module (E2E_MODULES must name vgem)"
qemu=${E2E_QEMU:-$(command -v qemu-system-x86_64)} || die "no qemu-system-x86_64"

# Static test binaries: --target keeps build scripts and proc macros
# dynamic while every test executable is linked with crt-static.
t=$SECONDS
json=$DIR/build.json
if [ "${E2E_SKIP_BUILD:-0}" != 1 ] || [ ! -s "$json" ]; then
    (cd "$E2E_REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo test --workspace --release --no-run --target x86_64-unknown-linux-gnu \
        --message-format=json) > "$json" || die "the static build failed"
fi
pick() {  # pick KIND NAME: the test executable of that target
    jq -r --arg k "$1" --arg n "$2" '
        select(.reason == "compiler-artifact" and .profile.test and .executable != null)
        | select(.target.name == $n and (.target.kind | index($k)))
        | .executable' "$json" | tail -1
}
lib_tests=$(pick lib vhost_device_dmabuf)
conformance=$(pick test conformance)
for f in "$lib_tests" "$conformance"; do
    [ -n "$f" ] && [ -x "$f" ] || die "a test executable is missing from $json"
    ! readelf -l "$f" | grep -q 'program interpreter' || die "$f is not static"
done
note "build: $((SECONDS - t)) s"

initrd=$DIR/kernel-lane.cpio.gz
E2E_GUEST_ARGS=$(printf '%s\n' "$@") "$here/initramfs.sh" "$initrd" \
    "$here/guest/kernel-lane.sh=/bin/e2e-guest" \
    "$lib_tests=/bin/device-lib-tests" "$conformance=/bin/conformance"

t=$SECONDS
rc=0
# No host-side peer here, so a boot that never reached /init (seen once
# under TCG: no console line at all in 600 s) is tried once more; the
# summary says so.
"$here/boot.sh" --qemu "$qemu" --initrd "$initrd" --mem 2G --smp 2 \
    --timeout "${E2E_TIMEOUT:-600}" --up-timeout 180 --retries 1 \
    --log "$DIR/console.log" > /dev/null || rc=$?
note "boot: $((SECONDS - t)) s, guest status $rc"
for stalled in "$DIR"/console.log.stalled-*; do
    [ -e "$stalled" ] && note "a boot never reached /init and was tried again ($stalled)"
done
if [ "$rc" -ne 0 ]; then
    fail "the guest exited with status $rc"
    log "the console's last lines:"
    tr -d '\r' < "$DIR/console.log" | tail -n 40 >&2
fi

console=$(tr -d '\r' < "$DIR/console.log")
grep -a '^kernel-lane: ' <<<"$console" >&2 || true
grep -aq '^kernel-lane: PASS$' <<<"$console" || fail "the guest did not print 'kernel-lane: PASS'"
grep -aq '^test result: ok\.' <<<"$console" || fail "no 'test result: ok.' line of the lib tests"
while IFS= read -r line; do
    note "$line"
done < <(grep -aE '^(conformance: provider|[0-9]+ passed, [0-9]+ failed)' <<<"$console")
for provider in udmabuf dma-heap; do
    grep -aq "^conformance: provider $provider " <<<"$console" \
        || fail "no conformance run with DMABUF_PROVIDER=$provider"
done
[ "$(grep -acE '^[1-9][0-9]* passed, 0 failed, [0-9]+ skipped$' <<<"$console")" -ge 2 ] \
    || fail "fewer than two conformance runs ended with 'N passed, 0 failed'"
grep -a '^\(FAIL\|SKIP\) ' <<<"$console" >&2 || true
# What each kernel exporter answers for END without START, and the rows.
while IFS= read -r line; do
    note "$line"
done < <(grep -aE '^(udmabuf|dma-heap).*END without START|^section 9: |^host fence error ' <<<"$console" | sort -u)
grep -aE '^PASS [a-z-]+/(host_fences_|fence_attach_host)' <<<"$console" >&2 || true
if grep -a '^section 9: ' <<<"$console" | grep -qE '=(emulated|mixed)( |$)'; then
    fail "a section 9 row did not reach a real dma-buf"
fi

#!/bin/sh
# Guest side of lane-kernel.sh (installed as /bin/e2e-guest): on this
# kernel's real udmabuf, system dma-heap and vgem, runs
#   1. the device crate's lib unit tests (/bin/device-lib-tests): the
#      provider tests take their real-node paths here, none may skip;
#   2. the conformance suite (/bin/conformance) with DMABUF_PROVIDER=udmabuf,
#      then dma-heap, both with DMABUF_REQUIRE_KERNEL_SYNC=1 (a host sync
#      the emulation answers is a failure); the vgem scenario must pass.
# Prints "kernel-lane: PASS" or "kernel-lane: FAIL <what>" lines; the exit
# status is 0 only when every run passed.
#   usage: e2e-guest [SCENARIO FILTER...]     (default: full/ no-shm-daemon/)
[ $# -gt 0 ] || set -- full/ no-shm-daemon/
fail=0
say() { echo "kernel-lane: $*"; }
bad() { say "FAIL $*"; fail=1; }

say "kernel $(uname -r), $(nproc) CPUs, $(sed -n 's/^MemTotal: *//p' /proc/meminfo)"
for node in /dev/udmabuf /dev/dma_heap/system; do
    [ -c "$node" ] || bad "$node is missing"
done
for card in /sys/class/drm/card*; do
    [ -e "$card" ] && say "${card##*/}: device $(basename "$(readlink "$card/device")")"
done

# Runs "$@" with its output in /tmp/$1.log and on the console.
run() {
    name=$1; shift
    say "run $name: $*"
    start=$(date +%s)
    "$@" > "/tmp/$name.log" 2>&1
    rc=$?
    cat "/tmp/$name.log"
    say "$name: status $rc in $(( $(date +%s) - start )) s"
    return $rc
}

run device-lib device-lib-tests --test-threads 2 --show-output \
    || bad "device-lib: status $rc"
grep -q '^test result: ok\.' /tmp/device-lib.log || bad "device-lib: no 'test result: ok.' line"
if grep 'skipped: .* does not exist' /tmp/device-lib.log; then
    bad "device-lib: a real-node test skipped"
fi

for provider in udmabuf dma-heap; do
    name=conformance-$provider
    run "$name" env DMABUF_PROVIDER=$provider DMABUF_REQUIRE_KERNEL_SYNC=1 \
        conformance "$@" || bad "$name: status $rc"
    log=/tmp/$name.log
    grep -q "^conformance: provider $provider " "$log" || bad "$name: no header line"
    grep -qE '^[1-9][0-9]* passed, 0 failed, [0-9]+ skipped$' "$log" \
        || bad "$name: no 'N passed, 0 failed' line"
    grep -q '^PASS full/vgem_' "$log" || bad "$name: the vgem scenario did not pass"
    grep -q '^PASS full/sync_table_in_the_daemon_record' "$log" \
        || bad "$name: the section 9 scenario did not pass"
    if grep '^section 9: ' "$log" | grep -E '=(emulated|mixed)( |$)'; then
        bad "$name: a section 9 row was not a kernel sync"
    fi
    grep '^SKIP ' "$log" | sed "s/^/kernel-lane: $name: /"
done

if [ "$fail" -eq 0 ]; then say PASS; else say "FAIL (see above)"; fi
exit $fail

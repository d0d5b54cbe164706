#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Guest side of lane-kernel.sh (installed as /bin/e2e-guest): on this
# kernel's real udmabuf, system dma-heap and vgem, runs
#   1. the device crate's lib unit tests (/bin/device-lib-tests): the
#      provider tests take their real-node paths here, none may skip;
#   2. the conformance suite (/bin/conformance) with DMABUF_PROVIDER=udmabuf,
#      then dma-heap, both with DMABUF_REQUIRE_KERNEL_SYNC=1 (a host sync
#      the emulation answers is a failure); the vgem scenario and the host
#      fence scenarios (vgem, udmabuf and dma-heap buffers both ways, and
#      the fence timeout) must pass, not skip.
# With a filter given, only the checks of the scenarios it selects apply.
# Prints "kernel-lane: PASS" or "kernel-lane: FAIL <what>" lines; the exit
# status is 0 only when every run passed.
#   usage: e2e-guest [SCENARIO FILTER...]
#          (default: full/ no-shm-daemon/ short-fence-timeout/host_fences)
filtered=1
[ $# -gt 0 ] || { filtered=0; set -- full/ no-shm-daemon/ short-fence-timeout/host_fences; }
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

# must_pass SCENARIO WHAT: the scenario passed (with a filter given, only
# if it ran at all).
must_pass() {
    if [ "$filtered" = 1 ] && ! grep -qE "^(PASS|FAIL|SKIP) $1" "$log"; then
        return 0
    fi
    grep -q "^PASS $1" "$log" || bad "$name: $2 did not pass"
}

for provider in udmabuf dma-heap; do
    name=conformance-$provider
    run "$name" env DMABUF_PROVIDER=$provider DMABUF_REQUIRE_KERNEL_SYNC=1 \
        conformance "$@" || bad "$name: status $rc"
    log=/tmp/$name.log
    grep -q "^conformance: provider $provider " "$log" || bad "$name: no header line"
    grep -qE '^[1-9][0-9]* passed, 0 failed, [0-9]+ skipped$' "$log" \
        || bad "$name: no 'N passed, 0 failed' line"
    must_pass full/vgem_ "the vgem scenario"
    must_pass full/sync_table_in_the_daemon_record "the section 9 scenario"
    for kind in vgem_buffer udmabuf dma_heap_buffer; do
        must_pass "full/host_fences_${kind}_both_ways" "the host fence scenario ($kind)"
    done
    must_pass short-fence-timeout/host_fences_time_out "the host fence timeout scenario"
    grep '^host fence error ' "$log" | sed "s/^/kernel-lane: $name: /"
    if grep '^section 9: ' "$log" | grep -E '=(emulated|mixed)( |$)'; then
        bad "$name: a section 9 row was not a kernel sync"
    fi
    grep '^SKIP ' "$log" | sed "s/^/kernel-lane: $name: /"
done

if [ "$fail" -eq 0 ]; then say PASS; else say "FAIL (see above)"; fi
exit $fail

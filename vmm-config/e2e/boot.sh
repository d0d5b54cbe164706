#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boots one e2e guest under TCG with the kernel from host-setup.sh and an
# initramfs from initramfs.sh, and exits with the guest's status, read from
# the "E2E-EXIT <status>" console line. Fails (non-zero) when that line is
# missing, the timeout hits, or QEMU reports an error.
#   usage: boot.sh [options] [-- extra QEMU args...]
#     --qemu 10|11|PATH    QEMU to run (env E2E_QEMU, default 10)
#     --initrd FILE        initramfs (required)
#     --mem SIZE           guest RAM, a shared memfd (default 512M)
#     --smp N              vCPUs (default 1)
#     --timeout SECS       kill QEMU after SECS (default 300)
#     --up-timeout SECS    the guest's /init must say "e2e-init: up" within
#                          SECS of QEMU's start, or QEMU is stopped (default
#                          0: no such check)
#     --retries N          boot again, up to N times, when /init never came
#                          up (default 0); only for guests with no host-side
#                          peer on --ctl-socket that a retry would lose
#     --log FILE           console log (default $E2E_DIR/logs/boot-<time>.log)
#     --ctl-socket PATH    guest /dev/ttyS1 as a unix socket QEMU listens on
#     --append ARGS        extra kernel parameters
#     --cmd 'SHELL CMD'    run this in the guest instead of /bin/e2e-guest
# Everything after "--" goes to QEMU as is (-chardev/-device for the daemon).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

qemu=${E2E_QEMU:-10} initrd= mem=512M smp=1 timeout=300 log= ctl= append= cmd=
up_timeout=0 retries=0
while [ $# -gt 0 ]; do
    case $1 in
        --qemu) qemu=$2; shift 2 ;;
        --initrd) initrd=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --up-timeout) up_timeout=$2; shift 2 ;;
        --retries) retries=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --ctl-socket) ctl=$2; shift 2 ;;
        --append) append=$2; shift 2 ;;
        --cmd) cmd=$2; shift 2 ;;
        --) shift; break ;;
        *) die "unknown option $1 (see the header of $0)" ;;
    esac
done
case $qemu in
    10|11) qemu=$E2E_DIR/bin/qemu$qemu ;;
esac
[ -x "$qemu" ] || die "no QEMU at $qemu (host-setup.sh / sid-qemu.sh)"
[ -f "$initrd" ] || die "--initrd FILE is required"
kernel=$E2E_DIR/kernel/vmlinuz
[ -f "$kernel" ] || die "run host-setup.sh first"
log=${log:-$E2E_DIR/logs/boot-$(date +%Y%m%d-%H%M%S)-$$.log}
mkdir -p "$(dirname "$log")"

cmdline="console=ttyS0 panic=-1 quiet${append:+ $append}${cmd:+ e2e.cmd=$cmd}"
if [ -n "$ctl" ]; then
    ttys1=(-chardev "socket,id=hostctl,path=$ctl,server=on,wait=off" -serial chardev:hostctl)
else
    ttys1=(-serial null)
fi

args=(-accel tcg -machine q35,memory-backend=mem -cpu max -smp "$smp" -m "$mem"
      -object "memory-backend-memfd,id=mem,size=$mem,share=on"
      -nographic -nodefaults -no-reboot -serial mon:stdio "${ttys1[@]}"
      -kernel "$kernel" -initrd "$initrd" -append "$cmdline" "$@")
log "$(basename "$qemu") ${args[*]}"

# One boot: QEMU's console goes to $log and, as it comes, to stdout. Sets
# qrc to QEMU's status and stalled=1 when /init did not come up in time.
boot_once() {
    local qpid tpid
    stalled=0
    : > "$log"
    timeout -k 5 "$timeout" "$qemu" "${args[@]}" < /dev/null > "$log" 2>&1 &
    qpid=$!
    tail -n +1 -f --pid="$qpid" "$log" &
    tpid=$!
    start=$SECONDS
    if [ "$up_timeout" -gt 0 ]; then
        while kill -0 "$qpid" 2>/dev/null && ! grep -aq 'e2e-init: up' "$log"; do
            if [ $((SECONDS - start)) -ge "$up_timeout" ]; then
                stalled=1
                log "error: the guest's /init did not come up within $up_timeout s; stopping QEMU"
                log "console so far ($(wc -c < "$log") bytes): $(tr -d '\r' < "$log" | tail -c 600)"
                kill "$qpid" 2>/dev/null || true
                break
            fi
            sleep 1
        done
    fi
    set +e
    wait "$qpid"
    qrc=$?
    wait "$tpid" 2>/dev/null
    set -e
    log "QEMU exited with $qrc after $((SECONDS - start)) s; log $log"
}

attempt=0
while :; do
    boot_once
    [ "$stalled" = 1 ] || break
    if [ "$attempt" -ge "$retries" ]; then
        log "error: no boot reached /init ($((attempt + 1)) tried)"; exit 124
    fi
    attempt=$((attempt + 1))
    cp "$log" "$log.stalled-$attempt"
    log "boot again ($attempt of $retries retries); the stalled console is in $log.stalled-$attempt"
done

if [ "$qrc" -eq 124 ]; then
    log "error: timeout after $timeout s"; exit 124
fi
if [ "$qrc" -eq 137 ]; then
    log "error: QEMU was killed (SIGKILL: by the caller, or after the timeout)"; exit 124
fi
if errors=$(qemu_errors "$log"); then
    die "QEMU reported an error: $errors"
fi
[ "$qrc" -eq 0 ] || die "QEMU exited with status $qrc"
status=$(tr -d '\r' < "$log" | sed -n 's/^E2E-EXIT \([0-9][0-9]*\)$/\1/p' | tail -1)
[ -n "$status" ] || die "no E2E-EXIT line on the console"
log "guest exit status $status"
exit "$status"

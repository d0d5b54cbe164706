# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The QEMU lanes' common part; sourced by lane-qemu10.sh and lane-qemu11.sh
# after lib.sh. lane_build builds the three binaries; lane_run V runs one
# lane (README.md says what it checks) and, on exit, whatever happened,
# stops what it started and writes its summary to $E2E_DIR/lane-V/result.
# env: E2E_SKIP_BUILD=1 (binaries already built), E2E_RUNNER (a prebuilt
# static runner instead of the cargo one), E2E_MEM (guest RAM, 1G),
# E2E_HUGEPAGES (2 MiB pages /init reserves for the runner, 64),
# E2E_TIMEOUT (seconds for the suite's boot, 1800), E2E_RECONNECT_FILTER
# (the scenarios run after the disconnect, config_space).
E2E_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DAEMON=$E2E_REPO/target/release/vhost-device-dmabuf
RELAY=$E2E_REPO/target/release/examples/e2e_host_relay
RUNNER=${E2E_RUNNER:-$E2E_REPO/target/x86_64-unknown-linux-gnu/release/dmabuf-guest-runner}

lane_build() {
    [ "${E2E_SKIP_BUILD:-0}" = 1 ] && return 0
    (
        cd "$E2E_REPO"
        cargo build --release --locked -p vhost-device-dmabuf
        cargo build --release --locked -p dmabuf-guest-tests --example e2e_host_relay
        if [ -z "${E2E_RUNNER:-}" ]; then
            RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
                --target x86_64-unknown-linux-gnu -p dmabuf-guest-tests --bin dmabuf-guest-runner
        fi
    )
}

fail() { log "FAIL: $*"; failures+=("$*"); }
note() { log "$*"; notes+=("$*"); }

# Kills what is still running and writes the summary (EXIT trap).
lane_cleanup() {
    local rc=$? pid verdict=PASS
    set +e
    pid=$(cat "$DIR/qemu.pid" 2>/dev/null) && kill -KILL "$pid" 2>/dev/null
    for pid in $relay_pid $boot_pid $daemon_pid; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    [ "$rc" -eq 0 ] && [ ${#failures[@]} -eq 0 ] || verdict=FAIL
    [ "$rc" -eq 0 ] || failures+=("aborted (status $rc, the reason is logged above)")
    {
        echo "qemu$V: $verdict in $((SECONDS - lane_t0)) s"
        [ ${#notes[@]} -eq 0 ] || printf '  %s\n' "${notes[@]}"
        [ ${#failures[@]} -eq 0 ] || printf '  FAIL: %s\n' "${failures[@]}"
    } > "$DIR/result"
    log "lane summary:"; cat "$DIR/result" >&2
    [ "$verdict" = FAIL ] || exit 0
    [ "$rc" -ne 0 ] || rc=1
    exit "$rc"
}

# Boots the runner with ARGS in the background: boot_pid, relay_pid; the
# console log is $DIR/NAME.log and QEMU's pid lands in $DIR/qemu.pid.
boot_start() {
    local name=$1; shift
    E2E_GUEST_ARGS=$(printf '%s\n' "$@") \
        "$E2E_HERE/initramfs.sh" "$DIR/$name.cpio.gz" "$RUNNER=/bin/e2e-guest"
    rm -f "$HOSTCTL" "$DIR/qemu.pid"
    "$RELAY" --connect "$HOSTCTL" --control-socket "$CTL" > "$DIR/relay-$name.log" 2>&1 &
    relay_pid=$!
    "$E2E_HERE/boot.sh" --qemu "$V" --initrd "$DIR/$name.cpio.gz" --mem "$MEM" \
        --timeout "$boot_timeout" --ctl-socket "$HOSTCTL" --log "$DIR/$name.log" \
        --append "e2e.hugepages=${E2E_HUGEPAGES:-64}" -- \
        "${qemu_devices[@]}" -pidfile "$DIR/qemu.pid" &
    boot_pid=$!
}

# Waits for the boot and the relay (which ends when QEMU closes the link);
# returns boot.sh's status, the guest's.
boot_wait() {
    local rc=0
    wait "$boot_pid" || rc=$?
    boot_pid=
    for _ in $(seq 30); do kill -0 "$relay_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
    relay_pid=
    rm -f "$DIR/qemu.pid"
    return "$rc"
}

# Checks the runner's closing line in $DIR/NAME.log and shows every FAIL and
# SKIP line with its reason.
check_suite() {
    local name=$1 rc=$2 text line
    # Without CRs and the firmware's terminal escapes (they share a line
    # with the guest's first output).
    text=$(tr -d '\r' < "$DIR/$name.log" | sed -E 's/\x1b(\[[0-9;?]*[A-Za-z]|c)//g')
    grep -a '^\(FAIL\|SKIP\) ' <<<"$text" | sed "s/^/[$name] /" >&2 || true
    line=$(grep -aE '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped' <<<"$text" | tail -1) || true
    note "$name: ${line:-no closing line} (guest status $rc)"
    case $line in
        '') fail "$name: the runner printed no 'N passed, M failed, K skipped' line" ;;
        *", 0 failed,"*)
            [ "${line%% *}" -gt 0 ] || fail "$name: no scenario passed"
            [ "$rc" -eq 0 ] || fail "$name: guest status $rc" ;;
        *) fail "$name: $line" ;;
    esac
    while IFS= read -r line; do notes+=("  $line"); done < <(grep -a '^SKIP ' <<<"$text")
}

# Fails the lane for every error line QEMU printed in $DIR/NAME.log.
check_qemu() {
    local line
    while IFS= read -r line; do fail "$1: $line"; done < <(qemu_errors "$DIR/$1.log" |
        sort | uniq -c | awk '{ n = $1; sub(/^ *[0-9]+ /, ""); print $0 " (" n "x)" }')
}

# The daemon's objects as JSON.
objects() { "$DAEMON" ctl --control-socket "$CTL" --json list | jq -c '.objects'; }

# Succeeds when the daemon holds no objects, polling up to $1 seconds.
no_objects() {
    local left
    for _ in $(seq $(( ${1:-0} * 5 + 1 ))); do
        left=$(objects) && [ "$left" = '[]' ] && return 0
        sleep 0.2
    done
    log "objects left: ${left:-?}"
    return 1
}

# The daemon's open fds, one "fd -> target" line each.
daemon_fds() { ls -l "/proc/$daemon_pid/fd" 2>/dev/null | awk 'NR > 1 {print $9, $10, $11}' | sort; }

# Fails unless the daemon holds exactly the fds it held before the first
# VM came (waits up to 5 s for connections to close).
same_fds() {
    local now
    for _ in $(seq 26); do
        now=$(daemon_fds)
        [ "$now" = "$fd_base" ] && return 0
        sleep 0.2
    done
    fail "$1: the daemon holds $(wc -l <<<"$now") fds, $(wc -l <<<"$fd_base") before the first VM"
    diff <(echo "$fd_base") <(echo "$now") >&2 || true
}

daemon_alive() {
    kill -0 "$daemon_pid" 2>/dev/null && return 0
    local rc=0; wait "$daemon_pid" || rc=$?; daemon_pid=
    fail "the daemon died (status $rc) $1; see $DIR/daemon.log"
    tail -20 "$DIR/daemon.log" >&2
    exit 1
}

# lane_run 10|11
lane_run() {
    V=$1 lane_t0=$SECONDS daemon_pid= relay_pid= boot_pid= failures=() notes=()
    DIR=$E2E_DIR/lane-$V
    rm -rf "$DIR" && mkdir -p "$DIR"
    trap lane_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    MEM=${E2E_MEM:-1G}
    local sock=$DIR/dmabuf.sock dev guest_args daemon_args held left rc t
    CTL=$DIR/dmabuf.ctl HOSTCTL=$DIR/hostctl.sock

    lane_build
    for f in "$DAEMON" "$RELAY" "$RUNNER"; do [ -x "$f" ] || die "missing $f"; done
    ! ldd "$RUNNER" 2>/dev/null | grep -q '=>' || die "$RUNNER is not static (the guest has no libc)"
    command -v jq >/dev/null || die "jq is missing (host-setup.sh installs it)"

    guest_args=(--host-link /dev/ttyS1)
    if [ "$V" = 10 ]; then
        daemon_args=(--shm-size 0) dev=vhost-user-gpio-pci
    else
        daemon_args=(--shm-size 64M --queues 2) guest_args+=(--expect-shm)
        dev=vhost-user-test-device-pci,virtio-id=37,num_vqs=3,vq_size=256,config_size=24
    fi
    qemu_devices=()
    for i in 0 1; do
        qemu_devices+=(-chardev "socket,id=dmabuf$i,path=$sock$i" -device "$dev,chardev=dmabuf$i,id=dmabuf$i")
    done

    # memfd objects may be published as shared objects, so EXPORT_UUID and
    # SHARED_OBJECT_ADD reach the front-end (the real-kernel lane has
    # dma-bufs for that).
    daemon_args+=(--allow-memfd-shared-objects)
    "$DAEMON" --socket-path "$sock" --socket-count 2 --control-socket "$CTL" "${daemon_args[@]}" \
        > "$DIR/daemon.log" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 50); do [ -S "${sock}1" ] && [ -S "$CTL" ] && break; sleep 0.1; done
    daemon_alive "at start"
    [ -S "${sock}1" ] && [ -S "$CTL" ] || die "the daemon did not create its sockets"
    fd_base=$(daemon_fds)
    note "daemon: $(wc -l <<<"$fd_base") fds before the first VM"

    # 1. The whole suite, both devices.
    t=$SECONDS
    boot_timeout=${E2E_TIMEOUT:-1800}
    boot_start suite "${guest_args[@]}" --guests 2
    rc=0; boot_wait || rc=$?
    check_suite suite "$rc"
    check_qemu suite
    note "suite boot: $((SECONDS - t)) s"
    daemon_alive "during the suite"
    no_objects 5 || fail "objects left after the suite"
    same_fds "after the suite"
    # recent_syncs lists hundreds of calls: kept in the file, not printed.
    "$DAEMON" ctl --control-socket "$CTL" --json stats > "$DIR/stats.json"
    log "daemon stats (all of it in $DIR/stats.json):"
    jq -c '{requests, syncs, recent_syncs: (.recent_syncs | length)}' "$DIR/stats.json"

    # 2. Disconnect: kill QEMU while the guest holds objects, a lock and a
    # parked LOCK; the daemon must release everything.
    t=$SECONDS
    boot_timeout=300
    boot_start hold --host-link /dev/ttyS1 --hold-and-hang
    held=
    while kill -0 "$boot_pid" 2>/dev/null; do
        grep -aq E2E-HOLDING "$DIR/hold.log" 2>/dev/null && { held=1; break; }
        sleep 0.2
    done
    if [ -n "$held" ]; then
        left=$(objects)
        note "hold: QEMU killed while the guest held $(jq -r '"\(length) object(s), \(
            [.[].attachments[]] | length) attachment(s), \(map(select(.lock_holder)) | length) locked"' <<<"$left")"
        [ "$left" != '[]' ] || fail "hold: the guest held nothing, so the disconnect check proves nothing"
        kill -KILL "$(cat "$DIR/qemu.pid")"
    else
        fail "hold: the guest never printed E2E-HOLDING"
    fi
    boot_wait || true
    check_qemu hold
    daemon_alive "when QEMU was killed"
    no_objects 5 || fail "objects left after QEMU was killed"
    same_fds "after QEMU was killed"
    note "disconnect check: $((SECONDS - t)) s"

    # 3. The next connection is served.
    t=$SECONDS
    boot_start again "${guest_args[@]}" "${E2E_RECONNECT_FILTER:-config_space}"
    rc=0; boot_wait || rc=$?
    check_suite again "$rc"
    check_qemu again
    daemon_alive "after the reconnect"
    no_objects 5 || fail "objects left after the reconnect"
    same_fds "after the reconnect"
    note "reconnect boot: $((SECONDS - t)) s"

    kill -TERM "$daemon_pid"
    for _ in $(seq 100); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$daemon_pid" 2>/dev/null; then
        fail "the daemon did not stop within 10 s of SIGTERM"
        kill -KILL "$daemon_pid"
    fi
    rc=0; wait "$daemon_pid" || rc=$?; daemon_pid=
    case $rc in
        0) ;;
        143) note "the daemon was killed by the SIGTERM sent to it" ;;
        *) fail "the daemon exited with status $rc on SIGTERM" ;;
    esac
    if grep -E ' (WARN|ERROR) ' "$DIR/daemon.log" >&2; then
        note "daemon warnings/errors above (in $DIR/daemon.log)"
    fi
}

#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The Debian package, end to end: build it (cargo-deb, pinned), check what
# it holds, install it with dpkg, verify its systemd units, run the
# installed daemon (by hand, and socket-activated by systemd's own
# systemd-socket-activate) with `ctl list` against it, stop it, and purge
# the package, failing if any of its files stays behind.
#
# Needs root (dpkg). Installs what it lacks itself: systemd (for
# systemd-analyze and systemd-socket-activate), dpkg-dev (dpkg-shlibdeps,
# for the package's library dependencies), man-db, and cargo-deb. Honours
# CARGO_TARGET_DIR (default: target/). systemd is not PID 1 here, so the
# units are verified, not run by a service manager: docs/operating.md says
# what that covers.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
PKG=vhost-device-dmabuf
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
GEN=$TARGET/release/packaging
start=$SECONDS

step() { echo "-- $* ($((SECONDS - start)) s)"; }
fail() { echo "ci-package: $*" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
    fail "needs root (dpkg -i)"
fi

step "tools"
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v systemd-socket-activate >/dev/null || missing+=(systemd)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
command -v man >/dev/null || missing+=(man-db)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    t=$SECONDS
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
    echo "cargo-deb $CARGO_DEB_VERSION installed in $((SECONDS - t)) s"
fi

step "build"
cargo build --release --locked -p $PKG
rm -rf "$GEN"
cargo run --locked --quiet -p $PKG --example manual -- "$GEN" >/dev/null
gzip -9n "$GEN"/man/*.8
rm -rf "$TARGET/debian"
cargo deb -p $PKG --no-build --output "$TARGET/debian/" >/dev/null
deb=$(ls "$TARGET"/debian/${PKG}_*.deb)
echo "$deb"

step "contents"
dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Depends\|Recommends\):/  \1:/p'
contents=$(dpkg-deb --contents "$deb" | awk '{print $NF}' | sed 's|^\./|/|')
for f in /usr/bin/$PKG \
    /usr/share/man/man8/$PKG.8.gz \
    /usr/share/man/man8/$PKG-ctl.8.gz \
    /usr/share/man/man8/$PKG-ctl-list.8.gz \
    /usr/share/man/man8/$PKG-ctl-evict.8.gz \
    /usr/share/bash-completion/completions/$PKG \
    /usr/share/zsh/vendor-completions/_$PKG \
    "/usr/lib/systemd/system/$PKG@.service" \
    "/usr/lib/systemd/system/$PKG@.socket" \
    /etc/default/$PKG \
    /usr/share/doc/$PKG/copyright; do
    grep -qxF "$f" <<<"$contents" || fail "the package lacks $f"
done
# (Outputs are captured before grep: with pipefail, grep -q closing a
# pipe early would fail the writer.)
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
grep -qx /etc/default/$PKG <<<"$conffiles" || fail "/etc/default/$PKG is not a conffile"

# From here on, never leave the package installed or a daemon running.
work=$(mktemp -d)
daemon=
cleanup() {
    if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null || true; fi
    if dpkg -s $PKG >/dev/null 2>&1; then dpkg --purge $PKG >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
if dpkg -s $PKG >/dev/null 2>&1; then
    dpkg --purge $PKG >/dev/null
fi

step "install"
dpkg -i "$deb" >/dev/null
[ "$(command -v $PKG)" = /usr/bin/$PKG ] || fail "$PKG is not /usr/bin/$PKG"
$PKG --version
page=$(MANWIDTH=80 man $PKG 2>/dev/null)
grep -q -- '--socket-fd' <<<"$page" || fail "man $PKG lacks --socket-fd"
page=$(MANWIDTH=80 man $PKG-ctl-evict 2>/dev/null)
grep -q -- '--timeout-ms' <<<"$page" || fail "man $PKG-ctl-evict lacks --timeout-ms"
bash -c "source /usr/share/bash-completion/completions/$PKG && complete -p $PKG" >/dev/null ||
    fail "the bash completion does not load"

step "systemd-analyze verify"
systemd-analyze verify "/usr/lib/systemd/system/$PKG@ci.service" \
    "/usr/lib/systemd/system/$PKG@ci.socket"
rating=$(systemd-analyze security --offline=yes "/usr/lib/systemd/system/$PKG@ci.service" 2>/dev/null || true)
grep 'Overall exposure' <<<"$rating" || echo "(systemd-analyze security gave no rating)"

# Waits for path $1 to exist while process $2 lives.
wait_for() {
    for _ in $(seq 200); do
        [ -e "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || fail "the daemon exited before $1 appeared"
        sleep 0.05
    done
    fail "$1 did not appear"
}

# Stops process $1 with SIGTERM and checks it exits with status 0.
stop() {
    kill -TERM "$1"
    local status=0
    wait "$1" || status=$?
    daemon=
    [ "$status" = 0 ] || fail "the daemon exited with status $status"
}

step "run the installed daemon"
RUST_LOG=info /usr/bin/$PKG --socket-path "$work/vm.sock" \
    --control-socket "$work/vm.ctl" >"$work/daemon.log" 2>&1 &
daemon=$!
wait_for "$work/vm.ctl" "$daemon"
[ -S "$work/vm.sock" ] || fail "no guest socket"
$PKG ctl --control-socket "$work/vm.ctl" list | tee "$work/list"
grep -q '^0 objects' "$work/list" || fail "ctl list: expected no objects"
stats=$($PKG ctl --control-socket "$work/vm.ctl" --json stats)
grep -q '"requests"' <<<"$stats" || fail "ctl stats --json: $stats"
stop "$daemon"
[ ! -e "$work/vm.sock" ] && [ ! -e "$work/vm.ctl" ] || fail "sockets left behind"

step "run it socket-activated (systemd-socket-activate, LISTEN_FDS)"
systemd-socket-activate -l "$work/act.sock" \
    -E RUST_LOG=debug /usr/bin/$PKG --socket-path "$work/act.sock" \
    --control-socket "$work/act.ctl" >"$work/act.log" 2>&1 &
daemon=$!
wait_for "$work/act.sock" "$daemon"
# The first connection starts the daemon with the listening socket; it then
# serves that connection (which just hangs up) and the next ones.
python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.close()' \
    "$work/act.sock"
wait_for "$work/act.ctl" "$daemon"
list=$($PKG ctl --control-socket "$work/act.ctl" list)
grep -q '^0 objects' <<<"$list" || fail "ctl list (activated): $list"
grep -q 'handed over as fd 3' "$work/act.log" || {
    cat "$work/act.log"
    fail "the daemon did not serve the handed-over socket"
}
stop "$daemon"
[ -S "$work/act.sock" ] || fail "the daemon removed a socket it did not create"

step "purge"
dpkg --purge $PKG >/dev/null
if dpkg -s $PKG >/dev/null 2>&1; then
    fail "$PKG is still known to dpkg"
fi
left=0
while read -r f; do
    case "$f" in
    */) continue ;; # directories: shared ones stay, ours are checked below
    esac
    if [ -e "$f" ] || [ -L "$f" ]; then
        echo "left behind: $f" >&2
        left=1
    fi
done <<<"$contents"
for d in /usr/share/doc/$PKG; do
    if [ -e "$d" ]; then
        echo "left behind: $d" >&2
        left=1
    fi
done
[ "$left" = 0 ] || fail "files stayed behind after dpkg --purge"

step "done"

#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds a busybox initramfs for the e2e guests: busybox-static with its
# applets, the kernel modules from host-setup.sh, the given files in /bin and
# an /init that prepares the guest, runs the test and powers off.
#   usage: initramfs.sh OUT.cpio.gz [FILE | SRC=/GUEST/PATH]...
#   env:   E2E_GUEST_ARGS  arguments for /bin/e2e-guest, one per line,
#                          written to /e2e-args
# A plain FILE lands in /bin under its own name (give static executables);
# SRC=/GUEST/PATH puts SRC at that path. What /init runs, first match wins:
#   1. e2e.cmd=... on the kernel command line (must be last; the rest of
#      the line is a busybox sh command),
#   2. /bin/e2e-guest with the lines of /e2e-args as arguments,
#   3. nothing: status 127.
# It then prints "E2E-EXIT <status>" on the console and powers off.
# Other kernel parameters: e2e.hugepages=N (default 64 2-MiB pages).
# Its first console line is "e2e-init: up" (boot.sh --up-timeout waits for it).
# The second serial port /dev/ttyS1 is left untouched for the caller.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ $# -ge 1 ] || die "usage: $0 OUT.cpio.gz [FILE | SRC=/GUEST/PATH]..."
out=$1; shift
KDIR=$E2E_DIR/kernel
[ -s "$KDIR/modules.order" ] || die "run host-setup.sh first"
busybox=$(command -v busybox) || die "busybox-static is not installed"

root=$(mktemp -d "$E2E_DIR/initramfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
ln -s bin "$root/sbin"
mknod -m 600 "$root/dev/console" c 5 1
cp "$KDIR"/modules/*.ko "$KDIR/modules.order" "$root/lib/modules/"

for f in "$@"; do
    case $f in
        *=/*) dst=$root/${f#*=}; f=${f%%=*} ;;
        *) dst=$root/bin/$(basename "$f") ;;
    esac
    [ -f "$f" ] || die "no such file: $f"
    mkdir -p "$(dirname "$dst")"
    cp -L "$f" "$dst"
done
if [ -n "${E2E_GUEST_ARGS:-}" ]; then
    printf '%s\n' "$E2E_GUEST_ARGS" > "$root/e2e-args"
fi

cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin HOME=/tmp
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
echo "e2e-init: up"
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
mkdir -p /dev/hugepages /dev/shm
mount -t hugetlbfs hugetlbfs /dev/hugepages
mount -t tmpfs shm /dev/shm

for m in $(cat /lib/modules/modules.order); do
    insmod /lib/modules/$m || echo "e2e-init: insmod $m failed"
done

cmdline=$(cat /proc/cmdline)
pages=64
for w in $cmdline; do
    case $w in e2e.hugepages=*) pages=${w#*=} ;; esac
done
echo "$pages" > /proc/sys/vm/nr_hugepages
got=$(cat /proc/sys/vm/nr_hugepages)
[ "$got" = "$pages" ] || echo "e2e-init: only $got of $pages huge pages"

cd /tmp
case " $cmdline" in
    *" e2e.cmd="*)
        sh -c "${cmdline#*e2e.cmd=}"; rc=$? ;;
    *)
        if [ -x /bin/e2e-guest ]; then
            set --
            if [ -f /e2e-args ]; then
                while IFS= read -r a; do set -- "$@" "$a"; done < /e2e-args
            fi
            /bin/e2e-guest "$@"; rc=$?
        else
            echo "e2e-init: nothing to run"; rc=127
        fi ;;
esac
echo
echo "E2E-EXIT $rc"
poweroff -f
INIT
chmod 755 "$root/init"

mkdir -p "$(dirname "$out")"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -1 > "$out.tmp"
mv "$out.tmp" "$out"
log "initramfs $out ($(du -h "$out" | cut -f1))"

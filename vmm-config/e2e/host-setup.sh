#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Prepares the host for the e2e guests: enables bookworm-backports, installs
# QEMU 10, the initramfs tools and jq, and fetches a Debian 6.12 kernel into
# $E2E_DIR/kernel (vmlinuz, decompressed modules/*.ko, modules.order).
# Re-running reuses what is already there.
#   usage: host-setup.sh            (env: E2E_DIR, E2E_MODULES, E2E_KERNEL)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# Modules the guests need; their dependencies are added automatically.
MODULES=${E2E_MODULES:-virtio_pci uio uio_pci_generic vgem}
KDIR=$E2E_DIR/kernel

src=/etc/apt/sources.list.d/e2e-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list.d/; then
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || die "no bookworm entry in debian.sources"
    log "adding bookworm-backports from $mirror"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" > "$src"
    apt-get update -q
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
for p in busybox-static debootstrap cpio xz-utils jq; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports "${need[@]}"
fi

if [ ! -s "$KDIR/vmlinuz" ] || [ ! -s "$KDIR/modules.order" ]; then
    pkg=${E2E_KERNEL:-$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' \
        | awk '{print $1}' | sort -V | tail -1)}
    [ -n "$pkg" ] || die "no linux-image-6.12 package found (apt-get update?)"
    log "kernel package $pkg"
    rm -rf "$KDIR" && mkdir -p "$KDIR/deb" "$KDIR/modules"
    (cd "$KDIR/deb" && apt-get download -q -o APT::Sandbox::User=root "$pkg")
    dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/root"
    cp "$KDIR"/root/boot/vmlinuz-* "$KDIR/vmlinuz"
    cp "$KDIR"/root/boot/config-* "$KDIR/config"

    # Resolve dependencies from each module's .modinfo "depends=" entry (the
    # package has no modules.dep) and list them depth first, so every module
    # comes after the ones it needs.
    declare -A seen=()
    order=()
    add() {
        local m=${1//-/_} f d deps
        [ -n "${seen[$m]:-}" ] && return
        seen[$m]=1
        f=$(find "$KDIR"/root/lib/modules \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) | head -1)
        if [ -z "$f" ]; then
            grep -qE "^CONFIG_${m^^}=y" "$KDIR/config" && return  # built in
            die "module $m not found"
        fi
        case $f in
            *.xz) xz -dc "$f" > "$KDIR/modules/$m.ko" ;;
            *.zst) zstd -dcq "$f" > "$KDIR/modules/$m.ko" ;;
            *) cp "$f" "$KDIR/modules/$m.ko" ;;
        esac
        deps=$(tr '\0' '\n' < "$KDIR/modules/$m.ko" | sed -n 's/^depends=//p' | head -1)
        for d in ${deps//,/ }; do add "$d"; done
        order+=("$m.ko")
    }
    for m in $MODULES; do add "$m"; done
    printf '%s\n' "${order[@]}" > "$KDIR/modules.order"
    rm -rf "$KDIR/deb" "$KDIR/root"
fi
log "kernel ready: $KDIR/vmlinuz, $(wc -l < "$KDIR/modules.order") modules"

#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Guest side of smoke.sh (installed as /bin/e2e-guest): lists the PCI
# devices, checks the dmabuf device VENDOR:DEVICE is there, shows its BARs,
# the host dma-buf device nodes, binds the device to uio_pci_generic and
# answers a ping on the /dev/ttyS1 control channel.
#   usage: e2e-guest VENDOR:DEVICE     (e.g. 1af4:1069)
want=$1 addr= fail=0
for d in /sys/bus/pci/devices/*; do
    id=$(sed s/^0x// "$d/vendor"):$(sed s/^0x// "$d/device")
    drv=$(readlink "$d/driver"); drv=${drv##*/}
    echo "pci ${d##*/} $id class=$(cat "$d/class") driver=${drv:--}"
    [ "$id" = "$want" ] && addr=${d##*/}
done
if [ -z "$addr" ]; then echo "FAIL: no $want device"; exit 1; fi
echo "device $want at $addr"
# resource lines: start end flags (0x200 mem, 0x2000 prefetch, 0x100000 64-bit)
i=0
while read -r start end flags; do
    if [ "$start" != 0x0000000000000000 ]; then
        echo "BAR$i $start-$end size=$(( end - start + 1 )) flags=$flags"
    fi
    i=$((i + 1))
done < "/sys/bus/pci/devices/$addr/resource"

ls -l /dev/udmabuf /dev/dma_heap/system /dev/dri || fail=1

echo "$addr" > /sys/bus/pci/drivers/virtio-pci/unbind
echo uio_pci_generic > "/sys/bus/pci/devices/$addr/driver_override"
echo "$addr" > /sys/bus/pci/drivers_probe
ls -l /dev/uio0 || fail=1
echo "uio0 name=$(cat /sys/class/uio/uio0/name) driver=$(basename "$(readlink "/sys/bus/pci/devices/$addr/driver")")"

# Hold the port open: bytes arriving while no one has it open are lost.
exec 3<>/dev/ttyS1
stty -F /dev/ttyS1 raw -echo
echo ready >&3
if read -t 20 -r line <&3; then
    echo "ttyS1 got: $line"
    echo "pong $line" >&3
else
    echo "FAIL: nothing on ttyS1"; fail=1
fi
exit $fail

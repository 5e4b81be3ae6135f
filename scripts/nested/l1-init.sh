#!/bin/sh
# PID 1 of the nested tier's L1 VM (started by scripts/nested/run-t3.sh). The root is the host's
# / over virtio-9p, read-only; this mounts what a host needs, runs the job the host left in the
# exchange share (tag `xchg`), records its exit status there and ends the VM (a reset, which
# ends QEMU: it runs with -no-reboot).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs dev /dev 2>/dev/null # the kernel mounts it already where DEVTMPFS_MOUNT works
exec </dev/null >/dev/ttyS0 2>&1
set -x
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm 2>/dev/null
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs -o size=75% tmp /tmp
mount -t tmpfs run /run
mkdir -p /tmp/xchg
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xchg /tmp/xchg
ip link set lo up
# passt needs an external interface with IPv4 and a default route; L1 has no network, so a
# dummy one stands in (nothing the tests send goes there: they reach L1's loopback only).
ip link add ext0 type dummy
ip addr add 192.0.2.1/24 dev ext0
ip link set ext0 up
ip route add default via 192.0.2.254 dev ext0
hostname microcell-l1
set +x
echo "l1: up after $(cut -d' ' -f1 /proc/uptime) s; kvm: $(ls -l /dev/kvm 2>&1); cpu: $(grep -m1 -ow 'svm\|vmx' /proc/cpuinfo || echo none)"
sh /tmp/xchg/job.sh
echo $? >/tmp/xchg/rc
sync
echo "l1: job done after $(cut -d' ' -f1 /proc/uptime) s (exit $(cat /tmp/xchg/rc))"
# a reset ends QEMU (-no-reboot); L1 has no ACPI to power off with
reboot -f

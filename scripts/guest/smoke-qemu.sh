#!/usr/bin/env bash
# Boot the real guest under QEMU (TCG unless MICROCELL_QEMU_ACCEL=kvm) and check that the
# agent answers the handshake and powers the VM off. Builds (or reuses) the cached kernel
# and rootfs first. Prints one "SMOKE ..." line with the measured times.
#   MICROCELL_SMOKE_REPORT=FILE   also write the times and the guest console there
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

if ! command -v qemu-system-x86_64 >/dev/null; then
  echo "[smoke-qemu] installing qemu-system-x86" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
  }
fi

MICROCELL_KERNEL=$("$here/build-kernel.sh")
MICROCELL_ROOTFS=$("$here/build-rootfs.sh")
export MICROCELL_KERNEL MICROCELL_ROOTFS

cd "$repo"
nice -n 10 cargo test -q -p microcell-agent --test qemu_smoke -- --ignored --nocapture

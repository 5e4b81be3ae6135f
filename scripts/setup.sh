#!/usr/bin/env bash
# Sets up a microcell checkout: system packages, npm packages, the native addon (release), the
# TypeScript and the test guests. Idempotent: what is already in place is not done again (apt
# installs only what is missing, npm installs only when package-lock.json changed, cargo and tsc
# rebuild only what changed). Needs: cargo, Node.js >= 20.17 with npm; root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
for tool in cargo node npm; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: '$tool' is not installed: microcell needs Rust (cargo) and Node.js >= 20.17 with npm" >&2
    exit 1
  fi
done
node -e '
  const [major, minor] = process.versions.node.split(".").map(Number)
  if (major < 20 || (major === 20 && minor < 17)) {
    console.error(`error: Node.js >= 20.17 is needed, this is ${process.version}`)
    process.exit(1)
  }'
echo "cargo $(cargo --version | cut -d' ' -f2), node $(node --version), npm $(npm --version 2>/dev/null)"

step "system packages (gcc, binutils, libc6-dev, qemu-system-x86, passt)"
missing=()
command -v gcc >/dev/null || missing+=(gcc)
command -v ld >/dev/null || missing+=(binutils)
dpkg-query -W -f='${Status}' libc6-dev 2>/dev/null | grep -q "install ok installed" || missing+=(libc6-dev)
# QEMU: the engine for Linux guests where our VMM cannot boot them (PVM or no KVM), and the
# peer the benchmarks compare against.
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
# passt: the user-mode network behind the built-in VMM's virtio-net (engine kvm).
command -v passt >/dev/null || missing+=(passt)
if [ ${#missing[@]} -eq 0 ]; then
  echo "all present"
elif command -v apt-get >/dev/null; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "installing: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
else
  echo "error: missing ${missing[*]}, and there is no apt-get: install them with the system's package manager" >&2
  exit 1
fi

step "npm packages"
stamp=node_modules/.microcell-lock-sha256
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "up to date (package-lock.json unchanged)"
else
  # `npm install` from the lock rather than `npm ci`: a registry that lacks some other
  # platforms' optional binaries (of @napi-rs/cli's helpers) leaves them out of the lock, and
  # npm ci refuses such a lock. --no-save keeps package-lock.json as committed.
  npm install --no-save --no-audit --no-fund --loglevel=error </dev/null
  echo "$want" >"$stamp"
fi

step "native addon (napi build --release: crates/node -> native/)"
npm run --silent build:native </dev/null

step "TypeScript (tsc: src/ -> dist/)"
npm run --silent build:ts </dev/null

step "test guests (crates/testguest -> target/testguests/)"
cargo run -q -p microcell-testguest --bin testguest-export -- target/testguests </dev/null | sed 's/^/  /'

step "guest kernel (scripts/guest/build-kernel.sh; cached by the hash of its inputs)"
kernel="$(./scripts/guest/build-kernel.sh </dev/null)"
echo "  $kernel"

step "guest root disk with the agent (scripts/guest/build-rootfs.sh; cached likewise)"
rootfs="$(./scripts/guest/build-rootfs.sh </dev/null)"
echo "  $rootfs"

step "ready"
node -e '
  const { hostInfo } = require("./dist/index.js")
  const h = hostInfo()
  console.log(`host KVM: ${h.kvmFlavour} (Linux guests: ${h.canBootLinux ? "yes" : "no"}): ${h.reason}`)'

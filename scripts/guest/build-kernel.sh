#!/usr/bin/env bash
# Build (or find in the cache) the microcell guest kernel.
#
#   scripts/guest/build-kernel.sh            # build if needed
#   MICROCELL_CACHE=/some/dir scripts/guest/build-kernel.sh
#   scripts/guest/build-kernel.sh nested     # the L1 kernel of the nested T3 tier
#
# Flavours: `guest` (default) is the sandbox guest kernel (guest/kernel.config); `nested` is
# the kernel of the nested tier's L1 VM (guest/kernel.config + guest/nested-host.config: KVM
# with AMD SVM, namespaces and seccomp for passt), cached and built apart (kernel-nested-*).
# Source: Debian's linux-source-6.1 (installed with apt-get if missing).
# Config: `make ARCH=x86_64 tinyconfig` + guest/kernel.config, then olddefconfig; every
#         option the fragment sets is checked afterwards (the build fails listing the misses).
# Output: ${MICROCELL_CACHE:-$HOME/.cache/microcell}/kernel-<hash>/{vmlinux,bzImage,config,build.log,info}
#         where <hash> = sha256(fragments, this script, linux-source package version);
#         ${cache}/kernel-current -> kernel-<hash>.
#         vmlinux is stripped, its segments packed (compact-elf.py: 15 -> 10 MiB), and it
#         keeps its PVH note (XEN_ELFNOTE_PHYS32_ENTRY).
# Stage lines go to stderr; stdout gets one line, the path of vmlinux.
# Environment: MICROCELL_JOBS (default: nproc), MICROCELL_FORCE=1 rebuilds even on a cache hit.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
flavour=${1:-guest}
case "$flavour" in
  guest) fragments=("$repo/guest/kernel.config"); prefix=kernel ;;
  nested) fragments=("$repo/guest/kernel.config" "$repo/guest/nested-host.config"); prefix=kernel-nested ;;
  *) echo "usage: build-kernel.sh [guest|nested]" >&2; exit 2 ;;
esac
script="$here/build-kernel.sh"
compactor="$here/compact-elf.py"
cache=${MICROCELL_CACHE:-$HOME/.cache/microcell}
pkg=linux-source-6.1
jobs=${MICROCELL_JOBS:-$(nproc)}
t0=$SECONDS

say() { printf '[build-kernel %3ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { printf '[build-kernel] ERROR: %s\n' "$*" >&2; exit 1; }

apt_install() {
  say "installing with apt-get: $*"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 ||
      die "apt-get install $* failed"
  fi
}

pkg_version() { { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$3 == "installed" {print $4}'; }

# --- 1. which source version: installed one, else what apt would install -----------------
srcver=$(pkg_version "$pkg")
if [ -z "$srcver" ]; then
  srcver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$srcver" ] || [ "$srcver" = "(none)" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    srcver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  fi
  [ -n "$srcver" ] && [ "$srcver" != "(none)" ] || die "apt knows no $pkg"
fi

input_hash() { { cat "${fragments[@]}" "$script" "$compactor"; echo "$pkg=$1"; } | sha256sum | cut -c1-16; }
hash=$(input_hash "$srcver")
out="$cache/$prefix-$hash"

publish() {
  ln -sfn "$prefix-$hash" "$cache/$prefix-current"
  say "kernel: $out (vmlinux $(du -h "$out/vmlinux" | cut -f1), bzImage $(du -h "$out/bzImage" | cut -f1))"
  echo "$out/vmlinux"
}

if [ -z "${MICROCELL_FORCE:-}" ] && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  say "cached ($pkg $srcver, hash $hash): nothing to build"
  publish
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.$prefix.lock"
flock -n 9 || { say "waiting for another build holding $cache/.$prefix.lock"; flock 9; }
if [ -z "${MICROCELL_FORCE:-}" ] && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  say "built meanwhile by another run"
  publish
  exit 0
fi

# --- 2. tools and source -----------------------------------------------------------------
need=()
for p in "$pkg" gcc make bc bison flex libelf-dev xz-utils; do
  [ -n "$(pkg_version "$p")" ] || need+=("$p")
done
command -v python3 >/dev/null || need+=(python3-minimal)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
srcver=$(pkg_version "$pkg")
# the hash must describe what is really built
[ "$(input_hash "$srcver")" = "$hash" ] ||
  die "$pkg installed as $srcver, not the version the hash was computed for; run again"

tarball=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -1)
[ -n "$tarball" ] || die "no /usr/src/linux-source-6.1.tar.* after installing $pkg"
src="$cache/src/linux-source-$srcver"
if [ ! -f "$src/.unpacked" ]; then
  say "unpacking $tarball"
  rm -rf "$src" && mkdir -p "$src"
  tar -xf "$tarball" -C "$src" --strip-components=1
  touch "$src/.unpacked"
fi

# One build directory per source version: a changed fragment rebuilds incrementally.
suffix=""; [ "$flavour" = guest ] || suffix="-$flavour"
build="$cache/build/linux-$srcver$suffix"
mkdir -p "$build"
log="$build/build.log"
: >"$log"
mk() { nice -n 10 make -C "$src" O="$build" ARCH=x86_64 "$@" >>"$log" 2>&1; }

# --- 3. configure and check ----------------------------------------------------------------
say "configuring: tinyconfig + ${fragments[*]#$repo/}"
mk tinyconfig || { tail -30 "$log" >&2; die "make tinyconfig failed (log: $log)"; }
cat "${fragments[@]}" >>"$build/.config"
mk olddefconfig || { tail -30 "$log" >&2; die "make olddefconfig failed (log: $log)"; }

missing=()
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
    grep -qxF "$line" "$build/.config" ||
      missing+=("${BASH_REMATCH[1]} (wanted ${BASH_REMATCH[2]}, got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$build/.config" || echo 'absent'))")
  elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
    ! grep -qE "^${BASH_REMATCH[1]}=" "$build/.config" ||
      missing+=("${BASH_REMATCH[1]} (wanted unset, got: $(grep -E "^${BASH_REMATCH[1]}=" "$build/.config"))")
  fi
done < <(cat "${fragments[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  printf '[build-kernel] ERROR: %d requested option(s) did not end up in .config (unmet dependencies?):\n' "${#missing[@]}" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
say "config ok: all $(cat "${fragments[@]}" | grep -cE '^(CONFIG_|# CONFIG_.* is not set)') requested options set"

# --- 4. build ------------------------------------------------------------------------------
say "building vmlinux + bzImage with make -j$jobs (log: $log)"
mk -j"$jobs" vmlinux bzImage &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
tb=$SECONDS
while kill -0 "$pid" 2>/dev/null; do
  for _ in $(seq 30); do sleep 1; kill -0 "$pid" 2>/dev/null || break; done
  kill -0 "$pid" 2>/dev/null && say "still building… $((SECONDS - tb)) s ($(grep -c '^  [A-Z]' "$log" || true) steps so far)"
done
if ! wait "$pid"; then
  trap - EXIT
  tail -40 "$log" >&2
  die "kernel build failed (log: $log)"
fi
trap - EXIT
say "built in $((SECONDS - tb)) s"

# --- 5. collect ----------------------------------------------------------------------------
tmp="$out.tmp.$$"
rm -rf "$tmp" && mkdir -p "$tmp"
strip --strip-all -o "$tmp/vmlinux.stripped" "$build/vmlinux"
python3 "$compactor" "$tmp/vmlinux.stripped" "$tmp/vmlinux"
rm "$tmp/vmlinux.stripped"
cp "$build/arch/x86/boot/bzImage" "$tmp/bzImage"
cp "$build/.config" "$tmp/config"
cp "$log" "$tmp/build.log"
readelf -n "$tmp/vmlinux" | grep -q 'Xen.*0x00000012' || die "vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note"
release=$(cat "$build/include/config/kernel.release")
{
  echo "release=$release"
  echo "source=$pkg $srcver"
  echo "hash=$hash"
  echo "vmlinux_bytes=$(stat -c %s "$tmp/vmlinux")"
  echo "vmlinux_unstripped_bytes=$(stat -c %s "$build/vmlinux")"
  echo "bzImage_bytes=$(stat -c %s "$tmp/bzImage")"
  echo "build_seconds=$((SECONDS - tb))"
  echo "jobs=$jobs"
} >"$tmp/info"
max=$((12 * 1024 * 1024))
for f in vmlinux bzImage; do
  [ "$(stat -c %s "$tmp/$f")" -le $max ] || say "WARNING: $f is larger than 12 MiB"
done
rm -rf "$out" && mv "$tmp" "$out"
say "kernel $release ready"
publish

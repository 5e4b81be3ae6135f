#!/usr/bin/env bash
# Build (or find in the cache) the microcell guest root disk: an ext4 image with
# busybox (static) and the agent as /sbin/init.
#
#   scripts/guest/build-rootfs.sh
#   MICROCELL_AGENT=/path/to/static/agent scripts/guest/build-rootfs.sh   # skip the cargo build
#
# Output: ${MICROCELL_CACHE:-$HOME/.cache/microcell}/rootfs-<hash>/{rootfs.ext4,info}
#         where <hash> = sha256(agent binary, busybox-static version, this script);
#         ${cache}/rootfs-current -> rootfs-<hash>.
# The image is made with `mkfs.ext4 -d` from a staging directory: no loop mounts, no
# root needed beyond apt (run as root so that the files in the image belong to root).
# Stage lines go to stderr; stdout gets one line, the path of rootfs.ext4.
# Environment: MICROCELL_ROOTFS_MB (image size, default 64), MICROCELL_FORCE=1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${MICROCELL_CACHE:-$HOME/.cache/microcell}
size_mb=${MICROCELL_ROOTFS_MB:-64}
t0=$SECONDS

say() { printf '[build-rootfs %3ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }
die() { printf '[build-rootfs] ERROR: %s\n' "$*" >&2; exit 1; }
pkg_version() { { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$3 == "installed" {print $4}'; }

need=()
for p in busybox-static e2fsprogs; do
  [ -n "$(pkg_version "$p")" ] || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing with apt-get: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 || die "apt-get install ${need[*]} failed"
  }
fi
busybox=/bin/busybox
file -L "$busybox" 2>/dev/null | grep -q 'statically linked' || [ -z "$(command -v file)" ] ||
  die "$busybox is not the static busybox (install busybox-static)"

agent=${MICROCELL_AGENT:-$("$here/build-agent.sh")}
[ -x "$agent" ] || die "no agent binary at $agent"

hash=$( {
  sha256sum <"$agent"
  echo "busybox-static=$(pkg_version busybox-static) size=$size_mb"
  cat "$here/build-rootfs.sh"
} | sha256sum | cut -c1-16)
out="$cache/rootfs-$hash"

publish() {
  ln -sfn "rootfs-$hash" "$cache/rootfs-current"
  say "rootfs: $out/rootfs.ext4 ($(grep -E '^(files|gzip)_bytes' "$out/info" | tr '\n' ' '))"
  echo "$out/rootfs.ext4"
}

if [ -z "${MICROCELL_FORCE:-}" ] && [ -f "$out/rootfs.ext4" ]; then
  say "cached (hash $hash): nothing to build"
  publish
  exit 0
fi

mkdir -p "$cache"
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp" && mkdir -p "$tmp"
root="$tmp/root"

say "staging the tree"
mkdir -p "$root"/{bin,sbin,etc,dev,proc,sys,tmp,run,root,mnt,var/tmp,usr/bin,usr/sbin}
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  case "$applet" in
    busybox | init | linuxrc) ;;
    *) ln -s busybox "$root/bin/$applet" ;;
  esac
done
install -m 0755 "$agent" "$root/sbin/init"
echo microcell >"$root/etc/hostname"
cat >"$root/etc/passwd" <<'EOT'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOT
cat >"$root/etc/group" <<'EOT'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOT
cat >"$root/etc/hosts" <<'EOT'
127.0.0.1 localhost
::1 localhost
EOT
: >"$root/etc/resolv.conf"
ln -s /proc/self/mounts "$root/etc/mtab"

say "mkfs.ext4 -d (${size_mb} MiB, no journal)"
truncate -s "${size_mb}M" "$tmp/rootfs.ext4"
# No journal: the root disk of a throwaway VM gains nothing from one and it costs 4 MiB
# and a replay check at mount. Fixed UUID and hash seed: same inputs, same image.
E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -q -F -L microcell-root -O ^has_journal -m 0 \
  -U 6d696372-6f63-656c-6c00-000000000001 -E root_owner=0:0,hash_seed=6d696372-6f63-656c-6c00-000000000002 \
  -d "$root" "$tmp/rootfs.ext4" >&2 || die "mkfs.ext4 failed"
e2fsck -fn "$tmp/rootfs.ext4" >/dev/null 2>&1 || die "e2fsck finds the new image inconsistent"

gz=$(gzip -1 -c "$tmp/rootfs.ext4" | wc -c)
{
  echo "hash=$hash"
  echo "image_bytes=$(stat -c %s "$tmp/rootfs.ext4")"
  echo "files_bytes=$(du -sb "$root" | cut -f1)"
  echo "gzip_bytes=$gz"
  echo "busybox_static=$(pkg_version busybox-static)"
  echo "agent_sha256=$(sha256sum <"$agent" | cut -c1-64)"
} >"$tmp/info"
[ "$gz" -le $((8 * 1024 * 1024)) ] || say "WARNING: compressed image is larger than 8 MiB"
rm -rf "$root"
rm -rf "$out" && mv "$tmp" "$out"
trap - EXIT
publish

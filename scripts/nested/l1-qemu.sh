#!/usr/bin/env bash
# Print the QEMU binary that runs the nested tier's L1 VM (scripts/nested/run-t3.sh).
#
# L1 runs on QEMU 10 from Debian's bookworm-backports, not on bookworm's QEMU 7.2: under 7.2's
# multi-threaded TCG, L1's own kernel now and then double-faulted inside KVM's svm_vcpu_run (a
# not-present direct-map page, one vCPU thread on two L1 CPUs at once), which ended the run;
# on 10.0 it was not seen in two runs.
# The package is fetched with `apt-get download` (its own sources list and state under the
# cache, so the host's apt setup and its installed QEMU stay as they are) and unpacked with
# `dpkg -x` into ${MICROCELL_CACHE:-~/.cache/microcell}/qemu-<version>/, keyed by its version.
# Its libraries are bookworm's (it is a backport); its firmware is found relative to the binary,
# and microvm's bios (bios-microvm.bin) comes from the host's seabios (-L /usr/share/seabios).
#
# MICROCELL_NESTED_QEMU=/path/to/qemu-system-x86_64 uses that binary instead (no download).
set -euo pipefail
if [ -n "${MICROCELL_NESTED_QEMU:-}" ]; then
  echo "$MICROCELL_NESTED_QEMU"
  exit 0
fi
cache=${MICROCELL_CACHE:-$HOME/.cache/microcell}
say() { printf '[l1-qemu] %s\n' "$*" >&2; }
apt_dir="$cache/apt-backports"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
cat >"$apt_dir/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
EOF
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1
  -o APT::Sandbox::User=root)

# The version: from the index, refreshed at most once a day (offline, the newest cached one).
stamp="$apt_dir/updated"
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440)" ]; then
  say "reading bookworm-backports' package index"
  if apt-get "${apt_opts[@]}" update -qq >&2; then touch "$stamp"; else say "apt-get update failed: using the cached index"; fi
fi
version=$(apt-cache "${apt_opts[@]}" madison qemu-system-x86 2>/dev/null | awk -F' *\\| *' '$3 ~ /bookworm-backports/ {print $2; exit}')
if [ -z "$version" ]; then
  newest=$(ls -d "$cache"/qemu-*/usr/bin/qemu-system-x86_64 2>/dev/null | sort -V | tail -1)
  [ -n "$newest" ] || { say "ERROR: no qemu-system-x86 in bookworm-backports' index and none cached"; exit 1; }
  echo "$newest"
  exit 0
fi
dir="$cache/qemu-${version//[:~+]/_}"
bin="$dir/usr/bin/qemu-system-x86_64"
if [ ! -x "$bin" ]; then
  say "fetching qemu-system-x86 $version (bookworm-backports) into $dir"
  tmp=$(mktemp -d "$cache/qemu-tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get "${apt_opts[@]}" download -q \
    "qemu-system-x86=$version" "qemu-system-data=$version" "qemu-system-common=$version" >&2)
  mkdir -p "$tmp/root"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/root"; done
  "$tmp/root/usr/bin/qemu-system-x86_64" --version >&2
  rm -rf "$dir" && mv "$tmp/root" "$dir"
fi
echo "$bin"

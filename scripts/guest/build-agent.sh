#!/usr/bin/env bash
# Build the guest agent as a static binary and print its path (stdout, one line).
#
# The +crt-static flag is passed here, for this one build, with an explicit --target (so it
# does not reach build scripts and proc-macros) and a target dir of its own (so it does not
# invalidate, or get invalidated by, the workspace's ordinary builds, e.g. the napi cdylib).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=x86_64-unknown-linux-gnu
target_dir="$repo/target/guest"
bin="$target_dir/$target/release/microcell-agent"
t0=$SECONDS

say() { printf '[build-agent %3ds] %s\n' "$((SECONDS - t0))" "$*" >&2; }

say "cargo build --release -p microcell-agent --target $target (+crt-static)"
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
  nice -n 10 cargo build --manifest-path "$repo/Cargo.toml" --release -q -p microcell-agent \
  --target "$target" --target-dir "$target_dir" >&2

if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q 'NEEDED'; then
  echo "[build-agent] ERROR: $bin is not statically linked" >&2
  exit 1
fi
say "static agent: $bin ($(stat -c %s "$bin") bytes)"
echo "$bin"

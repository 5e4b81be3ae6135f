#!/usr/bin/env bash
# The repo checks itself: formatting (cargo fmt, rustfmt.toml), clippy with warnings as errors on
# every crate and target, and the TypeScript of src/ (tsc --noEmit; the typed usage checks are
# types.spec.mjs).
# Each check counts as a test; ends with the line the test summary counts:
# "test result: ok. N passed; N failed; 0 ignored (lint: ...)".
#
#   scripts/lint.sh          all three
#   scripts/lint.sh --fix    cargo fmt (writes), then the checks
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[ "${1:-}" = --fix ] && cargo fmt --all

passed=0 failed=0
check() {
  local name=$1
  shift
  printf '\n==> lint: %s\n' "$*"
  if "$@" </dev/null; then
    passed=$((passed + 1))
  else
    echo "lint: $name FAILED (scripts/lint.sh --fix formats; clippy and tsc say what to change)"
    failed=$((failed + 1))
  fi
}
check fmt cargo fmt --all --check
check clippy cargo clippy --workspace --all-targets -q -- -D warnings
check tsc npx tsc --noEmit -p tsconfig.json

status=ok
[ "$failed" = 0 ] || status=FAILED
echo "test result: $status. $passed passed; $failed failed; 0 ignored (lint: fmt, clippy, tsc)"
[ "$failed" = 0 ]

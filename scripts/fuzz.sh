#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for a bounded time, from the corpus
# kept in the repo (fuzz/corpus/<target>), and fails on the first crash, leak or timeout.
#
#   scripts/fuzz.sh                      every target, MICROCELL_FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh virtio_mmio          one target
#   MICROCELL_FUZZ_MERGE=1 scripts/fuzz.sh   also merges what was found into fuzz/corpus (to commit)
#
# cargo-fuzz needs nightly flags (-Z sanitizer); this machine has only stable Rust, so they are
# enabled with RUSTC_BOOTSTRAP=1, for the fuzz build only. cargo-fuzz itself is installed into
# ~/.cargo/bin when missing. Ends with one line the test summary counts:
# "test result: ok. N passed; N failed; 0 ignored" (a target is a test: it passes when no input
# made it fail within its time).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=${MICROCELL_FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(protocol_frames tree_writer snapshot_state virtio_mmio)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked --version 0.13.2 </dev/null
fi
export RUSTC_BOOTSTRAP=1
echo "==> cargo fuzz build -O"
cargo fuzz build -O </dev/null 2>&1 | tail -3

passed=0 failed=0
work=$(mktemp -d)
# The targets' scratch files (scratch.rs) go with the run.
trap 'rm -rf "$work" /dev/shm/microcell-fuzz-* "${TMPDIR:-/tmp}"/microcell-fuzz-*' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "$work/$t"
  log="$work/$t.log"
  echo "==> fuzz $t for ${seconds}s (corpus: $(find "corpus/$t" -type f | wc -l) inputs)"
  # New inputs go to the scratch corpus (first dir); the repo's corpus is read only.
  if cargo fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      </dev/null >"$log" 2>&1; then
    runs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo '?')
    cov=$(grep -oE 'DONE +cov: [0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || echo '?')
    echo "fuzz $t: ok, $runs runs in ${seconds}s, coverage $cov edges, no crash"
    passed=$((passed + 1))
    if [ "${MICROCELL_FUZZ_MERGE:-0}" = 1 ]; then
      cargo fuzz cmin -O "$t" "corpus/$t" </dev/null >/dev/null 2>&1 || true
      cp -n "$work/$t"/* "corpus/$t"/ 2>/dev/null || true
      cargo fuzz cmin -O "$t" "corpus/$t" </dev/null >/dev/null 2>&1 || true
    fi
  else
    echo "fuzz $t: FAILED (the input is under fuzz/artifacts/$t/); its log ends:"
    grep -E 'panicked|ERROR|SUMMARY|==[0-9]+==|Test unit written' "$log" | head -20 || tail -30 "$log"
    failed=$((failed + 1))
  fi
done
status=ok
[ "$failed" = 0 ] || status=FAILED
echo "test result: $status. $passed passed; $failed failed; 0 ignored (fuzz targets, ${seconds}s each)"
[ "$failed" = 0 ]

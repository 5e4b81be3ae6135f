#!/usr/bin/env bash
# Sets up (./scripts/setup.sh), then runs every test tier that exists:
#   cargo test --workspace   T0 unit tests; T1 VMM tests with the test guests on /dev/kvm
#   ava (npm test)           T0 config/host tests; T1 boots through the Node API;
#                            T2 the guest platform through Sandbox on engine qemu; T3 the same
#                            on engine kvm
#   install test             __test__/install/install.test.mjs (node --test): packs every package
#                            (scripts/pack.mjs), npm installs the tarballs into an empty directory
#                            with an empty HOME and uses microcell from there as a user would
#   scripts/lint.sh          cargo fmt --check, cargo clippy -D warnings, tsc --noEmit: each a test
#   scripts/fuzz.sh          the fuzz targets (fuzz/), MICROCELL_FUZZ_SECONDS (60) each, from the
#                            corpus in the repo: each target counts as a test
#   scripts/nested/run-t3.sh T3 inside a nested VM (QEMU-TCG with SVM), where this host's KVM
#                            cannot boot Linux (PVM, or no KVM) and MICROCELL_NESTED=1: the Rust
#                            and ava T3 tests on engine kvm, counted like the others
# and ends with one summary line: "summary: N passed, N failed, N skipped".
#
# Tests that need KVM are #[ignore]d in Rust (counted as skipped by a plain `cargo test`); this
# script includes them where the host can run them. The nested tier runs with MICROCELL_NESTED=1
# (opt-in for now: under QEMU-TCG's emulated SVM the L2 guest now and then takes an exception
# with an all-zero frame and dies, which makes every run a gamble: scripts/nested/run-t3.sh);
# without it T3 counts as skipped, with the reason printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh

log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT
status=0

# What this host runs: T1 where /dev/kvm works; T3 here where it boots Linux, else nested.
read -r kvm_device linux_kvm < <(node -e '
  const h = require("./dist/index.js").hostInfo()
  console.log(h.kvmDevice ? 1 : 0, h.canBootLinux ? 1 : 0)')
nested=0
[ "$linux_kvm" = 1 ] || [ "${MICROCELL_NESTED:-0}" != 1 ] || nested=1
test_args=(--skip helper_)
[ "$kvm_device" = 1 ] && test_args+=(--include-ignored)
# T3 where this host cannot boot Linux: in the nested VM, or counted as skipped (ignored) below.
[ "$linux_kvm" = 1 ] || test_args+=(--skip t3_)
ava_env=()
[ "$nested" = 1 ] && ava_env=(MICROCELL_TIERS=T2)

printf '\n==> %s\n' "cargo test --workspace -- ${test_args[*]}"
cargo_status=0
cargo test --workspace -- "${test_args[@]}" </dev/null 2>&1 | tee "$log_dir/cargo.log" || cargo_status=$?
if [ "$linux_kvm" = 0 ] && [ "$nested" = 0 ]; then
  printf '\n==> %s\n' "T3 (Rust) on this host: counted as skipped (needs KVM that boots Linux; MICROCELL_NESTED=1 runs it nested)"
  cargo test -p microcell-sandbox --test t3_kvm -- t3_ </dev/null 2>&1 | tee -a "$log_dir/cargo.log" || cargo_status=$?
fi

printf '\n==> %s\n' "lint (scripts/lint.sh)"
./scripts/lint.sh </dev/null 2>&1 | tee -a "$log_dir/cargo.log" || cargo_status=$?

printf '\n==> %s\n' "fuzz targets (scripts/fuzz.sh)"
./scripts/fuzz.sh </dev/null 2>&1 | tee -a "$log_dir/cargo.log" || cargo_status=$?

printf '\n==> %s\n' "ava (npm test) ${ava_env[*]}"
ava_status=0
env "${ava_env[@]}" npm test --silent </dev/null 2>&1 | tee "$log_dir/ava.log" || ava_status=$?

printf '\n==> %s\n' "install like a user (__test__/install/install.test.mjs: pack, npm install into an empty HOME)"
install_status=0
node --test --test-reporter=tap __test__/install/install.test.mjs </dev/null 2>&1 | tee "$log_dir/install.log" || install_status=$?

nested_status=0
: >"$log_dir/nested.log"
if [ "$nested" = 1 ]; then
  printf '\n==> %s\n' "T3 in the nested VM (scripts/nested/run-t3.sh)"
  ./scripts/nested/run-t3.sh </dev/null 2>&1 | tee "$log_dir/nested.log" || nested_status=$?
fi

# Count: cargo's "test result: ok. P passed; F failed; I ignored" lines, and ava's closing
# "N tests passed / N tests failed / N tests skipped" (a single test says "1 test passed").
# A runner that exits non-zero without a counted failure (a build error) counts as one failure.
node - "$log_dir" "$cargo_status" "$ava_status" "$nested" "$nested_status" "$install_status" <<'JS' || status=1
const fs = require('node:fs')
const [dir, cargoStatus, avaStatus, nested, nestedStatus, installStatus] = process.argv.slice(2).map((x, i) => (i === 0 ? x : Number(x)))
const read = (f) => fs.readFileSync(`${dir}/${f}`, 'utf8').replace(/\x1b\[[0-9;]*m/g, '')
let passed = 0, failed = 0, skipped = 0
// One runner's log: cargo's "test result: ok. P passed; F failed; I ignored" lines and ava's
// closing "N tests passed / failed / skipped" lines; a non-zero exit without a counted failure
// (a build error, a VM that did not come up) counts as one failure.
function count(name, log, status, { ava, tap = false }) {
  let f = 0
  // node --test's TAP summary: "# pass N", "# fail N", "# skipped N" (cancelled ones failed).
  if (tap) {
    const n = (what) => [...log.matchAll(new RegExp(`^# ${what} (\\d+)$`, 'gm'))].reduce((k, m) => k + +m[1], 0)
    passed += n('pass'); f += n('fail') + n('cancelled'); skipped += n('skipped')
    if (!/^# pass \d+$/m.test(log)) { console.error(`test.sh: ${name}: cannot find the test runner's summary`); f += 1 }
    if (status !== 0 && f === 0) { console.error(`test.sh: ${name} exited ${status} without a failed test`); f += 1 }
    failed += f
    return
  }
  for (const m of log.matchAll(/test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored/g)) {
    passed += +m[1]; f += +m[2]; skipped += +m[3]
  }
  const n = (what) => [...log.matchAll(new RegExp(`^\\s*(\\d+) tests? ${what}`, 'gm'))].reduce((k, m) => k + +m[1], 0)
  passed += n('passed'); f += n('failed'); skipped += n('skipped')
  // ava prints no "passed" line when some failed ("N tests failed", then the list): its passes
  // are then its "✔ " result lines (one per passed test, on a reporter without a TTY).
  if (ava && n('passed') === 0 && n('failed') > 0) passed += (log.match(/^\s*✔ /gm) ?? []).length
  if (ava && !/tests? (passed|failed)/.test(log)) { console.error(`test.sh: ${name}: cannot find ava's result line`); f += 1 }
  if (status !== 0 && f === 0) { console.error(`test.sh: ${name} exited ${status} without a failed test`); f += 1 }
  failed += f
}
count('cargo test', read('cargo.log'), cargoStatus, { ava: false })
count('ava', read('ava.log'), avaStatus, { ava: true })
count('the install test', read('install.log'), installStatus, { ava: false, tap: true })
if (nested) count('the nested T3 tier', read('nested.log'), nestedStatus, { ava: true })
console.log(`\nsummary: ${passed} passed, ${failed} failed, ${skipped} skipped`)
process.exit(failed > 0 ? 1 : 0)
JS
exit $status

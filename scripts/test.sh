#!/usr/bin/env bash
# Sets up (./scripts/setup.sh), then runs every test tier that exists:
#   cargo test --workspace   T0 unit tests; T1 VMM tests with the test guests on /dev/kvm
#   ava (npm test)           T0 config/host tests; T1 boots through the Node API;
#                            T2/T3 skipped, each with its reason printed
# and ends with one summary line: "summary: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh

log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT
status=0

printf '\n==> %s\n' "cargo test --workspace"
cargo test --workspace </dev/null 2>&1 | tee "$log_dir/cargo.log" || status=1

printf '\n==> %s\n' "ava (npm test)"
npm test --silent </dev/null 2>&1 | tee "$log_dir/ava.log" || status=1

# Count: cargo's "test result: ok. P passed; F failed; I ignored" lines, and ava's closing
# "N tests passed / N tests failed / N tests skipped" (a single test says "1 test passed").
node - "$log_dir/cargo.log" "$log_dir/ava.log" <<'JS' || status=1
const fs = require('node:fs')
const [cargoLog, avaLog] = process.argv.slice(2).map((f) => fs.readFileSync(f, 'utf8').replace(/\x1b\[[0-9;]*m/g, ''))
let passed = 0, failed = 0, skipped = 0
for (const m of cargoLog.matchAll(/test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored/g)) {
  passed += +m[1]; failed += +m[2]; skipped += +m[3]
}
const ava = (what) => [...avaLog.matchAll(new RegExp(`^\\s*(\\d+) tests? ${what}`, 'gm'))].reduce((n, m) => n + +m[1], 0)
const avaPassed = ava('passed'), avaFailed = ava('failed'), avaSkipped = ava('skipped')
// ava prints no "passed" line when some failed; it says "N tests failed" and lists them.
const avaKnown = /tests? (passed|failed)/.test(avaLog)
if (!avaKnown) { console.error('test.sh: cannot find ava\'s result line'); failed += 1 }
passed += avaPassed; failed += avaFailed; skipped += avaSkipped
console.log(`\nsummary: ${passed} passed, ${failed} failed, ${skipped} skipped`)
process.exit(failed > 0 ? 1 : 0)
JS
exit $status

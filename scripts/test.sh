#!/usr/bin/env bash
# Sets up (./scripts/setup.sh), then runs every test tier that exists:
#   cargo test --workspace   T0 unit tests; T1 VMM tests with the test guests on /dev/kvm
#   ava (npm test)           T0 config/host tests; T1 boots through the Node API;
#                            T2 the guest platform through Sandbox on engine qemu; T3 the same
#                            on engine kvm (skipped, with the reason printed, without hardware KVM)
# and ends with one summary line: "summary: N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup.sh

log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT
status=0

printf '\n==> %s\n' "cargo test --workspace"
cargo_status=0
cargo test --workspace </dev/null 2>&1 | tee "$log_dir/cargo.log" || cargo_status=$?

printf '\n==> %s\n' "ava (npm test)"
ava_status=0
npm test --silent </dev/null 2>&1 | tee "$log_dir/ava.log" || ava_status=$?

# Count: cargo's "test result: ok. P passed; F failed; I ignored" lines, and ava's closing
# "N tests passed / N tests failed / N tests skipped" (a single test says "1 test passed").
# A runner that exits non-zero without a counted failure (a build error) counts as one failure.
node - "$log_dir/cargo.log" "$log_dir/ava.log" "$cargo_status" "$ava_status" <<'JS' || status=1
const fs = require('node:fs')
const [cargoLog, avaLog] = process.argv.slice(2, 4).map((f) => fs.readFileSync(f, 'utf8').replace(/\x1b\[[0-9;]*m/g, ''))
const [cargoStatus, avaStatus] = process.argv.slice(4, 6).map(Number)
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
const cargoFailed = [...cargoLog.matchAll(/test result: \w+\. \d+ passed; (\d+) failed/g)].reduce((n, m) => n + +m[1], 0)
if (cargoStatus !== 0 && cargoFailed === 0) { console.error(`test.sh: cargo test exited ${cargoStatus} without a failed test (a build error?)`); failed += 1 }
if (avaStatus !== 0 && avaFailed === 0) { console.error(`test.sh: ava exited ${avaStatus} without a failed test`); failed += 1 }
console.log(`\nsummary: ${passed} passed, ${failed} failed, ${skipped} skipped`)
process.exit(failed > 0 ? 1 : 0)
JS
exit $status

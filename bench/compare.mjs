// `npm run bench:compare -- REV [ROUNDS]`: is this checkout slower than REV? Builds REV in a git
// worktree (build/compare-REV, sharing node_modules and target/ with this checkout), then runs
// this checkout's bench/start.mjs and bench/restore.mjs against each tree's build, in alternating
// rounds on this host (so host drift hits both alike), this tree also with seccomp off
// (MICROCELL_SECCOMP=0). Each result row is the median over the rounds of each round's p50 and
// p90 (n: all samples); QEMU's rows come from this tree's runs. Not a test: the figures go to
// bench/results/compare.{json,md}.
import { execFileSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import { percentile, root, write } from './lib.mjs'

const [rev, roundsArg] = process.argv.slice(2)
if (!rev || rev === '--help') {
  console.log('usage: npm run bench:compare -- REV [ROUNDS]   (REV: a commit of this repository; ROUNDS: default 5)')
  process.exit(rev ? 0 : 2)
}
const ROUNDS = Number(roundsArg ?? 5)
const sh = (cmd, args, opts = {}) => execFileSync(cmd, args, { stdio: ['ignore', 'inherit', 'inherit'], ...opts })
const short = execFileSync('git', ['rev-parse', '--short', rev], { cwd: root, encoding: 'utf8' }).trim()
const head = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: root, encoding: 'utf8' }).trim()

// The base tree, built once (a second run reuses it).
const base = path.join(root, 'build', `compare-${short}`)
if (!fs.existsSync(path.join(base, 'dist', 'index.js'))) {
  fs.rmSync(base, { recursive: true, force: true })
  sh('git', ['worktree', 'add', '--force', '--detach', base, short], { cwd: root })
  fs.symlinkSync(path.join(root, 'node_modules'), path.join(base, 'node_modules'))
  fs.symlinkSync(path.join(root, 'target'), path.join(base, 'target'))
  console.error(`bench:compare: building ${short} in ${base}`)
  sh('npm', ['run', '--silent', 'build'], { cwd: base })
}

/** Runs one benchmark of one tree; returns its results (read from that tree's bench/results). */
function runOnce(tree, bench, env) {
  const out = path.join(root, 'build', 'compare-results', path.basename(tree))
  // Both trees are measured by this checkout's bench scripts: a change in how a figure is
  // measured must not read as a change in speed. (`import 'microcell'` resolves to the tree's own build.)
  if (tree !== root) for (const f of [`${bench}.mjs`, 'lib.mjs']) fs.copyFileSync(path.join(root, 'bench', f), path.join(tree, 'bench', f))
  sh(process.execPath, [path.join(tree, 'bench', `${bench}.mjs`)], {
    cwd: tree,
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...process.env, MICROCELL_BENCH_RESULTS: out, ...env },
  })
  // Older trees write to their own bench/results whatever the variable says.
  const file = [path.join(out, `${bench}.json`), path.join(tree, 'bench', 'results', `${bench}.json`)].find(fs.existsSync)
  const doc = JSON.parse(fs.readFileSync(file, 'utf8'))
  if (tree !== root) sh('git', ['checkout', '--', 'bench'], { cwd: tree })
  fs.rmSync(out, { recursive: true, force: true })
  return doc.results
}

const trees = [
  { system: `microcell@${short}`, tree: base, env: {} },
  { system: `microcell@${head}`, tree: root, env: {} },
  { system: `microcell@${head} seccomp off`, tree: root, env: { MICROCELL_SECCOMP: '0' } },
]
const quick = { BENCH_QEMU_RUNS: '3', BENCH_QEMU_RUNS_LARGE: '1', MICROCELL_FIRECRACKER: '' }
const rows = new Map()
for (const bench of ['start', 'restore']) {
  for (let round = 0; round < ROUNDS; round++) {
    for (const { system, tree, env } of trees) {
      // QEMU's own figures only once, in full, from this tree's last round.
      const last = round === ROUNDS - 1 && tree === root && !env.MICROCELL_SECCOMP
      console.error(`bench:compare: ${bench} round ${round + 1}/${ROUNDS}: ${system}`)
      for (const r of runOnce(tree, bench, last ? env : { ...env, ...quick })) {
        const isPeer = r.system !== 'microcell'
        if (isPeer && !last) continue
        const key = JSON.stringify([isPeer ? r.system : system, bench, r.case, r.metric])
        const row = rows.get(key) ?? { system: isPeer ? r.system : system, bench, case: r.case, metric: r.metric, unit: r.unit, p50s: [], p90s: [], n: 0 }
        row.p50s.push(r.p50)
        row.p90s.push(r.p90)
        row.n += r.n
        rows.set(key, row)
      }
    }
  }
}

const results = [...rows.values()].map((r) => ({
  system: r.system,
  case: `${r.bench}: ${r.case}`,
  metric: r.metric,
  unit: r.unit,
  p50: +percentile(r.p50s, 0.5).toFixed(3),
  p90: +percentile(r.p90s, 0.5).toFixed(3),
  n: r.n,
}))
const p50 = (system, kase, metric) => results.find((r) => r.system === system && r.case === kase && r.metric === metric)?.p50
const ratios = []
for (const r of results.filter((x) => x.system === `microcell@${head}` && x.unit === 'ms')) {
  const before = p50(`microcell@${short}`, r.case, r.metric)
  if (before) ratios.push(`- ${r.case} ${r.metric}: ${head} / ${short} = ${(r.p50 / before).toFixed(2)}x`)
}
write('compare', results, [
  `${short} against ${head} (this tree), ${ROUNDS} alternating rounds of bench/start.mjs and bench/restore.mjs each; a row's p50 and p90 are the medians over the rounds of each round's p50 and p90; n counts every sample.`,
  `QEMU rows: this tree's last round (its full QEMU run counts). Ratios of the medians (p50), this tree over ${short}:`,
  '',
  ...ratios,
])

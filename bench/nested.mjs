// `npm run bench:nested`: the built-in VMM (engine kvm) beside QEMU -enable-kvm (engine qemu) on
// the same KVM, inside the nested tier's L1 VM (scripts/nested/run-t3.sh: QEMU-TCG with SVM on
// a host without hardware KVM). Both engines boot the same guest kernel, root disk and agent
// through the same Sandbox API, so the ratio kvm / qemu is the figure; the absolute numbers are
// those of a guest two levels deep under software emulation and mean little.
// Measured per engine: Sandbox.create() → agent ready, exec('true') round trip, a snapshot's
// Sandbox.fromSnapshot() → its first command's result, and a warm SandboxPool (of clones of that
// snapshot) acquire() → first command's result. Firecracker joins when MICROCELL_FIRECRACKER
// names a binary L1 can run (none is built or shipped here).
// On a host whose own KVM boots Linux the same measurements run directly, without L1.
// Not a test: numbers go to bench/results/nested.{json,md}.
import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { Sandbox, SandboxPool, hostInfo } from 'microcell'

import { firecrackerBinary, firstExecMs, root, summary, write } from './lib.mjs'

const info = hostInfo()
const inside = process.argv.includes('--inside')

if (!inside && !info.canBootLinux) {
  // The outer host: run this script again inside L1 and bring its results back.
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-bench-nested-'))
  const outer = `${os.cpus()[0]?.model ?? 'unknown'}, ${os.cpus().length} cores, Linux ${os.release()}, KVM ${info.kvmFlavour}`
  const r = spawnSync(path.join(root, 'scripts', 'nested', 'run-t3.sh'), ['--', 'node', 'bench/nested.mjs', '--inside'], {
    stdio: 'inherit',
    env: { ...process.env, MICROCELL_NESTED_OUT: out, MICROCELL_BENCH_OUTER_HOST: outer },
  })
  if (r.status !== 0) {
    console.error(`bench:nested: the nested run failed (exit ${r.status})`)
    process.exit(1)
  }
  for (const f of ['nested.json', 'nested.md']) fs.copyFileSync(path.join(out, f), path.join(root, 'bench', 'results', f))
  fs.rmSync(out, { recursive: true, force: true })
  console.log('bench:nested: results in bench/results/nested.{json,md}')
  process.exit(0)
}

if (process.env.MICROCELL_NESTED_OUT_DIR) process.env.MICROCELL_BENCH_RESULTS = process.env.MICROCELL_NESTED_OUT_DIR
const RUNS = Number(process.env.BENCH_RUNS ?? 8)
const EXECS = Number(process.env.BENCH_EXECS ?? 40)
const MIB = 256
const ms = (ns) => Number(ns) / 1e6
const since = (t0) => ms(process.hrtime.bigint() - t0)
const p50 = (v) => summary('', '', '', '', v).p50
const engines = ['kvm', 'qemu']
const results = []
const notes = []
const byEngine = {}

for (const engine of engines) {
  const builder = (name) => Sandbox.builder(name).engine(engine).memory(MIB)
  const m = { create: [], exec: [], restore: [], pool: [] }
  let detail = ''
  // Boot: one warm-up, then RUNS boots, each stopped.
  for (let i = -1; i < RUNS; i++) {
    const t0 = process.hrtime.bigint()
    const sb = await builder('bench').create()
    const t = since(t0)
    detail = sb.info.engineDetail
    await sb.kill()
    if (i >= 0) m.create.push(t)
  }
  // Exec round trip on one sandbox; then its snapshot is the clones' origin.
  const origin = await builder('bench-origin').create()
  for (let i = -3; i < EXECS; i++) {
    const t0 = process.hrtime.bigint()
    const r = await origin.exec('true')
    const t = since(t0)
    if (r.exitCode !== 0) throw new Error(`exec true: ${JSON.stringify(r)}`)
    if (i >= 0) m.exec.push(t)
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-bench-snap-'))
  await origin.snapshot(dir)
  await origin.kill()
  for (let i = -1; i < RUNS; i++) {
    const t = await firstExecMs(() => Sandbox.fromSnapshot(dir))
    if (i >= 0) m.restore.push(t)
  }
  const pool = new SandboxPool({ snapshot: dir, size: 2 })
  try {
    for (let i = -1; i < RUNS; i++) {
      await pool.filled()
      const t = await firstExecMs(() => pool.acquire())
      if (i >= 0) m.pool.push(t)
    }
  } finally {
    await pool.close({ killAcquired: true })
    fs.rmSync(dir, { recursive: true, force: true })
  }
  const system = engine === 'kvm' ? 'microcell' : 'qemu'
  const kase = `engine ${engine} in L1, ${MIB}MiB, 1 vCPU`
  results.push(
    summary(system, kase, 'create_to_agent_ready', 'ms', m.create),
    summary(system, kase, 'exec_true_round_trip', 'ms', m.exec),
    summary(system, kase, 'fromSnapshot_to_first_exec', 'ms', m.restore),
    summary(system, `${kase}, SandboxPool of the snapshot, size 2, warm`, 'acquire_to_first_exec', 'ms', m.pool),
  )
  notes.push(`engine ${engine}: ${detail}.`)
  byEngine[engine] = m
}

const ratio = (k) => (p50(byEngine.kvm[k]) / p50(byEngine.qemu[k])).toFixed(2)
notes.unshift(
  `Ratios microcell (engine kvm) / QEMU -enable-kvm (engine qemu), p50, same L1, same guest: ` +
    `boot → ready ${ratio('create')}, exec round trip ${ratio('exec')}, snapshot → first command ${ratio('restore')}, ` +
    `pool acquire → first command ${ratio('pool')} (below 1: microcell is faster).`,
  `Where: ${process.env.MICROCELL_BENCH_OUTER_HOST ? `inside the nested tier's L1 VM (QEMU-TCG -cpu max, emulated SVM) on ${process.env.MICROCELL_BENCH_OUTER_HOST}` : 'directly on this host'}; ` +
    `${RUNS} runs per case after a warm-up (${EXECS} execs for the round trip). Under TCG every figure is many times a hardware-KVM one, ` +
    'and in L1 the clock moves in 4 ms steps (no stable TSC under TCG; tsc=reliable made the L2 guest crash more often): figures under ~20 ms are coarse.',
)
const fc = firecrackerBinary()
notes.push(fc.path ? `Firecracker: ${fc.version} found but not yet driven by this benchmark.` : `Firecracker: not measured: ${fc.why}.`)
write('nested', results, notes.map((n) => `- ${n}`), process.env.MICROCELL_BENCH_OUTER_HOST ? { outerHost: process.env.MICROCELL_BENCH_OUTER_HOST } : {})

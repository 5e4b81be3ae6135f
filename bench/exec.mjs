// `npm run bench:exec`: the cost of running a command and moving files through the Node API, in a
// guest on the engine `auto` picks here: `sandbox.exec('true')` round trip (call → result in JS)
// and 256 MiB `fs.copyFromHost` / `fs.copyToHost` (host file ⇄ guest tmpfs); plus, when the
// Rust example `crates/sandbox/examples/exec_bench.rs` exists, its protocol-level numbers with the
// agent as a host process over a socketpair (no VM: what the protocol and agent cost alone), as
// separate rows. Not a test: numbers go to bench/results/exec.{json,md}.
//   BENCH_EXEC_N (default 100) exec round trips; BENCH_COPY_RUNS (default 3) copies each way;
//   BENCH_NO_CARGO=1 skips the Rust example; BENCH_RUST_QEMU=1 also runs its QEMU part (the same
//   guest measurements through the Rust API: the napi/JS hop is the difference).
import { spawnSync } from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { Sandbox, guestImages, hostInfo } from 'microcell'

import { root, summary, write } from './lib.mjs'

const N = Number(process.env.BENCH_EXEC_N ?? 100)
const COPY_RUNS = Number(process.env.BENCH_COPY_RUNS ?? 3)
const COPY_MIB = 256
const host = hostInfo()
const results = []
const notes = []

if (!guestImages().present) {
  console.error('the guest images are missing: run ./scripts/setup.sh first')
  process.exit(1)
}

const load = () => fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')

// ---- the Node API in a guest ----
{
  const loadBefore = load()
  // 1 GiB: the guest's /tmp (tmpfs) holds the 256 MiB file.
  const sb = await Sandbox.builder('bench-exec').memory(1024).engine('auto').create()
  const system = `microcell Node API, engine ${sb.info.engine}`
  const engineNote = `${sb.info.engine}: ${sb.info.engineDetail}`
  try {
    for (let i = 0; i < 10; i++) await sb.exec('true') // warm-up (page cache, agent, JIT)
    const rtt = []
    for (let i = 0; i < N; i++) {
      const t0 = process.hrtime.bigint()
      const r = await sb.exec('true')
      rtt.push(Number(process.hrtime.bigint() - t0) / 1e6)
      if (r.exitCode !== 0) throw new Error(`true exited ${r.exitCode}`)
    }
    results.push(summary(system, "sandbox.exec('true') round trip (call → result)", 'latency', 'ms', rtt))

    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-bench-exec-'))
    process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }))
    const src = path.join(dir, 'in.bin')
    fs.writeFileSync(src, crypto.randomBytes(COPY_MIB << 20))
    const bytes = COPY_MIB << 20
    const mbps = (ms) => bytes / 1e6 / (ms / 1e3)
    const ins = []
    const outs = []
    for (let i = 0; i < COPY_RUNS; i++) {
      let t0 = performance.now()
      await sb.fs.copyFromHost(src, '/tmp/in.bin')
      ins.push(mbps(performance.now() - t0))
      const out = path.join(dir, `out-${i}.bin`)
      t0 = performance.now()
      await sb.fs.copyToHost('/tmp/in.bin', out)
      outs.push(mbps(performance.now() - t0))
      if (fs.statSync(out).size !== bytes) throw new Error('copy-out size differs')
      fs.rmSync(out)
      await sb.fs.remove('/tmp/in.bin')
    }
    results.push(summary(system, `fs.copyFromHost ${COPY_MIB} MiB (host file → guest tmpfs)`, 'throughput', 'MB/s', ins))
    results.push(summary(system, `fs.copyToHost ${COPY_MIB} MiB (guest tmpfs → host file)`, 'throughput', 'MB/s', outs))
  } finally {
    await sb.stop()
  }
  notes.push(
    `- Node API rows: one sandbox (1 GiB, 1 vCPU) on ${engineNote}; ${N} sequential \`exec('true')\` after 10 warm-up calls; ` +
      `${COPY_RUNS} copies each way of one ${COPY_MIB} MiB random file (MB = 10^6 bytes). Host load average before: ${loadBefore}, after: ${load()}.`,
  )
}

// ---- the protocol alone (the other engineer's Rust example), when it is there ----
const example = path.join(root, 'crates', 'sandbox', 'examples', 'exec_bench.rs')
if (process.env.BENCH_NO_CARGO === '1') {
  notes.push('- Protocol rows: skipped (BENCH_NO_CARGO=1).')
} else if (!fs.existsSync(example)) {
  notes.push('- Protocol rows: crates/sandbox/examples/exec_bench.rs does not exist in this checkout.')
} else {
  const rustQemu = process.env.BENCH_RUST_QEMU === '1'
  const cargo = (args) => spawnSync('cargo', args, { cwd: root, encoding: 'utf8', maxBuffer: 64 << 20 })
  console.error('building the agent and the exec_bench example (cargo, release) ...')
  const agent = cargo(['build', '--release', '-q', '-p', 'microcell-agent'])
  const run =
    agent.status === 0
      ? cargo(['run', '--release', '-q', '-p', 'microcell-sandbox', '--example', 'exec_bench', '--', ...(rustQemu ? [] : ['--no-qemu']), '--n', '400'])
      : agent
  const json = run.status === 0 ? run.stdout.trim().split('\n').filter((l) => l.startsWith('{')).pop() : undefined
  if (json === undefined) {
    notes.push(`- Protocol rows: the Rust example failed (exit ${run.status}): ${(run.stderr || run.stdout).trim().split('\n').slice(-3).join(' / ')}`)
  } else {
    const j = JSON.parse(json)
    const system = 'protocol only: agent as a host process, socketpair (Rust example exec_bench)'
    const row = (kase, metric, unit, p50, p90, n) => ({ system, case: kase, metric, unit, p50: Math.round(p50 * 1000) / 1000, p90: p90 === null ? '-' : Math.round(p90 * 1000) / 1000, n })
    if (j.socketpair_ping_p50_us !== undefined) results.push(row('Ping round trip', 'latency', 'µs', j.socketpair_ping_p50_us, j.socketpair_ping_p90_us ?? null, 2000))
    if (j.socketpair_exec_true_p50_us !== undefined) results.push(row('exec /bin/true (fork+exec included)', 'latency', 'µs', j.socketpair_exec_true_p50_us, j.socketpair_exec_true_p90_us ?? null, 100))
    for (const [key, kase] of [
      ['socketpair_write_mbps', 'file write 256 MiB (/dev/shm)'],
      ['socketpair_read_mbps', 'file read 256 MiB (/dev/shm)'],
      ['socketpair_copy_in_mbps', 'copy_from_host 256 MiB (tree stream)'],
      ['socketpair_copy_out_mbps', 'copy_to_host 256 MiB (tree stream)'],
      ['socketpair_upload_devnull_mbps', 'channel only: upload to /dev/null'],
      ['socketpair_download_devzero_mbps', 'channel only: download from /dev/zero'],
    ]) {
      if (j[key] !== undefined) results.push(row(kase, 'throughput', 'MB/s', j[key], null, 1))
    }
    if (j.qemu_exec_true_p50_ms !== undefined) {
      const rust = `Rust API (exec_bench), ${j.qemu_engine}`
      const r2 = (kase, metric, unit, p50, p90) => ({ system: rust, case: kase, metric, unit, p50: Math.round(p50 * 1000) / 1000, p90: p90 === null ? '-' : Math.round(p90 * 1000) / 1000, n: p90 === null ? 1 : 50 })
      results.push(r2("exec /bin/true round trip (Sandbox::exec_collect)", 'latency', 'ms', j.qemu_exec_true_p50_ms, j.qemu_exec_true_p90_ms))
      results.push(r2('copy_from_host 256 MiB (host file → guest tmpfs)', 'throughput', 'MB/s', j.qemu_copy_in_256mib_mbps, null))
      results.push(r2('copy_to_host 256 MiB (guest tmpfs → host file)', 'throughput', 'MB/s', j.qemu_copy_out_256mib_mbps, null))
    }
    notes.push(
      `- Protocol rows: \`cargo run --release -p microcell-sandbox --example exec_bench -- ${rustQemu ? '' : '--no-qemu '}--n 400\` (one run; p90 "-" where it gives a single figure), load average at its start ${j.loadavg}. ` +
        'No VM: they bound what the protocol and the agent cost; the Node API rows add the VM (virtio-serial under QEMU) and the napi/JS hop.',
    )
  }
}

notes.push(
  host.canBootLinux
    ? '- Hardware KVM here: engine auto ran the guest on the built-in VMM.'
    : `- Hardware-KVM figures are unmeasured here: this host's KVM is ${host.kvmFlavour} (${host.reason}), so the guest ran on QEMU with ${host.qemu ?? 'no QEMU'}; under TCG every guest instruction is emulated, which dominates the in-guest rows. Run \`npm run bench:exec\` on a hardware-KVM host for those.`,
)

write('exec', results, notes)

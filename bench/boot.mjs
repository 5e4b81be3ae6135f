// `npm run bench:boot`: Sandbox.create() → the guest agent ready, per engine available here
// (qemu always where QEMU is installed; kvm where the built-in VMM boots Linux), graceful
// stop(), and the raw QEMU process (same machine, kernel and root disk, no microcell) from
// spawn to its first serial byte and to the agent's ready banner; a sandbox per request (boot,
// snapshot restore, SandboxPool) to its first command's result; plus the guest image sizes
// against their targets. Not a test: numbers go to bench/results/boot.{json,md}.
import { execFileSync, spawn } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import zlib from 'node:zlib'

import { Sandbox, SandboxPool, hostInfo } from 'microcell'

import { firstExecMs, qemuBinary, summary, write } from './lib.mjs'

const RUNS = Number(process.env.BENCH_RUNS ?? 20)
const MIB = 512 // the Sandbox default
const BANNER = 'microcell-agent ready'
const ms = (ns) => Number(ns) / 1e6
const host = hostInfo()
const notes = []

const cache = process.env.MICROCELL_CACHE ?? path.join(os.homedir(), '.cache', 'microcell')
const kernel = process.env.MICROCELL_KERNEL ?? path.join(cache, 'kernel-current', 'vmlinux')
const rootfs = process.env.MICROCELL_ROOTFS ?? path.join(cache, 'rootfs-current', 'rootfs.ext4')
for (const p of [kernel, rootfs]) {
  if (!fs.existsSync(p)) {
    console.error(`${p} is missing: run ./scripts/setup.sh first`)
    process.exit(1)
  }
}

/** One Sandbox boot and stop on `engine`: [create→ready ms, info.bootMs, stop ms]. */
async function sandboxOnce(engine) {
  const t0 = process.hrtime.bigint()
  const sb = await Sandbox.builder('bench').engine(engine).create()
  const t1 = process.hrtime.bigint()
  const exit = await sb.stop()
  const t2 = process.hrtime.bigint()
  if (exit.reason !== 'reset') throw new Error(`stop() ended the sandbox with ${JSON.stringify(exit)}`)
  return [ms(t1 - t0), sb.info.bootMs, ms(t2 - t1), sb.info]
}

/**
 * QEMU as the qemu engine runs it, minus microcell: the control port's chardev is a Unix socket
 * QEMU connects to (the engine passes one end of a socketpair instead); the root disk is a
 * private sparse copy of the image, as the engine gives each VM (made before the clock starts).
 */
function rawQemuArgs(sock, disk) {
  const accel = host.kvmFlavour === 'hardware' ? ['-enable-kvm', '-cpu', 'host'] : ['-accel', 'tcg']
  return [
    '-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off', ...accel,
    '-m', String(MIB), '-smp', '1', '-kernel', kernel,
    '-append', 'console=ttyS0 root=/dev/vda rw reboot=t panic=1',
    '-drive', `if=none,id=root,file=${disk},format=raw`, '-device', 'virtio-blk-device,drive=root',
    '-device', 'virtio-serial-device', '-chardev', `socket,id=agent,path=${sock}`, '-device', 'virtserialport,chardev=agent,name=agent',
    '-serial', 'stdio', '-display', 'none', '-nodefaults', '-no-user-config', '-no-reboot',
  ]
}

const sockDir = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-bench-'))
process.on('exit', () => fs.rmSync(sockDir, { recursive: true, force: true }))

/**
 * Spawns raw QEMU; resolves with [spawn → first serial byte, spawn → the agent's ready banner,
 * spawn → the agent's first byte on the control channel] in ms. The host writes one byte that
 * is not a frame (no protocol encoder here); the agent answers it with an error frame as soon
 * as it serves the channel — as it would answer Hello with Ready.
 */
async function rawQemuOnce(bin, n) {
  const sock = path.join(sockDir, `agent-${n}.sock`)
  const disk = path.join(sockDir, `rootfs-${n}.img`)
  execFileSync('cp', ['--sparse=always', rootfs, disk])
  const server = net.createServer()
  await new Promise((resolve, reject) => server.once('error', reject).listen(sock, resolve))
  try {
    return await new Promise((resolve, reject) => {
      const t0 = process.hrtime.bigint()
      const child = spawn(bin, rawQemuArgs(sock, disk), { stdio: ['ignore', 'pipe', 'pipe'] })
      let out = ''
      let err = ''
      let first = null
      let banner = null
      let agent = null
      let done = false
      const finish = (f) => {
        if (done) return
        done = true
        clearTimeout(timer)
        child.kill('SIGKILL')
        if (child.exitCode !== null || child.signalCode !== null) f()
        else child.on('exit', f)
      }
      const check = () => {
        if (banner !== null && agent !== null) finish(() => resolve([ms(first - t0), ms(banner - t0), ms(agent - t0)]))
      }
      const timer = setTimeout(() => finish(() => reject(new Error(`no agent within 60 s:\n${out.slice(-2000)}\n${err}`))), 60_000)
      server.on('connection', (c) => {
        c.on('error', () => {})
        c.once('data', () => {
          agent ??= process.hrtime.bigint()
          check()
        })
        c.write(Buffer.from([0]))
      })
      child.stdout.on('data', (d) => {
        first ??= process.hrtime.bigint()
        out += d
        if (banner === null && out.includes(BANNER)) {
          banner = process.hrtime.bigint()
          check()
        }
      })
      child.stderr.on('data', (d) => (err += d))
      child.on('error', (e) => finish(() => reject(e)))
    })
  } finally {
    server.close()
    fs.rmSync(sock, { force: true })
    fs.rmSync(disk, { force: true })
  }
}

const mib = (bytes) => bytes / 2 ** 20

function imageSizes() {
  const kernelBytes = fs.statSync(kernel).size
  const rootfsStat = fs.statSync(rootfs)
  const gzipBytes = zlib.gzipSync(fs.readFileSync(rootfs), { level: 9 }).length
  const bzImage = path.join(path.dirname(kernel), 'bzImage')
  const rows = [
    summary('guest image', 'kernel vmlinux (what both engines boot)', 'size', 'MiB', [mib(kernelBytes)]),
    summary('guest image', 'rootfs.ext4 (raw, sparse)', 'size', 'MiB', [mib(rootfsStat.size)]),
    summary('guest image', 'rootfs.ext4 (allocated on disk)', 'size', 'MiB', [mib(rootfsStat.blocks * 512)]),
    summary('guest image', 'rootfs.ext4 (gzip -9)', 'size', 'MiB', [mib(gzipBytes)]),
  ]
  if (fs.existsSync(bzImage)) rows.splice(1, 0, summary('guest image', 'kernel bzImage', 'size', 'MiB', [mib(fs.statSync(bzImage).size)]))
  const kernelOk = mib(kernelBytes) <= 12
  const imageOk = mib(gzipBytes) <= 8
  notes.push(
    `Images: ${kernel} and ${rootfs}. Targets: root disk ≤ 8 MiB compressed — ${mib(gzipBytes).toFixed(2)} MiB gzip -9: ${imageOk ? 'met' : 'MISSED'}; ` +
      `kernel ≤ 12 MiB — vmlinux ${mib(kernelBytes).toFixed(2)} MiB: ${kernelOk ? 'met' : 'MISSED'}.`,
  )
  return rows
}

const results = []
const engines = []
if (host.qemu !== null) engines.push('qemu')
else notes.push(`engine qemu: not measured: ${host.qemuUnavailable}`)
if (host.canBootLinux) engines.push('kvm')
else notes.push(`engine kvm (the built-in VMM): not measured: it cannot boot Linux on this host (kvmFlavour=${host.kvmFlavour}: ${host.reason}).`)

const q = qemuBinary()
const load = [os.loadavg()[0]]
for (const engine of engines) {
  const create = []
  const bootMs = []
  const stop = []
  const rawFirst = []
  const rawBanner = []
  const rawAgent = []
  let info
  // Interleaved with the raw QEMU runs, so that both see the same host load.
  for (let i = -1; i < RUNS; i++) {
    const [c, b, s, inf] = await sandboxOnce(engine)
    info = inf
    const raw = engine === 'qemu' && q ? await rawQemuOnce(q.path, i + 1) : null
    if (i < 0) continue // warm-up: page cache, first spawn
    create.push(c)
    bootMs.push(b)
    stop.push(s)
    if (raw) {
      rawFirst.push(raw[0])
      rawBanner.push(raw[1])
      rawAgent.push(raw[2])
    }
  }
  const accel = engine === 'qemu' ? (/accel (\w+)/.exec(info.engineDetail)?.[1] ?? '?') : host.kvmFlavour
  const kase = `engine ${engine} (${accel}), ${MIB}MiB, 1 vCPU`
  results.push(
    summary('microcell Sandbox', kase, 'create_to_agent_ready', 'ms', create),
    summary('microcell Sandbox', kase, 'native_create_to_ready (info.bootMs)', 'ms', bootMs),
    summary('microcell Sandbox', kase, 'stop_graceful', 'ms', stop),
  )
  if (rawFirst.length > 0) {
    results.push(
      summary('raw QEMU', `same machine/kernel/disk (${accel}), ${MIB}MiB`, 'spawn_to_first_serial_byte', 'ms', rawFirst),
      summary('raw QEMU', `same machine/kernel/disk (${accel}), ${MIB}MiB`, 'spawn_to_agent_banner', 'ms', rawBanner),
      summary('raw QEMU', `same machine/kernel/disk (${accel}), ${MIB}MiB`, 'spawn_to_first_agent_byte', 'ms', rawAgent),
    )
  }
  notes.push(`engine ${engine}: ${info.engineDetail}; guest kernel ${info.kernelRelease}; ${info.engineReason}.`)
  if (rawAgent.length > 0) {
    const p50 = (v) => summary('', '', '', '', v).p50
    const diff = p50(create) - p50(rawAgent)
    notes.push(
      `engine ${engine} vs raw QEMU (p50): create→ready ${p50(create).toFixed(0)} ms vs spawn→first agent byte ${p50(rawAgent).toFixed(0)} ms, ` +
        `a difference of ${diff.toFixed(0)} ms: microcell's own part (the per-VM root disk copy, the spawn, QMP and channel set-up, the handshake, napi) ` +
        (Math.abs(diff) < 0.1 * p50(rawAgent)
          ? 'is lost in the run-to-run variation of the guest boot (under 10 % of it); the time is the guest booting under the engine.'
          : 'is at most that difference; the rest is the guest booting under the engine.'),
    )
  }
  load.push(os.loadavg()[0])
}
if (q) {
  notes.push(
    `raw QEMU: ${q.version}; the qemu engine's command line with the control port on a Unix socket QEMU connects to, a private sparse copy of the root disk (made before the clock starts), and no microcell ` +
      'in the loop. First serial byte = the kernel\'s first console line; agent banner = the agent\'s `microcell-agent ready` console line ' +
      '(printed once it has opened its port); first agent byte = its answer on the control channel to one byte the host wrote at once (an error frame, as Hello gets Ready).',
  )
}

/**
 * A sandbox per request, ready to serve it: the time from asking for one to the result of its
 * first command (`exec('true')`), made three ways on `engine` — booted (`Sandbox.create`),
 * restored from a snapshot of a booted one (`Sandbox.fromSnapshot`), and taken from a filled
 * `SandboxPool` (waited back to full between requests, so each measures a warm acquire).
 */
async function perRequest(engine) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-bench-snap-'))
  const origin = await Sandbox.builder('bench-origin').engine(engine).memory(256).create()
  await origin.snapshot(dir)
  await origin.kill()
  const pool = new SandboxPool({ config: { engine, memoryMib: 256 }, size: 2 })
  const created = []
  const restored = []
  const pooled = []
  try {
    for (let i = -1; i < RUNS; i++) {
      const c = await firstExecMs(() => Sandbox.builder('bench-req').engine(engine).memory(256).create())
      const r = await firstExecMs(() => Sandbox.fromSnapshot(dir))
      await pool.filled()
      const p = await firstExecMs(async () => {
        const sb = await pool.acquire()
        return sb
      })
      if (i < 0) continue
      created.push(c)
      restored.push(r)
      pooled.push(p)
    }
  } finally {
    await pool.close({ killAcquired: true })
    fs.rmSync(dir, { recursive: true, force: true })
  }
  if (pool.stats().misses !== 0) notes.push(`SandboxPool: ${pool.stats().misses} acquires missed (made on the spot).`)
  const kase = `engine ${engine}, 256MiB, 1 vCPU`
  results.push(
    summary('microcell Sandbox', kase, 'create_to_first_exec', 'ms', created),
    summary('microcell Sandbox', kase, 'fromSnapshot_to_first_exec', 'ms', restored),
    summary('microcell SandboxPool', `${kase}, size 2, warm`, 'acquire_to_first_exec', 'ms', pooled),
  )
  const p50 = (v) => summary('', '', '', '', v).p50
  notes.push(
    `Per request on engine ${engine} (p50): a booted sandbox's first command result ${p50(created).toFixed(0)} ms, a restored clone's ${p50(restored).toFixed(0)} ms ` +
      `(${(p50(created) / p50(restored)).toFixed(1)}x faster), a pooled one's ${p50(pooled).toFixed(1)} ms (${(p50(created) / p50(pooled)).toFixed(0)}x faster than booting): ` +
      'the pool moves the boot or restore off the request; the sandbox is then made in the background for the next one.',
  )
}
for (const engine of engines) await perRequest(engine)

results.push(...imageSizes())
notes.unshift(
  `Sandbox: wall time of \`Sandbox.builder('bench').engine(E).create()\` (default ${MIB} MiB) in one Node process, ${RUNS} runs after 1 warm-up, ` +
    'each followed by `stop()`; raw QEMU runs interleaved with them. ' +
    `Host load average (1 min) during the run: ${load.map((l) => l.toFixed(1)).join(' → ')} on ${os.cpus().length} cores shared with other work.`,
)
write('boot', results, notes.map((n) => `- ${n}`))

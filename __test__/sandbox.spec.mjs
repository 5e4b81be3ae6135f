// T2 and T3: the guest platform (Linux kernel + root disk + agent) through the Sandbox API.
// T2 runs on engine 'qemu' (TCG software emulation where there is no hardware KVM: ~1 s a boot),
// T3 is the same suite on engine 'kvm' (the built-in VMM), which boots Linux only on hardware
// KVM: elsewhere it is skipped and says why. Boot tests run one at a time (test.serial): the
// leak checks count this process's QEMU children, and parallel TCG boots only slow each other.
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

import test from 'ava'

import { MicrocellError, SANDBOX_ERROR_CODES, Sandbox, SandboxBuilder, hostInfo } from 'microcell'

import { qemuChildren, tiers } from './guest.mjs'
import { root, tempDir, within } from './helpers.mjs'

const host = hostInfo()
const cache = process.env.MICROCELL_CACHE ?? path.join(os.homedir(), '.cache', 'microcell')
const defaultKernel = process.env.MICROCELL_KERNEL ?? path.join(cache, 'kernel-current', 'vmlinux')
const defaultRootfs = process.env.MICROCELL_ROOTFS ?? path.join(cache, 'rootfs-current', 'rootfs.ext4')

/** Fails (never skips) when the guest images were not built: setup.sh builds them. */
function requireGuestImages(t) {
  for (const p of [defaultKernel, defaultRootfs]) {
    if (!fs.existsSync(p)) {
      t.fail(`guest image ${p} is missing: run ./scripts/setup.sh (or scripts/guest/build-kernel.sh and build-rootfs.sh)`)
      return false
    }
  }
  return true
}

/** Per-VM directories this process left in the temporary directory (engine kvm makes them). */
function runDirs() {
  const prefix = `microcell-${process.pid}-`
  return fs.readdirSync(os.tmpdir()).filter((n) => n.startsWith(prefix))
}

/** Reads the console until `marker` appears (or `ms` pass); returns what was read. */
async function consoleUntil(sb, marker, ms) {
  let text = ''
  const reading = (async () => {
    // Not destroyed when the loop returns: later reads go on where this one stopped.
    for await (const chunk of sb.console.iterator({ destroyOnReturn: false })) {
      text += chunk.toString('latin1')
      if (text.includes(marker)) return
    }
  })()
  await within(reading, ms, `the console line ${JSON.stringify(marker)}`).catch(() => {})
  return text
}

/** Asserts that `promise` rejects with a MicrocellError of `code`; returns the error. */
async function rejectsWith(t, promise, code) {
  const err = await t.throwsAsync(promise, { instanceOf: MicrocellError })
  t.is(err?.code, code, err?.message)
  return err
}

/**
 * A module with `await using` compiled by TypeScript (Node 20 does not parse the syntax; tsc
 * lowers it to the helpers that call Symbol.asyncDispose, as in a TypeScript user's program).
 */
async function awaitUsingModule() {
  const ts = (await import(pathToFileURL(path.join(root, 'node_modules', 'typescript', 'lib', 'typescript.js')).href)).default
  const source = `
    export async function scope(Sandbox, engine, seen) {
      await using sb = await Sandbox.builder('disposal').engine(engine).memory(256).create()
      seen.sandbox = sb
      seen.statusInScope = sb.exitStatus
    }`
  const { outputText } = ts.transpileModule(source, {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext, lib: ['esnext'] },
  })
  const file = path.join(tempDir(), 'await-using.mjs')
  fs.writeFileSync(file, outputText)
  return import(pathToFileURL(file).href)
}

// -- T0: the builder and its validation (no boot) ------------------------------------------------

test('Sandbox.builder(name) builds validated plain JSON with the defaults filled in', (t) => {
  const builder = Sandbox.builder('build-me')
  t.true(builder instanceof SandboxBuilder)
  const config = builder
    .memory(256)
    .cpus(2)
    .env('A', '1')
    .env({ B: 'two' })
    .workdir('/srv/./app/')
    .engine('qemu')
    .kernel('/k')
    .rootfs('/r')
    .bootTimeoutMs(5000)
    .consoleOutput('/tmp/console.log')
    .kernelArgs('loglevel=8')
    .build()
  t.deepEqual(config, {
    name: 'build-me',
    memoryMib: 256,
    cpus: 2,
    env: { A: '1', B: 'two' },
    workdir: '/srv/app',
    engine: 'qemu',
    kernel: '/k',
    rootfs: '/r',
    bootTimeoutMs: 5000,
    consoleOutput: '/tmp/console.log',
    kernelArgs: 'loglevel=8',
  })
  t.deepEqual(Sandbox.builder().build(), { memoryMib: 512, cpus: 1, engine: 'auto', bootTimeoutMs: 30000 })
  // What build() returns is what Sandbox.create() and Sandbox.validate() take.
  t.deepEqual(Sandbox.validate(config), config)
  t.deepEqual(JSON.parse(JSON.stringify(config)), config)
})

test('a bad configuration is a coded error at build(), and create() rejects it the same way', async (t) => {
  const cases = [
    ['E_CONFIG_MEMORY', (b) => b.memory(16)],
    ['E_CONFIG_MEMORY', (b) => b.memory(1.5)],
    ['E_CONFIG_MEMORY', (b) => b.memory(host.hostMemoryMib + 1)],
    ['E_CONFIG_VCPUS', (b) => b.cpus(0)],
    ['E_CONFIG_VCPUS', (b) => b.cpus(33)],
    ['E_CONFIG_NAME', (b) => b.name('-not-a-hostname')],
    ['E_CONFIG_NAME', (b) => b.name('a'.repeat(64))],
    ['E_CONFIG_ENV', (b) => b.env('1BAD', 'x')],
    ['E_CONFIG_ENV', (b) => b.env('A', 'nul\0byte')],
    ['E_CONFIG_GUEST_PATH', (b) => b.workdir('relative/dir')],
    ['E_CONFIG_TIMEOUT', (b) => b.bootTimeoutMs(10)],
    ['E_CONFIG_CMDLINE', (b) => b.kernelArgs('two\nlines')],
    ['E_CONFIG_CONSOLE', (b) => b.consoleQueueBytes(0)],
    ['E_CONFIG_CONSOLE', (b) => b.consoleQueueBytes(2.5)],
    ['E_CONFIG_TIMEOUT', (b) => b.maxDurationMs(0)],
    ['E_CONFIG_JSON', (b) => b.engine('firecracker')],
    ['E_CONFIG_JSON', (b) => b.kernel('')],
  ]
  for (const [code, edit] of cases) {
    const err = t.throws(() => edit(Sandbox.builder('bad')).build(), { instanceOf: MicrocellError })
    t.is(err?.code, code, err?.message)
    t.true(err?.message.length > 20, 'the message says what to do')
    await rejectsWith(t, edit(Sandbox.builder('bad')).create(), code)
  }
  t.is(t.throws(() => Sandbox.validate({ memoryMib: 256, color: 'red' }))?.code, 'E_CONFIG_JSON')
})

test('a sandbox error code list is exported', (t) => {
  for (const code of ['E_GUEST_IMAGE_MISSING', 'E_BOOT_TIMEOUT', 'E_AGENT_EXITED', 'E_QEMU_NOT_FOUND', 'E_NO_KVM', 'E_ENGINE_UNAVAILABLE']) {
    t.true(SANDBOX_ERROR_CODES.includes(code), code)
  }
})

// -- T2 / T3: the suite, per engine ---------------------------------------------------------------

function suite(tier, engine, skipReason) {
  if (skipReason !== null) {
    const title = `${tier} (Sandbox on engine '${engine}') skipped: ${skipReason}`
    console.log(`# SKIP ${title}`)
    test.skip(title, () => {})
    return
  }
  const builder = (name) => Sandbox.builder(name).engine(engine).memory(256)

  test.serial(`${tier}: maxDurationMs kills the sandbox at its deadline (code E_MAX_DURATION); setMaxDuration() moves it`, async (t) => {
    if (!requireGuestImages(t)) return
    const [a, b] = await Promise.all([
      builder(`${tier.toLowerCase()}-short`).maxDurationMs(2000).metadata({ suite: 'deadline', which: 'a' }).create(),
      builder(`${tier.toLowerCase()}-moved`).maxDurationMs(600_000).metadata({ suite: 'deadline', which: 'b' }).create(),
    ])
    try {
      t.true(Sandbox.list().includes(a) && Sandbox.list().includes(b))
      t.deepEqual(Sandbox.list({ name: `${tier.toLowerCase()}-short` }), [a])
      t.deepEqual(Sandbox.list({ metadata: { suite: 'deadline' } }), [a, b])
      t.deepEqual(Sandbox.list({ metadata: { suite: 'deadline', which: 'b' } }), [b])
      t.deepEqual(Sandbox.list({ metadata: { suite: 'other' } }), [])
      const t0 = Date.now()
      t.true(a.expiresAt !== null && a.expiresAt > t0 && a.expiresAt <= t0 + 2000)
      b.setMaxDuration(1000)
      t.true(b.expiresAt <= Date.now() + 1000)
      const [aDeadline, bDeadline] = [a.expiresAt, b.expiresAt]
      // Each end against its own deadline (the two creates may resolve seconds apart under load).
      const endedAt = (sb, what) => within(sb.wait(), 20_000, what).then((exit) => [exit, Date.now()])
      const [[ea, aEnd], [eb, bEnd]] = await Promise.all([endedAt(a, 'the 2 s deadline'), endedAt(b, 'the moved deadline')])
      t.like(ea, { reason: 'killed', code: 'E_MAX_DURATION' })
      t.regex(ea.message, /maxDurationMs \(2000 ms\)/)
      t.like(eb, { reason: 'killed', code: 'E_MAX_DURATION' })
      t.like(a.exitStatus, { code: 'E_MAX_DURATION' })
      t.like(await a.stop(), { code: 'E_MAX_DURATION' })
      // Not before its deadline (5 ms: timers run on the monotonic clock, Date.now() on the wall clock).
      t.true(aEnd >= aDeadline - 5 && bEnd >= bDeadline - 5, `ended ${aEnd - aDeadline} ms and ${bEnd - bDeadline} ms after the deadlines`)
      t.is(a.expiresAt, null)
      t.false(Sandbox.list().includes(a), 'an ended sandbox is not listed')
      t.is(t.throws(() => a.setMaxDuration(1000), { instanceOf: MicrocellError }).code, 'E_VM_STATE')
    } finally {
      await Promise.all([a.kill(), b.kill()])
    }
  })

  test.serial(`${tier}: create → ready (kernel 6.1, engine '${engine}' and why), console banner, quick stop`, async (t) => {
    if (!requireGuestImages(t)) return
    const t0 = performance.now()
    const sb = await builder(`${tier.toLowerCase()}-ready`).create()
    const createMs = performance.now() - t0
    try {
      const info = sb.info
      t.true(info.kernelRelease.startsWith('6.1.'), info.kernelRelease)
      t.is(info.engine, engine)
      t.is(typeof info.engineReason, 'string')
      t.true(info.engineReason.length > 0)
      t.regex(info.engineDetail, engine === 'qemu' ? /qemu-system/ : /VMM/i)
      t.is(info.hostname, `${tier.toLowerCase()}-ready`)
      t.is(info.name, `${tier.toLowerCase()}-ready`)
      t.regex(info.agent, /^microcell-agent /)
      t.true(info.bootMs > 0 && info.bootMs <= createMs + 1, `bootMs ${info.bootMs}, create ${createMs}`)
      t.true(info.guestBootNs > 0)
      if (engine === 'qemu') t.true(Number.isInteger(info.pid) && info.pid > 0)
      else t.is(info.pid, null)
      t.true(Object.isFrozen(info))
      t.is(sb.exitStatus, null)
      t.is(sb.config.memoryMib, 256)
      t.is(sb.config.engine, engine)
      const text = await consoleUntil(sb, 'microcell-agent ready', 5000)
      t.regex(text, /microcell-agent ready \(kernel 6\.1\./)
      t.true(sb.consoleStats.totalBytes > 0)
      t.log(`ready in ${createMs.toFixed(0)} ms (bootMs ${info.bootMs.toFixed(0)}), engine ${info.engine}: ${info.engineReason}`)

      const s0 = performance.now()
      const exit = await within(sb.stop(), 5000, 'stop()')
      const stopMs = performance.now() - s0
      t.deepEqual(exit, { reason: 'reset' }, 'graceful: the agent powered the guest off')
      t.true(stopMs < 3000, `stop() took ${stopMs.toFixed(0)} ms`)
      t.log(`stop() resolved in ${stopMs.toFixed(1)} ms`)
      t.deepEqual(sb.exitStatus, { reason: 'reset' })
      t.deepEqual(await sb.wait(), { reason: 'reset' })
      t.deepEqual(await sb.stop(), { reason: 'reset' }, 'stop() after the end says how it ended')
      // The console stream ends with the VM.
      const rest = await within(consoleUntil(sb, '\u0000never', 5000), 6000, 'the console end')
      t.is(typeof rest, 'string')
      t.true(sb.consoleStats.closed)
      t.deepEqual(qemuChildren(), [])
    } finally {
      await sb.kill()
    }
  })

  test.serial(`${tier}: \`await using\` stops the sandbox at scope end`, async (t) => {
    if (!requireGuestImages(t)) return
    const { scope } = await awaitUsingModule()
    const seen = {}
    await scope(Sandbox, engine, seen)
    t.is(seen.statusInScope, null, 'running inside the scope')
    t.truthy(seen.sandbox)
    t.deepEqual(seen.sandbox.exitStatus, { reason: 'reset' }, 'stopped (gracefully) when the scope ended')
    t.deepEqual(qemuChildren(), [])
  })

  test.serial(`${tier}: 5 sequential create/stop cycles leave no QEMU child and no per-VM directory`, async (t) => {
    if (!requireGuestImages(t)) return
    const boots = []
    for (let i = 0; i < 5; i++) {
      const sb = await builder(`cycle-${i}`).create()
      boots.push(sb.info.bootMs)
      t.deepEqual(await sb.stop({ timeoutMs: 5000 }), { reason: 'reset' })
      t.deepEqual(qemuChildren(), [], `after cycle ${i}`)
    }
    t.deepEqual(runDirs(), [])
    t.log(`create→ready ms: ${boots.map((b) => b.toFixed(0)).join(', ')}`)
  })

  test.serial(`${tier}: Sandbox.run() runs one command in a fresh sandbox and ends it, also when the command cannot start`, async (t) => {
    if (!requireGuestImages(t)) return
    const config = { engine, memoryMib: 256, env: { WHO: 'run' } }
    const r = await Sandbox.run('sh', ['-c', 'echo "hi $WHO $X"; echo err >&2; exit 3'], { config, env: { X: 'x' } })
    t.is(r.exitCode, 3)
    t.is(r.stdoutText(), 'hi run x\n')
    t.is(r.stderrText(), 'err\n')
    const viaBuilder = await builder('run-builder').run('uname', ['-r'])
    t.regex(viaBuilder.stdoutText(), /^6\.1\./)
    await rejectsWith(t, Sandbox.run('/bin/nope', { config }), 'ENOENT')
    t.deepEqual(Sandbox.list(), [], 'no sandbox left running')
    t.deepEqual(qemuChildren(), [])
    t.deepEqual(runDirs(), [])
  })

  test.serial(`${tier}: kill() ends it at once ('killed'); wait() resolves`, async (t) => {
    if (!requireGuestImages(t)) return
    const sb = await builder('killed').create()
    const waiting = sb.wait()
    t.deepEqual(await within(sb.kill(), 5000, 'kill()'), { reason: 'killed' })
    t.deepEqual(await waiting, { reason: 'killed' })
    t.deepEqual(await sb.stop(), { reason: 'killed' })
    await rejectsWith(t, sb.stop({ timeoutMs: -1 }), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.stop({ timeoutMs: 1.5 }), 'E_INVALID_ARGUMENT')
    t.regex(sb.consoleTail(), /microcell-agent ready/, 'the tail outlives the VM')
    t.true(sb.consoleStats.closed)
    t.deepEqual(qemuChildren(), [])
  })

  test.serial(`${tier}: a missing kernel is E_GUEST_IMAGE_MISSING, before anything starts`, async (t) => {
    const missing = path.join(tempDir(), 'no-such-vmlinux')
    const err = await rejectsWith(t, builder('nokernel').kernel(missing).create(), 'E_GUEST_IMAGE_MISSING')
    t.true(err.message.includes(missing), err.message)
    t.regex(err.message, /setup\.sh|build-kernel\.sh/)
    t.deepEqual(qemuChildren(), [])
  })

  test.serial(`${tier}: an agent that never starts is E_BOOT_TIMEOUT at bootTimeoutMs, the VM killed`, async (t) => {
    if (!requireGuestImages(t)) return
    const t0 = performance.now()
    // init=/bin/sh: the kernel boots, but the agent (the usual PID 1) never runs.
    const err = await rejectsWith(
      t,
      builder('silent').kernelArgs('init=/bin/sh').bootTimeoutMs(2000).create(),
      'E_BOOT_TIMEOUT',
    )
    const ms = performance.now() - t0
    t.true(ms >= 1900 && ms < 6000, `rejected after ${ms.toFixed(0)} ms`)
    t.regex(err.message, /2000 ms/)
    t.deepEqual(qemuChildren(), [])
  })

  test.serial(`${tier}: a root disk that does not mount is E_AGENT_EXITED with the console tail`, async (t) => {
    if (!requireGuestImages(t)) return
    const bad = path.join(tempDir(), 'garbage.img')
    fs.writeFileSync(bad, Buffer.alloc(8 << 20, 0x5a))
    const err = await rejectsWith(t, builder('badroot').rootfs(bad).create(), 'E_AGENT_EXITED')
    t.regex(err.message, /Kernel panic|VFS|mount/i)
    t.deepEqual(qemuChildren(), [])
  })
}

for (const { tier, engine, skip } of tiers) suite(tier, engine, skip)

if (!host.canBootLinux) {
  test('T3 here: engine "kvm" is refused with a coded error that says why and what to use', async (t) => {
    const code = host.kvmDevice ? 'E_ENGINE_UNAVAILABLE' : 'E_NO_KVM'
    const err = await rejectsWith(t, Sandbox.builder('kvm-here').engine('kvm').create(), code)
    t.regex(err.message, /'qemu'/)
    t.deepEqual(qemuChildren(), [])
  })
}

test('metadata: labels validated at build(), kept in the config', (t) => {
  const config = Sandbox.builder('labels').metadata('team', 'infra').metadata({ request: 'r-1' }).build()
  t.deepEqual(config.metadata, { team: 'infra', request: 'r-1' })
  const code = (metadata) => t.throws(() => Sandbox.validate({ metadata }), { instanceOf: MicrocellError }).code
  t.is(code({ '': 'x' }), 'E_CONFIG_METADATA')
  t.is(code({ k: 'a\nb' }), 'E_CONFIG_METADATA')
  t.is(code(Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v']))), 'E_CONFIG_METADATA')
  t.is(code({ k: 1 }), 'E_CONFIG_JSON')
})

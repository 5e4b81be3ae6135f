// T1: snapshots, clones and restore pools of our test guests, through the Node API.
// The KVM tests are skipped, with the reason printed, where there is no usable /dev/kvm; the
// bad-snapshot-directory tests need no KVM and always run.
import fs from 'node:fs'
import path from 'node:path'

import test from 'ava'

import { MicroVm, MicrocellError, RestorePool, Snapshot, VmPool } from 'microcell'

import { guest, kvmSkipReason, readAll, tempDir, within } from './helpers.mjs'

const skipReason = kvmSkipReason()
if (skipReason) console.log(`# SKIP T1 snapshot tests: ${skipReason}`)
const kvm = skipReason ? test.skip : test.serial

const dir = tempDir('microcell-snapshot-test-')
let dirs = 0
const freshDir = (name) => path.join(dir, `${name}-${dirs++}`)
const PROMPT_MS = 2000
const BOOT_MS = 30_000
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Reads `stream` until its text so far matches `re`; returns the text (the stream stays open). */
async function readUntil(stream, re, ms = BOOT_MS) {
  let text = ''
  const it = stream[Symbol.asyncIterator]()
  const go = async () => {
    while (!re.test(text)) {
      const next = await it.next()
      if (next.done) throw new Error(`the console ended before ${re}: ${JSON.stringify(text)}`)
      text += next.value.toString('latin1')
    }
    return text
  }
  return within(go(), ms, `console output matching ${re}`)
}

/** Boots `image` with a console stream and waits for `ready` on its console. */
async function boot(t, image, { mem = 64, cmdline, ready, startOptions = {} } = {}) {
  let b = MicroVm.builder().kernel(guest(image)).memoryMib(mem)
  if (cmdline) b = b.cmdline(cmdline)
  const vm = await b.start({ consoleStream: true, ...startOptions })
  t.teardown(() => vm.kill())
  const text = await readUntil(vm.console, ready)
  return { vm, text }
}

/** A paused ioloop guest's snapshot (the guest prints a tick every 16 port reads). */
async function ioloopSnapshot(t, { mem = 64, pages = 0, extra = '' } = {}) {
  const { vm } = await boot(t, 'ioloop.pvh.elf', {
    mem,
    cmdline: `tg.pages=${pages} tg.every=16 ${extra}`.trim(),
    ready: /TG tick 3\n/,
  })
  await vm.pause()
  const snapshot = await vm.snapshot(freshDir('ioloop'))
  await vm.kill()
  return snapshot
}

const nextTick = (text) => /TG tick (\d+)\n/.exec(text)?.[1]

kvm('spin: snapshot a running guest, restore 3 clones; they run from the snapshot and stop promptly', async (t) => {
  const { vm } = await boot(t, 'spin.pvh.elf', { ready: /TG spin\n/ })
  const snapshot = await vm.snapshot(freshDir('spin'))
  t.is(vm.exitStatus, null, 'the original runs on after the snapshot')
  t.false(vm.paused)
  t.is(snapshot.config.memoryMib, 64)
  t.is(snapshot.config.vcpus, 1)
  t.is(snapshot.config.kernel, guest('spin.pvh.elf'))
  t.true(snapshot.bytesWritten > 0)
  t.true(fs.existsSync(path.join(snapshot.dir, 'vm.state')) && fs.existsSync(path.join(snapshot.dir, 'vm.mem')))
  const before = process.hrtime.bigint()
  const clones = []
  for (let i = 0; i < 3; i++) clones.push(await snapshot.restore({ consoleStream: true }))
  t.teardown(() => Promise.all(clones.map((c) => c.kill())))
  await sleep(100)
  for (const clone of clones) {
    t.not(clone, vm)
    t.is(clone.exitStatus, null, 'the clone is still spinning')
    t.true(clone.timings.startNs >= before)
    t.true(clone.timings.runningNs >= clone.timings.startNs)
  }
  for (const clone of clones) {
    const t0 = performance.now()
    t.deepEqual(await within(clone.stop(), PROMPT_MS, 'stop'), { reason: 'stopped' })
    t.true(performance.now() - t0 < PROMPT_MS)
    t.is(await readAll(clone.console), '', 'a clone prints nothing its snapshot had already printed')
  }
  t.deepEqual(await within(vm.stop(), PROMPT_MS, 'stop the original'), { reason: 'stopped' })
})

kvm('halt: a snapshot of a halted guest restores and the clone can be killed', async (t) => {
  const { vm } = await boot(t, 'halt.pvh.elf', { ready: /TG halt\n/ })
  const snapshot = await vm.snapshot(freshDir('halt'))
  await vm.kill()
  const clone = await snapshot.restore()
  await sleep(50)
  t.is(clone.exitStatus, null)
  t.deepEqual(await within(clone.kill(), PROMPT_MS, 'kill'), { reason: 'killed' })
})

kvm('memtouch: the touched pages are in the snapshot; clones restore from it', async (t) => {
  const pages = 4096
  const { vm } = await boot(t, 'memtouch.pvh.elf', { mem: 128, cmdline: `tg.pages=${pages}`, ready: /TG touched 4096\n/ })
  const snapshot = await vm.snapshot(freshDir('memtouch'))
  await vm.kill()
  t.true(snapshot.bytesWritten >= pages * 4096, `${snapshot.bytesWritten} bytes written`)
  t.true(snapshot.bytesWritten < 128 << 20, 'untouched memory is not written')
  const memFile = fs.statSync(path.join(snapshot.dir, 'vm.mem'))
  // All of RAM, then the 16-byte trailer that ties the file to its state file.
  t.is(memFile.size, (128 << 20) + 16, 'the memory file spans the RAM')
  const clones = await snapshot.clone(3, { consoleStream: true })
  t.teardown(() => Promise.all(clones.map((c) => c.kill())))
  await sleep(50)
  t.true(clones.every((c) => c.exitStatus === null))
  for (const c of clones) t.deepEqual(await within(c.stop(), PROMPT_MS, 'stop'), { reason: 'stopped' })
})

kvm('ioloop: every clone resumes where the snapshot was taken (the same next tick); firstExitNs follows the restore', async (t) => {
  const snapshot = await ioloopSnapshot(t)
  const ticks = []
  for (let i = 0; i < 3; i++) {
    const before = process.hrtime.bigint()
    const clone = await snapshot.restore({ consoleStream: true })
    t.teardown(() => clone.kill())
    const text = await readUntil(clone.console, /TG tick \d+\n/)
    ticks.push(nextTick(text))
    const { startNs, firstExitNs, runningNs } = clone.timings
    t.not(firstExitNs, null, 'the clone exited to the VMM')
    t.true(before <= startNs && startNs <= runningNs)
    t.true(firstExitNs >= startNs, 'the first exit is after the restore, not the original boot')
    t.log(`restore ${i}: running after ${Number(runningNs - startNs) / 1e3} µs, first exit after ${Number(firstExitNs - startNs) / 1e3} µs`)
    await clone.kill()
  }
  t.true(Number(ticks[0]) >= 3)
  t.deepEqual(ticks, [ticks[0], ticks[0], ticks[0]], 'all clones print the same next tick')
})

kvm('clone(5): five distinct running VMs; consoleOutput per clone', async (t) => {
  const snapshot = await ioloopSnapshot(t)
  const files = []
  const clones = await snapshot.clone(5, {
    consoleStream: true,
    consoleOutput: (i) => {
      files[i] = path.join(dir, `clone-${dirs++}-${i}.log`)
      return files[i]
    },
  })
  t.teardown(() => Promise.all(clones.map((c) => c.kill())))
  t.is(clones.length, 5)
  t.is(new Set(clones).size, 5)
  const texts = await Promise.all(clones.map((c) => readUntil(c.console, /TG tick \d+\n/)))
  t.is(new Set(texts.map(nextTick)).size, 1, 'all at the same tick')
  await Promise.all(clones.map((c) => c.kill()))
  for (const [i, file] of files.entries()) {
    t.true(fs.readFileSync(file, 'latin1').includes('TG tick'), `clone ${i} wrote its own console file`)
  }
})

kvm('clone() and restore() check their arguments', async (t) => {
  const snapshot = await ioloopSnapshot(t)
  for (const n of [0, -1, 1.5, 'two', 10_001]) {
    const err = await t.throwsAsync(snapshot.clone(n), { instanceOf: MicrocellError })
    t.is(err.code, 'E_INVALID_ARGUMENT', String(n))
  }
  const one = await t.throwsAsync(snapshot.clone(2, { consoleOutput: '/tmp/shared.log' }), { instanceOf: MicrocellError })
  t.is(one.code, 'E_INVALID_ARGUMENT')
  const queue = await t.throwsAsync(snapshot.restore({ consoleQueueBytes: 0 }), { instanceOf: MicrocellError })
  t.is(queue.code, 'E_INVALID_ARGUMENT')
  const file = await t.throwsAsync(snapshot.restore({ consoleOutput: path.join(dir, 'no', 'such', 'dir', 'c.log') }), {
    instanceOf: MicrocellError,
  })
  t.is(file.code, 'E_CONSOLE_OUTPUT')
})

kvm('pause/resume: a paused guest makes no progress; resume lets it run on', async (t) => {
  const { vm } = await boot(t, 'ioloop.pvh.elf', { cmdline: 'tg.every=16', ready: /TG tick 2\n/ })
  t.false(vm.paused)
  await within(vm.pause(), PROMPT_MS, 'pause')
  t.true(vm.paused)
  await sleep(20)
  const a = vm.consoleStats.totalBytes
  await sleep(150)
  t.is(vm.consoleStats.totalBytes, a, 'no console output while paused')
  const snapshot = await vm.snapshot(freshDir('paused'))
  t.true(vm.paused, 'a snapshot leaves a paused VM paused')
  t.truthy(snapshot)
  vm.resume()
  t.false(vm.paused)
  await sleep(150)
  t.true(vm.consoleStats.totalBytes > a, 'output again after resume')
  vm.resume() // not paused: nothing to do
  await vm.pause()
  t.deepEqual(await within(vm.stop(), PROMPT_MS, 'stop a paused VM'), { reason: 'stopped' })
  const err = await t.throwsAsync(vm.pause(), { instanceOf: MicrocellError })
  t.is(err.code, 'E_VM_STATE', err.message)
  const snap = await t.throwsAsync(vm.snapshot(freshDir('ended')), { instanceOf: MicrocellError })
  t.is(snap.code, 'E_VM_STATE', snap.message)
})

kvm('incremental snapshots need trackDirtyPages, write less, and restore', async (t) => {
  const plain = await boot(t, 'ioloop.pvh.elf', { cmdline: 'tg.pages=512 tg.every=16', ready: /TG tick 1\n/ })
  await plain.vm.snapshot(freshDir('full'))
  const refused = await t.throwsAsync(plain.vm.snapshot(freshDir('incr'), { incremental: true }), { instanceOf: MicrocellError })
  t.is(refused.code, 'E_VM_STATE', refused.message)
  await plain.vm.kill()

  const { vm } = await boot(t, 'ioloop.pvh.elf', {
    cmdline: 'tg.pages=512 tg.every=16',
    ready: /TG tick 1\n/,
    startOptions: { trackDirtyPages: true },
  })
  const full = await vm.snapshot(freshDir('full'))
  const incremental = await vm.snapshot(freshDir('incr'), { incremental: true })
  await vm.kill()
  t.true(incremental.bytesWritten < full.bytesWritten, `incremental ${incremental.bytesWritten} < full ${full.bytesWritten}`)
  t.true(incremental.config.trackDirtyPages)
  const clone = await incremental.restore({ consoleStream: true })
  t.teardown(() => clone.kill())
  t.regex(await readUntil(clone.console, /TG tick \d+\n/), /TG tick \d+\n/)
  await clone.kill()
})

kvm('RestorePool: acquire ×8 with stats, background refill, close; later acquires throw E_POOL_CLOSED', async (t) => {
  const snapshot = await ioloopSnapshot(t)
  const pool = new RestorePool({ snapshot, size: 3, restoreOptions: { consoleStream: true } })
  t.teardown(() => pool.close({ killAcquired: true }))
  await within(pool.filled(), BOOT_MS, 'filled')
  let s = pool.stats()
  t.like(s, { size: 3, ready: 3, acquired: 0, live: 0, misses: 0, refillErrors: 0, lastRefillError: null, closed: false })
  const vms = []
  const ticks = new Set()
  for (let i = 0; i < 8; i++) {
    const before = process.hrtime.bigint()
    const vm = await pool.acquire()
    vms.push(vm)
    ticks.add(nextTick(await readUntil(vm.console, /TG tick \d+\n/)))
    t.true(vm.timings.firstExitNs >= before)
  }
  t.is(new Set(vms).size, 8, 'eight distinct VMs')
  t.is(ticks.size, 1, 'each a restore of the same snapshot')
  s = pool.stats()
  t.is(s.acquired, 8)
  t.is(s.live, 8)
  t.true(s.misses >= 0 && s.misses <= 8)
  t.log(`after 8 sequential acquires: ${JSON.stringify({ ...s, lastRefillError: undefined })}`)
  const deadline = Date.now() + BOOT_MS
  while (pool.stats().ready < 3 && Date.now() < deadline) await sleep(10)
  t.is(pool.stats().ready, 3, 'refilled in the background')
  await Promise.all(vms.map((vm) => pool.release(vm)))
  t.is(pool.stats().live, 0)
  t.true(vms.every((vm) => vm.exitStatus.reason === 'killed'))

  // Acquires faster than the pool refills: the ones that find no shell are misses.
  const burst = await Promise.all(Array.from({ length: 6 }, () => pool.acquire()))
  s = pool.stats()
  t.is(s.acquired, 14)
  t.true(s.misses >= 3, `a burst of 6 on 3 shells: ${s.misses} misses`)
  t.is(s.live, 6)

  await within(pool.close(), BOOT_MS, 'close')
  s = pool.stats()
  t.like(s, { ready: 0, filling: 0, closed: true })
  t.is(s.live, 6, 'close() leaves acquired VMs to their users')
  t.true(burst.every((vm) => vm.exitStatus === null))
  const err = await t.throwsAsync(pool.acquire(), { instanceOf: MicrocellError })
  t.is(err.code, 'E_POOL_CLOSED')
  const filled = await t.throwsAsync(pool.filled(), { instanceOf: MicrocellError })
  t.is(filled.code, 'E_POOL_CLOSED')
  await pool.close({ killAcquired: true })
  t.true(burst.every((vm) => vm.exitStatus?.reason === 'killed'))
  t.is(pool.stats().live, 0)
})

kvm('RestorePool: a released VM is never handed out again', async (t) => {
  const snapshot = await ioloopSnapshot(t)
  const pool = new RestorePool({ snapshot, size: 1 })
  t.teardown(() => pool[Symbol.asyncDispose]())
  await pool.filled()
  const seen = new Set()
  for (let i = 0; i < 5; i++) {
    const vm = await pool.acquire()
    t.false(seen.has(vm), 'a new VM every time')
    t.is(vm.exitStatus, null)
    seen.add(vm)
    t.deepEqual(await pool.release(vm), { reason: 'killed' })
    t.deepEqual(vm.exitStatus, { reason: 'killed' }, 'released = destroyed')
    t.deepEqual(await pool.release(vm), { reason: 'killed' }, 'releasing again is harmless')
  }
  const killed = await pool.acquire()
  await killed.kill() // ending it yourself is a release too
  t.is(pool.stats().live, 0)
  const next = await pool.acquire()
  t.not(next, killed)
  t.is(next.exitStatus, null)
  await pool.release(next)
  const stranger = await snapshot.restore()
  t.teardown(() => stranger.kill())
  const err = await t.throwsAsync(pool.release(stranger), { instanceOf: MicrocellError })
  t.is(err.code, 'E_INVALID_ARGUMENT')
  t.is(stranger.exitStatus, null, 'a VM the pool did not hand out is left alone')
})

kvm('RestorePool: size 0 keeps no shells (every acquire is a miss); bad options are E_INVALID_ARGUMENT', async (t) => {
  const snapshot = await ioloopSnapshot(t)
  const pool = new RestorePool({ snapshot, size: 0 })
  await pool.filled()
  const a = await pool.acquire()
  const b = await pool.acquire()
  t.like(pool.stats(), { ready: 0, acquired: 2, misses: 2 })
  await pool.close({ killAcquired: true })
  t.truthy(a.exitStatus && b.exitStatus)
  for (const options of [{}, { snapshot: {} }, { snapshot, size: -1 }, { snapshot, size: 2.5 }, { snapshot, concurrency: 0 }]) {
    const err = t.throws(() => new RestorePool(options), { instanceOf: MicrocellError })
    t.is(err.code, 'E_INVALID_ARGUMENT', JSON.stringify(Object.keys(options)))
  }
})

kvm('VmPool: keeps booted VMs warm, hands each out once, refills, replaces VMs that end on their own', async (t) => {
  const pool = new VmPool({ config: { kernel: guest('halt.pvh.elf'), memoryMib: 32 }, size: 2, startOptions: { consoleStream: true } })
  t.teardown(() => pool.close({ killAcquired: true }))
  await within(pool.filled(), BOOT_MS, 'filled')
  t.like(pool.stats(), { size: 2, ready: 2, acquired: 0, misses: 0 })
  const a = await pool.acquire()
  t.is(a.exitStatus, null)
  t.regex(await readUntil(a.console, /TG halt\n/), /^TG halt\n/, 'booted before it was handed out')
  // Three at once from a pool of two (at most): at least one is booted on demand.
  const [b, c, d] = await Promise.all([pool.acquire(), pool.acquire(), pool.acquire()])
  t.is(new Set([a, b, c, d]).size, 4)
  t.like(pool.stats(), { acquired: 4, live: 4 })
  t.true(pool.stats().misses >= 1)
  await Promise.all([a, b, c, d].map((vm) => pool.release(vm)))
  const deadline = Date.now() + BOOT_MS
  while (pool.stats().ready < 2 && Date.now() < deadline) await sleep(10)
  t.is(pool.stats().ready, 2)
  await pool.close()
  t.like(pool.stats(), { ready: 0, closed: true })
  const err = await t.throwsAsync(pool.acquire(), { instanceOf: MicrocellError })
  t.is(err.code, 'E_POOL_CLOSED')

  // hello resets at once: every warm VM expires and is replaced.
  const expiring = new VmPool({ config: { kernel: guest('hello.pvh.elf'), memoryMib: 32 }, size: 1 })
  const until = Date.now() + BOOT_MS
  while (expiring.stats().expired < 2 && Date.now() < until) await sleep(10)
  t.true(expiring.stats().expired >= 2, `expired ${expiring.stats().expired}`)
  await expiring.close()
  const bad = t.throws(() => new VmPool({ config: { memoryMib: 32, numVcpus: 99, kernel: guest('halt.pvh.elf') } }), {
    instanceOf: MicrocellError,
  })
  t.is(bad.code, 'E_CONFIG_VCPUS')
})

kvm('a restored guest that resets ends with reason reset, like a started one', async (t) => {
  const snapshot = await ioloopSnapshot(t, { extra: 'tg.ticks=3000' })
  const clone = await snapshot.restore({ consoleStream: true })
  t.teardown(() => clone.kill())
  const [text, exit] = await within(Promise.all([readAll(clone.console), clone.wait()]), BOOT_MS, 'the clone runs to its reset')
  t.deepEqual(exit, { reason: 'reset' })
  t.true(text.endsWith('TG tick 3000\n'), text.slice(-40))
})

kvm('an ended clone lets go of its memory at once, not when its handle is garbage collected', async (t) => {
  const snapshot = await ioloopSnapshot(t)
  const memFile = path.join(snapshot.dir, 'vm.mem')
  const mappings = () => fs.readFileSync('/proc/self/smaps', 'utf8').split('\n').filter((l) => l.endsWith(` ${memFile}`)).length
  const clones = await snapshot.clone(3)
  t.is(mappings(), 3, 'one guest-RAM mapping of the memory file per clone')
  const ran = Date.now() + 5000
  while (clones.some((c) => c.timings.firstExitNs === null) && Date.now() < ran) await sleep(1)
  await Promise.all(clones.map((c) => c.kill()))
  const deadline = Date.now() + 5000
  while (mappings() > 0 && Date.now() < deadline) await sleep(10)
  t.is(mappings(), 0, 'unmapped while the handles are still referenced')
  t.true(clones.every((c) => c.exitStatus.reason === 'killed' && c.timings.firstExitNs !== null), 'timings outlive the VM')
  t.deepEqual(await clones[0].stop(), { reason: 'killed' }, 'stop() of an ended VM is harmless')
})

// Bad snapshot directories: no KVM needed.
function badDir(name, files) {
  const d = freshDir(name)
  fs.mkdirSync(d, { recursive: true })
  for (const [file, content] of Object.entries(files)) fs.writeFileSync(path.join(d, file), content)
  return d
}

test('Snapshot.load: a missing directory or file is E_SNAPSHOT_IO', async (t) => {
  for (const d of [path.join(dir, 'does-not-exist'), badDir('empty', {})]) {
    const err = await t.throwsAsync(Snapshot.load(d), { instanceOf: MicrocellError })
    t.is(err.code, 'E_SNAPSHOT_IO', err.message)
    t.true(err.message.includes('vm.state'), err.message)
  }
  const err = await t.throwsAsync(Snapshot.load(''), { instanceOf: MicrocellError })
  t.is(err.code, 'E_INVALID_ARGUMENT')
})

test('Snapshot.load: a state file that is not a snapshot is E_SNAPSHOT_CORRUPT', async (t) => {
  for (const content of ['', 'not a snapshot at all', Buffer.alloc(4096, 0xff)]) {
    const d = badDir('garbage', { 'vm.state': content, 'vm.mem': '' })
    const err = await t.throwsAsync(Snapshot.load(d), { instanceOf: MicrocellError })
    t.is(err.code, 'E_SNAPSHOT_CORRUPT', err.message)
  }
})

kvm('Snapshot.load: a damaged real snapshot is E_SNAPSHOT_CORRUPT (checksum, truncated memory) or E_SNAPSHOT_IO (no memory file)', async (t) => {
  const { vm } = await boot(t, 'halt.pvh.elf', { ready: /TG halt\n/ })
  const good = await vm.snapshot(freshDir('good'))
  await vm.kill()
  const state = fs.readFileSync(path.join(good.dir, 'vm.state'))
  const copy = (name) => {
    const d = freshDir(name)
    fs.mkdirSync(d)
    fs.copyFileSync(path.join(good.dir, 'vm.state'), path.join(d, 'vm.state'))
    fs.copyFileSync(path.join(good.dir, 'vm.mem'), path.join(d, 'vm.mem'))
    return d
  }
  t.truthy(await Snapshot.load(copy('copy')), 'an intact copy loads')

  const flipped = copy('flipped')
  const bytes = Buffer.from(state)
  bytes[bytes.length - 100] ^= 0x40
  fs.writeFileSync(path.join(flipped, 'vm.state'), bytes)
  let err = await t.throwsAsync(Snapshot.load(flipped), { instanceOf: MicrocellError })
  t.is(err.code, 'E_SNAPSHOT_CORRUPT', err.message)

  const cut = copy('cut')
  fs.writeFileSync(path.join(cut, 'vm.state'), state.subarray(0, state.length >> 1))
  err = await t.throwsAsync(Snapshot.load(cut), { instanceOf: MicrocellError })
  t.is(err.code, 'E_SNAPSHOT_CORRUPT', err.message)

  const short = copy('short')
  fs.truncateSync(path.join(short, 'vm.mem'), 1 << 20)
  err = await t.throwsAsync(Snapshot.load(short), { instanceOf: MicrocellError })
  t.is(err.code, 'E_SNAPSHOT_CORRUPT', err.message)

  const noMem = copy('nomem')
  fs.rmSync(path.join(noMem, 'vm.mem'))
  err = await t.throwsAsync(Snapshot.load(noMem), { instanceOf: MicrocellError })
  t.is(err.code, 'E_SNAPSHOT_IO', err.message)

  const snapErr = await t.throwsAsync(
    (async () => {
      const { vm: again } = await boot(t, 'halt.pvh.elf', { ready: /TG halt\n/ })
      const file = path.join(dir, `a-file-${dirs++}`)
      fs.writeFileSync(file, 'x')
      try {
        return await again.snapshot(path.join(file, 'sub'))
      } finally {
        await again.kill()
      }
    })(),
    { instanceOf: MicrocellError },
  )
  t.is(snapErr.code, 'E_SNAPSHOT_IO', snapErr.message)
})

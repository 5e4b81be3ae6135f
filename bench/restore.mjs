// `npm run bench:restore`: restore → the guest's first instruction, for `Snapshot.restore()` and
// `RestorePool.acquire()`, 256 MiB and 2 GiB guests with all RAM above 16 MiB touched; memory of
// 50 live clones of one snapshot beyond the shared page cache; and, in the same run, QEMU
// restoring the same guest from a migration file (Firecracker only if MICROCELL_FIRECRACKER
// names a binary). Not a test: numbers go to bench/results/restore.{json,md}.
//
// The guest is ioloop.pvh.elf: it touches its pages, then loops doing one port read per
// iteration, so a restored clone exits to the VMM within a few instructions of its restore and
// `timings.firstExitNs` is the restore → first-instruction time.
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

import { MicroVm, RestorePool } from 'microcell'

import { FC_QUIET, fcRequest, fcSocket, firecrackerBinary, guest, qemuBinary, rssSplit, summary, write } from './lib.mjs'

const RUNS = Number(process.env.BENCH_RUNS ?? 50)
const QEMU_RUNS = Number(process.env.BENCH_QEMU_RUNS ?? 20)
const QEMU_RUNS_LARGE = Number(process.env.BENCH_QEMU_RUNS_LARGE ?? 5)
const DENSITY = Number(process.env.BENCH_DENSITY ?? 50)
const CASES = (process.env.BENCH_CASES ?? '256,2048').split(',').map(Number)
const EVERY = 16 // port reads per tick: a tick line every few dozen exits
const ms = (ns) => Number(ns) / 1e6
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-bench-restore-'))
process.on('exit', () => fs.rmSync(work, { recursive: true, force: true }))

/** Pages from 16 MiB to the end of RAM (ioloop/memtouch touch from 16 MiB). */
const pagesFor = (mib) => (mib - 16) * 256
const cmdlineFor = (mib) => `tg.pages=${pagesFor(mib)} tg.every=${EVERY}`

async function untilLine(stream, re, ms = 120_000) {
  let text = ''
  const timer = setTimeout(() => stream.destroy(new Error(`no ${re} within ${ms} ms: ${text.slice(-200)}`)), ms)
  try {
    for await (const chunk of stream) {
      text += chunk.toString('latin1')
      if (re.test(text)) return text
    }
    throw new Error(`the console ended before ${re}`)
  } finally {
    clearTimeout(timer)
  }
}

/** Boots ioloop with `mib` MiB, lets it touch its pages, pauses it and snapshots it. */
async function makeSnapshot(mib) {
  const t0 = performance.now()
  const vm = await MicroVm.builder().kernel(guest('ioloop.pvh.elf')).memoryMib(mib).cmdline(cmdlineFor(mib)).start({ consoleStream: true })
  await untilLine(vm.console, /TG tick 1\n/)
  const booted = performance.now()
  await vm.pause()
  const snapshot = await vm.snapshot(path.join(work, `mc-${mib}`))
  const taken = performance.now()
  await vm.kill()
  console.error(`# microcell ${mib} MiB: boot + touch ${(booted - t0).toFixed(0)} ms, snapshot ${(taken - booted).toFixed(0)} ms, ${(snapshot.bytesWritten / 2 ** 20).toFixed(0)} MiB written`)
  return snapshot
}

/** Resolves with the VM's first-exit timestamp (recorded by its vCPU thread). */
async function firstExit(vm) {
  const deadline = performance.now() + 5000
  for (;;) {
    const t = vm.timings.firstExitNs
    if (t !== null) return t
    if (performance.now() > deadline) throw new Error('the restored guest made no exit within 5 s')
    await sleep(1)
  }
}

async function restoreRuns(snapshot, mib) {
  const first = []
  const running = []
  for (let i = -3; i < RUNS; i++) {
    await sleep(5) // the spare shell made after the previous restore is ready by then
    const t0 = process.hrtime.bigint()
    const vm = await snapshot.restore()
    const t1 = process.hrtime.bigint()
    const fe = await firstExit(vm)
    await vm.kill()
    if (i < 0) continue // warm-up: page cache, first use of the blocking pool
    first.push(ms(fe - t0))
    running.push(ms(t1 - t0))
  }
  return [
    summary('microcell', `${mib}MiB Snapshot.restore()`, 'restore_to_first_instruction', 'ms', first),
    summary('microcell', `${mib}MiB Snapshot.restore()`, 'restore_call_to_resolved', 'ms', running),
  ]
}

async function poolRuns(snapshot, mib) {
  const pool = new RestorePool({ snapshot, size: 4 })
  await pool.filled()
  const first = []
  const running = []
  for (let i = -3; i < RUNS; i++) {
    await pool.filled() // measure the ready-shell path: the refill of the last acquire is done
    const t0 = process.hrtime.bigint()
    const vm = await pool.acquire()
    const t1 = process.hrtime.bigint()
    const fe = await firstExit(vm)
    await pool.release(vm)
    if (i < 0) continue
    first.push(ms(fe - t0))
    running.push(ms(t1 - t0))
  }
  const stats = pool.stats()
  await pool.close()
  return {
    results: [
      summary('microcell', `${mib}MiB RestorePool.acquire()`, 'restore_to_first_instruction', 'ms', first),
      summary('microcell', `${mib}MiB RestorePool.acquire()`, 'restore_call_to_resolved', 'ms', running),
    ],
    stats,
  }
}

/** Sums smaps fields (KiB) over this process's mappings of `file`. */
function mappingsOf(file) {
  const lines = fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')
  const sum = { mappings: 0, rss: 0, privateDirty: 0, anonymous: 0, sharedClean: 0, privateClean: 0 }
  let inside = false
  for (const line of lines) {
    const m = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line)
    if (m) {
      inside = m[1] === file
      if (inside) sum.mappings++
      continue
    }
    if (!inside) continue
    const f = /^(\w+):\s+(\d+) kB/.exec(line)
    if (!f) continue
    const v = Number(f[2])
    if (f[1] === 'Rss') sum.rss += v
    else if (f[1] === 'Private_Dirty') sum.privateDirty += v
    else if (f[1] === 'Anonymous') sum.anonymous += v
    else if (f[1] === 'Shared_Clean') sum.sharedClean += v
    else if (f[1] === 'Private_Clean') sum.privateClean += v
  }
  return sum
}

function rssAnonKib() {
  return Number(/RssAnon:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1])
}

async function density(snapshot, mib) {
  const memFile = path.join(snapshot.dir, 'vm.mem')
  const anonBefore = rssAnonKib()
  const t0 = performance.now()
  const clones = await snapshot.clone(DENSITY)
  const made = performance.now() - t0
  await Promise.all(clones.map(firstExit))
  await sleep(500) // every clone has run on for a while (ticks, console)
  const m = mappingsOf(memFile)
  const anonAfter = rssAnonKib()
  const alive = clones.filter((vm) => vm.exitStatus === null).length
  await Promise.all(clones.map((vm) => vm.kill()))
  if (m.mappings !== DENSITY) throw new Error(`found ${m.mappings} mappings of ${memFile}, expected ${DENSITY}`)
  const mibOf = (kib) => kib / 1024
  const kase = `${mib}MiB x${DENSITY} clones`
  return {
    results: [
      summary('microcell', kase, 'clones_private_rss_total', 'MiB', [mibOf(Math.max(m.anonymous, m.privateDirty))]),
      summary('microcell', kase, 'clones_private_rss_per_clone', 'MiB', [mibOf(Math.max(m.anonymous, m.privateDirty)) / DENSITY]),
      summary('microcell', kase, 'clones_rss_incl_shared_page_cache', 'MiB', [mibOf(m.rss)]),
      summary('microcell', kase, 'process_anon_rss_growth', 'MiB', [mibOf(anonAfter - anonBefore)]),
      summary('microcell', kase, 'clone_all_wall', 'ms', [made]),
    ],
    note:
      `Density: ${DENSITY} clones of the ${mib} MiB snapshot made with \`snapshot.clone(${DENSITY})\` in ${made.toFixed(0)} ms, all running (${alive} alive at the measurement, 0.5 s after their first exits). ` +
      `Over the ${m.mappings} guest-RAM mappings of vm.mem in /proc/self/smaps: Anonymous ${m.anonymous} KiB, Private_Dirty ${m.privateDirty} KiB ` +
      `(the pages the clones wrote: their own), Rss ${m.rss} KiB (page-cache pages counted once per mapping; they are one copy in the page cache), ` +
      `Shared_Clean ${m.sharedClean} KiB, Private_Clean ${m.privateClean} KiB. Process RssAnon grew ${anonAfter - anonBefore} KiB (VMM state, threads' stacks, console queues, and the clones' written pages).`,
  }
}

// ---- QEMU: the same guest, restored from a migration file -----------------------------------

function qemuArgs(mib, extra) {
  return [
    '-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off',
    '-enable-kvm', '-m', String(mib), '-smp', '1',
    '-kernel', guest('ioloop.pvh.elf'), '-append', cmdlineFor(mib),
    '-nodefaults', '-no-user-config', '-nographic', '-serial', 'stdio', '-monitor', 'none',
    ...extra,
  ]
}

/** A QMP connection on a Unix socket; connects as soon as the socket accepts. */
function qmp(sock, timeoutMs = 30_000) {
  const deadline = performance.now() + timeoutMs
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const s = net.connect(sock)
      s.once('error', (err) => {
        if (performance.now() > deadline) reject(new Error(`QMP socket ${sock}: ${err.message}`))
        else setTimeout(attempt, 1)
      })
      s.once('connect', () => {
        let buf = ''
        const pending = []
        s.on('data', (d) => {
          buf += d
          for (let i; (i = buf.indexOf('\n')) >= 0; ) {
            const msg = JSON.parse(buf.slice(0, i))
            buf = buf.slice(i + 1)
            if ('return' in msg || 'error' in msg) pending.shift()?.(msg)
          }
        })
        s.on('error', () => {})
        const cmd = (execute, args) =>
          new Promise((res, rej) => {
            pending.push((msg) => (msg.error ? rej(new Error(`QMP ${execute}: ${msg.error.desc}`)) : res(msg.return)))
            s.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n')
          })
        resolve({ cmd, close: () => s.destroy() })
      })
    }
    attempt()
  })
}

function kill(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill('SIGKILL')
  return exited
}

/** Boots the guest in QEMU, lets it touch its pages, migrates it to a file ("exec:cat > FILE"). */
async function qemuSnapshot(bin, mib) {
  const sock = path.join(work, `qemu-src-${mib}.sock`)
  const file = path.join(work, `qemu-${mib}.mig`)
  const t0 = performance.now()
  const child = spawn(bin, qemuArgs(mib, ['-qmp', `unix:${sock},server=on,wait=off`]), { stdio: ['ignore', 'pipe', 'pipe'] })
  try {
    await untilLine(child.stdout, /TG tick 1\n/, 300_000)
    const booted = performance.now()
    const q = await qmp(sock)
    await q.cmd('qmp_capabilities')
    // The guest is left running: a stream of a running VM restores running (of a stopped one,
    // stopped), as -incoming without -S resumes what was running.
    await q.cmd('migrate', { uri: `exec:cat > ${file}` })
    for (;;) {
      const r = await q.cmd('query-migrate')
      if (r.status === 'completed') break
      if (r.status === 'failed' || r.status === 'cancelled') throw new Error(`QEMU migration ${r.status}`)
      await sleep(5)
    }
    q.close()
    console.error(`# qemu ${mib} MiB: boot + touch ${(booted - t0).toFixed(0)} ms, migrate to file ${(performance.now() - booted).toFixed(0)} ms, ${(fs.statSync(file).size / 2 ** 20).toFixed(0)} MiB`)
    return file
  } finally {
    await kill(child)
  }
}

/** One restore: spawn → QMP `running`, and spawn → first serial byte (the guest's next tick). */
async function qemuRestoreOnce(bin, mib, file, i, measureRss) {
  const sock = path.join(work, `qemu-dst-${mib}-${i}.sock`)
  const t0 = process.hrtime.bigint()
  const child = spawn(bin, qemuArgs(mib, ['-qmp', `unix:${sock},server=on,wait=off`, '-incoming', `exec:cat ${file}`]), {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  try {
    const firstByte = new Promise((resolve, reject) => {
      child.stdout.once('data', () => resolve(process.hrtime.bigint()))
      child.once('exit', (code) => reject(new Error(`QEMU exited (${code}) before any serial output`)))
    })
    const q = await qmp(sock)
    await q.cmd('qmp_capabilities')
    let running
    for (;;) {
      const r = await q.cmd('query-status')
      if (r.status === 'running') {
        running = process.hrtime.bigint()
        break
      }
      if (process.hrtime.bigint() - t0 > 120_000_000_000n) throw new Error(`QEMU not running after 120 s: ${r.status}`)
    }
    q.close()
    const fb = await firstByte
    let rss = null
    if (measureRss) {
      await sleep(200)
      rss = rssSplit(child.pid, mib << 20)
    }
    return { runningMs: ms(running - t0), firstByteMs: ms(fb - t0), rss }
  } finally {
    await kill(child)
    fs.rmSync(sock, { force: true })
  }
}

async function qemu(mib) {
  const q = qemuBinary()
  if (!q) return { results: [], notes: ['QEMU: not installed (apt-get install qemu-system-x86); its rows are missing.'] }
  const file = await qemuSnapshot(q.path, mib)
  const runs = mib > 512 ? QEMU_RUNS_LARGE : QEMU_RUNS
  const running = []
  const first = []
  let rss = null
  for (let i = -1; i < runs; i++) {
    const r = await qemuRestoreOnce(q.path, mib, file, i, i === runs - 1)
    if (i < 0) continue
    running.push(r.runningMs)
    first.push(r.firstByteMs)
    rss = r.rss ?? rss
  }
  fs.rmSync(file, { force: true })
  const results = [
    summary('qemu', `${mib}MiB -incoming exec:cat`, 'spawn_to_running_qmp', 'ms', running),
    summary('qemu', `${mib}MiB -incoming exec:cat`, 'spawn_to_first_serial_byte', 'ms', first),
  ]
  if (rss) results.push(summary('qemu', `${mib}MiB -incoming exec:cat`, 'restored_vm_guest_ram_rss', 'MiB', [rss.guestKib / 1024]))
  return { results, notes: [] }
}

// ---- Firecracker, only where MICROCELL_FIRECRACKER names a binary ---------------------------

async function firecracker(bin, mib) {
  const snap = path.join(work, `fc-${mib}.snap`)
  const mem = path.join(work, `fc-${mib}.mem`)
  const srcSock = path.join(work, `fc-src-${mib}.sock`)
  const src = spawn(bin, ['--api-sock', srcSock, ...FC_QUIET], { stdio: ['ignore', 'pipe', 'pipe'] })
  try {
    await fcSocket(srcSock)
    await fcRequest(srcSock, 'PUT', '/boot-source', { kernel_image_path: guest('ioloop.pvh.elf'), boot_args: cmdlineFor(mib) })
    await fcRequest(srcSock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: mib })
    await fcRequest(srcSock, 'PUT', '/actions', { action_type: 'InstanceStart' })
    await untilLine(src.stdout, /TG tick 1\n/, 300_000)
    await fcRequest(srcSock, 'PATCH', '/vm', { state: 'Paused' })
    await fcRequest(srcSock, 'PUT', '/snapshot/create', { snapshot_type: 'Full', snapshot_path: snap, mem_file_path: mem })
  } finally {
    await kill(src)
  }
  const first = []
  for (let i = -1; i < (mib > 512 ? QEMU_RUNS_LARGE : QEMU_RUNS); i++) {
    const sock = path.join(work, `fc-dst-${mib}-${i}.sock`)
    const t0 = process.hrtime.bigint()
    const child = spawn(bin, ['--api-sock', sock, ...FC_QUIET], { stdio: ['ignore', 'pipe', 'pipe'] })
    try {
      const fb = new Promise((resolve) => child.stdout.once('data', () => resolve(process.hrtime.bigint())))
      await fcSocket(sock)
      await fcRequest(sock, 'PUT', '/snapshot/load', { snapshot_path: snap, mem_backend: { backend_type: 'File', backend_path: mem }, resume_vm: true })
      const t = await fb
      if (i >= 0) first.push(ms(t - t0))
    } finally {
      await kill(child)
      fs.rmSync(sock, { force: true })
    }
  }
  return [summary('firecracker', `${mib}MiB /snapshot/load`, 'spawn_to_first_serial_byte', 'ms', first)]
}

// ---- the run -----------------------------------------------------------------------------------

const loadBefore = os.loadavg().map((l) => l.toFixed(2)).join(' ')
const results = []
const notes = []
const poolStats = []
let densityNote = null
for (const mib of CASES) {
  const snapshot = await makeSnapshot(mib)
  results.push(...(await restoreRuns(snapshot, mib)))
  const pool = await poolRuns(snapshot, mib)
  results.push(...pool.results)
  poolStats.push(`${mib} MiB: acquired ${pool.stats.acquired}, misses ${pool.stats.misses}, refill errors ${pool.stats.refillErrors}`)
  if (mib === CASES[0]) {
    const d = await density(snapshot, mib)
    results.push(...d.results)
    densityNote = d.note
  }
  fs.rmSync(snapshot.dir, { recursive: true, force: true })
}
for (const mib of CASES) {
  const q = await qemu(mib)
  results.push(...q.results)
  notes.push(...q.notes)
}
const fc = firecrackerBinary()
if (fc.path) {
  notes.push(`Firecracker: ${fc.version} (MICROCELL_FIRECRACKER), the same guest; spawn → \`PUT /snapshot/load\` (File backend, resume_vm) → the first byte on its serial stdout (logs to /dev/null).`)
  for (const mib of CASES) {
    try {
      results.push(...(await firecracker(fc.path, mib)))
    } catch (err) {
      notes.push(`Firecracker (${fc.path}), ${mib} MiB: failed: ${err.message}`)
    }
  }
} else {
  notes.push(`Firecracker: skipped (${fc.why}).`)
}

const p50 = (system, kase, metric) => results.find((r) => r.system === system && r.case.startsWith(kase) && r.metric === metric)?.p50
const ratios = CASES.flatMap((mib) => {
  const mc = p50('microcell', `${mib}MiB Snapshot.restore`, 'restore_to_first_instruction')
  return ['qemu', 'firecracker'].map((peer) => {
    const r = p50(peer, `${mib}MiB`, 'spawn_to_first_serial_byte')
    return mc && r ? `${mib} MiB: ${peer} (spawn → first serial byte) / microcell Snapshot.restore() (→ first instruction) = ${(r / mc).toFixed(0)}x (the peers start a process per restore; microcell restores inside a running process)` : null
  })
}).filter(Boolean)

write('restore', results, [
  `Guest: \`ioloop.pvh.elf\` with \`${cmdlineFor(256)}\` (256 MiB) / \`${cmdlineFor(2048)}\` (2 GiB): every page from 16 MiB to the end of RAM written once (the snapshot memory file holds them all),`,
  'then a loop of one port read per iteration with a `TG tick <k>` line every 16 iterations. Snapshot taken paused, after `TG tick 1`.',
  '',
  '- `restore_to_first_instruction`: from just before the JS call (`snapshot.restore()` or `pool.acquire()`) to the restored guest\'s first exit to the VMM',
  '  (`vm.timings.firstExitNs`, the KVM exit timestamp taken by the vCPU thread, same clock as `process.hrtime.bigint()`); the guest\'s next instruction is a port read, so this is restore → first guest instruction.',
  '  `restore_call_to_resolved`: the same start to the promise resolving (vCPUs started). 3 warm-up runs dropped; each VM killed after its first exit, outside the timed span.',
  `- RestorePool: size 4; before each acquire the previous acquire's background refill is awaited (\`pool.filled()\`), so every timed acquire restores into a ready shell (${poolStats.join('; ')}).`,
  '  `Snapshot.restore()` restores into the spare shell the loaded snapshot keeps (made after each restore, off the latency path; 5 ms idle before each timed restore lets it be made; the first restore, a warm-up, makes its shell inline);',
  '  back-to-back restores faster than a shell is made (~0.8 ms) make theirs inline (KVM VM, memory slot, irqchip, PIT, vCPU): bursts are what the pool is for.',
  `- ${densityNote}`,
  '- QEMU: `qemu-system-x86_64 -M microvm -enable-kvm`, the same guest, command line and RAM; the running guest migrated with QMP `migrate exec:cat > FILE`, then each run spawns',
  '  QEMU with `-incoming "exec:cat FILE"` (it resumes the guest once the stream is read). `spawn_to_running_qmp`: spawn → QMP `query-status` first says `running` (QMP polled as fast as it answers);',
  '  `spawn_to_first_serial_byte`: spawn → the first byte on its serial stdout (the restored guest\'s next tick, at most ~40 exits after resuming; includes process start and pipe latency).',
  '  `restored_vm_guest_ram_rss`: RSS of the guest-RAM mapping of one restored QEMU (QEMU reads the whole stream into anonymous memory: every clone would pay this).',
  ...notes,
  ...ratios,
  'One clone per HTTP request (examples/serverless-handler.mjs): serverless.md.',
  `Host load average (1, 5, 15 min) at the start ${loadBefore}, at the end (its own threads included) ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}; 2 cores shared with other work: p90s are noisy.`,
])

// T2 and T3: Sandbox snapshots through the Node API, per tier (engine 'qemu': migration to a
// file; engine 'kvm': the built-in VMM's snapshot): a running sandbox is snapshotted and clones
// start from it; each is its own VM that starts from the snapshot's files and processes, then
// diverges from the others, with randomness of its own; the original runs on. Also 2 vCPUs.
import path from 'node:path'

import test from 'ava'

import { MicrocellError, Sandbox, Snapshot } from 'microcell'

import { perTier, requireGuestImages } from './guest.mjs'
import { tempDir } from './helpers.mjs'

const text = async (sb, script) => {
  const r = await sb.exec('sh', ['-c', script])
  if (r.exitCode !== 0) throw new Error(`${script}: exit ${r.exitCode}: ${r.stderrText()}`)
  return r.stdoutText().trim()
}

perTier(test, 'sandbox snapshots', (tier, engine) => {
  test.serial(`${tier}: a sandbox snapshot restores into clones that diverge and draw fresh randomness`, async (t) => {
    requireGuestImages()
    const dir = tempDir()
    const original = await Sandbox.builder('snap').memory(256).engine(engine).create()
    try {
      await original.fs.write('/root/before.txt', 'from the original')
      // A process that lives across the snapshot: its count goes on in every clone.
      await text(original, 'setsid sh -c "i=0; while true; do i=\\$((i+1)); echo \\$i > /tmp/ticks; sleep 0.2; done" </dev/null >/dev/null 2>&1 &')
      await new Promise((r) => setTimeout(r, 500))
      const snap = path.join(dir, 's1')
      t.is(await original.snapshot(snap), snap)
      const wrongKind = await t.throwsAsync(Snapshot.load(snap), { instanceOf: MicrocellError })
      t.is(wrongKind.code, 'E_SNAPSHOT')
      t.regex(wrongKind.message, /Sandbox\.fromSnapshot/)
      const clones = [await Sandbox.fromSnapshot(snap), await Sandbox.fromSnapshot(snap)]
      try {
        for (const c of clones) {
          t.is(c.info.engine, engine)
          t.is(c.info.kernelRelease, original.info.kernelRelease)
          t.regex(c.info.engineReason, /restored from/)
          t.log(`${engine}: restored in ${c.info.bootMs.toFixed(0)} ms`)
          t.is(await c.fs.readText('/root/before.txt'), 'from the original')
        }
        // Each writes its own file: none sees the others' (nor does the original).
        for (const [i, c] of clones.entries()) await c.fs.write('/root/mine.txt', `clone ${i}`)
        for (const [i, c] of clones.entries()) t.is(await c.fs.readText('/root/mine.txt'), `clone ${i}`)
        t.false(await original.fs.exists('/root/mine.txt'))
        // The process from before the snapshot runs on in each clone.
        for (const c of clones) {
          const a = Number(await c.fs.readText('/tmp/ticks'))
          await new Promise((r) => setTimeout(r, 1500))
          t.true(Number(await c.fs.readText('/tmp/ticks')) > a, 'the ticking process runs on')
        }
        // Fresh randomness: the kernel's pool was reseeded per clone at its handshake.
        const draws = await Promise.all([original, ...clones].map((sb) => text(sb, 'head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"')))
        t.is(new Set(draws).size, 3, `the original and two clones drew ${draws.join(', ')}`)
        for (const c of clones) t.is((await c.stop({ timeoutMs: 10_000 })).reason, 'reset')
      } finally {
        for (const c of clones) await c.kill()
      }
      t.is(original.exitStatus, null, 'the original runs on')
    } finally {
      await original.stop({ timeoutMs: 10_000 })
    }
  })

  test.serial(`${tier}: a sandbox with 2 vCPUs sees and uses both`, async (t) => {
    requireGuestImages()
    const sb = await Sandbox.builder('two').memory(256).cpus(2).engine(engine).create()
    try {
      t.is(await text(sb, 'nproc'), '2')
      // Each CPU runs what is pinned to it (field 39 of /proc/self/stat: the CPU it ran on).
      for (const cpu of ['0', '1']) t.is(await text(sb, `taskset -c ${cpu} awk '{ print $39 }' /proc/self/stat`), cpu)
    } finally {
      await sb.stop({ timeoutMs: 10_000 })
    }
  })
})

test('restoring from a directory that is not a snapshot is a coded error', async (t) => {
  const dir = tempDir()
  const err = await t.throwsAsync(Sandbox.fromSnapshot(dir), { instanceOf: MicrocellError })
  t.is(err.code, 'E_SNAPSHOT')
})

// T2: Sandbox snapshots through the Node API on engine 'qemu' (migration to a file here; the
// built-in VMM's snapshots where it boots Linux): a running sandbox is snapshotted and two
// clones start from it; each is its own VM, runs, and stops, while the original runs on.
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import test from 'ava'

import { MicrocellError, Sandbox, Snapshot } from 'microcell'

import { tempDir } from './helpers.mjs'

const cache = process.env.MICROCELL_CACHE ?? path.join(os.homedir(), '.cache', 'microcell')
const images = [path.join(cache, 'kernel-current', 'vmlinux'), path.join(cache, 'rootfs-current', 'rootfs.ext4')]

test.serial('a sandbox snapshot restores into independent clones', async (t) => {
  for (const p of images) {
    if (!fs.existsSync(p)) return t.fail(`guest image ${p} is missing: run ./scripts/setup.sh`)
  }
  const dir = tempDir()
  const original = await Sandbox.builder('snap').memory(256).engine('qemu').create()
  try {
    t.is(await original.snapshot(path.join(dir, 's1')), path.join(dir, 's1'))
    for (const f of ['qemu.mig', 'rootfs.img', 'sandbox.json']) t.true(fs.existsSync(path.join(dir, 's1', f)), f)
    const wrongKind = await t.throwsAsync(Snapshot.load(path.join(dir, 's1')), { instanceOf: MicrocellError })
    t.is(wrongKind.code, 'E_SNAPSHOT')
    t.regex(wrongKind.message, /Sandbox\.fromSnapshot/)
    const clones = [await Sandbox.fromSnapshot(path.join(dir, 's1')), await Sandbox.fromSnapshot(path.join(dir, 's1'))]
    for (const c of clones) {
      t.is(c.info.engine, 'qemu')
      t.is(c.info.kernelRelease, original.info.kernelRelease)
      t.regex(c.info.engineReason, /restored from/)
      t.log(`restored in ${c.info.bootMs.toFixed(0)} ms`)
    }
    t.not(clones[0].info.pid, clones[1].info.pid)
    for (const c of clones) t.is((await c.stop({ timeoutMs: 5000 })).reason, 'reset')
    t.is(original.exitStatus, null, 'the original runs on')
  } finally {
    await original.stop({ timeoutMs: 5000 })
  }
})

test('restoring from a directory that is not a snapshot is a coded error', async (t) => {
  const dir = tempDir()
  const err = await t.throwsAsync(Sandbox.fromSnapshot(dir), { instanceOf: MicrocellError })
  t.is(err.code, 'E_SNAPSHOT')
})

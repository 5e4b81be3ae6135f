// Host directories shared into the guest: Sandbox `volumes` and MicroVm `mappedDirs` (virtio-9p on
// engine qemu; the built-in VMM has no such device yet). T0: configuration errors; T2: reads and
// writes both ways, read-only volumes, a workload VM's mappedDirs, and the snapshot refusal.
import fs from 'node:fs'
import path from 'node:path'

import test from 'ava'

import { MicroVm, MicrocellError, Sandbox, defaultGuest } from 'microcell'

import { tempDir } from './helpers.mjs'
import { requireGuestImages, t2Test } from './guest.mjs'

test('volume configuration errors are coded at build(); host paths are made absolute', (t) => {
  const dir = tempDir()
  const code = (edit) => t.throws(() => edit(Sandbox.builder('v')).build(), { instanceOf: MicrocellError }).code
  t.is(code((b) => b.volume(path.join(dir, 'missing'), '/data')), 'E_CONFIG_VOLUME')
  t.is(code((b) => b.volume(dir, 'relative')), 'E_CONFIG_VOLUME')
  t.is(code((b) => b.volume(dir, '/')), 'E_CONFIG_VOLUME')
  t.is(code((b) => b.volume(dir, '/a:b')), 'E_CONFIG_VOLUME')
  t.is(code((b) => b.volume(dir, '/a').volume(dir, '/a/b')), 'E_CONFIG_VOLUME')
  t.is(code((b) => b.volume(dir, '/1').volume(dir, '/2').volume(dir, '/3').volume(dir, '/4').volume(dir, '/5')), 'E_CONFIG_VOLUME')
  const rel = path.relative(process.cwd(), dir)
  t.deepEqual(Sandbox.builder('v').volume(rel, '/data/', { readOnly: true }).build().volumes, [{ host: fs.realpathSync(dir), guest: '/data', readOnly: true }])
})

t2Test(test, 'a volume is shared both ways; a read-only one refuses writes; a sandbox with volumes is not snapshotted', async (t) => {
  requireGuestImages()
  const rw = tempDir()
  const ro = tempDir()
  fs.writeFileSync(path.join(ro, 'input.txt'), 'from the host\n')
  const sb = await Sandbox.builder('vols').memory(256).volume(rw, '/work').volume(ro, '/in', { readOnly: true }).create()
  try {
    t.regex(sb.info.engineReason, /auto|asked/)
    t.is(await sb.fs.readText('/in/input.txt'), 'from the host\n')
    await sb.shell('echo made-in-the-guest > /work/out.txt && mkdir -p /work/sub && echo deep > /work/sub/f')
    t.is(fs.readFileSync(path.join(rw, 'out.txt'), 'utf8'), 'made-in-the-guest\n')
    t.is(fs.readFileSync(path.join(rw, 'sub', 'f'), 'utf8'), 'deep\n')
    // The host's later writes are seen at once (no guest cache).
    fs.writeFileSync(path.join(rw, 'later.txt'), 'written after boot\n')
    t.is((await sb.shell('cat /work/later.txt')).stdoutText(), 'written after boot\n')
    const denied = await sb.shell('echo x > /in/nope.txt')
    t.not(denied.exitCode, 0)
    t.regex(denied.stderrText(), /Read-only file system/)
    t.false(fs.existsSync(path.join(ro, 'nope.txt')))
    const err = await t.throwsAsync(sb.snapshot(path.join(tempDir(), 'snap')), { instanceOf: MicrocellError })
    t.is(err.code, 'E_SNAPSHOT', err.message)
    t.regex(err.message, /volumes .*copyFromHost/)
    t.is(await sb.fs.readText('/in/input.txt'), 'from the host\n', 'it runs on after the refused snapshot')
  } finally {
    await sb.stop()
  }
})

t2Test(test, "a workload VM's mappedDirs are its volumes", async (t) => {
  requireGuestImages()
  const dir = tempDir()
  fs.writeFileSync(path.join(dir, 'in.txt'), 'data for the workload\n')
  const status = await MicroVm.builder()
    .rootfs(defaultGuest)
    .memoryMib(256)
    .mappedDirs([`${dir}:/data`])
    .execPath('/bin/sh')
    .args(['-c', 'tr a-z A-Z < /data/in.txt > /data/out.txt'])
    .run({ engine: 'qemu' })
  t.is(status.exitCode, 0)
  t.is(fs.readFileSync(path.join(dir, 'out.txt'), 'utf8'), 'DATA FOR THE WORKLOAD\n')
})

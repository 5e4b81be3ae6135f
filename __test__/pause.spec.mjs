// Pause and resume of sandboxes and workload VMs on the guest platform. T2: engine 'qemu' (QMP
// stop/cont here); T3: engine 'kvm' (the built-in VMM parks its vCPUs), skipped where it cannot
// boot Linux. A paused VM uses no CPU, its agent is not asked anything, a snapshot of it restores
// running, and stop() resumes it first.
import fs from 'node:fs'
import path from 'node:path'

import test from 'ava'

import { MicroVm, MicrocellError, Sandbox, defaultGuest } from 'microcell'

import { tempDir, within } from './helpers.mjs'
import { perTier, requireGuestImages } from './guest.mjs'

/** CPU time (user + system) of a process in clock ticks. */
function cpuTicks(pid) {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ')
  return Number(fields[11]) + Number(fields[12])
}

async function rejectsWith(t, promise, code) {
  const err = await t.throwsAsync(promise, { instanceOf: MicrocellError })
  t.is(err?.code, code, err?.message)
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

perTier(test, 'pause and resume', (tier, engine) => {
  test.serial(`${tier}: a paused sandbox uses no CPU, refuses new requests, snapshots paused and restores running; stop() resumes it`, async (t) => {
    requireGuestImages()
    const sb = await Sandbox.builder('pause').engine(engine).memory(256).create()
    try {
      // A guest that keeps a CPU busy, so that "no CPU while paused" means something.
      await sb.exec('sh', ['-c', 'echo kept > /tmp/state; (while :; do :; done) >/dev/null 2>&1 &'])
      t.false(sb.paused)
      await sb.pause()
      t.true(sb.paused)
      await sb.pause() // again: nothing changes
      const pid = sb.info.pid
      if (pid !== null) {
        const before = cpuTicks(pid)
        await sleep(1000)
        const used = cpuTicks(pid) - before
        t.true(used <= 5, `QEMU used ${used} ticks of CPU in 1 s while paused`)
      }
      await rejectsWith(t, sb.exec('true'), 'E_VM_STATE')
      await rejectsWith(t, sb.fs.readText('/tmp/state'), 'E_VM_STATE')

      const dir = path.join(tempDir(), 'snap')
      await sb.snapshot(dir)
      t.true(sb.paused, 'a paused sandbox stays paused after its snapshot')

      await sb.resume()
      t.false(sb.paused)
      t.is(await sb.fs.readText('/tmp/state'), 'kept\n')

      // Taken while paused, the snapshot restores running.
      const clone = await within(Sandbox.fromSnapshot(dir), 60_000, 'the restore of a paused snapshot')
      try {
        t.false(clone.paused)
        t.is(await clone.fs.readText('/tmp/state'), 'kept\n')
      } finally {
        await clone.kill()
      }

      await sb.pause()
      const exit = await within(sb.stop({ timeoutMs: 10_000 }), 20_000, 'stop() of a paused sandbox')
      t.is(exit.reason, 'reset', 'stop() resumed it and it powered off')
      await rejectsWith(t, sb.pause(), 'E_VM_STATE')
      await rejectsWith(t, sb.resume(), 'E_VM_STATE')
    } finally {
      await sb.kill()
    }
  })

  test.serial(`${tier}: a paused workload VM's program stops with it and goes on after resume()`, async (t) => {
    requireGuestImages()
    const script = 'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.1; done'
    const vm = await MicroVm.builder().rootfs(defaultGuest).memoryMib(256).execPath('/bin/sh').args(['-c', script]).start({ engine, consoleStream: true })
    try {
      let text = ''
      vm.console.on('data', (c) => {
        text += c.toString('latin1')
      })
      await within(
        (async () => {
          while (!text.includes('tick 3')) await sleep(50)
        })(),
        60_000,
        'the workload to tick',
      )
      await vm.pause()
      t.true(vm.paused)
      await sleep(200)
      const at = vm.consoleStats.totalBytes
      await sleep(1000)
      t.is(vm.consoleStats.totalBytes, at, 'no console output while paused')
      await rejectsWith(t, vm.signal('SIGTERM'), 'E_VM_STATE')
      await vm.resume()
      t.false(vm.paused)
      await within(
        (async () => {
          while (vm.consoleStats.totalBytes === at) await sleep(50)
        })(),
        10_000,
        'output after resume()',
      )
      await vm.pause()
      const exit = await within(vm.stop({ timeoutMs: 10_000 }), 20_000, 'stop() of a paused workload VM')
      t.like(exit.workload, { signal: 'SIGTERM' })
    } finally {
      await vm.kill()
    }
  })
})

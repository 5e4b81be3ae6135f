// T2/T3: every way a guest can end, or lose its agent, ends the sandbox in bounded time with a
// defined exit (docs/security.md): the engine's own end (a reset), a halted machine (the agent
// watchdog asks the engine), an agent that stops answering or hangs up (the watchdog's bound,
// 15 s of silence while the VM runs). In-flight requests settle; nothing is left running.
import test from 'ava'

import { MicrocellError, Sandbox } from 'microcell'

import { perTier, qemuChildren, requireGuestImages } from './guest.mjs'
import { within } from './helpers.mjs'

/** The watchdog's bounds (crates/sandbox/src/sandbox/watchdog.rs `Bounds::default`). */
const PING_EVERY_MS = 2000
const LOST_AFTER_MS = 15_000

/** Freezes the agent (PID 1) in a cgroup v2 freezer: the VM runs on, nothing answers. */
const FREEZE_AGENT = [
  'mkdir -p /sys/fs/cgroup',
  'grep -q " /sys/fs/cgroup cgroup2" /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup',
  'mkdir -p /sys/fs/cgroup/frozen-agent',
  'echo 1 > /sys/fs/cgroup/frozen-agent/cgroup.procs',
  'echo 1 > /sys/fs/cgroup/frozen-agent/cgroup.freeze',
].join(' && ')

perTier(test, 'guest endings', (tier, engine) => {
  const create = (name) => {
    requireGuestImages()
    return Sandbox.builder(name).engine(engine).memory(256).create()
  }

  /** Starts `script` in the guest (not awaited) and times the sandbox's end from then. */
  const endOf = async (sb, script, ms) => {
    const t0 = performance.now()
    const exec = sb.shell(script).then(
      (r) => ({ resolved: r }),
      (err) => ({ rejected: err }),
    )
    const exit = await within(sb.wait(), ms, `wait() after ${JSON.stringify(script)}`)
    const settled = await within(exec, 5000, 'the in-flight exec')
    return { exit, settled, ms: performance.now() - t0 }
  }

  test.serial(`${tier}: poweroff -f in the guest ends the sandbox (E_GUEST_HALTED), the exec settles, nothing runs on`, async (t) => {
    const sb = await create('poweroff-f')
    try {
      // Both engines see the halted machine at the watchdog's first probe (a ping + 1 s).
      const { exit, settled, ms } = await endOf(sb, 'poweroff -f', PING_EVERY_MS + 5000)
      t.log(`ended after ${ms.toFixed(0)} ms: ${JSON.stringify(exit)}`)
      t.is(exit.reason, 'crashed')
      t.is(exit.code, 'E_GUEST_HALTED', exit.message)
      t.regex(exit.message, /halt/)
      t.true(settled.rejected instanceof MicrocellError, JSON.stringify(settled))
      t.is(settled.rejected?.code, 'E_CHANNEL_CLOSED')
      t.deepEqual(sb.exitStatus, exit)
      const after = await t.throwsAsync(sb.exec('true'), { instanceOf: MicrocellError })
      t.is(after.code, 'E_CHANNEL_CLOSED')
      t.regex(after.message, new RegExp(exit.code))
      t.deepEqual(qemuChildren(), [])
    } finally {
      await sb.kill()
    }
  })

  test.serial(`${tier}: reboot -f in the guest is a clean end ('reset')`, async (t) => {
    const sb = await create('reboot-f')
    try {
      const { exit, ms } = await endOf(sb, 'reboot -f', 10_000)
      t.log(`ended after ${ms.toFixed(0)} ms`)
      t.deepEqual(exit, { reason: 'reset' })
      t.deepEqual(qemuChildren(), [])
    } finally {
      await sb.kill()
    }
  })

  test.serial(`${tier}: an agent that stops answering (frozen) ends the sandbox within the watchdog's bound (E_AGENT_LOST)`, async (t) => {
    const sb = await create('frozen-agent')
    try {
      const { exit, settled, ms } = await endOf(sb, FREEZE_AGENT, PING_EVERY_MS + LOST_AFTER_MS + 5000)
      t.log(`ended after ${ms.toFixed(0)} ms: ${exit.message}`)
      t.like(exit, { reason: 'crashed', code: 'E_AGENT_LOST' })
      t.true(ms >= LOST_AFTER_MS - 500, `${ms.toFixed(0)} ms: not before the bound`)
      t.is(settled.rejected?.code, 'E_CHANNEL_CLOSED', JSON.stringify(settled))
      t.deepEqual(qemuChildren(), [])
    } finally {
      await sb.kill()
    }
  })

  test.serial(`${tier}: a sandbox paused longer than the watchdog's bound is not ended`, async (t) => {
    const sb = await create('paused-long')
    try {
      await sb.pause()
      await new Promise((resolve) => setTimeout(resolve, LOST_AFTER_MS + PING_EVERY_MS + 1000))
      t.is(sb.exitStatus, null, 'still running')
      await sb.resume()
      t.is((await within(sb.exec('true'), 10_000, 'exec after resume')).exitCode, 0)
      t.is(sb.exitStatus, null)
    } finally {
      await sb.kill()
    }
  })
})

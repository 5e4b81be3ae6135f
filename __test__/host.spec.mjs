// T0: hostInfo() and the package's public surface.
import fs from 'node:fs'
import os from 'node:os'

import test from 'ava'

import * as microcell from 'microcell'

test('the package exports exactly its public API', (t) => {
  // (An ESM namespace of a CommonJS module also has `default` and tsc's `__esModule` marker.)
  const names = Object.keys(microcell).filter((k) => k !== 'default' && k !== '__esModule')
  t.deepEqual(
    names.sort(),
    [
      'CONFIG_ERROR_CODES',
      'ExecProcess',
      'ExecResult',
      'FsWatcher',
      'MicroVm',
      'MicroVmBuilder',
      'MicrocellError',
      'RestorePool',
      'SANDBOX_ERROR_CODES',
      'Sandbox',
      'SandboxBuilder',
      'SandboxFs',
      'SandboxPool',
      'Snapshot',
      'VMM_ERROR_CODES',
      'VmPool',
      'defaultGuest',
      'guestImages',
      'hostInfo',
      'setLogLevel',
    ].sort(),
  )
})

test('hostInfo() describes the KVM flavour and what it can run', (t) => {
  const info = microcell.hostInfo()
  t.true(['hardware', 'pvm', 'none'].includes(info.kvmFlavour), info.kvmFlavour)
  t.is(typeof info.canBootLinux, 'boolean')
  t.is(typeof info.kvmDevice, 'boolean')
  t.is(typeof info.reason, 'string')
  t.true(info.reason.length > 0)
  t.is(typeof info.hostMemoryMib, 'number')
  // MemTotal rounds down to MiB; os.totalmem() reads the same counter.
  t.is(info.hostMemoryMib, Math.floor(os.totalmem() / 1024 / 1024))
  t.true(Array.isArray(info.capabilities))
  t.is(info.kvmDevice, fs.existsSync('/dev/kvm'))
  if (info.kvmFlavour === 'none') {
    t.false(info.canBootLinux)
    t.false(info.kvmDevice)
  } else {
    t.true(info.kvmDevice)
    t.is(typeof info.apiVersion, 'number')
  }
  if (info.kvmFlavour === 'pvm') t.false(info.canBootLinux)
  // Which engine a sandbox with engine 'auto' gets, and why.
  t.is(info.autoEngine, info.canBootLinux ? 'kvm' : 'qemu')
  t.true(info.autoEngineReason.startsWith('auto: '), info.autoEngineReason)
  t.true(info.autoEngineReason.includes(info.reason), info.autoEngineReason)
  t.true((info.qemu === null) !== (info.qemuUnavailable === null), 'exactly one of qemu / qemuUnavailable')
  if (info.qemu === null) t.regex(info.qemuUnavailable, /qemu-system-x86/)
  t.log(`kvmFlavour=${info.kvmFlavour} canBootLinux=${info.canBootLinux}: ${info.reason}`)
  t.log(`engine auto → ${info.autoEngine} (${info.autoEngineReason}); qemu: ${info.qemu ?? info.qemuUnavailable}`)
})

test('MicrocellError is an Error with a code', (t) => {
  const err = new microcell.MicrocellError('E_X', 'something')
  t.true(err instanceof Error)
  t.is(err.code, 'E_X')
  t.is(err.name, 'MicrocellError')
  t.is(err.message, 'something')
})

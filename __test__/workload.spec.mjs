// MicroVm workload VMs: rootfs { disk } (the default guest: defaultGuest()) + execPath runs that
// program as the VM's one job on a sandbox engine. T0: the configuration; T2: on engine 'qemu'
// (TCG here), T3: on 'kvm' (skipped, saying why, where the built-in VMM cannot boot Linux).
import { execFile } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { promisify } from 'node:util'

import test from 'ava'

import { MicroVm, MicrocellError, defaultGuest, guestImages, setLogLevel } from 'microcell'

import { root, tempDir, within } from './helpers.mjs'
import { perTier, qemuChildren, requireGuestImages } from './guest.mjs'

async function rejectsWith(t, promise, code) {
  const err = await t.throwsAsync(promise, { instanceOf: MicrocellError })
  t.is(err?.code, code, err?.message)
  return err
}

// -- T0: configuration (no boot) -------------------------------------------------------------------

test('defaultGuest() names the default root disk; build() keeps it as rootfs { disk } and needs no kernel', (t) => {
  const g = guestImages()
  t.is(typeof g.kernel, 'string')
  t.true(g.rootfs.endsWith('.ext4') || process.env.MICROCELL_ROOTFS !== undefined)
  t.deepEqual(defaultGuest(), { disk: g.rootfs })
  if (!g.present) return t.log('guest images not built here: the rest of this test needs them')
  const config = MicroVm.builder().rootfs(defaultGuest()).execPath('/bin/sh').args(['-c', 'echo hi; exit 7']).build()
  t.deepEqual(config.rootfs, { disk: g.rootfs })
  t.is(config.kernel, undefined)
  t.deepEqual(config.args, ['-c', 'echo hi; exit 7'])
  // A string that names an existing file is a disk image.
  t.deepEqual(MicroVm.builder().rootfs(g.rootfs).execPath('/bin/true').build().rootfs, { disk: g.rootfs })
})

test('workload configuration errors are coded at build(): no execPath, a bad rlimit, env without =, a missing disk', (t) => {
  const g = guestImages()
  const disk = g.present ? g.rootfs : path.join(root, 'package.json') // any existing file
  const base = () => MicroVm.builder().rootfs({ disk }).execPath('/bin/sh')
  const code = (f) => t.throws(f, { instanceOf: MicrocellError }).code
  t.is(code(() => MicroVm.builder().rootfs({ disk }).build()), 'E_CONFIG_MISSING')
  t.is(code(() => base().rlimits(['RLIMIT_BOGUS=1:1']).build()), 'E_CONFIG_RLIMIT')
  t.is(code(() => base().env(['NOEQUALS']).build()), 'E_CONFIG_ENV')
  t.is(code(() => MicroVm.builder().rootfs({ disk: '/no/such.ext4' }).execPath('/bin/sh').build()), 'E_CONFIG_PATH_NOT_FOUND')
  t.is(code(() => MicroVm.builder().rootfs({ disk: root }).execPath('/bin/sh').build()), 'E_CONFIG_PATH_KIND')
  t.is(code(() => base().args(['a'.repeat(3000)]).build()), 'E_CONFIG_CMDLINE')
})

test('setLogLevel: the most verbose level asked for wins, process-wide; bad names are coded', (t) => {
  // (warn at most: this process's other tests stay quiet; the child process below logs info)
  t.is(setLogLevel('error'), 'error')
  t.is(setLogLevel('off'), 'error')
  t.is(setLogLevel('warn'), 'warn')
  t.is(setLogLevel('error'), 'warn')
  t.is(t.throws(() => setLogLevel('loud'), { instanceOf: MicrocellError }).code, 'E_INVALID_ARGUMENT')
})

// -- T2 / T3 ---------------------------------------------------------------------------------------

perTier(test, 'MicroVm workload', (tier, engine) => {
  const builder = () => {
    requireGuestImages()
    return MicroVm.builder().rootfs(defaultGuest()).memoryMib(256)
  }
  const opts = { engine }

  test(`${tier}: start() runs the workload; wait() says exit 7; 'hi' is on the console stream`, async (t) => {
    const vm = await builder().execPath('/bin/sh').args(['-c', 'echo hi; exit 7']).start({ ...opts, consoleStream: true })
    t.true(vm.isWorkload)
    let text = ''
    vm.console.on('data', (c) => {
      text += c.toString('latin1')
    })
    const exit = await within(vm.wait(), 60_000, 'the workload VM')
    t.is(exit.reason, 'reset')
    t.like(exit.workload, { exitCode: 7, signal: null, error: null })
    t.true(exit.workload.durationMs >= 0)
    t.like(vm.workloadStatus, { exitCode: 7 })
    await new Promise((r) => (vm.console.readableEnded ? r() : vm.console.once('end', r)))
    t.true(text.split(/\r?\n/).includes('hi'), text.slice(-2000))
    t.true(vm.consoleStats.totalBytes > 0)
    t.true(vm.timings.runningNs >= vm.timings.startNs)
    await rejectsWith(t, vm.pause(), 'E_VM_STATE')
  })

  test(`${tier}: args with spaces and quotes, env, workdir and rlimits reach the program; exit 0; console file exact`, async (t) => {
    const dir = tempDir()
    const file = path.join(dir, 'console.log')
    // Config strings are printable ASCII: the tab and the UTF-8 bytes come from printf's escapes.
    const script = 'printf "<%s>\\n" "$@"; echo "A=$A"; echo "B=$B"; pwd; ulimit -n; printf "tab\\there \\303\\274\\n"'
    const status = await builder()
      .execPath('/bin/sh')
      .args(['-c', script, 'argv0', 'two  spaces', `"double" and 'single'`, '$NOT_EXPANDED', ''])
      .env({ A: 'a b=c', B: 'x"y' })
      .workdirPath('/tmp')
      .rlimits(['RLIMIT_NOFILE=123:456'])
      .consoleOutput(file)
      .run(opts)
    t.deepEqual(status, { exitCode: 0, signal: null, durationMs: status.durationMs, error: null })
    const lines = fs.readFileSync(file, 'utf8').replace(/\r\n/g, '\n')
    const expected = [
      '<two  spaces>',
      `<"double" and 'single'>`,
      '<$NOT_EXPANDED>',
      '<>',
      'A=a b=c',
      'B=x"y',
      '/tmp',
      '123',
      'tab\there ü',
      '',
    ].join('\n')
    t.true(lines.includes(expected), lines.slice(-3000))
  })

  test(`${tier}: a workload killed by a signal reports it`, async (t) => {
    const status = await builder().execPath('/bin/sh').args(['-c', 'kill -KILL $$']).run(opts)
    t.like(status, { exitCode: null, signal: 'SIGKILL', error: null })
  })

  test(`${tier}: stop() of a running workload ends it at once ('stopped', no status), nothing left behind`, async (t) => {
    const vm = await builder().execPath('/bin/sleep').args(['1000']).start(opts)
    t.is(vm.exitStatus, null)
    await new Promise((r) => setTimeout(r, 1500))
    const t0 = performance.now()
    const exit = await within(vm.stop(), 10_000, 'stop() of a workload VM')
    t.is(exit.reason, 'stopped')
    t.is(exit.workload, null)
    t.true(performance.now() - t0 < 5000)
    t.like(vm.exitStatus, { reason: 'stopped' })
    // Its QEMU is gone (reaped: no longer this process's child).
    const pid = vm.engineInfo?.pid
    t.is(vm.engineInfo?.engine, engine)
    if (pid != null) {
      await new Promise((r) => setTimeout(r, 300))
      t.false(qemuChildren().some((c) => c.startsWith(`${pid} `)), `QEMU ${pid} is still a child`)
    }
  })

  test(`${tier}: an execPath that does not exist or cannot run is a coded error within the boot time`, async (t) => {
    const t0 = performance.now()
    const [missing, notExec] = await Promise.all([
      t.throwsAsync(builder().execPath('/no/such/program').run(opts), { instanceOf: MicrocellError }),
      t.throwsAsync(builder().execPath('/etc/passwd').run(opts), { instanceOf: MicrocellError }),
    ])
    t.is(missing.code, 'ENOENT', missing.message)
    t.regex(missing.message, /\/no\/such\/program/)
    t.is(notExec.code, 'EACCES', notExec.message)
    t.true(performance.now() - t0 < 60_000)
    // Through start()/wait(): the VM ends, and the status says why.
    const vm = await builder().execPath('/no/such/program').start(opts)
    const exit = await vm.wait()
    t.is(exit.reason, 'reset')
    t.like(exit.workload, { exitCode: null, error: { code: 'ENOENT', path: '/no/such/program' } })
  })

  test(`${tier}: logLevel turns on native logs on stderr (a child process)`, async (t) => {
    requireGuestImages()
    const child = path.join(tempDir(), 'child.mjs')
    fs.writeFileSync(
      child,
      `import { MicroVm, defaultGuest } from ${JSON.stringify(pathToFileURL(path.join(root, 'dist', 'index.js')).href)}
       const s = await MicroVm.builder().rootfs(defaultGuest()).memoryMib(256).execPath('/bin/true').logLevel('info').run({ engine: ${JSON.stringify(engine)} })
       console.log(JSON.stringify(s))`,
    )
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [child], { cwd: root }).catch((e) => e)
    t.like(JSON.parse(stdout), { exitCode: 0 })
    t.regex(stderr, /INFO .*booting a workload VM/)
  })
})

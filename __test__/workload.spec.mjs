// MicroVm workload VMs: rootfs { disk } (the default guest: defaultGuest()) + execPath runs that
// program as the VM's one job on a sandbox engine. T0: the configuration; T2: on engine 'qemu'
// (TCG here), T3: on 'kvm' (skipped, saying why, where the built-in VMM cannot boot Linux).
import { execFile } from 'node:child_process'
import fs from 'node:fs'
import http from 'node:http'
import net from 'node:net'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { promisify } from 'node:util'

import test from 'ava'

import { MicroVm, MicrocellError, RestorePool, Sandbox, Snapshot, defaultGuest, guestImages, setLogLevel } from 'microcell'

import { root, tempDir, within } from './helpers.mjs'
import { perTier, qemuChildren, requireGuestImages } from './guest.mjs'

/** Resolves once `check()` is true (polled every 50 ms). */
async function waitFor(check) {
  while (!check()) await new Promise((r) => setTimeout(r, 50))
}

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

test('build() returns the config as plain JSON data with a non-enumerable start(); rootfs(defaultGuest) calls it', (t) => {
  const g = guestImages()
  if (!g.present) return t.log('guest images not built here: this test needs them')
  const config = MicroVm.builder().rootfs(defaultGuest).execPath('/bin/sh').args(['-c', 'exit 7']).build()
  t.deepEqual(config.rootfs, { disk: g.rootfs })
  t.is(typeof config.start, 'function')
  t.false(Object.keys(config).includes('start'))
  t.deepEqual(JSON.parse(JSON.stringify(config)), { ...config })
  // The same data goes back into MicroVm.validate() unchanged.
  t.deepEqual(MicroVm.validate(config), { ...config })
})

test('build().start() and run() refuse a config without a workload before booting anything', async (t) => {
  const kernelOnly = MicroVm.builder().kernel(path.join(root, 'package.json')).build()
  await rejectsWith(t, kernelOnly.start(), 'E_CONFIG_MISSING')
  await rejectsWith(t, MicroVm.run(kernelOnly), 'E_CONFIG_MISSING')
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
  // With a root disk the spec goes over the control channel: long args are fine, up to 256 KiB.
  t.deepEqual(base().args(['a'.repeat(3000)]).build().args, ['a'.repeat(3000)])
  const over = t.throws(() => base().args(['a'.repeat(256 << 10)]).build(), { instanceOf: MicrocellError })
  t.is(over.code, 'E_CONFIG_CMDLINE')
  t.regex(over.message, /256 KiB the control channel/)
  // Booted straight on the VMM (a kernel, no disk) it has no channel: the kernel command line's
  // 1400 bytes apply, and the message says why.
  const vmm = t.throws(() => MicroVm.builder().kernel(path.join(root, 'package.json')).execPath('/bin/sh').args(['a'.repeat(3000)]).build(), { instanceOf: MicrocellError })
  t.is(vmm.code, 'E_CONFIG_CMDLINE')
  t.regex(vmm.message, /kernel command line.*no control channel/)
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
    // It runs in an exec cgroup of its own, as execs do (pids.max, cgroup.kill): its cgroup and
    // that cgroup's pids.max come last.
    const script = 'printf "<%s>\\n" "$@"; echo "A=$A"; echo "B=$B"; pwd; ulimit -n; printf "tab\\there \\303\\274\\n"; cg=$(cut -d: -f3 /proc/self/cgroup); echo "CG=$cg PIDS=$(cat /sys/fs/cgroup$cg/pids.max)"'
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
    t.regex(lines, /^CG=\/microcell-exec\/\d+ PIDS=\d+$/m, lines.slice(-3000))
  })

  test(`${tier}: a workload killed by a signal reports it`, async (t) => {
    const status = await builder().execPath('/bin/sh').args(['-c', 'kill -KILL $$']).run(opts)
    t.like(status, { exitCode: null, signal: 'SIGKILL', error: null })
  })

  test(`${tier}: the seed's form: build().start() prints 'hi' on stdout and resolves with 7 (a child process)`, async (t) => {
    requireGuestImages()
    const child = path.join(tempDir(), 'child.mjs')
    fs.writeFileSync(
      child,
      `import { MicroVm, defaultGuest } from ${JSON.stringify(pathToFileURL(path.join(root, 'dist', 'index.js')).href)}
       const code = await MicroVm.builder().rootfs(defaultGuest).execPath('/bin/sh').args(['-c', 'echo hi; exit 7']).build().start({ engine: ${JSON.stringify(engine)} })
       console.log('resolved with ' + code)`,
    )
    const { stdout } = await promisify(execFile)(process.execPath, [child], { cwd: root })
    const lines = stdout.split(/\r?\n/)
    t.true(lines.includes('hi'), stdout.slice(-2000))
    t.true(lines.includes('resolved with 7'), stdout.slice(-2000))
    // A signal's status is 128 + n, and console: null sends the console nowhere.
    const killed = await builder().execPath('/bin/sh').args(['-c', 'kill -KILL $$']).build().start({ ...opts, console: null })
    t.is(killed, 128 + 9)
  })

  test(`${tier}: stop() sends SIGTERM first: a program that traps it exits with its own code`, async (t) => {
    const script = 'trap "echo got TERM; exit 42" TERM; echo wait""ing; while :; do sleep 0.1; done'
    const vm = await builder().execPath('/bin/sh').args(['-c', script]).start({ ...opts, consoleStream: true })
    let text = ''
    vm.console.on('data', (c) => {
      text += c.toString('latin1')
    })
    // (the agent echoes the command line to the console: 'wait""ing' there)
    await within(waitFor(() => text.includes('waiting')), 60_000, 'the workload to start')
    const t0 = performance.now()
    const exit = await within(vm.stop({ timeoutMs: 20_000 }), 30_000, 'stop() of a workload VM')
    t.is(exit.reason, 'reset')
    t.like(exit.workload, { exitCode: 42, signal: null })
    t.true(performance.now() - t0 < 10_000)
    t.true(text.includes('got TERM'), text.slice(-2000))
  })

  test(`${tier}: stop() of a program that ignores SIGTERM ends the VM after timeoutMs ('stopped', no status), nothing left behind`, async (t) => {
    const vm = await builder().execPath('/bin/sh').args(['-c', `trap '' TERM; echo wait""ing; while :; do sleep 0.1; done`]).start({ ...opts, consoleStream: true })
    let text = ''
    vm.console.on('data', (c) => {
      text += c.toString('latin1')
    })
    t.is(vm.exitStatus, null)
    await within(waitFor(() => text.includes('waiting')), 60_000, 'the workload to start')
    const t0 = performance.now()
    const exit = await within(vm.stop({ timeoutMs: 1000 }), 10_000, 'stop() of a workload VM')
    const took = performance.now() - t0
    t.is(exit.reason, 'stopped')
    t.is(exit.workload, null)
    t.true(took >= 1000 && took < 6000, `${took} ms`)
    t.like(vm.exitStatus, { reason: 'stopped' })
    t.false(await vm.signal('SIGTERM'), 'an ended VM has no program to signal')
    // Its QEMU is gone (reaped: no longer this process's child).
    const pid = vm.engineInfo?.pid
    t.is(vm.engineInfo?.engine, engine)
    if (pid != null) {
      await new Promise((r) => setTimeout(r, 300))
      t.false(qemuChildren().some((c) => c.startsWith(`${pid} `)), `QEMU ${pid} is still a child`)
    }
  })

  test(`${tier}: signal() reaches the program; consoleQueueBytes bounds what a slow console reader keeps`, async (t) => {
    const script = 'trap "echo got USR1; exit 5" USR1; head -c 65536 /dev/zero | tr "\\0" x; echo; echo wait""ing; while :; do sleep 0.1; done'
    const vm = await builder().execPath('/bin/sh').args(['-c', script]).start({ ...opts, consoleStream: true, consoleQueueBytes: 4096 })
    await within(waitFor(() => vm.consoleStats.totalBytes > 65536), 60_000, 'the output')
    // Nobody read the console yet: at most 4 KiB kept, the rest dropped (and counted).
    t.true(vm.consoleStats.queuedBytes <= 4096, JSON.stringify(vm.consoleStats))
    t.true(vm.consoleStats.droppedBytes > 60_000, JSON.stringify(vm.consoleStats))
    let text = ''
    vm.console.on('data', (c) => {
      text += c.toString('latin1')
    })
    await within(waitFor(() => text.includes('waiting')), 30_000, 'the workload to wait')
    t.true(await vm.signal('SIGUSR1'))
    const exit = await within(vm.wait(), 30_000, 'the workload VM')
    t.like(exit.workload, { exitCode: 5 })
    await t.throwsAsync(vm.signal('SIGNOPE'), { instanceOf: MicrocellError, code: 'E_INVALID_ARGUMENT' })
  })

  test(`${tier}: a workload VM's snapshot restores clones whose program runs on from where it was`, async (t) => {
    const dir = path.join(tempDir(), 'snap')
    // ("ti""ck": the agent echoes the command line; the program prints "tick<n>")
    const script = 'trap "echo bye; exit 9" TERM; i=0; while :; do i=$((i+1)); echo ti""ck$i; sleep 0.1; done'
    const vm = await builder().execPath('/bin/sh').args(['-c', script]).start({ ...opts, consoleStream: true })
    try {
      let text = ''
      vm.console.on('data', (c) => {
        text += c.toString('latin1')
      })
      await within(waitFor(() => text.includes('tick5\n') || text.includes('tick5\r\n')), 60_000, 'tick5')
      const snap = await vm.snapshot(dir)
      t.is(snap.kind, 'workload')
      t.is(snap.engine, engine)
      t.is(snap.config.memoryMib, 256)
      // The spec (env and all) went over the control channel, not on the kernel command line.
      t.notRegex(snap.config.cmdline, /microcell\.exec=/)
      t.is(vm.exitStatus, null, 'the original runs on')
      t.is((await Snapshot.load(dir)).kind, 'workload')
      await rejectsWith(t, vm.snapshot(path.join(dir, 'x'), { incremental: true }), 'E_INVALID_ARGUMENT')
      t.throws(() => new RestorePool({ snapshot: snap }), { instanceOf: MicrocellError, code: 'E_INVALID_ARGUMENT' })
      await rejectsWith(t, Sandbox.fromSnapshot(dir), 'E_SNAPSHOT')

      const clones = await within(snap.clone(2, { consoleStream: true }), 120_000, 'two clones')
      for (const c of clones) {
        t.true(c.isWorkload)
        let out = ''
        c.console.on('data', (d) => {
          out += d.toString('latin1')
        })
        await within(waitFor(() => /tick\d+/.test(out)), 60_000, 'a clone tick')
        const first = Number(/tick(\d+)/.exec(out)[1])
        t.true(first > 5, `the clone started over at tick${first}`)
        const exit = await within(c.stop({ timeoutMs: 20_000 }), 30_000, "a clone's stop()")
        t.like(exit, { reason: 'reset', workload: { exitCode: 9 } })
      }
    } finally {
      await vm.kill()
    }
  })

  test(`${tier}: scope and portMap give a workload VM its network: any reaches the host, public does not (it is private), a mapped port reaches the program`, async (t) => {
    const server = http.createServer((req, res) => res.end('host says hi'))
    await new Promise((r) => server.listen(0, '127.0.0.1', r))
    try {
      // busybox timeout execs wget and has a child end it with SIGTERM after 5 s (its packets
      // dropped, the connection hung)
      const wget = (scope) => builder().execPath('/bin/timeout').args(['5', '/bin/wget', '-q', '-O', '-', `http://10.0.2.2:${server.address().port}/`]).scope(scope).run({ ...opts, console: null })
      const [anywhere, publicOnly] = await Promise.all([wget('any'), wget('public')])
      t.is(anywhere.exitCode, 0)
      t.like(publicOnly, { exitCode: null, signal: 'SIGTERM' }, 'scope public: the host is a private address')
      const none = await builder().execPath('/bin/sh').args(['-c', 'ls /sys/class/net | grep -c eth0']).scope('none').run(opts)
      t.is(none.exitCode, 1, 'scope none: no eth0')
      t.is(t.throws(() => builder().execPath('/bin/true').scope('none').portMap(['8080:80']).build(), { instanceOf: MicrocellError }).code, 'E_CONFIG_NETWORK')
    } finally {
      server.close()
    }
    // A server as the workload, reached through its mapped port (scope group: no way out).
    const hostPort = await new Promise((resolve) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const { port } = s.address()
        s.close(() => resolve(port))
      })
    })
    const vm = await builder()
      .execPath('/bin/sh')
      .args(['-c', 'mkdir -p /tmp/www && echo from-the-workload > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www'])
      .portMap([`${hostPort}:80`])
      .start(opts)
    try {
      let body = null
      const end = Date.now() + 60_000
      while (body === null && Date.now() < end) {
        body = await new Promise((resolve) => {
          http.get({ host: '127.0.0.1', port: hostPort, path: '/index.html', timeout: 3000 }, (res) => {
            let b = ''
            res.on('data', (c) => (b += c)).on('end', () => resolve(res.statusCode === 200 ? b : null))
          }).on('error', () => setTimeout(() => resolve(null), 200))
        })
      }
      t.is(body, 'from-the-workload\n')
      t.like(await within(vm.stop({ timeoutMs: 10_000 }), 20_000, 'stop()'), { reason: 'reset', workload: { signal: 'SIGTERM' } })
    } finally {
      await vm.kill()
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

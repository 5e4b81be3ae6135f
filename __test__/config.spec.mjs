// T0: the config builder and its validation, through the real native validateConfig.
import { execFileSync } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'

import test from 'ava'

import { CONFIG_ERROR_CODES, MicroVm, MicroVmBuilder, MicrocellError, Sandbox, hostInfo } from 'microcell'

import { tempDir } from './helpers.mjs'

const dir = tempDir()
const kernel = path.join(dir, 'vmlinux')
const initrd = path.join(dir, 'initrd.img')
fs.writeFileSync(kernel, '\x7fELF not really a kernel')
fs.writeFileSync(initrd, 'initrd')
for (const d of ['a', 'b', 'rootfs', 'layer1', 'layer2']) fs.mkdirSync(path.join(dir, d))
const A = path.join(dir, 'a')
const B = path.join(dir, 'b')

const base = () => MicroVm.builder().kernel(kernel)

/** Codes seen by `rejects`, checked against CONFIG_ERROR_CODES at the end. */
const seen = new Set()

function rejects(t, build, code, messageIncludes) {
  const err = t.throws(build, { instanceOf: MicrocellError })
  t.is(err.code, code, err.message)
  t.is(err.name, 'MicrocellError')
  t.false(err.message.startsWith('E_'), 'the code is not repeated in the message')
  t.true(err.message.length > 20, 'the message says what to do')
  if (messageIncludes) t.true(err.message.includes(messageIncludes), err.message)
  seen.add(code)
  return err
}

test('build() returns plain JSON with the defaults filled in', (t) => {
  const config = base().build()
  t.deepEqual(config, {
    logLevel: 'off',
    numVcpus: 1,
    memoryMib: 512,
    scope: 'group',
    kernel,
    allowUnsupportedHost: false,
  })
  t.is(Object.getPrototypeOf(config), Object.prototype)
  t.deepEqual(JSON.parse(JSON.stringify(config)), config)
})

test('every setter is chainable and lands in the JSON under its camelCase name', (t) => {
  const b = MicroVm.builder()
  t.true(b instanceof MicroVmBuilder)
  const config = b
    .logLevel('debug')
    .rootfs({ overlayfs: [path.join(dir, 'layer1'), path.join(dir, 'layer2')] })
    .numVcpus(2)
    .memoryMib(1024)
    .mappedDirs([`${A}:/guest/mount`, `${B}:/app/./data/`])
    .portMap(['8080:80', '3000'])
    .scope('public')
    .ip('192.168.1.100')
    .subnet('192.168.1.0/24')
    .rlimits(['RLIMIT_NOFILE=1024:1024'])
    .workdirPath('/workdir')
    .execPath('/bin/example')
    .args(['arg1', 'arg2'])
    .env(['KEY1=VALUE1', 'KEY2=VALUE2'])
    .consoleOutput(path.join(dir, 'console.log'))
    .kernel(kernel)
    .initrd(initrd)
    .cmdline('console=ttyS0 quiet')
    .allowUnsupportedHost()
    .build()
  t.deepEqual(config, {
    logLevel: 'debug',
    rootfs: { overlayfs: [path.join(dir, 'layer1'), path.join(dir, 'layer2')] },
    numVcpus: 2,
    memoryMib: 1024,
    mappedDirs: [`${A}:/guest/mount`, `${B}:/app/./data/`],
    portMap: ['8080:80', '3000'],
    scope: 'public',
    ip: '192.168.1.100',
    subnet: '192.168.1.0/24',
    rlimits: ['RLIMIT_NOFILE=1024:1024'],
    workdirPath: '/workdir',
    execPath: '/bin/example',
    args: ['arg1', 'arg2'],
    env: ['KEY1=VALUE1', 'KEY2=VALUE2'],
    consoleOutput: path.join(dir, 'console.log'),
    kernel,
    initrd,
    cmdline: 'console=ttyS0 quiet',
    allowUnsupportedHost: true,
  })
  // The JSON validates again as it is (what MicroVm.start(config) does).
  t.deepEqual(MicroVm.validate(config), config)
})

test('convenience forms: rootfs as a string, env as a record, iterables', (t) => {
  const config = base()
    .rootfs(path.join(dir, 'rootfs'))
    .env({ A: '1', B: 'x=y' })
    .args(new Set(['-c', 'print(1)']))
    .build()
  t.deepEqual(config.rootfs, { native: path.join(dir, 'rootfs') })
  t.deepEqual(config.env, ['A=1', 'B=x=y'])
  t.deepEqual(config.args, ['-c', 'print(1)'])
})

test("the Sandbox builder's words (memory, cpus, workdir) set what the seeds' names set", (t) => {
  const shared = base().memory(128).cpus(2).workdir('/srv').build()
  const seeds = base().memoryMib(128).numVcpus(2).workdirPath('/srv').build()
  t.deepEqual(shared, seeds)
  t.like(shared, { memoryMib: 128, numVcpus: 2, workdirPath: '/srv' })
  t.is(t.throws(() => base().memory(0).build(), { instanceOf: MicrocellError }).code, 'E_CONFIG_MEMORY')
})

test('E_CONFIG_JSON: unknown options and wrong types', (t) => {
  rejects(t, () => MicroVm.validate({ kernel, numVcpu: 2 }), 'E_CONFIG_JSON', 'numVcpu')
  rejects(t, () => base().logLevel('loud').build(), 'E_CONFIG_JSON', 'loud')
  rejects(t, () => base().scope('world').build(), 'E_CONFIG_JSON')
  rejects(t, () => MicroVm.validate({ kernel, args: 'a b' }), 'E_CONFIG_JSON')
  rejects(t, () => MicroVm.validate({ kernel, memoryMib: 1n }), 'E_CONFIG_JSON')
})

test('E_CONFIG_VCPUS: zero, too many, not a whole number', (t) => {
  rejects(t, () => base().numVcpus(0).build(), 'E_CONFIG_VCPUS', '1 to 32')
  rejects(t, () => base().numVcpus(33).build(), 'E_CONFIG_VCPUS')
  rejects(t, () => base().numVcpus(1.5).build(), 'E_CONFIG_VCPUS')
  rejects(t, () => base().numVcpus(-1).build(), 'E_CONFIG_VCPUS')
  rejects(t, () => base().numVcpus('2').build(), 'E_CONFIG_VCPUS')
  for (const n of [1, 2, 4, 32]) t.is(base().numVcpus(n).build().numVcpus, n)
})

test('E_CONFIG_MEMORY: zero, and more than the host has', (t) => {
  rejects(t, () => base().memoryMib(0).build(), 'E_CONFIG_MEMORY')
  rejects(t, () => base().memoryMib(NaN).build(), 'E_CONFIG_MEMORY')
  const host = hostInfo().hostMemoryMib
  t.true(host > 0)
  const err = rejects(t, () => base().memoryMib(host + 1).build(), 'E_CONFIG_MEMORY')
  t.true(err.message.includes(`at most ${host} MiB`), err.message)
  t.is(base().memoryMib(host).build().memoryMib, host)
})

test('E_CONFIG_MISSING: no kernel', (t) => {
  rejects(t, () => MicroVm.builder().build(), 'E_CONFIG_MISSING', 'kernel')
  rejects(t, () => base().rootfs({ overlayfs: [] }).build(), 'E_CONFIG_MISSING')
})

test('E_CONFIG_PATH_NOT_FOUND: kernel, initrd, rootfs, mapped host dir, console directory', (t) => {
  const missing = path.join(dir, 'does-not-exist')
  rejects(t, () => base().kernel(missing).build(), 'E_CONFIG_PATH_NOT_FOUND', missing)
  rejects(t, () => base().initrd(missing).build(), 'E_CONFIG_PATH_NOT_FOUND')
  rejects(t, () => base().rootfs(missing).build(), 'E_CONFIG_PATH_NOT_FOUND')
  rejects(t, () => base().rootfs({ overlayfs: [A, missing] }).build(), 'E_CONFIG_PATH_NOT_FOUND')
  rejects(t, () => base().mappedDirs([`${missing}:/data`]).build(), 'E_CONFIG_PATH_NOT_FOUND')
  rejects(t, () => base().consoleOutput(path.join(missing, 'c.log')).build(), 'E_CONFIG_PATH_NOT_FOUND')
})

test('E_CONFIG_PATH_KIND: a directory where a file belongs and the reverse', (t) => {
  rejects(t, () => base().kernel(A).build(), 'E_CONFIG_PATH_KIND')
  rejects(t, () => base().mappedDirs([`${kernel}:/data`]).build(), 'E_CONFIG_PATH_KIND')
})

test('E_CONFIG_INVALID_STRING: exec path and args must be printable ASCII', (t) => {
  rejects(t, () => base().execPath('/bin/hello\nworld').build(), 'E_CONFIG_INVALID_STRING')
  rejects(t, () => base().execPath('/bin/echo\0').build(), 'E_CONFIG_INVALID_STRING')
  rejects(t, () => base().execPath('/bin/café').build(), 'E_CONFIG_INVALID_STRING')
  rejects(t, () => base().execPath('/bin/echo').args(['ok', 'hello\tworld']).build(), 'E_CONFIG_INVALID_STRING', 'args[1]')
  rejects(t, () => base().args(['\x7f']).build(), 'E_CONFIG_INVALID_STRING')
  rejects(t, () => base().args(['🌎']).build(), 'E_CONFIG_INVALID_STRING')
  t.deepEqual(base().execPath('/bin/echo').args(['Hello, World!', ' ~']).build().args, ['Hello, World!', ' ~'])
})

test('E_CONFIG_GUEST_PATH: relative guest paths', (t) => {
  rejects(t, () => base().mappedDirs([`${A}:data`]).build(), 'E_CONFIG_GUEST_PATH', 'absolute')
  rejects(t, () => base().mappedDirs(['relative/dir']).build(), 'E_CONFIG_GUEST_PATH')
  rejects(t, () => base().workdirPath('work').build(), 'E_CONFIG_GUEST_PATH')
  rejects(t, () => base().mappedDirs([`${A}:/../..`]).build(), 'E_CONFIG_GUEST_PATH')
})

test('E_CONFIG_GUEST_PATH_CONFLICT: nested, duplicate and equal-after-normalisation guest paths', (t) => {
  for (const [g1, g2] of [
    ['/app', '/app/data'],
    ['/var/log', '/var'],
    ['/data', '/data'],
    ['/app/./data', '/app/data/'],
    ['/etc//config', '/etc/config'],
  ]) {
    rejects(t, () => base().mappedDirs([`${A}:${g1}`, `${B}:${g2}`]).build(), 'E_CONFIG_GUEST_PATH_CONFLICT')
  }
  t.is(base().mappedDirs([`${A}:/app`, `${B}:/application`]).build().mappedDirs.length, 2)
  t.is(base().mappedDirs([`${A}:/app/./data`, `${B}:/var/log`, A]).build().mappedDirs.length, 3)
})

test('E_CONFIG_PAIR: malformed host:guest pairs', (t) => {
  rejects(t, () => base().mappedDirs(['/a:/b:/c']).build(), 'E_CONFIG_PAIR')
  rejects(t, () => base().mappedDirs([':/data']).build(), 'E_CONFIG_PAIR')
  rejects(t, () => base().mappedDirs([`${A}:`]).build(), 'E_CONFIG_PAIR')
  rejects(t, () => base().portMap(['1:2:3']).build(), 'E_CONFIG_PAIR')
  rejects(t, () => base().portMap(['8080:']).build(), 'E_CONFIG_PAIR')
})

test('E_CONFIG_PORT: port 0, above 65535, not a number, a host port twice', (t) => {
  rejects(t, () => base().portMap(['0:80']).build(), 'E_CONFIG_PORT')
  rejects(t, () => base().portMap(['8080:0']).build(), 'E_CONFIG_PORT')
  rejects(t, () => base().portMap(['65536']).build(), 'E_CONFIG_PORT')
  rejects(t, () => base().portMap(['http:80']).build(), 'E_CONFIG_PORT')
  rejects(t, () => base().portMap(['8080:80', '8080:81']).build(), 'E_CONFIG_PORT')
  t.deepEqual(base().portMap(['65535:1', '2222:22']).build().portMap, ['65535:1', '2222:22'])
})

test('E_CONFIG_RLIMIT: unknown names, soft above hard, bad numbers', (t) => {
  rejects(t, () => base().rlimits(['RLIMIT_NOPE=1:1']).build(), 'E_CONFIG_RLIMIT', 'RLIMIT_NOFILE')
  rejects(t, () => base().rlimits(['RLIMIT_NOFILE=2048:1024']).build(), 'E_CONFIG_RLIMIT', 'soft')
  rejects(t, () => base().rlimits(['RLIMIT_NOFILE=lots']).build(), 'E_CONFIG_RLIMIT')
  rejects(t, () => base().rlimits(['RLIMIT_NOFILE']).build(), 'E_CONFIG_RLIMIT')
  rejects(t, () => base().rlimits(['RLIMIT_CORE=0', 'RLIMIT_CORE=1']).build(), 'E_CONFIG_RLIMIT')
  const all = ['CPU', 'FSIZE', 'DATA', 'STACK', 'CORE', 'RSS', 'NPROC', 'NOFILE', 'MEMLOCK', 'AS', 'LOCKS', 'SIGPENDING', 'MSGQUEUE', 'NICE', 'RTPRIO', 'RTTIME']
  const limits = all.map((n) => `RLIMIT_${n}=1:unlimited`)
  t.deepEqual(base().rlimits(limits).build().rlimits, limits)
})

test('E_CONFIG_ENV: no "=", empty name', (t) => {
  rejects(t, () => base().env(['NOVALUE']).build(), 'E_CONFIG_ENV')
  rejects(t, () => base().env(['=value']).build(), 'E_CONFIG_ENV')
  rejects(t, () => base().env({ '': 'x' }).build(), 'E_CONFIG_ENV')
  t.deepEqual(base().env(['EMPTY=', 'K=a=b']).build().env, ['EMPTY=', 'K=a=b'])
})

test('E_CONFIG_NETWORK: ip outside the subnet, malformed ip or subnet', (t) => {
  rejects(t, () => base().ip('192.168.2.1').subnet('192.168.1.0/24').build(), 'E_CONFIG_NETWORK', 'not in subnet')
  rejects(t, () => base().ip('192.168.1').build(), 'E_CONFIG_NETWORK')
  rejects(t, () => base().subnet('192.168.1.0/33').build(), 'E_CONFIG_NETWORK')
  rejects(t, () => base().subnet('192.168.1.7/24').build(), 'E_CONFIG_NETWORK', '192.168.1.0/24')
  t.is(base().ip('10.0.0.2').subnet('10.0.0.0/8').build().ip, '10.0.0.2')
})

test('E_CONFIG_CMDLINE: control characters, too long', (t) => {
  rejects(t, () => base().cmdline('a\nb').build(), 'E_CONFIG_CMDLINE')
  rejects(t, () => base().cmdline('x'.repeat(4096)).build(), 'E_CONFIG_CMDLINE')
  t.is(base().cmdline('x'.repeat(4095)).build().cmdline.length, 4095)
})

test('start() rejects invalid configurations with the same codes, before touching KVM', async (t) => {
  const err = await t.throwsAsync(MicroVm.builder().kernel(kernel).numVcpus(0).start(), { instanceOf: MicrocellError })
  t.is(err.code, 'E_CONFIG_VCPUS')
  const err2 = await t.throwsAsync(MicroVm.start({ memoryMib: 64 }), { instanceOf: MicrocellError })
  t.is(err2.code, 'E_CONFIG_MISSING')
})

test('start() reports a console file it cannot create as E_CONSOLE_OUTPUT', async (t) => {
  // A dangling symlink passes validation (its directory exists), but creating through it fails.
  const link = path.join(dir, 'console-into-nowhere.log')
  fs.symlinkSync(path.join(dir, 'no-such-dir', 'console.log'), link)
  const err = await t.throwsAsync(base().consoleOutput(link).start(), { instanceOf: MicrocellError })
  t.is(err.code, 'E_CONSOLE_OUTPUT')
})

test('start() refuses a console queue size that is not 1 byte to 1 GiB', async (t) => {
  for (const consoleQueueBytes of [0, -1, 1.5, 2 ** 31]) {
    const err = await t.throwsAsync(base().start({ consoleStream: true, consoleQueueBytes }), { instanceOf: MicrocellError })
    t.is(err.code, 'E_INVALID_ARGUMENT')
  }
})

test('E_CONFIG_CONSOLE: consoleOutput takes only a regular file, never a device, FIFO, socket, directory, /proc or /sys', (t) => {
  const fifo = path.join(dir, 'console.fifo')
  execFileSync('mkfifo', [fifo])
  const link = path.join(dir, 'console-to-full')
  fs.symlinkSync('/dev/full', link)
  for (const bad of ['/dev/full', '/dev/null', '/dev/zero', fifo, A, '/proc/self/mem', '/proc/self/new.log', '/sys/kernel/x.log', link]) {
    rejects(t, () => base().consoleOutput(bad).build(), 'E_CONFIG_CONSOLE', 'consoleOutput')
    const sb = t.throws(() => Sandbox.builder('c').consoleOutput(bad).build(), { instanceOf: MicrocellError }, bad)
    t.is(sb.code, 'E_CONFIG_CONSOLE', `${bad}: ${sb.message}`)
  }
  t.notThrows(() => base().consoleOutput(path.join(dir, 'console.log')).build())
  t.notThrows(() => base().consoleOutput(kernel).build(), 'an existing regular file (it is truncated)')
})

// Restore options' consoleOutput goes through the config's check, before the snapshot is read
// (before: E_SNAPSHOT for the empty directory, or a restore writing into /dev/full or a FIFO).
test('E_CONFIG_CONSOLE: a restore\'s consoleOutput is checked like a config\'s', async (t) => {
  const notSnapshot = tempDir()
  const fifo = path.join(dir, 'restore-console.fifo')
  execFileSync('mkfifo', [fifo])
  for (const bad of ['/dev/full', fifo, A, '/proc/self/mem']) {
    const err = await t.throwsAsync(Sandbox.fromSnapshot(notSnapshot, { consoleOutput: bad }), { instanceOf: MicrocellError }, bad)
    t.is(err.code, 'E_CONFIG_CONSOLE', `${bad}: ${err.message}`)
    t.true(err.message.includes('consoleOutput'), err.message)
  }
  const ok = await t.throwsAsync(Sandbox.fromSnapshot(notSnapshot, { consoleOutput: path.join(dir, 'restore.log') }), { instanceOf: MicrocellError })
  t.is(ok.code, 'E_SNAPSHOT', 'a regular file passes the check; the directory is still no snapshot')
})

test('E_CONFIG_CONSOLE: a socket as consoleOutput is refused too', async (t) => {
  const sock = path.join(dir, 'console.sock')
  const server = net.createServer()
  await new Promise((resolve) => server.listen(sock, resolve))
  t.teardown(() => server.close())
  rejects(t, () => base().consoleOutput(sock).build(), 'E_CONFIG_CONSOLE', 'socket')
})

// Every builder method, given a wrong type or value: a MicrocellError with an E_CONFIG_ code
// (before, .args(5) threw a bare TypeError and .env(5) was dropped without a word).
const badMicroVm = {
  logLevel: [5, 'loud', null],
  rootfs: [5, null, true],
  numVcpus: ['x', 1.5, 0, 33, -1, null],
  memoryMib: ['x', 0, -1, 1.5, 2 ** 40],
  mappedDirs: [5, 'a:/b', [5], null],
  portMap: [5, '80', [80], null],
  scope: [5, 'everything'],
  ip: [5, 'not-an-ip'],
  subnet: [5, '10.0.0.0/99'],
  rlimits: [5, 'RLIMIT_NOFILE=1:1', [1], ['NOPE=1:1']],
  workdirPath: [5, 'relative'],
  execPath: [5, ''],
  args: [5, 'a', [1], null, {}],
  env: [5, null, 'K=V', [1], { K: 1 }, ['NOEQUALS']],
  consoleOutput: [5, '', '/dev/full', '/proc/self/mem'],
  kernel: [5, '', '/nonexistent/vmlinux'],
  initrd: [5, '/nonexistent/initrd'],
  cmdline: [5, 'a\nb'],
  allowUnsupportedHost: [5, 'yes'],
}

for (const [method, values] of Object.entries(badMicroVm)) {
  test(`MicroVm.builder().${method}(bad) throws a MicrocellError with an E_CONFIG_ code`, (t) => {
    for (const value of values) {
      const err = t.throws(() => base()[method](value).build(), { instanceOf: MicrocellError }, `${method}(${String(value)})`)
      t.regex(err.code, /^E_CONFIG_/, `${method}(${String(value)}): ${err.code} ${err.message}`)
      t.false(err.message.startsWith('E_'), err.message)
    }
  })
}

const badSandbox = {
  name: [[5], [''], [null]],
  memory: [['x'], [0], [1.5]],
  cpus: [['x'], [0], [33]],
  env: [[5], [null], ['K', 5], [{ K: 1 }]],
  workdir: [[5], ['relative']],
  engine: [[5], ['vmware']],
  kernel: [[5], ['']],
  rootfs: [[5], ['']],
  bootTimeoutMs: [['1'], [0], [-5]],
  consoleOutput: [[5], ['/dev/full'], ['/proc/self/mem']],
  kernelArgs: [[5], ['a\nb']],
  volume: [[5, '/x'], ['/tmp', 5], ['/tmp', '/x', null], ['/tmp', '/x', { readOnly: 'yes' }]],
  network: [[5], [null], [{ ports: 5 }], [{ ports: [5] }]],
  maxDurationMs: [['x'], [0]],
  consoleQueueBytes: [['x'], [0]],
  metadata: [[5], [null], ['k', 5], [{ k: 1 }]],
}

for (const [method, argLists] of Object.entries(badSandbox)) {
  test(`Sandbox.builder().${method}(bad) throws a MicrocellError with an E_CONFIG_ code`, (t) => {
    for (const args of argLists) {
      const what = `${method}(${args.map((a) => JSON.stringify(a)).join(', ')})`
      const err = t.throws(() => Sandbox.builder('ok')[method](...args).build(), { instanceOf: MicrocellError }, what)
      t.regex(err.code, /^E_CONFIG_/, `${what}: ${err.code} ${err.message}`)
    }
  })
}

test("Sandbox.builder()'s own options have their own codes", (t) => {
  rejects(t, () => Sandbox.builder('-not-a-hostname').build(), 'E_CONFIG_NAME', 'hostname')
  rejects(t, () => Sandbox.builder('ok').bootTimeoutMs(10).build(), 'E_CONFIG_TIMEOUT', 'bootTimeoutMs')
  rejects(t, () => Sandbox.builder('ok').volume(A, 'relative').build(), 'E_CONFIG_VOLUME', 'volume')
  const many = Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v']))
  rejects(t, () => Sandbox.builder('ok').metadata(many).build(), 'E_CONFIG_METADATA', 'metadata')
})

test.after.always('every configuration error code was exercised', (t) => {
  t.deepEqual([...seen].sort(), [...CONFIG_ERROR_CODES].sort())
})

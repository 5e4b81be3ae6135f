// The `microcell` CLI (package.json "bin" → dist/cli/main.js). Usage tests need no VM; the
// commands that boot a sandbox use engine 'auto' (QEMU here, TCG: about a second a boot).
import { execFile } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import test from 'ava'

import { guestImages, hostInfo } from 'microcell'

import { root } from './helpers.mjs'

const cli = path.join(root, 'dist', 'cli', 'main.js')
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'))

/** Runs the CLI; resolves with { code, stdout, stderr } (never rejects on a non-zero exit). */
function microcell(args, { input, env } = {}) {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [cli, ...args], { cwd: root, env: { ...process.env, ...env }, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr })
    })
    if (input !== undefined) child.stdin.end(input)
    else child.stdin.end()
  })
}

/** Why a command that boots a sandbox cannot run here, or null. */
function bootSkip() {
  const h = hostInfo()
  // (Missing guest images are no reason: those tests fail, saying to run scripts/setup.sh.)
  if (h.autoEngine === 'qemu' && h.qemu === null) return `engine auto picks qemu here and QEMU is not installed: ${h.qemuUnavailable}`
  return null
}

const booting = (title, fn) => {
  const skip = bootSkip()
  if (skip !== null) {
    console.log(`# SKIP ${title}: ${skip}`)
    test.skip(`${title} (skipped: ${skip})`, () => {})
  } else test(title, fn)
}

test('package.json names the CLI as bin "microcell", and the built file is executable', (t) => {
  t.is(pkg.bin.microcell, 'dist/cli/main.js')
  t.true(fs.readFileSync(cli, 'utf8').startsWith('#!/usr/bin/env node'))
  t.truthy(fs.statSync(cli).mode & 0o111)
})

test('--help on every command, --version', async (t) => {
  const main = await microcell(['--help'])
  t.is(main.code, 0)
  for (const word of ['microcell run', 'microcell exec', 'microcell info', '--version']) t.true(main.stdout.includes(word), word)
  for (const cmd of ['run', 'exec', 'info']) {
    const r = await microcell([cmd, '--help'])
    t.is(r.code, 0, cmd)
    t.true(r.stdout.startsWith(`Usage: microcell ${cmd}`), r.stdout)
    t.is(r.stderr, '')
  }
  const run = await microcell(['run', '-h'])
  for (const opt of ['--memory', '--cpus', '--env', '--engine', '--timeout', '--json', '--verbose']) t.true(run.stdout.includes(opt), opt)
  const v = await microcell(['--version'])
  t.is(v.code, 0)
  t.is(v.stdout, `${pkg.version}\n`)
})

test('usage errors exit with status 2 and point to --help', async (t) => {
  const cases = [
    [[], /Usage:/],
    [['frobnicate'], /unknown command "frobnicate"/],
    [['run', '--bogus', '--', 'true'], /unknown option --bogus/],
    [['run'], /give the command to run/],
    [['exec'], /give the script to run/],
    [['run', '--memory', 'lots', '--', 'true'], /--memory "lots"/],
    [['run', '--memory', '16', '--', 'true'], /memoryMib is 16/],
    [['run', '--env', 'NOEQUALS', '--', 'true'], /KEY=VALUE/],
    [['run', '--engine', 'vmware', '--', 'true'], /auto, kvm or qemu/],
    [['run', '--timeout'], /needs a value/],
    [['run', '--json', '--tty', '--', 'true'], /do not go together/],
    [['info', 'extra'], /takes no arguments/],
    [['run', '-p', '0:80', '--', 'true'], /network ports/],
    [['run', '--volume', '/tmp', '--', 'true'], /HOST:GUEST/],
    [['run', '--volume', '/no/such/dir:/data', '--', 'true'], /not an existing directory/],
  ]
  const results = await Promise.all(cases.map(([args]) => microcell(args)))
  for (const [i, [args, message]] of cases.entries()) {
    const r = results[i]
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stdout + r.stderr, message, args.join(' '))
    if (args.length > 0) t.regex(r.stderr, /--help/)
  }
})

test('info and info --json say what this host runs', async (t) => {
  const text = await microcell(['info'])
  t.is(text.code, 0)
  t.regex(text.stdout, /engine auto: +(kvm|qemu)/)
  const json = await microcell(['info', '--json'])
  t.is(json.code, 0)
  const info = JSON.parse(json.stdout)
  t.is(info.engines.auto.picks, hostInfo().autoEngine)
  t.is(info.guestImages.rootfs, guestImages().rootfs)
})

booting("run -- sh -c 'echo hi; exit 3' prints hi and exits 3; stderr stays quiet without a TTY", async (t) => {
  const r = await microcell(['run', '--', 'sh', '-c', 'echo hi; exit 3'])
  t.is(r.stdout, 'hi\n')
  t.is(r.code, 3, r.stderr)
  t.is(r.stderr, '')
})

booting('run streams stdout and stderr apart; options (env, workdir, memory, cpus) reach the sandbox; --verbose shows progress', async (t) => {
  const r = await microcell(['run', '-v', '--memory', '256', '--cpus', '2', '--env', 'A=a b', '-e', 'B=2', '--workdir', '/tmp', '--', 'sh', '-c', 'echo "$A|$B"; pwd; nproc; echo oops >&2'])
  t.is(r.code, 0, r.stderr)
  t.is(r.stdout, 'a b|2\n/tmp\n2\n')
  t.regex(r.stderr, /^oops$/m)
  t.regex(r.stderr, /microcell: booting a sandbox/)
  t.regex(r.stderr, /microcell: ready in \d+ ms on (qemu|kvm)/)
  t.regex(r.stderr, /microcell: sandbox stopped/)
})

booting('exec runs one shell string; a signal is 128+N; --timeout kills; -i passes stdin; a missing program is 127', async (t) => {
  const [sum, killed, timeout, stdin, missing] = await Promise.all([
    microcell(['exec', 'echo $((40+2))']),
    microcell(['exec', 'kill -9 $$']),
    microcell(['run', '--timeout', '500', '--', 'sleep', '100']),
    microcell(['run', '-i', '--', 'tr', 'a-z', 'A-Z'], { input: 'piped in\n' }),
    microcell(['run', '--', '/no/such/program']),
  ])
  t.is(sum.stdout, '42\n')
  t.is(sum.code, 0)
  t.is(killed.code, 137)
  t.is(timeout.code, 137)
  t.regex(timeout.stderr, /timed out/)
  t.is(stdin.stdout, 'PIPED IN\n')
  t.is(stdin.code, 0)
  t.is(missing.code, 127)
  t.regex(missing.stderr, /\/no\/such\/program: not found in the guest \(ENOENT/)
})

booting('--volume shares a host directory (read-only with :ro)', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'microcell-cli-vol-'))
  try {
    fs.writeFileSync(path.join(dir, 'in.txt'), 'host data\n')
    const r = await microcell(['exec', '-V', `${dir}:/data`, 'cat /data/in.txt && echo guest > /data/out.txt'])
    t.is(r.code, 0, r.stderr)
    t.is(r.stdout, 'host data\n')
    t.is(fs.readFileSync(path.join(dir, 'out.txt'), 'utf8'), 'guest\n')
    const ro = await microcell(['exec', '--volume', `${dir}:/data:ro`, 'echo x > /data/nope'])
    t.not(ro.code, 0)
    t.false(fs.existsSync(path.join(dir, 'nope')))
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
})

booting('--net gives the command a network (the host loopback as 10.0.2.2); without it there is no eth0', async (t) => {
  const [withNet, without] = await Promise.all([
    microcell(['exec', '--net', 'ip -4 addr show eth0 | grep -o "inet [0-9./]*"']),
    microcell(['exec', 'ls /sys/class/net | grep -c eth0']),
  ])
  t.is(withNet.code, 0, withNet.stderr)
  t.is(withNet.stdout.trim(), 'inet 10.0.2.15/24')
  t.is(without.code, 1, without.stderr)
})

booting('--json prints one machine-readable result (output collected, status, sandbox info)', async (t) => {
  const r = await microcell(['run', '--json', '--', 'sh', '-c', 'echo out; echo err >&2; exit 4'])
  t.is(r.code, 4, r.stderr)
  const j = JSON.parse(r.stdout)
  t.like(j, { status: 4, exitCode: 4, signal: null, timedOut: false, stdout: 'out\n', stderr: 'err\n', command: ['sh', '-c', 'echo out; echo err >&2; exit 4'] })
  t.true(j.sandbox.bootMs > 0)
  t.true(['qemu', 'kvm'].includes(j.sandbox.engine))
  const missing = await microcell(['run', '--json', '--', '/no/such'])
  t.is(missing.code, 127)
  t.like(JSON.parse(missing.stdout), { status: 127, error: { code: 'ENOENT' } })
})

booting('a reader that goes away (| head) ends the command as SIGPIPE would: status 141, no crash', async (t) => {
  const script = `"${process.execPath}" "${cli}" run -- sh -c 'yes | head -c 20000000' | head -c 10 >/dev/null; echo "status=\${PIPESTATUS[0]}"`
  const r = await new Promise((resolve) => execFile('bash', ['-c', script], { cwd: root }, (err, stdout, stderr) => resolve({ err, stdout, stderr })))
  t.is(r.stdout.trim(), 'status=141', r.stderr)
  t.false(/Unhandled|EPIPE/.test(r.stderr), r.stderr)
})

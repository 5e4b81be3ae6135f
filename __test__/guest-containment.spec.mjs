// T2 / T3: what a guest process cannot do (issue 15, findings 7 and 10). A timeout holds against a
// fork bomb and against a child that leaves the process group (setsid): the agent kills by cgroup
// and stays responsive; and a secret in a workload's or sandbox's env never shows on a command
// line, the host's (QEMU's argv, /proc/*/cmdline) or the guest's (/proc/cmdline), nor in the
// environment of the host processes the engine starts.
import { spawn } from 'node:child_process'
import crypto from 'node:crypto'
import fs from 'node:fs'

import test from 'ava'

import { MicroVm, Sandbox, defaultGuest } from 'microcell'

import { within } from './helpers.mjs'
import { perTier, requireGuestImages } from './guest.mjs'

/**
 * The forms a secret can take where a host puts it: as it is, and base64 / base64url of it at
 * each of the three alignments it can have inside a longer encoded blob.
 */
function forms(secret) {
  const b = Buffer.from(secret)
  const out = [secret]
  for (let j = 0; j < 3; j++) {
    const part = b.subarray(j, j + 27)
    out.push(part.toString('base64url'), part.toString('base64'))
  }
  return out
}

/** Pids of this process's descendants. */
function descendants() {
  const parent = new Map()
  for (const pid of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
      parent.set(pid, stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1])
    } catch {
      // gone meanwhile
    }
  }
  const mine = new Set([String(process.pid)])
  for (let grew = true; grew; ) {
    grew = false
    for (const [pid, ppid] of parent) {
      if (!mine.has(pid) && mine.has(ppid)) {
        mine.add(pid)
        grew = true
      }
    }
  }
  mine.delete(String(process.pid))
  return [...mine]
}

/** Where on this host a form of `secret` shows: every /proc/PID/cmdline, and the environ of this process's children (QEMU, passt). */
function hostLeaks(secret) {
  const found = []
  const f = forms(secret)
  const look = (file) => {
    let text
    try {
      text = fs.readFileSync(file).toString('latin1')
    } catch {
      return // gone meanwhile, or not ours to read
    }
    if (f.some((x) => text.includes(x))) found.push(`${file}: ${text.replace(/\0/g, ' ').slice(0, 300)}`)
  }
  for (const pid of fs.readdirSync('/proc')) if (/^\d+$/.test(pid)) look(`/proc/${pid}/cmdline`)
  for (const pid of descendants()) look(`/proc/${pid}/environ`)
  return found
}

const BOMB_MS = Number(process.env.BOMB_MS ?? 10_000)
const leaksIn = (text, secret) => forms(secret).filter((x) => text.includes(x))

/** The scan finds a secret base64url-encoded at any alignment in a child's argv (as `microcell.exec=` once put it on QEMU's). */
test('the host scan finds a secret encoded in a command line at each alignment', async (t) => {
  for (let pad = 0; pad < 3; pad++) {
    const secret = `S${crypto.randomBytes(24).toString('hex')}`
    const blob = Buffer.concat([crypto.randomBytes(pad + 5), Buffer.from(secret), crypto.randomBytes(4)]).toString('base64url')
    // A process that keeps its extra argument (sleep would refuse it and exit at once).
    const child = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 30000)', `microcell.exec=${blob}`], { stdio: 'ignore' })
    try {
      await new Promise((r) => child.once('spawn', r))
      // (until the exec, the child's command line is still this process's)
      while (!fs.readFileSync(`/proc/${child.pid}/cmdline`, 'latin1').includes('microcell.exec=')) await new Promise((r) => setTimeout(r, 10))
      t.is(hostLeaks(secret).length, 1, `pad ${pad}`)
    } finally {
      child.kill('SIGKILL')
    }
  }
})

perTier(test, 'guest containment', (tier, engine) => {
  // One sandbox of this file's own: a fork bomb must not disturb the other suites' shared ones.
  let booting
  const sandbox = () => {
    booting ??= (async () => {
      requireGuestImages()
      return Sandbox.builder(`contain-${engine}`).engine(engine).memory(256).create()
    })()
    return booting
  }
  test.after.always(async () => {
    const sb = await booting?.catch(() => null)
    await sb?.stop({ timeoutMs: 5000 })
  })

  test.serial(`${tier}: a fork bomb with timeoutMs 10000 ends within a few seconds of it; the next exec answers at once`, async (t) => {
    const sb = await sandbox()
    const t0 = Date.now()
    const r = await within(sb.exec('sh', ['-c', 'bomb() { bomb | bomb & }; bomb; sleep 1000'], { timeoutMs: BOMB_MS }), BOMB_MS + 20_000, 'the fork bomb exec')
    const settled = Date.now() - t0
    t.log(`fork bomb, timeoutMs ${BOMB_MS}: settled after ${settled} ms (${tier}, engine ${engine})`)
    t.true(r.timedOut, JSON.stringify({ exitCode: r.exitCode, signal: r.signal, stderr: r.stderrText().slice(0, 300) }))
    t.is(r.signal, 'SIGKILL')
    t.true(settled < BOMB_MS + 8000, `settled after ${settled} ms`)
    const t1 = Date.now()
    const ok = await within(sb.exec('echo', ['ok']), 10_000, 'the exec after the fork bomb')
    t.log(`next exec: ${Date.now() - t1} ms`)
    t.is(ok.stdoutText(), 'ok\n')
    // Nothing of the bomb is left (`bom[b]`: the pattern does not match the shell that looks),
    // and its cgroup is gone: only the one of the exec that looks is there.
    // Killed processes still exit one by one under TCG: look again for up to 5 s.
    const look = 'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\\0" "\\n" | grep -c "bom[b]"; ls /sys/fs/cgroup/microcell-exec | grep -c "^[0-9]"'
    let left = (await sb.shell(look)).stdoutText()
    for (const until = Date.now() + 5000; left !== '0\n1\n' && Date.now() < until; ) {
      await new Promise((r) => setTimeout(r, 250))
      left = (await sb.shell(look)).stdoutText()
    }
    t.is(left, '0\n1\n', 'bomb processes, exec cgroups')
  })

  test.serial(`${tier}: a child that calls setsid does not survive its command's timeout`, async (t) => {
    const sb = await sandbox()
    const r = await sb.exec('sh', ['-c', 'setsid sleep 1000 & sleep 100'], { timeoutMs: 1000 })
    t.true(r.timedOut)
    // `[1]000`: the pattern does not match the command line of the shell that looks.
    const left = async () => (await sb.shell('cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\\0" " " | grep -o "sleep [1]000" | wc -l')).stdoutText().trim()
    let n = await left()
    for (let i = 0; i < 20 && n !== '0'; i++) {
      await new Promise((res) => setTimeout(res, 100))
      n = await left()
    }
    t.is(n, '0', 'the setsid child survived the timeout')
    // It is the cgroup that holds: each exec runs in one of its own.
    t.regex((await sb.exec('cat', ['/proc/self/cgroup'])).stdoutText(), /^0::\/microcell-exec\/\d+\n$/)
  })

  test.serial(`${tier}: a workload's env secret is seen by the program and on no command line or host environ`, async (t) => {
    const secret = `S${crypto.randomBytes(24).toString('hex')}`
    const script = 'echo "seen=$SECRET"; echo "cmdline=$(cat /proc/cmdline)"; echo scan-now; sleep 4'
    const vm = await MicroVm.builder()
      .rootfs(defaultGuest())
      .memoryMib(256)
      .execPath('/bin/sh')
      .args(['-c', script])
      .env({ SECRET: secret })
      .start({ engine, consoleStream: true })
    let text = ''
    vm.console.on('data', (c) => {
      text += c.toString('latin1')
    })
    await within(
      (async () => {
        while (!text.includes('scan-now')) await new Promise((r) => setTimeout(r, 50))
      })(),
      60_000,
      'the workload to start',
    )
    const leaks = hostLeaks(secret)
    const exit = await within(vm.wait(), 60_000, 'the workload VM')
    t.like(exit.workload, { exitCode: 0 })
    t.true(text.includes(`seen=${secret}`), text.slice(-2000))
    const cmdline = text.split(/\r?\n/).find((l) => l.startsWith('cmdline=')) ?? ''
    t.true(cmdline.length > 'cmdline='.length, text.slice(-2000))
    t.deepEqual(leaksIn(cmdline, secret), [], `the guest's /proc/cmdline: ${cmdline}`)
    t.deepEqual(leaks, [], 'host processes')
  })

  test.serial(`${tier}: a sandbox's env secret is seen by execs and on no command line or host environ`, async (t) => {
    const secret = `S${crypto.randomBytes(24).toString('hex')}`
    requireGuestImages()
    const sb = await Sandbox.builder(`secret-${engine}`).engine(engine).memory(256).env({ SECRET: secret }).create()
    try {
      t.is((await sb.shell('echo "$SECRET"')).stdoutText(), `${secret}\n`)
      const cmdline = (await sb.exec('cat', ['/proc/cmdline'])).stdoutText()
      t.true(cmdline.length > 0)
      t.deepEqual(leaksIn(cmdline, secret), [], `the guest's /proc/cmdline: ${cmdline}`)
      t.deepEqual(hostLeaks(secret), [], 'host processes')
    } finally {
      await sb.stop({ timeoutMs: 5000 })
    }
  })
})

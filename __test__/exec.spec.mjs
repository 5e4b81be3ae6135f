// T2 / T3: running processes in a sandbox through sandbox.exec / shell / execStream. One sandbox
// per tier serves the tests of this file (they run concurrently in it); T2 runs on engine 'qemu'
// (TCG where there is no hardware KVM), T3 on 'kvm' (skipped, saying why, where the built-in
// VMM cannot boot Linux).
import test from 'ava'

import { ExecProcess, ExecResult, MicrocellError, Sandbox } from 'microcell'

import { within } from './helpers.mjs'
import { perTier, requireGuestImages, sharedSandbox } from './guest.mjs'

/** Asserts that `promise` rejects with a MicrocellError of `code`; returns the error. */
async function rejectsWith(t, promise, code) {
  const err = await t.throwsAsync(promise, { instanceOf: MicrocellError })
  t.is(err?.code, code, err?.message)
  return err
}

/** Every byte value, many times over, in a shuffled order (64 KiB + 256). */
function allBytes() {
  const buf = Buffer.alloc(65536 + 256)
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 167 + (i >> 8)) & 0xff
  return buf
}

/** Reads a Readable to its end. */
async function drain(stream) {
  const chunks = []
  for await (const c of stream) chunks.push(c)
  return Buffer.concat(chunks)
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

perTier(test, 'exec', (tier, engine) => {
  const sandbox = sharedSandbox(test, engine, (b) => b.env({ SB_ENV: 'from-sandbox' }).workdir('/tmp'))

  test(`${tier}: exit codes, a signal's end, stdout and stderr kept apart`, async (t) => {
    const sb = await sandbox()
    const r = await sb.exec('/bin/sh', ['-c', 'echo out; echo err >&2; echo out2; exit 3'])
    t.true(r instanceof ExecResult)
    t.is(r.exitCode, 3)
    t.is(r.signal, null)
    t.false(r.timedOut)
    t.false(r.ok)
    t.is(r.stdoutText(), 'out\nout2\n')
    t.is(r.stderrText(), 'err\n')
    t.true(Buffer.isBuffer(r.stdout) && Buffer.isBuffer(r.stderr))
    t.true(r.durationMs >= 0 && r.durationMs < 10_000)
    const ok = await sb.exec('true')
    t.is(ok.exitCode, 0)
    t.true(ok.ok)
    t.is((await sb.exec('false')).exitCode, 1)
    const killed = await sb.shell('kill -TERM $$')
    t.is(killed.exitCode, null)
    t.is(killed.signal, 'SIGTERM')
    const sh = await sb.shell('printf "%s|" "$0" a\\ b')
    t.is(sh.stdoutText(), '/bin/sh|a b|')
    // args are passed as they are: no shell splits or expands them
    const echo = await sb.exec('/bin/echo', ['a  b', '$HOME', '"q"', "'s'", '*'])
    t.is(echo.stdoutText(), 'a  b $HOME "q" \'s\' *\n')
  })

  test(`${tier}: env (sandbox's, then the call's; clearEnv), cwd (sandbox workdir, then the call's), user`, async (t) => {
    const sb = await sandbox()
    const r = await sb.shell('echo "$SB_ENV|$MINE"; pwd; id -u; id -g', { env: { MINE: 'mine' } })
    t.is(r.stdoutText(), 'from-sandbox|mine\n/tmp\n0\n0\n')
    const over = await sb.shell('echo "$SB_ENV"; pwd', { env: { SB_ENV: 'overridden' }, cwd: '/' })
    t.is(over.stdoutText(), 'overridden\n/\n')
    const clear = await sb.exec('/bin/env', [], { clearEnv: true, env: { ONLY: '1' } })
    t.false(clear.stdoutText().includes('SB_ENV'), clear.stdoutText())
    t.true(clear.stdoutText().includes('ONLY=1'))
    const nobody = await sb.shell('id -u; id -g; whoami', { user: 'nobody', cwd: '/' })
    t.is(nobody.stdoutText(), '65534\n65534\nnobody\n')
    const uid = await sb.shell('id -u; id -g', { user: '1234:4321', cwd: '/' })
    t.is(uid.stdoutText(), '1234\n4321\n')
    const num = await sb.shell('id -u', { user: 42, cwd: '/' })
    t.is(num.stdoutText(), '42\n')
    await rejectsWith(t, sb.exec('true', [], { user: 'no-such-user' }), 'E_INVALID_ARGUMENT')
    const badCwd = await rejectsWith(t, sb.exec('true', [], { cwd: '/no/such/dir' }), 'ENOENT')
    t.regex(badCwd.message, /\/no\/such\/dir/)
  })

  test(`${tier}: stdin round trip with every byte value (exec and execStream), rlimits`, async (t) => {
    const sb = await sandbox()
    const data = allBytes()
    const r = await sb.exec('cat', [], { stdin: data })
    t.is(r.exitCode, 0)
    t.true(r.stdout.equals(data), `got ${r.stdout.length} bytes`)
    const text = await sb.exec('wc', ['-c'], { stdin: 'héllo\n' })
    t.is(text.stdoutText().trim(), String(Buffer.byteLength('héllo\n')))

    const p = await sb.execStream('cat', [], { stdin: 'pipe' })
    t.true(p instanceof ExecProcess)
    const out = drain(p.stdout)
    await p.write(data.subarray(0, 1000))
    await p.write(data.subarray(1000))
    await p.closeStdin()
    t.true((await out).equals(data))
    t.is((await p.wait()).exitCode, 0)

    const piped = await sb.execStream('sha256sum', [], { stdin: 'pipe' })
    const sum = drain(piped.stdout)
    piped.stdin.end(data)
    const expected = (await import('node:crypto')).createHash('sha256').update(data).digest('hex')
    t.is((await sum).toString().split(' ')[0], expected)

    const lim = await sb.shell('ulimit -n', { rlimits: ['RLIMIT_NOFILE=123:123'] })
    t.is(lim.stdoutText(), '123\n')
    await rejectsWith(t, sb.exec('true', [], { rlimits: ['RLIMIT_BOGUS=1'] }), 'E_INVALID_ARGUMENT')
  })

  test(`${tier}: 100 concurrent execs in one sandbox each get their own output`, async (t) => {
    const sb = await sandbox()
    const t0 = performance.now()
    const results = await Promise.all(Array.from({ length: 100 }, (_, i) => sb.exec('/bin/echo', [`n${i}`])))
    const ms = performance.now() - t0
    results.forEach((r, i) => {
      t.is(r.exitCode, 0)
      t.is(r.stdoutText(), `n${i}\n`)
    })
    t.log(`100 concurrent exec('echo') in ${ms.toFixed(0)} ms`)
  })

  test(`${tier}: a consumer that stops reading stalls its own process only`, async (t) => {
    const sb = await sandbox()
    const total = 4 << 20
    const stalled = await sb.execStream('/bin/sh', ['-c', `head -c ${total} /dev/zero; echo done >&2`])
    // Take one chunk, then stop reading.
    const first = await new Promise((resolve) => stalled.stdout.once('data', resolve))
    stalled.stdout.pause()
    t.true(first.length > 0)
    await sleep(1500)
    // The process is held back: not exited, and the host holds at most about a window per stream.
    t.is(stalled.exitStatus, null)
    const { peak } = stalled.bufferedBytes
    t.true(peak <= 1 << 20, `host buffered up to ${peak} bytes for the stalled process`)
    // Meanwhile other commands run as usual.
    const t0 = performance.now()
    const other = await within(sb.exec('/bin/echo', ['not blocked']), 20_000, 'an exec beside a stalled one')
    t.is(other.stdoutText(), 'not blocked\n')
    const big = await within(sb.shell('head -c 1000000 /dev/zero | wc -c'), 20_000, 'output beside a stalled one')
    t.is(big.stdoutText().trim(), '1000000')
    t.log(`execs beside the stalled one: ${(performance.now() - t0).toFixed(0)} ms; stalled process buffered ≤ ${peak} bytes`)
    // Reading again lets it finish, with every byte.
    const errText = drain(stalled.stderr)
    let n = first.length
    stalled.stdout.on('data', (c) => {
      n += c.length
    })
    stalled.stdout.resume()
    const exit = await within(stalled.wait(), 60_000, 'the stalled process once read again')
    await new Promise((r) => stalled.stdout.once('end', r))
    t.is(exit.exitCode, 0)
    t.is(n, total)
    t.is((await errText).toString(), 'done\n')
  })

  test(`${tier}: timeoutMs kills the whole process tree (timedOut, SIGKILL)`, async (t) => {
    const sb = await sandbox()
    const marker = `sleeper${process.pid}`
    const t0 = performance.now()
    // Children and a grandchild that ignore the shell's end; all in the process group.
    const r = await sb.shell(`(sleep 300; echo ${marker}) & sh -c 'sleep 301' & echo started; wait`, { timeoutMs: 700 })
    const ms = performance.now() - t0
    t.true(r.timedOut)
    t.is(r.exitCode, null)
    t.is(r.signal, 'SIGKILL')
    t.is(r.stdoutText(), 'started\n')
    t.true(ms < 10_000, `took ${ms.toFixed(0)} ms`)
    await sleep(300)
    const ps = await sb.shell('for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < $f; echo; done 2>/dev/null')
    t.false(/sleep 30[01]/.test(ps.stdoutText()), `left over:\n${ps.stdoutText()}`)
  })

  test(`${tier}: execStream events: stdout/stderr in order, then exit; signal(), kill(), wait()`, async (t) => {
    const sb = await sandbox()
    const p = await sb.execStream('/bin/sh', ['-c', 'echo a; echo b >&2; echo c; exit 5'])
    t.true(p.pid > 1)
    const events = []
    for await (const ev of p) events.push(ev)
    const last = events.pop()
    t.like(last, { type: 'exit', exitCode: 5, signal: null, timedOut: false })
    const out = events.filter((e) => e.type === 'stdout').map((e) => e.data.toString()).join('')
    const err = events.filter((e) => e.type === 'stderr').map((e) => e.data.toString()).join('')
    t.is(out, 'a\nc\n')
    t.is(err, 'b\n')
    t.like(await p.wait(), { exitCode: 5 })
    t.like(p.exitStatus, { exitCode: 5 })
    t.throws(() => p.stdout, { instanceOf: MicrocellError, code: 'E_INVALID_ARGUMENT' })

    const term = await sb.execStream('/bin/sh', ['-c', 'trap "echo got TERM; exit 9" TERM; echo ready; while :; do sleep 0.05; done'])
    const seen = []
    term.stdout.on('data', (c) => seen.push(c.toString()))
    while (!seen.join('').includes('ready')) await sleep(20)
    await term.signal('SIGTERM')
    const exit = await within(term.wait(), 10_000, 'SIGTERM')
    t.is(exit.exitCode, 9)
    await new Promise((r) => term.stdout.once('end', r))
    t.true(seen.join('').includes('got TERM'))

    const forever = await sb.execStream('sleep', ['1000'])
    await forever.kill()
    t.like(await within(forever.wait(), 10_000, 'kill()'), { exitCode: null, signal: 'SIGKILL', timedOut: false })

    // Waiting alone (no stream read) never stalls a chatty process; the output is there after.
    const chatty = await sb.execStream('/bin/sh', ['-c', 'head -c 2000000 /dev/zero; echo e >&2'])
    t.like(await within(chatty.wait(), 60_000, 'wait() of a chatty process'), { exitCode: 0 })
    t.is((await drain(chatty.stdout)).length, 2_000_000)
    t.is((await drain(chatty.stderr)).toString(), 'e\n')
  })

  test(`${tier}: a terminal: tty size, isatty, resize, input`, async (t) => {
    const sb = await sandbox()
    const p = await sb.execStream('/bin/sh', ['-c', 'stty size; [ -t 0 ] && [ -t 1 ] && echo tty-yes; read line; stty size; echo "got $line" >&2'], {
      tty: { rows: 30, cols: 100 },
    })
    let text = ''
    p.stdout.on('data', (c) => {
      text += c.toString()
    })
    t.is(p.stderr.readableLength, 0)
    while (!text.includes('tty-yes')) await sleep(20)
    t.true(text.includes('30 100'), text)
    await p.resize(120, 40)
    await p.write('hello\n')
    const exit = await within(p.wait(), 10_000, 'the terminal process')
    await new Promise((r) => p.stdout.once('end', r))
    t.is(exit.exitCode, 0)
    t.true(text.includes('40 120'), text)
    // stderr goes to the terminal too: everything arrives on stdout.
    t.true(text.includes('got hello'), text)
  })

  test(`${tier}: exec() keeps at most maxOutputBytes per stream: beyond it the process tree is killed, E_OUTPUT_LIMIT`, async (t) => {
    const sb = await sandbox()
    // Exactly at the limit: kept whole.
    const r = await sb.exec('head', ['-c', '100000', '/dev/zero'], { maxOutputBytes: 100_000 })
    t.is(r.stdout.length, 100_000)
    // One byte more, and an endless writer (with a child in its group) on stderr.
    const over = await rejectsWith(t, sb.exec('head', ['-c', '100001', '/dev/zero'], { maxOutputBytes: 100_000 }), 'E_OUTPUT_LIMIT')
    t.regex(over.message, /stdout.*execStream/)
    const t0 = performance.now()
    await rejectsWith(t, sb.exec('sh', ['-c', 'yes >&2 & yes >&2'], { maxOutputBytes: 4096 }), 'E_OUTPUT_LIMIT')
    t.true(performance.now() - t0 < 20_000)
    // Nothing of it is left running; the sandbox serves on.
    const ps = await sb.exec('sh', ['-c', 'ps -o comm | grep -c "^yes$" || true'])
    t.is(ps.stdoutText().trim(), '0')
    await rejectsWith(t, sb.exec('true', [], { maxOutputBytes: 0 }), 'E_INVALID_ARGUMENT')
  })

  test(`${tier}: metrics(): the guest's CPU, memory, disk, load and uptime, and the engine's RSS`, async (t) => {
    const sb = await sandbox()
    const idle = await sb.metrics({ intervalMs: 300 })
    t.is(idle.cpuCount, 1)
    t.true(idle.memTotalMib > 150 && idle.memTotalMib <= 256, `${idle.memTotalMib}`)
    t.true(idle.memUsedMib > 0 && idle.memUsedMib < idle.memTotalMib)
    t.true(Math.abs(idle.memUsedMib + idle.memAvailableMib - idle.memTotalMib) < 0.5)
    t.true(idle.diskTotalMib > 10 && idle.diskUsedMib > 0 && idle.diskUsedMib < idle.diskTotalMib, JSON.stringify(idle))
    t.true(idle.uptimeS > 0 && idle.loadAvg.length === 3)
    t.is(idle.network, null, 'no network, no counters')
    if (engine === 'qemu') t.true(idle.hostRssMib > 10, `${idle.hostRssMib}`)
    else t.is(idle.hostRssMib, null)
    // A busy loop in the guest shows as CPU use.
    const busy = await sb.execStream('sh', ['-c', 'while :; do :; done'])
    const loaded = await sb.metrics({ intervalMs: 500 })
    await busy.kill()
    t.true(loaded.cpuUsedPct > 50 && loaded.cpuUsedPct <= 100, `${loaded.cpuUsedPct}% busy (idle: ${idle.cpuUsedPct}%)`)
    await rejectsWith(t, sb.metrics({ intervalMs: 0 }), 'E_INVALID_ARGUMENT')
  })

  test(`${tier}: bad requests are coded errors`, async (t) => {
    const sb = await sandbox()
    const missing = await rejectsWith(t, sb.exec('/no/such/program'), 'ENOENT')
    t.regex(missing.message, /\/no\/such\/program/)
    await rejectsWith(t, sb.exec('/etc/passwd'), 'EACCES')
    await rejectsWith(t, sb.execStream('/no/such/program'), 'ENOENT')
    await rejectsWith(t, sb.exec(''), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.exec('true', 'not an array', {}), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.exec('true', [], { timeoutMs: -1 }), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.exec('true', [], { cwd: 'relative' }), 'E_INVALID_ARGUMENT')
    await rejectsWith(t, sb.exec('true', [], { tty: { rows: 0, cols: 80 } }), 'E_INVALID_ARGUMENT')
    const noStdin = await sb.execStream('true')
    await rejectsWith(t, noStdin.write('x'), 'E_INVALID_ARGUMENT')
    await noStdin.wait()
  })

  test(`${tier}: after the sandbox has ended, exec and fs reject with E_CHANNEL_CLOSED`, async (t) => {
    requireGuestImages()
    const sb = await Sandbox.builder('ended').engine(engine).memory(256).create()
    const p = await sb.execStream('sleep', ['1000'])
    await sb.stop({ timeoutMs: 5000 })
    await rejectsWith(t, sb.exec('true'), 'E_CHANNEL_CLOSED')
    await rejectsWith(t, sb.fs.read('/etc/hostname'), 'E_CHANNEL_CLOSED')
    // A process that was running when the sandbox ended: its wait() rejects, coded.
    const err = await t.throwsAsync(within(p.wait(), 10_000, 'wait() of a process in an ended sandbox'), { instanceOf: MicrocellError })
    t.is(err.code, 'E_CHANNEL_CLOSED', err.message)
  })
})

import os from 'node:os'

import { MicrocellError } from '../errors.js'
import type { ExecExit, ExecOptions } from '../exec.js'
import { Sandbox, type SandboxEngine } from '../sandbox.js'
import { UsageError, flag, intOption, listOption, stringOption, type OptionSpec, type Parsed } from './args.js'

export const RUN_OPTIONS: OptionSpec[] = [
  { name: 'memory', short: 'm', kind: 'string', value: 'MIB', help: 'guest memory in MiB (default 512)' },
  { name: 'cpus', short: 'c', kind: 'string', value: 'N', help: 'vCPUs, 1 to 32 (default 1)' },
  { name: 'env', short: 'e', kind: 'list', value: 'K=V', help: 'an environment variable of the command (repeatable)' },
  { name: 'engine', kind: 'string', value: 'E', help: "auto (default: kvm where it boots Linux, else qemu) | kvm | qemu" },
  { name: 'timeout', kind: 'string', value: 'MS', help: 'kill the command and what it started after MS milliseconds' },
  { name: 'workdir', short: 'w', kind: 'string', value: 'DIR', help: 'working directory in the guest (absolute)' },
  { name: 'user', short: 'u', kind: 'string', value: 'USER', help: 'run as this guest user (name, uid or uid:gid; default root)' },
  { name: 'interactive', short: 'i', kind: 'flag', help: "pass this process's stdin to the command (else it reads /dev/null)" },
  { name: 'tty', short: 't', kind: 'flag', help: 'run the command on a terminal (stderr merges into stdout)' },
  { name: 'boot-timeout', kind: 'string', value: 'MS', help: 'how long the guest has to boot (default 30000)' },
  { name: 'volume', short: 'V', kind: 'list', value: 'HOST:GUEST[:ro]', help: 'share a host directory into the guest (repeatable; engine qemu)' },
  { name: 'net', kind: 'flag', help: 'give the guest a network with outbound access (user-mode NAT through passt)' },
  { name: 'deny', kind: 'list', value: 'NET', help: 'with --net: a destination the guest may not reach: a.b.c.d[/n], private or host (repeatable)' },
  { name: 'allow', kind: 'list', value: 'NET', help: 'with --net: a destination that stays reachable inside a denied one (repeatable)' },
  { name: 'publish', short: 'p', kind: 'list', value: 'HOST:GUEST[/udp]', help: "forward a TCP (or /udp) port of this host's loopback into the guest (repeatable; a network without outbound access unless --net)" },
  { name: 'kernel', kind: 'string', value: 'PATH', help: 'guest kernel (default: the one scripts/setup.sh built)' },
  { name: 'rootfs', kind: 'string', value: 'PATH', help: 'guest root disk (default: the one scripts/setup.sh built)' },
  { name: 'json', kind: 'flag', help: 'collect the output and print one JSON object with the result' },
  { name: 'verbose', short: 'v', kind: 'flag', help: 'progress on stderr even when it is not a terminal' },
]

const ENGINES = ['auto', 'kvm', 'qemu']

/** 128 + the signal's number (as a shell reports a signal's end), or 1 when unknown. */
function signalStatus(name: string | null): number {
  if (name === null) return 1
  const n = (os.constants.signals as Record<string, number>)[name]
  return n === undefined ? 1 : 128 + n
}

function statusOf(exit: ExecExit): number {
  return exit.exitCode ?? signalStatus(exit.signal)
}

interface Plan {
  argv: string[]
  exec: ExecOptions
  json: boolean
  interactive: boolean
  tty: boolean
  progress: (line: string) => void
}

function plan(command: 'run' | 'exec', p: Parsed): { plan: Plan; builder: ReturnType<typeof Sandbox.builder> } {
  let argv: string[]
  if (command === 'run') {
    if (p.rest.length === 0) throw new UsageError('give the command to run: microcell run [options] -- CMD [ARGS...]')
    argv = [...p.rest]
  } else {
    if (p.rest.length === 0) throw new UsageError("give the script to run: microcell exec [options] 'SCRIPT'")
    argv = ['/bin/sh', '-c', p.rest.join(' ')]
  }
  const builder = Sandbox.builder('microcell')
  const memory = intOption(p, 'memory', 1, 2 ** 31)
  if (memory !== undefined) builder.memory(memory)
  const cpus = intOption(p, 'cpus', 1, 1024)
  if (cpus !== undefined) builder.cpus(cpus)
  const engine = stringOption(p, 'engine')
  if (engine !== undefined) {
    if (!ENGINES.includes(engine)) throw new UsageError(`--engine ${JSON.stringify(engine)}: give auto, kvm or qemu`)
    builder.engine(engine as SandboxEngine)
  }
  const bootTimeout = intOption(p, 'boot-timeout', 1, 2 ** 32 - 1)
  if (bootTimeout !== undefined) builder.bootTimeoutMs(bootTimeout)
  for (const v of listOption(p, 'volume')) {
    const parts = v.split(':')
    const readOnly = parts.length === 3 && parts[2] === 'ro'
    if (parts.length < 2 || parts.length > 3 || (parts.length === 3 && !readOnly) || !parts[0] || !parts[1]) {
      throw new UsageError(`--volume ${JSON.stringify(v)}: write it as HOST:GUEST or HOST:GUEST:ro`)
    }
    builder.volume(parts[0], parts[1], { readOnly })
  }
  const ports = listOption(p, 'publish')
  const [deny, allow] = [listOption(p, 'deny'), listOption(p, 'allow')]
  if (flag(p, 'net') || ports.length > 0 || deny.length > 0 || allow.length > 0) {
    builder.network({
      outbound: flag(p, 'net'),
      ...(ports.length > 0 ? { ports } : {}),
      ...(deny.length > 0 ? { deny } : {}),
      ...(allow.length > 0 ? { allow } : {}),
    })
  }
  const kernel = stringOption(p, 'kernel')
  if (kernel !== undefined) builder.kernel(kernel)
  const rootfs = stringOption(p, 'rootfs')
  if (rootfs !== undefined) builder.rootfs(rootfs)

  const exec: ExecOptions = {}
  const env: Record<string, string> = {}
  for (const kv of listOption(p, 'env')) {
    const eq = kv.indexOf('=')
    if (eq <= 0) throw new UsageError(`--env ${JSON.stringify(kv)}: write it as KEY=VALUE`)
    env[kv.slice(0, eq)] = kv.slice(eq + 1)
  }
  if (Object.keys(env).length > 0) exec.env = env
  const timeout = intOption(p, 'timeout', 1, Number.MAX_SAFE_INTEGER)
  if (timeout !== undefined) exec.timeoutMs = timeout
  const workdir = stringOption(p, 'workdir')
  if (workdir !== undefined) {
    if (!workdir.startsWith('/')) throw new UsageError(`--workdir ${JSON.stringify(workdir)}: give an absolute guest path`)
    exec.cwd = workdir
  }
  const user = stringOption(p, 'user')
  if (user !== undefined) exec.user = user
  const json = flag(p, 'json')
  const tty = flag(p, 'tty')
  if (json && tty) throw new UsageError('--json and --tty do not go together (a terminal has no separate stderr to report)')
  const verbose = flag(p, 'verbose') || process.stderr.isTTY === true
  const progress = verbose ? (line: string) => process.stderr.write(`microcell: ${line}\n`) : () => {}
  return { plan: { argv, exec, json, interactive: flag(p, 'interactive'), tty, progress }, builder }
}

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const c of stream) chunks.push(typeof c === 'string' ? Buffer.from(c) : (c as Buffer))
  return Buffer.concat(chunks)
}

/** 127 / 126 for a program that does not exist / cannot run (as a shell says), else null. */
function startFailure(err: unknown): number | null {
  const code = (err as MicrocellError).code
  if (code === 'ENOENT' || code === 'ENOTDIR') return 127
  if (code === 'EACCES' || code === 'ENOEXEC' || code === 'EPERM') return 126
  return null
}

/** `microcell run` / `microcell exec`. Returns the exit status. */
export async function runCommand(command: 'run' | 'exec', p: Parsed): Promise<number> {
  const { plan: pl, builder } = plan(command, p)
  let config
  try {
    config = builder.build()
  } catch (err) {
    // A configuration the options made: a usage error.
    if (err instanceof MicrocellError && err.code.startsWith('E_CONFIG_')) throw new UsageError(err.message)
    throw err
  }
  // Read all of stdin before booting when the result is collected (a JSON result has no stream).
  const stdinData = pl.json && pl.interactive ? await readAll(process.stdin) : null

  pl.progress(`booting a sandbox (engine ${config.engine}, ${config.memoryMib} MiB, ${config.cpus} vCPU${config.cpus > 1 ? 's' : ''}) ...`)
  let sb: Sandbox
  try {
    sb = await Sandbox.create(config)
  } catch (err) {
    return failed(pl, err)
  }
  const { info } = sb
  pl.progress(`ready in ${info.bootMs.toFixed(0)} ms on ${info.engine} (${info.engineReason}); kernel ${info.kernelRelease}`)

  let interrupted = 0
  let forward: ((sig: NodeJS.Signals) => void) | null = null
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted += 1
    if (interrupted > 1 || forward === null) void sb.kill()
    else forward(sig)
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  try {
    if (pl.json) {
      const opts: ExecOptions = { ...pl.exec }
      if (stdinData !== null) opts.stdin = stdinData
      forward = () => void sb.kill()
      let r
      try {
        r = await sb.exec(pl.argv[0]!, pl.argv.slice(1), opts)
      } catch (err) {
        return failed(pl, err, sb)
      }
      const status = statusOf(r)
      process.stdout.write(
        `${JSON.stringify({
          command: pl.argv,
          status,
          exitCode: r.exitCode,
          signal: r.signal,
          timedOut: r.timedOut,
          durationMs: r.durationMs,
          stdout: r.stdoutText(),
          stderr: r.stderrText(),
          sandbox: { engine: info.engine, engineReason: info.engineReason, bootMs: info.bootMs, kernelRelease: info.kernelRelease },
        })}\n`,
      )
      return status
    }
    return await stream(pl, sb, (f) => {
      forward = f
    })
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
    const t0 = performance.now()
    const end = await sb.stop({ timeoutMs: 5000 }).catch(() => null)
    pl.progress(`sandbox stopped in ${(performance.now() - t0).toFixed(0)} ms (${end?.reason ?? 'unknown'})`)
  }
}

async function stream(pl: Plan, sb: Sandbox, setForward: (f: (sig: NodeJS.Signals) => void) => void): Promise<number> {
  const opts: ExecOptions = { ...pl.exec, stdin: pl.interactive ? 'pipe' : 'ignore' }
  const stdout = process.stdout
  if (pl.tty) opts.tty = { rows: stdout.rows ?? 24, cols: stdout.columns ?? 80 }
  let proc
  try {
    proc = await sb.execStream(pl.argv[0]!, pl.argv.slice(1), opts)
  } catch (err) {
    return failed(pl, err, sb)
  }
  setForward((sig) => void proc.signal(sig).catch(() => undefined))
  const done = (s: NodeJS.ReadableStream) => new Promise<void>((resolve) => s.once('end', resolve).once('error', () => resolve()))
  const outs = [done(proc.stdout), done(proc.stderr)]
  // Our reader went away (`microcell run ... | head`): end the command as SIGPIPE would, and
  // drop the rest of its output.
  let brokenPipe = false
  const onOutputError = (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') return
    brokenPipe = true
    void proc.kill().catch(() => undefined)
    proc.stdout.resume()
    proc.stderr.resume()
  }
  stdout.on('error', onOutputError)
  process.stderr.on('error', onOutputError)
  proc.stdout.pipe(stdout, { end: false })
  proc.stderr.pipe(process.stderr, { end: false })
  const stdin = process.stdin
  const raw = pl.tty && pl.interactive && stdin.isTTY === true
  const onResize = () => void proc.resize(stdout.columns ?? 80, stdout.rows ?? 24).catch(() => undefined)
  if (pl.tty) stdout.on('resize', onResize)
  if (pl.interactive) {
    if (raw) stdin.setRawMode(true)
    stdin.pipe(proc.stdin)
  }
  try {
    const exit = await proc.wait()
    await Promise.all(outs)
    if (brokenPipe) return signalStatus('SIGPIPE')
    if (exit.timedOut) process.stderr.write(`microcell: the command timed out and was killed (${exit.signal ?? 'SIGKILL'})\n`)
    return statusOf(exit)
  } catch (err) {
    return failed(pl, err, sb)
  } finally {
    stdout.off('error', onOutputError)
    process.stderr.off('error', onOutputError)
    if (pl.tty) stdout.off('resize', onResize)
    if (pl.interactive) {
      stdin.unpipe(proc.stdin)
      if (raw) stdin.setRawMode(false)
      stdin.pause()
      stdin.destroy()
    }
  }
}

/** Reports an error (text on stderr, or JSON on stdout with --json); returns the exit status. */
function failed(pl: Plan, err: unknown, sb?: Sandbox): number {
  const e = err as MicrocellError
  const start = startFailure(err)
  const status = start ?? 1
  if (pl.json) {
    process.stdout.write(`${JSON.stringify({ command: pl.argv, status, error: { code: e.code ?? 'E_INTERNAL', message: e.message } })}\n`)
  } else if (start !== null) {
    process.stderr.write(`microcell: ${pl.argv[0]}: ${start === 127 ? 'not found' : 'cannot run'} in the guest (${e.code}: ${e.message})\n`)
  } else {
    process.stderr.write(`microcell: ${e.code ?? 'error'}: ${e.message}\n`)
    if (e.code === 'E_GUEST_IMAGE_MISSING') process.stderr.write('microcell: install the guest images with npm install microcell-guest-linux-x64 (in a clone: ./scripts/setup.sh); microcell doctor says what else is missing\n')
    if (sb !== undefined && e.code === 'E_CHANNEL_CLOSED') process.stderr.write(`microcell: the sandbox ended: ${JSON.stringify(sb.exitStatus)}\n`)
  }
  return status
}

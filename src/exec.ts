import { Readable, Writable } from 'node:stream'

import { MicrocellError } from './errors.js'
import type * as native from './internal/native.js'

/** Options of `sandbox.exec()`, `sandbox.shell()` and `sandbox.execStream()`. */
export interface ExecOptions {
  /** Working directory (absolute guest path); default: the sandbox's `workdir`, else `/`. */
  cwd?: string
  /** Added to the environment (after the sandbox's `env`, before the agent's `PATH`/`HOME`). */
  env?: Record<string, string>
  /** Start from an empty environment: only `env`. */
  clearEnv?: boolean
  /** A user name from the guest's `/etc/passwd`, a uid, or `"uid:gid"` (default: root). */
  user?: string | number
  /**
   * Kill the process and everything it started (its process group) this many milliseconds
   * after the start; the result then says `timedOut: true` (and `signal: 'SIGKILL'`).
   */
  timeoutMs?: number
  /**
   * `exec()`: bytes for the process's stdin (a string is written as UTF-8), then closed.
   * `execStream()`: the same, or `'pipe'` (write it with `write()` / `stdin`, end it with
   * `closeStdin()`), or `'ignore'` (the default: `/dev/null`).
   */
  stdin?: string | Uint8Array | 'pipe' | 'ignore'
  /** Resource limits, e.g. `['RLIMIT_NOFILE=1024:1024']` (as in the MicroVm config). */
  rlimits?: string[]
  /**
   * Run on a pseudo-terminal of this size (`true`: 24 rows × 80 columns); stdout and stderr
   * then arrive merged on stdout, and stdin is a pipe.
   */
  tty?: { rows: number; cols: number } | boolean
  /**
   * `exec()` only: the most bytes kept of stdout and of stderr (each; default 64 MiB, at most
   * 4294967295). A process that writes more is killed (its process group) and `exec()` rejects
   * with `E_OUTPUT_LIMIT`; `execStream()` has no limit (its reader sets the pace).
   */
  maxOutputBytes?: number
}

/** How a process ended. */
export interface ExecExit {
  /** Its exit code, or null when a signal killed it. */
  exitCode: number | null
  /** The signal that killed it (`'SIGKILL'`, ...), or null. */
  signal: string | null
  /** Killed because `timeoutMs` passed. */
  timedOut: boolean
  /** From spawn to exit, measured in the guest. */
  durationMs: number
}

/** What `sandbox.exec()` resolves with. */
export class ExecResult implements ExecExit {
  readonly exitCode: number | null
  readonly signal: string | null
  readonly timedOut: boolean
  readonly durationMs: number
  /** Everything the process wrote to stdout. */
  readonly stdout: Buffer
  /** Everything the process wrote to stderr. */
  readonly stderr: Buffer

  constructor(exit: ExecExit, stdout: Buffer, stderr: Buffer) {
    this.exitCode = exit.exitCode
    this.signal = exit.signal
    this.timedOut = exit.timedOut
    this.durationMs = exit.durationMs
    this.stdout = stdout
    this.stderr = stderr
  }

  /** Exited with code 0. */
  get ok(): boolean {
    return this.exitCode === 0
  }

  /** stdout decoded (UTF-8 by default). */
  stdoutText(encoding: BufferEncoding = 'utf8'): string {
    return this.stdout.toString(encoding)
  }

  /** stderr decoded (UTF-8 by default). */
  stderrText(encoding: BufferEncoding = 'utf8'): string {
    return this.stderr.toString(encoding)
  }
}

/** One event of `execStream()`'s async iterator. */
export type ExecEvent =
  | { type: 'stdout'; data: Buffer }
  | { type: 'stderr'; data: Buffer }
  | ({ type: 'exit' } & ExecExit)

function invalid(message: string): MicrocellError {
  return new MicrocellError('E_INVALID_ARGUMENT', message)
}

export function exitFromNative(e: native.NativeExecExit): ExecExit {
  return {
    exitCode: e.exitCode ?? null,
    signal: e.signal ?? null,
    timedOut: e.timedOut,
    durationMs: e.durationMs,
  }
}

/** `(cmd, args?, options?)` with `args` left out: `(cmd, options)`. */
export function splitArgs(
  args: readonly string[] | ExecOptions | undefined,
  options: ExecOptions | undefined,
): [readonly string[], ExecOptions] {
  if (args === undefined || Array.isArray(args)) return [(args as readonly string[] | undefined) ?? [], options ?? {}]
  if (options !== undefined) throw invalid('exec(cmd, args, options): args must be an array of strings')
  return [[], args as ExecOptions]
}

export interface ExecRequestParts {
  json: string
  /** Bytes to write to stdin and then close, if any. */
  stdinData: Buffer | null
  /** `maxOutputBytes`, checked. */
  maxOutputBytes: number | undefined
  /** Whether a stdin pipe is open. */
  stdinPipe: boolean
  tty: boolean
}

/** Checks the arguments and builds the native request (`sandbox::ExecRequest` JSON). */
export function execRequest(cmd: string, args: readonly string[], options: ExecOptions, streaming: boolean): ExecRequestParts {
  if (typeof cmd !== 'string' || cmd.length === 0) throw invalid('exec: give the program as a non-empty string (a path, or a name looked up in PATH)')
  if (!Array.isArray(args) || args.some((a) => typeof a !== 'string')) throw invalid('exec: args must be an array of strings')
  if (options === null || typeof options !== 'object') throw invalid('exec: options must be an object')
  const req: Record<string, unknown> = { argv: [cmd, ...args] }
  if (options.env !== undefined) {
    if (options.env === null || typeof options.env !== 'object') throw invalid('exec: env must be an object of strings')
    const env: [string, string][] = []
    for (const [k, v] of Object.entries(options.env)) {
      if (typeof v !== 'string') throw invalid(`exec: env.${k} must be a string`)
      env.push([k, v])
    }
    req.env = env
  }
  if (options.clearEnv === true) req.clearEnv = true
  if (options.cwd !== undefined) {
    if (typeof options.cwd !== 'string' || !options.cwd.startsWith('/')) throw invalid(`exec: cwd ${JSON.stringify(options.cwd)} must be an absolute guest path`)
    req.cwd = options.cwd
  }
  if (options.user !== undefined) {
    if (typeof options.user === 'number') {
      if (!Number.isInteger(options.user) || options.user < 0) throw invalid(`exec: user ${options.user} must be a uid (a whole number ≥ 0) or a name`)
      req.user = String(options.user)
    } else if (typeof options.user === 'string' && options.user.length > 0) req.user = options.user
    else throw invalid('exec: user must be a name, a uid or "uid:gid"')
  }
  if (options.timeoutMs !== undefined) {
    const t = options.timeoutMs
    if (!Number.isInteger(t) || t < 1 || t > Number.MAX_SAFE_INTEGER) throw invalid(`exec: timeoutMs is ${String(t)}: give a whole number of milliseconds ≥ 1`)
    req.timeoutMs = t
  }
  if (options.rlimits !== undefined) {
    if (!Array.isArray(options.rlimits) || options.rlimits.some((r) => typeof r !== 'string')) throw invalid('exec: rlimits must be an array of strings like "RLIMIT_NOFILE=1024:1024"')
    req.rlimits = [...options.rlimits]
  }
  let tty = false
  if (options.tty !== undefined && options.tty !== false) {
    const size = options.tty === true ? { rows: 24, cols: 80 } : options.tty
    const ok = (n: unknown) => Number.isInteger(n) && (n as number) >= 1 && (n as number) <= 65535
    if (size === null || typeof size !== 'object' || !ok(size.rows) || !ok(size.cols)) throw invalid('exec: tty must be true or { rows, cols } (whole numbers from 1 to 65535)')
    req.tty = [size.rows, size.cols]
    tty = true
  }
  let stdinData: Buffer | null = null
  let stdinPipe = tty
  const stdin = options.stdin
  if (typeof stdin === 'string' && !(streaming && (stdin === 'pipe' || stdin === 'ignore'))) stdinData = Buffer.from(stdin, 'utf8')
  else if (stdin instanceof Uint8Array) stdinData = Buffer.from(stdin.buffer, stdin.byteOffset, stdin.byteLength)
  else if (stdin === 'pipe') stdinPipe = true
  else if (stdin !== undefined && stdin !== 'ignore') throw invalid("exec: stdin must be a string, a Buffer/Uint8Array, 'pipe' or 'ignore'")
  if (stdinData !== null) stdinPipe = true
  if (stdinPipe) req.stdin = true
  const max = options.maxOutputBytes
  if (max !== undefined && (!Number.isInteger(max) || max < 1 || max > 2 ** 32 - 1)) {
    throw invalid(`exec: maxOutputBytes is ${String(max)}: give a whole number of bytes from 1 to 4294967295 (default 64 MiB)`)
  }
  return { json: JSON.stringify(req), stdinData, stdinPipe, tty, maxOutputBytes: max }
}

type StreamName = 'stdout' | 'stderr'

/**
 * A process running in a sandbox (`sandbox.execStream()`). Read its output either as events
 * (`for await (const ev of proc)`) or as Node streams (`proc.stdout`, `proc.stderr`), not both.
 *
 * Output is pulled from the guest as it is consumed: a consumer that stops reading stops this
 * process's output (its pipes fill in the guest and it blocks writing), and nothing else in the
 * sandbox. A stream nobody reads keeps what comes for it in memory while the other one is read.
 * A handle that is garbage-collected before the process has exited kills the process group.
 */
export class ExecProcess implements AsyncIterable<ExecEvent>, AsyncDisposable {
  readonly #native: native.NativeExecHandle
  readonly #pid: number
  readonly #stdinPipe: boolean
  #mode: 'none' | 'events' | 'streams' = 'none'
  #stdout: Readable | undefined
  #stderr: Readable | undefined
  #stdin: Writable | undefined
  readonly #demand = new Set<StreamName>()
  #draining = false
  #pulling = false
  #ended = false
  #exit: ExecExit | null = null
  #error: Error | null = null
  readonly #exitWaiters: { resolve: (e: ExecExit) => void; reject: (e: Error) => void }[] = []
  /** The iterator's calls, one at a time. */
  #iterTail: Promise<unknown> = Promise.resolve()

  /** @internal Made by `sandbox.execStream()`. */
  constructor(handle: native.NativeExecHandle, stdinPipe: boolean) {
    this.#native = handle
    this.#pid = handle.pid
    this.#stdinPipe = stdinPipe
  }

  /** The process id in the guest. */
  get pid(): number {
    return this.#pid
  }

  /** How it ended, once its exit has been read; else null. */
  get exitStatus(): ExecExit | null {
    return this.#exit
  }

  #finish(exit: ExecExit | null, error: Error | null): void {
    if (this.#ended) return
    this.#ended = true
    this.#exit = exit
    this.#error = error
    for (const s of [this.#stdout, this.#stderr]) {
      if (s === undefined || s.destroyed) continue
      // An error goes to the streams whose users listen for one (reading with `for await`
      // does); the others just close, and wait() rejects with it.
      if (error) s.destroy(s.listenerCount('error') > 0 ? error : undefined)
      else s.push(null)
    }
    for (const w of this.#exitWaiters.splice(0)) {
      if (exit) w.resolve(exit)
      else w.reject(error ?? new MicrocellError('E_INTERNAL', 'the process ended without an exit'))
    }
  }

  /**
   * Whether `wait()` reads output on its own: only while nobody consumes either stream (a
   * stream that is piped, has a `data` listener or was paused has a consumer, whose pace then
   * sets the process's).
   */
  #drainNow(): boolean {
    return this.#draining && this.#stdout?.readableFlowing == null && this.#stderr?.readableFlowing == null
  }

  /** Pulls events while a stream wants data (or `wait()` drains); see the class comment. */
  #pump(): void {
    if (this.#pulling || this.#ended) return
    this.#pulling = true
    void (async () => {
      try {
        while (!this.#ended && (this.#demand.size > 0 || this.#drainNow())) {
          const ev = await this.#native.nextEvent()
          if (ev === null) {
            const e = this.#native.exitStatus()
            this.#finish(e ? exitFromNative(e) : null, null)
            break
          }
          if (ev.type === 'exit') {
            this.#finish(exitFromNative(ev.exit!), null)
            break
          }
          const name = ev.type as StreamName
          const stream = name === 'stdout' ? this.#stdout! : this.#stderr!
          this.#demand.delete(name)
          // Beyond its highWaterMark a stream buffers; it asks again (_read) when it wants more.
          if (!stream.destroyed) stream.push(ev.data!)
        }
      } catch (err) {
        this.#finish(null, err as Error)
      } finally {
        this.#pulling = false
      }
    })()
  }

  #streams(): void {
    if (this.#mode === 'events') throw invalid('this process is read as events (its async iterator): read it one way only')
    if (this.#mode === 'streams') return
    this.#mode = 'streams'
    const make = (name: StreamName) =>
      new Readable({
        read: () => {
          this.#demand.add(name)
          this.#pump()
        },
      })
    this.#stdout = make('stdout')
    this.#stderr = make('stderr')
  }

  /** stdout as a Node Readable (a terminal's output, stderr included, with `tty`). */
  get stdout(): Readable {
    this.#streams()
    return this.#stdout!
  }

  /** stderr as a Node Readable (empty with `tty`). */
  get stderr(): Readable {
    this.#streams()
    return this.#stderr!
  }

  /** The events: `stdout` / `stderr` chunks in order, then `exit` (the last one). */
  [Symbol.asyncIterator](): AsyncIterator<ExecEvent> {
    if (this.#mode === 'streams') throw invalid('this process is read as streams (stdout/stderr): read it one way only')
    this.#mode = 'events'
    const next = async (): Promise<IteratorResult<ExecEvent>> => {
      if (this.#ended) {
        if (this.#error) throw this.#error
        return { done: true, value: undefined }
      }
      let ev: native.NativeExecEvent | null
      try {
        ev = await this.#native.nextEvent()
      } catch (err) {
        this.#finish(null, err as Error)
        throw err
      }
      if (ev === null) {
        const e = this.#native.exitStatus()
        this.#finish(e ? exitFromNative(e) : null, null)
        return { done: true, value: undefined }
      }
      if (ev.type === 'exit') {
        const exit = exitFromNative(ev.exit!)
        this.#finish(exit, null)
        return { done: false, value: { type: 'exit', ...exit } }
      }
      return { done: false, value: { type: ev.type as StreamName, data: ev.data! } }
    }
    return {
      next: () => {
        const p = this.#iterTail.then(next, next)
        this.#iterTail = p.catch(() => undefined)
        return p
      },
      // Leaving the loop early leaves the process running (it stalls once its output window
      // is full): kill() it, or go on reading.
      return: async () => ({ done: true, value: undefined }),
    }
  }

  /**
   * Resolves with how the process ended. When neither stream has a consumer (never piped,
   * listened to or paused), the rest of the output is read into `stdout`/`stderr`'s buffers
   * meanwhile, so that waiting alone never stalls the process; once a stream has a consumer,
   * the consumers set the pace (back-pressure). Read as events, it resolves when the iterator
   * reaches `exit`.
   */
  wait(): Promise<ExecExit> {
    if (this.#ended) return this.#exit ? Promise.resolve(this.#exit) : Promise.reject(this.#error)
    const p = new Promise<ExecExit>((resolve, reject) => this.#exitWaiters.push({ resolve, reject }))
    if (this.#mode !== 'events') {
      this.#streams()
      this.#draining = true
      this.#pump()
    }
    return p
  }

  /** Writes to the process's stdin (needs `stdin: 'pipe'` or `tty`); resolves once the guest has taken it. */
  write(data: string | Uint8Array): Promise<void> {
    if (!this.#stdinPipe) return Promise.reject(invalid("this process has no stdin pipe: start it with { stdin: 'pipe' } (or tty)"))
    const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : Buffer.from(data.buffer, data.byteOffset, data.byteLength)
    return this.#native.writeStdin(buf)
  }

  /** Closes stdin (a terminal gets ^D). */
  closeStdin(): Promise<void> {
    return this.#native.closeStdin()
  }

  /** stdin as a Node Writable (`end()` closes it); needs `stdin: 'pipe'` or `tty`. */
  get stdin(): Writable {
    this.#stdin ??= new Writable({
      write: (chunk: Buffer, _enc, cb) => {
        this.write(chunk).then(() => cb(), cb)
      },
      final: (cb) => {
        this.closeStdin().then(() => cb(), cb)
      },
    })
    return this.#stdin
  }

  /** Sends a signal (`'SIGTERM'` by default; `'INT'`, `'9'`, ...) to the process and its group. */
  signal(name = 'SIGTERM'): Promise<void> {
    return this.#native.signal(name)
  }

  /** SIGKILL to the process and its group. */
  kill(): Promise<void> {
    return this.#native.kill()
  }

  /** The terminal's new size (a process started with `tty`). */
  resize(cols: number, rows: number): Promise<void> {
    return this.#native.resize(rows, cols)
  }

  /** Output bytes held on the host for this process now and at most so far (bounded by back-pressure). */
  get bufferedBytes(): { now: number; peak: number } {
    const [now, peak] = this.#native.bufferedBytes()
    return { now: now!, peak: peak! }
  }

  /** Kills the process if it still runs. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (!this.#ended) await this.kill().catch(() => undefined)
  }
}

/** Writes `data` to a started process's stdin and closes it, in the background; errors are the process's business. */
export function feedStdin(proc: native.NativeExecHandle, data: Buffer): void {
  proc
    .writeStdin(data)
    .catch(() => undefined)
    .finally(() => proc.closeStdin().catch(() => undefined))
}

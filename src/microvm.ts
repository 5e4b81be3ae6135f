import fs from 'node:fs'
import os from 'node:os'
import { Readable } from 'node:stream'

import type {
  ConsoleStats,
  ExitStatus,
  LogLevel,
  MicroVmConfig,
  MicroVmConfigInput,
  NetworkScope,
  Rootfs,
  StartOptions,
  Timings,
  WorkloadStatus,
} from './config.js'
import { MicrocellError } from './errors.js'
import { prepareGuest } from './guest.js'
import { configTypeError, stringList, stringRecord } from './internal/check.js'
import { consoleDelivered, consoleReadable, nativeConsoleOptions, type ConsoleSource } from './internal/console.js'
import * as native from './internal/native.js'
import { registerMicroVm } from './internal/vm-wrap.js'
import { DEFAULT_STOP_TIMEOUT_MS, LIMITS } from './limits.js'
import { snapshotTaken, workloadSnapshotTaken, type Snapshot, type SnapshotOptions } from './snapshot.js'

/** Options of `stop()`. */
export interface StopOptions {
  /** Kill the VM if it has not ended this many milliseconds after the stop request (default 10000). */
  timeoutMs?: number
}

function toJson(config: MicroVmConfigInput): string {
  try {
    return JSON.stringify(config)
  } catch (err) {
    throw new MicrocellError('E_CONFIG_JSON', `the configuration cannot be written as JSON: ${String(err)}`, {
      cause: err,
    })
  }
}

/** Chainable builder of a `MicroVmConfig`; `build()` validates it, `start()` boots it. */
export class MicroVmBuilder {
  readonly #config: MicroVmConfigInput = {}

  #set<K extends keyof MicroVmConfigInput>(key: K, value: MicroVmConfigInput[K]): this {
    this.#config[key] = value
    return this
  }

  /** Logging verbosity of the VM: off (default), error, warn, info, debug, trace. */
  logLevel(level: LogLevel): this {
    return this.#set('logLevel', level)
  }

  /**
   * Root filesystem: `{ disk: image }` (a guest platform root disk, e.g. `defaultGuest()`: the
   * VM then runs `execPath` as its workload on a sandbox engine), a host directory
   * (`{ native }`) or `{ overlayfs: [lower, ..., upper] }`. A string names a disk image when it
   * is an existing file, else a directory. A function is called for the value:
   * `rootfs(defaultGuest)` is `rootfs(defaultGuest())`.
   */
  rootfs(rootfs: Rootfs | string | (() => Rootfs)): this {
    if (typeof rootfs === 'function') return this.rootfs(rootfs())
    if (rootfs === null || (typeof rootfs !== 'string' && typeof rootfs !== 'object')) {
      throw configTypeError('rootfs', "{ disk }, { native }, { overlayfs } or a path string", rootfs)
    }
    if (typeof rootfs !== 'string') return this.#set('rootfs', rootfs)
    let file = false
    try {
      file = fs.statSync(rootfs).isFile()
    } catch {
      // Missing: validation says so (as a directory).
    }
    return this.#set('rootfs', file ? { disk: rootfs } : { native: rootfs })
  }

  /** Number of vCPUs, 1 to 32 (default 1). The seeds' name of `cpus()`. */
  numVcpus(count: number): this {
    return this.#set('numVcpus', count)
  }

  /** Number of vCPUs, 1 to 32 (default 1): the word `Sandbox.builder()` uses. */
  cpus(count: number): this {
    return this.numVcpus(count)
  }

  /** Guest memory in MiB (default 512), at most the host's RAM. The seeds' name of `memory()`. */
  memoryMib(mib: number): this {
    return this.#set('memoryMib', mib)
  }

  /** Guest memory in MiB (default 512): the word `Sandbox.builder()` uses. */
  memory(mib: number): this {
    return this.memoryMib(mib)
  }

  /** Host directories shared with the guest: `"host:guest"` or `"path"`. Replaces earlier ones. */
  mappedDirs(dirs: Iterable<string>): this {
    return this.#set('mappedDirs', stringList('mappedDirs', dirs))
  }

  /** Forwarded ports: `"8080:80"` (host:guest) or `"3000"`. Replaces earlier ones. */
  portMap(ports: Iterable<string>): this {
    return this.#set('portMap', stringList('portMap', ports))
  }

  /**
   * Network scope: `none` (no interface), `group` (default: only `portMap`'s forwarded ports,
   * no way out), `public` (outbound to public addresses only), `any` (outbound anywhere, the
   * host's loopback as `10.0.2.2` included).
   */
  scope(scope: NetworkScope): this {
    return this.#set('scope', scope)
  }

  /** IPv4 address of the guest. */
  ip(ip: string): this {
    return this.#set('ip', ip)
  }

  /** The guest's IPv4 subnet in CIDR notation, e.g. `"192.168.1.0/24"`. */
  subnet(subnet: string): this {
    return this.#set('subnet', subnet)
  }

  /** Resource limits, e.g. `"RLIMIT_NOFILE=1024:1024"`. Replaces earlier ones. */
  rlimits(limits: Iterable<string>): this {
    return this.#set('rlimits', stringList('rlimits', limits))
  }

  /** Working directory of the guest process (absolute guest path). The seeds' name of `workdir()`. */
  workdirPath(path: string): this {
    return this.#set('workdirPath', path)
  }

  /** Working directory of the guest process: the word `Sandbox.builder()` uses. */
  workdir(path: string): this {
    return this.workdirPath(path)
  }

  /** Program to run in the guest. */
  execPath(path: string): this {
    return this.#set('execPath', path)
  }

  /** Arguments of the program (argv[1..]). Replaces earlier ones. */
  args(args: Iterable<string>): this {
    return this.#set('args', stringList('args', args))
  }

  /** Environment: `["KEY=VALUE", ...]` or `{ KEY: 'VALUE' }`. Replaces earlier ones. */
  env(env: Iterable<string> | Record<string, string>): this {
    const iterable = env !== null && typeof (env as Partial<Iterable<string>>)[Symbol.iterator] === 'function'
    const list =
      iterable && typeof env !== 'string'
        ? stringList('env', env)
        : Object.entries(stringRecord('env', env)).map(([k, v]) => `${k}=${v}`)
    return this.#set('env', list)
  }

  /** Host file that receives the guest console (created, or truncated). */
  consoleOutput(path: string): this {
    return this.#set('consoleOutput', path)
  }

  /** Guest kernel: ELF vmlinux (PVH note or not) or bzImage. */
  kernel(path: string): this {
    return this.#set('kernel', path)
  }

  /** Initial ramdisk. */
  initrd(path: string): this {
    return this.#set('initrd', path)
  }

  /** Kernel command line, used exactly as given. */
  cmdline(cmdline: string): this {
    return this.#set('cmdline', cmdline)
  }

  /** Start even where this host's KVM cannot run the guest well (e.g. Linux on PVM). */
  allowUnsupportedHost(allow = true): this {
    return this.#set('allowUnsupportedHost', allow)
  }

  /**
   * Validates the configuration and returns it (defaults filled in): plain JSON data, what
   * `MicroVm.start()` / `MicroVm.run()` take, with a non-enumerable `start()` that runs a
   * workload VM to its end and resolves with the program's exit status (see
   * `BuiltMicroVmConfig`). Throws a `MicrocellError` with an `E_CONFIG_*` code.
   */
  build(): BuiltMicroVmConfig {
    const config = MicroVm.validate(this.#config)
    Object.defineProperty(config, 'start', {
      value: (options: RunOptions = {}) => runToExitStatus(config, options),
      enumerable: false,
    })
    return config as BuiltMicroVmConfig
  }

  /** `MicroVm.start(this.build(), options)`. */
  start(options: StartOptions = {}): Promise<MicroVm> {
    return MicroVm.start(this.#config, options)
  }

  /** `MicroVm.run(this.build(), options)`: a workload VM run to its end; resolves with the program's status. */
  run(options: RunOptions = {}): Promise<WorkloadStatus> {
    return MicroVm.run(this.#config, options)
  }
}

/** Options of `MicroVm.run()` and of `build().start()`. */
export interface RunOptions extends StartOptions {
  /**
   * Where the guest console (the program's output among the kernel's lines) goes, e.g.
   * `process.stdout`; null or absent: nowhere (`build().start()`: `process.stdout` unless the
   * config has `consoleOutput`; null: nowhere).
   */
  console?: NodeJS.WritableStream | null
}

/**
 * What `MicroVmBuilder.build()` returns: the validated configuration (JSON.stringify and spreads
 * see only it) with `start()`, the seeds' `MicroVm::start`: boots the workload VM, runs its
 * program to its end and resolves with the program's exit status — its exit code, or 128 + n
 * when signal n killed it (a shell's `$?`). The console goes to `process.stdout` unless the
 * config has `consoleOutput` (then to that file) or `options.console` says otherwise. Rejects
 * like `MicroVm.run()`. (`MicroVm.start(config)` is the other way: a handle to a running VM.)
 *
 * ```ts
 * const code = await MicroVm.builder().rootfs(defaultGuest).execPath('/bin/sh')
 *   .args(['-c', 'echo hi; exit 7']).build().start() // prints "hi"; code === 7
 * ```
 */
export type BuiltMicroVmConfig = MicroVmConfig & {
  start(options?: RunOptions): Promise<number>
}

async function runToExitStatus(config: MicroVmConfig, options: RunOptions): Promise<number> {
  const console = options.console !== undefined ? options.console : config.consoleOutput === undefined ? process.stdout : null
  const status = await MicroVm.run(config, { ...options, console })
  if (status.exitCode !== null) return status.exitCode
  return 128 + signalNumber(status.signal ?? 'SIGKILL')
}

/** What `done` settles to, or 'timeout' when it has not settled within `timeoutMs`. */
async function settledWithin<T>(done: Promise<T>, timeoutMs: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined
  const timedOut = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), timeoutMs)
    timer.unref()
  })
  try {
    return await Promise.race([done, timedOut])
  } finally {
    clearTimeout(timer)
  }
}

/** A signal's number from its name (`'SIGTERM'`, `'SIG34'`) or a number, 1 to 64. */
function signalNumber(signal: NodeJS.Signals | string | number): number {
  const named = typeof signal === 'string' ? (os.constants.signals as Record<string, number>)[signal] : undefined
  const n = typeof signal === 'number' ? signal : named ?? Number(/^SIG(\d+)$/.exec(signal)?.[1])
  if (Number.isInteger(n) && n >= 1 && n <= 64) return n
  throw new MicrocellError('E_INVALID_ARGUMENT', `signal ${JSON.stringify(signal)}: give a name like 'SIGTERM' or a number from 1 to 64`)
}

function workloadStatus(w: native.NativeWorkloadEnd['workload']): WorkloadStatus | null {
  if (w == null) return null
  return {
    exitCode: w.exitCode ?? null,
    signal: w.signal ?? null,
    durationMs: w.durationMs,
    error: w.error == null ? null : { code: w.error.code, errno: w.error.errno, message: w.error.message, path: w.error.path ?? null },
  }
}

function workloadEnd(e: native.NativeWorkloadEnd): ExitStatus {
  const status: ExitStatus = { reason: e.reason as ExitStatus['reason'] }
  if (e.code != null) status.code = e.code
  if (e.message != null) status.message = e.message
  status.workload = workloadStatus(e.workload)
  return status
}

/** Where a `MicroVm` runs: one interface, so `MicroVm`'s methods never ask which. */
interface VmBackend {
  /** The console queue, for `console`. */
  readonly consoleSource: ConsoleSource
  /** The engine that runs it, for `engineInfo` (null: the built-in VMM in this process). */
  readonly engineInfo: EngineInfo | null
  wait(): Promise<ExitStatus>
  exitStatus(): ExitStatus | null
  consoleStats(): ConsoleStats
  timings(): Timings
  pause(): Promise<void>
  resume(): Promise<void>
  isPaused(): boolean
  /** Asks the VM to end on its own; resolves with whether the request went out. */
  requestStop(): Promise<boolean>
  /** Ends a VM that did not end in time after `requestStop`. */
  forceStop(): void
  kill(): void
  /** Signals the VM's program; `E_VM_STATE` where there is none. */
  signal(signal: number): Promise<boolean>
  snapshot(dir: string, options: SnapshotOptions): Promise<Snapshot>
}

/** `MicroVm.engineInfo`. */
export interface EngineInfo {
  engine: 'kvm' | 'qemu'
  engineReason: string
  /** QEMU's pid; null on the built-in VMM. */
  pid: number | null
}

/** A kernel on the built-in VMM, in this process. */
class NativeVm implements VmBackend {
  readonly engineInfo = null
  readonly #handle: native.NativeVmHandle

  constructor(handle: native.NativeVmHandle) {
    this.#handle = handle
  }

  get consoleSource(): ConsoleSource {
    return this.#handle
  }

  wait(): Promise<ExitStatus> {
    return this.#handle.wait()
  }

  exitStatus(): ExitStatus | null {
    return this.#handle.exitStatus()
  }

  consoleStats(): ConsoleStats {
    return this.#handle.consoleStats()
  }

  timings(): Timings {
    return this.#handle.timings()
  }

  pause(): Promise<void> {
    return this.#handle.pause()
  }

  async resume(): Promise<void> {
    this.#handle.resume()
  }

  isPaused(): boolean {
    return this.#handle.isPaused()
  }

  async requestStop(): Promise<boolean> {
    this.#handle.stop()
    return true
  }

  forceStop(): void {
    this.#handle.kill()
  }

  kill(): void {
    this.#handle.kill()
  }

  async signal(): Promise<boolean> {
    throw new MicrocellError('E_VM_STATE', 'only a workload VM (rootfs: { disk } + execPath) has a program to signal')
  }

  async snapshot(dir: string, options: SnapshotOptions): Promise<Snapshot> {
    return snapshotTaken(dir, await this.#handle.snapshot(dir, options.incremental === true))
  }
}

/** A workload VM (`rootfs: { disk }`) on a sandbox engine: its agent runs the program. */
class WorkloadVm implements VmBackend {
  readonly handle: native.NativeWorkloadHandle
  readonly #timings: Timings
  /** Why the status is missing (for `run()`), once the end is known. */
  missing: MicrocellError | null = null

  constructor(handle: native.NativeWorkloadHandle, startNs: bigint, runningNs: bigint) {
    this.handle = handle
    this.#timings = { startNs, firstExitNs: null, runningNs }
  }

  get consoleSource(): ConsoleSource {
    return this.handle
  }

  get engineInfo(): EngineInfo {
    const i = this.handle.info() as { engine: 'kvm' | 'qemu'; engineReason: string; pid?: number | null }
    return { engine: i.engine, engineReason: i.engineReason, pid: i.pid ?? null }
  }

  #map(e: native.NativeWorkloadEnd): ExitStatus {
    if (e.workload == null && e.workloadErrorCode != null) {
      this.missing = new MicrocellError(e.workloadErrorCode, e.workloadErrorMessage ?? 'the workload reported no status')
    }
    return workloadEnd(e)
  }

  async wait(): Promise<ExitStatus> {
    return this.#map(await this.handle.wait())
  }

  exitStatus(): ExitStatus | null {
    const e = this.handle.exitStatus()
    return e == null ? null : this.#map(e)
  }

  consoleStats(): ConsoleStats {
    return this.handle.consoleStats()
  }

  timings(): Timings {
    return this.#timings
  }

  pause(): Promise<void> {
    return this.handle.pause()
  }

  resume(): Promise<void> {
    return this.handle.resume()
  }

  isPaused(): boolean {
    return this.handle.isPaused()
  }

  /** SIGTERM to the program's process group; it waits for an agent still booting. */
  requestStop(): Promise<boolean> {
    return this.handle.signal(signalNumber('SIGTERM')).catch(() => false)
  }

  forceStop(): void {
    this.handle.stop()
  }

  kill(): void {
    this.handle.kill()
  }

  signal(signal: number): Promise<boolean> {
    return this.handle.signal(signal)
  }

  async snapshot(dir: string, options: SnapshotOptions): Promise<Snapshot> {
    if (options.incremental === true) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'a workload VM is snapshotted by its engine, whole: incremental snapshots are for VMs on the built-in VMM')
    }
    return workloadSnapshotTaken(dir, await this.handle.snapshot(dir))
  }
}

/** A running microVM. `await using vm = await MicroVm.start(...)` stops it at scope end. */
export class MicroVm implements AsyncDisposable {
  readonly #vm: VmBackend
  readonly #consoleEnabled: boolean
  #console: Readable | undefined
  #exit: Promise<ExitStatus> | undefined

  static {
    registerMicroVm({
      native: (handle, consoleEnabled) => new MicroVm(new NativeVm(handle), consoleEnabled),
      workload: (handle, startNs, consoleEnabled) =>
        new MicroVm(new WorkloadVm(handle, startNs, process.hrtime.bigint()), consoleEnabled),
    })
  }

  private constructor(vm: VmBackend, consoleEnabled: boolean) {
    this.#vm = vm
    this.#consoleEnabled = consoleEnabled
  }

  static builder(): MicroVmBuilder {
    return new MicroVmBuilder()
  }

  /** Validates a configuration; returns it normalised (what `build()` returns). */
  static validate(config: MicroVmConfigInput): MicroVmConfig {
    return JSON.parse(native.validateConfig(toJson(config))) as MicroVmConfig
  }

  /**
   * Validates and boots a configuration; resolves once the vCPUs run.
   *
   * With `rootfs: { disk }` (e.g. `defaultGuest()`) and `execPath`, the VM is a **workload VM**:
   * the guest platform's kernel boots on a sandbox engine (`options.engine`, default `auto`:
   * the built-in VMM where it boots Linux, else QEMU), its agent runs the program (with `args`,
   * `env`, `workdirPath`, `rlimits`; stdout and stderr on the console) and powers the VM off
   * when it ends; `wait()` then says how the program ended (`workload`). Otherwise the kernel
   * boots on the built-in VMM as before.
   *
   * `logLevel` other than `off` turns on the native side's logging to stderr, for the whole
   * process (the most verbose level asked for so far wins).
   */
  static async start(config: MicroVmConfigInput, options: StartOptions = {}): Promise<MicroVm> {
    const nativeOptions: { consoleStream: boolean; consoleQueueBytes?: number; trackDirtyPages?: boolean } =
      nativeConsoleOptions(options)
    if (options.trackDirtyPages === true) nativeOptions.trackDirtyPages = true
    const validated = MicroVm.validate(config)
    if (validated.logLevel !== 'off') native.setLogLevel(validated.logLevel)
    const rootfs = validated.rootfs
    if (rootfs !== undefined && 'disk' in rootfs) {
      const workloadOptions: { engine?: string; bootTimeoutMs?: number; consoleQueueBytes?: number } = {}
      if (options.engine !== undefined) workloadOptions.engine = options.engine
      if (nativeOptions.consoleQueueBytes !== undefined) workloadOptions.consoleQueueBytes = nativeOptions.consoleQueueBytes
      if (options.bootTimeoutMs !== undefined) {
        const t = options.bootTimeoutMs
        if (!Number.isInteger(t) || t < 1 || t > 2 ** 32 - 1) {
          throw new MicrocellError('E_INVALID_ARGUMENT', `bootTimeoutMs is ${String(t)}: give a whole number of milliseconds (default ${LIMITS.DEFAULT_BOOT_TIMEOUT_MS})`)
        }
        workloadOptions.bootTimeoutMs = t
      }
      prepareGuest({ kernel: validated.kernel, rootfs: rootfs.disk })
      const startNs = process.hrtime.bigint()
      const handle = await native.startWorkload(JSON.stringify(validated), workloadOptions)
      return new MicroVm(new WorkloadVm(handle, startNs, process.hrtime.bigint()), nativeOptions.consoleStream)
    }
    const handle = await native.startVm(JSON.stringify(validated), nativeOptions)
    return new MicroVm(new NativeVm(handle), nativeOptions.consoleStream)
  }

  /**
   * Runs a workload VM (`rootfs: { disk }` + `execPath`) to its end and resolves with how the
   * program ended: `{ exitCode, signal, durationMs, error: null }`. Rejects with a
   * `MicrocellError`: `E_CONFIG_*` (at validation), `ENOENT` / `EACCES` (the program does not
   * exist or cannot run; the message has the guest path), `E_AGENT_EXITED` (the VM ended before
   * the program's status was known), the engine's codes.
   */
  static async run(config: MicroVmConfigInput, options: RunOptions = {}): Promise<WorkloadStatus> {
    const { console: out, ...startOptions } = options
    const validated = MicroVm.validate(config)
    if (validated.rootfs === undefined || !('disk' in validated.rootfs) || validated.execPath === undefined) {
      throw new MicrocellError('E_CONFIG_MISSING', 'run() and build().start() are for workload VMs: give rootfs: { disk } (e.g. defaultGuest()) and execPath')
    }
    const vm = await MicroVm.start(validated, { ...startOptions, consoleStream: startOptions.consoleStream === true || out != null })
    const piped = out == null ? Promise.resolve() : new Promise<void>((resolve) => {
      vm.console.on('end', resolve).on('error', resolve).pipe(out as NodeJS.WritableStream, { end: false })
    })
    const exit = await vm.wait()
    await piped
    const status = exit.workload
    if (status == null) {
      throw (vm.#vm as WorkloadVm).missing ?? new MicrocellError('E_AGENT_EXITED', `the VM ended (${exit.reason}) before the workload's status was known`)
    }
    if (status.error !== null) {
      const e = status.error
      throw new MicrocellError(e.code, `the workload could not start: ${e.message}${e.path !== null ? ` (guest path ${e.path})` : ''}`)
    }
    return status
  }

  /**
   * For a workload VM: the engine that runs it, why (`auto: ...` or `asked for`) and QEMU's pid
   * (null on the built-in VMM); null for other VMs (they run on the built-in VMM, in this process).
   */
  get engineInfo(): EngineInfo | null {
    return this.#vm.engineInfo
  }

  /** Whether this is a workload VM (`rootfs: { disk }` + `execPath`). */
  get isWorkload(): boolean {
    return this.#vm instanceof WorkloadVm
  }

  /** A workload VM's program status once it has ended (null before, and for other VMs). */
  get workloadStatus(): WorkloadStatus | null {
    return this.exitStatus?.workload ?? null
  }

  /**
   * Resolves when the VM has ended and `console` (when it was used) has delivered its last byte:
   * after its 'end' while it is read, as a child process's 'close' (a console read in flowing
   * mode or by an async iterator must be read to its end). `consoleOutput` is complete too.
   */
  wait(): Promise<ExitStatus> {
    this.#exit ??= this.#vm.wait().then(async (e) => {
      await consoleDelivered(this.#console)
      return e
    })
    return this.#exit
  }

  /** How the VM ended, or null while it runs. */
  get exitStatus(): ExitStatus | null {
    return this.#vm.exitStatus()
  }

  /**
   * Asks the VM to stop and resolves when it has ended; kills it if it has not ended within
   * `timeoutMs` (default 10 s). A workload VM's program gets SIGTERM (its process group): when
   * it ends in time, the VM powers off as after any end of its program (`{ reason: 'reset',
   * workload: { signal: 'SIGTERM', ... } }`, or its exit code if it handled the signal); else
   * the VM is ended: `{ reason: 'stopped', workload: null }` (also when its agent was not up yet).
   */
  async stop(options: StopOptions = {}): Promise<ExitStatus> {
    const done = this.wait()
    if (this.exitStatus !== null) return done
    // A paused guest cannot end its program or power itself off.
    if (this.paused) await this.resume().catch(() => undefined)
    // A workload's agent may still be booting: the request waits for it, within the same limit.
    const ended = (async (): Promise<ExitStatus | 'not sent'> => ((await this.#vm.requestStop()) ? done : 'not sent'))()
    const first = await settledWithin(ended, options.timeoutMs ?? DEFAULT_STOP_TIMEOUT_MS)
    if (first !== 'timeout' && first !== 'not sent') return first
    this.#vm.forceStop()
    return done
  }

  /**
   * Sends a signal (`'SIGINT'`, `'SIGUSR1'`, a number) to a workload VM's program (its process
   * group); resolves with whether it went out (false: the agent is not up yet, or the program
   * has ended). Rejects with `E_VM_STATE` for a VM without a workload.
   */
  async signal(signal: NodeJS.Signals | number): Promise<boolean> {
    return this.#vm.signal(signalNumber(signal))
  }

  /** Ends the VM at once and resolves when it has ended. */
  kill(): Promise<ExitStatus> {
    const done = this.wait()
    this.#vm.kill()
    return done
  }

  /**
   * The guest console as a Node Readable (created on first access). Only for VMs started with
   * `{ consoleStream: true }`; otherwise throws `E_CONSOLE_NOT_ENABLED`.
   */
  get console(): Readable {
    if (!this.#consoleEnabled) {
      throw new MicrocellError(
        'E_CONSOLE_NOT_ENABLED',
        'this VM keeps no console stream: start it with { consoleStream: true } (or use consoleOutput for a file)',
      )
    }
    this.#console ??= consoleReadable(this.#vm.consoleSource)
    return this.#console
  }

  /** Counters of the console (bytes written, dropped for a slow reader, ...). */
  get consoleStats(): ConsoleStats {
    return this.#vm.consoleStats()
  }

  /**
   * CLOCK_MONOTONIC nanoseconds (compare with `process.hrtime.bigint()`). For a workload VM:
   * when `start()` began and returned (`firstExitNs` null: the engine does not say).
   */
  get timings(): Timings {
    return this.#vm.timings()
  }

  /**
   * Stops every vCPU outside the guest (a paused VM uses no CPU; a workload's program stops
   * with it); resolves once they have stopped. Rejects with `E_VM_STATE` when the VM has ended.
   */
  pause(): Promise<void> {
    return this.#vm.pause()
  }

  /** Lets a paused VM run again; nothing to do when it is not paused. */
  resume(): Promise<void> {
    return this.#vm.resume()
  }

  /** Whether the VM is paused (by `pause()`). */
  get paused(): boolean {
    return this.#vm.isPaused()
  }

  /**
   * Writes a snapshot of the VM to `dir` (created if needed): `vm.state`, `vm.mem` and copies of
   * writable disks. A running VM is paused for the duration and runs on afterwards; a paused one
   * stays paused. Resolves with the snapshot, loaded and ready to restore.
   *
   * `incremental: true` writes only the pages written since the last snapshot of (or restore
   * into) this VM; it needs a VM started with `{ trackDirtyPages: true }` (else `E_VM_STATE`).
   * Errors: `E_VM_STATE` (the VM has ended), `E_SNAPSHOT_IO` (the directory cannot be written).
   *
   * A workload VM is snapshotted by its engine (QEMU: a migration stream and a root disk copy;
   * the built-in VMM: its own files) with `sandbox.json` naming the workload: its restores run
   * the program on from where it was, on the same engine (not into `RestorePool` shells).
   */
  async snapshot(dir: string, options: SnapshotOptions = {}): Promise<Snapshot> {
    if (typeof dir !== 'string' || dir.length === 0) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'snapshot() needs a directory path (a non-empty string)')
    }
    return this.#vm.snapshot(dir, options)
  }

  /** Stops the VM (see `stop()`); nothing to do when it has already ended. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop()
  }
}

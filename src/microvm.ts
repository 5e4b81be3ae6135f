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
} from './config.js'
import { MicrocellError } from './errors.js'
import * as native from './internal/native.js'
import { snapshotTaken, type Snapshot, type SnapshotOptions } from './snapshot.js'

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

/** Checks `consoleQueueBytes` and returns the console options the addon takes. */
export function nativeConsoleOptions(options: {
  consoleStream?: boolean
  consoleQueueBytes?: number
}): { consoleStream: boolean; consoleQueueBytes?: number } {
  const nativeOptions: { consoleStream: boolean; consoleQueueBytes?: number } = {
    consoleStream: options.consoleStream === true,
  }
  const queue = options.consoleQueueBytes
  if (queue !== undefined) {
    if (!Number.isInteger(queue) || queue < 1 || queue > 2 ** 30) {
      throw new MicrocellError(
        'E_INVALID_ARGUMENT',
        `consoleQueueBytes is ${String(queue)}: give a whole number of bytes from 1 to 1073741824 (default 1 MiB)`,
      )
    }
    nativeOptions.consoleQueueBytes = queue
  }
  return nativeOptions
}

let wrapNative: (handle: native.NativeVmHandle, consoleEnabled: boolean) => MicroVm

/** A MicroVm around a VM the addon made (a start or a restore). Internal: not exported by index.ts. */
export function microVmFromNative(handle: native.NativeVmHandle, consoleEnabled: boolean): MicroVm {
  return wrapNative(handle, consoleEnabled)
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

  /** Root filesystem: a host directory (`"/path"` or `{ native }`) or `{ overlayfs: [lower, ..., upper] }`. */
  rootfs(rootfs: Rootfs | string): this {
    return this.#set('rootfs', typeof rootfs === 'string' ? { native: rootfs } : rootfs)
  }

  /** Number of vCPUs, 1 to 32 (default 1). */
  numVcpus(count: number): this {
    return this.#set('numVcpus', count)
  }

  /** Guest memory in MiB (default 512), at most the host's RAM. */
  memoryMib(mib: number): this {
    return this.#set('memoryMib', mib)
  }

  /** Host directories shared with the guest: `"host:guest"` or `"path"`. Replaces earlier ones. */
  mappedDirs(dirs: Iterable<string>): this {
    return this.#set('mappedDirs', [...dirs])
  }

  /** Forwarded ports: `"8080:80"` (host:guest) or `"3000"`. Replaces earlier ones. */
  portMap(ports: Iterable<string>): this {
    return this.#set('portMap', [...ports])
  }

  /** Network scope: none, group (default), public, any. */
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
    return this.#set('rlimits', [...limits])
  }

  /** Working directory of the guest process (absolute guest path). */
  workdirPath(path: string): this {
    return this.#set('workdirPath', path)
  }

  /** Program to run in the guest. */
  execPath(path: string): this {
    return this.#set('execPath', path)
  }

  /** Arguments of the program (argv[1..]). Replaces earlier ones. */
  args(args: Iterable<string>): this {
    return this.#set('args', [...args])
  }

  /** Environment: `["KEY=VALUE", ...]` or `{ KEY: 'VALUE' }`. Replaces earlier ones. */
  env(env: Iterable<string> | Record<string, string>): this {
    const list =
      typeof (env as Iterable<string>)[Symbol.iterator] === 'function'
        ? [...(env as Iterable<string>)]
        : Object.entries(env).map(([k, v]) => `${k}=${v}`)
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
   * Validates the configuration and returns it as plain JSON (defaults filled in). Throws a
   * `MicrocellError` with an `E_CONFIG_*` code.
   */
  build(): MicroVmConfig {
    return MicroVm.validate(this.#config)
  }

  /** `MicroVm.start(this.build(), options)`. */
  start(options: StartOptions = {}): Promise<MicroVm> {
    return MicroVm.start(this.#config, options)
  }
}

/** A running microVM. `await using vm = await MicroVm.start(...)` stops it at scope end. */
export class MicroVm implements AsyncDisposable {
  readonly #native: native.NativeVmHandle
  readonly #consoleEnabled: boolean
  #console: Readable | undefined
  #exit: Promise<ExitStatus> | undefined

  static {
    wrapNative = (handle, consoleEnabled) => new MicroVm(handle, consoleEnabled)
  }

  private constructor(handle: native.NativeVmHandle, consoleEnabled: boolean) {
    this.#native = handle
    this.#consoleEnabled = consoleEnabled
  }

  static builder(): MicroVmBuilder {
    return new MicroVmBuilder()
  }

  /** Validates a configuration; returns it normalised (what `build()` returns). */
  static validate(config: MicroVmConfigInput): MicroVmConfig {
    return JSON.parse(native.validateConfig(toJson(config))) as MicroVmConfig
  }

  /** Validates and boots a configuration; resolves once the vCPUs run. */
  static async start(config: MicroVmConfigInput, options: StartOptions = {}): Promise<MicroVm> {
    const nativeOptions: { consoleStream: boolean; consoleQueueBytes?: number; trackDirtyPages?: boolean } =
      nativeConsoleOptions(options)
    if (options.trackDirtyPages === true) nativeOptions.trackDirtyPages = true
    const handle = await native.startVm(toJson(config), nativeOptions)
    return new MicroVm(handle, nativeOptions.consoleStream)
  }

  /** Resolves when the VM has ended (the console and `consoleOutput` are complete by then). */
  wait(): Promise<ExitStatus> {
    this.#exit ??= this.#native.wait()
    return this.#exit
  }

  /** How the VM ended, or null while it runs. */
  get exitStatus(): ExitStatus | null {
    return this.#native.exitStatus()
  }

  /**
   * Asks the VM to stop and resolves when it has ended; kills it if it has not ended within
   * `timeoutMs` (default 10 s).
   */
  async stop(options: StopOptions = {}): Promise<ExitStatus> {
    const done = this.wait()
    if (this.#native.exitStatus() !== null) return done
    this.#native.stop()
    const timeoutMs = options.timeoutMs ?? 10_000
    let timer: NodeJS.Timeout | undefined
    const timedOut = new Promise<'timeout'>((resolve) => {
      timer = setTimeout(() => resolve('timeout'), timeoutMs)
      timer.unref()
    })
    try {
      const first = await Promise.race([done, timedOut])
      if (first !== 'timeout') return first
    } finally {
      clearTimeout(timer)
    }
    this.#native.kill()
    return done
  }

  /** Ends the VM at once and resolves when it has ended. */
  kill(): Promise<ExitStatus> {
    const done = this.wait()
    this.#native.kill()
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
    this.#console ??= consoleReadable(this.#native)
    return this.#console
  }

  /** Counters of the console (bytes written, dropped for a slow reader, ...). */
  get consoleStats(): ConsoleStats {
    return this.#native.consoleStats()
  }

  /** CLOCK_MONOTONIC nanoseconds (compare with `process.hrtime.bigint()`). */
  get timings(): Timings {
    return this.#native.timings()
  }

  /**
   * Stops every vCPU outside the guest (a paused VM uses no CPU); resolves once they have
   * stopped. Rejects with `E_VM_STATE` when the VM has ended.
   */
  pause(): Promise<void> {
    return this.#native.pause()
  }

  /** Lets a paused VM run again; nothing to do when it is not paused. */
  resume(): void {
    this.#native.resume()
  }

  /** Whether the VM is paused (by `pause()`). */
  get paused(): boolean {
    return this.#native.isPaused()
  }

  /**
   * Writes a snapshot of the VM to `dir` (created if needed): `vm.state`, `vm.mem` and copies of
   * writable disks. A running VM is paused for the duration and runs on afterwards; a paused one
   * stays paused. Resolves with the snapshot, loaded and ready to restore.
   *
   * `incremental: true` writes only the pages written since the last snapshot of (or restore
   * into) this VM; it needs a VM started with `{ trackDirtyPages: true }` (else `E_VM_STATE`).
   * Errors: `E_VM_STATE` (the VM has ended), `E_SNAPSHOT_IO` (the directory cannot be written).
   */
  async snapshot(dir: string, options: SnapshotOptions = {}): Promise<Snapshot> {
    if (typeof dir !== 'string' || dir.length === 0) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'snapshot() needs a directory path (a non-empty string)')
    }
    const bytes = await this.#native.snapshot(dir, options.incremental === true)
    return snapshotTaken(dir, bytes)
  }

  /** Stops the VM (see `stop()`); nothing to do when it has already ended. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop()
  }
}

function consoleReadable(handle: native.NativeVmHandle): Readable {
  return new Readable({
    read(size: number) {
      handle.readConsole(Math.max(size, 4096)).then(
        (chunk) => this.push(chunk),
        (err: unknown) => this.destroy(err as Error),
      )
    },
  })
}

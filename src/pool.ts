import type { ExitStatus, MicroVmConfigInput, StartOptions } from './config.js'
import { MicrocellError } from './errors.js'
import type * as native from './internal/native.js'
import { microVmFromNative } from './internal/vm-wrap.js'
import { MicroVm } from './microvm.js'
import { Sandbox, type SandboxConfig, type SandboxConfigInput } from './sandbox.js'
import { nativeRestoreOptions, nativeSnapshot, type RestoreOptions, type Snapshot } from './snapshot.js'

/** What a pool is doing, and has done. */
export interface PoolStats {
  /** How many the pool keeps ready. */
  size: number
  /** Ready now: empty VM shells (RestorePool), booted VMs (VmPool) or sandboxes (SandboxPool). */
  ready: number
  /** Being made in the background now. */
  filling: number
  /** `acquire()` calls that resolved with a VM. */
  acquired: number
  /** Acquired VMs that still run. */
  live: number
  /** `acquire()` calls that found nothing ready and made their VM from scratch. */
  misses: number
  /** Background fills that failed (each is retried after a growing pause, up to 5 s). */
  refillErrors: number
  /** The last background fill error, if any. */
  lastRefillError: MicrocellError | null
  /** VmPool, SandboxPool: ready ones that ended on their own before anyone acquired them (replaced). */
  expired: number
  /** `close()` was called. */
  closed: boolean
}

/** Options of `close()`. */
export interface PoolCloseOptions {
  /** Also kill the VMs acquired from the pool that still run (default false: they are their users'). */
  killAcquired?: boolean
}

const MAX_SIZE = 1024
const MAX_BACKOFF_MS = 5000

function checkCount(what: string, value: unknown, dflt: number, min: number): number {
  if (value === undefined) return dflt
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > MAX_SIZE) {
    throw new MicrocellError('E_INVALID_ARGUMENT', `${what} must be a whole number from ${min} to ${MAX_SIZE}, got ${String(value)}`)
  }
  return value
}

function closedError(): MicrocellError {
  return new MicrocellError('E_POOL_CLOSED', 'the pool is closed: make a new pool to acquire more VMs')
}

/** What a pool hands out: something that ends, and can be ended. */
interface Running {
  wait(): Promise<ExitStatus>
  kill(): Promise<ExitStatus>
}

/**
 * The machinery the pools share: `size` items kept ready, made `concurrency` at a time in the
 * background, a backoff after failures, the VMs (or sandboxes) handed out, each exactly once, and
 * their stats.
 */
abstract class WarmPool<T, Out extends Running = MicroVm> implements AsyncDisposable {
  readonly size: number
  readonly #concurrency: number
  readonly #ready: T[] = []
  #filling = 0
  #closed = false
  readonly #background = new Set<Promise<unknown>>()
  #errorsInRow = 0
  #backoff: NodeJS.Timeout | undefined
  readonly #live = new Set<Out>()
  readonly #handedOut = new WeakSet<Out>()
  readonly #waiters: { resolve: () => void; reject: (err: unknown) => void }[] = []
  readonly #stats = { acquired: 0, misses: 0, refillErrors: 0, expired: 0 }
  #lastRefillError: MicrocellError | null = null

  constructor(size: number, concurrency: number) {
    this.size = size
    this.#concurrency = concurrency
  }

  /** Makes one ready item (off the JS thread). */
  protected abstract make(): Promise<T>
  /** Frees a ready item nobody will use. */
  protected abstract dispose(item: T): Promise<void>

  /** Starts filling; subclasses call it at the end of their constructor. */
  protected start(): void {
    this.#pump()
  }

  /** Resolves once `size` items are ready; rejects on a fill error meanwhile, or `E_POOL_CLOSED`. */
  filled(): Promise<void> {
    if (this.#closed) return Promise.reject(closedError())
    if (this.#ready.length >= this.size) return Promise.resolve()
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }))
  }

  stats(): PoolStats {
    return {
      size: this.size,
      ready: this.#ready.length,
      filling: this.#filling,
      acquired: this.#stats.acquired,
      live: this.#live.size,
      misses: this.#stats.misses,
      refillErrors: this.#stats.refillErrors,
      lastRefillError: this.#lastRefillError,
      expired: this.#stats.expired,
      closed: this.#closed,
    }
  }

  protected checkOpen(): void {
    if (this.#closed) throw closedError()
  }

  /** The oldest ready item that `usable` accepts (others are dropped), or undefined: a miss. */
  protected take(usable: (item: T) => boolean = () => true): T | undefined {
    while (this.#ready.length > 0) {
      const item = this.#ready.shift()!
      if (usable(item)) return item
      this.#stats.expired++
    }
    this.#stats.misses++
    return undefined
  }

  /** A ready item that `usable` accepts, else one made now (a miss); refills either way. */
  protected async takeOrMake(usable: (item: T) => boolean): Promise<T> {
    const ready = this.take(usable)
    if (ready !== undefined) {
      this.refill()
      return ready
    }
    try {
      return await this.make()
    } finally {
      this.refill()
    }
  }

  /** Removes a ready item that went bad while waiting (VmPool: the VM ended); refills. */
  protected expire(item: T): void {
    const i = this.#ready.indexOf(item)
    if (i < 0) return
    this.#ready.splice(i, 1)
    this.#stats.expired++
    this.#pump()
  }

  /** Refill after an acquire took an item (called once its VM runs, so as not to slow it). */
  protected refill(): void {
    this.#pump()
  }

  /** Counts a VM handed out and follows it until it ends. */
  protected handOut(vm: Out): Out {
    this.#stats.acquired++
    this.#handedOut.add(vm)
    this.#live.add(vm)
    vm.wait().then(
      () => this.#live.delete(vm),
      () => this.#live.delete(vm),
    )
    return vm
  }

  /**
   * Ends a VM acquired from this pool (it is killed, never handed out again); resolves with how
   * it ended. `E_INVALID_ARGUMENT` for a VM this pool did not hand out.
   */
  async release(vm: Out): Promise<ExitStatus> {
    if (typeof vm !== 'object' || vm === null || !this.#handedOut.has(vm)) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'release() takes what was acquired from this pool')
    }
    return vm.kill()
  }

  #pump(): void {
    while (
      !this.#closed &&
      this.#backoff === undefined &&
      this.#filling < this.#concurrency &&
      this.#ready.length + this.#filling < this.size
    ) {
      this.#filling++
      const work = this.make().then(
        (item) => {
          this.#filling--
          this.#errorsInRow = 0
          if (this.#closed) return this.dispose(item)
          this.#ready.push(item)
          this.added(item)
          if (this.#ready.length >= this.size) this.#settleWaiters(null)
          this.#pump()
          return undefined
        },
        (err: unknown) => {
          this.#filling--
          this.#stats.refillErrors++
          const error =
            err instanceof MicrocellError ? err : new MicrocellError('E_INTERNAL', String(err), { cause: err })
          this.#lastRefillError = error
          this.#settleWaiters(error)
          if (this.#closed) return
          this.#errorsInRow++
          const delay = Math.min(MAX_BACKOFF_MS, 50 * 2 ** Math.min(this.#errorsInRow, 10))
          this.#backoff = setTimeout(() => {
            this.#backoff = undefined
            this.#pump()
          }, delay)
          this.#backoff.unref()
        },
      )
      this.#track(work)
    }
  }

  /** Hook: an item has become ready. */
  protected added(_item: T): void {}

  #track(p: Promise<unknown>): void {
    const tracked = p.catch(() => undefined)
    this.#background.add(tracked)
    void tracked.finally(() => this.#background.delete(tracked))
  }

  #settleWaiters(err: MicrocellError | null): void {
    const waiters = this.#waiters.splice(0)
    for (const w of waiters) {
      if (err) w.reject(err)
      else w.resolve()
    }
  }

  /**
   * Stops refilling, frees every ready item and resolves once background work has finished.
   * Later `acquire()` calls throw `E_POOL_CLOSED`. Acquired VMs run on unless
   * `{ killAcquired: true }`.
   */
  async close(options: PoolCloseOptions = {}): Promise<void> {
    if (!this.#closed) {
      this.#closed = true
      clearTimeout(this.#backoff)
      this.#backoff = undefined
      this.#settleWaiters(closedError())
      for (const item of this.#ready.splice(0)) this.#track(this.dispose(item))
    }
    if (options.killAcquired === true) {
      for (const vm of this.#live) this.#track(vm.kill())
    }
    while (this.#background.size > 0) await Promise.all([...this.#background])
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }
}

/** Options of `new RestorePool()`. */
export interface RestorePoolOptions {
  /** The snapshot every acquired VM is restored from. */
  snapshot: Snapshot
  /** Empty VM shells kept ready (default 4; 0 keeps none, so that every acquire is a miss). */
  size?: number
  /** Shells made at once in the background (default 1). */
  concurrency?: number
  /** Console options of every acquired VM; `acquire(options)` overrides them. */
  restoreOptions?: RestoreOptions
}

/**
 * Restores a snapshot fast: keeps `size` empty VM shells (a VM with its memory slots, irqchip,
 * PIT and vCPUs made, the slow part of a restore) ready, made off the JS thread, and refills
 * in the background after each `acquire()`. Every acquired VM is a fresh restore into a shell of
 * its own; `release(vm)` (or `vm.kill()`/`vm.stop()`) ends it — a VM is never handed out twice.
 *
 * ```ts
 * await using pool = new RestorePool({ snapshot, size: 8 })
 * await pool.filled()
 * const vm = await pool.acquire({ consoleStream: true })
 * ...
 * await pool.release(vm)
 * ```
 */
export class RestorePool extends WarmPool<native.NativeShellHandle> {
  readonly snapshot: Snapshot
  readonly #native: native.NativeSnapshotHandle
  readonly #defaults: RestoreOptions

  constructor(options: RestorePoolOptions) {
    const o = (options ?? {}) as Partial<RestorePoolOptions>
    const handle = nativeSnapshot(o.snapshot as Snapshot)
    super(checkCount('size', o.size, 4, 0), checkCount('concurrency', o.concurrency, 1, 1))
    this.snapshot = o.snapshot as Snapshot
    this.#native = handle
    this.#defaults = { ...(o.restoreOptions ?? {}) }
    nativeRestoreOptions(this.#defaults) // throws on a bad default now rather than at acquire
    this.start()
  }

  protected make(): Promise<native.NativeShellHandle> {
    return this.#native.createShell()
  }

  protected dispose(shell: native.NativeShellHandle): Promise<void> {
    return shell.destroy()
  }

  /**
   * A new VM restored from the snapshot, into a ready shell (or one made now when none is
   * ready: a miss). Resolves once its vCPUs run. `E_POOL_CLOSED` after `close()`.
   */
  async acquire(options: RestoreOptions = {}): Promise<MicroVm> {
    this.checkOpen()
    const nativeOptions = nativeRestoreOptions({ ...this.#defaults, ...options })
    const shell = this.take((s) => s.usable) ?? null
    let handle: native.NativeVmHandle
    try {
      handle = await this.#native.restore(shell, nativeOptions)
    } finally {
      this.refill()
    }
    return this.handOut(microVmFromNative(handle, nativeOptions.consoleStream === true))
  }
}

/** Options of `new VmPool()`. */
export interface VmPoolOptions {
  /** The configuration every VM boots (validated by the constructor: `E_CONFIG_*`). */
  config: MicroVmConfigInput
  /** Booted VMs kept ready (default 2). */
  size?: number
  /** VMs booted at once in the background (default 1). */
  concurrency?: number
  /** Start options of every VM (console stream, queue size, dirty tracking). */
  startOptions?: StartOptions
}

/**
 * Keeps `size` VMs booted from one configuration; `acquire()` hands one out (each exactly once)
 * and boots a replacement in the background. A ready VM that ends on its own before it is
 * acquired is dropped and replaced (`stats().expired`).
 */
export class VmPool extends WarmPool<MicroVm> {
  readonly config: MicroVmConfigInput
  readonly #startOptions: StartOptions

  constructor(options: VmPoolOptions) {
    const o = (options ?? {}) as Partial<VmPoolOptions>
    const config = MicroVm.validate(o.config ?? {})
    super(checkCount('size', o.size, 2, 0), checkCount('concurrency', o.concurrency, 1, 1))
    this.config = config
    this.#startOptions = { ...(o.startOptions ?? {}) }
    this.start()
  }

  protected make(): Promise<MicroVm> {
    return MicroVm.start(this.config, this.#startOptions)
  }

  protected async dispose(vm: MicroVm): Promise<void> {
    await vm.kill()
  }

  protected override added(vm: MicroVm): void {
    void vm.wait().then(() => this.expire(vm))
  }

  /** A booted VM (or one booted now when none is ready: a miss). `E_POOL_CLOSED` after `close()`. */
  async acquire(): Promise<MicroVm> {
    this.checkOpen()
    return this.handOut(await this.takeOrMake((vm) => vm.exitStatus === null))
  }
}

/** Options of `new SandboxPool()`: a configuration to create from, or a snapshot to restore. */
export interface SandboxPoolOptions {
  /** What every sandbox is created with (validated by the constructor: `E_CONFIG_*`). */
  config?: SandboxConfigInput
  /**
   * Or: a snapshot directory (`sandbox.snapshot(dir)`) every sandbox is restored from, each an
   * independent clone. Its configuration's `maxDurationMs`, if any, applies from `acquire()`.
   */
  snapshot?: string
  /**
   * With `snapshot`: the forwarded ports of each clone (`"HOST:GUEST[/udp]"`), asked for every
   * clone made: clones of a snapshot whose network forwards ports need host ports of their own.
   */
  ports?: () => string[]
  /** Sandboxes kept ready (default 2). */
  size?: number
  /** Sandboxes made at once in the background (default 1). */
  concurrency?: number
}

/**
 * Keeps `size` sandboxes up (created from `config`, or restored from `snapshot`) so that
 * `acquire()` hands one out at once, each exactly once, and makes a replacement in the
 * background: a request gets a ready sandbox of its own without waiting for a boot. A ready
 * sandbox that ends before it is acquired is replaced (`stats().expired`). `maxDurationMs`
 * counts from `acquire()`, not from when the sandbox was made. Ready sandboxes are listed by
 * `Sandbox.list()` like any other.
 */
export class SandboxPool extends WarmPool<Sandbox, Sandbox> {
  /** The configuration sandboxes are created with (null for a snapshot's pool). */
  readonly config: SandboxConfig | null
  readonly snapshot: string | null
  readonly #ports: (() => string[]) | undefined
  readonly #maxDurationMs: number | undefined

  constructor(options: SandboxPoolOptions) {
    const o = (options ?? {}) as Partial<SandboxPoolOptions>
    if ((o.config === undefined) === (o.snapshot === undefined)) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'new SandboxPool() takes a config or a snapshot directory, one of the two')
    }
    if (o.snapshot !== undefined && (typeof o.snapshot !== 'string' || o.snapshot === '')) {
      throw new MicrocellError('E_INVALID_ARGUMENT', `snapshot must be a snapshot directory, got ${String(o.snapshot)}`)
    }
    if (o.ports !== undefined && (typeof o.ports !== 'function' || o.snapshot === undefined)) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'ports is a function giving each clone of the snapshot its ports (with snapshot only; a config has its own)')
    }
    const config = o.config === undefined ? null : Sandbox.validate(o.config)
    super(checkCount('size', o.size, 2, 0), checkCount('concurrency', o.concurrency, 1, 1))
    this.config = config
    this.snapshot = o.snapshot ?? null
    this.#ports = o.ports
    this.#maxDurationMs = config?.maxDurationMs
    this.start()
  }

  protected make(): Promise<Sandbox> {
    if (this.config === null) return Sandbox.fromSnapshot(this.snapshot as string, this.#ports ? { ports: this.#ports() } : {})
    // The deadline starts at acquire(): made without it.
    const { maxDurationMs: _, ...config } = this.config
    return Sandbox.create(config)
  }

  protected async dispose(sandbox: Sandbox): Promise<void> {
    await sandbox.kill()
  }

  protected override added(sandbox: Sandbox): void {
    void sandbox.wait().then(() => this.expire(sandbox))
  }

  /**
   * A ready sandbox (or one made now when none is ready: a miss); its `maxDurationMs` starts
   * now. `E_POOL_CLOSED` after `close()`.
   */
  async acquire(): Promise<Sandbox> {
    this.checkOpen()
    const sandbox = await this.takeOrMake((sb) => sb.exitStatus === null)
    const ms = this.#maxDurationMs ?? sandbox.config.maxDurationMs
    if (ms !== undefined) sandbox.setMaxDuration(ms)
    return this.handOut(sandbox)
  }
}

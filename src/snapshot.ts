import { MicrocellError } from './errors.js'
import * as native from './internal/native.js'
import { nativeConsoleOptions } from './internal/console.js'
import { microVmFromNative, microVmFromWorkload } from './internal/vm-wrap.js'
import type { MicroVm } from './microvm.js'

/** Options of `vm.snapshot()`. */
export interface SnapshotOptions {
  /**
   * Write only the pages written since the last snapshot of (or restore into) this VM; the
   * result is a complete snapshot all the same. Needs a VM started with `{ trackDirtyPages: true }`.
   */
  incremental?: boolean
}

/** How a restored VM's console is set up (a snapshot keeps no console settings). */
export interface RestoreOptions {
  /** Keep the guest console for `vm.console` (a Node Readable). Default false. */
  consoleStream?: boolean
  /** Bytes the console keeps for a slow reader; the oldest are dropped beyond it (default 1 MiB). */
  consoleQueueBytes?: number
  /** Host file that receives the restored guest's console (created, or truncated). */
  consoleOutput?: string
}

/** Options of `snapshot.clone(n)`: each clone gets its own console. */
export interface CloneOptions {
  consoleStream?: boolean
  consoleQueueBytes?: number
  /** The console file of clone `index` (0 .. n-1); each clone needs a file of its own. */
  consoleOutput?: (index: number) => string
}

/** A disk of a snapshot's VM (writable ones are copies in the snapshot directory). */
export interface SnapshotDisk {
  path: string
  readOnly: boolean
}

/** The VM a snapshot was taken of (the VMM's view of the configuration). */
export interface SnapshotConfig {
  vcpus: number
  memoryMib: number
  kernel: string
  initrd: string | null
  cmdline: string
  blockDevices: SnapshotDisk[]
  controlChannel: boolean
  allowUnsupportedHost: boolean
  trackDirtyPages: boolean
}

/** The most clones one `clone()` call makes. */
const MAX_CLONES = 10_000

export function nativeRestoreOptions(options: RestoreOptions): native.NativeRestoreOptions {
  const out: native.NativeRestoreOptions = nativeConsoleOptions(options)
  if (options.consoleOutput !== undefined) {
    if (typeof options.consoleOutput !== 'string' || options.consoleOutput.length === 0) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'consoleOutput must be a file path (a non-empty string)')
    }
    out.consoleOutput = options.consoleOutput
  }
  return out
}

let construct: (handle: native.NativeSnapshotHandle, bytesWritten: number | null) => Snapshot
let constructWorkload: (dir: string, info: native.NativeSnapshotInfo) => Snapshot
const handles = new WeakMap<Snapshot, native.NativeSnapshotHandle>()

/**
 * A snapshot on disk, read and checked once (magic, format version, checksum, host CPU): restore
 * it any number of times. Every restored VM maps the snapshot's memory file privately, so clones
 * share its pages in the page cache and only the pages each one writes are its own.
 *
 * ```ts
 * const snap = await vm.snapshot('/tmp/snap')    // or: await Snapshot.load('/tmp/snap')
 * const clone = await snap.restore({ consoleStream: true })
 * const many = await snap.clone(5)
 * ```
 */
export class Snapshot {
  /** The snapshot directory (`vm.state`, `vm.mem`, disk copies; or the engine's files and `sandbox.json`). */
  readonly dir: string
  /**
   * `vm`: of a VM on the built-in VMM (restores map its memory file: pools, clones sharing the
   * page cache). `workload`: of a workload VM, by its engine (restores resume it there and its
   * program runs on; no pools).
   */
  readonly kind: 'vm' | 'workload'
  /** The VM it was taken of (a workload snapshot: its engine keeps the disk; `blockDevices` is empty). */
  readonly config: SnapshotConfig
  /** Memory bytes written when `vm.snapshot()` made it; null for `Snapshot.load()` and workload snapshots. */
  readonly bytesWritten: number | null
  /** For a workload snapshot: the engine that took it and restores it; null otherwise. */
  readonly engine: 'kvm' | 'qemu' | null

  static {
    construct = (handle, bytesWritten) => {
      const s = new Snapshot(handle.dir, 'vm', handle.config() as unknown as SnapshotConfig, bytesWritten, null)
      handles.set(s, handle)
      return s
    }
    constructWorkload = (dir, info) =>
      new Snapshot(
        dir,
        'workload',
        {
          vcpus: info.cpus,
          memoryMib: info.memoryMib,
          kernel: info.kernel,
          initrd: null,
          cmdline: info.cmdline,
          blockDevices: [],
          controlChannel: true,
          allowUnsupportedHost: false,
          trackDirtyPages: false,
        },
        null,
        info.engine,
      )
  }

  private constructor(
    dir: string,
    kind: 'vm' | 'workload',
    config: SnapshotConfig,
    bytesWritten: number | null,
    engine: 'kvm' | 'qemu' | null,
  ) {
    this.dir = dir
    this.kind = kind
    this.config = config
    this.bytesWritten = bytesWritten
    this.engine = engine
  }

  /**
   * Reads a snapshot directory. Errors: `E_SNAPSHOT_IO` (missing or unreadable files),
   * `E_SNAPSHOT_CORRUPT` (damaged or truncated), `E_SNAPSHOT_VERSION` (another format version),
   * `E_SNAPSHOT_HOST` (taken on a different host CPU).
   */
  static async load(dir: string): Promise<Snapshot> {
    if (typeof dir !== 'string' || dir.length === 0) {
      throw new MicrocellError('E_INVALID_ARGUMENT', 'Snapshot.load() needs a directory path (a non-empty string)')
    }
    const info = await native.snapshotInfo(dir)
    if (info?.kind === 'sandbox') {
      throw new MicrocellError('E_SNAPSHOT', `${dir} is a sandbox snapshot: restore it with Sandbox.fromSnapshot(dir)`)
    }
    if (info !== null) return constructWorkload(dir, info)
    return construct(await native.loadSnapshot(dir), null)
  }

  /**
   * Runs a new VM from the snapshot; resolves once its vCPUs run. Its `timings` count from the
   * restore: `firstExitNs` is the guest's first exit after it. A workload snapshot resumes on
   * its engine: the MicroVm is a workload VM whose program runs on from where it was.
   */
  async restore(options: RestoreOptions = {}): Promise<MicroVm> {
    const nativeOptions = nativeRestoreOptions(options)
    if (this.kind === 'workload') {
      const startNs = process.hrtime.bigint()
      const restoreOptions: { consoleOutput?: string; consoleQueueBytes?: number } = {}
      if (nativeOptions.consoleOutput !== undefined) restoreOptions.consoleOutput = nativeOptions.consoleOutput
      if (nativeOptions.consoleQueueBytes !== undefined) restoreOptions.consoleQueueBytes = nativeOptions.consoleQueueBytes
      const handle = await native.restoreWorkload(this.dir, restoreOptions)
      return microVmFromWorkload(handle, startNs, nativeOptions.consoleStream === true)
    }
    const snapshot = nativeSnapshot(this)
    try {
      return microVmFromNative(await snapshot.restore(null, nativeOptions), nativeOptions.consoleStream === true)
    } finally {
      // The next restore's shell, made once the caller has its VM (not while this one starts).
      setImmediate(() => snapshot.refillSpare())
    }
  }

  /**
   * `n` VMs restored from the snapshot at once, in index order. If any restore fails, the
   * others are killed and the first error is thrown.
   */
  async clone(n: number, options: CloneOptions = {}): Promise<MicroVm[]> {
    if (!Number.isInteger(n) || n < 1 || n > MAX_CLONES) {
      throw new MicrocellError('E_INVALID_ARGUMENT', `clone() needs a whole number of clones from 1 to ${MAX_CLONES}, got ${String(n)}`)
    }
    const { consoleOutput, ...rest } = options
    if (consoleOutput !== undefined && typeof consoleOutput !== 'function') {
      throw new MicrocellError(
        'E_INVALID_ARGUMENT',
        'clone() takes consoleOutput as a function (index) => path: each clone needs a file of its own',
      )
    }
    const perClone = Array.from({ length: n }, (_, i) => {
      const o: RestoreOptions = { ...rest }
      if (consoleOutput) o.consoleOutput = consoleOutput(i)
      nativeRestoreOptions(o) // throws on a bad option before any clone is made
      return o
    })
    const settled = await Promise.allSettled(perClone.map((o) => this.restore(o)))
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected')
    const vms = settled.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []))
    if (failed) {
      await Promise.all(vms.map((vm) => vm.kill()))
      throw failed.reason
    }
    return vms
  }
}

/** The addon's handle of a Snapshot (for the pools). Internal: not exported by index.ts. */
export function nativeSnapshot(snapshot: Snapshot): native.NativeSnapshotHandle {
  const handle = handles.get(snapshot)
  if (snapshot instanceof Snapshot && snapshot.kind === 'workload') {
    throw new MicrocellError(
      'E_INVALID_ARGUMENT',
      'a workload snapshot restores on its engine, not into VM shells of the built-in VMM: use snapshot.restore() or clone(n), not a RestorePool',
    )
  }
  if (!handle) {
    throw new MicrocellError('E_INVALID_ARGUMENT', 'not a Snapshot: get one from Snapshot.load() or vm.snapshot()')
  }
  return handle
}

/** The workload snapshot a workload VM's `snapshot()` just wrote, from what it says of it. Internal. */
export function workloadSnapshotTaken(dir: string, info: native.NativeSnapshotInfo): Snapshot {
  return constructWorkload(dir, info)
}

/** Loads the snapshot `vm.snapshot()` just wrote. Internal. */
export async function snapshotTaken(dir: string, bytesWritten: number): Promise<Snapshot> {
  return construct(await native.loadSnapshot(dir), bytesWritten)
}

/**
 * The ONLY file that loads the native addon (`native/index.js`, the loader `napi build`
 * generates). It loads it on first use, and turns every native error — whose message is
 * `"<CODE>: <message>"` by the addon's convention — into a `MicrocellError` with that code.
 */
import type * as Binding from '../../native/index.js'

import type { ConsoleStats, ExitReason, ExitStatus, Timings } from '../config.js'
import { MicrocellError } from '../errors.js'

type BindingModule = typeof Binding

let loaded: BindingModule | undefined

function binding(): BindingModule {
  if (loaded === undefined) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      loaded = require('../../native/index.js') as BindingModule
    } catch (err) {
      throw new MicrocellError(
        'E_NATIVE_LOAD',
        'the microcell native addon cannot be loaded: build it with `npm run build` ' +
          '(or install the microcell-linux-x64-gnu package); only x86_64 Linux with glibc is supported. ' +
          `Cause: ${err instanceof Error ? err.message : String(err)}`,
        { cause: err },
      )
    }
  }
  return loaded
}

// `E_*` codes, and the errno names of guest OS errors (`ENOENT`, `EACCES`, ...).
const CODED = /^(E_[A-Z0-9_]+|E[A-Z0-9]+): ([\s\S]*)$/

/** Turns anything the addon throws into a MicrocellError. */
export function toMicrocellError(err: unknown): MicrocellError {
  if (err instanceof MicrocellError) return err
  if (err instanceof Error) {
    const m = CODED.exec(err.message)
    if (m) return new MicrocellError(m[1]!, m[2]!, { cause: err })
    // napi's own argument checks (a number where a string belongs, ...).
    const napiCode = (err as { code?: unknown }).code
    if (napiCode === 'InvalidArg' || napiCode === 'NumberExpected' || napiCode === 'StringExpected' || napiCode === 'ObjectExpected') {
      return new MicrocellError('E_INVALID_ARGUMENT', err.message, { cause: err })
    }
    return new MicrocellError('E_INTERNAL', err.message, { cause: err })
  }
  return new MicrocellError('E_INTERNAL', String(err))
}

function call<T>(f: () => T): T {
  try {
    return f()
  } catch (err) {
    throw toMicrocellError(err)
  }
}

async function callAsync<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f()
  } catch (err) {
    throw toMicrocellError(err)
  }
}

function exitStatus(info: Binding.ExitInfo): ExitStatus {
  const status: ExitStatus = { reason: info.reason as ExitReason }
  if (info.code != null) status.code = info.code
  if (info.message != null) status.message = info.message
  return status
}

/** A running VM in the addon, with errors mapped. */
/** The addon's console counters as the public `ConsoleStats` (no `fileError` key unless set). */
function consoleStats(s: Binding.ConsoleStats): ConsoleStats {
  const stats: ConsoleStats = {
    totalBytes: s.totalBytes,
    droppedBytes: s.droppedBytes,
    queuedBytes: s.queuedBytes,
    closed: s.closed,
  }
  if (s.fileError != null) stats.fileError = s.fileError
  return stats
}

export class NativeVmHandle {
  readonly #vm: Binding.NativeVm

  constructor(vm: Binding.NativeVm) {
    this.#vm = vm
  }

  async wait(): Promise<ExitStatus> {
    return exitStatus(await callAsync(() => this.#vm.wait()))
  }

  exitStatus(): ExitStatus | null {
    const info = call(() => this.#vm.exitStatus())
    return info == null ? null : exitStatus(info)
  }

  stop(): void {
    call(() => this.#vm.stop())
  }

  kill(): void {
    call(() => this.#vm.kill())
  }

  /** Next console bytes, or null at the end of the stream. */
  readConsole(maxBytes?: number): Promise<Buffer | null> {
    return callAsync(() => this.#vm.readConsole(maxBytes))
  }

  consoleStats(): ConsoleStats {
    return consoleStats(call(() => this.#vm.consoleStats()))
  }

  timings(): Timings {
    const t = call(() => this.#vm.timings())
    return { startNs: t.startNs, firstExitNs: t.firstExitNs ?? null, runningNs: t.runningNs }
  }

  pause(): Promise<void> {
    return callAsync(() => this.#vm.pause())
  }

  resume(): void {
    call(() => this.#vm.resume())
  }

  isPaused(): boolean {
    return call(() => this.#vm.isPaused())
  }

  /** Writes a snapshot to `dir`; resolves with the memory bytes written. */
  snapshot(dir: string, incremental: boolean): Promise<number> {
    return callAsync(() => this.#vm.snapshot(dir, incremental))
  }
}

/** An empty VM made for one snapshot's shape, used up by one restore. */
export class NativeShellHandle {
  readonly #shell: Binding.NativeShell

  constructor(shell: Binding.NativeShell) {
    this.#shell = shell
  }

  get raw(): Binding.NativeShell {
    return this.#shell
  }

  get usable(): boolean {
    return call(() => this.#shell.usable)
  }

  /** Frees it; resolves when it is gone (torn down off the JS thread). */
  destroy(): Promise<void> {
    return callAsync(() => this.#shell.destroy())
  }
}

export interface NativeRestoreOptions {
  consoleStream?: boolean
  consoleQueueBytes?: number
  consoleOutput?: string
}

/** A loaded snapshot in the addon, with errors mapped. */
export class NativeSnapshotHandle {
  readonly #snapshot: Binding.NativeSnapshot

  constructor(snapshot: Binding.NativeSnapshot) {
    this.#snapshot = snapshot
  }

  get dir(): string {
    return call(() => this.#snapshot.dir)
  }

  config(): Record<string, unknown> {
    return call(() => this.#snapshot.config())
  }

  async createShell(): Promise<NativeShellHandle> {
    return new NativeShellHandle(await callAsync(() => this.#snapshot.createShell()))
  }

  async restore(shell: NativeShellHandle | null, options: NativeRestoreOptions): Promise<NativeVmHandle> {
    return new NativeVmHandle(await callAsync(() => this.#snapshot.restore(shell?.raw ?? null, options)))
  }

  /** Makes the spare shell for the next plain restore, in the background. */
  refillSpare(): void {
    call(() => this.#snapshot.refillSpare())
  }
}

export async function loadSnapshot(dir: string): Promise<NativeSnapshotHandle> {
  return new NativeSnapshotHandle(await callAsync(() => binding().loadSnapshot(dir)))
}

/** Validates a config JSON; returns it normalised (defaults filled in). */
export function validateConfig(json: string): string {
  return call(() => binding().validateConfig(json))
}

export function hostInfo(): Record<string, unknown> {
  return call(() => binding().hostInfo())
}

export async function startVm(
  json: string,
  options: { consoleStream?: boolean; consoleQueueBytes?: number; trackDirtyPages?: boolean },
): Promise<NativeVmHandle> {
  const vm = await callAsync(() => binding().startVm(json, options))
  return new NativeVmHandle(vm)
}

/** A sandbox in the addon (the guest agent was ready), with errors mapped. */
export class NativeSandboxHandle {
  readonly #sandbox: Binding.NativeSandbox

  constructor(sandbox: Binding.NativeSandbox) {
    this.#sandbox = sandbox
  }

  /** The addon object (for `NativeSandboxOps`). */
  get raw(): Binding.NativeSandbox {
    return this.#sandbox
  }

  info(): Record<string, unknown> {
    return call(() => this.#sandbox.info())
  }

  config(): string {
    return call(() => this.#sandbox.config())
  }

  /** Poweroff, then kill after `timeoutMs`; resolves with how the VM ended. */
  async stop(timeoutMs: number): Promise<ExitStatus> {
    return exitStatus(await callAsync(() => this.#sandbox.stop(timeoutMs)))
  }

  kill(): void {
    call(() => this.#sandbox.kill())
  }

  async wait(): Promise<ExitStatus> {
    return exitStatus(await callAsync(() => this.#sandbox.wait()))
  }

  exitStatus(): ExitStatus | null {
    const info = call(() => this.#sandbox.exitStatus())
    return info == null ? null : exitStatus(info)
  }

  /** Next console bytes, or null at the end of the stream. */
  readConsole(maxBytes?: number): Promise<Buffer | null> {
    return callAsync(() => this.#sandbox.readConsole(maxBytes))
  }

  consoleStats(): ConsoleStats {
    return consoleStats(call(() => this.#sandbox.consoleStats()))
  }

  consoleTail(): string {
    return call(() => this.#sandbox.consoleTail())
  }

  /** Writes a snapshot of the sandbox into `dir`; the sandbox runs on (or stays paused). */
  snapshot(dir: string): Promise<void> {
    return callAsync(() => this.#sandbox.snapshot(dir))
  }

  pause(): Promise<void> {
    return callAsync(() => this.#sandbox.pause())
  }

  resume(): Promise<void> {
    return callAsync(() => this.#sandbox.resume())
  }

  isPaused(): boolean {
    return call(() => this.#sandbox.isPaused())
  }

  /** The network in force (JSON), or null. */
  network(): string | null {
    return call(() => this.#sandbox.network()) ?? null
  }

  /** Changes the network policy (JSON); resolves with the network in force (JSON). */
  updateNetwork(updateJson: string): Promise<string> {
    return callAsync(() => this.#sandbox.updateNetwork(updateJson))
  }
}

/** Starts a sandbox from a snapshot directory; resolves once its agent answers. */
export async function restoreSandbox(dir: string, consoleOutput?: string, ports?: string[]): Promise<NativeSandboxHandle> {
  return new NativeSandboxHandle(await callAsync(() => binding().restoreSandbox(dir, consoleOutput, ports)))
}

/** Validates a SandboxConfig JSON; returns it normalised (defaults filled in). */
export function validateSandboxConfig(json: string): string {
  return call(() => binding().validateSandboxConfig(json))
}

/** What `engine: 'auto'` picks here and why; whether QEMU is there. */
export function engineInfo(): Record<string, unknown> {
  return call(() => binding().engineInfo())
}

/** Boots a sandbox; resolves once its agent is ready. */
export async function createSandbox(json: string): Promise<NativeSandboxHandle> {
  return new NativeSandboxHandle(await callAsync(() => binding().createSandbox(json)))
}

// ---- exec, files, workloads ----

export type NativeExecExit = Binding.ExecExitInfo
export type NativeExecEvent = Binding.ExecEventInfo
export type NativeGuestStat = Binding.GuestStat
export type NativeGuestDirEntry = Binding.GuestDirEntry
export type NativeCopyInfo = Binding.CopyInfo
export type NativeWorkloadEnd = Binding.WorkloadEnd

/** A running process in a sandbox, with errors mapped. */
export class NativeExecHandle {
  readonly #exec: Binding.NativeExec

  constructor(exec: Binding.NativeExec) {
    this.#exec = exec
  }

  get pid(): number {
    return call(() => this.#exec.pid)
  }

  /** The next event, or null after the exit. One call at a time. */
  nextEvent(): Promise<NativeExecEvent | null> {
    return callAsync(() => this.#exec.nextEvent())
  }

  exitStatus(): NativeExecExit | null {
    return call(() => this.#exec.exitStatus())
  }

  writeStdin(data: Buffer): Promise<void> {
    return callAsync(() => this.#exec.writeStdin(data))
  }

  closeStdin(): Promise<void> {
    return callAsync(() => this.#exec.closeStdin())
  }

  signal(name: string): Promise<void> {
    return callAsync(() => this.#exec.signal(name))
  }

  kill(): Promise<void> {
    return callAsync(() => this.#exec.kill())
  }

  resize(rows: number, cols: number): Promise<void> {
    return callAsync(() => this.#exec.resize(rows, cols))
  }

  /** [now, peak] output bytes buffered on the host. */
  bufferedBytes(): number[] {
    return call(() => this.#exec.bufferedBytes())
  }
}

/** A guest file being read, with errors mapped. */
export class NativeFileReaderHandle {
  readonly #reader: Binding.NativeFileReader

  constructor(reader: Binding.NativeFileReader) {
    this.#reader = reader
  }

  /** The next chunk, or null at the end. One call at a time. */
  readChunk(): Promise<Buffer | null> {
    return callAsync(() => this.#reader.readChunk())
  }
}

/** A guest file being written, with errors mapped. */
export class NativeFileWriterHandle {
  readonly #writer: Binding.NativeFileWriter

  constructor(writer: Binding.NativeFileWriter) {
    this.#writer = writer
  }

  write(data: Buffer): Promise<void> {
    return callAsync(() => this.#writer.write(data))
  }

  finish(): Promise<void> {
    return callAsync(() => this.#writer.finish())
  }
}

export interface NativeWriteOptions {
  mode?: number
  append?: boolean
  parents?: boolean
}

export interface NativeCopyToHostOptions {
  keepSetuid?: boolean
  maxBytes?: number
}

/** The exec and file calls of a sandbox (the same addon object as `NativeSandboxHandle`). */
export class NativeSandboxOps {
  readonly #sandbox: Binding.NativeSandbox

  constructor(handle: NativeSandboxHandle) {
    this.#sandbox = handle.raw
  }

  async execStart(requestJson: string): Promise<NativeExecHandle> {
    return new NativeExecHandle(await callAsync(() => this.#sandbox.execStart(requestJson)))
  }

  execCollect(requestJson: string, stdin: Buffer | null, maxOutputBytes: number | undefined): Promise<Binding.ExecCollected> {
    return callAsync(() => this.#sandbox.execCollect(requestJson, stdin, maxOutputBytes))
  }

  stat(path: string, follow: boolean): Promise<NativeGuestStat> {
    return callAsync(() => this.#sandbox.fsStat(path, follow))
  }

  exists(path: string): Promise<boolean> {
    return callAsync(() => this.#sandbox.fsExists(path))
  }

  list(path: string): Promise<NativeGuestDirEntry[]> {
    return callAsync(() => this.#sandbox.fsList(path))
  }

  mkdir(path: string, mode: number, parents: boolean): Promise<void> {
    return callAsync(() => this.#sandbox.fsMkdir(path, mode, parents))
  }

  remove(path: string, recursive: boolean): Promise<void> {
    return callAsync(() => this.#sandbox.fsRemove(path, recursive))
  }

  rename(from: string, to: string): Promise<void> {
    return callAsync(() => this.#sandbox.fsRename(from, to))
  }

  read(path: string, maxBytes: number | undefined): Promise<Buffer> {
    return callAsync(() => this.#sandbox.fsRead(path, maxBytes))
  }

  write(path: string, data: Buffer, o: NativeWriteOptions): Promise<void> {
    return callAsync(() => this.#sandbox.fsWrite(path, data, o.mode, o.append, o.parents))
  }

  async openRead(path: string, offset: number, length: number | undefined): Promise<NativeFileReaderHandle> {
    return new NativeFileReaderHandle(await callAsync(() => this.#sandbox.fsOpenRead(path, offset, length)))
  }

  async watch(path: string, recursive: boolean): Promise<NativeWatchHandle> {
    return new NativeWatchHandle(await callAsync(() => this.#sandbox.fsWatch(path, recursive)))
  }

  async openWrite(path: string, o: NativeWriteOptions): Promise<NativeFileWriterHandle> {
    return new NativeFileWriterHandle(await callAsync(() => this.#sandbox.fsOpenWrite(path, o.mode, o.append, o.parents)))
  }

  copyFromHost(host: string, guest: string): Promise<NativeCopyInfo> {
    return callAsync(() => this.#sandbox.fsCopyFromHost(host, guest))
  }

  copyToHost(guest: string, host: string, o: NativeCopyToHostOptions): Promise<NativeCopyInfo> {
    return callAsync(() => this.#sandbox.fsCopyToHost(guest, host, o.keepSetuid, o.maxBytes))
  }
}

/** A watch on a guest directory, with errors mapped. */
export class NativeWatchHandle {
  readonly #watch: Binding.NativeWatch

  constructor(watch: Binding.NativeWatch) {
    this.#watch = watch
  }

  next(): Promise<Binding.WatchChangeInfo | null> {
    return callAsync(() => this.#watch.next())
  }

  close(): void {
    call(() => this.#watch.close())
  }
}

/** A VM running its workload on the guest platform, with errors mapped. */
export class NativeWorkloadHandle {
  readonly #workload: Binding.NativeWorkload

  constructor(workload: Binding.NativeWorkload) {
    this.#workload = workload
  }

  info(): Record<string, unknown> {
    return call(() => this.#workload.info())
  }

  wait(): Promise<NativeWorkloadEnd> {
    return callAsync(() => this.#workload.wait())
  }

  exitStatus(): NativeWorkloadEnd | null {
    return call(() => this.#workload.exitStatus())
  }

  signal(signal: number): Promise<boolean> {
    return callAsync(() => this.#workload.signal(signal))
  }

  async snapshot(dir: string): Promise<NativeSnapshotInfo> {
    return (await callAsync(() => this.#workload.snapshot(dir))) as unknown as NativeSnapshotInfo
  }

  pause(): Promise<void> {
    return callAsync(() => this.#workload.pause())
  }

  resume(): Promise<void> {
    return callAsync(() => this.#workload.resume())
  }

  isPaused(): boolean {
    return call(() => this.#workload.isPaused())
  }

  stop(): void {
    call(() => this.#workload.stop())
  }

  kill(): void {
    call(() => this.#workload.kill())
  }

  readConsole(maxBytes?: number): Promise<Buffer | null> {
    return callAsync(() => this.#workload.readConsole(maxBytes))
  }

  consoleStats(): ConsoleStats {
    return consoleStats(call(() => this.#workload.consoleStats()))
  }
}

export async function startWorkload(
  json: string,
  options: { engine?: string; bootTimeoutMs?: number; consoleQueueBytes?: number },
): Promise<NativeWorkloadHandle> {
  return new NativeWorkloadHandle(await callAsync(() => binding().startWorkload(json, options)))
}

export async function restoreWorkload(
  dir: string,
  options: { consoleOutput?: string; consoleQueueBytes?: number },
): Promise<NativeWorkloadHandle> {
  return new NativeWorkloadHandle(await callAsync(() => binding().restoreWorkload(dir, options)))
}

/** What a snapshot directory's sandbox.json says, or null (a built-in VMM snapshot). */
export interface NativeSnapshotInfo {
  kind: 'sandbox' | 'workload'
  engine: 'kvm' | 'qemu'
  memoryMib: number
  cpus: number
  kernel: string
  rootfs: string
  cmdline: string
}

export async function snapshotInfo(dir: string): Promise<NativeSnapshotInfo | null> {
  return (await callAsync(() => binding().snapshotInfo(dir))) as unknown as NativeSnapshotInfo | null
}

/** Raises the native log level (process-wide); returns the level in effect. */
export function setLogLevel(level: string): string {
  return call(() => binding().setLogLevel(level))
}

/** Where the default guest images are looked for, and where each comes from. */
export function guestImages(): {
  kernel: string
  rootfs: string
  cacheDir: string
  kernelSource: string
  rootfsSource: string
} {
  return call(() => binding().guestImages())
}

/** Registers the unpacked images of the installed guest package (both null: forgets them). */
export function setPackagedGuest(kernel: string | null, rootfs: string | null): void {
  call(() => binding().setPackagedGuest(kernel ?? undefined, rootfs ?? undefined))
}

/**
 * microcell: microVM sandboxes for running untrusted code, from Node.js.
 *
 * ```ts
 * import { Sandbox } from 'microcell'
 * await using sb = await Sandbox.builder('demo').memory(512).create() // the guest agent is ready
 * console.log(sb.info.engine, sb.info.kernelRelease, sb.info.bootMs)
 * const r = await sb.exec('uname', ['-a']) // { exitCode: 0, stdout: Buffer, stderr: Buffer, ... }
 * console.log(r.stdoutText())
 * await sb.fs.write('/tmp/hello.txt', 'hi')
 *
 * import { MicroVm } from 'microcell'
 * const vm = await MicroVm.builder().kernel('guest.elf').memoryMib(256).start({ consoleStream: true })
 * vm.console.pipe(process.stdout)
 * console.log(await vm.wait()) // { reason: 'reset' }
 * ```
 */
export { MicroVm, MicroVmBuilder } from './microvm.js'
export type { BuiltMicroVmConfig, EngineInfo, RunOptions, StopOptions } from './microvm.js'
export { defaultGuest, guestImages } from './guest.js'
export type { GuestImages, GuestImageSource, GuestPackageInfo } from './guest.js'
export { ExecProcess, ExecResult } from './exec.js'
export type { ExecEvent, ExecExit, ExecOptions } from './exec.js'
export { FsWatcher, SandboxFs } from './fs.js'
export type { CopyStats, CopyToHostOptions, GuestDirEntry, GuestStat, ReadFileOptions, ReadStreamOptions, WatchChange, WriteFileOptions } from './fs.js'
export { setLogLevel } from './logging.js'
export type { MetricsOptions, SandboxMetrics } from './metrics.js'
export { Snapshot } from './snapshot.js'
export type { CloneOptions, RestoreOptions, SnapshotConfig, SnapshotDisk, SnapshotOptions } from './snapshot.js'
export { RestorePool, SandboxPool, VmPool } from './pool.js'
export type { PoolCloseOptions, PoolStats, RestorePoolOptions, SandboxPoolOptions, VmPoolOptions } from './pool.js'
export { Sandbox, SandboxBuilder } from './sandbox.js'
export type { NetworkConfig, NetworkUpdate, SandboxConfig, Volume, SandboxConfigInput, SandboxEngine, SandboxInfo, SandboxRunOptions, SandboxStopOptions } from './sandbox.js'
export { hostInfo } from './host.js'
export type { HostInfo } from './host.js'
export { MicrocellError, CONFIG_ERROR_CODES, SANDBOX_ERROR_CODES, VMM_ERROR_CODES } from './errors.js'
export type { ConfigErrorCode, SandboxErrorCode, VmmErrorCode } from './errors.js'
export type {
  ConsoleStats,
  ExitReason,
  ExitStatus,
  LogLevel,
  MicroVmConfig,
  MicroVmConfigInput,
  NetworkScope,
  Rootfs,
  StartOptions,
  Timings,
  WorkloadError,
  WorkloadStatus,
} from './config.js'

/**
 * The public API of the `microcell` package (the declarations tsc emits from src/ into dist/).
 * Everything a user may import from 'microcell' is listed here; nothing else is public.
 */
export {
  MicroVm,
  MicroVmBuilder,
  Snapshot,
  RestorePool,
  VmPool,
  hostInfo,
  MicrocellError,
  CONFIG_ERROR_CODES,
} from './dist/index.js'
export type {
  StopOptions,
  SnapshotOptions,
  RestoreOptions,
  CloneOptions,
  SnapshotConfig,
  SnapshotDisk,
  RestorePoolOptions,
  VmPoolOptions,
  PoolStats,
  PoolCloseOptions,
  HostInfo,
  ConfigErrorCode,
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
} from './dist/index.js'

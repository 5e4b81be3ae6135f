/** Types of the launch configuration: the plain JSON that `MicroVm.builder().build()` returns. */

export type LogLevel = 'off' | 'error' | 'warn' | 'info' | 'debug' | 'trace'

/**
 * The guest's root filesystem: one host directory, or overlay layers (lowest first) — both
 * validated and kept for a later device — or `{ disk }`: a root disk image of the guest
 * platform (raw ext4 with the microcell agent, e.g. `defaultGuest()`), which boots on a sandbox
 * engine and runs `execPath` as the VM's workload.
 */
export type Rootfs = { native: string } | { overlayfs: string[] } | { disk: string }

/**
 * Which addresses the guest may talk to: `none`, `group` (its subnet; the default), `public`
 * (non-private addresses), `any`.
 */
export type NetworkScope = 'none' | 'group' | 'public' | 'any'

/** A validated configuration, defaults filled in (what `build()` returns). */
export interface MicroVmConfig {
  logLevel: LogLevel
  rootfs?: Rootfs
  /** 1..=32, default 1. */
  numVcpus: number
  /** Guest RAM in MiB, default 512, at most the host's RAM. */
  memoryMib: number
  /** `"host:guest"` or `"path"` (the same path on both sides). */
  mappedDirs?: string[]
  /** `"8080:80"` (host:guest) or `"3000"`. */
  portMap?: string[]
  scope: NetworkScope
  /** IPv4 address of the guest, e.g. `"192.168.1.100"`. */
  ip?: string
  /** CIDR, e.g. `"192.168.1.0/24"`. */
  subnet?: string
  /** `"RLIMIT_NOFILE=1024:1024"` (soft:hard), `"RLIMIT_CORE=0"`, `unlimited` allowed. */
  rlimits?: string[]
  workdirPath?: string
  execPath?: string
  args?: string[]
  /** `"KEY=VALUE"`. */
  env?: string[]
  /** Host file that receives the guest console (created, or truncated). */
  consoleOutput?: string
  /** Guest kernel: ELF vmlinux (with or without a PVH note) or bzImage. */
  kernel?: string
  initrd?: string
  /** Kernel command line, used exactly as given (the VMM's default when absent). */
  cmdline?: string
  /** Start even where the host's KVM cannot run the guest well (e.g. Linux on PVM). */
  allowUnsupportedHost: boolean
}

/** What `MicroVm.start()` accepts: a built config, or any part of one (defaults apply). */
export type MicroVmConfigInput = Partial<MicroVmConfig>

export interface StartOptions {
  /**
   * For a workload VM (`rootfs: { disk }`): the engine that boots it — `auto` (default: the
   * built-in VMM where it boots Linux, else QEMU), `kvm` or `qemu`.
   */
  engine?: 'auto' | 'kvm' | 'qemu'
  /** For a workload VM: how long the guest agent has to come up (default 30000 ms). */
  bootTimeoutMs?: number
  /** Keep the guest console for `vm.console` (a Node Readable). Default false. */
  consoleStream?: boolean
  /** Bytes the console keeps for a slow reader; the oldest are dropped beyond it (default 1 MiB). */
  consoleQueueBytes?: number
  /**
   * Log the pages the guest writes, so that `vm.snapshot(dir, { incremental: true })` writes
   * only those (default false: a little slower guest writes, for much smaller later snapshots).
   */
  trackDirtyPages?: boolean
}

export type ExitReason = 'reset' | 'stopped' | 'killed' | 'crashed'

/** Why a workload could not start (then it has no exit code). */
export interface WorkloadError {
  /** `ENOENT`, `EACCES`, ... (`E_WORKLOAD` for an errno without a name). */
  code: string
  errno: number
  message: string
  /** The guest path it concerns. */
  path: string | null
}

/** How a MicroVm's workload (`execPath`) ended. */
export interface WorkloadStatus {
  /** Its exit code, or null when a signal killed it (or it could not start). */
  exitCode: number | null
  /** The signal that killed it (`'SIGKILL'`, ...), or null. */
  signal: string | null
  /** From spawn to exit, measured in the guest. */
  durationMs: number
  /** Why it could not start, or null. */
  error: WorkloadError | null
}

/** How a VM ended. `code`/`message` are set for `crashed` (e.g. `E_GUEST_TRIPLE_FAULT`). */
export interface ExitStatus {
  reason: ExitReason
  code?: string
  message?: string
  /**
   * Workload VMs (`rootfs: { disk }` + `execPath`) only: how the program ended, or null when
   * the VM ended before that was known (`stop()`, `kill()`, a crash).
   */
  workload?: WorkloadStatus | null
}

/** CLOCK_MONOTONIC nanoseconds, the clock of `process.hrtime.bigint()`. */
export interface Timings {
  /** When the VMM began starting the VM. */
  startNs: bigint
  /** The first exit of a vCPU to the VMM (null until there has been one). */
  firstExitNs: bigint | null
  /** When the start returned with the vCPUs running. */
  runningNs: bigint
}

export interface ConsoleStats {
  /** Bytes the guest wrote to its console. */
  totalBytes: number
  /** Bytes dropped because the reader fell behind (the file still got them). */
  droppedBytes: number
  queuedBytes: number
  closed: boolean
  /** Why writing `consoleOutput` stopped, if it did. */
  fileError?: string
}

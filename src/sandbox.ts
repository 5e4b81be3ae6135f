import { Readable } from 'node:stream'

import type { ConsoleStats, ExitStatus } from './config.js'
import { MicrocellError } from './errors.js'
import { configTypeError, plainObject, string, stringList, stringRecord } from './internal/check.js'
import { ExecProcess, ExecResult, execRequest, exitFromNative, feedStdin, splitArgs, type ExecOptions } from './exec.js'
import { SandboxFs } from './fs.js'
import { prepareGuest } from './guest.js'
import { consoleDelivered, consoleReadable } from './internal/console.js'
import * as native from './internal/native.js'
import { DEFAULT_STOP_TIMEOUT_MS } from './limits.js'
import { checkInterval, metricsScript, parseMetrics, type MetricsOptions, type SandboxMetrics } from './metrics.js'

/**
 * What boots a sandbox: `kvm` (microcell's own VMM, in this process; needs hardware KVM),
 * `qemu` (`qemu-system-x86_64 -M microvm` as a child process: KVM-accelerated on hardware KVM,
 * software emulation elsewhere) or `auto` (`kvm` where it can boot Linux, else `qemu`).
 */
export type SandboxEngine = 'auto' | 'kvm' | 'qemu'

/** The configuration of a sandbox, as `build()` returns it (defaults filled in). */
export interface SandboxConfig {
  /** 1-63 letters, digits and '-' (not first or last); the guest's hostname. */
  name?: string
  /** Guest memory in MiB: at least 64, at most the host's RAM (default 512). */
  memoryMib: number
  /** vCPUs, 1 to 32 (default 1). */
  cpus: number
  /** Environment for processes run in the sandbox (kept for exec). */
  env?: Record<string, string>
  /** Working directory for processes run in the sandbox, an absolute guest path (kept for exec). */
  workdir?: string
  /** Default `auto`. */
  engine: SandboxEngine
  /** Guest kernel (default: `MICROCELL_KERNEL`, else the one `scripts/setup.sh` built). */
  kernel?: string
  /** Root disk image (default: `MICROCELL_ROOTFS`, else the one `scripts/setup.sh` built). */
  rootfs?: string
  /** How long the guest agent has to become ready, 100 to 600000 ms (default 30000). */
  bootTimeoutMs: number
  /** Host file that receives the guest console (created or truncated). */
  consoleOutput?: string
  /** Appended to the guest kernel command line (printable ASCII, at most 1024 characters). */
  kernelArgs?: string
  /** Console bytes kept for a slow reader of `sandbox.console`, 1 to 2^30 (default 64 KiB). */
  consoleQueueBytes?: number
  /**
   * Your own labels (at most 64; keys 1-64, values up to 512 printable characters):
   * `Sandbox.list({ metadata })` selects by them, snapshots keep them. `E_CONFIG_METADATA`.
   */
  metadata?: Record<string, string>
  /**
   * The sandbox's longest life in milliseconds (1 to 4294967295; default: none): it is killed
   * this long after `create()` / `fromSnapshot()` resolved, unless `setMaxDuration()` moves the
   * deadline; its exit status then has `code: 'E_MAX_DURATION'`. (The deadline's timer holds the
   * sandbox: one with a deadline runs until it, referenced or not.)
   */
  maxDurationMs?: number
  /**
   * A network interface for the guest (`eth0` behind user-mode NAT: a `passt` process behind
   * the VM's virtio-net, on either engine; guest `10.0.2.15`, the host's loopback as `10.0.2.2`,
   * DNS `10.0.2.3`); none by default. `outbound` (default true): whether the guest may open
   * connections out; `deny`/`allow`: where to; `ports`: ports of the host's loopback
   * forwarded into the guest, `"HOST:GUEST"` or `"PORT"`, TCP unless followed by `/udp`. Every frame the guest sends passes
   * this policy on the host before it reaches the network. Needs `passt` installed
   * (`scripts/setup.sh` installs it).
   */
  network?: NetworkConfig
  /**
   * Host directories shared into the guest (virtio-9p on engine `qemu`; at most 4), mounted
   * at boot. Files the guest writes belong to this process's user on the host (the guest's
   * owner and mode are kept in extended attributes). Engine `auto` picks `qemu` for them; a
   * sandbox with volumes cannot be snapshotted (QEMU does not migrate a mounted 9p share).
   */
  volumes?: Volume[]
}

/** A host directory in the guest. */
export interface Volume {
  /** An existing host directory (made absolute by `build()`). */
  host: string
  /** Where the guest sees it: an absolute path other than `/`, without `,` `:` or spaces. */
  guest: string
  /** Read-only in the guest (and for the share). Default false. */
  readOnly?: boolean
}

/** See `SandboxConfig.network`. */
export interface NetworkConfig {
  outbound?: boolean
  ports?: string[]
  /**
   * With `outbound`: destinations the guest may not reach: `"a.b.c.d"`, `"a.b.c.d/n"`,
   * `"private"` (loopback, RFC 1918, CGNAT, link-local with cloud metadata; the host's loopback
   * `10.0.2.2` is inside) or `"host"` (`10.0.2.2` alone). DNS to the guest's resolver stays open.
   * `deny: ['private']` is "public internet only".
   */
  deny?: string[]
  /** Destinations that stay reachable inside a denied one (same forms); `allow` wins. */
  allow?: string[]
}

/** `sandbox.updateNetwork()`: what is given replaces what is in force (ports cannot change). */
export interface NetworkUpdate {
  outbound?: boolean
  deny?: string[]
  allow?: string[]
}

/** What `Sandbox.create()` accepts: a built config, or any part of one (defaults apply). */
export type SandboxConfigInput = Partial<SandboxConfig>

/** How a sandbox came up. */
export interface SandboxInfo {
  name: string | null
  /** The engine that runs it (`auto` resolved). */
  engine: 'kvm' | 'qemu'
  /** Why this engine: `asked for`, or `auto: ...` with the host's reason. */
  engineReason: string
  /** The engine in one line: the QEMU binary and accelerator, or the built-in VMM. */
  engineDetail: string
  /** The QEMU process; null on the built-in VMM (which runs in this process). */
  pid: number | null
  /** The guest kernel and root disk that booted. */
  kernel: string
  rootfs: string
  /** `uname -r` of the guest, e.g. `6.1.192`. */
  kernelRelease: string
  /** The agent's name and version. */
  agent: string
  hostname: string
  protocolVersion: number
  /** The agent's feature bits. */
  features: number
  /** Host wall time from the start of `create()` to the agent being ready, in ms. */
  bootMs: number
  /** The guest's CLOCK_BOOTTIME when the agent was ready, and when the agent started (ns). */
  guestBootNs: number
  agentStartNs: number
}

/** Options of `sandbox.stop()`. */
export interface SandboxStopOptions {
  /** Kill the VM if it has not powered off this many milliseconds after the request (default 10000). */
  timeoutMs?: number
}

function toJson(config: SandboxConfigInput): string {
  try {
    return JSON.stringify(config)
  } catch (err) {
    throw new MicrocellError('E_CONFIG_JSON', `the configuration cannot be written as JSON: ${String(err)}`, {
      cause: err,
    })
  }
}

/**
 * Chainable builder of a `SandboxConfig`; `build()` validates it (natively) and returns plain
 * JSON, `create()` boots it.
 */
export class SandboxBuilder {
  readonly #config: SandboxConfigInput = {}

  constructor(name?: string) {
    if (name !== undefined) this.#config.name = string('name', name)
  }

  #set<K extends keyof SandboxConfigInput>(key: K, value: SandboxConfigInput[K]): this {
    this.#config[key] = value
    return this
  }

  /** The sandbox's name (also its guest hostname). */
  name(name: string): this {
    return this.#set('name', string('name', name))
  }

  /** Guest memory in MiB (default 512). */
  memory(mib: number): this {
    return this.#set('memoryMib', mib)
  }

  /** Number of vCPUs, 1 to 32 (default 1). */
  cpus(count: number): this {
    return this.#set('cpus', count)
  }

  /** Sets one environment variable, or several from an object. */
  env(key: string, value: string): this
  env(vars: Record<string, string>): this
  env(keyOrVars: string | Record<string, string>, value?: string): this {
    const env = { ...this.#config.env }
    if (typeof keyOrVars === 'string') env[keyOrVars] = string(`env.${keyOrVars}`, value)
    else Object.assign(env, stringRecord('env', keyOrVars))
    return this.#set('env', env)
  }

  /** Working directory of processes run in the sandbox (absolute guest path). */
  workdir(path: string): this {
    return this.#set('workdir', path)
  }

  /** `auto` (default), `kvm` or `qemu`. */
  engine(engine: SandboxEngine): this {
    return this.#set('engine', engine)
  }

  /** The guest kernel (ELF vmlinux); default: the one `scripts/setup.sh` built. */
  kernel(path: string): this {
    return this.#set('kernel', path)
  }

  /** The root disk image (raw ext4); default: the one `scripts/setup.sh` built. */
  rootfs(path: string): this {
    return this.#set('rootfs', path)
  }

  /** How long the agent has to become ready (default 30000 ms). */
  bootTimeoutMs(ms: number): this {
    return this.#set('bootTimeoutMs', ms)
  }

  /** Host file that receives the guest console. */
  consoleOutput(path: string): this {
    return this.#set('consoleOutput', path)
  }

  /** Extra guest kernel command line (e.g. `loglevel=8`). */
  kernelArgs(args: string): this {
    return this.#set('kernelArgs', args)
  }

  /** Shares host directory `host` into the guest at `guest` (repeatable; see `SandboxConfig.volumes`). */
  volume(host: string, guest: string, options: { readOnly?: boolean } = {}): this {
    const volume: Volume = { host: string('volume host', host), guest: string('volume guest', guest) }
    const { readOnly } = plainObject('volume options', options, '{ readOnly?: boolean }')
    if (readOnly !== undefined && typeof readOnly !== 'boolean') throw configTypeError('volume readOnly', 'a boolean', readOnly)
    if (readOnly === true) volume.readOnly = true
    return this.#set('volumes', [...(this.#config.volumes ?? []), volume])
  }

  /** Gives the guest a network (see `SandboxConfig.network`): `{}` for outbound access, `ports` to forward. */
  network(network: NetworkConfig = {}): this {
    const n = plainObject('network', network, '{ ports?, allow?, ... } (see SandboxConfig.network)') as NetworkConfig
    return this.#set('network', { ...n, ...(n.ports !== undefined ? { ports: stringList('network.ports', n.ports) } : {}) })
  }

  /** Kill the sandbox this many milliseconds after it is up (see `SandboxConfig.maxDurationMs`). */
  maxDurationMs(ms: number): this {
    return this.#set('maxDurationMs', ms)
  }

  /** Console bytes kept for a slow reader of `sandbox.console` before the oldest are dropped (default 64 KiB). */
  consoleQueueBytes(bytes: number): this {
    return this.#set('consoleQueueBytes', bytes)
  }

  /** Adds labels (`metadata(key, value)` or `metadata({ ... })`; see `SandboxConfig.metadata`). */
  metadata(keyOrLabels: string | Record<string, string>, value?: string): this {
    const metadata = { ...this.#config.metadata }
    if (typeof keyOrLabels === 'string') metadata[keyOrLabels] = string(`metadata.${keyOrLabels}`, value)
    else Object.assign(metadata, stringRecord('metadata', keyOrLabels))
    return this.#set('metadata', metadata)
  }

  /**
   * Validates the configuration and returns it as plain JSON (defaults filled in). Throws a
   * `MicrocellError` with an `E_CONFIG_*` code. The guest images are checked by `create()`.
   */
  build(): SandboxConfig {
    return Sandbox.validate(this.#config)
  }

  /** `Sandbox.create(this.build())`. */
  create(): Promise<Sandbox> {
    return Sandbox.create(this.#config)
  }

  /** `Sandbox.run(cmd, args, { ...options, config: this.build() })`: one command in a fresh sandbox. */
  run(cmd: string, args?: readonly string[] | ExecOptions, options?: ExecOptions): Promise<ExecResult> {
    try {
      const [argv, opts] = splitArgs(args, options)
      return Sandbox.run(cmd, argv, { ...opts, config: this.#config })
    } catch (err) {
      return Promise.reject(err)
    }
  }
}

/** Options of `Sandbox.run()`: the command's (as `exec()`) and the sandbox's configuration. */
export interface SandboxRunOptions extends ExecOptions {
  /** The sandbox to run it in (as `Sandbox.create()` takes; default: the defaults). */
  config?: SandboxConfigInput
}

/**
 * The sandboxes this process made, for `Sandbox.list()`: weakly held, so that a dropped sandbox
 * is still killed when collected; collected ones leave the set, ended ones at the next `list()`.
 */
const made = new Set<WeakRef<Sandbox>>()
const collected = new FinalizationRegistry<WeakRef<Sandbox>>((ref) => made.delete(ref))

/**
 * A microVM running the guest platform (Linux kernel, root disk, the microcell agent as PID 1),
 * ready when `create()` resolves. `await using sb = await Sandbox.builder('x').create()` stops
 * it at scope end.
 */
export class Sandbox implements AsyncDisposable {
  readonly #native: native.NativeSandboxHandle
  readonly #info: SandboxInfo
  readonly #ops: native.NativeSandboxOps
  #console: Readable | undefined
  #fs: SandboxFs | undefined
  #exit: Promise<ExitStatus> | undefined
  #stopping: Promise<ExitStatus> | undefined
  /** The maxDurationMs timer (unref'd: it keeps no process alive), and when it fires. */
  #deadline: { timer: NodeJS.Timeout; at: number; ms: number } | undefined
  /** The timer fired and killed the sandbox. */
  #expired: { ms: number } | undefined

  private constructor(handle: native.NativeSandboxHandle) {
    this.#native = handle
    this.#ops = new native.NativeSandboxOps(handle)
    this.#info = Object.freeze(handle.info() as unknown as SandboxInfo)
    const ref = new WeakRef(this)
    made.add(ref)
    collected.register(this, ref)
    const ms = this.config.maxDurationMs
    if (ms !== undefined) {
      this.#arm(ms)
      void this.wait().then(() => clearTimeout(this.#deadline?.timer))
    }
  }

  #arm(ms: number): void {
    clearTimeout(this.#deadline?.timer)
    const timer = setTimeout(() => {
      this.#expired = { ms }
      this.#native.kill()
    }, ms)
    timer.unref()
    this.#deadline = { timer, at: Date.now() + ms, ms }
  }

  /** How the VM ended, with why when the maxDurationMs deadline ended it. */
  #why(exit: ExitStatus): ExitStatus {
    if (this.#expired === undefined || exit.reason !== 'killed') return exit
    return {
      ...exit,
      code: 'E_MAX_DURATION',
      message: `the sandbox reached its maxDurationMs (${this.#expired.ms} ms) and was killed: set a longer one, or call setMaxDuration() while it runs`,
    }
  }

  /**
   * Moves the deadline: the sandbox is killed `ms` milliseconds from now (1 to 4294967295),
   * whether or not it had a `maxDurationMs`. Throws `E_VM_STATE` once it has ended.
   */
  setMaxDuration(ms: number): void {
    if (!Number.isInteger(ms) || ms < 1 || ms > 2 ** 32 - 1) {
      throw new MicrocellError('E_INVALID_ARGUMENT', `setMaxDuration(${String(ms)}): give a whole number of milliseconds from 1 to 4294967295`)
    }
    if (this.#native.exitStatus() !== null) throw new MicrocellError('E_VM_STATE', 'the sandbox has ended: it has no deadline to move')
    const first = this.#deadline === undefined
    this.#arm(ms)
    if (first) void this.wait().then(() => clearTimeout(this.#deadline?.timer))
  }

  /** When the maxDurationMs deadline kills the sandbox (ms since the epoch, as `Date.now()`), or null. */
  get expiresAt(): number | null {
    return this.#deadline === undefined || this.#native.exitStatus() !== null ? null : this.#deadline.at
  }

  /**
   * The sandboxes of this process that are still running (created or restored, not ended), in
   * the order they were made; `name` keeps those of that name, `metadata` those whose metadata
   * has every one of its entries.
   */
  static list(filter: { name?: string; metadata?: Record<string, string> } = {}): Sandbox[] {
    const wanted = Object.entries(filter.metadata ?? {})
    const running: Sandbox[] = []
    for (const ref of made) {
      const sb = ref.deref()
      if (sb === undefined || sb.exitStatus !== null) {
        made.delete(ref)
        continue
      }
      if (filter.name !== undefined && sb.info.name !== filter.name) continue
      if (wanted.length > 0) {
        const labels = sb.config.metadata ?? {}
        if (!wanted.every(([k, v]) => labels[k] === v)) continue
      }
      running.push(sb)
    }
    return running
  }

  /** A builder; `name` becomes the sandbox's name and guest hostname. */
  static builder(name?: string): SandboxBuilder {
    return new SandboxBuilder(name)
  }

  /** Validates a configuration; returns it normalised (what `build()` returns). */
  static validate(config: SandboxConfigInput): SandboxConfig {
    return JSON.parse(native.validateSandboxConfig(toJson(config))) as SandboxConfig
  }

  /**
   * Validates and boots a configuration; resolves once the guest agent is ready (about 1 s
   * under QEMU's software emulation). Rejects with a `MicrocellError`: `E_CONFIG_*`,
   * `E_GUEST_IMAGE_MISSING` (run `scripts/setup.sh`), `E_QEMU_NOT_FOUND`, `E_NO_KVM`,
   * `E_ENGINE_UNAVAILABLE` (engine `kvm` where the built-in VMM cannot boot Linux),
   * `E_BOOT_TIMEOUT`, `E_AGENT_EXITED` (the VM ended first; the message has the console tail),
   * ... The VM is gone when it rejects.
   */
  static async create(config: SandboxConfigInput = {}): Promise<Sandbox> {
    const json = toJson(config)
    prepareGuest(typeof config === 'object' && config !== null ? config : {})
    const handle = await native.createSandbox(json)
    return new Sandbox(handle)
  }

  /**
   * Runs one command in a fresh sandbox and ends the sandbox: `create(options.config)`, then
   * `exec(cmd, args, options)`, then the sandbox is killed (nothing in it is kept), also when
   * the command or the boot fails. Resolves with the `ExecResult` (a non-zero exit is a result,
   * not an error); rejects as `create()` and `exec()` do. For one-shot jobs: untrusted code,
   * a build, a test run.
   */
  static async run(cmd: string, args?: readonly string[] | SandboxRunOptions, options?: SandboxRunOptions): Promise<ExecResult> {
    const [argv, opts] = splitArgs(args, options)
    const { config = {}, ...execOptions } = opts as SandboxRunOptions
    const sandbox = await Sandbox.create(config)
    try {
      return await sandbox.exec(cmd, argv, execOptions)
    } finally {
      await sandbox.kill()
    }
  }

  /**
   * Starts a new sandbox from a snapshot directory (`sandbox.snapshot(dir)`): nothing boots,
   * the VM resumes where it was, and the guest sets its clock and reseeds its RNG from the
   * host. Each call is an independent clone (its own memory and root disk copy). `ports`
   * replaces the snapshot's forwarded ports (`"HOST:GUEST[/udp]"`): clones of a snapshot whose
   * network forwards ports need host ports of their own to run side by side. Rejects with
   * `E_SNAPSHOT*`, `E_QEMU_NOT_FOUND`, `E_BOOT_TIMEOUT`, `E_CONFIG_NETWORK`, ...
   */
  static async fromSnapshot(dir: string, options: { consoleOutput?: string; ports?: string[] } = {}): Promise<Sandbox> {
    return new Sandbox(await native.restoreSandbox(dir, options.consoleOutput, options.ports))
  }

  /**
   * Writes a snapshot of this sandbox (memory, devices, root disk, configuration) into `dir`,
   * created if needed; the sandbox runs on (a paused one stays paused; its restores run). Take
   * it while no command runs: commands in flight do not survive a restore. Resolves with `dir`.
   */
  async snapshot(dir: string): Promise<string> {
    await this.#native.snapshot(dir)
    return dir
  }

  /**
   * Stops the guest's vCPUs: the sandbox keeps its memory, processes and files and uses no CPU
   * until `resume()`. Meanwhile `exec()` and `fs` calls reject with `E_VM_STATE` (commands
   * already running just wait); `snapshot()` works; `stop()` resumes it first. Rejects with
   * `E_VM_STATE` once the sandbox has ended.
   */
  pause(): Promise<void> {
    return this.#native.pause()
  }

  /** Lets a paused sandbox run again (its clock then jumps forward); nothing to do when it is not paused. */
  resume(): Promise<void> {
    return this.#native.resume()
  }

  /** Whether the sandbox is paused (by `pause()`). */
  get paused(): boolean {
    return this.#native.isPaused()
  }

  /** How the sandbox came up: engine and why, kernel release, boot time, ... */
  get info(): SandboxInfo {
    return this.#info
  }

  /** The validated configuration it was made from (its network as at the start: see `network`). */
  get config(): SandboxConfig {
    return JSON.parse(this.#native.config()) as SandboxConfig
  }

  /** The network in force now (as made, then as `updateNetwork()` left it); null without one. */
  get network(): NetworkConfig | null {
    const json = this.#native.network()
    return json === null ? null : (JSON.parse(json) as NetworkConfig)
  }

  /**
   * Changes where the guest may send while it runs, from the next packet (connections already
   * open to a now denied destination stop getting through); snapshots taken later keep it.
   * Resolves with the network now in force. `E_CONFIG_NETWORK` for a policy that does not
   * validate, `E_CONFIG_JSON` for an unknown key (`ports` cannot change), `E_VM_STATE` for a
   * sandbox made without a network.
   */
  async updateNetwork(update: NetworkUpdate): Promise<NetworkConfig> {
    return JSON.parse(await this.#native.updateNetwork(JSON.stringify(update ?? {}))) as NetworkConfig
  }

  /**
   * Resolves when the VM has ended and `console` (when it was used) has delivered its last byte:
   * after its 'end' while it is read, as a child process's 'close' (a console read in flowing
   * mode or by an async iterator must be read to its end). `consoleOutput` is complete too.
   */
  wait(): Promise<ExitStatus> {
    this.#exit ??= this.#native.wait().then(async (e) => {
      await consoleDelivered(this.#console)
      return this.#why(e)
    })
    return this.#exit
  }

  /** How the VM ended, or null while it runs. */
  get exitStatus(): ExitStatus | null {
    const e = this.#native.exitStatus()
    return e === null ? null : this.#why(e)
  }

  /**
   * Powers the guest off (the agent syncs its disks and resets the VM) and resolves when the VM
   * has ended: `{ reason: 'reset' }` when graceful, `{ reason: 'killed' }` when it had not
   * ended after `timeoutMs` (default 10 s) and was killed. When the VM has already ended,
   * resolves with how it ended.
   */
  stop(options: SandboxStopOptions = {}): Promise<ExitStatus> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_STOP_TIMEOUT_MS
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 2 ** 32 - 1) {
      return Promise.reject(
        new MicrocellError(
          'E_INVALID_ARGUMENT',
          `timeoutMs is ${String(timeoutMs)}: give a whole number of milliseconds from 0 to 4294967295 (default ${DEFAULT_STOP_TIMEOUT_MS})`,
        ),
      )
    }
    const ended = this.exitStatus
    if (ended !== null) return Promise.resolve(ended)
    this.#stopping ??= this.#native.stop(timeoutMs).then((e) => this.#why(e))
    return this.#stopping
  }

  /** Ends the VM at once and resolves when it has ended. */
  kill(): Promise<ExitStatus> {
    const done = this.wait()
    this.#native.kill()
    return done
  }

  /**
   * The guest console (serial port) as a Node Readable, created on first access: the boot log,
   * the agent's `microcell-agent ready ...` banner, kernel messages. It ends when the VM has
   * ended. A sandbox keeps the last 64 KiB not yet read; older bytes are dropped and counted
   * in `consoleStats.droppedBytes` (use `consoleOutput` for a complete file). While a read is
   * pending, Node's event loop stays alive, as for a child process.
   */
  get console(): Readable {
    this.#console ??= consoleReadable(this.#native)
    return this.#console
  }

  /** Counters of the console (bytes written, dropped for a slow reader, ...). */
  get consoleStats(): ConsoleStats {
    return this.#native.consoleStats()
  }

  /**
   * Resource use: the guest's CPU (sampled over `intervalMs`, default 200 ms), memory, root
   * disk, load and uptime from its `/proc` (one exec), and the engine process's RSS on the host.
   * Rejects like `exec()` (`E_VM_STATE` while paused, `E_CHANNEL_CLOSED` once ended).
   */
  async metrics(options: MetricsOptions = {}): Promise<SandboxMetrics> {
    const script = metricsScript(checkInterval(options))
    const r = await this.exec('/bin/sh', ['-c', script])
    if (r.exitCode !== 0) {
      throw new MicrocellError('E_AGENT_ERROR', `metrics(): the guest's /proc could not be read (exit ${String(r.exitCode)}): ${r.stderrText().slice(0, 500)}`)
    }
    return parseMetrics(r.stdoutText(), this.#info.pid)
  }

  /** The last console lines (and QEMU's stderr), as error messages show them. */
  consoleTail(): string {
    return this.#native.consoleTail()
  }

  /**
   * Runs a program in the guest to its end and resolves with its exit and all of its output:
   * `{ exitCode, signal, timedOut, stdout, stderr, durationMs }` (Buffers; `stdoutText()`,
   * `stderrText()`). `cmd` is a path or a name looked up in `PATH`; `args` are passed as they
   * are (no shell). A non-zero exit is a result, not an error. The output is kept in memory, up
   * to `maxOutputBytes` per stream (default 64 MiB; beyond it the process is killed and the call
   * rejects with `E_OUTPUT_LIMIT`): for large or endless output use `execStream()`. Rejects with a `MicrocellError`:
   * `ENOENT` / `EACCES` (a program or `cwd` that cannot be used, with the guest path),
   * `E_INVALID_ARGUMENT`, `E_CHANNEL_CLOSED` (the sandbox has ended), ...
   */
  exec(cmd: string, args?: readonly string[] | ExecOptions, options?: ExecOptions): Promise<ExecResult> {
    try {
      const [argv, opts] = splitArgs(args, options)
      const req = execRequest(cmd, argv, opts, false)
      return this.#ops.execCollect(req.json, req.stdinData, req.maxOutputBytes).then(
        (r) => new ExecResult(exitFromNative(r.exit), r.stdout, r.stderr),
      )
    } catch (err) {
      return Promise.reject(err)
    }
  }

  /** `exec('/bin/sh', ['-c', script], options)`. */
  shell(script: string, options: ExecOptions = {}): Promise<ExecResult> {
    if (typeof script !== 'string') return Promise.reject(new MicrocellError('E_INVALID_ARGUMENT', 'shell(script): give the script as a string'))
    return this.exec('/bin/sh', ['-c', script], options)
  }

  /**
   * Starts a program in the guest and resolves once it runs, with a handle to stream it: its
   * output as events (`for await (const ev of proc)`) or as Node Readables (`proc.stdout`,
   * `proc.stderr`, with back-pressure), stdin (`write()`, `closeStdin()`, `proc.stdin` with
   * `stdin: 'pipe'`), `signal()`, `kill()`, `wait()`, and a terminal (`tty: { rows, cols }`,
   * `resize(cols, rows)`). Rejects as `exec()` does.
   */
  async execStream(cmd: string, args?: readonly string[] | ExecOptions, options?: ExecOptions): Promise<ExecProcess> {
    const [argv, opts] = splitArgs(args, options)
    const req = execRequest(cmd, argv, opts, true)
    const handle = await this.#ops.execStart(req.json)
    if (req.stdinData !== null) feedStdin(handle, req.stdinData)
    return new ExecProcess(handle, req.stdinPipe && req.stdinData === null)
  }

  /** The sandbox's files: read, write, list, mkdir, remove, rename, stat, streams, copies to and from the host. */
  get fs(): SandboxFs {
    this.#fs ??= new SandboxFs(this.#ops)
    return this.#fs
  }

  /** Stops the sandbox (see `stop()`); nothing to do when it has already ended. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop()
  }
}

// Compiled (not run) by types.spec.mjs: a TypeScript user of the Sandbox API.
import { Sandbox, SandboxBuilder, SandboxPool, MicrocellError, SANDBOX_ERROR_CODES, hostInfo } from 'microcell'
import type {
  ExitStatus,
  HostInfo,
  SandboxConfig,
  SandboxConfigInput,
  SandboxEngine,
  SandboxErrorCode,
  SandboxInfo,
  SandboxMetrics,
  SandboxPoolOptions,
  NetworkConfig,
  NetworkUpdate,
  SandboxStopOptions,
  Volume,
  WatchChange,
} from 'microcell'

const host: HostInfo = hostInfo()
const auto: 'kvm' | 'qemu' = host.autoEngine
const why: string = host.autoEngineReason
const qemu: string | null = host.qemu
const engine: SandboxEngine = host.canBootLinux ? 'kvm' : 'qemu'

const builder: SandboxBuilder = Sandbox.builder('typed')
const config: SandboxConfig = builder
  .memory(256)
  .cpus(2)
  .env('A', '1')
  .env({ B: '2' })
  .workdir('/srv')
  .engine(engine)
  .kernel('/k')
  .rootfs('/r')
  .bootTimeoutMs(10_000)
  .consoleOutput('/tmp/console.log')
  .kernelArgs('loglevel=4')
  .build()
const mib: number = config.memoryMib
const input: SandboxConfigInput = { memoryMib: 256, engine: 'auto' }
const stopOptions: SandboxStopOptions = { timeoutMs: 500 }

async function run(): Promise<void> {
  await using sb = await Sandbox.builder('scoped').create()
  const info: SandboxInfo = sb.info
  const release: string = info.kernelRelease
  const ran: 'kvm' | 'qemu' = info.engine
  const ms: number = info.bootMs
  console.log(release, ran, info.engineReason, ms, info.pid ?? 'in-process', auto, why, qemu, mib)
  sb.console.pipe(process.stdout)
  const other = await Sandbox.create(input)
  const exit: ExitStatus = await other.stop(stopOptions)
  const killed: ExitStatus = await other.kill()
  const waited: ExitStatus = await sb.wait()
  console.log(exit.reason, killed.code, waited.message, sb.exitStatus?.reason, sb.consoleStats.droppedBytes, sb.consoleTail())
  const validated: SandboxConfig = Sandbox.validate(sb.config)
  console.log(validated.engine)
  const limited = await Sandbox.builder('limited').maxDurationMs(60_000).consoleQueueBytes(1 << 20).create()
  limited.setMaxDuration(5_000)
  const expires: number | null = limited.expiresAt
  await limited.pause()
  const paused: boolean = limited.paused
  await limited.resume()
  const m: SandboxMetrics = await limited.metrics({ intervalMs: 100 })
  const running: Sandbox[] = Sandbox.list({ name: 'limited' })
  const big = await limited.exec('cat', ['/big'], { maxOutputBytes: 1 << 20 })
  console.log(expires, paused, m.cpuUsedPct, m.hostRssMib ?? 'in-process', running.length, big.stdout.length)
  const volume: Volume = { host: '/src', guest: '/app', readOnly: true }
  const shared = await Sandbox.builder('shared').volume(volume.host, volume.guest, { readOnly: true }).network({ outbound: false, ports: ['8080:80'] }).create()
  const watcher = await shared.fs.watch('/app', { recursive: true })
  for await (const change of watcher) {
    const c: WatchChange = change
    if (c.type === 'remove') watcher.close()
  }
}

run().catch((err: unknown) => {
  if (err instanceof MicrocellError && SANDBOX_ERROR_CODES.includes(err.code as SandboxErrorCode)) {
    console.log(err.code)
  }
})

// A warm pool of sandboxes: acquire one per request, release it after.
async function servePooled(): Promise<string> {
  const poolOptions: SandboxPoolOptions = { config: { memoryMib: 256, maxDurationMs: 60_000 }, size: 4 }
  await using pool = new SandboxPool(poolOptions)
  await pool.filled()
  const sb: Sandbox = await pool.acquire()
  const out = (await sb.exec('echo', ['hi'])).stdoutText()
  const ended: ExitStatus = await pool.release(sb)
  const fromSnapshot = new SandboxPool({ snapshot: '/tmp/snap', size: 1 })
  await fromSnapshot.close({ killAcquired: true })
  return out + ended.reason + pool.stats().misses
}
void servePooled

// The network policy of a running sandbox.
async function tighten(sb: Sandbox): Promise<NetworkConfig | null> {
  const update: NetworkUpdate = { deny: ['private'], allow: ['host'] }
  const now: NetworkConfig = await sb.updateNetwork(update)
  return now.outbound ? sb.network : null
}
void tighten

// Labels, and selecting by them.
const labelled: SandboxConfig = Sandbox.builder('labelled').metadata('team', 'infra').metadata({ request: 'r-1' }).build()
const team: string | undefined = labelled.metadata?.team
const mine: Sandbox[] = Sandbox.list({ metadata: { team: 'infra' } })
void team
void mine

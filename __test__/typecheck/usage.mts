// Compiled (not run) by types.spec.mjs: what a TypeScript user writes against 'microcell'.
import { MicroVm, MicroVmBuilder, MicrocellError, hostInfo, defaultGuest, CONFIG_ERROR_CODES } from 'microcell'
import type { BuiltMicroVmConfig, ExitStatus, HostInfo, MicroVmConfig, StartOptions, Timings, ConfigErrorCode } from 'microcell'

const info: HostInfo = hostInfo()
const flavour: 'hardware' | 'pvm' | 'none' = info.kvmFlavour
const builder: MicroVmBuilder = MicroVm.builder()
const config: MicroVmConfig = builder
  .kernel('/k')
  .initrd('/i')
  .cmdline('console=ttyS0')
  .numVcpus(2)
  .memoryMib(512)
  .logLevel('info')
  .rootfs({ overlayfs: ['/a', '/b'] })
  .mappedDirs(['/h:/g'])
  .portMap(['8080:80'])
  .scope('public')
  .ip('10.0.0.2')
  .subnet('10.0.0.0/24')
  .rlimits(['RLIMIT_NOFILE=1:2'])
  .workdirPath('/w')
  .execPath('/bin/sh')
  .args(['-c', 'true'])
  .env({ A: '1' })
  .consoleOutput('/tmp/c.log')
  .allowUnsupportedHost()
  .build()
const n: number = config.numVcpus
const options: StartOptions = { consoleStream: true, consoleQueueBytes: 1 << 16 }

async function run(): Promise<void> {
  await using vm = await MicroVm.start(config, options)
  vm.console.pipe(process.stdout)
  const exit: ExitStatus = await vm.wait()
  if (exit.reason === 'crashed') console.log(exit.code, exit.message)
  const t: Timings = vm.timings
  const ns: bigint = t.startNs - (t.firstExitNs ?? 0n)
  await vm.stop({ timeoutMs: 100 })
  await vm.kill()
  console.log(ns, vm.exitStatus?.reason, vm.consoleStats.droppedBytes)
}

try {
  run()
} catch (err) {
  if (err instanceof MicrocellError) {
    const code: string = err.code
    console.log(code, CONFIG_ERROR_CODES.includes(code as ConfigErrorCode))
  }
}
console.log(flavour, n)

// The seeds' form: build() is the config (plain data) with start() → the program's exit status.
async function workload(): Promise<number> {
  const built: BuiltMicroVmConfig = MicroVm.builder().rootfs(defaultGuest).execPath('/bin/sh').args(['-c', 'exit 7']).build()
  const data: MicroVmConfig = built
  const vm = await MicroVm.start(data, { consoleQueueBytes: 4096 })
  const sent: boolean = await vm.signal('SIGUSR1')
  await vm.pause()
  await vm.resume()
  console.log(sent, vm.paused)
  await vm.stop({ timeoutMs: 1000 })
  return built.start({ console: null })
}
void workload
// @ts-expect-error: an unknown log level is a type error
MicroVm.builder().logLevel('loud')

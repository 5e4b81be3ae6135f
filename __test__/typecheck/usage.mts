// Compiled (not run) by types.spec.mjs: what a TypeScript user writes against 'microcell'.
import { MicroVm, MicroVmBuilder, MicrocellError, hostInfo, CONFIG_ERROR_CODES } from 'microcell'
import type { ExitStatus, HostInfo, MicroVmConfig, StartOptions, Timings, ConfigErrorCode } from 'microcell'

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
// @ts-expect-error: an unknown log level is a type error
MicroVm.builder().logLevel('loud')

// `npm run bench:start [-- runs]`: start latency of the built-in VMM through the Node API.
// Boots the hello test guest (256 MiB) N times and reports, per run:
//   js→running   JS call of MicroVm.start() until its promise resolved (vCPUs running)
//   vmm start    Vm::start inside the VMM (startNs → runningNs)
//   first exit   startNs → the guest's first port write (its first observable instruction)
//   js→ended     JS call until wait() resolved (the guest printed a line and reset)
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { MicroVm } from 'microcell'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const kernel = path.join(root, 'target', 'testguests', 'hello.pvh.elf')
const runs = Number(process.argv[2] ?? 50)
const memoryMib = Number(process.env.BENCH_MEMORY_MIB ?? 256)

const config = MicroVm.builder().kernel(kernel).memoryMib(memoryMib).build()
const samples = { 'js→running': [], 'vmm start': [], 'first exit': [], 'js→ended': [] }
for (let i = -3; i < runs; i++) {
  const t0 = process.hrtime.bigint()
  const vm = await MicroVm.start(config)
  const t1 = process.hrtime.bigint()
  await vm.wait()
  const t2 = process.hrtime.bigint()
  const { startNs, runningNs, firstExitNs } = vm.timings
  if (i < 0) continue // warm-up
  samples['js→running'].push(t1 - t0)
  samples['vmm start'].push(runningNs - startNs)
  samples['first exit'].push(firstExitNs - startNs)
  samples['js→ended'].push(t2 - t0)
}

const ms = (ns) => (Number(ns) / 1e6).toFixed(3).padStart(8)
const pick = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]
console.log(`start latency, ${runs} runs, hello.pvh.elf, ${memoryMib} MiB, 1 vCPU (ms)`)
console.log(`${'metric'.padEnd(12)} ${'min'.padStart(8)} ${'p50'.padStart(8)} ${'p90'.padStart(8)} ${'max'.padStart(8)}`)
for (const [name, values] of Object.entries(samples)) {
  const s = [...values].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
  console.log(`${name.padEnd(12)} ${ms(s[0])} ${ms(pick(s, 0.5))} ${ms(pick(s, 0.9))} ${ms(s.at(-1))}`)
}

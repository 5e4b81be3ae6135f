// `npm start`: boots the hello test guest on the built-in VMM through the Node API and prints
// its console. (The main job until the real guest platform — kernel, rootfs, agent — exists.)
import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { MicroVm, MicrocellError, hostInfo } from 'microcell'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const kernel = path.join(root, 'target', 'testguests', 'hello.pvh.elf')

const host = hostInfo()
console.log(`host: KVM ${host.kvmFlavour}; Linux guests ${host.canBootLinux ? 'can' : 'cannot'} boot here: ${host.reason}`)
if (!host.kvmDevice) {
  console.error('cannot boot a microVM here: there is no usable /dev/kvm')
  process.exit(1)
}
if (!fs.existsSync(kernel)) {
  console.error(`${kernel} is missing: run ./scripts/setup.sh first`)
  process.exit(1)
}

try {
  const vm = await MicroVm.builder().kernel(kernel).memoryMib(64).start({ consoleStream: true })
  console.log(`booting ${path.relative(root, kernel)} (1 vCPU, 64 MiB); guest console:`)
  console.log('----------------------------------------')
  const chunks = []
  for await (const chunk of vm.console) {
    process.stdout.write(chunk)
    chunks.push(chunk)
  }
  const exit = await vm.wait()
  const { startNs, firstExitNs, runningNs } = vm.timings
  const us = (ns) => (Number(ns) / 1000).toFixed(0)
  console.log('----------------------------------------')
  console.log(`VM ended: ${JSON.stringify(exit)}`)
  console.log(
    `start: vCPUs running after ${us(runningNs - startNs)} µs; first guest I/O after ${firstExitNs === null ? '-' : us(firstExitNs - startNs)} µs`,
  )
  if (exit.reason !== 'reset' || Buffer.concat(chunks).length === 0) process.exit(1)
} catch (err) {
  if (err instanceof MicrocellError) console.error(`error ${err.code}: ${err.message}`)
  else console.error(err)
  process.exit(1)
}

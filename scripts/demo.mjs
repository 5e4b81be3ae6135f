// `npm start`: boots the default guest (Linux kernel + root disk + agent, built by
// scripts/setup.sh) with the Sandbox API on engine 'auto', prints how it came up (engine and
// why, kernel release, boot time, the agent's ready banner), runs `uname -a` and
// `echo hello from microcell` in it and prints their output, and stops it.
// `npm start -- --test-guest`: boots the `hello` test guest on the built-in VMM with the
// MicroVm API and prints its console.
import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import { MicroVm, MicrocellError, Sandbox, hostInfo } from 'microcell'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
const args = process.argv.slice(2)

function fail(err) {
  if (err instanceof MicrocellError) console.error(`error ${err.code}: ${err.message}`)
  else console.error(err)
  if (err?.code === 'E_GUEST_IMAGE_MISSING') console.error('build the guest with ./scripts/setup.sh first')
  process.exit(1)
}

/** Reads `stream` until a line contains `marker` or `ms` pass; returns that line (or null). */
async function lineWith(stream, marker, ms) {
  let text = ''
  let timer
  const timeout = new Promise((resolve) => {
    timer = setTimeout(resolve, ms)
  })
  const found = (async () => {
    for await (const chunk of stream) {
      text += chunk.toString('latin1')
      if (text.includes(marker)) return
    }
  })()
  await Promise.race([found, timeout]).finally(() => clearTimeout(timer))
  const line = text.split(/\r?\n/).find((l) => l.includes(marker))
  return line === undefined ? null : line.trim()
}

async function sandboxDemo() {
  const host = hostInfo()
  console.log(`host: KVM ${host.kvmFlavour}; engine 'auto' picks ${host.autoEngine}: ${host.autoEngineReason}`)
  const config = Sandbox.builder('demo').memory(512).engine('auto').build()
  console.log(`Sandbox.create(${JSON.stringify(config)}) ...`)
  const sb = await Sandbox.create(config)
  try {
    const { info } = sb
    const banner = await lineWith(sb.console, 'microcell-agent ready', 2000)
    console.log(`ready in ${info.bootMs.toFixed(0)} ms`)
    console.log(`  engine:  ${info.engine} (${info.engineDetail})`)
    console.log(`  why:     ${info.engineReason}`)
    console.log(`  kernel:  ${info.kernelRelease} (${info.kernel})`)
    console.log(`  agent:   ${info.agent}, hostname ${info.hostname}, protocol ${info.protocolVersion}`)
    console.log(`  console: ${banner ?? '(no ready banner seen on the console)'}`)
    for (const [cmd, args] of [
      ['uname', ['-a']],
      ['/bin/sh', ['-c', 'echo hello from microcell']],
    ]) {
      const r = await sb.exec(cmd, args)
      const shown = [cmd, ...args].map((a) => (/\s/.test(a) ? `'${a}'` : a)).join(' ')
      console.log(`$ ${shown}   (exit ${r.exitCode}, ${r.durationMs.toFixed(0)} ms in the guest)`)
      process.stdout.write(r.stdout)
      if (r.stderr.length > 0) process.stderr.write(r.stderr)
      if (r.exitCode !== 0) process.exitCode = 1
    }
    const t0 = performance.now()
    const exit = await sb.stop()
    console.log(`stopped in ${(performance.now() - t0).toFixed(0)} ms: ${JSON.stringify(exit)}`)
    if (exit.reason !== 'reset') process.exitCode = 1
  } finally {
    await sb.kill()
  }
}

async function testGuestDemo() {
  const kernel = path.join(root, 'target', 'testguests', 'hello.pvh.elf')
  const host = hostInfo()
  console.log(`host: KVM ${host.kvmFlavour}; Linux guests ${host.canBootLinux ? 'can' : 'cannot'} boot on the built-in VMM here: ${host.reason}`)
  if (!host.kvmDevice) {
    console.error('cannot boot a test guest here: there is no usable /dev/kvm')
    process.exit(1)
  }
  if (!fs.existsSync(kernel)) {
    console.error(`${kernel} is missing: run ./scripts/setup.sh first`)
    process.exit(1)
  }
  const vm = await MicroVm.builder().kernel(kernel).memoryMib(64).start({ consoleStream: true })
  console.log(`booting ${path.relative(root, kernel)} (1 vCPU, 64 MiB) on the built-in VMM; guest console:`)
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
}

try {
  if (args.includes('--test-guest')) await testGuestDemo()
  else await sandboxDemo()
} catch (err) {
  fail(err)
}

// T1: our VMM booting our test guests on /dev/kvm (PVM included), through the Node API.
// Skipped, with the reason printed, where there is no usable /dev/kvm.
import crypto from 'node:crypto'
import fs from 'node:fs'
import path from 'node:path'

import test from 'ava'

import { MicroVm, MicrocellError, hostInfo } from 'microcell'

import { bootcheckCmdline, guest, kvmSkipReason, readAll, tempDir, within } from './helpers.mjs'

const skipReason = kvmSkipReason()
if (skipReason) console.log(`# SKIP T1 KVM boot tests: ${skipReason}`)
const kvm = skipReason ? test.skip : test.serial

const dir = tempDir()
const PROMPT_MS = 2000
const BOOT_MS = 30_000

function initrdFile(name, size) {
  const bytes = crypto.randomBytes(size)
  const file = path.join(dir, name)
  fs.writeFileSync(file, bytes)
  return { file, bytes }
}

/** Boots bootcheck and checks its whole report. */
async function bootcheck(t, image, entry, { cpus, mem, initrd }) {
  const cmdline = bootcheckCmdline(mem, cpus, initrd?.bytes)
  let b = MicroVm.builder().kernel(guest(image)).numVcpus(cpus).memoryMib(mem).cmdline(cmdline)
  if (initrd) b = b.initrd(initrd.file)
  const vm = await b.start({ consoleStream: true })
  t.teardown(() => vm.kill())
  const [output, exit] = await within(Promise.all([readAll(vm.console), vm.wait()]), BOOT_MS, `${image} boot`)
  const lines = output.split('\n').filter((l) => l.length > 0)
  t.deepEqual(exit, { reason: 'reset' }, output)
  t.is(lines[0], `TG begin bootcheck entry=${entry}`, output)
  t.deepEqual(lines.filter((l) => l.startsWith('TG FAIL')), [], 'no check failed')
  t.is(lines.filter((l) => l.startsWith('TG cmdline ')).length, 1, output)
  t.is(lines.find((l) => l.startsWith('TG cmdline ')), `TG cmdline ${cmdline}`, 'the guest saw the cmdline exactly')
  const oks = lines.filter((l) => l.startsWith('TG ok '))
  t.true(oks.length >= 10, `${oks.length} checks passed`)
  t.is(lines.at(-1), `TG done pass=${oks.length} fail=0`, output)
  const unknown = lines.filter((l) => !/^TG (begin|ok|FAIL|cmdline|done) /.test(l))
  t.deepEqual(unknown, [], 'every line is part of the report')
  if (initrd) t.true(oks.includes('TG ok initrd.checksum'), 'the initrd arrived intact')
  t.log(`${image}: ${cpus} vCPU, ${mem} MiB, initrd ${initrd ? initrd.bytes.length : 'none'}: ${oks.length} checks ok`)
}

const small = initrdFile('small.img', 4099)
const big = initrdFile('big.img', 1 << 20)
const mid = initrdFile('mid.img', 65536)
const hostMib = hostInfo().hostMemoryMib
const bigMem = 4096 // above the 3.25 GiB MMIO gap start: RAM is split around it
const bigMemOk = hostMib >= bigMem + 1024
if (!skipReason && !bigMemOk) console.log(`# SKIP ${bigMem} MiB boots: the host has ${hostMib} MiB`)

const images = [
  ['bootcheck.pvh.elf', 'pvh'],
  ['bootcheck.elf', 'linux64'],
  ['bootcheck.bzimage', 'bzimage'],
]
const configs = [
  { cpus: 1, mem: 128, initrd: small },
  { cpus: 2, mem: 512, initrd: big },
  { cpus: 1, mem: 3328, initrd: null }, // RAM ends exactly where the MMIO gap starts
  { cpus: 4, mem: bigMem, initrd: mid, needs: bigMemOk },
]
for (const [image, entry] of images) {
  for (const config of configs) {
    const name = `bootcheck: ${image}, ${config.cpus} vCPU, ${config.mem} MiB, initrd ${config.initrd ? config.initrd.bytes.length : 'none'}`
    const run = config.needs === false ? test.skip : kvm
    run(name, (t) => bootcheck(t, image, entry, config))
  }
}

kvm('hello: the console stream and the consoleOutput file get the same bytes; timings are on CLOCK_MONOTONIC', async (t) => {
  const consoleOutput = path.join(dir, 'hello.log')
  fs.writeFileSync(consoleOutput, 'stale content from an earlier run\n'.repeat(100))
  const before = process.hrtime.bigint()
  const vm = await MicroVm.builder().kernel(guest('hello.pvh.elf')).memoryMib(64).consoleOutput(consoleOutput).start({ consoleStream: true })
  const after = process.hrtime.bigint()
  const [output, exit] = await within(Promise.all([readAll(vm.console), vm.wait()]), BOOT_MS, 'hello')
  t.deepEqual(exit, { reason: 'reset' })
  t.regex(output, /^Hello from a microcell test guest\r?\n$/)
  t.is(fs.readFileSync(consoleOutput, 'latin1'), output, 'the file is complete when wait() resolves, and was truncated')
  const { startNs, firstExitNs, runningNs } = vm.timings
  t.is(typeof startNs, 'bigint')
  t.true(before <= startNs && startNs <= after, `${before} <= ${startNs} <= ${after}`)
  t.true(startNs <= runningNs && runningNs <= after)
  t.not(firstExitNs, null)
  t.true(firstExitNs >= startNs && firstExitNs <= process.hrtime.bigint())
  t.deepEqual(vm.exitStatus, { reason: 'reset' })
  t.is(vm.consoleStats.totalBytes, Buffer.byteLength(output, 'latin1'))
  t.is(vm.consoleStats.droppedBytes, 0)
  t.true(vm.consoleStats.closed)
  t.log(`start ${Number(runningNs - startNs) / 1e3} µs, first exit after ${Number(firstExitNs - startNs) / 1e3} µs`)
})

kvm('hello without consoleStream: vm.console throws E_CONSOLE_NOT_ENABLED, the VM still runs to its end', async (t) => {
  const vm = await MicroVm.builder().kernel(guest('hello.pvh.elf')).memoryMib(64).start()
  const err = t.throws(() => vm.console, { instanceOf: MicrocellError })
  t.is(err.code, 'E_CONSOLE_NOT_ENABLED')
  t.deepEqual(await within(vm.wait(), BOOT_MS, 'wait'), { reason: 'reset' })
  t.true(vm.consoleStats.totalBytes > 0)
  t.is(vm.wait(), vm.wait(), 'wait() is one promise')
})

kvm('a reader that falls behind loses the oldest bytes, never blocks the guest; the file keeps everything', async (t) => {
  const consoleOutput = path.join(dir, 'bootcheck.log')
  const vm = await MicroVm.builder()
    .kernel(guest('bootcheck.pvh.elf'))
    .memoryMib(64)
    .cmdline(bootcheckCmdline(64, 1, null))
    .consoleOutput(consoleOutput)
    .start({ consoleStream: true, consoleQueueBytes: 64 })
  t.deepEqual(await within(vm.wait(), BOOT_MS, 'wait'), { reason: 'reset' })
  const full = fs.readFileSync(consoleOutput, 'latin1')
  const tail = await readAll(vm.console)
  const stats = vm.consoleStats
  t.is(tail.length, 64)
  t.true(full.endsWith(tail))
  t.is(stats.droppedBytes, full.length - 64)
  t.is(stats.totalBytes, full.length)
})

for (const [image, action] of [
  ['halt.pvh.elf', 'stop'],
  ['halt.pvh.elf', 'kill'],
  ['spin.pvh.elf', 'stop'],
  ['spin.pvh.elf', 'kill'],
]) {
  kvm(`${image} + ${action}() resolves promptly`, async (t) => {
    const vm = await MicroVm.builder().kernel(guest(image)).memoryMib(64).start({ consoleStream: true })
    t.teardown(() => vm.kill())
    const reader = vm.console[Symbol.asyncIterator]()
    let seen = ''
    while (!seen.includes('\n')) {
      const next = await within(reader.next(), BOOT_MS, 'the first console line')
      if (next.done) break
      seen += next.value.toString('latin1')
    }
    t.regex(seen, /^TG (halt|spin)\r?\n/, 'the guest is running its loop')
    t.is(vm.exitStatus, null, 'still running')
    const t0 = performance.now()
    const exit = await within(vm[action](), PROMPT_MS, action)
    const ms = performance.now() - t0
    t.deepEqual(exit, { reason: action === 'stop' ? 'stopped' : 'killed' })
    t.true(ms < PROMPT_MS, `${action} took ${ms} ms`)
    t.true((await reader.next()).done, 'the console stream ends with the VM')
    t.log(`${action}: ${ms.toFixed(2)} ms`)
  })
}

kvm('triplefault: wait() resolves crashed with E_GUEST_TRIPLE_FAULT', async (t) => {
  const vm = await MicroVm.builder().kernel(guest('triplefault.pvh.elf')).memoryMib(64).start()
  const exit = await within(vm.wait(), BOOT_MS, 'wait')
  t.is(exit.reason, 'crashed')
  t.is(exit.code, 'E_GUEST_TRIPLE_FAULT')
  t.is(typeof exit.message, 'string')
  t.true(exit.message.length > 0)
})

kvm('Symbol.asyncDispose stops a running VM', async (t) => {
  const vm = await MicroVm.builder().kernel(guest('halt.pvh.elf')).memoryMib(64).start()
  t.teardown(() => vm.kill())
  await within(vm[Symbol.asyncDispose](), PROMPT_MS, 'asyncDispose')
  t.deepEqual(vm.exitStatus, { reason: 'stopped' })
  await vm[Symbol.asyncDispose]() // already ended: nothing to do
  t.deepEqual(await vm.stop(), { reason: 'stopped' })
})

kvm('pending wait() and readConsole() hold no libuv threadpool thread', async (t) => {
  // Twice as many never-ending VMs as the pool has threads (UV_THREADPOOL_SIZE, default 4).
  const vms = await Promise.all(
    Array.from({ length: 8 }, () => MicroVm.builder().kernel(guest('halt.pvh.elf')).memoryMib(32).start({ consoleStream: true })),
  )
  t.teardown(() => Promise.all(vms.map((vm) => vm.kill())))
  const pending = vms.flatMap((vm) => [vm.wait(), readAll(vm.console)])
  await new Promise((resolve) => setTimeout(resolve, 50))
  // Both of these run on the libuv threadpool.
  await within(fs.promises.readFile(guest('hello.pvh.elf')), PROMPT_MS, 'fs.promises.readFile')
  await within(
    new Promise((resolve, reject) => crypto.pbkdf2('pw', 'salt', 1, 32, 'sha256', (e, k) => (e ? reject(e) : resolve(k)))),
    PROMPT_MS,
    'crypto.pbkdf2',
  )
  await within(Promise.all(vms.map((vm) => vm.kill())), PROMPT_MS, 'kill all')
  await within(Promise.all(pending), PROMPT_MS, 'pending promises')
  t.true(vms.every((vm) => vm.exitStatus.reason === 'killed'))
})

if (!skipReason) console.log('# SKIP without a usable /dev/kvm (E_NO_KVM): skipped, this host has a usable /dev/kvm')
;(skipReason ? test : test.skip)(`without a usable /dev/kvm, start() rejects with E_NO_KVM${skipReason ? '' : ' (skipped: this host has a usable /dev/kvm)'}`, async (t) => {
  const err = await t.throwsAsync(MicroVm.builder().kernel(guest('hello.pvh.elf')).memoryMib(64).start(), {
    instanceOf: MicrocellError,
  })
  t.is(err.code, 'E_NO_KVM', err.message)
})

kvm('VMM errors reach JS with their codes', async (t) => {
  const notAKernel = path.join(dir, 'not-a-kernel')
  fs.writeFileSync(notAKernel, 'this is not an ELF or a bzImage'.repeat(100))
  const err = await t.throwsAsync(MicroVm.builder().kernel(notAKernel).memoryMib(64).start(), { instanceOf: MicrocellError })
  t.is(err.code, 'E_KERNEL_FORMAT', err.message)
})

// `npm run bench:start`: builder → VM running → the guest's first instruction (its first port
// write), and VMM memory per VM excluding guest RAM; QEMU (microvm, same PVH guest) in the same
// run. Not a test: numbers go to bench/results/start.{json,md}.
import { spawn } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

import { MicroVm } from 'microcell'

import { FC_QUIET, firecrackerBinary, guest, qemuBinary, rssSplit, summary, write } from './lib.mjs'

const RUNS = Number(process.env.BENCH_RUNS ?? 50)
const QEMU_RUNS = Number(process.env.BENCH_QEMU_RUNS ?? 20)
const DENSITY = Number(process.env.BENCH_DENSITY ?? 20)
const MIB = 256
const ms = (ns) => Number(ns) / 1e6

async function microcellStart() {
  const first = []
  const running = []
  for (let i = -3; i < RUNS; i++) {
    const t0 = process.hrtime.bigint()
    const config = MicroVm.builder().kernel(guest('hello.pvh.elf')).memoryMib(MIB).build()
    const vm = await MicroVm.start(config)
    const t1 = process.hrtime.bigint()
    await vm.wait()
    if (i < 0) continue // warm-up: first use of /dev/kvm, page cache
    running.push(ms(t1 - t0))
    first.push(ms(vm.timings.firstExitNs - t0))
  }
  return [
    summary('microcell', `${MIB}MiB`, 'builder_to_first_instruction', 'ms', first),
    summary('microcell', `${MIB}MiB`, 'builder_to_running', 'ms', running),
  ]
}

async function microcellDensity() {
  const startHalted = async () => {
    const vms = []
    for (let i = 0; i < DENSITY; i++) {
      vms.push(await MicroVm.start(MicroVm.builder().kernel(guest('halt.pvh.elf')).memoryMib(MIB).build()))
    }
    await sleep(200) // every guest has printed and halted
    return vms
  }
  // A round first and thrown away: the code paths of DENSITY live VMs run once, so what the
  // measured round adds is per-VM memory, not the first touch of node's or the addon's text.
  await Promise.all((await startHalted()).map((vm) => vm.kill()))
  const before = rssSplit(process.pid, MIB << 20)
  const vms = await startHalted()
  const after = rssSplit(process.pid, MIB << 20)
  await Promise.all(vms.map((vm) => vm.kill()))
  const perVm = (key) => (after[key] - before[key]) / DENSITY / 1024
  return [
    summary('microcell', `${MIB}MiB x${DENSITY}`, 'vmm_rss_per_vm_excl_guest_ram', 'MiB', [perVm('otherKib')]),
    summary('microcell', `${MIB}MiB x${DENSITY}`, 'vmm_anon_per_vm_excl_guest_ram', 'MiB', [perVm('otherAnonKib')]),
    summary('microcell', `${MIB}MiB x${DENSITY}`, 'guest_ram_rss_per_vm', 'MiB', [perVm('guestKib')]),
  ]
}

function qemuArgs(kernel) {
  return [
    '-M', 'microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off',
    '-enable-kvm', '-m', String(MIB), '-smp', '1',
    '-kernel', kernel, '-append', 'console=ttyS0',
    '-nodefaults', '-no-user-config', '-nographic', '-serial', 'stdio', '-monitor', 'none', '-no-reboot',
  ]
}

/** Spawns a peer VMM and resolves when its serial output (stdout) contains `marker`. */
function spawnUntil(what, bin, args, marker) {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint()
    const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let firstByte = null
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`${what} printed no ${JSON.stringify(marker)} in 20 s: ${out}`)) }, 20000)
    child.stdout.on('data', (d) => {
      firstByte ??= process.hrtime.bigint()
      out += d
      if (out.includes(marker)) {
        clearTimeout(timer)
        resolve({ child, firstMs: ms(firstByte - t0) })
      }
    })
    child.on('error', reject)
  })
}

/** A peer's rows: spawn → first serial byte of the hello guest over QEMU_RUNS runs, and its RSS outside guest RAM with the halt guest. */
async function peerRows(system, until) {
  const first = []
  for (let i = -1; i < QEMU_RUNS; i++) {
    const { child, firstMs } = await until(guest('hello.pvh.elf'), 'Hello')
    child.kill('SIGKILL')
    await new Promise((r) => child.on('exit', r))
    if (i >= 0) first.push(firstMs)
  }
  const { child } = await until(guest('halt.pvh.elf'), 'TG halt')
  await sleep(200)
  const rss = rssSplit(child.pid, MIB << 20)
  child.kill('SIGKILL')
  return [
    summary(system, `${MIB}MiB`, 'spawn_to_first_serial_byte', 'ms', first),
    summary(system, `${MIB}MiB`, 'vmm_rss_per_vm_excl_guest_ram', 'MiB', [rss.otherKib / 1024]),
    summary(system, `${MIB}MiB`, 'vmm_anon_per_vm_excl_guest_ram', 'MiB', [rss.otherAnonKib / 1024]),
  ]
}

async function qemu() {
  const q = qemuBinary()
  if (!q) return { results: [], note: 'QEMU: not installed (apt-get install qemu-system-x86); its rows are missing.' }
  return {
    results: await peerRows('qemu', (kernel, marker) => spawnUntil('QEMU', q.path, qemuArgs(kernel), marker)),
    note: `QEMU: ${q.version}, -M microvm -enable-kvm, the same hello/halt PVH guests; time from spawn to the first byte on its serial stdout (includes process start and pipe latency).`,
  }
}

async function firecracker() {
  const fc = firecrackerBinary()
  if (!fc.path) return { results: [], note: `Firecracker: skipped (${fc.why}).` }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mc-bench-fc-'))
  // Booted from a config file: no API round trips.
  const until = (kernel, marker) => {
    const config = path.join(dir, `${path.basename(kernel)}.json`)
    fs.writeFileSync(config, JSON.stringify({
      'boot-source': { kernel_image_path: kernel, boot_args: 'console=ttyS0' },
      'machine-config': { vcpu_count: 1, mem_size_mib: MIB },
      drives: [],
    }))
    return spawnUntil('Firecracker', fc.path, ['--no-api', '--config-file', config, ...FC_QUIET], marker)
  }
  try {
    return {
      results: await peerRows('firecracker', until),
      note: `Firecracker: ${fc.version} (MICROCELL_FIRECRACKER), \`--no-api --config-file\` (no API round trips), the same hello/halt PVH guests; spawn → the first byte on its serial stdout (logs to /dev/null).`,
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
}

const results = [...(await microcellStart()), ...(await microcellDensity())]
const q = await qemu()
results.push(...q.results)
const f = await firecracker()
results.push(...f.results)
const fr = f.results.find((r) => r.metric === 'spawn_to_first_serial_byte')
const mc = results.find((r) => r.metric === 'builder_to_first_instruction')
const qr = q.results.find((r) => r.metric === 'spawn_to_first_serial_byte')
write('start', results, [
  'microcell: time from `MicroVm.builder()` to the hello guest\'s first port write (KVM exit timestamp, same clock as `process.hrtime`),',
  'in one Node process, 3 warm-up runs dropped. RSS: process RSS outside guest-RAM mappings, per VM, with ' + DENSITY + ' halted VMs alive (after a thrown-away round of as many);',
  '`vmm_anon_…`: of that, anonymous memory only (heap, stacks, kvm_run): what each VM owns, without the shared page cache of the binaries.',
  q.note,
  f.note,
  qr ? `Ratio (p50): QEMU / microcell = ${(qr.p50 / mc.p50).toFixed(1)}x.` : '',
  fr ? `Ratio (p50): Firecracker / microcell = ${(fr.p50 / mc.p50).toFixed(1)}x (a fresh process each; microcell starts VMs inside a running Node process).` : '',
])

// Shared by the benchmarks: percentiles, host facts, and the one result format
// {"benchmark", "date", "host", "results": [{system, case, metric, unit, p50, p90, n}]},
// written to bench/results/<name>.json with a markdown table beside it.
import { execFileSync } from 'node:child_process'
import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'

import { hostInfo } from 'microcell'

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
export const guest = (name) => path.join(root, 'target', 'testguests', name)

export function percentile(values, q) {
  const s = [...values].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]
}

export function summary(system, kase, metric, unit, values, extra = {}) {
  const round = (v) => Math.round(v * 1000) / 1000
  return { system, case: kase, metric, unit, p50: round(percentile(values, 0.5)), p90: round(percentile(values, 0.9)), n: values.length, ...extra }
}

/**
 * A sandbox per request: ms from asking `get()` for one to its first command's result
 * (`exec('true')`); the sandbox is killed after.
 */
export async function firstExecMs(get) {
  const t0 = process.hrtime.bigint()
  const sb = await get()
  const r = await sb.exec('true')
  const t1 = process.hrtime.bigint()
  if (r.exitCode !== 0) throw new Error(`exec true: ${JSON.stringify(r)}`)
  await sb.kill()
  return Number(t1 - t0) / 1e6
}

export function qemuBinary() {
  const candidate = process.env.MICROCELL_QEMU ?? 'qemu-system-x86_64'
  try {
    const version = execFileSync(candidate, ['--version'], { encoding: 'utf8' }).split('\n')[0]
    return { path: candidate, version }
  } catch {
    return null
  }
}

/**
 * The Firecracker binary MICROCELL_FIRECRACKER names, for the benchmarks' peer rows (we never
 * build or ship it): `{ path, version }`, or `{ path: null, why }`.
 */
export function firecrackerBinary() {
  const candidate = process.env.MICROCELL_FIRECRACKER
  if (!candidate) return { path: null, why: 'MICROCELL_FIRECRACKER is not set; no Firecracker binary is installed on this host' }
  try {
    const version = execFileSync(candidate, ['--version'], { encoding: 'utf8' }).split('\n')[0]
    return { path: candidate, version }
  } catch (err) {
    return { path: null, why: `MICROCELL_FIRECRACKER=${candidate} does not run: ${err.message}` }
  }
}

/** Firecracker's own log goes to a file, so that its stdout is the guest's serial port alone. */
export const FC_QUIET = ['--log-path', '/dev/null']

export function fcRequest(sock, method, url, body) {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? '' : JSON.stringify(body)
    const s = net.connect(sock, () => {
      s.write(`${method} ${url} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: ${Buffer.byteLength(payload)}\r\n\r\n${payload}`)
    })
    let buf = ''
    s.on('data', (d) => {
      buf += d
      const status = /^HTTP\/1\.1 (\d+)/.exec(buf)
      const head = buf.indexOf('\r\n\r\n')
      const len = /Content-Length: (\d+)/i.exec(buf)
      if (status && head >= 0 && (!len || buf.length - head - 4 >= Number(len[1]))) {
        s.destroy()
        if (Number(status[1]) >= 300) reject(new Error(`Firecracker ${method} ${url}: ${buf.slice(head + 4)}`))
        else resolve(buf.slice(head + 4))
      }
    })
    s.on('error', reject)
  })
}

export async function fcSocket(sock, deadlineMs = 10_000) {
  const end = performance.now() + deadlineMs
  while (!fs.existsSync(sock)) {
    if (performance.now() > end) throw new Error(`Firecracker made no API socket ${sock}`)
    await sleep(1)
  }
}

export function host() {
  const info = hostInfo()
  const cpu = os.cpus()[0]?.model ?? 'unknown'
  return {
    cpu,
    cores: os.cpus().length,
    memoryMib: Math.round(os.totalmem() / 2 ** 20),
    kernel: os.release(),
    kvm: info.kvmFlavour,
    node: process.version,
    qemu: qemuBinary()?.version ?? null,
    firecracker: firecrackerBinary().version ?? null,
  }
}

/**
 * RSS (KiB) of a process's mappings, split into guest-RAM-sized mappings and the rest; and of
 * the rest, the anonymous part (heap, stacks, kvm_run pages: memory the VMM owns). RSS also
 * counts the pages of the process's binaries it has touched: shared page cache, and in a Node
 * process a one-time cost that shows up wherever V8 first runs some code path.
 */
export function rssSplit(pid, guestBytes) {
  const smaps = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')
  let size = 0
  let guest = 0
  let other = 0
  let otherAnon = 0
  for (const line of smaps) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line)
    if (m) {
      size = Number(BigInt('0x' + m[2]) - BigInt('0x' + m[1]))
      continue
    }
    const r = /^(Rss|Anonymous):\s+(\d+) kB/.exec(line)
    if (!r) continue
    if (size >= guestBytes) {
      if (r[1] === 'Rss') guest += Number(r[2])
    } else if (r[1] === 'Rss') other += Number(r[2])
    else otherAnon += Number(r[2])
  }
  return { guestKib: guest, otherKib: other, otherAnonKib: otherAnon }
}

/** Writes bench/results/<name>.{json,md} (or into MICROCELL_BENCH_RESULTS: the nested VM's way out). */
export function write(name, results, notes = [], extraHost = {}) {
  const doc = { benchmark: name, date: new Date().toISOString(), host: { ...host(), ...extraHost }, results }
  const dir = process.env.MICROCELL_BENCH_RESULTS || path.join(root, 'bench', 'results')
  fs.mkdirSync(dir, { recursive: true })
  fs.writeFileSync(path.join(dir, `${name}.json`), JSON.stringify(doc, null, 2) + '\n')
  const h = doc.host
  const lines = [
    `# ${name}`,
    '',
    `${doc.date} on ${h.cpu}, ${h.cores} cores, ${h.memoryMib} MiB, Linux ${h.kernel}, KVM: ${h.kvm}, Node ${h.node}, ${h.qemu ?? 'no QEMU'}${h.firecracker ? `, ${h.firecracker}` : ''}`,
    '',
    '| system | case | metric | p50 | p90 | unit | n |',
    '|---|---|---|---:|---:|---|---:|',
    ...results.map((r) => `| ${r.system} | ${r.case} | ${r.metric} | ${r.p50} | ${r.p90} | ${r.unit} | ${r.n} |`),
    '',
    ...notes,
  ]
  fs.writeFileSync(path.join(dir, `${name}.md`), lines.join('\n') + '\n')
  console.log(lines.join('\n'))
}

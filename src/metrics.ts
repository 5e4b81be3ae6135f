import fs from 'node:fs'

import { MicrocellError } from './errors.js'

/** Options of `sandbox.metrics()`. */
export interface MetricsOptions {
  /** How long the guest's CPU use is sampled, 1 to 10000 ms (default 200). */
  intervalMs?: number
}

/** A sandbox's resource use, read from the guest's `/proc` and the host. */
export interface SandboxMetrics {
  /** When it was read (ms since the epoch, as `Date.now()`). */
  timestamp: number
  cpuCount: number
  /** Share of all vCPUs' time spent busy (not idle or waiting for I/O) over `intervalMs`, 0 to 100. */
  cpuUsedPct: number
  memTotalMib: number
  /** `memTotalMib - memAvailableMib`: what the guest's processes and kernel hold. */
  memUsedMib: number
  memAvailableMib: number
  /** The root filesystem (the sandbox's own copy of the root disk). */
  diskTotalMib: number
  diskUsedMib: number
  loadAvg: [number, number, number]
  uptimeS: number
  /** RSS of the engine's process on the host (QEMU), MiB; null on the built-in VMM, which runs in this process. */
  hostRssMib: number | null
  /** The guest's `eth0` since boot (bytes and packets each way); null for a sandbox without a network. */
  network: { rxBytes: number; txBytes: number; rxPackets: number; txPackets: number } | null
}

/** The guest side, one exec: sections a parser can find whatever each command prints. */
export function metricsScript(intervalMs: number): string {
  const seconds = (intervalMs / 1000).toFixed(3)
  return [
    'echo @stat; head -1 /proc/stat',
    `sleep ${seconds}`,
    'echo @stat; head -1 /proc/stat',
    'echo @cpus; grep -c ^processor /proc/cpuinfo',
    'echo @mem; cat /proc/meminfo',
    'echo @disk; stat -f -c "%b %f %S" /',
    'echo @load; cat /proc/loadavg',
    'echo @up; cat /proc/uptime',
    'echo @net; grep "^ *eth0:" /proc/net/dev || true',
  ].join('; ')
}

export function checkInterval(options: MetricsOptions): number {
  const ms = options.intervalMs ?? 200
  if (!Number.isInteger(ms) || ms < 1 || ms > 10_000) {
    throw new MicrocellError('E_INVALID_ARGUMENT', `metrics(): intervalMs is ${String(ms)}: give a whole number of milliseconds from 1 to 10000 (default 200)`)
  }
  return ms
}

const MIB = 1024 * 1024

/** Parses the script's output; `hostPid` is the engine's process (null: in this process). */
export function parseMetrics(text: string, hostPid: number | null): SandboxMetrics {
  const sections = new Map<string, string[][]>()
  let current: string[] | null = null
  for (const line of text.split('\n')) {
    if (line.startsWith('@')) {
      const list = sections.get(line.slice(1)) ?? []
      current = []
      list.push(current)
      sections.set(line.slice(1), list)
    } else if (current !== null && line.length > 0) current.push(line)
  }
  const one = (name: string, i = 0): string[] => {
    const s = sections.get(name)?.[i]
    if (!s || s.length === 0) throw new MicrocellError('E_PROTOCOL', `metrics(): the guest printed no ${name} section: ${text.slice(0, 500)}`)
    return s
  }
  const numbers = (line: string) => line.trim().split(/\s+/).map(Number)

  // cpu user nice system idle iowait irq softirq steal ...: busy = all - idle - iowait.
  const cpu = (i: number) => {
    const f = numbers(one('stat', i)[0]!.replace(/^cpu\s+/, ''))
    const total = f.reduce((a, b) => a + b, 0)
    return { total, idle: (f[3] ?? 0) + (f[4] ?? 0) }
  }
  const [a, b] = [cpu(0), cpu(1)]
  const dTotal = b.total - a.total
  const cpuUsedPct = dTotal > 0 ? Math.round((1000 * (dTotal - (b.idle - a.idle))) / dTotal) / 10 : 0

  const mem = new Map(one('mem').map((l) => {
    const m = /^(\w+):\s+(\d+)/.exec(l)
    return m ? [m[1]!, Number(m[2]) * 1024] : ['', 0]
  }))
  const memTotal = mem.get('MemTotal') ?? 0
  const memAvailable = mem.get('MemAvailable') ?? mem.get('MemFree') ?? 0
  const [blocks = 0, free = 0, bsize = 0] = numbers(one('disk')[0]!)
  const load = numbers(one('load')[0]!)
  const mib = (n: number) => Math.round((n / MIB) * 10) / 10

  return {
    timestamp: Date.now(),
    cpuCount: Number(one('cpus')[0]),
    cpuUsedPct,
    memTotalMib: mib(memTotal),
    memUsedMib: mib(memTotal - memAvailable),
    memAvailableMib: mib(memAvailable),
    diskTotalMib: mib(blocks * bsize),
    diskUsedMib: mib((blocks - free) * bsize),
    loadAvg: [load[0] ?? 0, load[1] ?? 0, load[2] ?? 0],
    uptimeS: numbers(one('up')[0]!)[0] ?? 0,
    hostRssMib: hostPid === null ? null : hostRss(hostPid),
    network: eth0(sections.get('net')?.[0]?.[0]),
  }
}

/** `/proc/net/dev`'s eth0 line: `eth0: rxBytes rxPackets errs drop fifo frame compressed multicast txBytes txPackets ...`. */
function eth0(line: string | undefined): SandboxMetrics['network'] {
  if (line === undefined) return null
  const f = line.slice(line.indexOf(':') + 1).trim().split(/\s+/).map(Number)
  return { rxBytes: f[0] ?? 0, rxPackets: f[1] ?? 0, txBytes: f[8] ?? 0, txPackets: f[9] ?? 0 }
}

function hostRss(pid: number): number | null {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m ? Math.round((Number(m[1]) / 1024) * 10) / 10 : null
  } catch {
    return null // it has just ended
  }
}

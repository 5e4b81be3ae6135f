// Compiled (not run) by types.spec.mjs: a TypeScript user of exec, files, workload VMs and logging.
import { Readable, Writable } from 'node:stream'

import { ExecProcess, ExecResult, MicroVm, Sandbox, SandboxFs, defaultGuest, guestImages, setLogLevel } from 'microcell'
import type {
  CopyStats,
  ExecEvent,
  ExecExit,
  ExecOptions,
  ExitStatus,
  GuestDirEntry,
  GuestImages,
  GuestStat,
  LogLevel,
  Rootfs,
  RunOptions,
  WorkloadError,
  WorkloadStatus,
} from 'microcell'

export async function exec(sb: Sandbox): Promise<void> {
  const opts: ExecOptions = { cwd: '/tmp', env: { A: '1' }, user: 'nobody', timeoutMs: 1000, stdin: 'input', rlimits: ['RLIMIT_NOFILE=64:64'] }
  const r: ExecResult = await sb.exec('ls', ['-l'], opts)
  const code: number | null = r.exitCode
  const signal: string | null = r.signal
  const timedOut: boolean = r.timedOut
  const out: Buffer = r.stdout
  const text: string = r.stdoutText() + r.stderrText('latin1')
  const ms: number = r.durationMs
  await sb.exec('true')
  await sb.exec('true', { timeoutMs: 5 })
  await sb.shell('echo hi', { stdin: Buffer.from('x') })

  const p: ExecProcess = await sb.execStream('cat', [], { stdin: 'pipe', tty: { rows: 24, cols: 80 } })
  const pid: number = p.pid
  const o: Readable = p.stdout
  const e: Readable = p.stderr
  const i: Writable = p.stdin
  await p.write('data')
  await p.write(new Uint8Array([1, 2]))
  await p.closeStdin()
  await p.signal('SIGINT')
  await p.resize(100, 30)
  await p.kill()
  const exit: ExecExit = await p.wait()
  const status: ExecExit | null = p.exitStatus
  for await (const ev of await sb.execStream('ls')) {
    const typed: ExecEvent = ev
    if (ev.type === 'exit') {
      const c: number | null = ev.exitCode
      void c
    } else {
      const d: Buffer = ev.data
      void d
    }
    void typed
  }
  void [code, signal, timedOut, out, text, ms, pid, o, e, i, exit, status]
}

export async function files(sb: Sandbox): Promise<void> {
  const fs: SandboxFs = sb.fs
  const data: Buffer = await fs.read('/etc/hostname')
  const text: string = await fs.readText('/etc/hostname')
  await fs.write('/tmp/a', 'text', { mode: 0o600, append: false, parents: true })
  await fs.write('/tmp/b', Buffer.from('bytes'))
  const entries: GuestDirEntry[] = await fs.list('/tmp')
  await fs.mkdir('/tmp/d/e', { recursive: true, mode: 0o700 })
  await fs.remove('/tmp/d', { recursive: true, force: true })
  await fs.rename('/tmp/a', '/tmp/c')
  const st: GuestStat = await fs.stat('/tmp/c')
  const lst: GuestStat = await fs.lstat('/tmp/c')
  const there: boolean = await fs.exists('/tmp/c')
  const rs: Readable = fs.readStream('/tmp/c', { start: 0, end: 10 })
  const ws: Writable = fs.writeStream('/tmp/w', { mode: 0o644 })
  const c1: CopyStats = await fs.copyFromHost('./dir', '/srv/dir')
  const c2: CopyStats = await fs.copyToHost('/srv/dir', './back')
  void [data, text, entries, st.type, st.mode, st.mtimeMs, lst.linkTarget, there, rs, ws, c1.entries, c2.bytes]
}

export async function workload(): Promise<void> {
  const images: GuestImages = guestImages()
  const rootfs: Rootfs = defaultGuest()
  const vm: MicroVm = await MicroVm.builder().rootfs(rootfs).execPath('/bin/sh').args(['-c', 'exit 7']).start({ engine: 'auto', consoleStream: true })
  const end: ExitStatus = await vm.wait()
  const w: WorkloadStatus | null | undefined = end.workload
  const err: WorkloadError | null | undefined = w?.error
  const engine = vm.engineInfo?.engine
  const opts: RunOptions = { console: process.stdout, engine: 'qemu', bootTimeoutMs: 60_000 }
  const status: WorkloadStatus = await MicroVm.builder().rootfs(images.rootfs).execPath('/bin/true').logLevel('debug').run(opts)
  const level: LogLevel = setLogLevel('info')
  void [end, w, err, engine, status.exitCode, status.signal, level]
}

// Compiled (not run) by types.spec.mjs: snapshots, clones and pools as a TypeScript user writes them.
import { MicroVm, MicrocellError, RestorePool, Snapshot, VmPool } from 'microcell'
import type {
  CloneOptions,
  PoolStats,
  RestoreOptions,
  RestorePoolOptions,
  SnapshotConfig,
  SnapshotOptions,
  VmPoolOptions,
} from 'microcell'

async function snapshots(): Promise<void> {
  const vm = await MicroVm.start({ kernel: '/k', memoryMib: 256 }, { trackDirtyPages: true })
  await vm.pause()
  const paused: boolean = vm.paused
  vm.resume()
  const opts: SnapshotOptions = { incremental: false }
  const snap: Snapshot = await vm.snapshot('/tmp/s', opts)
  const written: number | null = snap.bytesWritten
  const config: SnapshotConfig = snap.config
  const mib: number = config.memoryMib
  const loaded = await Snapshot.load(snap.dir)
  const restoreOptions: RestoreOptions = { consoleStream: true, consoleQueueBytes: 4096, consoleOutput: '/tmp/c.log' }
  const clone: MicroVm = await loaded.restore(restoreOptions)
  const cloneOptions: CloneOptions = { consoleOutput: (i) => `/tmp/c${i}.log` }
  const clones: MicroVm[] = await loaded.clone(5, cloneOptions)
  console.log(paused, written, mib, clone.timings.firstExitNs, clones.length)
}

async function pools(snapshot: Snapshot): Promise<void> {
  const options: RestorePoolOptions = { snapshot, size: 4, concurrency: 1, restoreOptions: { consoleStream: true } }
  await using pool = new RestorePool(options)
  await pool.filled()
  const vm: MicroVm = await pool.acquire({ consoleStream: false })
  await pool.release(vm)
  const stats: PoolStats = pool.stats()
  const ready: number = stats.ready + stats.acquired + stats.misses + stats.refillErrors
  const err: MicrocellError | null = stats.lastRefillError
  await pool.close({ killAcquired: true })

  const vmOptions: VmPoolOptions = { config: { kernel: '/k' }, size: 2, startOptions: { consoleStream: true } }
  const warm = new VmPool(vmOptions)
  const booted: MicroVm = await warm.acquire()
  await warm.release(booted)
  await warm.close()
  console.log(ready, err?.code)
}

void snapshots()
void pools(await Snapshot.load('/tmp/s'))
// @ts-expect-error: clone() takes consoleOutput as a function of the clone's index
void (await Snapshot.load('/s')).clone(2, { consoleOutput: '/tmp/one.log' })

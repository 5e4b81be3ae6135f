// How the modules microvm.ts imports (snapshot.ts, pool.ts) wrap an addon VM handle in a
// MicroVm without importing microvm.ts back (a runtime import cycle): microvm.ts registers its
// private constructor here when it loads, which the package entry does before anything else.
import { MicrocellError } from '../errors.js'
import type { MicroVm } from '../microvm.js'

import type * as native from './native.js'

interface MicroVmWrappers {
  native(handle: native.NativeVmHandle, consoleEnabled: boolean): MicroVm
  workload(handle: native.NativeWorkloadHandle, startNs: bigint, consoleEnabled: boolean): MicroVm
}

let wrappers: MicroVmWrappers | undefined

/** Called once, by microvm.ts. */
export function registerMicroVm(w: MicroVmWrappers): void {
  wrappers = w
}

function registered(): MicroVmWrappers {
  if (wrappers === undefined) {
    throw new MicrocellError('E_INTERNAL', 'microcell was loaded without its MicroVm module: import the package entry ("microcell"); please report it')
  }
  return wrappers
}

/** A MicroVm around a VM the addon made (a start or a restore). */
export function microVmFromNative(handle: native.NativeVmHandle, consoleEnabled: boolean): MicroVm {
  return registered().native(handle, consoleEnabled)
}

/** A MicroVm around a workload VM the addon restored. */
export function microVmFromWorkload(handle: native.NativeWorkloadHandle, startNs: bigint, consoleEnabled: boolean): MicroVm {
  return registered().workload(handle, startNs, consoleEnabled)
}

import type { LogLevel } from './config.js'
import * as native from './internal/native.js'

/**
 * Turns on the native side's logging (`tracing`: engines, agent client, VMM) to stderr at
 * `level`, for the whole process: one subscriber is installed on the first level other than
 * `off`, and later calls only make it more verbose (the most verbose level asked for so far
 * wins; `off` after that changes nothing). A MicroVm's `logLevel` calls this at `start()`.
 * Returns the level in effect.
 */
export function setLogLevel(level: LogLevel): LogLevel {
  return native.setLogLevel(level) as LogLevel
}

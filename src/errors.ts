/**
 * The one error type of microcell. `code` is stable across releases: match on it, not on the
 * message. Codes: `E_CONFIG_*` (invalid configuration), `E_NO_KVM`, `E_KVM`, `E_KERNEL_NOT_FOUND`,
 * `E_KERNEL_FORMAT`, `E_INITRD`, `E_UNSUPPORTED_GUEST`, `E_MEMORY`, `E_CONSOLE_OUTPUT`,
 * `E_CONSOLE_NOT_ENABLED`, `E_NATIVE_LOAD`, `E_INVALID_ARGUMENT`, `E_INTERNAL`, snapshots:
 * `E_SNAPSHOT_IO`, `E_SNAPSHOT_CORRUPT`, `E_SNAPSHOT_VERSION`, `E_SNAPSHOT_HOST`, `E_SNAPSHOT`,
 * `E_VM_STATE` (pause/snapshot of a VM that has ended), `E_POOL_CLOSED`, ...
 */
export class MicrocellError extends Error {
  /** Stable error code, e.g. `E_CONFIG_VCPUS`. */
  readonly code: string

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'MicrocellError'
    this.code = code
  }
}

/** The configuration codes `build()` and `start()` can throw. */
export const CONFIG_ERROR_CODES = [
  'E_CONFIG_JSON',
  'E_CONFIG_VCPUS',
  'E_CONFIG_MEMORY',
  'E_CONFIG_MISSING',
  'E_CONFIG_PATH_NOT_FOUND',
  'E_CONFIG_PATH_KIND',
  'E_CONFIG_INVALID_STRING',
  'E_CONFIG_GUEST_PATH',
  'E_CONFIG_GUEST_PATH_CONFLICT',
  'E_CONFIG_PAIR',
  'E_CONFIG_PORT',
  'E_CONFIG_RLIMIT',
  'E_CONFIG_ENV',
  'E_CONFIG_NETWORK',
  'E_CONFIG_CMDLINE',
] as const

export type ConfigErrorCode = (typeof CONFIG_ERROR_CODES)[number]

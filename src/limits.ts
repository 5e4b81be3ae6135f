/**
 * The host core's limits and defaults that TypeScript checks or documents, mirrored from Rust
 * (`crates/sandbox/src/limits.rs`, the addon's `limits()`); `__test__/types.spec.mjs` checks
 * that every value here is the Rust one. Not part of the public API.
 */
export const LIMITS = {
  MAX_VCPUS: 32,
  DEFAULT_VCPUS: 1,
  DEFAULT_MEMORY_MIB: 512,
  MIN_MEMORY_MIB: 64,
  DEFAULT_BOOT_TIMEOUT_MS: 30_000,
  MIN_BOOT_TIMEOUT_MS: 100,
  MAX_BOOT_TIMEOUT_MS: 600_000,
  CONSOLE_QUEUE_BYTES: 64 * 1024,
  MAX_CONSOLE_QUEUE_BYTES: 2 ** 30,
  DEFAULT_OUTPUT_MAX_BYTES: 64 * 2 ** 20,
  DEFAULT_COPY_MAX_BYTES: 2 ** 30,
} as const

/** The default of `stop({ timeoutMs })`, for `Sandbox` and `MicroVm` alike (TS only: Rust takes it as an argument). */
export const DEFAULT_STOP_TIMEOUT_MS = 10_000
